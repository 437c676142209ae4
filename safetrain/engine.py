"""The loop: one training step, train epochs, validation, checkpoints, scheduler, early stopping, test.

The loop owns zero_grad, train/eval modes and no-grad evaluation, so they cannot be
forgotten [M12, M18]. `train_step` is the only place an optimizer steps: fit, the learning-rate
range test, the preflight checks and the overfit-one-batch check all call it."""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import statistics
import threading
import time
import types
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from safetrain import data as D
from safetrain import distributed as dist
from safetrain.errors import ConfigError, Interrupted
from safetrain.losses import MultilabelLoss, chance_losses
from safetrain.metrics import to_plain
from safetrain.models.layers import hooks
from safetrain.monitors import layer_grad_norms

log = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively: AVX512-BF16 or AMX (Intel Cooper Lake, Sapphire Rapids and later;
    AMD Zen 4 and later), as Linux reports it. Elsewhere oneDNN emulates bf16, no faster than fp32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def choose_precision(requested: str, device: torch.device, capability: Optional[tuple[int, int]],
                     cpu_bf16: Optional[bool] = None) -> str:
    """trainer.precision -> "fp32", "bf16" or "fp16". auto: bf16 where the device computes it natively (GPUs of
    compute capability 8.0 and up: Ampere, Hopper, ...; CPUs with AVX512-BF16 or AMX: `cpu_bf16`, read from the CPU
    when None), fp16 with a gradient scaler on older GPUs, fp32 on other CPUs. On the CPU bf16 is 1.5-2x fp32; the
    convolutions its kernels get wrong run in fp32 (`keep_fp32_where_cpu_bf16_fails`). Refused: bf16 on a GPU or CPU
    without it (emulated, slow), fp16 on the CPU (no speed-up there, only the risk)."""
    if device.type != "cuda":
        native = cpu_has_bf16() if cpu_bf16 is None else cpu_bf16
        if requested == "fp16":
            raise ConfigError("[config] trainer.precision=fp16 is for GPUs (with a gradient scaler); on the CPU it "
                              "is slower than fp32. Use trainer.precision=auto (bf16 on a CPU with AVX512-BF16 or "
                              "AMX, else fp32).")
        if requested == "bf16" and not native:
            raise ConfigError("[config] trainer.precision=bf16: this CPU has no native bf16 (AVX512-BF16 or AMX: "
                              "Intel Cooper Lake, Sapphire Rapids and later, AMD Zen 4 and later), so it would be "
                              "emulated, slowly. Use trainer.precision=auto (fp32 here).")
        return "bf16" if requested == "bf16" or (requested == "auto" and native) else "fp32"
    native_bf16 = capability is not None and tuple(capability) >= (8, 0)
    if requested == "auto":
        return "bf16" if native_bf16 else "fp16"
    if requested == "bf16" and not native_bf16:
        cc = ".".join(map(str, capability))
        raise ConfigError(f"[config] trainer.precision=bf16: this GPU (compute capability {cc}) has no native "
                          "bf16 (8.0 and up have it), so it would be emulated, slowly. Use trainer.precision=auto "
                          "(fp16 with a gradient scaler) or fp32.")
    return requested


def keep_fp32_where_cpu_bf16_fails(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Run in fp32 the convolutions whose bf16 weight gradient the CPU gets wrong; their names, for the log.
    oneDNN's bf16 backward-weights kernel (torch 2.14 on the CPU) returns NaN, inf or numbers of 1e20-1e38 for a
    convolution whose stride is larger than the width of its input (a kernel wider than 1 pixel: a 3x3 stride-2
    conv on a map 1 pixel wide, as in ResNet-18's and RegNet's last stage on 16-32 px images), at random from one
    call to the next: memory it never writes. Measured (benchmarks/cpu_bf16.py) on every kernel, stride, size and
    grouping tried: wrong exactly when stride > input width and kernel width > 1; fp32 is right. Such layers see a
    pixel or two, so fp32 there costs nothing measurable. `x`: a batch of the images the model trains on."""
    widths: dict[nn.Module, int] = {}

    def seen(m, args):
        widths[m] = min(widths.get(m, args[0].shape[-1]), args[0].shape[-1])

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_pre_hook(seen) for m in convs]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    kept = [name for name, m in model.named_modules()
            if m in widths and m.kernel_size[1] > 1 and m.stride[1] > widths[m]]
    for name in kept:
        conv = model.get_submodule(name)
        conv.forward = types.MethodType(_conv_in_fp32, conv)  # an instance attribute: deepcopy rebinds it
    return kept


def _conv_in_fp32(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return type(conv).forward(conv, x.to(conv.weight.dtype))


@dataclass
class Precision:
    """Autocast by the policy of choose_precision: bf16, or fp16 with a gradient scaler (`scaler`), or none (fp32);
    channels_last everywhere (1.5-2x faster convs on CPU too)."""
    device: torch.device
    bf16: bool
    fp16: bool = False
    scaler: Optional[torch.amp.GradScaler] = None

    def __post_init__(self):
        if self.fp16 and self.scaler is None:  # fp16 gradients underflow without one
            self.scaler = torch.amp.GradScaler(self.device.type)

    def trial(self) -> "Precision":
        """The same precision with a scaler of its own, for steps that are not training (the lr range test, the
        preflight checks): their overflows must not shrink the run's scale."""
        return Precision(self.device, self.bf16, self.fp16)

    def autocast(self):
        if not (self.bf16 or self.fp16):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.bf16 else torch.float16)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)


