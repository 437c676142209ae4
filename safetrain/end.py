"""The end of a run: the best checkpoint on the test split once [M07], the suspected mislabeled samples and the
label-noise estimate [M08], metrics.json, report.md/html, the final TensorBoard entries; or, when training stopped,
why it stopped and how to continue. The run's figures are drawn here."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from safetrain import data as D
from safetrain import distributed as dist
from safetrain import figures as draw
from safetrain.checkpoint import load_checkpoint
from safetrain.data.audit import pair_images
from safetrain.engine import FitResult, Setup, test
from safetrain.errors import Interrupted
from safetrain.findings import Finding
from safetrain.io import save_torch, write_csv, write_json
from safetrain.metrics import average_precisions, per_label, selection_metric
from safetrain.models.layers import hooks
from safetrain.optim import OPTIMIZERS
from safetrain.monitors import (LabelNoise, given_and_other, label_noise, label_noise_finding, predicted_probs,
                                probabilities, rare_label_findings, suspected_mislabeled, suspected_wrong_tags,
                                tag_noise, tag_noise_finding, too_few_held_out, too_weak_for_tag_noise,
                                underfit_not_noise, unfit_for_noise)
from safetrain.report import balance_lines, per_class_table, write_report
from safetrain.resume import command
from safetrain.stages import Context, Prepared, RunDir, advice_for, augmented_batch
from safetrain.tracking import Tracker, flatten, records

log = logging.getLogger("safetrain")


@dataclass
class RunResult:
    metrics: dict  # metrics.json
    findings: list[Finding]



def data_figures(data: Prepared) -> dict:
    """The figures of the data, known before training: class counts per split, the near-duplicate pairs (left: the
    val/test image, right: its training match) and the first training batch as the network sees it."""
    classes = data.facts.classes
    figures = {"class_counts": draw.class_counts(data.facts.counts, classes)}
    pairs = pair_images(data.audit, data.splits)
    if pairs is not None:
        figures["near_duplicates"] = draw.image_grid(*pairs, "near-duplicates across splits: each val/test image, then "
                                                          "its training match")
    figures["augmented_batch"] = augmented_batch(data)
    return figures


def report_figures(data: Prepared, run_dir: Path, selection: str, final: Optional[dict] = None,
                   suspects: list[dict] = (), test_scores: Optional[list[torch.Tensor]] = None) -> dict:
    """Every figure of the report: the data's, the learning curves (from metrics.jsonl, so a stopped or resumed
    run has them too), and with the test results the per-class scores, the confusion matrix and the suspected
    mislabeled samples. Several labels per image: the labels' co-occurrence, and precision-recall curves from the
    test split's (probabilities, labels) `test_scores` instead of a confusion matrix."""
    figures = data_figures(data)
    curves = draw.learning_curves(records(Path(run_dir) / "metrics.jsonl"), selection, final and final["best_epoch"])
    if curves is not None:
        figures["learning_curves"] = curves
    if data.facts.multilabel:
        figures["co_occurrence"] = draw.co_occurrence(data.splits["train"].labels, data.facts.classes)
    if final:
        figures["per_class"] = draw.per_class(final["per_class"])
        if "confusion_matrix" in final:
            figures["confusion_matrix"] = draw.confusion(final["confusion_matrix"], final["classes"])
        if test_scores is not None:
            figures["pr_curves"] = draw.pr_curves(*test_scores, final["classes"], final["thresholds"])
    if suspects:
        images = D.pick_images(data.splits["train"], [m["id"] for m in suspects[:16]], data.decoding)
        figures["suspected_mislabeled"] = draw.image_grid(images, [
            f"{m['id']}\nlabel {m['given']}\nlooks like {m['predicted']} ({float(m['p_predicted']):.2f})"
            for m in suspects[:16]], "suspected mislabeled training samples [M08]: the given label, and what the "
                                     "final model sees")
    return figures


