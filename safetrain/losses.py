"""The loss is derived from the task; the model emits logits and the loss owns the link [M11, M13].
On imbalanced data `loss.balance` makes minority classes count [M24]."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from safetrain.metrics import IMBALANCE_RATIO, imbalance_ratio

# Provisional: what `auto` uses on imbalanced data until benchmarks/imbalance.py has measured the
# methods on CIFAR-10-LT (issue 5). Logit adjustment is the method with the fewest knobs that the
# literature reports at or near the top (Menon et al. 2021); none of it applies to balanced data.
AUTO_METHOD = "logit_adjust"


def resolve_balance(balance: str, counts: list[int]) -> tuple[str, str]:
    """(method, why) for `loss.balance` given the training class counts."""
    ratio = imbalance_ratio(counts)
    if balance != "auto":
        return balance, f"loss.balance={balance} (imbalance ratio {ratio:.1f})"
    if ratio <= IMBALANCE_RATIO:
        return "none", f"balanced enough (imbalance ratio {ratio:.1f} <= {IMBALANCE_RATIO:g})"
    return AUTO_METHOD, f"imbalance ratio {ratio:.1f} > {IMBALANCE_RATIO:g}: auto picks {AUTO_METHOD}"


def class_weights(counts: list[int], method: str, beta: float = 0.9999) -> Tensor:
    """Per-class loss weights with mean 1: inverse frequency, or the effective number of samples
    (1 - beta**n) / (1 - beta) of Cui et al. 2019 (used by `effective` and `drw`)."""
    n = torch.tensor(counts, dtype=torch.float64).clamp_min(1)
    w = 1 / n if method == "inverse" else (1 - beta) / (1 - beta ** n)
    return (w / w.mean()).float()


class LogitAdjustedLoss(nn.CrossEntropyLoss):
    """Cross-entropy on logits + tau * log(class prior) (Menon et al. 2021): training pushes the raw
    logits, which predictions use, to be fair to rare classes."""

    def __init__(self, counts: list[int], tau: float = 1.0, **kw):
        super().__init__(**kw)
        prior = torch.tensor(counts, dtype=torch.float32).clamp_min(1)
        self.register_buffer("shift", tau * (prior / prior.sum()).log())

    def forward(self, logits: Tensor, y: Tensor) -> Tensor:
        return super().forward(logits + self.shift, y)


class DeferredReweightedLoss(nn.CrossEntropyLoss):
    """Plain cross-entropy, then effective-number class weights from `start` (a share of the epochs)
    on: deferred re-weighting, DRW (Cao et al. 2019). The loop calls `on_epoch`."""

    def __init__(self, counts: list[int], start: float = 0.8, **kw):
        super().__init__(**kw)
        self.register_buffer("late_weight", class_weights(counts, "effective"))
        self.start = start

    def on_epoch(self, epoch: int, max_epochs: int) -> None:
        self.weight = self.late_weight if epoch > math.floor(self.start * max_epochs) else None


def build_loss(task: str, name: str = "auto", label_smoothing: float = 0.0, balance: str = "none",
               counts: Optional[list[int]] = None) -> nn.Module:
    """`balance` is a resolved method (see resolve_balance); `sampler` changes the batches, not the loss."""
    if task != "multiclass" or name not in ("auto", "cross_entropy"):
        raise ValueError(f"no loss {name!r} for task {task!r}")  # config.validate refuses this earlier
    kw = dict(label_smoothing=label_smoothing)
    if balance in ("inverse", "effective"):
        return nn.CrossEntropyLoss(weight=class_weights(counts, balance), **kw)
    if balance == "drw":
        return DeferredReweightedLoss(counts, **kw)
    if balance == "logit_adjust":
        return LogitAdjustedLoss(counts, **kw)
    return nn.CrossEntropyLoss(**kw)


def chance_losses(loss_fn: nn.Module, counts: Tensor) -> tuple[float, float]:
    """(uniform, blind): the loss of uniform predictions and the lowest loss a model that ignores its
    input can reach (the best constant logits), on labels drawn with these per-class `counts`. For plain
    cross-entropy on balanced classes both are ln(C); on imbalanced data, or with a balancing loss, they
    are what a model that learns nothing from the images sits at [M19, M28]."""
    counts = counts.detach().double()
    n = (counts * min(1.0, 10_000 / float(counts.sum()))).round().clamp_min((counts > 0).double())  # <= ~10k labels
    y = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), n.long())
    b = torch.zeros(len(counts), device=counts.device, requires_grad=True)
    loss = lambda: loss_fn(b.expand(len(y), -1), y)
    with torch.enable_grad():
        uniform = float(loss().detach())
        opt = torch.optim.LBFGS([b], max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = loss()
            value.backward()
            return value
        opt.step(closure)
        return uniform, min(uniform, float(loss().detach()))
