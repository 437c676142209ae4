"""report.md: what a person reads after a run: result, warnings by catalogue row with their fixes, data,
audit, preflight, per-class metrics, suspected mislabeled samples."""
from __future__ import annotations

from pathlib import Path

from safetrain.findings import Finding, by_row
from safetrain.io import write_text
from safetrain.preflight import table


def per_class_table(final: dict) -> list[str]:
    """Test precision/recall/F1 per class, as markdown rows (report.md and the end of the log)."""
    return ["| class | precision | recall | F1 |", "|---|---|---|---|"] + [
        f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} |" for c, m in final["per_class"].items()]


def balance_lines(final: dict, train_counts: list[int], imbalanced: bool) -> list[str]:
    """How the run treated class imbalance [M24], and on imbalanced data how the rarest class did [M25]."""
    b = final["balance"]
    out = [f"Class balance: `loss.balance` used {b['method']} ({b['why']}); checkpoint chosen on "
           f"validation {final['selection_metric']}."]
    if imbalanced:
        k = min(range(len(train_counts)), key=train_counts.__getitem__)
        c = final["classes"][k]
        m = final["per_class"][c]
        out.append(f"Rarest training class '{c}' ({train_counts[k]} images): test precision {m['precision']:.3f}, "
                   f"recall {m['recall']:.3f}, F1 {m['f1']:.3f}.")
    return out


def warning_lines(findings: list[Finding]) -> list[str]:
    """The warnings grouped by catalogue row, each with what was seen and the fix."""
    out = [f"## Warnings ({len(findings)})", ""]
    for row, group in by_row(findings).items():
        out += [f"### [{row}]", ""] + [f"- {f.message}" + (f" **Fix:** {f.fix}" if f.fix else "") for f in group] + [""]
    return out + ([] if findings else ["none", ""])


def _result_lines(final: dict, facts) -> list[str]:
    lines = ["## Result", "", f"Test accuracy **{final['test_acc']:.4f}**, macro-F1 {final['test_macro_f1']:.4f}, "
             f"balanced accuracy {final['test_balanced_acc']:.4f} (checkpoint of epoch {final['best_epoch']}, "
             f"chosen on validation {final['selection_metric']} = {final['best_val']:.4f}; "
             f"{final['epochs_run']} epochs, {final['wall_time_s']:.0f} s).", ""]
    return lines + [line for b in balance_lines(final, facts.counts["train"], facts.imbalanced) for line in (b, "")]


def _data_lines(facts, audit: dict) -> list[str]:
    counts = facts.counts
    out = ["## Data facts (training split)", "",
           f"{facts.num_classes} classes, {facts.channels}x{facts.height}x{facts.width}, "
           f"mean {[round(v, 4) for v in facts.mean]}, std {[round(v, 4) for v in facts.std]}, "
           f"imbalance ratio {facts.imbalance_ratio:.1f}", "", "| class | train | val | test |", "|---|---|---|---|"]
    out += [f"| {c} | {counts['train'][i]} | {counts['val'][i]} | {counts['test'][i]} |"
            for i, c in enumerate(facts.classes)]
    left = facts.left_out
    if left.get("skipped") or left.get("bad"):
        out += ["", f"Left out of the folder: {left['skipped']} hidden, non-image or special entries; "
                f"{len(left['bad'])} unusable files (data.bad_files=skip)" + (":" if left["bad"] else ".")]
        out += [f"- {f}: {why}" for f, why in list(left["bad"].items())[:20]]
    return out + ["", "## Audit", ""] + [f"- {k}: {v}" for k, v in audit.items()]


def _mislabeled_lines(mislabeled: list[dict]) -> list[str]:
    if not mislabeled:
        return []
    return ["", "## Suspected mislabeled training samples [M08]", "",
            "The final model gives these labels p < 0.1 and another class p > 0.8 (most confident first; "
            "images in TensorBoard under train/suspected_mislabeled). Some are hard or ambiguous images, "
            "some wrong labels: check them.", "", "| sample | label | looks like | p(label) | p(other) |",
            "|---|---|---|---|---|"] + [
        f"| {m['id']} | {m['given']} | {m['predicted']} | {m['p_given']} | {m['p_predicted']} |" for m in mislabeled]


def write_report(path: Path, *, facts, audit: dict, checks: list[Finding], findings: list[Finding],
                 final: dict | None = None, stopped: str | None = None, mislabeled: list[dict] = ()) -> None:
    """`facts`: the run's DataFacts; `checks`: the preflight checks; `findings`: every warning of the run."""
    out = ["# safetrain report", ""]
    if stopped:
        out += ["## Training stopped", "", stopped, ""]
    if final:
        out += _result_lines(final, facts)
    out += warning_lines(findings) + _data_lines(facts, audit) + ["", "## Preflight", "", table(checks)]
    if final:
        out += ["", "## Test metrics per class", ""] + per_class_table(final)
    write_text(path, "\n".join(out + _mislabeled_lines(list(mislabeled))) + "\n")