def record_stop(ctx: Context, data: Prepared, out: RunDir, checks: list[Finding], findings: list[Finding],
                error: Exception) -> None:
    """Training stopped on purpose or by a signal: say why in metrics.json, report.md and TensorBoard; the
    checkpoints of the complete epochs stay."""
    key = "interrupted" if isinstance(error, Interrupted) else "stopped"
    why = str(error) + (f" Continue it with: {command(out.path, dist.world())}" if error.resumable else "")
    try:  # best effort: the stop may be a full disk
        write_json(out.path / "metrics.json", {key: why, "wall_time_s": time.time() - ctx.t_start})
        selection = selection_metric(ctx.cfg.task, data.facts.imbalanced)[0]
        write_report(out.path / "report.md", facts=data.facts, audit=data.audit.summary(), checks=checks,
                     findings=findings, stopped=why, figures=report_figures(data, out.path, selection))
        out.tracker.text("warnings", why)
        out.tracker.close()
    except (OSError, KeyboardInterrupt) as e:  # a full disk, or Ctrl-C again
        log.error("could not record the stop in %s (%s)", out.path, type(e).__name__ if not str(e) else e)


def finish(ctx: Context, data: Prepared, setup: Setup, out: RunDir, checks: list[Finding], findings: list[Finding],
           result: FitResult) -> RunResult:
    """The best checkpoint on the test split, once [M07]; suspected mislabeled samples [M08]; metrics.json,
    report.md, TensorBoard; the summary in the log. Under torchrun every rank tests its share of the test split and
    of the held-out predictions; rank 0 writes, and every rank returns its result."""
    best = dist.from_main(lambda: {k: v for k, v in load_checkpoint(out.path / "checkpoints" / "best.pt").items()
                                   if k in ("model", "thresholds")})
    setup.model.load_state_dict(best["model"])
    if "thresholds" in best:  # several labels per image: scored at the thresholds chosen on validation [M39]
        setup.metrics.thresholds = torch.tensor(best["thresholds"])
    hooks(setup.model).eval_views("all")  # the test with every test-time view (model.tta_shift), as predict sees it
    kept: list = []
    t = test(setup.model, data.loaders.test, setup.loss_fn, setup.metrics, ctx.prec, kept)
    hooks(setup.model).eval_views("mirror")
    logits, labels = (torch.cat(part) for part in zip(*kept))
    held_out = [predicted_probs(setup.model, data.loaders.val, ctx.prec, data.facts.multilabel),
                (probabilities(logits, data.facts.multilabel), labels)]
    held_out = [part for parts in dist.gather(held_out) for part in parts]  # every rank's share
    return dist.from_main(lambda: _report(ctx, data, setup, out, checks, findings, result, t, held_out))


def _report(ctx, data, setup, out, checks, findings, result, t, held_out) -> RunResult:
    train_ids, facts = data.splits["train"].ids, data.facts
    hooks(setup.model).eval_views("one")  # what the model makes of the images it trained on: one view is enough
    trained = predicted_probs(setup.model, data.loaders.train_in_order, ctx.prec, facts.multilabel)
    estimated = _label_noise(data, held_out)
    ranked = _suspects(trained, setup.margins, train_ids, facts, out.path / "suspects.csv",
                       None if estimated is None else estimated.given_wrong)
    suspects, n_suspects = ranked[:TOP_SUSPECTS], len(ranked)
    noise = None if estimated is None else (
        tag_noise_finding(estimated.estimate, estimated.off, suspects) if facts.multilabel else
        label_noise_finding(estimated, facts.classes, len(estimated.off), suspects))
    noise = _or_unfit(noise, trained, estimated, facts, findings + result.findings,
                      advice_for(ctx.cfg, setup.custom_model))
    findings = findings + caused_by_lr(explained_by(noise, result.findings), ctx.cfg.optim)
    if facts.multilabel:  # a label too rare to learn, judged on validation [M08]
        val = [torch.cat(part) for part in zip(*held_out[0::2])]  # every rank's share: (probabilities, labels)
        findings += rare_label_findings(facts.classes, facts.counts["train"], average_precisions(*val)[1])
    final = _final_metrics(ctx, data, setup, result, t, findings, suspects, n_suspects)
    final["label_noise_estimate"] = None if estimated is None else estimated.estimate
    final["label_noise_pairs"] = None if estimated is None else estimated.named(facts.classes)
    write_json(out.path / "metrics.json", final)
    test_scores = [torch.cat(part) for part in zip(*held_out[1::2])] if facts.multilabel else None  # (probs, labels)
    figures = write_report(out.path / "report.md", facts=facts, audit=data.audit.summary(), checks=checks,
                           findings=findings, final=final, mislabeled=suspects,
                           figures=report_figures(data, out.path, setup.selection[0], final, suspects, test_scores))
    _final_tensorboard(out.tracker, figures, t, ctx.config, final)
    if data.held_out is not None:  # mode=crossfit: the fold this run left out, written last (a fold is done with it)
        _predict_held_out(ctx, data, setup, out.path / HELD_OUT, noise is not None and noise.kind == "label noise")
    scores = (f"mAP {t['map']:.4f}, macro-F1 {t['macro_f1']:.4f}, micro-F1 {t['micro_f1']:.4f} at the thresholds "
              f"chosen on validation (over all {facts.num_classes} labels); exact label sets {t['exact_match']:.4f}"
              if facts.multilabel else f"acc {t['acc']:.4f}, balanced acc {t['balanced_acc']:.4f}, macro-F1 "
              f"{t['macro_f1']:.4f} (over all {facts.num_classes} classes)")
    log.info("[9/9] test (best checkpoint, epoch %d): %s | %.0f s | %s\n%s\n%s", result.best["epoch"], scores,
             final["wall_time_s"], out.path, "\n".join(balance_lines(final, facts.counts["train"],
                                                                     facts.imbalanced or facts.multilabel)),
             "\n".join(per_class_table(final)))
    log.info("summary: %d warning(s)%s; report: %s", len(findings), "".join(f"\n  {w}" for w in findings),
             out.path / "report.md")
    return RunResult(final, findings)