class StopRequest:
    """SIGINT/SIGTERM during training set a flag that the loop reads after each step, so a signal never lands
    inside a checkpoint write or an optimizer step; a second signal acts at once (the default behaviour)."""

    def __init__(self):
        self.signal: int | None = None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, _frame):
            self.signal = signum
            for s, h in previous.items():  # a second signal is not deferred
                signal.signal(s, h)

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def check(self, where: str) -> None:
        if self.signal is not None:
            name = signal.Signals(self.signal).name
            raise Interrupted(f"{name} received {where}: training stopped after that step; its checkpoints are kept "
                              "(checkpoints/last.pt, inside the epoch where trainer.checkpoint_minutes is set; "
                              "best.pt).", self.signal)


@dataclass
class Setup:
    """The training side of a run: model, loss, optimizer and schedule, all derived from the data facts
    (stages.build_training); what fit() trains."""
    model: nn.Module  # the plain module: evaluation and checkpoints use it
    loss_fn: nn.Module  # a losses.TaskLoss: the loop calls its on_epoch hook
    optimizer: torch.optim.Optimizer
    schedule: object  # optim.LRSchedule: after_step, after_validation
    selection: tuple[str, str] = ("acc", "max")  # (val metric, direction): checkpoint, scheduler, early stop [M29]
    metrics: object = None  # metrics.build_metrics
    lr: Optional[float] = None
    make_optimizer: Optional[Callable] = None  # (model, lr) -> optimizer, for the range test and the overfit check
    parameters: int = 0
    custom_model: bool = False  # the user's nn.Module: safetrain's model.* settings do not apply to it
    trainable: Optional[nn.Module] = None  # what trains: `model`, or DDP around it (torchrun), compiled or not
    average: Optional[object] = None  # optim.Lookahead (optim.lookahead): the weight average
    margins: Optional[object] = None  # monitors.Margins: each training sample's margin over training (AUM)

    def __post_init__(self):
        self.trainable = self.model if self.trainable is None else self.trainable


@dataclass(frozen=True)
class Limits:
    """The loop's limits (trainer.*)."""
    max_epochs: int
    grad_clip: float = 0.0  # max global gradient norm; 0: measured, not clipped
    early_stop_patience: int = 0  # 0: off
    progress: bool = False
    checkpoint_minutes: Optional[float] = None  # inside an epoch, a resumable last.pt every N minutes; None: off
    prune: Optional[Callable[[int, str, float], None]] = None  # mode=tune: may stop the run after an epoch (Pruned)


class MidEpoch:
    """trainer.checkpoint_minutes: whether a checkpoint is due inside an epoch (every rank decides as rank 0 does,
    at the steps where the ranks meet anyway), and the time of the last one (an epoch's end counts)."""

    def __init__(self, minutes: Optional[float]):
        self.every = None if minutes is None else minutes * 60
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every is None or (dist.active() and step % 20):
            return False
        return bool(dist.share(time.monotonic() - self.last >= self.every))

    def done(self) -> None:
        self.last = time.monotonic()


class Step(NamedTuple):
    logits: torch.Tensor  # (B, C)
    loss: torch.Tensor  # () on the device
    grad_norm: torch.Tensor  # () global gradient norm before clipping


