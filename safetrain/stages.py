"""The stages of a run up to training, in order. Each takes the config and what the stages before it returned, and
returns a small dataclass; each can be called on its own (tests do). Only these, the end of a run (end.py) and
`run` read the config tree.

    start -> prepare_data -> build_training -> preflight -> open_run_dir -> train -> (end.py) finish
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from safetrain import data as D
from safetrain import distributed as dist
from safetrain import figures as draw
from safetrain.checkpoint import Checkpointer, rng_state, set_rng_state
from safetrain.config import OPTIMIZERS, Config, data_spec, resolve_task, to_container, unlocks
from safetrain.data.audit import Audit, cached_audit
from safetrain.data.sources import label_sets
from safetrain.data.audit import findings as audit_findings
from safetrain.engine import (FitResult, Limits, Precision, Setup, StopRequest, choose_precision, find_lr, fit,
                              keep_fp32_where_cpu_bf16_fails, step_times)
from safetrain.errors import ConfigError
from safetrain.findings import Finding, problems
from safetrain.io import cache_root, write_json
from safetrain.losses import build_loss, resolve_balance
from safetrain.metrics import build_metrics, build_multilabel_metrics, selection_metric
from safetrain.models import build_model, count_parameters
from safetrain.models.checks import check_model
from safetrain.models.layers import hooks
from safetrain.monitors import Margins, Monitors, StepGuard, advice
from safetrain.optim import Lookahead, LRSchedule, build_optimizer
from safetrain.preflight import init_and_gradient_checks, input_check
from safetrain.runtime import MARK, resolve_device, seed_everything
from safetrain.tracking import Tracker, environment, snapshot, write_config

log = logging.getLogger("safetrain")


@dataclass
class Context:
    """What every stage shares: the validated config, where it runs, and the unlocked bounds."""
    cfg: Config
    device: torch.device
    prec: Precision
    cache: Path
    findings: list[Finding]  # unlocked safety bounds
    t_start: float = field(default_factory=time.time)

    @property
    def config(self) -> dict:
        """The resolved config as plain data (config.yaml, checkpoints, hparams), always as `cfg` is now."""
        return to_container(self.cfg)


@dataclass
class Loaders:
    train: Any  # shuffled, augmented (class-balanced with loss.balance=sampler)
    val: Any  # the eval ones: in order, normalized only [M04]
    test: Any
    train_in_order: Any  # the training split through the eval pipeline (suspected mislabeled samples)


@dataclass
class Prepared:
    """The data side of a run: splits checked for leaks, facts measured on train, loaders built once."""
    name: str
    spec: D.DataSpec  # what was loaded and how it was split: saved in the checkpoints for the commands after training
    splits: dict[str, D.ImageSet]
    facts: D.DataFacts
    audit: Audit
    balance: tuple[str, str]  # (loss.balance method, why): decided from the facts
    loaders: Loaders
    eval_pipeline: D.BatchPipeline
    decoding: D.Decoding  # how the splits' files are decoded: for any further loader of them
    first_batch: tuple[torch.Tensor, torch.Tensor]  # (x, y) of the training loader, as the model sees it
    input_check: Finding  # [M33] on a batch in the split's own class mix
    findings: list[Finding]  # audit and data findings
    seconds: dict[str, float]  # load (decoding on a fresh cache), split (with the near-copy search), audit
    held_out: Optional[D.ImageSet] = None  # data.fold: the training images this run leaves out and predicts


@dataclass
class RunDir:
    path: Path
    tracker: Optional[Tracker]  # None on the ranks other than 0 under torchrun: they write nothing


def start(cfg: Config) -> Context:
    """Seed, device, precision, cache folder; the unlocked bounds are logged."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    name = choose_precision(cfg.trainer.precision, device,
                            torch.cuda.get_device_capability(device) if device.type == "cuda" else None)
    prec = Precision(device, bf16=name == "bf16", fp16=name == "fp16")
    ctx = Context(cfg, device, prec, cache_root(cfg.data.cache_dir), unlocks(cfg))
    for f in ctx.findings:
        log.warning("unlocked %s", f)
    log.info("[1/9] seed %d | device %s | %s%s", cfg.seed, device, {"bf16": "bf16 autocast", "fp32": "fp32",
                                                                      "fp16": "fp16 autocast, gradient scaler"}[name],
             f" | {dist.world()} processes (torchrun): data.batch_size={cfg.data.batch_size} is the global batch, "
             f"{cfg.data.batch_size // dist.world()} per process" if dist.active() else "")
    return ctx


