"""The loss is derived from the task; the model emits logits and the loss owns the link [M11, M13].
On imbalanced data `loss.balance` makes minority classes count [M24]."""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import Tensor, nn

from safetrain.data.stats import IMBALANCE_RATIO

# What `auto` uses on imbalanced data, chosen by measurement: on CIFAR-10-LT (ratio 100, 3 seeds, 30 epochs,
# benchmarks/RESULTS.md) logit adjustment reached 70.9% balanced test accuracy, deferred re-weighting 68.9%,
# effective-number / inverse weights 63.8 / 63.5%, the class-balanced sampler 62.0%, plain cross-entropy 59.8%.
AUTO_METHOD = "logit_adjust"


def resolve_balance(balance: str, facts) -> tuple[str, str]:
    """(method, why) for `loss.balance` given the data facts (their imbalance is decided there)."""
    ratio = facts.imbalance_ratio
    if balance != "auto":
        return balance, f"loss.balance={balance} (imbalance ratio {ratio:.1f})"
    if facts.task == "multilabel":  # every label's positives are weighed against its own negatives
        return AUTO_MULTILABEL, f"several labels per image: auto picks {AUTO_MULTILABEL} (each label's positives " \
                                "against its negatives)"
    if not facts.imbalanced:
        return "none", f"balanced enough (imbalance ratio {ratio:.1f} <= {IMBALANCE_RATIO:g})"
    return AUTO_METHOD, f"imbalance ratio {ratio:.1f} > {IMBALANCE_RATIO:g}: auto picks {AUTO_METHOD}"


def class_weights(counts: list[int], method: str, beta: float = 0.9999) -> Tensor:
    """Per-class loss weights with mean 1: inverse frequency, or the effective number of samples
    (1 - beta**n) / (1 - beta) of Cui et al. 2019 (used by `effective` and `drw`)."""
    n = torch.tensor(counts, dtype=torch.float64).clamp_min(1)
    w = 1 / n if method == "inverse" else (1 - beta) / (1 - beta ** n)
    return (w / w.mean()).float()


class TaskLoss(nn.CrossEntropyLoss):
    """Cross-entropy, the multiclass loss, with the hook the loop calls before each epoch (a no-op here).

    Class weights weigh each sample by its class (a mixed target by its mix), label smoothing included: PyTorch's
    own weighted smoothing weighs each class's share of the smoothing by that class's weight instead, which moved the
    best prediction for a clear image of a 1:150 majority class to 0.89 for the rare one (inverse weights, e = 0.1)."""

    smooth_to: Optional[Tensor] = None  # (C,) where label smoothing moves the target; None: uniform

    def forward(self, logits: Tensor, y: Tensor) -> Tensor:
        z, e = self.fitted(logits), self.label_smoothing
        if not e or (self.weight is None and self.smooth_to is None):
            return super().forward(z, y)  # PyTorch's own: uniform smoothing, every sample weighing 1
        target = y.to(z.dtype) if y.is_floating_point() else nn.functional.one_hot(y, z.shape[1]).to(z.dtype)
        q = 1 / z.shape[1] if self.smooth_to is None else self.smooth_to.to(z.dtype)
        w = torch.ones(len(z), dtype=z.dtype, device=z.device) if self.weight is None else \
            target @ self.weight.to(z.dtype)  # each sample's weight
        loss = -w * (((1 - e) * target + e * q) * z.log_softmax(1)).sum(1)
        return {"mean": lambda: loss.sum() / w.sum(), "sum": loss.sum}.get(self.reduction, lambda: loss)()

    def on_epoch(self, epoch: int, max_epochs: int) -> None:
        """Losses that change during training (deferred re-weighting) change here."""

    def fitted(self, logits: Tensor) -> Tensor:
        """The logits this loss fits to the labels (the model's own here); the margin over training is taken on them."""
        return logits


class LogitAdjustedLoss(TaskLoss):
    """Cross-entropy on logits + tau * log(class prior) (Menon et al. 2021): training pushes the raw
    logits, which predictions use, to be fair to rare classes.

    Label smoothing moves the target towards the (tempered) prior, not towards uniform: the adjusted softmax fits
    the target, so the raw one fits target / prior, and a uniform share e / C of a 1:150 prior's rare class becomes
    150 times the share of the true class's e / C, outweighing it: a run with ratio 152 and smoothing 0.1 predicted the
    rare class for every image (balanced accuracy 0.62; 0.99 without smoothing). Smoothed towards the prior, every
    other class gets the same e in the raw (balanced) space: label smoothing as it is meant, where predictions are."""

    def __init__(self, counts: list[int], tau: float = 1.0, **kw):
        super().__init__(**kw)
        prior = torch.tensor(counts, dtype=torch.float32).clamp_min(1)
        self.register_buffer("shift", tau * (prior / prior.sum()).log())

    def fitted(self, logits: Tensor) -> Tensor:
        return logits + self.shift

    @property
    def smooth_to(self) -> Tensor:
        """(C,) where label smoothing moves the target: the prior to the power tau, normalized."""
        return self.shift.softmax(0)