def train_step(model: nn.Module, x, y, loss_fn, optimizer, prec: Precision, grad_clip: float = 0.0,
               after_backward: Optional[Callable[[], None]] = None) -> Step:
    """Forward, loss, zero_grad, backward, clip (0: measure only), step. `after_backward` sees the raw gradients.
    With fp16 the loss is scaled for the backward pass and the gradients unscaled before anything looks at them;
    a step whose gradients overflowed is skipped by the scaler (its grad_norm is inf/NaN, its loss finite)."""
    with prec.autocast():
        logits = model(prec.prepare(x))
        loss = loss_fn(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    if prec.scaler is None:
        loss.backward()
    else:
        prec.scaler.scale(loss).backward()
        prec.scaler.unscale_(optimizer)
    if after_backward is not None:
        after_backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if prec.scaler is None:
        optimizer.step()
    else:
        prec.scaler.step(optimizer)
        prec.scaler.update()
    return Step(logits, loss, grad_norm)


def _checkpoint_inside(save: Callable, epoch: int, best: dict, history: list, steps: int, minutes: float,
                       loader_state: dict, sums: dict) -> None:
    """Save "last" inside `epoch` (1-based): the epochs before it, the loader's state, every rank's sums so far."""
    save("last", dict(epoch=epoch - 1, metrics=history[-1] if history else {}, best=best, history=history,
                      loader=loader_state, sums=dist.gather(sums)))
    log.info("checkpoint inside epoch %d, after step %d of %d (trainer.checkpoint_minutes=%g)", epoch, sums["steps"],
             steps, minutes)


def train_epoch(setup: "Setup", loader, prec: Precision, limits: "Limits", desc: str, guard=None,
                stop: StopRequest | None = None, mid: Optional[tuple[MidEpoch, Callable]] = None,
                start: Optional[dict] = None) -> dict:
    """One pass over `loader` with `setup`'s trainable model, loss, optimizer and schedule. `guard` (a
    monitors.StepGuard) watches every step and stops a diverging run; `setup.average` (optim.Lookahead,
    optim.lookahead=true) averages the weights after the steps and at the end.
    `mid` (MidEpoch, save(loader state, sums so far)): checkpoints inside the epoch; `start`: the sums of one, whose
    steps are done (the loader skips them), to go on from.
    Under torchrun `setup.trainable` is the DistributedDataParallel wrapper; the guard and a signal are checked by
    every rank at the same steps and stop all of them together; the epoch's numbers are those of the global batches."""
    model, loss_fn, optimizer, schedule, average = (setup.trainable, setup.loss_fn, setup.optimizer, setup.schedule,
                                                    setup.average)
    model.train()
    first, seen, before, total_loss, correct, drawn = _sums_so_far(start, prec.device)
    t0, grad_norm, norms, last = time.perf_counter() - before, torch.zeros(()), {}, len(loader) - 1
    at_start = loader.state_dict() if mid else None  # the order of this epoch, for a checkpoint inside it
    bar = tqdm(loader, desc=desc, leave=False, disable=not (limits.progress and dist.is_main()) or None,
               dynamic_ncols=True, initial=first, total=len(loader))
    for step, (x, y) in enumerate(bar, start=first):
        # per-layer gradient norms, once an epoch, before clipping [M26]
        probe = (lambda: norms.update(layer_grad_norms(dist.unwrap(model)))) if step == last else None
        logits, loss, grad_norm = train_step(model, x, y, loss_fn, optimizer, prec, limits.grad_clip, probe)
        if guard is not None:  # a step the fp16 scaler skipped is not a divergence (the scaler's own check is)
            guard.update(loss, grad_norm if prec.scaler is None else torch.nan_to_num(grad_norm, 0.0, 0.0, 0.0))
        schedule.after_step()
        if average is not None:
            average.after_step()
        total_loss += loss.detach() * len(y)
        hits, drawn = _tally(logits.detach(), y, loss_fn, drawn, setup.margins, loader)
        correct += hits
        seen += len(y)
        if mid and step < last and (_signalled(stop) or mid[0].due(step)):  # Ctrl-C, SIGTERM: kept too
            dist.together(lambda: _checks(guard, None, f"in {desc}, step {step + 1}"))  # only a healthy state is kept
            mid[1]({**at_start, "augment": loader.state_dict()["augment"], "skip": step + 1},
                   _sums(step + 1, seen, time.perf_counter() - t0, total_loss, correct, drawn))
            mid[0].done()
        if stop is not None and not dist.active():
            stop.check(f"in {desc}, step {step + 1}")
        if step % 20 == 0:  # the loop syncs with the device here anyway
            dist.together(lambda: _checks(guard, stop, f"in {desc}, step {step + 1}"))
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct.item() / seen:.3f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    dist.together(lambda: _checks(guard, stop, f"in {desc}"))
    if average is not None:
        average.after_epoch()
    _sync(prec)
    dt = time.perf_counter() - t0
    seen = int(dist.total(torch.tensor(seen)))
    return {"loss": dist.total(total_loss).item() / seen, "acc": dist.total(correct).item() / seen,
            "grad_norm": float(grad_norm), "images_per_s": seen / dt, "seconds": dt,
            "layer_grad_norms": {k: float(v) for k, v in norms.items()}, "label_counts": dist.total(drawn),
            "images": seen}


def _tally(logits: Tensor, y: Tensor, loss_fn: nn.Module, drawn: Optional[Tensor], margins, loader):
    """-> (the step's correct predictions, the label counts so far with its batch's). With several labels per image a
    prediction is one label at 0.5 and a count a positive; with one, data.mix's labels count as their larger share's
    class, and `margins` (monitors.Margins, where recorded) takes each sample's margin on the logits the loss fits
    (under logit adjustment those carry the prior: on the raw ones a 1:150 prior put every common image below 0)."""
    if isinstance(loss_fn, MultilabelLoss):
        return ((logits > 0) == y.bool()).float().mean(1).sum(), y.sum(0) if drawn is None else drawn + y.sum(0)
    y = D.hard_labels(y)
    if margins is not None:
        margins.add(loader.batch_ids, loss_fn.fitted(logits), y)
    drawn = torch.zeros(logits.shape[1], dtype=torch.long, device=y.device) if drawn is None else drawn
    return (logits.argmax(1) == y).sum(), drawn.index_add_(0, y, torch.ones_like(y))  # unlike bincount: no sync


def _signalled(stop: StopRequest | None) -> bool:
    return stop is not None and stop.signal is not None and not dist.active()


def _sums(steps: int, seen: int, seconds: float, loss, correct, drawn) -> dict:
    """An epoch's sums so far, on the CPU, for a checkpoint inside it (read back by _sums_so_far)."""
    return {"steps": steps, "seen": seen, "seconds": seconds, "loss": loss.cpu(), "correct": correct.cpu(),
            "drawn": None if drawn is None else drawn.cpu()}


def _sums_so_far(start: Optional[dict], device: torch.device) -> tuple:
    """(steps done, images seen, seconds, loss sum, correct sum, label counts (C,) as the loader drew them: a
    class-balanced sampler changes them) of an epoch: zeros at its start, or a checkpoint's inside it."""
    if not start:
        return 0, 0, 0.0, torch.zeros((), device=device), torch.zeros((), device=device), None
    drawn = None if start["drawn"] is None else start["drawn"].to(device)
    return (start["steps"], start["seen"], start["seconds"], start["loss"].to(device), start["correct"].to(device),
            drawn)


def _checks(guard, stop: StopRequest | None, where: str) -> None:
    if guard is not None:
        guard.check(where)
    if stop is not None:
        stop.check(where)


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn, metrics, prec: Precision, kept: Optional[list] = None) -> dict:
    """Loss and metrics of a split; under torchrun each rank takes its share and the sums are reduced over the
    ranks (torchmetrics reduces its states in compute()), every sample counted once. `model`: not wrapped.
    `kept`: a list that receives each batch's (logits, labels) on the CPU, this rank's share."""
    model.eval()
    metrics.reset()
    total_loss, seen = torch.zeros((), device=prec.device), 0
    for x, y in loader:
        with prec.autocast():
            logits = model(prec.prepare(x)).float()
        total_loss += loss_fn(logits, y) * len(y)
        seen += len(y)
        metrics.update(logits, y)
        if kept is not None:
            kept.append((logits.cpu(), y.cpu()))
    return {"loss": dist.total(total_loss).item() / int(dist.total(torch.tensor(seen))), **metrics.compute()}


