"""Checkpoints: plain data (tensors, numbers, strings, dicts) written atomically, loadable with
`torch.load(..., weights_only=True)`. A crash mid-write leaves the previous file intact."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FORMAT_VERSION = 1


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, *, model, optimizer, schedule, epoch: int, metrics: dict, best: dict,
                    normalization: dict, data_facts: dict, config: dict) -> None:
    atomic_save({
        "format_version": FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "epoch": epoch,
        "metrics": metrics,
        "best": best,
        "normalization": normalization,  # {"mean": [...], "std": [...]}: the model's input contract [M02]
        "data_facts": data_facts,
        "config": config,
        "rng": {"torch": torch.get_rng_state()},
    }, path)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {ckpt.get('format_version')} is not {FORMAT_VERSION}; "
                         "it was written by another safetrain version.")
    return ckpt


def load_classifier(path: Path, model=None):
    """A trained classifier from a checkpoint, with its normalization in front: it takes uint8
    (B, C, H, W) images as they come from disk and returns logits, so train and inference cannot
    normalize differently [M02]. Pass `model` (same architecture) for a model safetrain did not build."""
    from torch import nn

    from safetrain.data.pipelines import Normalize
    from safetrain.models import build_model

    ckpt = load_checkpoint(path)
    f = ckpt["data_facts"]
    if model is None:
        model = build_model(**ckpt["config"]["model"], channels=f["channels"], height=f["height"],
                            width=f["width"], num_classes=len(f["classes"]))
    model.load_state_dict(ckpt["model"])
    return nn.Sequential(Normalize(**ckpt["normalization"]), model).eval()