class DeferredReweightedLoss(TaskLoss):
    """Plain cross-entropy, then effective-number class weights from `start` (a share of the epochs)
    on: deferred re-weighting, DRW (Cao et al. 2019). The loop calls `on_epoch`."""

    def __init__(self, counts: list[int], start: float = 0.8, **kw):
        super().__init__(**kw)
        self.register_buffer("late_weight", class_weights(counts, "effective"))
        self.start = start

    def on_epoch(self, epoch: int, max_epochs: int) -> None:
        self.weight = self.late_weight if epoch > math.floor(self.start * max_epochs) else None


# loss.balance=NAME (after `auto` is resolved) -> the loss for (training class counts, label smoothing).
# `sampler` balances the batches instead (data.make_loader), so its loss is plain cross-entropy.
BALANCE = {
    "none": lambda counts, **kw: TaskLoss(**kw),
    "inverse": lambda counts, **kw: TaskLoss(weight=class_weights(counts, "inverse"), **kw),
    "effective": lambda counts, **kw: TaskLoss(weight=class_weights(counts, "effective"), **kw),
    "drw": lambda counts, **kw: DeferredReweightedLoss(counts, **kw),
    "logit_adjust": lambda counts, **kw: LogitAdjustedLoss(counts, **kw),
    "sampler": lambda counts, **kw: TaskLoss(**kw),
}


class MultilabelLoss(nn.Module):
    """Sigmoid + binary cross-entropy on logits, one independent yes/no per label [M13], averaged over labels and
    images; label smoothing e makes the best prediction e/2 for an absent label and 1 - e/2 for a present one.
    `pos_weight` (C,) weighs each label's positives (BCE's own argument); the asymmetric loss (Ridnik et al. 2021)
    instead down-weighs easy negatives (focusing `gamma_neg`, probabilities below `clip` ignored), for labels that are
    mostly absent.

    With pos_weight w the best prediction for a target t is w t / (w t + 1 - t), so the targets are smoothed to the
    values that give e/2 and 1 - e/2 there: smoothed to e/2 itself, an absent label with 1 positive in 50 (w = 49)
    was best predicted at 0.72 for every image, present or not."""

    def __init__(self, pos_weight: Optional[Tensor] = None, label_smoothing: float = 0.0, gamma_neg: float = 0.0,
                 clip: float = 0.0):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.label_smoothing, self.gamma_neg, self.clip = label_smoothing, gamma_neg, clip

    def elementwise(self, logits: Tensor, y: Tensor) -> Tensor:
        """(B, C) the loss of each label of each image."""
        y = self.smoothed(y.float())
        if not self.gamma_neg:
            return nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=self.pos_weight,
                                                                  reduction="none")
        p = logits.sigmoid()
        p_neg = (p - self.clip).clamp_min(0)  # probability shifting: easy negatives below `clip` cost nothing
        pos = -y * nn.functional.logsigmoid(logits)
        neg = -(1 - y) * torch.log((1 - p_neg).clamp_min(1e-8)) * p_neg.pow(self.gamma_neg)
        return pos + neg

    def smoothed(self, y: Tensor) -> Tensor:
        """Targets in [0, 1] -> those whose best prediction is e/2 (absent) ... 1 - e/2 (present), per label. The
        asymmetric loss smooths its positives only: it barely resists a positive share on an absent label (its
        focusing), which then was best predicted at 0.42 with e = 0.1 (0.07 unsmoothed)."""
        half = self.label_smoothing / 2
        w = 1.0 if self.pos_weight is None else self.pos_weight.to(y.dtype)
        present = (1 - half) / (1 - half + w * half)
        absent = 0.0 if self.gamma_neg else half / (w * (1 - half) + half)
        return absent + y * (present - absent)

    def forward(self, logits: Tensor, y: Tensor) -> Tensor:
        return self.elementwise(logits, y).mean()

    def on_epoch(self, epoch: int, max_epochs: int) -> None:
        """No change during training."""

    def chance(self, positives: Tensor, images: int) -> tuple[float, float]:
        """(uniform, blind) as chance_losses, for labels with `positives` (C,) of `images`: the loss of logits 0,
        and the lowest loss of constant logits (per label, found on a grid: exact enough for a threshold)."""
        q = (positives.detach().double().cpu() / max(1, images)).float()  # (C,) each label's share of positives
        dev = torch.device("cpu") if self.pos_weight is None else self.pos_weight.device
        z = torch.linspace(-12, 12, 961, device=dev)[:, None].expand(-1, len(q))  # z[480] = 0
        with torch.no_grad():
            on, off = (self.elementwise(z, torch.full_like(z, t)).cpu() for t in (1.0, 0.0))
        expected = q * on + (1 - q) * off  # (grid, C)
        return float(expected[480].mean()), float(expected.min(0).values.mean())