def prepare_data(ctx: Context, dataset=None) -> Prepared:
    """Source -> seeded stratified splits -> exact-copy refusal [M06] -> facts -> audit -> loaders -> [M33]."""
    d, seed = ctx.cfg.data, ctx.cfg.seed
    contract = ctx.cfg.model.input_contract()  # pretrained weights' input [M34, M35]
    spec = data_spec(ctx.cfg, contract and contract.size, ctx.device.type)
    t0 = time.perf_counter()
    src = D.load_dataset(dataset) if dataset is not None else D.load_source(spec, ctx.cache)
    resolve_task(ctx.cfg, src.task)  # the labels decide the task; stated otherwise: refused [M13]
    t1 = time.perf_counter()
    splits = D.split_source(src, spec, ctx.cache, ctx.device)
    t2 = time.perf_counter()
    copies = D.exact_duplicates(splits)
    if ctx.cfg.mode != "doctor":  # the doctor reports them as a FAIL instead
        D.refuse_duplicates(copies, d.allow_duplicates_across_splits)
    splits, held = _held_out(splits, d.fold, seed) if d.fold is not None else (splits, None)  # mode=crossfit
    name = "custom Dataset" if dataset is not None else d.name
    log.info("[2/9] data %s: %s (stratified, seed %d)", name, ", ".join(f"{k} {len(v)}" for k, v in splits.items()),
             seed)
    decoding = src.decoding(d.num_workers)
    facts = D.measure_facts(src.classes, D.class_counts(splits, len(src.classes)), splits["train"].ids, src.shape,
                            src.fingerprint, lambda: D.uint8_batches(splits["train"], decoding), ctx.cache,
                            src.left_out, src.task, {k: len(v) for k, v in splits.items()})
    t3 = time.perf_counter()
    carved = tuple(n for n in ("val", "test") if n not in src.parts)  # searched for copies at the split (above)
    audit = cached_audit(splits, src.fingerprint, ctx.cache, ctx.device, joined=carved)
    seconds = {"load": t1 - t0, "split": t2 - t1, "audit": time.perf_counter() - t3}
    found = audit_findings(audit) + D.thin_eval_classes(facts.counts, facts.classes, d.min_eval_per_class)
    found += _follow_the_weights(facts, contract)
    found += _source_findings(src, copies, d)
    for f in found:
        log.warning("%s", f)
    log.info("[3/9] data facts (train split): %d %s, %dx%dx%d, mean %s, std %s, imbalance %.1f | images per "
             "%s: %s | audit: %d near-duplicates across splits, %d blank", facts.num_classes,
             "labels (several per image)" if facts.multilabel else "classes", facts.channels,
             facts.height, facts.width, _fmt(facts.mean), _fmt(facts.std), facts.imbalance_ratio,
             "label" if facts.multilabel else "class",
             ", ".join(f"{c} {n}" for c, n in zip(facts.classes, facts.counts["train"])),
             len(audit.near_duplicates), len(audit.blank))
    fit_batch(ctx.cfg.data, len(splits["train"]), dist.world())
    if d.batch_size % dist.world():
        raise ConfigError(f"[config] data.batch_size={d.batch_size} is the global batch, shared out evenly over the "
                          f"{dist.world()} processes, so it must be a multiple of {dist.world()}: use data.batch_size="
                          f"{d.batch_size // dist.world() * dist.world() or dist.world()}.")
    if d.batch_size > len(splits["train"]):
        raise ConfigError(f"[M23] data.batch_size={d.batch_size} is larger than the training split "
                          f"({len(splits['train'])} samples), so an epoch would have no full batch. "
                          f"Use data.batch_size={max(1, len(splits['train']) // 4)} or less.")
    balance = resolve_balance(ctx.cfg.loss.balance, facts)
    if facts.imbalanced and balance[0] == "none":  # the user turned balancing off on imbalanced data [M24]
        kind = ("label", "binary cross-entropy", "weighs each label's positives against its negatives") \
            if facts.multilabel else ("class", "cross-entropy", "logit adjustment on imbalanced data")
        found.append(Finding("M24", "imbalance ignored", f"the largest training {kind[0]} has "
                             f"{facts.imbalance_ratio:.1f}x the images of the smallest, and loss.balance=none trains "
                             f"with plain {kind[1]}: the model will favour the large {kind[0]}s (see the rarest "
                             f"{kind[0]}'s recall in report.md).", f"Use loss.balance=auto ({kind[2]}).", "data"))
        log.warning("%s", found[-1])
    loaders, eval_pipeline, first, checked = _loaders(ctx, splits, facts, balance[0] == "sampler", decoding,
                                                      contract)
    return Prepared(name, spec, splits, facts, audit, balance, loaders, eval_pipeline, decoding, first, checked,
                    found, {k: round(v, 2) for k, v in seconds.items()}, held)