@dataclass
class FitResult:
    best: dict  # {"metric", "value", "epoch"}
    epochs_run: int
    stopped_early: bool
    history: list
    findings: list


def epoch_scalars(tr: dict, val: dict, loss_fn, lr: float) -> dict:
    """One epoch's numbers for metrics.jsonl and TensorBoard (tr's grad norms and label counts popped)."""
    norms = tr.pop("layer_grad_norms")
    uniform, blind = chance_losses(loss_fn, tr.pop("label_counts"), tr["images"])  # a model that learns nothing
    scores = {f"val/{k}": float(val[k]) for k in ("acc", "balanced_acc", "macro_f1", "map", "micro_f1", "chance_map")
              if k in val}
    return {"train/loss": tr["loss"], "train/acc": tr["acc"], "train/grad_norm": tr["grad_norm"],
            "train/images_per_s": tr["images_per_s"], "train/chance_loss": blind, "train/uniform_loss": uniform,
            "val/loss": val["loss"], **scores, "lr": lr, "epoch_seconds": tr["seconds"],
            **{f"grad_norm/{k}": v for k, v in norms.items()}}


def fit(setup: Setup, train_loader, val_loader, limits: Limits, *, prec: Precision, save: Callable[[str, dict], None],
        track: Callable, monitors=None, stop: StopRequest | None = None, resume: dict | None = None) -> FitResult:
    """Train `setup` up to limits.max_epochs; after each epoch validate, step the schedule on the selection metric, let
    the `monitors` (monitors.Monitors) look, keep "best" (by that metric) and "last" through `save(name, state)`,
    and stop early on no improvement. The monitors' findings come at the end, about the kept and the last model.
    `resume`: the state a checkpoint saved (epoch, best, history; inside an epoch, its sums so far), everything else
    already restored. limits.checkpoint_minutes: "last" is also saved inside an epoch, with the loader's state at
    its start, the steps done and the sums so far (every rank's), to go on from that step. limits.prune(epoch,
    metric, value) is told each epoch's value once its checkpoints are written (mode=tune; it may raise Pruned).
    `setup.trainable` may be the DistributedDataParallel wrapper (safetrain/distributed.py); evaluation uses
    `setup.model`, unwrapped."""
    net, max_epochs, patience = setup.model, limits.max_epochs, limits.early_stop_patience
    metric, mode = setup.selection
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    best = {"metric": metric, "value": -math.inf if mode == "max" else math.inf, "epoch": 0}
    epoch, history, sums = 0, [], None
    if resume:
        epoch, best, history = resume["epoch"], resume["best"], list(resume["history"])
        sums = resume.get("sums")  # a checkpoint inside epoch + 1: every rank's sums so far
        sums = sums[dist.rank()] if sums else None
    timer = MidEpoch(limits.checkpoint_minutes)
    while epoch < max_epochs and not (patience and epoch - best["epoch"] >= patience):
        epoch += 1
        setup.loss_fn.on_epoch(epoch, max_epochs)  # losses that change during training (deferred re-weighting)
        hooks(net).on_epoch(epoch)  # fine-tuning: the backbone frozen for the first epochs [M36, M37]
        setup.trainable = dist.rewrap(setup.trainable)  # under torchrun: DDP for the parameters that train now
        inside = partial(_checkpoint_inside, save, epoch, best, history, len(train_loader), limits.checkpoint_minutes)
        tr = train_epoch(setup, train_loader, prec, limits, f"epoch {epoch}/{max_epochs}", monitors and monitors.guard,
                         stop, (timer, inside) if limits.checkpoint_minutes is not None else None, sums)
        sums = None
        val = evaluate(net, val_loader, setup.loss_fn, setup.metrics, prec)
        value = float(val[metric])
        setup.schedule.after_validation(value)
        improved = better(value, best["value"])
        if improved:
            best = {"metric": metric, "value": value, "epoch": epoch}
        history.append(epoch_scalars(tr, val, setup.loss_fn, setup.optimizer.param_groups[0]["lr"]))
        if monitors:
            monitors.after_epoch(epoch, history, val, net)
        track(epoch, history[-1], [])
        # several labels per image: the thresholds chosen on validation go with the weights they were chosen for
        chosen = {"thresholds": [round(t, 4) for t in val["thresholds"].tolist()]} if "thresholds" in val else {}
        # best before last: killed between the two writes, last.pt is the epoch before and resumes from there
        for name in ("best", "last") if improved else ("last",):
            save(name, dict(epoch=epoch, metrics=history[-1], best=best, history=history, **chosen))
        timer.done()
        scores = (f"acc {val['acc']:.4f} macro-F1 {val['macro_f1']:.4f}" if not chosen else
                  f"mAP {val['map']:.4f} macro-F1 {val['macro_f1']:.4f} (thresholds chosen on val)")
        log.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f %s | lr %.2e | %.0f img/s%s", epoch,
                 max_epochs, tr["loss"], tr["acc"], val["loss"], scores, history[-1]["lr"], tr["images_per_s"],
                 "  * best" if improved else "")
        if limits.prune:
            limits.prune(epoch, metric, value)
        if patience and epoch - best["epoch"] >= patience:
            log.info("early stop: val %s has not improved for %d epochs (best %.4f at epoch %d)",
                     metric, epoch - best["epoch"], best["value"], best["epoch"])
    found = monitors.at_end(best["epoch"]) if monitors else []  # what holds for the kept or the last model
    if found:
        track(epoch, {}, found)
    return FitResult(best, epoch, epoch < max_epochs, history, found)