def positive_weights(positives: list[int], images: int, cap: float = 50.0) -> Tensor:
    """BCE's pos_weight per label: negatives over positives (a label in 10% of the images weighs its positives 9x),
    capped at `cap` so that a label with a handful of positives does not swamp the rest."""
    p = torch.tensor(positives, dtype=torch.float64).clamp_min(1)
    return ((images - p) / p).clamp(1.0, cap).float()


# loss.balance=NAME for a multi-label task -> the loss for (training positives per label, images, label smoothing)
MULTILABEL_BALANCE = {
    "none": lambda positives, images, **kw: MultilabelLoss(**kw),
    "pos_weight": lambda positives, images, **kw: MultilabelLoss(positive_weights(positives, images), **kw),
    "asymmetric": lambda positives, images, **kw: MultilabelLoss(gamma_neg=4.0, clip=0.05, **kw),
}
AUTO_MULTILABEL = "pos_weight"
LOSSES = {"multiclass": ("cross_entropy",), "multilabel": ("binary_cross_entropy",)}  # task -> the losses that fit it


def build_loss(task: str, name: str = "auto", label_smoothing: float = 0.0, balance: str = "none",
               counts: Optional[list[int]] = None, images: int = 0) -> nn.Module:
    """`balance` is a resolved method (see resolve_balance); `counts`: per class (multiclass) or positives per label
    (multi-label, of `images` training images)."""
    methods = MULTILABEL_BALANCE if task == "multilabel" else BALANCE
    if name not in ("auto", *LOSSES.get(task, ())) or balance not in methods:
        raise ValueError(f"no loss {name!r} with balance {balance!r} for task {task!r}")  # validate refuses earlier
    if task == "multilabel":
        return MULTILABEL_BALANCE[balance](counts, images, label_smoothing=label_smoothing)
    return BALANCE[balance](counts, label_smoothing=label_smoothing)


def chance_losses(loss_fn: nn.Module, counts: Tensor, images: int = 0) -> tuple[float, float]:
    """(uniform, blind) for labels drawn with per-class `counts`: the loss of uniform predictions, and the
    lowest loss a model that ignores its input can reach (the best constant logits). For plain
    cross-entropy on balanced classes both are ln(C); on imbalanced data, or with a balancing loss, they
    are where a model that learns nothing from the images sits [M28]. Exact for the cross-entropy family
    (class weights w, label smoothing e towards q, uniform or the prior, a constant logit shift): the best constant
    prediction is proportional to the target mass m_k = (1 - e) w_k n_k + e q_k sum_j w_j n_j (each sample weighted
    by its class), and a shift is absorbed by it."""
    if isinstance(loss_fn, MultilabelLoss):  # counts: positives per label, of `images`
        return loss_fn.chance(counts, images)
    n = counts.detach().double().cpu()
    C = len(n)
    w = torch.ones(C, dtype=torch.float64) if loss_fn.weight is None else loss_fn.weight.detach().double().cpu()
    e, z = loss_fn.label_smoothing, (n * w).sum()  # a weighted mean divides by the weights of the labels
    per_class = copy.copy(loss_fn)  # the same loss, one value per label
    per_class.reduction = "none"
    classes = torch.arange(C, device=counts.device)
    uniform = (n * per_class(torch.zeros(C, C, device=counts.device), classes).double().cpu()).sum() / z
    q = getattr(loss_fn, "smooth_to", None)  # where smoothing moves the target (None: uniform)
    q = (torch.full((C,), 1 / C) if q is None else q).detach().double().cpu()
    m = (1 - e) * w * n + e * q * z  # each sample weighted by its class, its smoothing share too
    blind = -(m * (m / m.sum()).log()).nan_to_num().sum() / z  # 0 * log 0 = 0
    return float(uniform), float(blind)