def _held_out(splits: dict[str, D.ImageSet], fold: list[int], seed: int):
    """data.fold=[k, K] (mode=crossfit's runs): (the splits with the k-th fold left out of train, that fold)."""
    if splits["train"].labels.ndim == 2:
        raise ConfigError("[config] mode=crossfit ranks images with one label each; with several labels per image a "
                          "run's report.md lists the training images whose tags the final model doubts.")
    rest, held = D.hold_out(splits["train"], *fold, seed)
    log.info("fold %d of %d: %d training images held out, predicted after training", fold[0] + 1, fold[1], len(held))
    return {**splits, "train": rest}, held


def _follow_the_weights(facts: D.DataFacts, contract) -> list[Finding]:
    """With pretrained weights, the input is theirs: their mean/std replace the data's [M34] (averaged over RGB for
    1-channel data); images far from their resolution are warned about with the factor [M35]."""
    if contract is None:
        return []
    rgb = facts.channels == 3
    facts.mean = contract.mean if rgb else [sum(contract.mean) / 3]
    facts.std = contract.std if rgb else [sum(contract.std) / 3]
    log.info("[M34] normalization from %s: mean %s, std %s%s, not the data's own statistics (the weights were "
             "trained on inputs normalized so)", contract.source, _fmt(facts.mean), _fmt(facts.std),
             "" if rgb else " (the RGB values averaged for 1-channel images)")
    side = min(facts.height, facts.width)
    if side == contract.size:
        return []
    factor = contract.size / side
    where = "below" if factor > 1 else "above"
    return [Finding("M35", "resolution", f"the images are {facts.height}x{facts.width}, {factor:.1f}x {where} the "
                    f"{contract.size}x{contract.size} the weights were trained at ({contract.source}); their features "
                    "fit that scale best.", "Leave data.image_size unset (image folders are then resized to the "
                    "weights' resolution), or accept a lower accuracy for the speed.", "data",
                    evidence={"size": side, "weights": contract.size})]


def _loaders(ctx: Context, splits, facts: D.DataFacts, sampler: bool, decoding: D.Decoding, contract=None):
    """The loaders of every split, built once on the one normalization [M02]; the first training batch and
    the [M33] input check on it. -> (Loaders, eval pipeline, (x, y), Finding)"""
    d, seed = ctx.cfg.data, ctx.cfg.seed
    normalize = D.Normalize(facts.mean, facts.std)

    at = dist.part()  # under torchrun: this rank's share of every global batch and of the eval splits

    augment = D.Augment(D.resolve_augment(d.augment, decoding.resize is not None, d.hflip_keeps_label),
                        d.rotate_degrees, tuple(d.crop_scale), tuple(d.crop_ratio), d.mix, d.mix_alpha)

    def train_loader(class_balanced: bool):
        pipeline = D.BatchPipeline(normalize, ctx.device, augment, seed, at, facts.num_classes)
        return D.make_loader(splits["train"], pipeline, batch_size=d.batch_size, train=True, seed=seed, at=at,
                             class_counts=facts.counts["train"] if class_balanced else None, decoding=decoding)

    train = train_loader(sampler)
    eval_pipe = D.BatchPipeline(normalize, ctx.device)  # deterministic: normalization only [M04]
    evaluation = dict(batch_size=2 * d.batch_size, train=False, seed=seed, decoding=decoding)
    val = D.make_loader(splits["val"], eval_pipe, at=at, **evaluation)
    x0, y0 = next(iter(train))
    # inputs are checked as the split gives them: a class-balanced sampler shifts the class mix on purpose [M33]
    checked = input_check(x0 if not sampler else next(iter(train_loader(False)))[0], contract and contract.source)
    log.info("[4/9] pipelines: train augment=%s%s, batch %d, %d steps/epoch; eval normalize only",
             _described(augment, d.augment), f" rotate<={d.rotate_degrees:g}deg" if d.rotate_degrees else "",
             d.batch_size, len(train))
    loaders = Loaders(train, val, D.make_loader(splits["test"], eval_pipe, at=at, **evaluation),
                      D.make_loader(splits["train"], eval_pipe, **evaluation))  # whole: rank 0's report
    return loaders, eval_pipe, (x0, y0), checked


