"""report.md and report.html: what a person reads after a run: result, warnings by catalogue row with their fixes,
data, audit, preflight, per-class metrics, suspected mislabeled samples, and the figures of safetrain/figures.py
(PNG files in figures/ that report.md links; inlined in report.html, one file that opens anywhere)."""
from __future__ import annotations

import html
import re
from pathlib import Path

import markdown
from matplotlib.figure import Figure

from safetrain import figures as draw
from safetrain.data.files import skipped_text
from safetrain.findings import Finding, by_row
from safetrain.io import write_text
from safetrain.preflight import table

CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1,h2,h3{line-height:1.2}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.6em}table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left}th{background:#f4f4f4}code{background:#f4f4f4;padding:0 .2em}figure{margin:1em 0}
figure img{max-width:100%;height:auto}figcaption{color:#555;font-size:.9em}
h2+ul li,h3+ul li{margin:.3em 0}"""


def figure(name: str, title: str, figures: dict[str, Figure]) -> list[str]:
    """The markdown lines that show figure `name` (a PNG in figures/), or none if the run has no such figure."""
    return [f"![{title}](figures/{name}.png)", ""] if name in figures else []


def write_with_figures(path: Path, lines: list[str], figures: dict[str, Figure], title: str) -> dict[str, bytes]:
    """`path` (markdown, the figures as PNG files beside it, linked: figures/ for a report.md, NAME_figures/ for
    NAME.md) and the same content as one self-contained HTML file next to it (the figures inlined; no external
    resource). `lines` show figures with `figure()`. Returns the figures as PNG, by name."""
    folder = "figures" if path.name == "report.md" else f"{path.stem}_figures"  # one folder per report
    saved = {name: draw.save(fig, path.parent / folder / f"{name}.png") for name, fig in figures.items()}
    text = ("\n".join(lines) + "\n").replace("](figures/", f"]({folder}/")
    write_text(path, text)
    body = markdown.markdown(text, extensions=["tables"])

    def inline(m: re.Match) -> str:
        return f"<figure>{saved[m['name']][1]}<figcaption>{m['alt']}</figcaption></figure>"

    body = re.sub(rf'<p>\s*<img alt="(?P<alt>[^"]*)" src="{folder}/(?P<name>\w+)\.png"\s*/?>\s*</p>', inline, body)
    write_text(path.with_suffix(".html"), f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                                          f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
                                          f"<body>\n{body}\n</body></html>\n")
    return {name: data for name, (data, _) in saved.items()}


def per_class_table(final: dict) -> list[str]:
    """Test precision/recall/F1 per class, as markdown rows (report.md and the end of the log); several labels per
    image: with each label's threshold (chosen on validation), AP and test positives."""
    if final.get("task") == "multilabel":
        return ["| label | threshold | precision | recall | F1 | AP | positives |", "|---|---|---|---|---|---|---|"] + [
            f"| {c} | {m['threshold']:.2f} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
            f"{'-' if m['ap'] is None else format(m['ap'], '.3f')} | {m['support']} |"
            for c, m in final["per_class"].items()]
    return ["| class | precision | recall | F1 |", "|---|---|---|---|"] + [
        f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} |" for c, m in final["per_class"].items()]


def balance_lines(final: dict, train_counts: list[int], imbalanced: bool) -> list[str]:
    """How the run treated class imbalance [M24], and on imbalanced data how the rarest class did [M25]."""
    b = final["balance"]
    what = "label" if final.get("task") == "multilabel" else "class"
    out = [f"{what.capitalize()} balance: `loss.balance` used {b['method']} ({b['why']}); checkpoint chosen on "
           f"validation {final['selection_metric']}."]
    if imbalanced:
        k = min(range(len(train_counts)), key=train_counts.__getitem__)
        c = final["classes"][k]
        m = final["per_class"][c]
        out.append(f"Rarest training {what} '{c}' ({train_counts[k]} images): test precision {m['precision']:.3f}, "
                   f"recall {m['recall']:.3f}, F1 {m['f1']:.3f}.")
    return out


def warning_lines(findings: list[Finding]) -> list[str]:
    """The warnings grouped by catalogue row, each with what was seen and the fix."""
    out = [f"## Warnings ({len(findings)})", ""]
    for row, group in by_row(findings).items():
        out += [f"### [{row}]", ""] + [f"- {f.message}" + (f" **Fix:** {f.fix}" if f.fix else "") for f in group] + [""]
    return out + ([] if findings else ["none", ""])


def _result_lines(final: dict, facts) -> list[str]:
    if final.get("task") == "multilabel":  # accuracy is never the headline here [M40]
        card = final["cardinality"]
        lines = ["## Result", "", f"Test mAP **{final['test_map']:.4f}** (mean average precision over labels), "
                 f"macro-F1 {final['test_macro_f1']:.4f}, micro-F1 {final['test_micro_f1']:.4f}, exact label sets "
                 f"{final['test_exact_match']:.4f} (checkpoint of epoch {final['best_epoch']}, chosen on validation "
                 f"{final['selection_metric']} = {final['best_val']:.4f}; {final['epochs_run']} epochs, "
                 f"{final['wall_time_s']:.0f} s). {final['scored_over']}. Labels per image: {card['test_labels']:.2f} "
                 f"in the test split, {card['predicted']:.2f} predicted.", ""]
        return lines + [line for b in balance_lines(final, facts.counts["train"], True) for line in (b, "")]
    lines = ["## Result", "", f"Test accuracy **{final['test_acc']:.4f}**, macro-F1 {final['test_macro_f1']:.4f}, "
             f"balanced accuracy {final['test_balanced_acc']:.4f} (checkpoint of epoch {final['best_epoch']}, "
             f"chosen on validation {final['selection_metric']} = {final['best_val']:.4f}; "
             f"{final['epochs_run']} epochs, {final['wall_time_s']:.0f} s). {final['scored_over']}.", ""]
    return lines + [line for b in balance_lines(final, facts.counts["train"], facts.imbalanced) for line in (b, "")]


def _data_lines(facts, audit: dict) -> list[str]:
    counts, what = facts.counts, "label" if facts.multilabel else "class"
    several = f" (several per image; images per split: {facts.images}; the counts are each label's images)" \
        if facts.multilabel else ""
    out = ["## Data facts (training split)", "",
           f"{facts.num_classes} {what}es{several}, {facts.channels}x{facts.height}x{facts.width}, "
           f"mean {[round(v, 4) for v in facts.mean]}, std {[round(v, 4) for v in facts.std]}, "
           f"imbalance ratio {facts.imbalance_ratio:.1f}", "", f"| {what} | train | val | test |", "|---|---|---|---|"]
    out += [f"| {c} | {counts['train'][i]} | {counts['val'][i]} | {counts['test'][i]} |"
            for i, c in enumerate(facts.classes)]
    left = facts.left_out
    if left.get("skipped") or left.get("bad"):
        out += ["", f"Left out of the folder: entries that are not images ({skipped_text(left['skipped'])}); "
                f"{len(left['bad'])} unusable files (data.bad_files=skip)" + (":" if left["bad"] else ".")]
        out += [f"- {f}: {why}" for f, why in list(left["bad"].items())[:20]]
    return out + ["", "## Audit", ""] + [f"- {k}: {v}" for k, v in audit.items()]


def _mislabeled_lines(mislabeled: list[dict], figures: dict[str, Figure]) -> list[str]:
    if not mislabeled:
        return []
    if "doubted" in mislabeled[0]:  # several labels per image
        return ["", "## Suspected wrong tags on training images [M08]", "",
                "The final model finds a given tag absent (p < 0.1) or an absent tag present (p > 0.9); most confident "
                "first. Some are hard images, some missing or extra tags: check them.", "",
                *figure("suspected_mislabeled", "suspected wrong tags: given tags -> what the model sees", figures),
                "| sample | tags | the model sees | doubted | p(doubt) |", "|---|---|---|---|---|"] + [
            f"| {m['id']} | {m['given']} | {m['predicted']} | {m['doubted']} | {m['p_predicted']} |"
            for m in mislabeled]
    margin = "margin" in mislabeled[0]  # ranked by the area under the margin (monitors.Margins)
    how = ("Each had another class above its label on average over training: its margin (the label's logit minus the "
           "largest other, averaged over the steps that trained on it) is below zero, lowest first. A wrong label "
           "stays below zero until the model memorizes it; a hard image with a right label climbs above earlier. "
           "p(label) and p(other) are the final model's. suspects.csv lists them all." if margin else
           "The final model gives these labels p < 0.1 and another class p > 0.8 (most confident first).")
    return ["", "## Suspected mislabeled training samples [M08]", "",
            how + " Some are hard or ambiguous images, some wrong labels: check them.", "",
            *figure("suspected_mislabeled", "suspected mislabeled: given label -> what the model sees", figures),
            f"| sample | label | looks like |{' margin |' if margin else ''} p(label) | p(other) |",
            "|---|---|---|---|---|" + ("---|" if margin else "")] + [
        f"| {m['id']} | {m['given']} | {m['predicted']} |" + (f" {m['margin']} |" if margin else "")
        + f" {m['p_given']} | {m['p_predicted']} |" for m in mislabeled]


def write_report(path: Path, *, facts, audit: dict, checks: list[Finding], findings: list[Finding],
                 final: dict | None = None, stopped: str | None = None, mislabeled: list[dict] = (),
                 figures: dict[str, Figure] | None = None) -> dict[str, bytes]:
    """`facts`: the run's DataFacts; `checks`: the preflight checks; `findings`: every warning of the run;
    `figures`: by name (learning_curves, class_counts, augmented_batch, near_duplicates, per_class,
    confusion_matrix, suspected_mislabeled), those the run has. Writes report.md and report.html; returns the
    figures as PNG, by name."""
    figs = figures or {}
    out = ["# safetrain report", ""]
    if stopped:
        out += ["## Training stopped", "", stopped, ""]
    if final:
        out += _result_lines(final, facts)
    out += warning_lines(findings)
    out += figure("learning_curves", "learning curves (green: the kept epoch; red: warnings, by row)", figs)
    out += _data_lines(facts, audit)
    out += [""] + figure("class_counts", "images per class and split", figs)
    out += figure("co_occurrence", "label co-occurrence in the training split", figs)
    out += figure("near_duplicates", "near-duplicates: each val/test image beside its training match", figs)
    out += figure("augmented_batch", "the first training batch as the network sees it (denormalized)", figs)
    out += ["## Preflight", "", table(checks)]
    if final:
        out += ["", "## Test metrics per class", ""] + per_class_table(final) + [""]
        out += figure("per_class", "precision, recall and F1 per class", figs)
        out += figure("confusion_matrix", "confusion matrix (rows: the true class)", figs)
        out += figure("pr_curves", "precision-recall per label, dots at the chosen thresholds", figs)
    return write_with_figures(path, out + _mislabeled_lines(list(mislabeled), figs), figs, "safetrain report")
