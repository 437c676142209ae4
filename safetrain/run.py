"""The spine: one call per stage, one log line per stage (see DESIGN.md's data flow)."""
from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from safetrain import data as D
from safetrain.checkpoint import load_checkpoint, save_checkpoint
from safetrain.config import Config, to_container
from safetrain.engine import Precision, fit, test
from safetrain.errors import ConfigError
from safetrain.losses import build_loss
from safetrain.metrics import build_metrics, selection_metric
from safetrain.models import build_model, count_parameters
from safetrain.optim import LRSchedule, build_optimizer
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


def run(cfg: Config, run_dir: Path, overrides: list[str] = ()) -> dict:
    t_start = time.time()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    d, m, tr = cfg.data, cfg.model, cfg.trainer

    seed_everything(cfg.seed)
    device = resolve_device(tr.device)
    prec = Precision(device, bf16=tr.precision == "bf16" or (tr.precision == "auto" and device.type == "cuda"))
    cache = cache_dir(d.cache_dir)
    snapshot(run_dir, to_container(cfg), overrides, environment(device))
    log.info("[1/7] run dir %s | seed %d | device %s | %s", run_dir, cfg.seed, device, "bf16" if prec.bf16 else "fp32")

    src = D.load_source(d.name, root=d.root, download=d.download, image_size=d.image_size, loader=d.loader,
                        num_workers=d.num_workers, cache_dir=cache, seed=cfg.seed, synthetic=vars(d.synthetic))
    splits = D.make_splits(src, d.val_fraction, d.test_fraction, cfg.seed)
    write_json(run_dir / "splits.json", D.describe(splits))
    log.info("[2/7] data %s: %s", d.name, ", ".join(f"{k} {len(v)}" for k, v in splits.items()))

    stream_kw = dict(shape=src.shape, resize=src.resize, num_workers=d.num_workers)
    facts = D.measure_facts(src.classes, splits, src.shape, src.fingerprint,
                            lambda: D.uint8_batches(splits["train"], **stream_kw), cache)
    write_json(run_dir / "data_facts.json", facts.to_dict())
    log.info("[3/7] data facts: %d classes, %dx%dx%d, mean %s, std %s", facts.num_classes, facts.channels,
             facts.height, facts.width, _fmt(facts.mean), _fmt(facts.std))

    if d.batch_size > len(splits["train"]):
        raise ConfigError(f"[M23] data.batch_size={d.batch_size} is larger than the training split "
                          f"({len(splits['train'])} samples), so an epoch would have no full batch. "
                          f"Use data.batch_size={max(1, len(splits['train']) // 4)} or less.")
    normalize = D.Normalize(facts.mean, facts.std)
    train_loader = D.make_loader(splits["train"], D.BatchPipeline(normalize, device, d.augment, cfg.seed),
                                 batch_size=d.batch_size, train=True, seed=cfg.seed, **stream_kw)
    eval_pipe = D.BatchPipeline(normalize, device)  # deterministic: normalization only [M04]
    val_loader = D.make_loader(splits["val"], eval_pipe, batch_size=2 * d.batch_size, train=False,
                               seed=cfg.seed, **stream_kw)
    log.info("[4/7] pipelines: train augment=%s, batch %d, %d steps/epoch; eval normalize only",
             d.augment, d.batch_size, len(train_loader))

    arch = {k: v for k, v in vars(m).items() if k not in ("name", "activation", "norm", "dropout")}
    model = build_model(m.name, channels=facts.channels, height=facts.height, width=facts.width,
                        num_classes=facts.num_classes, activation=m.activation, norm=m.norm,
                        dropout=m.dropout, **arch).to(device, memory_format=torch.channels_last)
    n_params = count_parameters(model)
    log.info("[5/7] model %s: %s parameters for %d training images, stage sizes %s", m.name, f"{n_params:,}",
             len(splits["train"]), model.sizes)

    loss_fn = build_loss(cfg.task, cfg.loss.name, cfg.loss.label_smoothing)
    selection = selection_metric(cfg.task, facts.counts["train"])
    optimizer = build_optimizer(model, cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay,
                                cfg.optim.momentum, cfg.optim.nesterov)
    s = cfg.sched
    schedule = LRSchedule(optimizer, s.name, mode=selection[1], total_steps=tr.max_epochs * len(train_loader),
                          factor=s.factor, patience=s.patience, min_lr=s.min_lr, warmup_fraction=s.warmup_fraction)
    log.info("[6/7] loss %s, %s lr %.1e wd %.1e, schedule %s on val %s (%s)", type(loss_fn).__name__,
             cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, s.name, *selection)

    tracker = Tracker(run_dir)
    x0, _ = next(iter(train_loader))
    tracker.images("train/augmented_batch", normalize.to(device).denormalize(x0))  # what the net sees [M30]
    tracker.text("data/counts", "\n".join(f"{c}: {n}" for c, n in zip(facts.classes, facts.counts["train"])))
    metrics = build_metrics(facts.num_classes, device)
    config_dict = to_container(cfg)
    fixed = dict(normalization={"mean": facts.mean, "std": facts.std}, data_facts=facts.to_dict(),
                 config=config_dict)

    def save(path, **state):
        save_checkpoint(path, model=model, optimizer=optimizer, schedule=schedule, **fixed, **state)

    result = fit(model, train_loader, val_loader, loss_fn, optimizer, schedule, metrics, prec=prec,
                 max_epochs=tr.max_epochs, grad_clip=tr.grad_clip, early_stop_patience=tr.early_stop_patience,
                 selection=selection, checkpoint_dir=run_dir / "checkpoints", save=save, track=tracker.epoch,
                 progress=tr.progress)

    model.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"])
    test_loader = D.make_loader(splits["test"], eval_pipe, batch_size=2 * d.batch_size, train=False,
                                seed=cfg.seed, **stream_kw)
    t = test(model, test_loader, loss_fn, metrics, prec)
    final = {
        "selection_metric": selection[0], "best_val": result.best["value"], "best_epoch": result.best["epoch"],
        "epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
        "test_acc": t["acc"], "test_balanced_acc": t["balanced_acc"], "test_macro_f1": t["macro_f1"],
        "test_loss": t["loss"], "classes": facts.classes,
        "per_class": {c: {"precision": t["precision"][i], "recall": t["recall"][i], "f1": t["f1"][i]}
                      for i, c in enumerate(facts.classes)},
        "confusion_matrix": t["confusion"], "parameters": n_params, "wall_time_s": time.time() - t_start,
    }
    write_json(run_dir / "metrics.json", final)
    tracker.confusion(torch.tensor(t["confusion"]), facts.classes)
    tracker.hparams(flatten(config_dict), {"test_acc": t["acc"], "test_macro_f1": t["macro_f1"],
                                            "best_val": result.best["value"]})
    tracker.close()
    log.info("[7/7] test (best checkpoint, epoch %d): acc %.4f, macro-F1 %.4f | %.0f s | %s",
             result.best["epoch"], t["acc"], t["macro_f1"], final["wall_time_s"], run_dir)
    return final


def _fmt(xs) -> str:
    return "[" + ", ".join(f"{x:.4f}" for x in xs) + "]"
