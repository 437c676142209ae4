"""The pictures of a run, drawn with matplotlib from what the run already measured, never inside the training loop:
learning curves, the confusion matrix, per-class scores, class counts, labelled image grids. Each function returns
a matplotlib Figure (no pyplot state); `save` writes it as PNG once: report.md links the file, report.html
inlines it, TensorBoard shows it (tracking.py)."""
from __future__ import annotations

import base64
import html
import io
import logging
import re
import textwrap
import warnings
from pathlib import Path
from typing import Optional

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torchmetrics.functional.classification import binary_average_precision, binary_precision_recall_curve

from safetrain.io import atomic_write

ROW = re.compile(r"\[(M\d+)\]")
TILE = 1.25  # inches per image in a grid (120 px at 96 dpi): an 8x8 image is drawn 15x larger, pixel by pixel
CAPTION = 0.55  # inches above each image for its caption (4 lines)
log = logging.getLogger(__name__)


def learning_curves(records: list[dict], selection: str, best_epoch: Optional[int]) -> Optional[Figure]:
    """Loss (train, val), the selection metric (val, with train accuracy) and the learning rate per epoch; the kept
    epoch marked, and each epoch where a warning was raised marked with its catalogue rows. `records`: the lines of
    metrics.jsonl. None before the first complete epoch."""
    epochs = [r for r in records if "train/loss" in r]
    if not epochs:
        return None
    x = [r["epoch"] for r in epochs]
    fig = Figure(figsize=(12, 3.6))
    fig.subplots_adjust(left=0.06, right=0.985, bottom=0.15, top=0.9, wspace=0.28)  # fixed: half the drawing time
    loss, metric, lr = fig.subplots(1, 3)
    loss.plot(x, [r["train/loss"] for r in epochs], "o-", ms=3, label="train")
    loss.plot(x, [r["val/loss"] for r in epochs], "o-", ms=3, label="val")
    loss.set(title="loss", xlabel="epoch")
    metric.plot(x, [r[f"val/{selection}"] for r in epochs], "o-", ms=3, color="C1", label=f"val {selection}")
    if selection != "acc":
        metric.plot(x, [r["val/acc"] for r in epochs], "o-", ms=3, color="C2", alpha=0.6, label="val acc")
    metric.plot(x, [r["train/acc"] for r in epochs], "o-", ms=3, color="C0", alpha=0.6, label="train acc")
    metric.set(title=f"{selection} (selects the checkpoint)", xlabel="epoch")
    lr.plot(x, [r["lr"] for r in epochs], "o-", ms=3, color="C4")
    lr.set(title="learning rate", xlabel="epoch", yscale="log")
    warned = {}
    for r in records:
        rows = sorted({m for w in r.get("warnings", []) for m in ROW.findall(w)})
        if rows:
            warned.setdefault(r["epoch"], set()).update(rows)
    for ax in (loss, metric, lr):
        if best_epoch:
            ax.axvline(best_epoch, color="green", ls="--", lw=1, label=f"kept: epoch {best_epoch}")
        for e, rows in warned.items():
            ax.axvline(e, color="red", ls=":", lw=1)
            ax.annotate(", ".join(sorted(rows)), (e, 1), xycoords=("data", "axes fraction"), color="red",
                        fontsize=7, rotation=90, ha="right", va="top")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss.legend(fontsize=8)
    metric.legend(fontsize=8)
    return fig


def confusion(matrix: list[list[int]], classes: list[str], title: str = "test") -> Figure:
    """Counts and row-normalized shares (rows: the true class), class names on both axes; numbers written in the
    cells when there are few enough classes to read them."""
    m = torch.tensor(matrix, dtype=torch.float64)
    share = m / m.sum(1, keepdim=True).clamp_min(1)
    k = len(classes)
    side = min(14.0, max(4.0, 0.42 * k + 2))
    fig = Figure(figsize=(2 * side + 1, side + 0.4), layout="constrained")
    fig.suptitle(f"{title} confusion matrix (rows: the true class)")
    small = max(4.0, min(9.0, 180 / max(k, 1)))
    for ax, values, name, fmt in zip(fig.subplots(1, 2), (m, share), ("images", "share of the true class"),
                                     ("{:.0f}", "{:.2f}")):
        im = ax.imshow(values.numpy(), cmap="Blues", vmin=0)
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(k), [tick(c) for c in classes], rotation=90, fontsize=small)
        ax.set_yticks(range(k), [tick(c) for c in classes], fontsize=small)
        ax.set(xlabel="predicted", ylabel="true")
        if k <= 20:
            top = float(values.max()) or 1.0
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, fmt.format(float(values[i, j])), ha="center", va="center", fontsize=small,
                            color="white" if values[i, j] > 0.6 * top else "black")
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def per_class(per_class: dict[str, dict], title: str = "test") -> Figure:
    """Precision, recall and F1 per class as horizontal bars (the weakest classes stand out)."""
    classes = list(per_class)
    k = len(classes)
    fig = Figure(figsize=(8, 1 + k * (0.45 if k <= 20 else 0.18)), layout="constrained")
    ax = fig.subplots()
    h = 0.27
    for i, (key, color) in enumerate((("precision", "C0"), ("recall", "C1"), ("f1", "C2"))):
        ax.barh([j + (i - 1) * h for j in range(k)], [per_class[c][key] for c in classes], height=h, color=color,
                label=key)
    ax.set_yticks(range(k), [tick(c) for c in classes], fontsize=max(5.0, min(9.0, 200 / max(k, 1))))
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), title=f"{title}: precision, recall, F1 per class")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="x", alpha=0.3)
    return fig


