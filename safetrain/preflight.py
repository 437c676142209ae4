"""Checks before the first epoch (default on, about a second) and `mode=doctor`'s extra
overfit-one-batch test. Each check says what it saw and, when it fails, what to change."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    fix: str = ""
    row: str = ""

    def __str__(self) -> str:
        return f"[{self.row}] {self.name}: {self.detail}. {self.fix}".strip()


def input_check(x: Tensor) -> Check:
    mean, std = x.float().mean(dim=(0, 2, 3)), x.float().std(dim=(0, 2, 3))
    ok = bool(torch.isfinite(x).all()) and bool((mean.abs() < 0.5).all() and ((std > 0.5) & (std < 2)).all())
    return Check("inputs standardized", ok, f"per-channel mean {[round(v, 2) for v in mean.tolist()]}, "
                 f"std {[round(v, 2) for v in std.tolist()]}", "" if ok else
                 "The normalization does not fit the images: clear the cache ($SAFETRAIN_CACHE).", "M33")


def init_and_gradient_checks(model: nn.Module, x: Tensor, y: Tensor, loss_fn, num_classes: int) -> list[Check]:
    """On a copy of the model: the cross-entropy at initialization is near ln(C) [M19] (plain, whatever
    `loss_fn` balances: logit adjustment moves its own start by the class prior), and two small SGD steps
    give every trainable parameter a finite, non-zero gradient [M26] (two, because zero-initialized
    residual norms pass gradients to the layers before them from the second step on)."""
    m = copy.deepcopy(model).train()
    chance = math.log(num_classes)
    loss0 = None
    reached = {n: False for n, p in m.named_parameters() if p.requires_grad}
    bad = set()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        logits = m(x).float()
        loss0 = float(nn.functional.cross_entropy(logits.detach(), y)) if loss0 is None else loss0
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for n, p in m.named_parameters():
            if p.grad is not None:
                bad |= {n} if not torch.isfinite(p.grad).all() else set()
                reached[n] = reached.get(n, False) or bool(p.grad.abs().sum() > 0)
        opt.step()
    ok_loss = 0.5 * chance < loss0 < chance + max(1.0, 0.5 * chance)
    dead = [n for n, r in reached.items() if not r] + sorted(bad)
    return [
        Check("loss at initialization", ok_loss, f"{loss0:.3f} vs ln({num_classes}) = {chance:.3f}", "" if ok_loss else
              "Far from chance: the head, the initialization or the label mapping is broken (logits should start "
              "small and labels be class indices 0..C-1).", "M19"),
        Check("gradients reach every parameter", not dead, "all trainable parameters get a finite, non-zero "
              "gradient" if not dead else f"no usable gradient for {len(dead)}: {', '.join(dead[:5])}",
              "" if not dead else "Those layers are disconnected from the loss, frozen by a zero factor, or produce "
              "NaN: check the model's forward.", "M26"),
    ]


def overfit_one_batch(model: nn.Module, x: Tensor, y: Tensor, loss_fn, make_optimizer, lr: float,
                      steps: int = 300) -> Check:
    """A healthy model and optimizer memorize a small batch within `steps` steps [M28]."""
    m = copy.deepcopy(model).train()
    opt = make_optimizer(m, lr)
    for step in range(1, steps + 1):
        loss = loss_fn(m(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            with torch.no_grad():
                acc = float((m.eval()(x).argmax(1) == y).float().mean())
            m.train()
            if acc == 1.0:
                return Check("overfit one batch", True, f"{len(y)} samples memorized in {step} steps", row="M28")
    return Check("overfit one batch", False, f"{len(y)} samples not memorized in {steps} steps (accuracy {acc:.2f})",
                 "The model cannot even learn one batch: check that labels match the images, try optim.lr=auto, a "
                 "larger model, or look for a layer that blocks the signal.", "M28")


def table(checks: list[Check]) -> str:
    rows = [f"| {c.name} | {'PASS' if c.passed else 'FAIL'} | {c.detail} | {c.fix} |" for c in checks]
    return "\n".join(["| check | result | what was seen | fix |", "|---|---|---|---|", *rows])