def test(model, test_loader, loss_fn, metrics, prec: Precision, kept: Optional[list] = None) -> dict:
    """The single evaluation on the test split, with the checkpoint chosen on validation [M07] (`kept`: evaluate's)."""
    out = evaluate(model, test_loader, loss_fn, metrics, prec, kept)
    return {"loss": out["loss"], **to_plain({k: v for k, v in out.items() if k != "loss"})}


def find_lr(model: nn.Module, loader, loss_fn, make_optimizer, prec, *, bounds: tuple[float, float],
            start: float = 1e-7, end: float = 10.0, steps: int = 100) -> float:
    """Learning-rate range test (Smith 2017): raise the lr geometrically, one batch per step, until the
    smoothed loss blows up; return a tenth of the lr at the loss minimum, clamped to `bounds`.
    The model's weights are restored afterwards."""
    saved = copy.deepcopy(model.state_dict())
    optimizer, prec = make_optimizer(model, start), prec.trial()
    factor = (end / start) ** (1 / steps)
    lr, avg, best, best_lr, i = start, 0.0, math.inf, start, 0
    model.train()
    while i < steps:
        for x, y in loader:
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss = dist.total(train_step(model, x, y, loss_fn, optimizer, prec).loss).item() / dist.world()
            avg = 0.95 * avg + 0.05 * loss  # every rank decides on the same (mean) loss
            smooth = avg / (1 - 0.95 ** (i + 1))
            if smooth < best:
                best, best_lr = smooth, lr
            i, lr = i + 1, lr * factor
            if i >= steps or not math.isfinite(smooth) or smooth > 4 * best:
                i = steps
                break
    model.load_state_dict(saved)
    return min(max(best_lr / 10, bounds[0]), bounds[1])


