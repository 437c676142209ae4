"""Checkpoints: plain data (tensors, numbers, strings, dicts) written atomically, loadable with
`torch.load(..., weights_only=True)`. A crash mid-write leaves the previous file intact."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from safetrain.data.pipelines import Normalize
from safetrain.errors import TrainingStopped
from safetrain.io import save_torch
from safetrain.models import build_model

FORMAT_VERSION = 2  # 2: the normalization lives in data_facts (mean, std), stored once


class Checkpointer:
    """Saves `best.pt` and `last.pt` of one run: the model (unwrapped, on the CPU), optimizer and schedule
    state, the epoch's metrics, and what never changes in a run: the data facts (with the normalization,
    the model's input contract [M02]) and the resolved config."""

    def __init__(self, folder: Path, *, model: nn.Module, optimizer, schedule, data_facts: dict, config: dict):
        self.folder, self.model, self.optimizer, self.schedule = Path(folder), model, optimizer, schedule
        self.fixed = {"data_facts": data_facts, "config": config}

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.pt"

    def save(self, name: str, state: dict) -> None:
        """`state`: epoch, metrics, best. A failed write (disk full, no permission) stops training: the previous
        file of that name is still whole (atomic writes), so the last complete checkpoint is kept."""
        try:
            self._write(name, state)
        except OSError as e:
            raise TrainingStopped(f"[io] could not write {self.path(name)} ({e.strerror or e}). Free space or fix the "
                                  "permissions; the last complete checkpoint is kept.") from None

    def _write(self, name: str, state: dict) -> None:
        save_torch(self.path(name), {
            "format_version": FORMAT_VERSION,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            **state, **self.fixed,
            "rng": {"torch": torch.get_rng_state()},
        })


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
    ckpt = load_checkpoint(path)
    f = ckpt["data_facts"]
    if model is None:
        model = build_model(**ckpt["config"]["model"], channels=f["channels"], height=f["height"],
                            width=f["width"], num_classes=len(f["classes"]))
    model.load_state_dict(ckpt["model"])
    return nn.Sequential(Normalize(f["mean"], f["std"]), model).eval()
