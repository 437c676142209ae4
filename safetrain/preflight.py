"""Checks before the first epoch (default on, about a second) and `mode=doctor`'s extra
overfit-one-batch test. Each check is a Finding that says what it saw and, when it fails, what to change."""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from safetrain.engine import Precision, train_step
from safetrain.errors import DataError
from safetrain.findings import FAIL, PASS, WARN, Finding
from safetrain.losses import MultilabelLoss

# How far a normalized training batch's per-channel statistics may stray [M01, M33]: (max |mean|, (min std,
# max std)). Inside "standardized" all is well; outside it the preflight check fails (a warning: a small or
# unusual batch can stray); outside "refused" the statistics cannot belong to these images and the run stops.
STANDARDIZED, REFUSED = (0.5, (0.5, 2.0)), (1.5, (0.2, 5.0))
CPU = Precision(torch.device("cpu"), bf16=False)


def _within(mean: Tensor, std: Tensor, bounds) -> bool:
    max_mean, (lo, hi) = bounds
    return bool((mean.abs() <= max_mean).all() and ((std >= lo) & (std <= hi)).all())


def input_check(x: Tensor, weights: str | None = None) -> Finding:
    """What the model is fed, checked once after the pipeline: finite floats, per channel standardized. Raises
    DataError when the batch cannot be a standardization of the training images; else a pass/fail check.
    `weights`: normalized with pretrained weights' statistics on purpose [M34], so not standardized for this data."""
    if not x.is_floating_point() or not torch.isfinite(x).all():
        raise DataError(f"[M33] the training pipeline produced {x.dtype} inputs with non-finite values; the "
                        "model needs finite floats. Check the images for corruption.")
    mean, std = x.float().mean(dim=(0, 2, 3)), x.float().std(dim=(0, 2, 3))
    seen = f"per-channel mean {[round(v, 2) for v in mean.tolist()]}, std {[round(v, 2) for v in std.tolist()]}"
    if weights:
        return Finding("M33", "inputs standardized", f"inputs normalized as {weights} expects: {seen}.", "",
                       "preflight", verdict=PASS, evidence={"mean": mean.tolist(), "std": std.tolist()})
    fix = "The statistics do not match the images: clear the cache ($SAFETRAIN_CACHE) and rerun."
    if not _within(mean, std, REFUSED):
        raise DataError(f"[M33] inputs after normalization are far from standardized ({seen}). {fix}")
    ok = _within(mean, std, STANDARDIZED)
    return Finding("M33", "inputs standardized", f"inputs standardized: {seen}.", "" if ok else fix, "preflight",
                   verdict=PASS if ok else WARN, evidence={"mean": mean.tolist(), "std": std.tolist()})


def init_and_gradient_checks(model: nn.Module, x: Tensor, y: Tensor, loss_fn, num_classes: int,
                             prec: Precision = CPU, trained_from: str | None = None) -> list[Finding]:
    """On a copy of the model: the cross-entropy at initialization is near ln(C) [M19] (plain, whatever
    `loss_fn` balances: logit adjustment moves its own start by the class prior), and two small SGD steps
    give every trainable parameter a finite, non-zero gradient [M26] (two, because zero-initialized
    residual norms pass gradients to the layers before them from the second step on). `trained_from`: the checkpoint
    the model starts from (model.init_from), whose kept head may already know the classes: below chance is fine."""
    m, prec = copy.deepcopy(model).train(), prec.trial()
    reached = {n: False for n, p in m.named_parameters() if p.requires_grad}
    bad: set[str] = set()

    def inspect():
        for n, p in m.named_parameters():
            if p.grad is not None:
                bad.update([n] if not torch.isfinite(p.grad).all() else [])
                reached[n] = reached.get(n, False) or bool(p.grad.abs().sum() > 0)

    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    logits = [train_step(m, x, y, loss_fn, opt, prec, after_backward=inspect).logits for _ in range(2)][0]
    loss0, chance, seen = _initial_loss(logits.detach().float(), y, isinstance(loss_fn, MultilabelLoss), num_classes)
    ok_loss = (0.5 * chance < loss0 or trained_from is not None) and loss0 < chance + max(1.0, 0.5 * chance)
    known = f" Below chance as expected: the model starts from {trained_from}." if loss0 <= 0.5 * chance and ok_loss \
        else ""
    dead = [n for n, r in reached.items() if not r] + sorted(bad)
    return [
        Finding("M19", "loss at initialization", f"loss at initialization: {seen}.{known}", "" if ok_loss else
                "Far from chance: the head, the initialization or the label mapping is broken (logits should start "
                "small and labels be class indices 0..C-1, or 0/1 per label).", "preflight",
                verdict=PASS if ok_loss else WARN, evidence={"loss": loss0, "chance": chance}),
        Finding("M26", "gradients reach every parameter", "gradients reach every parameter: " + (
                f"no usable gradient for {len(dead)}: {', '.join(dead[:5])}." if dead else
                "all trainable parameters get a finite, non-zero gradient."), "" if not dead else
                "Those layers are disconnected from the loss, frozen by a zero factor, or produce NaN: check the "
                "model's forward.", "preflight", verdict=FAIL if dead else PASS,
                evidence={"without_gradient": dead}),
    ]


