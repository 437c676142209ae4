"""AdamW (or SGD with momentum) without weight decay on norm/bias parameters, and one
learning-rate schedule interface whose stepping the loop cannot get wrong [M15, M17]."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay conv/linear weights only; biases, norm and PReLU parameters (ndim <= 1) are exempt."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    exempt = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float,
                    nesterov: bool = True) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))


class LRSchedule:
    """`plateau` steps once per epoch on the validation selection metric, in that metric's
    direction; `onecycle` and `cosine` step once per optimizer step. The loop calls both
    hooks every time; the schedule decides which one moves it."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, *, mode: str, total_steps: int,
                 factor: float = 0.5, patience: int = 2, min_lr: float = 1e-6, warmup_fraction: float = 0.2):
        self.name = name
        if name == "plateau":
            self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=mode, factor=factor, patience=patience, min_lr=min_lr)
        elif name == "onecycle":  # linear warmup to lr, then linear decay to ~0
            self.sched = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps + 1,
                pct_start=warmup_fraction, anneal_strategy="linear", cycle_momentum=False,
                div_factor=10.0, final_div_factor=100.0)
        else:  # cosine with linear warmup
            warm = max(1, int(warmup_fraction * total_steps))
            self.sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
                (s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total_steps - warm))))))

    def after_step(self) -> None:
        if self.name != "plateau":
            self.sched.step()

    def after_validation(self, metric: float) -> None:
        if self.name == "plateau":
            self.sched.step(metric)

    def state_dict(self) -> dict:
        return {k: v for k, v in self.sched.state_dict().items() if k not in ("lr_lambdas", "_scale_fn_ref")}

    def load_state_dict(self, state: dict) -> None:
        self.sched.load_state_dict(state)


def find_lr(model: nn.Module, loader, loss_fn, make_optimizer, prec, *, bounds: tuple[float, float],
            start: float = 1e-7, end: float = 10.0, steps: int = 100) -> float:
    """Learning-rate range test (Smith 2017): raise the lr geometrically, one batch per step, until the
    smoothed loss blows up; return a tenth of the lr at the loss minimum, clamped to `bounds`.
    The model's weights are restored afterwards."""
    saved = copy.deepcopy(model.state_dict())
    optimizer = make_optimizer(model, start)
    factor = (end / start) ** (1 / steps)
    lr, avg, best, best_lr, i = start, 0.0, math.inf, start, 0
    model.train()
    while i < steps:
        for x, y in loader:
            for g in optimizer.param_groups:
                g["lr"] = lr
            with prec.autocast():
                loss = loss_fn(model(prec.prepare(x)).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            avg = 0.95 * avg + 0.05 * loss.item()
            smooth = avg / (1 - 0.95 ** (i + 1))
            if smooth < best:
                best, best_lr = smooth, lr
            i, lr = i + 1, lr * factor
            if i >= steps or not math.isfinite(smooth) or smooth > 4 * best:
                i = steps
                break
    model.load_state_dict(saved)
    return min(max(best_lr / 10, bounds[0]), bounds[1])
