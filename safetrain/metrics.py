"""Classification metrics from torchmetrics, and the one selection metric that drives
checkpoint choice, early stopping and the plateau scheduler [M25, M29]."""
from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall)

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


def to_plain(values: dict) -> dict:
    """Tensors -> floats / lists, for JSON."""
    return {k: (v.tolist() if isinstance(v, torch.Tensor) and v.ndim else float(v)) for k, v in values.items()}
