"""The loop: train epochs, validation, checkpoints, scheduler, early stopping, final test.

The loop owns zero_grad, train/eval modes and no-grad evaluation, so they cannot be
forgotten [M12, M18]."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from safetrain.losses import chance_losses
from safetrain.metrics import to_plain
from safetrain.monitors import (dead_unit_findings, dead_unit_share, epoch_findings, fit_findings,
                                gradient_findings, layer_grad_norms)

log = logging.getLogger(__name__)


@dataclass
class Precision:
    """bf16 autocast on CUDA (fp32 on CPU); channels_last everywhere (1.5-2x faster convs on CPU too)."""
    device: torch.device
    bf16: bool

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)


def train_epoch(model: nn.Module, loader, loss_fn, optimizer, schedule, prec: Precision, grad_clip: float,
                progress: bool, desc: str, guard=None) -> dict:
    model.train()
    total_loss = torch.zeros((), device=prec.device)
    correct = torch.zeros((), device=prec.device)
    seen, t0, grad_norm, norms, last = 0, time.perf_counter(), torch.zeros(()), {}, len(loader) - 1
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress or None, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        with prec.autocast():
            logits = model(prec.prepare(x))
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == last:  # per-layer gradient norms, once an epoch, before clipping [M26]
            norms = layer_grad_norms(model)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        if guard is not None:
            guard.update(loss, grad_norm)
        optimizer.step()
        schedule.after_step()
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        if step == 0:  # (C,) labels per class as the loader drew them (a class-balanced sampler changes them)
            drawn = torch.zeros(logits.shape[1], dtype=torch.long, device=y.device)
        drawn.index_add_(0, y, torch.ones_like(y))  # unlike bincount, no device sync
        seen += len(y)
        if step % 20 == 0:  # the loop syncs with the device here anyway
            if guard is not None:
                guard.check(f"in {desc}, step {step + 1}")
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct.item() / seen:.3f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    if guard is not None:
        guard.check(f"in {desc}")
    if prec.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"loss": total_loss.item() / seen, "acc": correct.item() / seen, "grad_norm": float(grad_norm),
            "images_per_s": seen / dt, "seconds": dt, "layer_grad_norms": {k: float(v) for k, v in norms.items()},
            "label_counts": drawn}


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn, metrics, prec: Precision) -> dict:
    model.eval()
    metrics.reset()
    total_loss, seen = torch.zeros((), device=prec.device), 0
    for x, y in loader:
        with prec.autocast():
            logits = model(prec.prepare(x)).float()
        total_loss += loss_fn(logits, y) * len(y)
        seen += len(y)
        metrics.update(logits, y)
    return {"loss": total_loss.item() / seen, **metrics.compute()}


@dataclass
class FitResult:
    best: dict  # {"metric", "value", "epoch"}
    epochs_run: int
    stopped_early: bool
    history: list
    findings: list


def fit(model, train_loader, val_loader, loss_fn, optimizer, schedule, metrics, *, prec: Precision,
        max_epochs: int, grad_clip: float, early_stop_patience: int, selection: tuple[str, str],
        checkpoint_dir: Path, save: Callable, track: Callable, progress: bool, guard=None,
        capacity: str = "") -> FitResult:
    """Train up to max_epochs; after each epoch validate, step the schedule on the selection
    metric, keep best.pt (by that metric) and last.pt, and stop early on no improvement."""
    metric, mode = selection
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    best = {"metric": metric, "value": -math.inf if mode == "max" else math.inf, "epoch": 0}
    history, findings, since_best, reported = [], [], 0, set()
    probe = next(iter(val_loader))[0]  # a fixed validation batch for the dead-unit check
    for epoch in range(1, max_epochs + 1):
        if hasattr(loss_fn, "on_epoch"):  # losses that change during training (deferred re-weighting)
            loss_fn.on_epoch(epoch, max_epochs)
        tr = train_epoch(model, train_loader, loss_fn, optimizer, schedule, prec, grad_clip, progress,
                         f"epoch {epoch}/{max_epochs}", guard)
        val = evaluate(model, val_loader, loss_fn, metrics, prec)
        value = float(val[metric])
        schedule.after_validation(value)
        improved = better(value, best["value"])
        if improved:
            best, since_best = {"metric": metric, "value": value, "epoch": epoch}, 0
        else:
            since_best += 1
        norms = tr.pop("layer_grad_norms")
        uniform, blind = chance_losses(loss_fn, tr.pop("label_counts"))  # what a model that learns nothing scores
        scalars = {"train/loss": tr["loss"], "train/acc": tr["acc"], "train/grad_norm": tr["grad_norm"],
                   "train/images_per_s": tr["images_per_s"], "train/chance_loss": blind, "train/uniform_loss": uniform,
                   "val/loss": val["loss"], "val/acc": float(val["acc"]),
                   "val/balanced_acc": float(val["balanced_acc"]), "val/macro_f1": float(val["macro_f1"]),
                   "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": tr["seconds"],
                   **{f"grad_norm/{k}": v for k, v in norms.items()}}
        history.append(scalars)
        c = val["confusion"].shape[0]
        found = [f for f in (epoch_findings(epoch, history, val["confusion"], c) + gradient_findings(epoch, norms)
                             + dead_unit_findings(epoch, dead_unit_share(model, probe))
                             + fit_findings(epoch, history, c, capacity))
                 if (f.row, f.kind) not in reported]  # each problem once a run
        reported |= {(f.row, f.kind) for f in found}
        for f in found:
            log.warning("%s", f)
        findings += found
        track(epoch, scalars, [str(f) for f in found])
        state = dict(epoch=epoch, metrics=scalars, best=best)
        save(checkpoint_dir / "last.pt", **state)
        if improved:
            save(checkpoint_dir / "best.pt", **state)
        log.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f macro-F1 %.4f | lr %.2e | "
                 "%.0f img/s%s", epoch, max_epochs, tr["loss"], tr["acc"], val["loss"], val["acc"],
                 val["macro_f1"], scalars["lr"], tr["images_per_s"], "  * best" if improved else "")
        if early_stop_patience and since_best >= early_stop_patience:
            log.info("early stop: val %s has not improved for %d epochs (best %.4f at epoch %d)",
                     metric, since_best, best["value"], best["epoch"])
            return FitResult(best, epoch, True, history, findings)
    return FitResult(best, max_epochs, False, history, findings)


def test(model, test_loader, loss_fn, metrics, prec: Precision) -> dict:
    """The single evaluation on the test split, with the checkpoint chosen on validation [M07]."""
    out = evaluate(model, test_loader, loss_fn, metrics, prec)
    return {"loss": out["loss"], **to_plain({k: v for k, v in out.items() if k != "loss"})}
