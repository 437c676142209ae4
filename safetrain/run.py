"""The spine: one call per stage (safetrain/stages.py, safetrain/end.py), in the order the data flows.

Under torchrun every process runs this same spine, and the rule that keeps them together is: every process makes
the same collective calls (safetrain/distributed.py: together, from_main, share, gather, same_everywhere, total, and
DDP's own) in the same order. A stage that decides something on rank 0 alone (the run directory, a refusal, a
checkpoint read) does it inside `from_main`/`together`, which hand the decision (or the error) to every process
before any acts on it; a stage that would call a collective on some ranks only hangs the others. The torchrun tests
(tests/test_distributed.py) run this spine in two processes and guard the rule."""
from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch

from safetrain import data as D
from safetrain import distributed as dist
from safetrain.config import Config
from safetrain.data.audit import findings as audit_findings
from safetrain.errors import ConfigError, Interrupted, TrainingStopped
from safetrain.findings import FAIL, Finding, problems, verdict
from safetrain.preflight import overfit_one_batch, table
from safetrain.resume import check as check_resume, resume_point
from safetrain.end import finish, record_stop
from safetrain.engine import Setup
from safetrain.runtime import refuse_used_run_dir
from safetrain.stages import Prepared, RunDir, build_training, open_run_dir, preflight, prepare_data, start, train

__all__ = ["run", "doctor"]
log = logging.getLogger("safetrain")


def run(cfg: Config, run_dir: Path, overrides: list[str] = (), *, dataset=None, model=None,
        resume: bool = False, prune=None) -> dict:
    """Train and test one classifier; returns metrics.json's content. `dataset` (a torch Dataset of (image,
    label)) and `model` (an nn.Module) replace the configured ones and meet the same checks. Every refusal
    happens before anything is written to `run_dir` (Hydra's log aside). `resume`: go on with the run in
    `run_dir` from its last complete epoch (`cfg` is its saved config; safetrain/resume.py). `prune(epoch, metric,
    value)` is told each epoch's validation value (mode=tune's pruner: it may stop the run, errors.Pruned).
    Under torchrun (safetrain/distributed.py) every process calls this with the same `run_dir`; rank 0 writes."""
    dist.init()
    try:
        ctx, data, setup, checks, saved = _prepare(cfg, run_dir, dataset, model, resume)
        if cfg.mode == "doctor":
            return doctor(data, setup, checks)
        findings = ctx.findings + data.findings + problems(checks)
        resumed_at = (saved["epoch"] if saved else 0) if resume else None
        out = dist.together(lambda: open_run_dir(ctx, run_dir, overrides, data, findings, resumed_at)
                            if dist.is_main() else RunDir(Path(run_dir), None))  # nothing was written before this
    except KeyboardInterrupt:  # Ctrl-C while the data and the model were prepared
        raise Interrupted("SIGINT received before training began: nothing of the run was written (what was decoded "
                          "and measured is cached); run the same command again.", signal.SIGINT, resumable=resume) \
            from None
    try:
        result = train(ctx, data, setup, out, saved, prune)
        return finish(ctx, data, setup, out, checks, findings, result).metrics
    except KeyboardInterrupt:  # a second Ctrl-C in training (the first stops it cleanly), or one during the test
        error = Interrupted("SIGINT received after training began: the checkpoints of the complete epochs are "
                            "kept, and resuming goes on from the last one (or writes the test results and the report "
                            "if training was over).", signal.SIGINT)
    except OSError as e:  # the disk filled up during the test and the report
        error = TrainingStopped(f"[io] could not write {e.filename or run_dir} ({e.strerror or e}). The checkpoints "
                                "are complete: free space, and resuming writes the test results and the report.",
                                resumable=True)
    except (TrainingStopped, Interrupted) as e:  # checkpoints of the epochs before stay as they were
        error = e
    if dist.is_main():
        record_stop(ctx, data, out, checks, findings, error)
    raise error


def _prepare(cfg: Config, run_dir: Path, dataset, model, resume: bool):
    """Everything before the run directory is written: (ctx, data, setup, preflight checks, resume checkpoint)."""
    if dist.active() and cfg.mode == "doctor":
        raise ConfigError("[config] mode=doctor checks the data and the model in one process: run it with "
                          "`python -m safetrain`, not torchrun.")
    last = {"ckpt": None}  # rank 0's: the checkpoint the resume check read, for resume_point (read once)
    if resume:
        dist.from_main(lambda: last.update(ckpt=check_resume(run_dir, cfg)))  # same config, not finished
    elif cfg.mode != "doctor":  # the doctor writes nothing
        dist.from_main(lambda: refuse_used_run_dir(run_dir))  # one run, one directory
    ctx = start(cfg)                                      # seed, device, precision; unlocked bounds
    data = dist.together(lambda: prepare_data(ctx, dataset), local_first=True)  # splits, leaks, facts, audit, loaders
    dist.same_everywhere("data facts", data.facts.to_dict(), "Give every process the same data (data.root).")
    saved = dist.from_main(lambda: resume_point(run_dir, last["ckpt"], data.facts.to_dict(),
                                                cfg.trainer.max_epochs)) if resume else None
    setup = build_training(ctx, data, model, saved and saved["lr"])  # model, loss, balance, optimizer, schedule
    return ctx, data, setup, preflight(ctx, data, setup), saved   # preflight: inputs, loss at init, gradient reach


def doctor(data: Prepared, setup: Setup, checks: list[Finding]) -> dict:
    """`mode=doctor`: audit, preflight and overfit-one-batch as a pass/fail table; no training, no files."""
    labels = data.splits["train"].labels  # a small batch with every class in it: one class alone is trivial
    per_class = max(1, 32 // data.facts.num_classes)
    carry = labels.bool() if labels.ndim == 2 else labels[:, None] == labels.unique()[None]  # (N, C) who has k
    picked = torch.cat([carry[:, k].nonzero().squeeze(1)[:per_class] for k in range(carry.shape[1])])
    few = data.splits["train"].subset(picked.unique() if labels.ndim == 2 else picked)  # an image may carry several
    xb, yb = next(iter(D.make_loader(few, data.eval_pipeline, batch_size=len(few), train=False, seed=0,
                                     decoding=data.decoding)))
    found = audit_findings(data.audit) + [f for f in data.findings if f.verdict == FAIL]
    checks = checks + [overfit_one_batch(setup.model, xb, yb, setup.loss_fn, setup.make_optimizer, setup.lr),
                       Finding("M06", "data audit", "data audit: " + ("; ".join(str(f) for f in found) if found else
                               "no copies across splits, no conflicting copies or blank images."),
                               "See the messages." if found else "", "audit", verdict=verdict(found))]
    result = verdict(checks)
    log.info("doctor: %s\n%s", result.upper(), table(checks))
    return {"mode": "doctor", "verdict": result, "passed": result != FAIL, "checks": [c.to_dict() for c in checks]}
