"""Seeded, stratified splits: val (and test, when the source has none) carved from train."""
from __future__ import annotations

import torch
from torch import Tensor

from safetrain.data.sources import ImageSet, Source
from safetrain.errors import DataError


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(kept, carved) sorted indices; `fraction` of every class is carved out, at least one
    sample of every class that has two or more."""
    g = torch.Generator().manual_seed(seed)
    kept, carved = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = round(len(idx) * fraction)
        n = min(max(n, 1), len(idx) - 1) if len(idx) >= 2 else 0
        carved.append(idx[:n])
        kept.append(idx[n:])
    return torch.cat(kept).sort().values, torch.cat(carved).sort().values


def make_splits(src: Source, val_fraction: float, test_fraction: float, seed: int) -> dict[str, ImageSet]:
    """train/val/test. A source's own splits are kept; what is missing is carved from train
    (test first, then val from the rest), stratified and seeded, so the splits never overlap."""
    parts = dict(src.parts)
    train = parts.pop("train", None) or parts.pop("all")
    if "test" not in parts:
        keep, cut = stratified_split(train.labels, test_fraction, seed)
        train, parts["test"] = train.subset(keep), train.subset(cut)
    if "val" not in parts:
        keep, cut = stratified_split(train.labels, val_fraction, seed + 1)
        train, parts["val"] = train.subset(keep), train.subset(cut)
    splits = {"train": train, "val": parts["val"], "test": parts["test"]}
    _check_labels(splits, len(src.classes))
    return splits


def _check_labels(splits: dict[str, ImageSet], num_classes: int) -> None:
    for name, s in splits.items():
        if len(s) == 0:
            raise DataError(f"[M07] the {name} split is empty. Add images, or raise data.val_fraction / "
                            "data.test_fraction so every split gets some.")
        bad = (s.labels < 0) | (s.labels >= num_classes)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise DataError(f"[M08] {name} sample {s.ids[i]} has label {int(s.labels[i])}, outside "
                            f"[0, {num_classes}). Labels must be class indices 0..{num_classes - 1}.")
    missing = set(range(num_classes)) - set(splits["train"].labels.unique().tolist())
    if missing:
        raise DataError(f"[M08] classes {sorted(missing)} have no training sample. Add images for them "
                        "or remove their folders.")


def describe(splits: dict[str, ImageSet]) -> dict[str, list[str]]:
    """splits.json: which sample went where, by stable id."""
    return {name: s.ids for name, s in splits.items()}
