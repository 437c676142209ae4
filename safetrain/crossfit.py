"""mode=crossfit: suspected mislabeled training images from out-of-sample predictions (cross-fitting, as cleanlab's
k folds). K runs of the recipe, each trained without one stratified fold of the training split (data.fold=[k, K]; the
same val and test) and predicting that fold with its kept model: every training image is predicted once, by a model
that never saw it. Those predictions give the share of wrong labels as a run estimates it (monitors.label_noise: the
labels of the images the models are surest of, per class), and confident learning flags the images that another
class confidently outweighs; suspects.csv ranks them by their given label's
probability minus the most likely other class's, lowest first (cleanlab's normalized margin: on CIFAR-10 look-alike
swaps twice as precise as the given label's probability alone). It costs about K runs on (K-1)/K of the images each;
on CIFAR-10 subsets its ranking beat a run's own (the margin over training) on noise between look-alike classes and
trailed it on uniform noise (benchmarks/RESULTS.md).

Its folder (runs/NAME/crossfit_<time>, or hydra.run.dir) holds fold_1 ... fold_K (complete runs, each with its
report), plan.json (the recipe and settings), and suspects.csv, suspects.png, crossfit.json. The same command with the
same hydra.run.dir goes on where it stopped: the folds already predicted are kept, a fold killed in training goes on
from its last checkpoint."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from safetrain import figures as draw
from safetrain.config import Config
from safetrain.end import HELD_OUT
from safetrain.io import write_csv, write_json
from safetrain.monitors import NOISE_WARN, given_and_other, label_noise, too_few_held_out
from safetrain.resume import finished, saved_config
from safetrain.run import run

log = logging.getLogger("safetrain")
SHOWN = 16  # suspects drawn in suspects.png


def crossfit(make: Callable[[list[str]], Config], overrides: list[str], out_dir: Path, folds: int) -> dict:
    """The K fold runs (`make(overrides)` composes a run's config), then their predictions merged -> crossfit.json."""
    t0 = time.perf_counter()
    parts = []
    for k in range(folds):
        fold_dir = out_dir / f"fold_{k + 1}"
        if not (fold_dir / HELD_OUT).exists():
            log.info("crossfit: fold %d of %d -> %s", k + 1, folds, fold_dir)
            _fold(make, [*overrides, f"data.fold=[{k},{folds}]"], fold_dir)
        parts.append(torch.load(fold_dir / HELD_OUT, weights_only=True))
    return merge(parts, out_dir, folds, time.perf_counter() - t0)


def _fold(make: Callable[[list[str]], Config], overrides: list[str], fold_dir: Path) -> None:
    """One fold's run: new, or going on from its last checkpoint (a kill in training), or started again (a kill
    after its test, before its predictions were written: nothing left to resume)."""
    if (fold_dir / "checkpoints" / "last.pt").exists() and not finished(fold_dir):
        log.info("crossfit: %s goes on from its last checkpoint", fold_dir)
        run(saved_config(fold_dir), fold_dir, overrides, resume=True)
        return
    if fold_dir.exists():
        log.info("crossfit: %s did not finish; it starts again", fold_dir)
        shutil.rmtree(fold_dir)
    run(make(overrides), fold_dir, overrides)


def merge(parts: list[dict], out_dir: Path, folds: int, seconds: float) -> dict:
    """The folds' held-out predictions as one: the estimate, the ranked suspects (suspects.csv, suspects.png)."""
    classes = parts[0]["classes"]
    ids = [i for p in parts for i in p["ids"]]
    probs, labels = torch.cat([p["probs"] for p in parts]), torch.cat([p["labels"] for p in parts])
    noise = label_noise(probs, labels)
    given, other, pred = given_and_other(probs, labels)
    flagged = noise.off.nonzero().squeeze(1)
    order = flagged[(given - other)[flagged].argsort()].tolist()
    rows = [{"id": ids[i], "given": classes[int(labels[i])], "predicted": classes[int(pred[i])],
             "p_given": round(float(given[i]), 4), "p_predicted": round(float(other[i]), 4)} for i in order]
    write_csv(out_dir / "suspects.csv", rows, ["id", "given", "predicted", "p_given", "p_predicted"])
    _draw(parts, rows[:SHOWN], out_dir / "suspects.png")
    acc = float((probs.argmax(1) == labels).float().mean())
    # [M08] as a run decides it: the fold runs' own checks (their estimate, and whether their models fit their data
    # well enough to tell wrong labels from their own confusions) must have found label noise, most of them
    few = too_few_held_out(labels, len(classes))
    warned = not few and noise.estimate >= NOISE_WARN and 2 * sum(p["noise_warned"] for p in parts) > len(parts)
    out = {"folds": folds, "training_images": len(ids), "held_out_accuracy": round(acc, 4),
           "label_noise_estimate": None if few else round(noise.estimate, 4),
           "label_noise_spread": None if few else round(noise.spread, 4),
           "label_noise_pairs": [] if few else noise.named(classes), "label_noise_warned": warned,
           "suspects": len(rows), "top": rows[:20], "wall_time_s": round(seconds, 1)}
    write_json(out_dir / "crossfit.json", out)
    estimate = (f"label noise not estimated ({few})" if few else
                f"about {100 * noise.estimate:.1f}% of the labels look wrong (the labels of the images the models are "
                f"surest of; {100 * noise.spread:.1f}% spread over every pair of classes){noise.in_words(classes)}"
                + (" [M08]: check the labels of the top suspects" if warned else " (no [M08]: most fold runs did not "
                   "find label noise they could tell from their models' own confusions; their report.md says why)"
                   if noise.estimate >= NOISE_WARN else ""))
    log.info("crossfit: %d training images, each predicted by the model of the fold that left it out (accuracy "
             "%.1f%%): %s; %d suspects, the most likely mislabeled first (the given label's probability least above, "
             "or most below, another's), in %s (the top %d drawn in suspects.png)", len(ids), 100 * acc, estimate,
             len(rows), out_dir / "suspects.csv", min(SHOWN, len(rows)))
    return out


def _draw(parts: list[dict], rows: list[dict], path: Path) -> None:
    """The top suspects with their given and predicted labels (from the images each fold kept of its lowest
    margins)."""
    kept = {i: img for p in parts for i, img in zip(p["shown"], p["images"])}
    rows = [r for r in rows if r["id"] in kept]
    if not rows:
        return
    fig = draw.image_grid(torch.stack([kept[r["id"]] for r in rows]),
                          [f"{r['id']}\ngiven {r['given']} ({r['p_given']:.2f})\nseen {r['predicted']} "
                           f"({r['p_predicted']:.2f})" for r in rows],
                          "suspected mislabeled training images [M08], predicted by models that never saw them")
    draw.save(fig, path)