HELD_OUT, SHOWN = "held_out.pt", 32  # data.fold: the held-out fold's predictions, with the images of the SHOWN
# lowest margins of the given label over the other classes (mode=crossfit draws its grid from them)


def _predict_held_out(ctx: Context, data: Prepared, setup: Setup, path: Path, noise_warned: bool) -> None:
    """data.fold: the kept model's probabilities on the training images this run left out, for mode=crossfit, and
    whether this run warned of label noise [M08] (its estimate, checked against how well the model fit its data)."""
    held = data.held_out
    loader = D.make_loader(held, data.eval_pipeline, batch_size=2 * ctx.cfg.data.batch_size, train=False, seed=0,
                           decoding=data.decoding)
    hooks(setup.model).eval_views("all")  # as predict sees them
    probs, labels = predicted_probs(setup.model, loader, ctx.prec)
    given, other, _ = given_and_other(probs, labels)
    shown = [held.ids[i] for i in (given - other).argsort()[:SHOWN].tolist()]
    save_torch(path, {"classes": data.facts.classes, "ids": held.ids, "probs": probs, "labels": labels,
                      "noise_warned": noise_warned, "shown": shown,
                      "images": D.pick_images(held, shown, data.decoding)})


def _label_noise(data: Prepared, held_out: list[tuple[torch.Tensor, torch.Tensor]]) -> Optional[LabelNoise]:
    """The wrong labels estimated (or None) from the kept model's predictions (probabilities, labels) on the
    validation and test splits, which it never trained on (the checkpoint is already chosen: nothing is selected on
    test here). No estimate from a model no better than chance: its doubts say nothing."""
    probs, labels = torch.cat([p for p, _ in held_out]), torch.cat([y for _, y in held_out])
    if data.facts.multilabel:
        weak = too_weak_for_tag_noise(probs, labels)
        if weak:
            log.info("label noise: not estimated (%s)", weak)
            return None
        estimate, off = tag_noise(probs, labels)
        log.info("label noise: about %.1f%% of each label's tags look wrong on the better-learned half of the labels "
                 "(confident learning per label, kept model)", 100 * estimate)
        return LabelNoise(estimate, estimate, off, [])
    if float((probs.argmax(1) == labels).float().mean()) <= 1.5 / data.facts.num_classes:
        log.info("label noise: not estimated (the model is not clearly better than chance on validation)")
        return None
    few = too_few_held_out(labels, data.facts.num_classes)
    if few:
        log.info("label noise: not estimated (%s)", few)
        return None
    noise = label_noise(probs, labels)
    log.info("label noise: about %.1f%% of the held-out labels look wrong (the labels of the images the kept model is "
             "surest of; %.1f%% spread over every pair of classes)%s", 100 * noise.estimate, 100 * noise.spread,
             noise.in_words(data.facts.classes))
    return noise


TOP_SUSPECTS = 20  # in report.md and metrics.json; suspects.csv has them all