def _initial_loss(logits: Tensor, y: Tensor, multilabel: bool, num_classes: int) -> tuple[float, float, str]:
    """(plain loss at initialization, the loss of logits 0, what was seen). One label per image: cross-entropy
    against ln(C). Several: binary cross-entropy per label against ln 2, and the labels' own entropy (what the best
    input-blind model reaches) beside it."""
    if not multilabel:
        loss0, chance = float(nn.functional.cross_entropy(logits, y)), math.log(num_classes)
        return loss0, chance, f"{loss0:.3f} vs ln({num_classes}) = {chance:.3f}"
    loss0 = float(nn.functional.binary_cross_entropy_with_logits(logits, y.float()))
    q = y.float().mean(0).clamp(1e-6, 1 - 1e-6)
    entropy = float(-(q * q.log() + (1 - q) * (1 - q).log()).mean())
    return loss0, math.log(2), (f"binary cross-entropy {loss0:.3f} per label vs ln 2 = {math.log(2):.3f} (the labels' "
                                f"own entropy, what a model blind to the images reaches, is {entropy:.3f})")


def overfit_one_batch(model: nn.Module, x: Tensor, y: Tensor, loss_fn, make_optimizer, lr: float,
                      prec: Precision = CPU, steps: int = 300) -> Finding:
    """A healthy model and optimizer memorize a small batch within `steps` steps [M28]."""
    m, prec = copy.deepcopy(model).train(), prec.trial()
    opt = make_optimizer(m, lr)
    acc = 0.0
    for step in range(1, steps + 1):
        train_step(m, x, y, loss_fn, opt, prec)
        if step % 10 == 0:
            with torch.no_grad(), prec.autocast():
                out = m.eval()(prec.prepare(x))
                hit = (out > 0) == y.bool() if isinstance(loss_fn, MultilabelLoss) else out.argmax(1) == y
                acc = float(hit.reshape(len(y), -1).all(1).float().mean())  # several labels: the whole set
            m.train()
            if acc == 1.0:
                return Finding("M28", "overfit one batch", f"overfit one batch: {len(y)} samples memorized in "
                               f"{step} steps.", source="preflight", verdict=PASS)
    clash = _same_input_other_label(x, y)
    if clash:  # no model can memorize two labels for one input: the labels are the cause, not the model
        return Finding("M28", "overfit one batch", f"overfit one batch: {len(y)} samples not memorized in {steps} "
                       f"steps (accuracy {acc:.2f}); {clash} of them are identical images with different labels, "
                       "which no model can tell apart.", "Fix those labels first (the data audit's [M08] lists the "
                       "pairs), then run the doctor again.", "preflight", verdict=FAIL)
    return Finding("M28", "overfit one batch", f"overfit one batch: {len(y)} samples not memorized in {steps} "
                   f"steps (accuracy {acc:.2f}).", "The model cannot even learn one batch: check that labels match "
                   "the images, try optim.lr=auto, a larger model, or look for a layer that blocks the signal.",
                   "preflight", verdict=FAIL)


def _same_input_other_label(x: Tensor, y: Tensor) -> int:
    """How many samples of the batch share their exact input with a sample of another label (set)."""
    labels: dict[bytes, set] = {}
    keys = [xi.detach().cpu().numpy().tobytes() for xi in x]
    for k, yi in zip(keys, y.tolist()):
        labels.setdefault(k, set()).add(str(yi))
    return sum(len(labels[k]) > 1 for k in keys)


def table(checks: list[Finding]) -> str:
    """The pass/fail table of report.md and `mode=doctor`."""
    rows = [f"| {c.kind} | {c.verdict.upper()} | {c.message.removeprefix(c.kind + ': ')} | {c.fix} |"
            for c in checks]
    return "\n".join(["| check | result | what was seen | fix |", "|---|---|---|---|", *rows])
