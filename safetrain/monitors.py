"""Diagnostics while training: what cannot be prevented is detected and explained [M16, M26, M27, M28].

`StepGuard` watches every optimizer step on the device without a host sync per step; the
epoch checks read the epoch's numbers. Each finding carries its catalogue row, what was seen,
the likely causes and the setting that fixes it."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from safetrain.data.pipelines import flips
from safetrain.data.sources import label_sets
from safetrain.errors import TrainingStopped
from safetrain.findings import Finding
from safetrain.metrics import average_precisions

log = logging.getLogger(__name__)


class StepGuard:
    """Flags, on the device, a non-finite loss or gradient norm [M26] and a loss exploding far above its
    starting value [M16]; `check` (called where the loop syncs anyway) raises TrainingStopped."""

    def __init__(self, num_classes: int, device: torch.device, lr: float, model: torch.nn.Module | None = None,
                 lr_from_range_test: bool = False, scaler: torch.amp.GradScaler | None = None):
        self.limit = 10 * math.log(num_classes)  # no healthy run has a batch loss 10x chance level ...
        self.start = None  # ... or 3x its own first batch loss (a run may start high: that is [M19])
        self.lr, self.model, self.scaler = lr, model, scaler  # fp16: skipped steps are the scaler's; its scale is ours
        self.try_lr = "try 10x lower" if lr_from_range_test else "try 10x lower, or optim.lr=auto"
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.exploded = torch.zeros((), dtype=torch.bool, device=device)

    def update(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        loss = loss.detach()
        if self.start is None:
            self.start = torch.clamp(3 * loss, min=self.limit)
        self.nonfinite |= ~torch.isfinite(loss + grad_norm)  # inf or NaN in either stays inf or NaN
        self.exploded |= loss > self.start

    def state_dict(self) -> dict:
        return {"start": self.start}  # the flags are clear at every checkpoint (a raised one stops the run)

    def load_state_dict(self, state: dict) -> None:
        self.start = None if state["start"] is None else state["start"].to(self.nonfinite.device)

    def _layers(self) -> str:
        """The parameters (in forward order) whose gradient or value is no longer finite."""
        if self.model is None:
            return ""
        bad = [n for n, p in self.model.named_parameters()
               if not torch.isfinite(p).all() or (p.grad is not None and not torch.isfinite(p.grad).all())]
        return f" (first non-finite layer: {bad[0]}; {len(bad)} parameters affected)" if bad else ""

    def check(self, where: str) -> None:
        if self.scaler is not None and self.scaler.get_scale() < 1.0:
            raise TrainingStopped(
                f"[M26] the fp16 gradients overflowed at step after step {where}: the gradient scaler, which "
                f"halves its scale and skips the step at each overflow, fell to {self.scaler.get_scale():.2g}. The "
                f"run diverged or its values exceed fp16's range: {self.try_lr} (optim.lr={self.lr:.2e}), or "
                "trainer.precision=fp32. Training stopped; the last good checkpoint is kept.")
        if self.nonfinite.item():
            raise TrainingStopped(
                f"[M26] the loss or the gradients became NaN/inf {where}{self._layers()}. Likely causes: a learning "
                "rate far too "
                f"high (optim.lr={self.lr:.2e}: {self.try_lr}), missing input normalization or "
                "inputs with non-finite values, "
                "or a custom layer that divides by zero. Training stopped; the last good checkpoint is kept.")
        if self.exploded.item():
            raise TrainingStopped(
                f"[M16] the loss diverged {where}: a batch loss above {float(self.start):.1f} (3x its start, and at "
                f"least 10x the chance level). "
                f"The learning rate is too high (optim.lr={self.lr:.2e}): {self.try_lr}. "
                "Training stopped; the last good checkpoint is kept.")


def advice(*, lr=1e-3, weight_decay: float = 0.05, grad_clip: float = 5.0, augment: tuple[str, bool] = ("none", True),
           model=None, epochs: int | None = None) -> dict[str, str]:
    """What to change, per kind of finding, in the run's own settings: only changes that are not in effect already,
    and only settings that exist for this run. `lr`: optim.lr (a number or "auto"); `augment`: (data.augment,
    data.hflip_keeps_label); `model`: the model settings (models/), None for a user's nn.Module; `epochs`:
    trainer.max_epochs. The defaults give the generic advice."""
    aug, flips_keep = augment
    own = model.builder_settings() if model is not None else {}  # torchvision's models: no model.dropout etc.
    lr_auto = [] if lr == "auto" else ["optim.lr=auto"]
    lower_lr = ["a lower optim.lr than the range test chose"] if lr == "auto" else [f"optim.lr={lr / 10:.1e}"]
    more_augment = []
    if aug == "auto":  # crops, and flips where they keep the label
        pass
    elif "crop" not in aug and "rrc" not in aug:
        more_augment = ["data.augment=crop_flip" if flips_keep else "data.augment=crop"]
    elif flips_keep and not flips(aug):
        more_augment = ["data.augment=crop_flip"]
    regularize = more_augment + ([] if not own or own["dropout"] >= 0.2 else ["model.dropout=0.2"])
    regularize += [f"optim.weight_decay={min(0.5, max(0.1, 2 * weight_decay)):g}"] if weight_decay < 0.25 else []
    relax = [] if not own or own["dropout"] == 0 else ["model.dropout=0"]
    relax += [f"optim.weight_decay={weight_decay / 10:g}"] if weight_decay > 0.01 else []
    if not own:
        deeper, wider = ["normalization layers or residual connections in the model"], ["a wider model"]
        leaky = ["LeakyReLU instead of ReLU in the model"]
    else:
        deeper = [f"model.{k}={v}" for k, v in (("norm", "batch"), ("activation", "relu")) if own[k] != v]
        deeper += [] if model.name == "resnet" else ["model=resnet"]
        wider = [f"a wider model (model.{k})" for k in ("widths", "base_width") if hasattr(model, k)][:1] or [
            "a wider model"]
        leaky = [] if own["activation"] in ("leaky_relu", "prelu") else ["model.activation=leaky_relu"]
    labels = "check that the labels match the images (report.md lists suspects)."

    def say(changes: list[str], then: str = "") -> str:
        return "Try " + ", ".join(changes) + (f"; {then}" if then else ".") if changes else then.capitalize()

    return {"collapse": say(lr_auto, labels), "plateau": say(lr_auto, labels), "vanishing": say(deeper),
            "exploding": say(lower_lr + ([] if grad_clip > 0 else ["trainer.grad_clip=5"])),
            "dead": say(leaky + lower_lr),
            "overfitting": say(regularize, "a smaller model; the best checkpoint (on validation) is kept anyway."),
            "underfitting": say(([f"trainer.max_epochs={2 * epochs}"] if epochs else []) + wider + lr_auto + relax)}


FIXES = advice()  # the generic advice, for detectors called outside a run
MIN_GAP = 0.05  # train accuracy above val accuracy by at least this much before overfitting is called
UNDERFIT_MAP = 0.25  # several labels per image: val mAP within this share of the way from chance to 1: underfitting


def epoch_findings(epoch: int, history: list[dict], confusion: torch.Tensor, num_classes: int,
                   fixes: dict = FIXES) -> list[Finding]:
    """Checks on one finished epoch: prediction collapse [M27] and a loss stuck at chance [M28]."""
    found = []
    predicted = confusion.sum(0).float()  # (C,) predictions per class on validation
    truth = confusion.sum(1).float()
    share, prior = predicted / predicted.sum(), truth / truth.sum()
    k = int(share.argmax())
    # far above its share: 3x it, but at most halfway from it to 1 (with 2 or 3 classes 3x is out of reach)
    # not judged after the first epoch: BatchNorm's running statistics then come from a handful of steps
    if epoch >= 2 and num_classes > 1 and share[k] > max(0.5, min(3 * prior[k], (1 + prior[k]) / 2)):
        found.append(Finding("M27", "collapse", (
            f"epoch {epoch}: {share[k]:.0%} of validation predictions are class {k}, which is {prior[k]:.0%} of "
            "the data: the model is collapsing onto one class. Likely causes: class imbalance, a learning rate "
            "too high or too low, labels that do not match the images, or inputs that carry no signal."),
            fixes["collapse"], epoch=epoch, evidence={"class": k, "share": float(share[k]), "prior": float(prior[k])}))
    return found + plateau_findings(epoch, history, f"ln({num_classes}) = {math.log(num_classes):.3f} on balanced "
                                                      "classes", fixes)


def plateau_findings(epoch: int, history: list[dict], level: str, fixes: dict = FIXES) -> list[Finding]:
    """A training loss stuck where the best input-blind predictions, or uniform ones, would be [M28]. `level`: the
    chance level in words, for the message."""
    recent = history[-2:]
    stuck = [] if epoch < 2 else [h for h in ("train/chance_loss", "train/uniform_loss")
                                  if all(abs(r["train/loss"] - r[h]) < 0.05 * r[h] for r in recent)]
    if not stuck:
        return []
    last = ", ".join(f"{r['train/loss']:.3f}" for r in recent)
    return [Finding("M28", "plateau", (
        f"epoch {epoch}: the training loss has stayed at the chance level {recent[-1][stuck[0]]:.3f} (what a "
        f"model that ignores its input scores; {level}; last epochs: {last}): the model is not learning. Likely "
        "causes: a learning rate far too low or too high, labels shuffled relative to the images, or images without "
        "class signal."), fixes["plateau"], epoch=epoch,
        evidence={"chance_loss": recent[-1][stuck[0]], "train_losses": [r["train/loss"] for r in recent]})]


def multilabel_findings(epoch: int, history: list[dict], val: dict, fixes: dict = FIXES) -> list[Finding]:
    """Several labels per image: collapse [M27] is the same label set predicted for every validation image (at the
    thresholds chosen on it), or no label predicted for any (at 0.5), where the images' sets differ; and the
    plateau [M28] at the labels' chance level, where the validation mAP is also near what images in any order score
    (per-label weights keep a learning run's loss near its chance level for longer than cross-entropy's)."""
    found = []
    same, empty = val["predicted_sets"] == 1, val["predicted_at_half"] == 0
    if epoch >= 2 and val["true_sets"] > 1 and (same or empty):
        seen = ("no validation image gets any label (every probability below 0.5)" if empty else
                "every validation image gets the same label set, whatever the image")
        found.append(Finding("M27", "collapse", (
            f"epoch {epoch}: {seen}, while the images carry {val['true_sets']} different label sets: the model "
            "predicts from the label frequencies, not from the images. Likely causes: a learning rate too high or "
            "too low, labels that do not match the images, or inputs that carry no signal."),
            fixes["collapse"], epoch=epoch, evidence={"predicted_sets": val["predicted_sets"],
                                                      "predicted_at_half": val["predicted_at_half"]}))
    chance = float(val["chance_map"])
    if float(val["map"]) > chance + 0.1 * (1 - chance):
        return found
    level = (f"ln 2 = 0.693 per label for logits 0, the labels' own entropy for the best constant ones; validation "
             f"mAP {float(val['map']):.3f} where images in any order score {chance:.3f}")
    return found + plateau_findings(epoch, history, level, fixes)


VANISHING, EXPLODING = 1e-3, 70.0  # first/last layer gradient-norm ratio bounds (AUTOTRAINER's detectors)
DEAD_SHARE = 0.5  # share of ReLU channels never active on a validation batch


def layer_grad_norms(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradient norm of every conv/linear weight, in forward order (call after backward)."""
    return {n: p.grad.detach().norm() for n, p in model.named_parameters() if p.grad is not None and p.ndim > 1}


