"""Classification metrics from torchmetrics, and the one selection metric that drives
checkpoint choice, early stopping and the plateau scheduler [M25, M29]."""
from __future__ import annotations

from typing import Optional

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall)
from torchmetrics.functional.classification import multilabel_average_precision
from torchmetrics.utilities import dim_zero_cat

def selection_metric(task: str, imbalanced: bool) -> tuple[str, str]:
    """(metric name, direction). Accuracy on balanced data, macro-F1 on imbalanced data (DataFacts.imbalanced);
    mean average precision for a multi-label task [M40]."""
    if task == "multilabel":
        return ("map", "max")
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


class MultilabelScores(Metric):
    """Every score of a multi-label task from one pass (the predictions of a split are kept: N x C floats): mean
    average precision over the labels that have positives (macro, threshold-free: the selection metric [M40]),
    per-label AP; at one threshold per label (`thresholds`, else chosen on these predictions: validation [M39])
    micro/macro F1 and per-label precision, recall, F1, support; label accuracy at 0.5 (comparable with training's),
    exact-set accuracy, label cardinality of the data and of the predictions, and how many distinct label sets were
    predicted [M27]."""

    def __init__(self, num_labels: int, thresholds: Optional[torch.Tensor] = None):
        super().__init__()
        self.num_labels, self.thresholds = num_labels, thresholds
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.probs.append(logits.float().sigmoid())
        self.targets.append(targets.float())

    def compute(self) -> dict:
        probs, y = dim_zero_cat(self.probs), dim_zero_cat(self.targets)
        t = choose_thresholds(probs, y) if self.thresholds is None else self.thresholds.to(probs.device)
        return multilabel_scores(probs, y, t)


def average_precisions(probs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, list]:
    """(mAP over the labels that have positives, per-label AP with None for a label without any: it has no AP, and
    is left out of the mean rather than scored 0)."""
    has = targets.sum(0) > 0
    if not has.any():
        return torch.tensor(0.0), [None] * targets.shape[1]
    ap = multilabel_average_precision(probs[:, has], targets[:, has].int(), num_labels=int(has.sum()),
                                      average="none").float().reshape(-1)
    per_label = iter(ap.tolist())
    return ap.mean(), [next(per_label) if h else None for h in has.tolist()]


def multilabel_scores(probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor) -> dict:
    """The scores of MultilabelScores for (N, C) probabilities and 0/1 targets at `thresholds` (C,)."""
    y, has = targets.bool(), targets.sum(0) > 0
    mean_ap, ap = average_precisions(probs, targets)
    pred, at_half = probs >= thresholds, probs >= 0.5
    return {"map": mean_ap, "ap": ap,
            "chance_map": targets[:, has].mean() if has.any() else torch.tensor(0.0),  # images in any order
            **thresholded_f1(probs, targets, thresholds), "thresholds": thresholds,
            "acc": (at_half == y).float().mean(), "exact_match": (pred == y).all(1).float().mean(),
            "cardinality": targets.sum(1).mean(), "predicted_cardinality": pred.sum(1).float().mean(),
            "predicted_sets": len(torch.unique(pred, dim=0)) if len(pred) else 0,
            "true_sets": len(torch.unique(y, dim=0)) if len(y) else 0, "predicted_at_half": int(at_half.any(1).sum())}


def per_label(classes: list[str], scores: dict) -> dict:
    """The per-label table of metrics.json (training's test and mode=evaluate) from multilabel_scores' output."""
    return {c: {"precision": scores["precision"][i], "recall": scores["recall"][i], "f1": scores["f1"][i],
                "ap": scores["ap"][i], "support": scores["support"][i], "threshold": float(scores["thresholds"][i])}
            for i, c in enumerate(classes)}


def build_multilabel_metrics(num_labels: int, device: torch.device,
                             thresholds: Optional[torch.Tensor] = None) -> MultilabelScores:
    """The multi-label task's metrics; `thresholds`: the checkpoint's, chosen on validation (test, evaluate)."""
    return MultilabelScores(num_labels, thresholds).to(device)


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
    """Micro and macro F1, and per label F1, precision, recall and support, of the label sets predicted at
    `thresholds`."""
    pred, y = probs >= thresholds, targets.bool()
    tp, fp, fn = (pred & y).sum(0).double(), (pred & ~y).sum(0).double(), (~pred & y).sum(0).double()
    per_label = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
    micro = float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp_min(1))
    return {"micro_f1": micro, "macro_f1": float(per_label.mean()), "f1": per_label.tolist(),
            "precision": (tp / (tp + fp).clamp_min(1)).tolist(), "recall": (tp / (tp + fn).clamp_min(1)).tolist(),
            "support": y.sum(0).long().tolist()}


def to_plain(values: dict) -> dict:
    """Tensors -> floats / lists, for JSON (lists and ints as they are)."""
    return {k: (v.tolist() if isinstance(v, torch.Tensor) and v.ndim else v if isinstance(v, (list, int)) else
                float(v)) for k, v in values.items()}