def class_counts(counts: dict[str, list[int]], classes: list[str]) -> Figure:
    """Images per class in each split (imbalance and thin evaluation classes show at a glance)."""
    k = len(classes)
    fig = Figure(figsize=(min(16.0, max(6.0, 0.45 * k + 2)), 3.6), layout="constrained")
    ax = fig.subplots()
    w = 0.8 / max(1, len(counts))
    for i, (split, n) in enumerate(counts.items()):
        ax.bar([j + (i - (len(counts) - 1) / 2) * w for j in range(k)], n, width=w, label=split)
    ax.set_xticks(range(k), [tick(c) for c in classes], rotation=45 if k > 6 else 0, ha="right" if k > 6 else "center",
                  fontsize=max(5.0, min(9.0, 220 / max(k, 1))))
    ax.set(ylabel="images", title="images per class and split")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def image_grid(images: torch.Tensor, captions: list[str], title: str, columns: int = 8) -> Figure:
    """(N, C, H, W) images (uint8, or floats in [0, 1]) drawn pixel by pixel at TILE inches each (small images are
    upscaled so they can be judged by eye), each with its caption (lines split at newlines, then wrapped). One
    mosaic in one axes: a grid of 32 axes took ten times as long to draw."""
    images = images.detach().cpu()
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    n, _, h, w = images.shape
    cols = min(columns, n)
    rows = -(-n // cols)
    cap = round(CAPTION / TILE * h)  # the caption band above each image, in image pixels
    pad = max(1, w // 8)
    mosaic = torch.ones(rows * (cap + h + pad), cols * (w + pad), 3)
    for i, img in enumerate(images):
        y, x = (i // cols) * (cap + h + pad) + cap, (i % cols) * (w + pad)
        mosaic[y:y + h, x:x + w] = img.expand(3, h, w).permute(1, 2, 0)
    head = textwrap.fill(title, max(30, int(cols * TILE * 11)))
    band = 0.15 + 0.2 * (head.count("\n") + 1)  # inches above the mosaic for the title's lines (a narrow grid wraps it)
    fig = Figure(figsize=(cols * TILE * (w + pad) / w, rows * TILE * (cap + h + pad) / w + band))
    ax = fig.add_axes((0, 0, 1, 1 - band / fig.get_figheight()))
    ax.imshow(mosaic.numpy(), interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    for i, text in enumerate(captions[:n]):
        lines = [part for line in text.split("\n") for part in textwrap.wrap(line, 24)]
        y, x = (i // cols) * (cap + h + pad) + cap, (i % cols) * (w + pad)
        ax.text(x + w / 2, y - 0.5, "\n".join(lines[:4]), ha="center", va="bottom", fontsize=7)
    fig.suptitle(head, fontsize=10, y=1 - 0.06 / fig.get_figheight())
    return fig


def png(fig: Figure) -> bytes:
    """The figure as PNG. Characters its font cannot draw (class names in Chinese, an emoji) show as boxes: said once
    in the log instead of a matplotlib warning per figure; other warnings pass through."""
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(buf, format="png", dpi=96)
    glyphs = (re.search(r"Glyph (\d+) .*missing from font", str(w.message)) for w in caught)
    missing = {chr(int(m.group(1))) for m in glyphs if m}
    for w in caught:
        if "missing from font" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if missing - _UNDRAWN:
        _UNDRAWN.update(missing)
        log.info("figures: the font has no glyph for %s; those characters show as boxes in the figures (the report's "
                 "tables spell them)", ", ".join(sorted(missing)))
    return buf.getvalue()


_UNDRAWN: set[str] = set()  # characters already said to be missing from the figures' font


def tick(name: str, most: int = 28) -> str:
    """A class name for an axis: long ones shortened (a 100-character name collapsed the confusion matrix)."""
    return name if len(name) <= most else name[:most - 1] + "…"


def save(fig: Figure, path: Path) -> tuple[bytes, str]:
    """Write `fig` to `path` as PNG (atomically) -> (the PNG, an <img> element holding it, for report.html). One
    drawing per figure: an SVG copy as well doubled the time every run spends on its report."""
    data = png(fig)
    atomic_write(path, lambda f: f.write(data))
    inline = base64.b64encode(data).decode()
    return data, f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{inline}">'


def pr_curves(probs: torch.Tensor, targets: torch.Tensor, classes: list[str], thresholds: list[float],
              title: str = "test") -> Figure:
    """Several labels per image: each label's precision-recall curve (the labels with positives), its AP in the
    legend and a dot where its threshold chosen on validation puts it."""
    fig = Figure(figsize=(9, 6), layout="constrained")
    ax = fig.subplots()
    for k, c in enumerate(classes):
        y = targets[:, k].int()
        if y.sum() == 0:
            continue
        p, r, _ = binary_precision_recall_curve(probs[:, k], y)
        line, = ax.plot(r.numpy(), p.numpy(), lw=1.2,
                        label=f"{tick(c)} (AP {float(binary_average_precision(probs[:, k], y)):.2f})")
        hit = probs[:, k] >= thresholds[k]
        tp = float((hit & y.bool()).sum())
        ax.plot(tp / float(y.sum()), tp / max(1.0, float(hit.sum())), "o", color=line.get_color(), ms=5)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"{title}: precision-recall per label (dots: the thresholds chosen on validation)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    return fig


def co_occurrence(targets: torch.Tensor, classes: list[str], title: str = "training split") -> Figure:
    """Several labels per image: of the images with label i (row), the share that also carry label j; the
    diagonal is each label's share of all images."""
    y = targets.double()
    both = y.T @ y
    share = both / both.diagonal()[:, None].clamp_min(1)
    share.fill_diagonal_(0)
    share += torch.diag(y.mean(0))
    k = len(classes)
    side = min(14.0, max(4.0, 0.42 * k + 2))
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    small = max(4.0, min(9.0, 180 / max(k, 1)))
    ax.set_xticks(range(k), [tick(c) for c in classes], rotation=90, fontsize=small)
    ax.set_yticks(range(k), [tick(c) for c in classes], fontsize=small)
    ax.set(title=f"{title}: label co-occurrence (row i: share of images with label i that also have label j; "
                 "diagonal: share of all images)")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{float(share[i, j]):.2f}", ha="center", va="center", fontsize=small,
                        color="white" if share[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def search_history(trials: list[dict], metric: str, importances: dict[str, float]) -> Optional[Figure]:
    """mode=tune: each trial's value in order with the best so far (pruned trials at their last epoch's value),
    every trial's validation curve per epoch (pruned ones end early), and each searched setting's importance.
    `trials`: tune.rows(). None before any trial reported an epoch."""
    reported = [t for t in trials if t["history"]]
    if not reported:
        return None
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    order, curves, weight = fig.subplots(1, 3, width_ratios=(1.2, 1.2, 1))
    done = [t for t in reported if t["state"] == "complete"]
    pruned = [t for t in reported if t["state"] == "pruned"]
    order.plot([t["trial"] for t in done], [t["value"] for t in done], "o", color="C0", label="complete")
    order.plot([t["trial"] for t in pruned], [t["history"][t["last_epoch"]] for t in pruned], "x", color="C3",
               label="pruned (last epoch)")
    if done:
        best, xs, ys = -float("inf"), [], []
        for t in sorted(done, key=lambda t: t["trial"]):
            best = max(best, t["value"])
            xs.append(t["trial"])
            ys.append(best)
        last = max(t["trial"] for t in trials)
        order.step(xs + [last], ys + [best], where="post", color="C2", label="best so far")
    order.set(title=f"val {metric} per trial", xlabel="trial")
    order.xaxis.set_major_locator(MaxNLocator(integer=True))
    order.legend(fontsize=8)
    for t in reported:
        epochs = sorted(t["history"])
        color = "C3" if t["state"] == "pruned" else "C0" if t["state"] == "complete" else "grey"
        curves.plot(epochs, [t["history"][e] for e in epochs], "-", lw=1, alpha=0.8, color=color)
        if t["state"] == "pruned":  # where the search stopped it
            curves.plot(epochs[-1], t["history"][epochs[-1]], "x", color=color)
    curves.set(title=f"val {metric} per epoch (red: pruned)", xlabel="epoch")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    if importances:
        names = list(importances)[::-1]
        weight.barh(names, [importances[n] for n in names], color="C4")
        weight.set(xlim=(0, 1), title="importance (share of the variation)")
    else:
        weight.axis("off")
        weight.text(0.5, 0.5, "importance: too few complete trials", ha="center", va="center", fontsize=9)
    for ax in (order, curves):
        ax.grid(alpha=0.3)
    return fig
