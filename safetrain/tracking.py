"""What a run leaves behind: config and environment snapshot, JSON files, metrics.jsonl and
TensorBoard scalars, images, text and hparams [M30, M31]."""
from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from safetrain.findings import Finding
from safetrain.io import write_json, write_text


def environment(device: torch.device) -> dict:
    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "git_sha": sha, "argv": sys.argv,
        **{pkg: version(pkg) for pkg in ("safetrain", "torch", "torchvision", "hydra-core", "omegaconf",
                                         "torchmetrics", "tensorboard")},
    }


def write_config(run_dir: Path, config: dict) -> None:
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))


def snapshot(run_dir: Path, config: dict, overrides: list[str], env: dict) -> None:
    write_config(run_dir, config)
    write_text(run_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    write_json(run_dir / "env.json", env)


class Tracker:
    """TensorBoard event files plus one JSON line per epoch in metrics.jsonl. A resumed run keeps what the epochs
    up to `keep_through` wrote (-1: nothing) and drops the rest, so no epoch is there twice: metrics.jsonl is cut
    to those lines, and TensorBoard purges every later step (its own mechanism for restarted runs)."""

    def __init__(self, run_dir: Path, keep_through: int | None = None):
        self.run_dir = run_dir
        self.jsonl = run_dir / "metrics.jsonl"
        if keep_through is not None and self.jsonl.exists():
            kept = [r for r in records(self.jsonl)
                    if r["epoch"] < keep_through or (r["epoch"] == keep_through and "train/loss" in r)]
            write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))  # the end-of-training line is redone
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=None if keep_through is None else keep_through + 1)

    def epoch(self, epoch: int, scalars: dict, findings: list[Finding] = ()) -> None:
        """One line of metrics.jsonl and the epoch's scalars; `findings` as text (epoch 0: before training)."""
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, epoch)
        for f in findings:
            self.tb.add_text("warnings", str(f), epoch)
        with self.jsonl.open("a") as out:
            out.write(json.dumps({"epoch": epoch, **scalars, "warnings": [str(f) for f in findings]}) + "\n")
        self.tb.flush()

    def text(self, tag: str, text: str) -> None:
        self.tb.add_text(tag, text)

    def figure(self, tag: str, png: bytes) -> None:
        """A figure of safetrain/figures.py as PNG, as report.md and report.html show it."""
        self.tb.add_image(tag, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), dataformats="HWC")

    def confusion(self, matrix: torch.Tensor, classes: list[str], png: bytes) -> None:
        """The confusion matrix figure (class names, counts, shares; rows: true class) and a markdown table."""
        self.figure("test/confusion_matrix", png)
        m = matrix.float().cpu()
        head = "| true \\ pred | " + " | ".join(classes) + " |\n|" + "---|" * (len(classes) + 1) + "\n"
        body = "".join(f"| {c} | " + " | ".join(str(int(v)) for v in m[i]) + " |\n" for i, c in enumerate(classes))
        self.text("test/confusion_matrix", head + body)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self.tb.add_hparams(flat, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        self.tb.close()


def records(jsonl: Path) -> list[dict]:
    """The whole lines of metrics.jsonl (a process killed while appending leaves its last line cut)."""
    out = []
    for line in jsonl.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