def _suspects(trained, margins, ids: list[str], facts, csv_path: Path, given_wrong=None) -> list[dict]:
    """The suspected mislabeled training samples [M08], most likely first: by their margin over training (AUM:
    monitors.Margins) where it was recorded, else by the final model's doubt. suspects.csv lists them all, then the
    samples only the final model doubts, each with both signals, so either ranking can be read from it."""
    if facts.multilabel:
        ranked = suspected_wrong_tags(*trained, ids, facts.classes)
        log.info("%d training images have a tag the final model doubts [M08]; the top %d are in report.md",
                 len(ranked), min(len(ranked), TOP_SUSPECTS))
        return ranked
    area = None if margins is None else margins.area()
    ranked = suspected_mislabeled(*trained, ids, facts.classes, area, prior=given_wrong)
    doubted = suspected_mislabeled(*trained, ids, facts.classes, area, by_doubt=True) if area is not None else []
    listed = {m["id"] for m in ranked}
    rows = ranked + [m for m in doubted if m["id"] not in listed]
    write_csv(csv_path, rows, ["id", "given", "predicted", "margin", "p_given", "p_predicted"])
    log.info("%d training samples %s [M08]: most likely mislabeled first, the top %d in report.md, all in %s",
             len(ranked), "had another class above their label on average over training (area under the margin < 0; "
             "the first epochs count too, so a short run lists many)" if area is not None
             else "look mislabeled to the final model", min(len(ranked), TOP_SUSPECTS), csv_path.name)
    return ranked


def _or_unfit(noise: Optional[Finding], trained, estimate: Optional[LabelNoise], facts, found: list[Finding],
              fixes: dict) -> Optional[Finding]:
    """The [M08] label-noise finding, or, where the model has not fit its training data, what it is instead: nothing
    more when the monitors already said the run did not learn (a plateau at chance, underfitting, a collapse) or
    ignored an imbalance [M24]; else underfitting [M09] (monitors.unfit_for_noise)."""
    if noise is None or noise.kind != "label noise" or facts.multilabel:
        return noise
    said = [f"[{f.row}] {f.kind}" for f in found if (f.row, f.kind) in NOT_LEARNED]
    if said:
        log.info("label noise: not reported [M08]: the run did not learn, or not all its classes (%s), so its "
                 "confusions are its own", ", ".join(said))
        return None
    unfit = unfit_for_noise(*trained, estimate.estimate, facts.classes, estimate.explained)
    if unfit is None:
        return noise
    log.info("label noise: not reported [M08]: %s", unfit[0])
    return underfit_not_noise(*unfit, fixes)


NOT_LEARNED = {("M28", "plateau"), ("M09", "underfitting"), ("M27", "collapse"),  # no label-noise verdict after these:
               ("M24", "imbalance ignored")}  # the model's rare classes read as its wrong labels


LR_SYMPTOMS = {("M27", "collapse"), ("M28", "plateau"), ("M09", "underfitting"), ("M26", "vanishing"),
               ("M26", "exploding"), ("M20", "dead")}  # what a learning rate far out of range leaves behind


def caused_by_lr(found: list[Finding], optim) -> list[Finding]:
    """A learning rate outside the optimizer's sane range, unlocked by the user (optim.allow_unusual_lr), is the root
    cause of a run that did not learn: the symptoms the monitors saw (collapse, a plateau at chance, underfitting,
    vanishing gradients, dead units) become one [M16] finding that names it, as [M08] takes in the overfitting it
    causes."""
    lo, hi = OPTIMIZERS[optim.name].lr_range
    symptoms = [f for f in found if (f.row, f.kind) in LR_SYMPTOMS]
    if not optim.allow_unusual_lr or not symptoms or not isinstance(optim.lr, (int, float)) or lo <= optim.lr <= hi:
        return found
    side, factor = ("above", optim.lr / hi) if optim.lr > hi else ("below", lo / optim.lr)
    cause = Finding("M16", "learning rate", (
        f"optim.lr={optim.lr:g} is {factor:.0f}x {side} the sane range for {optim.name} ({lo:g} to {hi:g}; unlocked "
        f"with optim.allow_unusual_lr=true), and the run did not learn: "
        + "; ".join(f"[{f.row}] " + f.message.split(" Likely causes")[0].rstrip(".") for f in symptoms)
        + ". The learning rate is the likely cause."),
        "Use a learning rate in the range (optim.lr=auto finds one) without optim.allow_unusual_lr.", "monitor",
        evidence={"lr": optim.lr, "range": [lo, hi], "symptoms": [f"{f.row} {f.kind}" for f in symptoms]})
    log.warning("%s", cause)
    return [f for f in found if f not in symptoms] + [cause]