def fit_batch(d, train_size: int, world: int = 1) -> None:
    """data.max_batch_share: a recipe's batch made to fit a small training split (a multiple of 8 and of the
    processes, at least BatchNorm's minimum), logged and saved as data.batch_size in config.yaml."""
    if d.max_batch_share is None or d.batch_size <= d.max_batch_share * train_size:
        return
    step = 8 * world
    fitted = max(step, int(d.max_batch_share * train_size) // step * step)
    if fitted < d.batch_size:
        log.info("data.batch_size=%d is more than data.max_batch_share=%g of the %d training images: batches of %d "
                 "(saved in config.yaml; data.max_batch_share=null keeps %d)", d.batch_size, d.max_batch_share,
                 train_size, fitted, d.batch_size)
        d.batch_size = fitted


def _described(augment: D.Augment, asked: str) -> str:
    """The training augmentation for the log, with what `auto` chose and the settings that apply."""
    out = augment.name + (" (data.augment=auto)" if asked == "auto" else "")
    if D.resized_crops(augment.name):
        out += f", random resized crops of {augment.crop_scale} of the area, ratios {augment.crop_ratio}"
    return out + (f", {augment.mix} (alpha {augment.mix_alpha:g}): soft labels, training accuracy against the "
                  "larger share" if augment.mix != "none" else "")


def build_training(ctx: Context, data: Prepared, model: Optional[nn.Module] = None,
                   lr: Optional[float] = None) -> Setup:
    """Model from the data facts (or the user's, checked [M10-M12]), loss from the task and the class balance,
    AdamW/SGD without decay on norm/bias, the schedule stepped on the selection metric. `lr`: the one a resumed
    run chose (optim.lr=auto is not measured again)."""
    cfg, facts, (x0, _) = ctx.cfg, data.facts, data.first_batch
    net = model if model is not None else build_model(cfg.model, (facts.channels, facts.height, facts.width),
                                                      facts.num_classes, facts.classes)
    net = net.to(ctx.device, memory_format=torch.channels_last)
    if not cfg.model.init_from:  # layers measured on the training images (fastcnn's whitening)
        hooks(net).fit_to_data(lambda: _training_images(data))
    check_model(net, x0[:16], facts.num_classes, cfg.data.batch_size, dist.world())  # [M12] per process
    hooks(net).eval_views("mirror")  # validation every epoch: the image and its mirror; the test every view (end.py)
    if ctx.prec.bf16 and ctx.device.type == "cpu":
        kept = keep_fp32_where_cpu_bf16_fails(net, ctx.prec.prepare(x0[:2].to(ctx.device)))
        if kept:
            log.info("bf16 on this CPU: %d convolution%s with a stride wider than %s input run%s in fp32, where the "
                     "CPU's bf16 weight gradient is wrong (%s)", len(kept), "s" * (len(kept) > 1),
                     "their" if len(kept) > 1 else "its", "" if len(kept) > 1 else "s", ", ".join(kept))
    n_params = count_parameters(net)
    log.info("[5/9] model %s: %s parameters for %d training images%s", "custom nn.Module" if model is not None
             else cfg.model.name, f"{n_params:,}", len(data.splits["train"]),
             f", stage sizes {hooks(net).sizes}" if hooks(net).sizes else "")
    balance, why = data.balance
    loss_fn = build_loss(cfg.task, cfg.loss.name, cfg.loss.label_smoothing, balance, facts.counts["train"],
                         len(data.splits["train"]))
    loss_fn = loss_fn.to(ctx.device)
    selection = selection_metric(cfg.task, facts.imbalanced)
    o, s = cfg.optim, cfg.sched

    def make_optimizer(m, lr):
        return build_optimizer(dist.unwrap(m), o.name, lr, o.weight_decay, o.momentum, o.nesterov, o.bias_lr_mult)

    trainable = dist.wrap(net)  # under torchrun: global-batch BatchNorm and DistributedDataParallel
    if cfg.trainer.compile:  # the training steps only; evaluation and checkpoints use the plain model
        trainable = torch.compile(trainable)
        log.info("trainer.compile: training steps run through torch.compile (the first ones compile: seconds to "
                 "minutes); evaluation and checkpoints use the plain model")
    if dist.active():  # the same init everywhere (above), then each rank its own dropout
        seed_everything(cfg.seed + 1_000_003 * dist.rank())
    lr = o.lr if lr is None else lr
    if lr == "auto":
        lr = find_lr(trainable, data.loaders.train, loss_fn, make_optimizer, ctx.prec,
                     bounds=OPTIMIZERS[o.name].lr_range)
        log.info("optim.lr=auto: the range test chose lr %.2e", lr)
    optimizer = make_optimizer(net, lr)
    if cfg.trainer.max_minutes and cfg.mode != "doctor":
        epochs_in_budget(ctx, data, trainable, net, loss_fn, make_optimizer)
    steps = cfg.trainer.max_epochs * len(data.loaders.train)
    schedule = LRSchedule(optimizer, s.name, mode=selection[1], total_steps=steps, factor=s.factor, patience=s.patience,
                          min_lr=s.min_lr, warmup_fraction=s.warmup_fraction)
    log.info("[6/9] loss %s, balance %s: %s [M24] | %s lr %.1e (no decay on norm/bias%s), schedule %s on val %s "
             "(%s)%s", type(loss_fn).__name__, balance, why, o.name, lr,
             f", which learn at {o.bias_lr_mult:g}x" if o.bias_lr_mult != 1 else "", s.name, *selection,
             ", lookahead weight averaging" if o.lookahead else "")
    metrics = (build_multilabel_metrics if facts.multilabel else build_metrics)(facts.num_classes, ctx.device)
    return Setup(net, loss_fn, optimizer, schedule, selection, metrics, lr,
                 make_optimizer, n_params, model is not None, trainable, Lookahead(net, steps) if o.lookahead else None,
                 _margins(ctx, data))


def _margins(ctx: Context, data: Prepared) -> Optional[Margins]:
    """Each training sample's margin over training, which ranks the suspected wrong labels [M08]: with one label per
    image and unmixed batches (a mixed image has two), in one process (each rank sees its own share, and rank 0 writes
    the checkpoints)."""
    if data.facts.multilabel or ctx.cfg.data.mix != "none" or dist.active():
        return None
    return Margins(len(data.splits["train"]), ctx.device)


def epochs_in_budget(ctx: Context, data: Prepared, trainable: nn.Module, net: nn.Module, loss_fn, make_optimizer,
                     report_s: float = 15.0, margin: float = 0.05) -> None:
    """trainer.max_minutes: time a few training steps and evaluation batches of this model on this machine, and
    set trainer.max_epochs to the epochs (at most trainer.max_epochs) that fit in what is left of the budget after
    the time spent so far
    (decoding, audit), each epoch's validation, and the end (the test, 3x with model.tta_shift's views; the held-out
    predictions; the mislabeled pass, half with model.tta's views; the report: `report_s` beyond the evaluation
    passes); `margin` for the machine's noise. The config saved with
    the run has that trainer.max_epochs and no max_minutes: re-running it repeats the run. Every step it times
    is undone (weights, the loader's and the global random state), so the run is the one that config gives."""
    cfg, loaders = ctx.cfg, data.loaders
    state, rng = loaders.train.state_dict(), rng_state()
    train_s, eval_s = step_times(trainable, loaders.train, net, loaders.val, loss_fn, make_optimizer, ctx.prec)
    loaders.train.load_state_dict(state)
    set_rng_state(rng)
    per_epoch = (len(loaders.train) * train_s + len(loaders.val) * eval_s) * (1 + margin)
    m = cfg.model  # eval_s is measured with the views of validation (Model.eval_views)
    test_views, one_view = (3 if m.tta and m.tta_shift else 1), (0.5 if m.tta else 1)
    at_end = (test_views * len(loaders.test) + len(loaders.val) + one_view * len(loaders.train_in_order)) * eval_s \
        + report_s
    spent = time.time() - ctx.t_start  # decoding, audit, model, this timing
    fit = dist.share(int((cfg.trainer.max_minutes * 60 - spent - at_end) // per_epoch))
    epochs = min(fit, cfg.trainer.max_epochs)
    if epochs < 1:
        raise ConfigError(f"[config] trainer.max_minutes={cfg.trainer.max_minutes:g} leaves no time for one epoch "
                          f"on this machine ({per_epoch:.0f} s an epoch, {at_end:.0f} s for the test and the "
                          f"report, {spent:.0f} s spent on the data). Use trainer.max_minutes="
                          f"{(spent + at_end + per_epoch) / 60:.1f} or more, or a smaller model.")
    log.info("trainer.max_minutes=%g: %.3f s a training step, %.0f s an epoch with validation on this machine: "
             "%d epochs fit%s (trainer.max_epochs=%d in the saved config)", cfg.trainer.max_minutes, train_s,
             per_epoch, fit, f", at most trainer.max_epochs={cfg.trainer.max_epochs}" if fit > epochs else "", epochs)
    cfg.trainer.max_epochs, cfg.trainer.max_minutes = epochs, None


def _training_images(data: Prepared, n: int = 5000) -> torch.Tensor:
    """`n` training images spread evenly over the split (every class), normalized and not augmented, as the model
    sees them in evaluation: what a layer fitted to the data (model=fastcnn's whitening) is measured on [M02]."""
    ids = data.splits["train"].ids
    picked = [ids[i] for i in range(0, len(ids), max(1, len(ids) // n))][:n]
    return data.eval_pipeline(D.pick_images(data.splits["train"], picked, data.decoding))


def preflight(ctx: Context, data: Prepared, setup: Setup) -> list[Finding]:
    """Checks on the real first batch before any training: inputs [M33], loss at init [M19], gradient reach [M26]."""
    x, y = data.first_batch
    checks = [data.input_check, *init_and_gradient_checks(setup.model, x, y, setup.loss_fn, data.facts.num_classes,
                                                           ctx.prec, ctx.cfg.model.init_from)]
    for c in problems(checks):
        log.warning("preflight: %s", c)
    log.info("[7/9] preflight: %d/%d checks passed", sum(c.passed for c in checks), len(checks))
    return checks


def open_run_dir(ctx: Context, run_dir: Path, overrides, data: Prepared, findings: list[Finding],
                 resumed_at: Optional[int] = None) -> RunDir:
    """Every check has passed: from here on the run directory is written. The snapshot, the splits, the facts,
    the audit, the findings so far (epoch 0) and what the network is fed [M30, M31]. A run resumed at epoch
    `resumed_at` >= 1 keeps them (config.yaml takes a new trainer.max_epochs) and its metrics up to that epoch."""
    run_dir = Path(run_dir)
    if resumed_at:
        write_config(run_dir, ctx.config)
        return RunDir(run_dir, Tracker(run_dir, keep_through=resumed_at))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / MARK, {"run": str(run_dir.resolve()), "started": time.strftime("%Y-%m-%d %H:%M:%S")})  # first
    snapshot(run_dir, ctx.config, overrides, {**environment(ctx.device), "processes": dist.world()})
    write_json(run_dir / "splits.json", D.describe(data.splits))
    write_json(run_dir / "data_facts.json", data.facts.to_dict())
    write_json(run_dir / "audit.json", {"summary": data.audit.summary(), **asdict(data.audit)})
    tracker = Tracker(run_dir, keep_through=None if resumed_at is None else -1)  # resumed before epoch 1: all anew
    if findings:  # audit and preflight findings: epoch 0 of metrics.jsonl and TensorBoard text
        tracker.epoch(0, {}, findings)
    # at once, to check what training sees; the other figures come with the report
    tracker.figure("train/augmented_batch", draw.png(augmented_batch(data)))
    f = data.facts
    tracker.text("data/counts", "\n".join(f"{c}: {n}" for c, n in zip(f.classes, f.counts["train"])))
    return RunDir(run_dir, tracker)


def train(ctx: Context, data: Prepared, setup: Setup, out: RunDir, resume_from: Optional[dict] = None,
          prune=None) -> FitResult:
    """fit() with the monitors and checkpoints of this run; best.pt is chosen on validation [M07, M29].
    `resume_from`: a checkpoint of this run, whose state goes back into everything before training goes on.
    `prune`: mode=tune's pruner (engine.Limits.prune)."""
    tr, c = ctx.cfg.trainer, data.facts.num_classes
    guard = StepGuard(c, ctx.device, setup.lr, setup.model, lr_from_range_test=ctx.cfg.optim.lr == "auto",
                      scaler=ctx.prec.scaler)
    val = data.loaders.val if not dist.active() else D.make_loader(  # the same probe batch on every rank
        data.splits["val"], data.eval_pipeline, batch_size=2 * ctx.cfg.data.batch_size, train=False, seed=0,
        decoding=data.decoding)
    monitors = Monitors(guard, next(iter(val))[0], c,
                        f"{setup.parameters:,} parameters for {len(data.splits['train'])} training images",
                        advice_for(ctx.cfg, setup.custom_model), data.facts.multilabel)
    checkpoints = Checkpointer(out.path / "checkpoints", model=setup.model, data_facts=data.facts.to_dict(),
                               data_spec=data.spec.to_dict(), config=ctx.config, lr=setup.lr,
                               optimizer=setup.optimizer, schedule=setup.schedule,
                               loader=data.loaders.train, monitors=monitors,
                               **({"scaler": ctx.prec.scaler} if ctx.prec.scaler else {}),  # fp16: its scale too
                               **({"average": setup.average} if setup.average else {}),
                               **({"margins": setup.margins} if setup.margins else {}))
    if resume_from:
        checkpoints.restore(resume_from)
    log.info("[8/9] training up to %d epochs -> %s%s", tr.max_epochs, out.path,
             _resumed_at(resume_from, len(data.loaders.train)))
    with StopRequest().installed() as stop:  # SIGINT/SIGTERM: stop cleanly after the current step
        return fit(setup, data.loaders.train, data.loaders.val,
                   Limits(tr.max_epochs, tr.grad_clip, tr.early_stop_patience, tr.progress, tr.checkpoint_minutes,
                          prune),
                   prec=ctx.prec,
                   save=checkpoints.save, track=out.tracker.epoch if out.tracker else _no_track, monitors=monitors,
                   stop=stop, resume=resume_from)


def _resumed_at(ckpt: Optional[dict], steps: int) -> str:
    if not ckpt:
        return ""
    if ckpt.get("sums"):
        return f" (resumed inside epoch {ckpt['epoch'] + 1}, after step {ckpt['sums'][0]['steps']} of {steps})"
    return f" (resumed after epoch {ckpt['epoch']})"


def _no_track(*_, **__) -> None:
    """The ranks other than 0 write no metrics."""


def _source_findings(src, copies: list, d) -> list[Finding]:
    """The source's own: exact copies across its splits, unless unlocked [M06]; a CSV's labels that look like several
    joined in one cell [M13]."""
    found = [] if d.allow_duplicates_across_splits else [D.duplicates_finding(copies)]
    found += [D.joined_labels(src.classes)] if d.name == "csv" and not d.label_delimiter else []
    return [f for f in found if f]


def advice_for(cfg: Config, custom_model: bool) -> dict[str, str]:
    """The detectors' advice (monitors.advice) in this run's settings; a custom nn.Module has no model.* settings."""
    d, o = cfg.data, cfg.optim
    return advice(lr=o.lr, weight_decay=o.weight_decay, grad_clip=cfg.trainer.grad_clip,
                  augment=(d.augment, d.hflip_keeps_label), model=None if custom_model else cfg.model,
                  epochs=cfg.trainer.max_epochs)


def augmented_batch(data: Prepared):
    x, y = data.first_batch
    return draw.image_grid(data.eval_pipeline.normalize.denormalize(x[:32]), label_names(y[:32], data.facts),
                           "the first training batch as the network sees it (augmented, denormalized), with its labels")


def label_names(y: torch.Tensor, facts: D.DataFacts) -> list[str]:
    """Each image's label as text: its class, or its labels joined by "+" (several per image; "(none)")."""
    if facts.multilabel:
        return label_sets(y, facts.classes)
    return [facts.classes[k] for k in D.hard_labels(y).tolist()]


def _fmt(xs) -> str:
    return "[" + ", ".join(f"{x:.4f}" for x in xs) + "]"
