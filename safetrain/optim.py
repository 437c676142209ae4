"""AdamW (or SGD with momentum) without weight decay on norm/bias parameters, and one
learning-rate schedule interface whose stepping the loop cannot get wrong [M15, M17]."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import nn

from safetrain.errors import ConfigError
from safetrain.models.layers import hooks


def param_groups(model: nn.Module, weight_decay: float, lr: float, bias_lr_mult: float = 1.0) -> list[dict]:
    """Decay conv/linear weights only; biases, norm and PReLU parameters (ndim <= 1) are exempt, and learn at
    `bias_lr_mult` x the lr (airbench's 64 for BatchNorm shifts next to scale-invariant conv weights). A model that is
    fine-tuned (models.layers.FineTunable, backbone_lr_mult < 1) gets discriminative rates: the head at `lr`
    (the first groups: the lr the log shows), the backbone at `lr * backbone_lr_mult` [M36]."""
    parts = [(model.head_parameters(), 1.0), (model.backbone_parameters(), model.backbone_lr_mult)] if hooks(
        model).backbone_lr_mult < 1 else [(list(model.parameters()), 1.0)]
    return [{"params": [p for p in params if p.requires_grad and (p.ndim > 1) == decays],
             "lr": lr * mult * (1.0 if decays else bias_lr_mult), "weight_decay": weight_decay if decays else 0.0}
            for params, mult in parts for decays in (True, False)]


class Optimizer(NamedTuple):
    build: Callable  # (param groups, lr, momentum, nesterov) -> torch.optim.Optimizer
    lr_range: tuple[float, float]  # a sane learning rate for it [M16]; outside only with optim.allow_unusual_lr


OPTIMIZERS = {  # optim=NAME; momentum is SGD's momentum or AdamW's beta1
    "adamw": Optimizer(lambda groups, lr, momentum, nesterov: torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999)),
                       (1e-5, 1e-2)),
    "sgd": Optimizer(lambda groups, lr, momentum, nesterov: torch.optim.SGD(groups, lr=lr, momentum=momentum,
                                                                            nesterov=nesterov), (1e-4, 1.0)),
}


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float,
                    nesterov: bool = True, bias_lr_mult: float = 1.0) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ConfigError(f"[config] optim={name!r} is not an optimizer; choose one of {list(OPTIMIZERS)}.")
    return OPTIMIZERS[name].build(param_groups(model, weight_decay, lr, bias_lr_mult), lr, momentum, nesterov)


class Lookahead:
    """Weight averaging as the CIFAR-10 speed runs do it (airbench's lookahead): from `start` (a share of the
    steps) on, every `every` steps an average of the weights (BatchNorm statistics too) moves toward them and the
    weights are set to it, the average's memory growing with training, (step / total)^3 x 0.95^every; at the end
    of each epoch the weights are the average, so validation, checkpoints and the test see it.
    torch.optim.swa_utils.AveragedModel keeps a separate copy with a fixed decay; here the decay changes with the
    step and the copy goes back into the model, so the dozen lines are ours."""

    def __init__(self, model: nn.Module, total_steps: int, start: float = 0.3, every: int = 5):
        self.model, self.total, self.every = model, total_steps, every
        self.first, self.step, self.average = int(start * total_steps), 0, None

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in self.model.state_dict().values() if t.dtype.is_floating_point]

    @torch.no_grad()
    def after_step(self) -> None:
        self.step += 1
        if self.step < self.first or self.step % self.every:
            return
        if self.average is None:
            self.average = [t.detach().clone() for t in self._tensors()]
            return
        decay = 0.95 ** self.every * (self.step / self.total) ** 3
        for a, t in zip(self.average, self._tensors()):
            a.lerp_(t, 1 - decay)
            t.copy_(a)

    @torch.no_grad()
    def after_epoch(self) -> None:
        if self.average is not None:
            for a, t in zip(self.average, self._tensors()):
                t.copy_(a)

    def state_dict(self) -> dict:
        return {"step": self.step, "average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.average = state["step"], state["average"]
        if self.average is not None:
            self.average = [a.to(t.device) for a, t in zip(self.average, self._tensors())]


def _plateau(optimizer, *, mode, factor, patience, min_lr, **_):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience,
                                                      min_lr=min_lr)


def _onecycle(optimizer, *, total_steps, warmup_fraction, **_):
    """Linear warmup to lr, then linear decay to ~0; each phase at least 2 steps long (OneCycleLR divides by a
    phase's length less one), and a flat lr for runs of fewer than 4 steps (too short for a cycle)."""
    n = total_steps + 1
    if n < 4:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=n,
        pct_start=min(max(warmup_fraction, 2 / n), 1 - 2 / n), anneal_strategy="linear", cycle_momentum=False,
        div_factor=10.0, final_div_factor=100.0)


def _cosine(optimizer, *, total_steps, warmup_fraction, **_):
    """Cosine decay after a linear warmup."""
    warm = max(1, int(warmup_fraction * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total_steps - warm))))))


# sched.name -> (builder, steps once per epoch on the validation metric?)
SCHEDULES = {"plateau": (_plateau, True), "onecycle": (_onecycle, False), "cosine": (_cosine, False)}


class LRSchedule:
    """`plateau` steps once per epoch on the validation selection metric, in that metric's
    direction; `onecycle` and `cosine` step once per optimizer step. The loop calls both
    hooks every time; the schedule decides which one moves it."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, *, mode: str, total_steps: int,
                 factor: float = 0.5, patience: int = 2, min_lr: float = 1e-6, warmup_fraction: float = 0.2):
        if name not in SCHEDULES:
            raise ConfigError(f"[config] sched.name={name!r} is not a schedule; choose one of {list(SCHEDULES)}.")
        build, self.per_epoch = SCHEDULES[name]
        self.name = name
        self.sched = build(optimizer, mode=mode, total_steps=total_steps, factor=factor, patience=patience,
                           min_lr=min_lr, warmup_fraction=warmup_fraction)

    def after_step(self) -> None:
        if not self.per_epoch:
            self.sched.step()

    def after_validation(self, metric: float) -> None:
        if self.per_epoch:
            self.sched.step(metric)

    def state_dict(self) -> dict:
        return {k: v for k, v in self.sched.state_dict().items() if k not in ("lr_lambdas", "_scale_fn_ref")}

    def load_state_dict(self, state: dict) -> None:
        self.sched.load_state_dict(state)