def explained_by(noise: Optional[Finding], found: list[Finding]) -> list[Finding]:
    """Wrong labels are the root cause of the overfitting they produce (the model memorizes them): with an [M08]
    label-noise finding, an [M09] overfitting finding becomes part of it instead of a second diagnosis."""
    if noise is None:
        return found
    over = [f for f in found if (f.row, f.kind) == ("M09", "overfitting")] if noise.row == "M08" else []
    if over:
        noise.message += f" The validation loss rising from epoch {over[0].evidence['best_val_loss_epoch']} on is " \
                         "the model memorizing those labels."
    log.warning("%s", noise)
    return [f for f in found if f not in over] + [noise]


def _final_metrics(ctx, data, setup, result, t, findings, suspects, n_suspects) -> dict:
    """metrics.json: the run, and the test scores of its task (_test_scores)."""
    return {
        "selection_metric": setup.selection[0], "best_val": result.best["value"], "best_epoch": result.best["epoch"],
        "epochs_run": result.epochs_run, "stopped_early": result.stopped_early, "lr": setup.lr,
        "balance": {"method": data.balance[0], "why": data.balance[1]}, "test_loss": t["loss"],
        "classes": data.facts.classes, **_test_scores(data.facts, t), "parameters": setup.parameters,
        "wall_time_s": time.time() - ctx.t_start, "data_seconds": data.seconds,
        **({"peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(ctx.device) / 2 ** 30, 2)}
           if ctx.device.type == "cuda" else {}),
        "warnings": [str(f) for f in findings], "findings": [f.to_dict() for f in findings],
        "suspected_mislabeled": {"count": n_suspects, "top": suspects},
    }


def _test_scores(facts, t: dict) -> dict:
    """One label per image: accuracy, balanced accuracy, macro-F1, per class, the confusion matrix. Several: mAP, F1
    at the thresholds chosen on validation, per-label scores, cardinality [M39, M40]."""
    classes = facts.classes
    if not facts.multilabel:
        return {"test_acc": t["acc"], "test_balanced_acc": t["balanced_acc"], "test_macro_f1": t["macro_f1"],
                "scored_over": f"Every score is over all {len(classes)} classes: each has validation and test images "
                               "[M25]",
                "per_class": {c: {"precision": t["precision"][i], "recall": t["recall"][i], "f1": t["f1"][i]}
                              for i, c in enumerate(classes)}, "confusion_matrix": t["confusion"]}
    return {"task": "multilabel", "test_map": t["map"], "test_macro_f1": t["macro_f1"],
            "test_micro_f1": t["micro_f1"], "test_exact_match": t["exact_match"], "test_label_acc": t["acc"],
            "thresholds": t["thresholds"],
            "scored_over": f"Every score is over all {len(classes)} labels; F1, precision and recall at one threshold "
                           "per label chosen on validation (the kept epoch's), mAP without thresholds",
            "per_class": per_label(classes, t),
            "cardinality": {"test_labels": t["cardinality"], "predicted": t["predicted_cardinality"]}}


def _final_tensorboard(tracker: Tracker, figures: dict[str, bytes], t, config: dict, final: dict) -> None:
    for name, tag in (("suspected_mislabeled", "train/suspected_mislabeled"), ("per_class", "test/per_class"),
                      ("learning_curves", "train/learning_curves"), ("near_duplicates", "audit/near_duplicates"),
                      ("class_counts", "data/class_counts"), ("pr_curves", "test/pr_curves"),
                      ("co_occurrence", "data/co_occurrence")):
        if name in figures:
            tracker.figure(tag, figures[name])
    if "confusion" in t:
        tracker.confusion(torch.tensor(t["confusion"]), final["classes"], figures["confusion_matrix"])
    headline = {"test_map": t["map"]} if "map" in t else {"test_acc": t["acc"]}
    tracker.hparams(flatten(config), {**headline, "test_macro_f1": t["macro_f1"], "best_val": final["best_val"]})
    tracker.close()