def step_times(model: nn.Module, loader, eval_model: nn.Module, eval_loader, loss_fn, make_optimizer, prec, *,
               steps: int = 9, warmup: int = 2) -> tuple[float, float]:
    """Seconds per training step (the real loader, augmentation included) and per evaluation batch: the median of
    `steps` of each after `warmup` (a shared machine's moments of slowness do not decide the run's length); the
    weights and BatchNorm statistics are restored afterwards (the caller restores the loader's and the global
    random state)."""
    saved = copy.deepcopy(eval_model.state_dict())
    optimizer, trial = make_optimizer(model, 1e-9), prec.trial()

    def timed(batches, fn) -> float:
        times = []
        for i in range(warmup + steps):
            _sync(prec)
            t0 = time.perf_counter()
            fn(*next(batches))  # the batch's loading and augmentation included
            _sync(prec)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[warmup:])

    model.train()
    train_s = timed(_cycle(loader), lambda x, y: train_step(model, x, y, loss_fn, optimizer, trial))
    eval_model.eval()

    def evaluate_batch(x, y):
        with torch.no_grad(), prec.autocast():
            eval_model(prec.prepare(x)).float().sum().item()

    eval_s = timed(_cycle(eval_loader), evaluate_batch)
    eval_model.load_state_dict(saved)
    return train_s, eval_s


def _cycle(loader):
    while True:
        yield from loader


def _sync(prec) -> None:
    if prec.device.type == "cuda":
        torch.cuda.synchronize()
