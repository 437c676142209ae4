"""Classification metrics from torchmetrics, and the one selection metric that drives
checkpoint choice, early stopping and the plateau scheduler [M25, M29]."""
from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall, MultilabelAveragePrecision)

def selection_metric(task: str, imbalanced: bool) -> tuple[str, str]:
    """(metric name, direction). Accuracy on balanced data, macro-F1 on imbalanced data (DataFacts.imbalanced)."""
    return ("macro_f1", "max") if imbalanced else ("acc", "max")


def build_metrics(num_classes: int, device: torch.device) -> MetricCollection:
    # torchmetrics' multiclass default average differs per metric: say it every time.
    k = dict(num_classes=num_classes)
    return MetricCollection({
        "acc": MulticlassAccuracy(average="micro", **k),
        "balanced_acc": MulticlassRecall(average="macro", **k),
        "macro_f1": MulticlassF1Score(average="macro", **k),
        "precision": MulticlassPrecision(average="none", **k),
        "recall": MulticlassRecall(average="none", **k),
        "f1": MulticlassF1Score(average="none", **k),
        "confusion": MulticlassConfusionMatrix(**k),
    }).to(device)


def build_multilabel_metrics(num_labels: int, device: torch.device) -> MetricCollection:
    """The multi-label task's metrics (issue 24): mean average precision over labels (macro, threshold-free: the
    selection metric), per-label AP, and the labels' cardinality is compared elsewhere. F1 at chosen thresholds:
    `thresholded_f1`."""
    k = dict(num_labels=num_labels)
    return MetricCollection({
        "map": MultilabelAveragePrecision(average="macro", **k),
        "ap": MultilabelAveragePrecision(average="none", **k),
    }).to(device)


def choose_thresholds(probs: torch.Tensor, targets: torch.Tensor, grid: int = 99) -> torch.Tensor:
    """(C,) one threshold per label, the one of 0.01..0.99 with the best F1 of that label on (N, C) validation
    `probs` and 0/1 `targets` [not one 0.5 for every label: a rare label's probabilities rarely reach it]. A label
    without positives keeps 0.5."""
    ts = torch.linspace(0.01, 0.99, grid, device=probs.device)
    pred = probs[None] >= ts[:, None, None]  # (T, N, C)
    y = targets.bool()[None]
    tp = (pred & y).sum(1).double()
    f1 = 2 * tp / (pred.sum(1) + y.sum(1)).double().clamp_min(1)  # (T, C)
    best = ts[f1.argmax(0)]
    return torch.where(targets.sum(0) > 0, best, torch.full_like(best, 0.5))


def thresholded_f1(probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor) -> dict:
    """Micro and macro F1 and per-label F1 of the label sets predicted at `thresholds`."""
    pred, y = probs >= thresholds, targets.bool()
    tp, fp, fn = (pred & y).sum(0).double(), (pred & ~y).sum(0).double(), (~pred & y).sum(0).double()
    per_label = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
    micro = float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp_min(1))
    return {"micro_f1": micro, "macro_f1": float(per_label.mean()), "f1": per_label.tolist()}


def to_plain(values: dict) -> dict:
    """Tensors -> floats / lists, for JSON."""
    return {k: (v.tolist() if isinstance(v, torch.Tensor) and v.ndim else float(v)) for k, v in values.items()}