def gradient_findings(epoch: int, norms: dict[str, float], fixes: dict = FIXES) -> list[Finding]:
    if len(norms) < 2:
        return []
    (first, g0), (last, g1) = next(iter(norms.items())), list(norms.items())[-1]
    ratio = g0 / max(g1, 1e-30)
    if ratio < VANISHING:
        return [Finding("M26", "vanishing", f"epoch {epoch}: vanishing gradients: the first layer ({first}) gets "
                        f"{ratio:.1e} of the gradient of the last ({last}). Likely causes: saturating activations, "
                        "no normalization, a very deep plain network.",
                        fixes["vanishing"], epoch=epoch,
                        evidence={"ratio": ratio, "first": first, "last": last})]
    if ratio > EXPLODING:
        return [Finding("M26", "exploding", f"epoch {epoch}: exploding gradients: the first layer ({first}) gets "
                        f"{ratio:.0f}x the gradient of the last ({last}). Likely causes: learning rate too high, no "
                        "normalization.", fixes["exploding"], epoch=epoch,
                        evidence={"ratio": ratio, "first": first, "last": last})]
    return []


@torch.no_grad()
def dead_unit_share(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Share of ReLU output channels that are never positive on the batch `x` (eval mode)."""
    dead, total, hooks = [0], [0], []

    def hook(_, __, out):
        alive = (out.flatten(2) if out.ndim > 2 else out.unsqueeze(2)).amax(dim=(0, 2)) > 0  # (channels,)
        dead[0] += int((~alive).sum())
        total[0] += alive.numel()

    for m in model.modules():
        if type(m) is torch.nn.ReLU:
            hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return dead[0] / total[0] if total[0] else 0.0


def dead_unit_findings(epoch: int, share: float, fixes: dict = FIXES) -> list[Finding]:
    if share <= DEAD_SHARE:
        return []
    return [Finding("M20", "dead", f"epoch {epoch}: {share:.0%} of ReLU channels never fire on a validation batch "
                    "(dying ReLUs). Likely causes: a learning rate too high, a large negative bias.",
                    fixes["dead"], epoch=epoch,
                    evidence={"dead_share": share})]


def fit_findings(epoch: int, history: list[dict], num_classes: int, capacity: str,
                 fixes: dict = FIXES) -> list[Finding]:
    """Overfitting: validation loss 5% above its minimum of 2 or more epochs ago while the train/val accuracy
    gap (positive, at least MIN_GAP) has grown since; underfitting: training accuracy near chance after
    several epochs, or with several labels per image a validation mAP near what images in any order score [M09]."""
    found, now = [], history[-1]
    m = min(range(len(history)), key=lambda i: history[i]["val/loss"])  # epoch m + 1 had the lowest val loss
    gap, gap_then = now["train/acc"] - now["val/acc"], history[m]["train/acc"] - history[m]["val/acc"]
    if epoch - (m + 1) >= 2 and now["val/loss"] > 1.05 * history[m]["val/loss"] and gap >= MIN_GAP \
            and gap > gap_then + 0.02:
        found.append(Finding("M09", "overfitting", (
            f"epoch {epoch}: overfitting: validation loss rose from {history[m]['val/loss']:.3f} (epoch {m + 1}) to "
            f"{now['val/loss']:.3f} while the train/val accuracy gap grew from {gap_then:.2f} to {gap:.2f} "
            f"({capacity}). Likely causes: a model too large for the data, too little augmentation or "
            "regularization, or labels that do not match the images (a model memorizes them)."),
            fixes["overfitting"], epoch=epoch,
            evidence={"best_val_loss_epoch": m + 1, "gap": gap, "gap_then": gap_then}))
    weak = None  # (what was seen, evidence)
    if epoch >= 3 and "val/map" in now:  # several labels per image: ranking no better than images in any order
        chance = now["val/chance_map"]
        if now["val/map"] < chance + UNDERFIT_MAP * (1 - chance):
            weak = (f"validation mAP {now['val/map']:.2f} is near what images in any order score ({chance:.2f})",
                    {"val_map": now["val/map"], "chance_map": chance})
    elif epoch >= 3 and now["train/acc"] < 1.5 / num_classes:
        weak = (f"training accuracy {now['train/acc']:.2f} is near chance ({1 / num_classes:.2f})",
                {"train_acc": now["train/acc"]})
    if weak:
        found.append(Finding("M09", "underfitting", (
            f"epoch {epoch}: underfitting: {weak[0]} after {epoch} epochs ({capacity}). Likely causes: a model too "
            "small, a learning rate too low, too much regularization, or labels that do not match the images."),
            fixes["underfitting"], epoch=epoch, evidence=weak[1]))
    return found


class Monitors:
    """What fit() calls: `guard` on every step, `after_epoch` once an epoch, `at_end` once. A condition seen
    during training is logged as information when it first appears; it becomes a warning only if it holds
    for the model the run keeps (the best epoch) or still holds when training ends. One that clears up by
    itself (BatchNorm statistics settling after the first epoch, an imbalanced run finding the rare classes
    after a few epochs) stays information. Each problem is reported once a run (one per row and kind)."""

    def __init__(self, guard: StepGuard, probe: torch.Tensor, num_classes: int, capacity: str, fixes: dict = FIXES,
                 multilabel: bool = False):
        self.guard, self.probe, self.num_classes, self.capacity = guard, probe, num_classes, capacity
        self.multilabel = multilabel
        self.fixes = {**FIXES, **fixes}
        self.by_epoch: dict[int, dict[tuple[str, str], Finding]] = {}  # epoch -> conditions that held

    def conditions(self, epoch: int, history: list[dict], val: dict, model) -> list[Finding]:
        """`val`: the epoch's validation scores (engine.evaluate)."""
        norms = {k.removeprefix("grad_norm/"): v for k, v in history[-1].items() if k.startswith("grad_norm/")}
        c, fixes = self.num_classes, self.fixes
        task = multilabel_findings(epoch, history, val, fixes) if self.multilabel else \
            epoch_findings(epoch, history, val["confusion"], c, fixes)
        return (task + gradient_findings(epoch, norms, fixes)
                + dead_unit_findings(epoch, dead_unit_share(model, self.probe), fixes)
                + fit_findings(epoch, history, c, self.capacity, fixes))

    def after_epoch(self, epoch: int, history: list[dict], val: dict, model) -> None:
        now = {(f.row, f.kind): f for f in self.conditions(epoch, history, val, model)}
        before = set().union(*self.by_epoch.values()) if self.by_epoch else set()
        for key in now.keys() - before:
            log.info("watching (a warning if it holds at the best or the last epoch): %s", now[key].message)
        self.by_epoch[epoch] = now

    def state_dict(self) -> dict:
        return {"guard": self.guard.state_dict(),
                "by_epoch": {e: [f.to_dict() for f in held.values()] for e, held in self.by_epoch.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.guard.load_state_dict(state["guard"])
        self.by_epoch = {e: {(f["row"], f["kind"]): Finding(**f) for f in held}
                         for e, held in state["by_epoch"].items()}

    def at_end(self, best_epoch: int) -> list[Finding]:
        """The conditions that hold at the best epoch (the checkpoint the run keeps) or at the last one."""
        last = max(self.by_epoch, default=0)
        found = {**self.by_epoch.get(best_epoch, {}), **self.by_epoch.get(last, {})}
        for f in found.values():
            f.source = "monitor"
            log.warning("%s", f)
        return list(found.values())


@torch.no_grad()
def predicted_probs(model, loader, prec, multilabel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (N, C), given labels) of a split, in order, on the CPU: softmax over the classes, or with
    several labels per image a sigmoid per label."""
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        with prec.autocast():
            probs.append(probabilities(model(prec.prepare(x)).float(), multilabel).cpu())
        labels.append(y.cpu())
    return torch.cat(probs), torch.cat(labels)


def probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    return logits.sigmoid() if multilabel else logits.softmax(1)


def given_and_other(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N,) each: the probability of the given label, of the most likely other class, and that class."""
    other, pred = probs.scatter(1, labels[:, None], -1.0).max(1)
    return probs.gather(1, labels[:, None]).squeeze(1), other, pred


PRIOR_WEIGHT, PRIOR_RANGE = 0.3, (0.01, 0.5)  # suspected_mislabeled's prior (set on CIFAR-10 subsets: RESULTS.md)


def suspected_mislabeled(probs: torch.Tensor, labels: torch.Tensor, ids: list[str], classes: list[str],
                         area: torch.Tensor | None = None, by_doubt: bool = False,
                         prior: torch.Tensor | None = None) -> list[dict]:
    """Training samples whose given label looks wrong [M08], most likely first, each with the final model's
    probabilities (`probs`: on the split in order through the eval pipeline, predicted_probs). With `area` (each
    sample's margin over training, Margins.area): those that kept a negative margin (another class above their label,
    on average while training), lowest first; with `prior` too ((C,) the share of wrong labels estimated among the
    held-out images of each given class, LabelNoise.given_wrong), ranked by the margin minus PRIOR_WEIGHT x the
    log-odds of that share (+1.4 where none is estimated, +0.3 at 25%), so that where the wrong labels sit in a few
    classes (look-alikes swapped) their images come before the hard images of classes with none. Without `area`, or
    `by_doubt`: those the final model gives p(label) < 0.1 while another class has p > 0.8, by the gap (a model that
    has memorized a wrong label no longer doubts it). Each row has its margin where `area` is given."""
    given, other, pred = given_and_other(probs, labels)
    if area is None or by_doubt:
        suspect = ((given < 0.1) & (other > 0.8)).nonzero().squeeze(1)
        order = suspect[(other[suspect] - given[suspect]).argsort(descending=True)]
    else:
        suspect = (area < 0).nonzero().squeeze(1)
        score = area if prior is None else area - PRIOR_WEIGHT * prior.clamp(*PRIOR_RANGE).logit().float()[labels]
        order = suspect[score[suspect].argsort()]
    return [{"id": ids[i], "given": classes[int(labels[i])], "predicted": classes[int(pred[i])],
             "p_given": round(float(given[i]), 4), "p_predicted": round(float(other[i]), 4),
             **({} if area is None else {"margin": round(float(area[i]), 3)})} for i in order.tolist()]


def suspected_wrong_tags(probs: torch.Tensor, labels: torch.Tensor, ids: list[str], classes: list[str]) -> list[dict]:
    """Several labels per image: training images with a tag the final model finds absent (p < 0.1: an extra tag?)
    or an untagged label it finds present (p > 0.9: a missing tag?) [M08], ranked by the largest such doubt. Rows in
    suspected_mislabeled's form: `given` the tags, `predicted` what the model sees (p > 0.5)."""
    y = labels.bool()
    doubt = torch.where(y, 1 - probs, probs)  # how far each given 0/1 is from what the model sees
    worst, k = doubt.max(1)
    suspect = ((y & (probs < 0.1)) | (~y & (probs > 0.9))).any(1).nonzero().squeeze(1)
    order = suspect[worst[suspect].argsort(descending=True)]
    given, seen = label_sets(y[order], classes), label_sets(probs[order] > 0.5, classes)
    return [{"id": ids[i], "given": given[r], "predicted": seen[r],
             "doubted": f"{'extra' if y[i, k[i]] else 'missing'} {classes[int(k[i])]}",
             "p_given": round(float(1 - worst[i]), 4), "p_predicted": round(float(worst[i]), 4)}
            for r, i in enumerate(order.tolist())]


class Margins:
    """The area under the margin (AUM, Pleiss et al. 2020), recorded while training: each training sample's margin,
    the logit of its given label minus the largest other one, at every step that trains on it (augmented, before that
    step moves the weights), averaged. A wrong label keeps a negative margin until the model memorizes it, while a
    hard but right one climbs above zero early, so the ranking holds where the final model, which has fit its
    training images wrong labels included, no longer doubts them. Costs one index_add per step."""

    def __init__(self, n: int, device: torch.device):
        self.sums = torch.zeros(n, dtype=torch.float32, device=device)
        self.counts = torch.zeros(n, dtype=torch.int32, device=device)

    def add(self, ids: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """A batch: `ids` its samples' positions in the training split, `labels` their given (hard) labels."""
        logits = logits.detach().float()
        given = logits.gather(1, labels[:, None]).squeeze(1)
        other = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
        ids = ids.to(logits.device)
        self.sums.index_add_(0, ids, given - other)
        self.counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))

    def area(self) -> torch.Tensor:
        """(N,) on the CPU: each sample's mean margin; NaN for a sample never trained on."""
        return (self.sums / self.counts).cpu()

    def state_dict(self) -> dict:
        return {"sums": self.sums.cpu(), "counts": self.counts.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.sums.copy_(state["sums"])
        self.counts.copy_(state["counts"])


NOISE_WARN = 0.08  # estimated share of wrong labels above which [M08] is a warning (healthy real runs: 0-2%)
NOISE_MIN_COUNT = 5  # ... and at least this many held-out images look mislabeled
FLOOR_MIN_PER_CELL = 5  # held-out images per (given, true) pair of classes needed to trust the floor
SUREST_SHARE, SUREST_MIN = 0.1, 20  # per class: the held-out images the model is surest of, as a share of the
# images labelled with it (at least SUREST_MIN); a class with fewer than 2 x SUREST_MIN held-out images gives none: its
# "surest" images would be most of them, and their labels the model's plain error rate (`too_few_held_out`)
PAIR_SHARE, PAIR_MIN = 0.05, 3  # a (true, given) pair of classes is named where this share of the surest images of
# the true class, and at least this many, carry the given label


@dataclass
class LabelNoise:
    """Wrong labels estimated from held-out predictions (`label_noise`)."""
    estimate: float  # the share of wrong labels: the labels of the images the model is surest of, per class
    spread: float  # the part that every pair of classes shares (confident learning's floor, see `label_noise`)
    off: torch.Tensor  # (N,) held-out images confidently another class than their label (confident learning);
    # several labels per image: (N, C), the tags counted as wrong (tag_noise)
    pairs: list[tuple[int, int, float]]  # (true, given, share of the surest images of `true` labelled `given`)
    both_ways: float = 0.0  # the share of all labels in the pairs named both ways (cat -> dog and dog -> cat)
    given_wrong: torch.Tensor | None = None  # (C,) the estimated share of wrong labels among the images labelled c

    @property
    def explained(self) -> float:
        """The part of the estimate that a weak model's own confusions do not produce: the wrong labels spread over
        every pair of classes, and those of pairs named both ways. In the runs measured (benchmarks/RESULTS.md), a
        model's confusions among the images it is surest of ran one way (its surest cats held dogs, its surest dogs
        no cats), and swaps between look-alikes both ways."""
        return min(self.estimate, self.spread + self.both_ways)

    def named(self, classes: list[str]) -> list[list]:
        """The pairs as [true class, given class, share], for metrics.json, crossfit.json and the finding."""
        return [[classes[j], classes[i], round(share, 4)] for j, i, share in self.pairs]

    def in_words(self, classes: list[str]) -> str:
        """The pairs for a log line: "; cat -> dog 21%; ..." ("" where none is named)."""
        return "".join(f"; {t} -> {g} {share:.0%}" for t, g, share in self.named(classes))


def label_noise(probs: torch.Tensor, labels: torch.Tensor) -> LabelNoise:
    """Wrong labels from predictions on held-out images (the model never trained on them). The estimate: for each
    class j, the images the model is surest show a j (the top SUREST_SHARE of as many as are labelled j, by p_j, at
    least SUREST_MIN, and at most half of them: classes with fewer held-out images are left out);
    the share of them labelled otherwise is how often a j carries a wrong label. On an image the model did not train
    on, a label given at random is independent of what the model sees, so wrong labels appear among the surest j at
    their rate, while the model's own confusions (a cat it takes for a dog) sit lower, among the images it is unsure
    of. Averaged over the classes by their label counts, it holds for noise spread over every class and for noise
    between two look-alike classes (class-conditional) alike; wrong labels given to ambiguous images more than to
    clear ones are undercounted. `spread`: confident learning (Northcutt et al. 2021; a sample counts for class j
    where p_j reaches the mean p_j of the samples labelled j; the joint of (given, counted) calibrated to the label
    counts) capped by the floor under its off-diagonal cells (the mean of their lower half), which wrong labels
    spread over every class raise and a weak model's confusions, concentrated in a few pairs, do not."""
    n, c = probs.shape
    counts = torch.bincount(labels, minlength=c).double()
    carried = torch.zeros(c, c, dtype=torch.float64)  # (true j, given i): the labels of the surest images of j
    chosen = _selective(counts)
    for j in chosen.nonzero().squeeze(1).tolist():
        k = max(SUREST_MIN, int(SUREST_SHARE * counts[j]))
        carried[j] = torch.bincount(labels[probs[:, j].topk(k).indices], minlength=c).double()
    shares = carried / carried.sum(1, keepdim=True).clamp_min(1)
    estimate = float((counts * chosen / max(1.0, float(counts[chosen].sum())) * (1 - shares.diag())).sum())
    off_cells, off_shares = (x * (1 - torch.eye(c, dtype=torch.float64)) for x in (carried, shares))
    # a pair is named where its wrong labels are not a chance few: PAIR_MIN images or more, PAIR_SHARE of the surest
    # images of its class or more, and most of the wrong labels of those images (noise spread evenly names none)
    named = (off_cells >= PAIR_MIN) & (shares >= PAIR_SHARE) & (2 * off_cells >= off_cells.sum(1, keepdim=True))
    pairs = [(j, i, float(shares[j, i])) for j, i in named.nonzero().tolist()]
    both = named & named.T
    both_ways = float((counts[:, None] / n * shares * both).sum())
    given_wrong = (counts[:, None] * off_shares).sum(0) / counts.clamp_min(1)  # (C,) by given label
    spread, off = _confident_learning(probs, labels, counts)
    return LabelNoise(estimate, spread, off, sorted(pairs, key=lambda p: -p[2]), both_ways, given_wrong)


def _selective(counts: torch.Tensor) -> torch.Tensor:
    """(C,) the classes with enough held-out images that their surest SUREST_MIN or more are at most half of them."""
    return counts >= 2 * SUREST_MIN


def too_few_held_out(labels: torch.Tensor, num_classes: int) -> str | None:
    """Why `label_noise` cannot be trusted on these held-out labels, or None: the classes with 2 x SUREST_MIN held-out
    images or more (whose surest images are a selection) must hold half of them. With fewer, the images a model is
    "surest" of are about all of them, and the share labelled otherwise is the model's error rate: a model that has
    not generalized (263 training photos of 5 classes) would read as 30-40% wrong labels."""
    counts = torch.bincount(labels, minlength=num_classes)
    if int(counts[_selective(counts)].sum()) * 2 >= len(labels):
        return None
    return (f"too few validation and test images to tell wrong labels from the model's own errors: "
            f"{int(counts.min())}-{int(counts.max())} a class, {2 * SUREST_MIN} needed (raise data.val_fraction, or "
            "add images)")


def _confident_learning(probs: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Confident learning's estimate, capped by the floor under the off-diagonal cells where there are enough
    samples per pair of classes -> (share, (N,) mask of the samples counted off the diagonal)."""
    n, c = probs.shape
    thresholds = torch.stack([probs[labels == j, j].mean() if counts[j] else torch.tensor(1.0) for j in range(c)])
    above = probs >= thresholds
    confident = torch.where(above, probs, torch.full_like(probs, -1.0)).argmax(1)
    counted = above.any(1)
    joint = torch.zeros(c, c, dtype=torch.float64)
    joint.index_put_((labels[counted], confident[counted]), torch.ones(int(counted.sum()), dtype=torch.float64),
                     accumulate=True)
    joint = joint / joint.sum(1, keepdim=True).clamp_min(1) * counts[:, None]  # rows sum to the label counts
    share = float(1 - joint.trace() / joint.sum().clamp_min(1))
    cells = joint[~torch.eye(c, dtype=torch.bool)]  # (C(C-1),) off-diagonal
    if n / len(cells) >= FLOOR_MIN_PER_CELL:
        share = min(share, float(cells.sort().values[:max(1, len(cells) // 2)].mean() * len(cells) / n))
    return share, counted & (confident != labels)


TAG_NOISE_WARN = 0.08  # several labels per image: the per-label wrong-tag floor above which [M08] is a warning
TAG_NOISE_MIN_MAP = 0.5  # ... estimated only where the held-out mAP is this share of the way from chance to 1


def tag_noise(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Several labels per image: confident learning per label, each a yes/no task (one-vs-rest, as cleanlab treats
    multi-label data): a tag counts as confidently present where p reaches the mean p of the images tagged with it,
    confidently absent where 1 - p reaches the mean of the untagged ones (both: the larger margin); the 2x2 joint of
    (given, confident) is calibrated to the tag counts, and its off-diagonal share estimates each label's wrong
    tags. A model's own confusions concentrate on the labels it finds hard (cat, dog), while wrong tags raise every
    label: the estimate is the floor, the mean over the better half of the labels. Returns (estimate, (N, C) mask
    of the tags counted as wrong)."""
    y, (n, c) = labels.bool(), probs.shape
    rates, off = [], torch.zeros_like(y)
    for j in range(c):
        pos, p = y[:, j], probs[:, j]
        if pos.all() or not pos.any():
            rates.append(0.0)
            continue
        t1, t0 = p[pos].mean(), (1 - p[~pos]).mean()
        says_pos, says_neg = p >= t1, 1 - p >= t0
        truth = torch.where(says_pos & says_neg, p - t1 > (1 - p) - t0, says_pos)
        counted = says_pos | says_neg
        joint = torch.zeros(2, 2, dtype=torch.float64)
        joint.index_put_((pos[counted].long(), truth[counted].long()), torch.ones(int(counted.sum()),
                                                                                dtype=torch.float64), accumulate=True)
        given = torch.stack([(~pos).sum(), pos.sum()]).double()
        joint = joint / joint.sum(1, keepdim=True).clamp_min(1) * given[:, None]
        rates.append(float((joint[0, 1] + joint[1, 0]) / n))
        off[:, j] = counted & (truth != pos)
    better = sorted(rates)[:max(1, c // 2)]
    return sum(better) / len(better), off


def too_weak_for_tag_noise(probs: torch.Tensor, labels: torch.Tensor) -> str | None:
    """Why the held-out predictions cannot tell wrong tags from the model's own limits (a weak model's doubts read as
    noise: a learning rate 100x too low gave an estimate of 34% on clean tags), or None: the held-out mAP must be
    TAG_NOISE_MIN_MAP of the way from what images in any order score to 1."""
    has = labels.sum(0) > 0
    chance, score = float(labels[:, has].float().mean()), float(average_precisions(probs, labels)[0])
    if score >= chance + TAG_NOISE_MIN_MAP * (1 - chance):
        return None
    return (f"held-out mAP {score:.2f}, where images in any order score {chance:.2f}: the model is too weak for its "
            "doubts to tell wrong tags from its own limits")


def tag_noise_finding(estimate: float, off: torch.Tensor, examples: list[dict]) -> Finding | None:
    """[M08] for several labels per image, when the per-label floor and the tags behind it are large enough."""
    images = int(off.any(1).sum())
    if estimate < TAG_NOISE_WARN or images < NOISE_MIN_COUNT:
        return None
    shown = ", ".join(f"{m['id']} ({m['given']}: {m['doubted']}?)" for m in examples[:3])
    return Finding("M08", "label noise", (
        f"about {estimate:.0%} of each label's tags look wrong, even on the labels the model learned best: of "
        f"{len(off)} validation and test images the model never trained on, {images} carry a tag it confidently "
        f"contradicts (confident learning per label). Training images whose tags the final model doubts most: "
        f"{shown or 'none'} (report.md lists more)."),
        "Check and fix the tags (missing and extra ones); a re-tagged dataset will train to a higher mAP.",
        "monitor", evidence={"estimate": estimate, "images": images, "split_size": len(off)})


RARE_LABEL_SHARE, RARE_LABEL_AP_GAP = 0.1, 0.15  # a label this rare against the median one, and this far below its AP


def rare_label_findings(classes: list[str], positives: list[int], val_ap: list) -> list[Finding]:
    """Several labels per image: a label with under a tenth of the median label's training positives whose validation
    AP lags the median label's by RARE_LABEL_AP_GAP or more had too few examples to be learned [M08] (a rare label the
    model learned anyway is not a problem)."""
    scored = [a for a in val_ap if a is not None]
    if not scored:
        return []
    mid_pos, mid_ap = sorted(positives)[len(positives) // 2], sorted(scored)[len(scored) // 2]
    found = []
    for c, n, ap in zip(classes, positives, val_ap):
        if ap is not None and n < RARE_LABEL_SHARE * mid_pos and ap < mid_ap - RARE_LABEL_AP_GAP:
            found.append(Finding("M08", "too few positives", (
                f"label '{c}' has too few examples to be learned: {n} training images carry it, under a tenth of the "
                f"median label's {mid_pos}, and its validation AP is {ap:.2f} against the median label's "
                f"{mid_ap:.2f}."), f"Add images with '{c}' (or merge it with a related label, or remove it).", "data",
                evidence={"label": c, "positives": n, "median_positives": mid_pos, "ap": ap, "median_ap": mid_ap}))
    return found


NOISE_FIT_SLACK = 0.25  # training error (per class, averaged) beyond the noise estimate: the model has not fit its data
# (CIFAR-10 subsets, cnn_small: 20% wrong labels left 18 points beyond the estimate, a learning rate 50-100x too low 42)


def unfit_for_noise(probs: torch.Tensor, labels: torch.Tensor, estimate: float,
                    classes: list[str], explained: float | None = None) -> tuple[str, dict] | None:
    """Why held-out confusions cannot be blamed on the labels, or None. A model that has learned its data gets its
    own training images wrong where their labels are wrong (and not all of those: it memorizes some), so its error on
    them stays near the share of wrong labels. A model that underfits (a learning rate too low, too few epochs) or has
    not learned some classes (imbalance without balancing) gets many more wrong, and is unsure, or wrong, even on the
    held-out images it is surest of: its confusions read as noise. The rule: the kept model's error on its training
    images, averaged over classes (an unlearned small class counts as much as a large one), must not exceed the
    wrong labels by more than NOISE_FIT_SLACK, counting only the `explained` part of the estimate where it is given
    (LabelNoise.explained: what a weak model's own confusions do not produce). `probs`, `labels`: the
    kept model's predictions on its training split (predicted_probs). -> (why, evidence)."""
    wrong = (probs.argmax(1) != labels).double()
    c = probs.shape[1]
    counts = torch.bincount(labels, minlength=c).double()
    per_class = torch.bincount(labels, weights=wrong, minlength=c) / counts.clamp_min(1)
    balanced = float(per_class[counts > 0].mean())
    explained = estimate if explained is None else explained
    if balanced <= explained + NOISE_FIT_SLACK:
        return None
    worst = per_class.argsort(descending=True)[:3].tolist()
    shown = ", ".join(f"{classes[k]} {per_class[k]:.0%}" for k in worst)
    return (f"the kept model gets {balanced:.0%} of its own training images wrong (per class, on average; most: "
            f"{shown}), more than wrong labels can explain (the {explained:.0%} of them that a weak model's own "
            "confusions would not produce): it has not learned the training data well enough to tell wrong labels from "
            "its own limits",
            {"train_error_per_class": round(balanced, 4), "estimate": round(estimate, 4),
             "worst": {classes[k]: round(float(per_class[k]), 4) for k in worst}})


def underfit_not_noise(why: str, evidence: dict, fixes: dict = FIXES) -> Finding:
    """[M09] for a run whose confusions looked like wrong labels but whose model has not fit its training data."""
    return Finding("M09", "underfitting", (
        f"underfitting at the end of training: {why}. Its confusions on held-out images would read as "
        f"{evidence['estimate']:.0%} wrong labels; they are the model's own. Likely causes: a learning rate too low, "
        "too few epochs, a model too small, or too much regularization."), fixes["underfitting"], "monitor",
        evidence=evidence)


def label_noise_finding(noise: LabelNoise, classes: list[str], split_size: int, examples: list[dict]) -> Finding | None:
    """[M08] when the estimate and the number of samples behind it are both large enough: the pairs of classes
    whose labels are mixed up where the noise sits in a few, the suspected training images."""
    if noise.estimate < NOISE_WARN or int(noise.off.sum()) < NOISE_MIN_COUNT:
        return None
    where = "; ".join(f"{share:.0%} of those surest to be {classes[j]} are labelled {classes[i]}"
                      for j, i, share in noise.pairs[:4])
    shown = ", ".join(f"{m['id']} ({m['given']} -> {m['predicted']})" for m in examples[:3])
    return Finding("M08", "label noise", (
        f"about {noise.estimate:.0%} of the labels look wrong: of the {split_size} validation and test images the "
        "model never trained on, that share of those it is surest to be of a class carry another label"
        f"{' (' + where + ')' if where else ', spread over the classes'}. Training images most likely mislabeled: "
        f"{shown or 'none'} (report.md lists more)."),
        "Check and fix the labels of those classes; a relabelled dataset will train to a higher accuracy.",
        "monitor", evidence={"estimate": noise.estimate, "spread": noise.spread, "off_diagonal": int(noise.off.sum()),
                             "split_size": split_size, "pairs": noise.named(classes)})
