"""The spine: one call per stage, one log line per stage (see DESIGN.md's data flow)."""
from __future__ import annotations

import logging
import os
from dataclasses import asdict
import random
import time
from pathlib import Path

import numpy as np
import torch

from safetrain import data as D
from safetrain.checkpoint import load_checkpoint, save_checkpoint
from safetrain.config import LR_RANGE, Config, to_container, unlocks
from safetrain.data.audit import cached_audit, pair_images
from safetrain.data.audit import findings as audit_findings
from safetrain.engine import Precision, fit, test
from safetrain.errors import ConfigError
from safetrain.losses import build_loss, resolve_balance
from safetrain.metrics import build_metrics, selection_metric
from safetrain.models import build_model, count_parameters
from safetrain.models.checks import check_model
from safetrain.monitors import StepGuard, TrainingStopped, suspected_mislabeled
from safetrain.preflight import Check, init_and_gradient_checks, input_check, overfit_one_batch, table
from safetrain.report import balance_lines, per_class_table, write_report
from safetrain.optim import LRSchedule, build_optimizer, find_lr
from safetrain.tracking import Tracker, environment, flatten, snapshot, write_json

log = logging.getLogger("safetrain")


def seed_everything(seed: int) -> None:
    """One seed drives splits, init, shuffling and augmentation [M32]; 0 is a valid seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("[config] trainer.device=cuda but no CUDA device is visible. "
                          "Use trainer.device=auto (or cpu).")
    return torch.device(name)


def cache_dir(configured: str | None) -> Path:
    return Path(configured or os.environ.get("SAFETRAIN_CACHE") or Path.home() / ".cache" / "safetrain").expanduser()


def run(cfg: Config, run_dir: Path, overrides: list[str] = (), *, dataset=None, model=None) -> dict:
    """Train and test one classifier. `dataset` (a torch Dataset of (image, label)) and `model`
    (an nn.Module) replace the configured ones and meet the same checks. Every refusal happens
    before anything is written to `run_dir` (Hydra's log aside)."""
    t_start = time.time()
    run_dir = Path(run_dir)
    d, m, tr = cfg.data, cfg.model, cfg.trainer

    seed_everything(cfg.seed)
    device = resolve_device(tr.device)
    prec = Precision(device, bf16=tr.precision == "bf16" or (tr.precision == "auto" and device.type == "cuda"))
    cache = cache_dir(d.cache_dir)
    for warning in unlocks(cfg):
        log.warning("unlocked %s", warning)
    log.info("[1/9] seed %d | device %s | %s", cfg.seed, device, "bf16 autocast" if prec.bf16 else "fp32")

    src = (D.load_dataset(dataset) if dataset is not None else
           D.load_source(d.name, root=d.root, download=d.download, image_size=d.image_size, loader=d.loader,
                         num_workers=d.num_workers, cache_dir=cache, seed=cfg.seed, synthetic=vars(d.synthetic)))
    splits = D.make_splits(src, d.val_fraction, d.test_fraction, cfg.seed, d.min_samples_per_class,
                           d.imbalance_ratio, d.min_eval_per_class)
    D.refuse_duplicates(D.exact_duplicates(splits), d.allow_duplicates_across_splits)
    aud = cached_audit(splits, len(src.classes), src.fingerprint, cache, device)
    warnings = audit_findings(aud) + D.thin_eval_classes(splits, src.classes, d.min_eval_per_class)
    for w in warnings:
        log.warning("%s", w)
    log.info("[2/9] data %s: %s (stratified, seed %d) | audit: %d near-duplicates across splits, %d blank, "
             "imbalance %.1f", "custom Dataset" if dataset is not None else d.name,
             ", ".join(f"{k} {len(v)}" for k, v in splits.items()), cfg.seed, len(aud.near_duplicates),
             len(aud.blank), aud.imbalance_ratio)

    stream_kw = dict(shape=src.shape, resize=src.resize, num_workers=d.num_workers)
    facts = D.measure_facts(src.classes, splits, src.shape, src.fingerprint,
                            lambda: D.uint8_batches(splits["train"], **stream_kw), cache)
    log.info("[3/9] data facts (train split): %d classes, %dx%dx%d, mean %s, std %s | images per class: %s",
             facts.num_classes, facts.channels, facts.height, facts.width, _fmt(facts.mean), _fmt(facts.std),
             ", ".join(f"{c} {n}" for c, n in zip(facts.classes, facts.counts["train"])))

    if d.batch_size > len(splits["train"]):
        raise ConfigError(f"[M23] data.batch_size={d.batch_size} is larger than the training split "
                          f"({len(splits['train'])} samples), so an epoch would have no full batch. "
                          f"Use data.batch_size={max(1, len(splits['train']) // 4)} or less.")
    balance, why = resolve_balance(cfg.loss.balance, facts.counts["train"])
    normalize = D.Normalize(facts.mean, facts.std)  # the one normalization, for every split [M02]

    def make_train_loader(class_balanced: bool):
        return D.make_loader(splits["train"], D.BatchPipeline(normalize, device, d.augment, cfg.seed, d.rotate_degrees),
                             batch_size=d.batch_size, train=True, seed=cfg.seed, class_balanced=class_balanced,
                             **stream_kw)
    train_loader = make_train_loader(balance == "sampler")
    eval_pipe = D.BatchPipeline(normalize, device)  # deterministic: normalization only [M04]
    val_loader = D.make_loader(splits["val"], eval_pipe, batch_size=2 * d.batch_size, train=False,
                               seed=cfg.seed, **stream_kw)
    x0, y0 = next(iter(train_loader))
    # inputs are checked as the split gives them: a class-balanced sampler shifts the class mix on purpose [M33]
    x_natural = x0 if balance != "sampler" else next(iter(make_train_loader(False)))[0]
    D.check_batch(x_natural)
    log.info("[4/9] pipelines: train augment=%s%s, batch %d, %d steps/epoch; eval normalize only", d.augment,
             f" rotate<={d.rotate_degrees:g}deg" if d.rotate_degrees else "", d.batch_size, len(train_loader))

    net = model if model is not None else build_model(**vars(m), channels=facts.channels, height=facts.height,
                                                      width=facts.width, num_classes=facts.num_classes)
    net = net.to(device, memory_format=torch.channels_last)
    check_model(net, x0[:16], facts.num_classes, d.batch_size)
    n_params = count_parameters(net)
    log.info("[5/9] model %s: %s parameters for %d training images%s", "custom nn.Module" if model is not None
             else m.name, f"{n_params:,}", len(splits["train"]),
             f", stage sizes {net.sizes}" if hasattr(net, "sizes") else "")

    loss_fn = build_loss(cfg.task, cfg.loss.name, cfg.loss.label_smoothing, balance,
                         facts.counts["train"]).to(device)
    selection = selection_metric(cfg.task, facts.counts["train"])
    o = cfg.optim

    def make_optimizer(model, lr):
        return build_optimizer(model, o.name, lr, o.weight_decay, o.momentum, o.nesterov)

    lr = o.lr
    if lr == "auto":
        lr = find_lr(net, train_loader, loss_fn, make_optimizer, prec, bounds=LR_RANGE[o.name])
        log.info("optim.lr=auto: the range test chose lr %.2e", lr)
    optimizer = make_optimizer(net, lr)
    s = cfg.sched
    schedule = LRSchedule(optimizer, s.name, mode=selection[1], total_steps=tr.max_epochs * len(train_loader),
                          factor=s.factor, patience=s.patience, min_lr=s.min_lr, warmup_fraction=s.warmup_fraction)
    log.info("[6/9] loss %s, balance %s: %s [M24] | %s lr %.1e (no decay on norm/bias), schedule %s on val %s "
             "(%s)", type(loss_fn).__name__, balance, why, o.name, lr, s.name, *selection)

    checks = [input_check(x_natural), *init_and_gradient_checks(net, x0, y0, loss_fn, facts.num_classes)]
    if cfg.mode == "doctor":
        return doctor(checks, aud, splits, eval_pipe, net, loss_fn, make_optimizer, lr, stream_kw)
    for c in checks:
        if not c.passed:
            warnings.append(str(c))
            log.warning("preflight: %s", c)
    log.info("[7/9] preflight: %d/%d checks passed", sum(c.passed for c in checks), len(checks))

    # Every check has passed: from here on the run directory is written.
    run_dir.mkdir(parents=True, exist_ok=True)
    config_dict = to_container(cfg)
    snapshot(run_dir, config_dict, overrides, environment(device))
    write_json(run_dir / "splits.json", D.describe(splits))
    write_json(run_dir / "data_facts.json", facts.to_dict())
    write_json(run_dir / "audit.json", {"summary": aud.summary(), **asdict(aud)})
    tracker = Tracker(run_dir)
    if warnings:  # audit and preflight findings: epoch 0 of metrics.jsonl and TensorBoard text
        tracker.epoch(0, {}, warnings)
    pairs = pair_images(aud, splits)
    if pairs is not None:  # left: val/test image, right: its training near-duplicate
        tracker.images("audit/near_duplicates", pairs.float() / 255)
    tracker.images("train/augmented_batch", normalize.denormalize(x0))  # what the network is fed [M30]
    tracker.text("data/counts", "\n".join(f"{c}: {n}" for c, n in zip(facts.classes, facts.counts["train"])))
    metrics = build_metrics(facts.num_classes, device)
    fixed = dict(normalization={"mean": facts.mean, "std": facts.std}, data_facts=facts.to_dict(),
                 config=config_dict)

    def save(path, **state):
        save_checkpoint(path, model=net, optimizer=optimizer, schedule=schedule, **fixed, **state)

    report = dict(facts=facts.to_dict(), audit=aud.summary(), checks=checks)
    log.info("[8/9] training up to %d epochs -> %s", tr.max_epochs, run_dir)
    try:
        result = fit(net, train_loader, val_loader, loss_fn, optimizer, schedule, metrics, prec=prec,
                     max_epochs=tr.max_epochs, grad_clip=tr.grad_clip, early_stop_patience=tr.early_stop_patience,
                     selection=selection, checkpoint_dir=run_dir / "checkpoints", save=save, track=tracker.epoch,
                     progress=tr.progress, guard=StepGuard(facts.num_classes, device, lr, net),
                     capacity=f"{n_params:,} parameters for {len(splits['train'])} training images")
    except TrainingStopped as e:  # checkpoints of the epochs before stay as they were
        write_json(run_dir / "metrics.json", {"stopped": str(e), "wall_time_s": time.time() - t_start})
        write_report(run_dir / "report.md", **report, warnings=warnings, stopped=str(e))
        tracker.text("warnings", str(e))
        tracker.close()
        raise

    net.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"])
    test_loader = D.make_loader(splits["test"], eval_pipe, batch_size=2 * d.batch_size, train=False,
                                seed=cfg.seed, **stream_kw)
    t = test(net, test_loader, loss_fn, metrics, prec)
    train_in_order = D.make_loader(splits["train"], eval_pipe, batch_size=2 * d.batch_size, train=False,
                                   seed=cfg.seed, **stream_kw)
    suspects, n_suspects = suspected_mislabeled(net, train_in_order, splits["train"].ids, facts.classes, prec)
    warnings += [str(f) for f in result.findings]
    log.info("%d training samples look mislabeled to the final model [M08]; the top %d are in report.md",
             n_suspects, len(suspects))
    if suspects and splits["train"].images is not None:
        where = {sid: i for i, sid in enumerate(splits["train"].ids)}
        tracker.images("train/suspected_mislabeled", splits["train"].images[[where[m["id"]] for m in suspects[:16]]]
                       .float() / 255)
    final = {
        "selection_metric": selection[0], "best_val": result.best["value"], "best_epoch": result.best["epoch"],
        "epochs_run": result.epochs_run, "stopped_early": result.stopped_early, "lr": lr,
        "balance": {"method": balance, "why": why},
        "test_acc": t["acc"], "test_balanced_acc": t["balanced_acc"], "test_macro_f1": t["macro_f1"],
        "test_loss": t["loss"], "classes": facts.classes,
        "per_class": {c: {"precision": t["precision"][i], "recall": t["recall"][i], "f1": t["f1"][i]}
                      for i, c in enumerate(facts.classes)},
        "confusion_matrix": t["confusion"], "parameters": n_params, "wall_time_s": time.time() - t_start,
        "warnings": warnings, "suspected_mislabeled": {"count": n_suspects, "top": suspects},
    }
    write_json(run_dir / "metrics.json", final)
    write_report(run_dir / "report.md", **report, warnings=warnings, final=final, mislabeled=suspects)
    tracker.confusion(torch.tensor(t["confusion"]), facts.classes)
    tracker.hparams(flatten(config_dict), {"test_acc": t["acc"], "test_macro_f1": t["macro_f1"],
                                            "best_val": result.best["value"]})
    tracker.close()
    log.info("[9/9] test (best checkpoint, epoch %d): acc %.4f, balanced acc %.4f, macro-F1 %.4f | %.0f s | %s\n"
             "%s\n%s", result.best["epoch"], t["acc"], t["balanced_acc"], t["macro_f1"], final["wall_time_s"], run_dir,
             "\n".join(balance_lines(final, facts.counts["train"])), "\n".join(per_class_table(final)))
    log.info("summary: %d warning(s)%s; report: %s", len(warnings), "".join(f"\n  {w}" for w in warnings),
             run_dir / "report.md")
    return final


def doctor(checks, aud, splits, eval_pipe, net, loss_fn, make_optimizer, lr, stream_kw) -> dict:
    """`mode=doctor`: audit, preflight and overfit-one-batch as a pass/fail table; no training, no files."""
    labels = splits["train"].labels  # a small batch with every class in it: one class alone is trivial
    per_class = max(1, 32 // int(labels.max() + 1))
    few = splits["train"].subset(torch.cat([(labels == k).nonzero().squeeze(1)[:per_class]
                                            for k in labels.unique().tolist()]))
    xb, yb = next(iter(D.make_loader(few, eval_pipe, batch_size=len(few), train=False, seed=0, **stream_kw)))
    checks = checks + [overfit_one_batch(net, xb, yb, loss_fn, make_optimizer, lr)]
    found = audit_findings(aud)
    checks.append(Check("data audit", not found, "; ".join(found) if found else
                        f"no near-duplicates, conflicting copies or blank images; imbalance {aud.imbalance_ratio:.1f}",
                        "" if not found else "See the messages.", "M06"))
    log.info("doctor:\n%s", table(checks))
    return {"mode": "doctor", "passed": all(c.passed for c in checks), "checks": [asdict(c) for c in checks]}


def _fmt(xs) -> str:
    return "[" + ", ".join(f"{x:.4f}" for x in xs) + "]"
