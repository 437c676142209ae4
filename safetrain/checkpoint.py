"""Checkpoints: plain data (tensors, numbers, strings, dicts) written atomically, loadable with
`torch.load(..., weights_only=True)`. A crash mid-write leaves the previous file intact."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from safetrain import distributed as dist
from safetrain.data.pipelines import Normalize
from safetrain.errors import TrainingStopped
from safetrain.io import save_torch
from safetrain.models import build_model
from safetrain.models.pretrained import architecture

FORMAT_VERSION = 2  # 2: the normalization lives in data_facts (mean, std), stored once


SINCE = {"margins"}  # parts that checkpoints of earlier versions lack: those start afresh on resume


class Checkpointer:
    """Saves `best.pt` and `last.pt` of one run. Each holds what decides how training goes on from its epoch, so
    that a resumed run ends exactly as an uninterrupted one: the model (unwrapped, on the CPU) and the `parts`
    (anything with state_dict/load_state_dict: optimizer, schedule, the training loader's shuffling and
    augmentation generators, the detectors) and every global random generator; and what never changes in a run:
    the data facts (with the normalization, the model's input contract [M02]), the data spec (what data, split how:
    the commands after training rebuild the splits from it), the resolved config, the lr.
    Under torchrun every rank calls `save` (each rank's random generators are kept, for dropout) and rank 0 writes;
    a failed write stops every rank."""

    def __init__(self, folder: Path, *, model: nn.Module, data_facts: dict, config: dict, lr: float | None = None,
                 data_spec: dict | None = None, **parts):
        self.folder, self.model, self.parts = Path(folder), model, parts
        self.fixed = {"data_facts": data_facts, "data_spec": data_spec, "config": config, "lr": lr,
                      "processes": dist.world()}

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.pt"

    def save(self, name: str, state: dict) -> None:
        """`state`: epoch, metrics, best, history. A failed write (disk full, no permission) stops training: the
        previous file of that name is still whole (atomic writes), so the last complete checkpoint is kept."""
        rng = dist.gather(rng_state()) if dist.active() else rng_state()
        dist.together(lambda: self._write(name, state, rng) if dist.is_main() else None)

    def _write(self, name: str, state: dict, rng) -> None:
        try:
            save_torch(self.path(name), {
                "format_version": FORMAT_VERSION,
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                **{k: part.state_dict() for k, part in self.parts.items()},
                **state, **self.fixed, "rng": rng,
            })
        except OSError as e:
            kept = sorted(p.name for p in self.folder.glob("*.pt"))
            raise TrainingStopped(f"[io] could not write {self.path(name)} ({e.strerror or e}). Free space or fix the "
                                  "permissions; " + (f"the last complete checkpoints are kept ({', '.join(kept)})."
                                                     if kept else "no checkpoint was complete yet."),
                                  resumable=True) from None

    def restore(self, ckpt: dict) -> None:
        """Put the model, the parts and the global generators back as `ckpt` saved them."""
        self.model.load_state_dict(ckpt["model"])
        for k, part in self.parts.items():
            if k in ckpt or k not in SINCE:
                part.load_state_dict(ckpt[k])
        set_rng_state(ckpt["rng"][dist.rank()] if isinstance(ckpt["rng"], list) else ckpt["rng"])  # list: per rank


def rng_state() -> dict:
    """The global generators: torch (CPU and every CUDA device: dropout), Python's and NumPy's (a user's model)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized()
            else [], "python": random.getstate(), "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                            gauss]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path} is a plain state dict (layer name -> tensor), not a safetrain checkpoint: it has no "
                         "classes, data facts or normalization. Use it as starting weights (model=torchvision "
                         "model.weights=FILE, or model.init_from for a safetrain checkpoint), then use that run's "
                         "checkpoints/best.pt.")
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        version = ckpt.get("format_version") if isinstance(ckpt, dict) else None
        raise ValueError(f"{path}: checkpoint format {version} is not {FORMAT_VERSION}; it was written by another "
                         "safetrain version (or another program). Use it with the safetrain version that wrote it, "
                         "or train again.")
    return ckpt


def load_classifier(path: Path, model=None):
    """A trained classifier from a checkpoint, with its normalization in front: it takes uint8
    (B, C, H, W) images as they come from disk and returns logits, so train and inference cannot
    normalize differently [M02]. Pass `model` (same architecture) for a model safetrain did not build."""
    return classifier(load_checkpoint(path), model)


def classifier(ckpt: dict, model=None) -> nn.Sequential:
    """`load_classifier` for a checkpoint already loaded: Normalize (from its data facts) + the model, eval mode."""
    f = ckpt["data_facts"]
    if model is None:
        model = build_model(architecture(ckpt["config"]["model"]), (f["channels"], f["height"], f["width"]),
                            len(f["classes"]))
    model.load_state_dict(ckpt["model"])
    return nn.Sequential(Normalize(f["mean"], f["std"]), model).eval()
