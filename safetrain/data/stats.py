"""Data facts: every number the rest of the system needs, measured on the training split."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from safetrain.data.sources import digest
from safetrain.errors import DataError
from safetrain.io import cached

log = logging.getLogger(__name__)
IMBALANCE_RATIO = 3.0  # largest/smallest training class count above which the data counts as imbalanced


def imbalance_ratio(counts: list[int]) -> float:
    return max(counts) / max(1, min(counts))


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
    left_out: dict = field(default_factory=dict)  # image folders: entries skipped, bad files left out (and why)
    task: str = "multiclass"  # multilabel: several labels per image, `counts` are each label's positives
    images: dict[str, int] = field(default_factory=dict)  # images per split

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def imbalance_ratio(self) -> float:
        """Largest over smallest training class count (an empty class counts as 1); of each label's positives."""
        return imbalance_ratio(self.counts["train"])

    @property
    def imbalanced(self) -> bool:
        """Decided here once: loss balancing, the selection metric and the report follow it [M24, M25]."""
        return self.imbalance_ratio > IMBALANCE_RATIO

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


def measure_facts(classes: list[str], counts: dict[str, list[int]], train_ids: list[str],
                  shape: tuple[int, int, int], source_fp: str, train_batches, cache_dir: Path,
                  left_out: dict | None = None, task: str = "multiclass",
                  images: dict[str, int] | None = None) -> DataFacts:
    """Shape, counts per split, and mean/std of the train split (cached by its fingerprint).

    `train_batches` is a zero-argument callable yielding uint8 batches of the train split, so
    a cache hit never reads a pixel."""
    fp = digest(source_fp, *train_ids)
    path = cache_dir / "stats" / f"{fp}.json"
    stored, hit = cached(path, lambda: {"mean_std": channel_stats(train_batches())}, keys=("mean_std",))
    mean, std = stored["mean_std"]
    if hit:
        log.info("normalization stats from cache %s", path)
    if min(std) < 1e-3:
        raise DataError(f"[M33] a channel of the training images is constant (std={std}); nothing can be "
                        "learned from it. Check that the images are not blank.")
    c, h, w = shape
    return DataFacts(classes, c, h, w, mean, std, counts, fp, left_out or {}, task, images or {})
