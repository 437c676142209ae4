"""Data facts: every number the rest of the system needs, measured on the training split."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from safetrain.data.sources import digest
from safetrain.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class DataFacts:
    classes: list[str]
    channels: int
    height: int
    width: int
    mean: list[float]  # per channel, pixels scaled to [0, 1], training split only, no augmentation
    std: list[float]
    counts: dict[str, list[int]]  # per split, per class
    fingerprint: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        return asdict(self)


def channel_stats(batches: Iterable[Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of uint8 (B, C, H, W) batches, streamed in float64 (one batch in memory)."""
    s = ss = None
    n = 0
    for b in batches:
        x = b.to(torch.float64).div_(255).transpose(0, 1).reshape(b.shape[1], -1)  # (C, B*H*W)
        s = x.sum(1) if s is None else s + x.sum(1)
        ss = (x * x).sum(1) if ss is None else ss + (x * x).sum(1)
        n += x.shape[1]
    mean = s / n
    std = (ss / n - mean * mean).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()


def measure_facts(classes: list[str], splits: dict, shape: tuple[int, int, int], source_fp: str,
                  train_batches, cache_dir: Path) -> DataFacts:
    """Counts per split, shape, and mean/std of the train split (cached by its fingerprint).

    `train_batches` is a zero-argument callable yielding uint8 batches of the train split, so
    a cache hit never reads a pixel."""
    train = splits["train"]
    fp = digest(source_fp, *train.ids)
    counts = {n: torch.bincount(s.labels, minlength=len(classes)).tolist() for n, s in splits.items()}
    cache = cache_dir / "stats" / f"{fp}.json"
    if cache.exists():
        mean, std = json.loads(cache.read_text())["mean_std"]
        log.info("normalization stats from cache %s", cache)
    else:
        mean, std = channel_stats(train_batches())
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"mean_std": [mean, std]}))
        tmp.replace(cache)
    if min(std) < 1e-3:
        raise DataError(f"[M33] a channel of the training images is constant (std={std}); nothing can be "
                        "learned from it. Check that the images are not blank.")
    c, h, w = shape
    return DataFacts(classes, c, h, w, mean, std, counts, fp)
