"""report.md: what a person reads after a run: result, warnings with fixes, data, audit, preflight,
per-class metrics, suspected mislabeled samples."""
from __future__ import annotations

from pathlib import Path

from safetrain.preflight import table


def write_report(path: Path, *, facts: dict, audit: dict, checks: list, warnings: list[str],
                 final: dict | None = None, stopped: str | None = None, mislabeled: list[dict] = ()) -> None:
    out = ["# safetrain report", ""]
    if stopped:
        out += ["## Training stopped", "", stopped, ""]
    if final:
        out += ["## Result", "", f"Test accuracy **{final['test_acc']:.4f}**, macro-F1 {final['test_macro_f1']:.4f}, "
                f"balanced accuracy {final['test_balanced_acc']:.4f} (checkpoint of epoch {final['best_epoch']}, "
                f"chosen on validation {final['selection_metric']} = {final['best_val']:.4f}; "
                f"{final['epochs_run']} epochs, {final['wall_time_s']:.0f} s).", ""]
    out += [f"## Warnings ({len(warnings)})", ""] + [f"- {w}" for w in warnings] + (["none"] if not warnings else [])
    counts = facts["counts"]
    out += ["", "## Data facts (training split)", "",
            f"{len(facts['classes'])} classes, {facts['channels']}x{facts['height']}x{facts['width']}, "
            f"mean {[round(v, 4) for v in facts['mean']]}, std {[round(v, 4) for v in facts['std']]}", "",
            "| class | train | val | test |", "|---|---|---|---|"]
    out += [f"| {c} | {counts['train'][i]} | {counts['val'][i]} | {counts['test'][i]} |"
            for i, c in enumerate(facts["classes"])]
    out += ["", "## Audit", ""] + [f"- {k}: {v}" for k, v in audit.items()]
    out += ["", "## Preflight", "", table(checks)]
    if final:
        out += ["", "## Test metrics per class", "", "| class | precision | recall | F1 |", "|---|---|---|---|"]
        out += [f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} |" for c, m in final["per_class"].items()]
    if mislabeled:
        out += ["", "## Suspected mislabeled training samples [M08]", "",
                "The final model gives these labels p < 0.1 and another class p > 0.8 (most confident first; "
                "images in TensorBoard under train/suspected_mislabeled). Some are hard or ambiguous images, "
                "some wrong labels: check them.", "", "| sample | label | looks like | p(label) | p(other) |",
                "|---|---|---|---|---|"]
        out += [f"| {m['id']} | {m['given']} | {m['predicted']} | {m['p_given']} | {m['p_predicted']} |" for m in mislabeled]
    path.write_text("\n".join(out) + "\n")
