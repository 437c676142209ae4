"""After training: predict on images, evaluate on a labelled folder (safetrain/export.py ships the model).

Images go through the code training used (data/files.py, data/sources.py), driven by the data facts stored in the
checkpoint: the same channel conversion, 16-bit scaling, transparency rule and resize, and the normalization inside
the model (checkpoint.classifier), so inference cannot preprocess differently from training [M01, M02]."""
from __future__ import annotations

import csv
import glob
import io
import logging
import os
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from safetrain import data as D
from safetrain.checkpoint import classifier, load_checkpoint
from safetrain.config import AfterTrainingConfig, PredictConfig
from safetrain.data.audit import MIN_SIDE, search
from safetrain.data.files import (GRAY_MODES, IMAGE_EXTENSIONS, Fit, header, hidden, list_images, pixel_limit,
                                  refuse_non_utf8_names)
from safetrain.data.sources import (SPLIT_NAMES, TABLES, CheckedFiles, Columns, ImageSet, file_loader,
                                    label_sets, label_tensor, list_csv)
from safetrain.errors import ConfigError, DataError, SafetrainError
from safetrain.io import cache_root, write_json, write_text
from safetrain.metrics import build_metrics, build_multilabel_metrics, per_label, to_plain
from safetrain import figures as draw
from safetrain.report import figure, per_class_table, write_with_figures
from safetrain.runtime import resolve_device

log = logging.getLogger("safetrain")


@dataclass
class Trained:
    """A trained model as inference needs it."""
    model: nn.Module  # uint8 (N, C, H, W) in, logits out; normalization inside; eval mode, on `device`
    facts: dict  # the checkpoint's data facts: classes, channels, height, width, mean, std
    ckpt: dict
    path: Path
    run_dir: Path
    device: torch.device


def load_trained(checkpoint: str, device: str = "auto") -> Trained:
    """A checkpoint (or a run directory: its best.pt) -> Trained; a clear error for anything else."""
    path = _checkpoint_file(checkpoint)
    try:
        ckpt = load_checkpoint(path)
    except ValueError as e:  # a plain state dict, another safetrain version's format
        raise ConfigError(f"[config] predict.checkpoint={checkpoint}: {e}") from None
    except Exception as e:  # noqa: BLE001  not a checkpoint at all (another tool's file, a text file, a pickle)
        raise ConfigError(f"[config] predict.checkpoint={checkpoint} is not a safetrain checkpoint "
                          f"({type(e).__name__}: {str(e)[:120]}). Point it at RUN_DIR/checkpoints/best.pt.") from None
    pixel_limit((ckpt.get("data_spec") or {}).get("max_image_pixels"))  # the limit the run was trained with
    dev = resolve_device(device, "predict.device")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return Trained(classifier(ckpt).to(dev, memory_format=torch.channels_last), ckpt["data_facts"], ckpt, path, run_dir,
                   dev)


def _checkpoint_file(checkpoint: str) -> Path:
    """predict.checkpoint as given: a checkpoint, a run directory or its checkpoints/ (best.pt); for a folder of
    runs, or another file of a run, the setting to give instead."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        found = next((f for f in (path / "checkpoints" / "best.pt", path / "best.pt") if f.is_file()), None)
        if found:
            return found
        runs = sorted(path.glob("*/checkpoints/best.pt"), key=lambda f: f.stat().st_mtime)
        beside = sorted(path.parent.glob("*/checkpoints/best.pt"), key=lambda f: f.stat().st_mtime)
        raise ConfigError(f"[config] predict.checkpoint={checkpoint}: no checkpoints/best.pt in that folder. " + (
            f"It holds {len(runs)} run(s); the newest: predict.checkpoint={runs[-1].parent.parent}" if runs else
            f"It is a run that ended before its first checkpoint{_last_error(path)}. " + (
                f"The newest run beside it with one: predict.checkpoint={beside[-1].parent.parent}" if beside
                else "Point it at a run that trained.") if (path / ".hydra").is_dir() or any(path.glob("*.log"))
            else "Point it at a run directory (or its checkpoints/best.pt)."))
    if path.is_file() and path.suffix != ".pt":  # config.yaml, metrics.json, ... of a run
        home = next((d for d in path.parents if (d / "checkpoints" / "best.pt").is_file()), None)
        if home:
            raise ConfigError(f"[config] predict.checkpoint={checkpoint} is a file of the run in {home}, not a "
                              f"checkpoint: predict.checkpoint={home}")
    if not path.is_file():
        raise ConfigError(f"[config] predict.checkpoint={checkpoint}: {path} does not exist. Point it at a run's "
                          "checkpoints/best.pt (or at the run directory).")
    return path


def _last_error(run: Path) -> str:
    """' (its log ends: DataError: ...)' for a run directory whose log holds an error, else ''."""
    lines = [ln for f in run.glob("*.log") for ln in f.read_text(errors="replace").splitlines() if "[ERROR]" in ln]
    return f" (its log: {lines[-1].split('[ERROR] - ', 1)[-1][:200]})" if lines else ""


def input_fit(trained: Trained) -> Fit:
    """How training brought images to the model's size (data.resize; checkpoints without a data spec squashed)."""
    return Fit((trained.facts["height"], trained.facts["width"]), (trained.ckpt.get("data_spec") or {}).get(
        "resize", "squash"))


WILDCARDS = "*?["


def _pattern(where: str) -> bool:
    """predict.input is a pattern (photos/*.jpg, shots/**/*.png): the shell leaves it whole after `predict.input=`."""
    return any(c in where for c in WILDCARDS) and not Path(where).expanduser().exists()


def input_root(where: str) -> Path:
    """What the predicted files' names are relative to: the folder given, or a pattern's folder before its first
    wildcard (a single file is named by its own name)."""
    path = Path(where).expanduser()
    if _pattern(where):
        first = next(i for i, part in enumerate(path.parts) if any(c in part for c in WILDCARDS))
        return Path(*path.parts[:first] or ["."])
    return path


def image_files(where: str) -> list[Path]:
    """An image file, every image under a folder (recursive; hidden and non-image entries skipped), or the images
    a pattern matches (`**` for any depth)."""
    path = Path(where).expanduser()
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"[data] predict.input={where} is not an image ({', '.join(IMAGE_EXTENSIONS)}).")
        return [path]
    if "://" in where:
        raise DataError(f"[data] predict.input={where} is an address: safetrain reads files on this machine. "
                        f"Download it first (for example `curl -O {where}`) and give the file or its folder.")
    if _pattern(where):
        matched = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        files = [m for m in matched if m.is_file() and m.suffix.lower() in IMAGE_EXTENSIONS and not hidden(m.name)]
        if not files:
            raise DataError(f"[data] predict.input={where} matches no image ({len(matched)} entries matched; images "
                            f"are {', '.join(IMAGE_EXTENSIONS)}). Check the pattern, or give a folder.")
        refuse_non_utf8_names(files, input_root(where))
        return files
    if not path.is_dir():
        raise DataError(f"[data] predict.input={where} does not exist. Give an image file or a folder of images.")
    files, _ = list_images(path)
    refuse_non_utf8_names(files, path)
    if not files:
        raise DataError(f"[data] predict.input={where} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return files


@torch.no_grad()
def logits_of(trained: Trained, files: list[Path], p: PredictConfig, keep_images: bool = False):
    """(logits (N, C) on the CPU, NaN rows for files that cannot be decoded; {index: why} of those; how many were
    resized or had their channels converted by the training rule; with `keep_images`, the decoded uint8 images of
    the others, in order)."""
    f = trained.facts
    c, size = f["channels"], (f["height"], f["width"])
    heads = [header(x) for x in files]
    bad = {i: h for i, h in enumerate(heads) if isinstance(h, str)}
    good = [i for i in range(len(files)) if i not in bad]
    out = torch.full((len(files), len(f["classes"])), float("nan"))
    kept = {}
    loader = file_loader(CheckedFiles([str(files[i]) for i in good], c, input_fit(trained)), batch_size=p.batch_size,
                         num_workers=p.num_workers, collate_fn=_stack_decoded)
    for rows, x, failed in tqdm(loader, desc="predict", disable=not p.progress or None, dynamic_ncols=True):
        bad.update({good[i]: why for i, why in failed.items()})
        if rows:
            rows = [good[i] for i in rows]
            x = x.to(trained.device, memory_format=torch.channels_last)  # as in training: 1.5-2x faster on CPUs
            out[rows] = trained.model(x).float().cpu()
            kept.update(zip(rows, x.cpu()) if keep_images else [])
    images = torch.stack([kept[i] for i in sorted(kept)]) if kept else None
    decoded = [i for i in good if i not in bad]
    changed = {"resized": sum(1 for i in decoded if tuple(heads[i][1]) != size),
               "channels_converted": sum(1 for i in decoded if (heads[i][0] in GRAY_MODES) != (c == 1))}
    return out, dict(sorted(bad.items())), changed, *([images] if keep_images else [])


def _stack_decoded(items):
    """In the worker: (indices decoded, their (B, C, H, W) batch, {index: why} of the others)."""
    ok = [(i, img) for i, img in items if not isinstance(img, str)]
    return [i for i, _ in ok], torch.stack([img for _, img in ok]) if ok else None, {
        i: why for i, why in items if isinstance(why, str)}


def predict(cfg: AfterTrainingConfig) -> Path:
    """`mode=predict`: a CSV with each file's class, its probability and the top-k; a one-line summary."""
    p = cfg.predict
    trained = load_trained(p.checkpoint, p.device)
    files = image_files(p.input)
    root = input_root(p.input)
    logits, bad, changed = logits_of(trained, files, p)
    if trained.ckpt.get("thresholds"):
        return _predict_label_sets(trained, p, files, root, logits, bad, changed)
    classes, k = trained.facts["classes"], min(p.topk, len(trained.facts["classes"]))
    top_p, top_i = logits.softmax(1).topk(k, dim=1)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "predicted", "probability"] + [f"{n}{j}" for j in range(1, k + 1) for n in ("top", "p")]
               + ["error"])
    for i, path in enumerate(files):
        name = str(path.relative_to(root)) if root.is_dir() else path.name
        if i in bad:
            w.writerow([name, "", ""] + [""] * 2 * k + [bad[i]])
        else:
            ranked = [v for j in range(k) for v in (classes[top_i[i, j]], f"{top_p[i, j]:.6f}")]
            w.writerow([name, classes[top_i[i, 0]], f"{top_p[i, 0]:.6f}"] + ranked + [""])
    out = Path(p.output) if p.output else trained.run_dir / "predictions" / f"{_stem(p.input)}.csv"
    write_text(out, buf.getvalue())
    decoded = [i for i in range(len(files)) if i not in bad]
    counts = torch.bincount(top_i[decoded, 0], minlength=len(classes))
    figures = _prediction_figures(trained, files, decoded, top_p[:, 0], top_i[:, 0], counts)
    write_with_figures(out.with_suffix(".md"), [
        "# safetrain predictions", "", f"Checkpoint `{trained.path}` on `{p.input}`: {len(decoded)} images predicted, "
        f"{len(bad)} could not be decoded (listed in `{out.name}`).", "",
        *figure("class_counts", "predicted classes", figures),
        *figure("least_confident", "the least confident predictions", figures)], figures, "safetrain predictions")
    log.info("predicted %d images with %s: %s | %d could not be decoded%s | %d resized to %dx%d, %d converted to "
             "%s (the training rule) -> %s", len(files) - len(bad), trained.path,
             ", ".join(f"{c} {n}" for c, n in zip(classes, counts.tolist())), len(bad),
             "".join(f"\n  {files[i]}: {why}" for i, why in list(bad.items())[:20]), changed["resized"],
             trained.facts["height"], trained.facts["width"], changed["channels_converted"],
             "grayscale" if trained.facts["channels"] == 1 else "RGB", out)
    return out


def _predict_label_sets(trained: Trained, p: PredictConfig, files: list[Path], root: Path, logits: torch.Tensor,
                        bad: dict, changed: dict) -> Path:
    """predict for a model of several labels per image: each file's label set (the labels whose probability reaches
    their threshold, chosen on validation [M39]) and every label's probability."""
    classes, thresholds = trained.facts["classes"], torch.tensor(trained.ckpt["thresholds"])
    probs = logits.sigmoid()
    chosen = probs >= thresholds
    sets = label_sets(chosen, classes, joiner="|", empty="")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "predicted"] + [f"p_{c}" for c in classes] + ["error"])
    for i, path in enumerate(files):
        name = str(path.relative_to(root)) if root.is_dir() else path.name
        if i in bad:
            w.writerow([name, ""] + [""] * len(classes) + [bad[i]])
        else:
            w.writerow([name, sets[i]] + [f"{float(v):.6f}" for v in probs[i]] + [""])
    out = Path(p.output) if p.output else trained.run_dir / "predictions" / f"{_stem(p.input)}.csv"
    write_text(out, buf.getvalue())
    decoded = [i for i in range(len(files)) if i not in bad]
    counts = chosen[decoded].sum(0).long()
    margin = (probs - thresholds).abs().min(1).values  # how close the nearest label is to its threshold
    figures = _prediction_figures(trained, files, decoded, 1 - margin, None, counts, [s or "(none)" for s in sets])
    per_image = float(chosen[decoded].sum(1).float().mean()) if decoded else 0.0
    write_with_figures(out.with_suffix(".md"), [
        "# safetrain predictions", "", f"Checkpoint `{trained.path}` on `{p.input}`: {len(decoded)} images predicted, "
        f"{len(bad)} could not be decoded (listed in `{out.name}`). Several labels per image: a label is predicted "
        f"where its probability reaches its threshold (chosen on validation: "
        f"{', '.join(f'{c} {t:.2f}' for c, t in zip(classes, thresholds.tolist()))}); {per_image:.2f} labels per "
        "image.", "",
        *figure("class_counts", "images predicted per label", figures),
        *figure("least_confident", "the predictions nearest a threshold", figures)], figures, "safetrain predictions")
    log.info("predicted the label sets of %d images with %s: %s | %d could not be decoded%s | %d resized to %dx%d "
             "-> %s", len(decoded), trained.path, ", ".join(f"{c} {n}" for c, n in zip(classes, counts.tolist())),
             len(bad), "".join(f"\n  {files[i]}: {why}" for i, why in list(bad.items())[:20]), changed["resized"],
             trained.facts["height"], trained.facts["width"], out)
    return out


def _prediction_figures(trained: Trained, files: list[Path], decoded: list[int], p: torch.Tensor, pred, counts,
                        names: list[str] | None = None) -> dict:
    """How many images each class got, and the 32 least confident predictions as a labelled grid (decoded again:
    a prediction run does not keep its images). `names`: each image's prediction as text (else its class)."""
    f, classes = trained.facts, trained.facts["classes"]
    names = names or [classes[k] for k in pred.tolist()]
    figures = {"class_counts": draw.class_counts({"predicted": counts.tolist()}, classes)}
    doubt = sorted(decoded, key=lambda i: float(p[i]))[:32]
    if doubt:
        again = CheckedFiles([str(files[i]) for i in doubt], f["channels"], input_fit(trained))
        figures["least_confident"] = draw.image_grid(torch.stack([again[j][1] for j in range(len(doubt))]), [
            f"{files[i].name}\n{names[i]} ({float(p[i]):.2f})" for i in doubt],
            "the least confident predictions: the prediction and its confidence")
    return figures


def _stem(where: str) -> str:
    return f"{input_root(where).resolve().name}-{datetime.now():%Y-%m-%d_%H-%M-%S-%f}"  # never the same twice


def labelled_files(folder: str, classes: list[str]) -> tuple[list[Path], torch.Tensor, list[str]]:
    """(files, labels by the training classes' order, training classes missing here) of a folder per class."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"[data] predict.input={folder} is not a folder. mode=evaluate needs one subfolder per class "
                        "(or a CSV of paths and labels).")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not hidden(d.name))
    if not found:
        raise DataError(f"[data] {root} holds no class folders: mode=evaluate needs each image's label, from one "
                        f"subfolder per class ({', '.join(classes[:4])}{' ...' if len(classes) > 4 else ''}) or a CSV "
                        "of paths and labels. For images without labels: mode=predict "
                        f"predict.checkpoint=... predict.input={root}")
    unknown = [c for c in found if c not in classes]
    if unknown:
        splits = sorted((c for c in unknown if c.lower() in SPLIT_NAMES),  # the test split first, then val
                        key=lambda c: ["test", "val", "train"].index(SPLIT_NAMES[c.lower()]))
        hint = (f"It holds split folders: evaluate one of them, e.g. predict.input={root / splits[0]}" if splits else
                "Rename or remove those folders (one subfolder per training class).")
        raise DataError(f"[data] {root} has class folders {unknown} that the model was not trained on; its "
                        f"classes are {classes}. {hint}")
    files, labels = [], []
    for c in found:
        listed, _ = list_images(root / c)
        files += listed
        labels += [classes.index(c)] * len(listed)
    refuse_non_utf8_names(files, root)
    return files, torch.tensor(labels, dtype=torch.int64), [c for c in classes if c not in found]


def evaluate(cfg: AfterTrainingConfig) -> Path:
    """`mode=evaluate`: the test stage's metrics on a labelled folder, in an evaluation directory (metrics.json,
    report.md, predictions.csv)."""
    p = cfg.predict
    trained = load_trained(p.checkpoint, p.device)
    if trained.ckpt.get("thresholds"):
        return _evaluate_label_sets(trained, p)
    classes = trained.facts["classes"]
    files, labels, missing = labelled_table(p.input, trained) if _is_table(p.input) else \
        labelled_files(p.input, classes)
    if missing:
        log.warning("evaluate: no images of the training classes %s in %s; their recall is undefined (0 here)",
                    missing, p.input)
    logits, bad, changed, images = logits_of(trained, files, p, keep_images=True)
    keep = torch.tensor([i not in bad for i in range(len(files))])
    seen = _seen(trained, p.input, [f for f, k in zip(files, keep) if k], labels[keep], images)
    metrics = build_metrics(len(classes), torch.device("cpu"))
    metrics.update(logits[keep], labels[keep])
    m = to_plain(metrics.compute())
    loss = float(nn.functional.cross_entropy(logits[keep], labels[keep]))
    final = {"checkpoint": str(trained.path), "input": str(Path(p.input).expanduser().resolve()),
             "images": int(keep.sum()), "acc": m["acc"], "balanced_acc": m["balanced_acc"], "macro_f1": m["macro_f1"],
             "loss": loss, "classes": classes, "missing_classes": missing,
             "per_class": {c: {"precision": m["precision"][i], "recall": m["recall"][i], "f1": m["f1"][i]}
                           for i, c in enumerate(classes)},
             "confusion_matrix": m["confusion"], "not_decoded": {str(files[i]): why for i, why in bad.items()},
             "seen_in_training": seen, **changed}
    out = Path(p.output) if p.output else trained.run_dir / "evaluations" / _stem(p.input)
    write_json(out / "metrics.json", final)
    kept_files = [f for f, k in zip(files, keep) if k]
    figures = _evaluation_figures(final, logits[keep], labels[keep], images, kept_files)
    write_with_figures(out / "report.md", _report_lines(final, figures), figures, "safetrain evaluation")
    log.info("evaluated %d images of %s: acc %.4f, balanced acc %.4f, macro-F1 %.4f%s | %s -> %s", final["images"],
             p.input, final["acc"], final["balanced_acc"], final["macro_f1"],
             f" | {len(bad)} could not be decoded" if bad else "", _seen_line(seen), out)
    return out


def _is_table(where: str) -> bool:
    return Path(where).suffix.lower() in TABLES


def labelled_table(where: str, trained: Trained) -> tuple[list[Path], torch.Tensor, list[str]]:
    """labelled_files for a CSV of one label per image, in the training run's columns."""
    files, rows = labelled_rows(where, trained)
    several = [str(files[i]) for i in (rows.sum(1) != 1).nonzero().flatten().tolist()]
    if several:
        raise DataError(f"[data] {where}: {len(several)} row(s) give an image other than one label (e.g. "
                        f"{several[0]}); this model gives each image one. Keep one label a row.")
    classes = trained.facts["classes"]
    return files, rows.argmax(1), [c for i, c in enumerate(classes) if not rows[:, i].any()]


def labelled_rows(where: str, trained: Trained) -> tuple[list[Path], torch.Tensor]:
    """(files, (N, C) 0/1 labels by the training labels' order) of a CSV in the training run's columns and label
    delimiter (several labels per image)."""
    spec = trained.ckpt.get("data_spec") or {}
    columns = Columns(spec.get("path_column", "path"), spec.get("label_column", "label"), None,
                      spec.get("label_delimiter") or "|")
    listing = list_csv(where, columns)
    classes = trained.facts["classes"]
    unknown = sorted(set(listing.classes) - set(classes))
    if unknown:
        raise DataError(f"[data] {where} has labels {unknown[:10]} that the model was not trained on; its labels are "
                        f"{classes}. Remove or rename them.")
    rows = [(y,) if isinstance(y, int) else y for _, _, y in listing.rows]  # one label per row: a 1-tuple
    index = [classes.index(c) for c in listing.classes]
    labels = label_tensor([tuple(index[k] for k in ks) for ks in rows], len(classes), multi=True)
    return [Path(f) for _, f, _ in listing.rows], labels


def _evaluate_label_sets(trained: Trained, p: PredictConfig) -> Path:
    """mode=evaluate for a model of several labels per image, on a CSV like the training one: mAP, F1 at the
    checkpoint's thresholds (chosen on validation [M39]), per-label scores."""
    classes = trained.facts["classes"]
    files, labels = labelled_rows(p.input, trained)
    absent = [c for k, c in enumerate(classes) if not labels[:, k].any()]
    if absent:
        log.warning("evaluate: no image of %s carries the training labels %s; their AP is undefined and their F1 "
                    "counts any prediction of them as a mistake", p.input, absent)
    logits, bad, changed, images = logits_of(trained, files, p, keep_images=True)
    keep = torch.tensor([i not in bad for i in range(len(files))])
    seen = _seen(trained, p.input, [f for f, k in zip(files, keep) if k], labels[keep], images)
    metrics = build_multilabel_metrics(len(classes), torch.device("cpu"), torch.tensor(trained.ckpt["thresholds"]))
    metrics.update(logits[keep], labels[keep])
    m = to_plain(metrics.compute())
    final = {"task": "multilabel", "checkpoint": str(trained.path), "input": str(Path(p.input).expanduser().resolve()),
             "images": int(keep.sum()), "map": m["map"], "macro_f1": m["macro_f1"], "micro_f1": m["micro_f1"],
             "exact_match": m["exact_match"], "label_acc": m["acc"], "classes": classes,
             "loss": float(nn.functional.binary_cross_entropy_with_logits(logits[keep], labels[keep])),
             "per_class": per_label(classes, m),
             "cardinality": {"labels": m["cardinality"], "predicted": m["predicted_cardinality"]},
             "not_decoded": {str(files[i]): why for i, why in bad.items()}, "missing_labels": absent,
             "seen_in_training": seen, **changed}
    out = Path(p.output) if p.output else trained.run_dir / "evaluations" / _stem(p.input)
    write_json(out / "metrics.json", final)
    figures = {"per_class": draw.per_class(final["per_class"], "evaluation")}
    write_with_figures(out / "report.md", [
        "# safetrain evaluation", "", f"Checkpoint `{final['checkpoint']}` on `{final['input']}`: {final['images']} "
        f"images, several labels each.", "", f"mAP **{final['map']:.4f}**, macro-F1 {final['macro_f1']:.4f}, micro-F1 "
        f"{final['micro_f1']:.4f} at the thresholds chosen on validation; exact label sets {final['exact_match']:.4f}; "
        f"loss {final['loss']:.4f}.", "", _seen_line(seen), "", "## Per label", "", *per_class_table(final), "",
        *figure("per_class", "precision, recall, F1", figures)], figures, "safetrain evaluation")
    log.info("evaluated %d images of %s: mAP %.4f, macro-F1 %.4f, micro-F1 %.4f (thresholds chosen on validation)%s "
             "| %s -> %s", final["images"], p.input, final["map"], final["macro_f1"], final["micro_f1"],
             f" | {len(bad)} could not be decoded" if bad else "", _seen_line(seen), out)
    return out


def run_splits(trained: Trained) -> tuple[D.Source, dict[str, ImageSet]]:
    """The run's splits rebuilt from the data spec its checkpoint holds, as training built them (the same code; from
    the caches where they are). Raises SafetrainError or OSError when the data cannot be reached any more."""
    if not trained.ckpt.get("data_spec"):
        raise ConfigError(f"[config] {trained.path} holds no data spec (an older safetrain wrote it), so its splits "
                          "cannot be rebuilt.")
    spec = replace(D.DataSpec.from_dict(trained.ckpt["data_spec"]), download=False)
    cache = cache_root(trained.ckpt["config"]["data"]["cache_dir"])
    src = D.load_source(spec, cache)
    return src, D.split_source(src, spec, cache)


def seen_in_training(trained: Trained, images: ImageSet) -> dict:
    """How many of `images` are near-duplicates of the run's training split (the audit's test [M06]), when that
    split can be read and compared."""
    try:
        _, splits = run_splits(trained)
    except (SafetrainError, OSError, RuntimeError) as e:
        return {"checked": False, "why": f"the training data cannot be read ({str(e)[:160]})"}
    train = splits["train"]
    if train.pixels() is None or images.pixels() is None:
        return {"checked": False, "why": "the images are neither in memory nor copied at the audit's size"}
    if min(train.pixels().shape[-2:]) < MIN_SIDE:
        return {"checked": False, "why": f"images of {tuple(train.pixels().shape[-2:])} pixels are too small to tell "
                                          "a copy from a look-alike"}
    pairs, _ = search(train, {"evaluation": images}, trained.device)
    return {"checked": True, "near_duplicates": len(pairs), "of": len(images), "pairs": pairs[:100]}


def _seen(trained: Trained, where: str, files: list[Path], labels: torch.Tensor, images) -> dict:
    """seen_in_training for an evaluation's decoded files, named relative to its folder (or its CSV's); [M06] warned
    where some were."""
    root = Path(where).expanduser()
    root = root.parent if _is_table(where) else root
    seen = seen_in_training(trained, ImageSet(labels, [os.path.relpath(f, root) for f in files], images))
    if seen.get("near_duplicates"):
        log.warning("[M06] %s", _seen_line(seen))
    return seen


def _seen_line(seen: dict) -> str:
    if not seen["checked"]:
        return f"Near-duplicates of training images: not checked ({seen['why']})."
    return (f"Near-duplicates of training images: {seen['near_duplicates']} of the {seen['of']} evaluation images "
            "were seen in training (or a near copy was)" + (": their scores flatter the model; pairs in metrics.json."
                                                            if seen["near_duplicates"] else "."))


def _evaluation_figures(final: dict, logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
                        files: list[Path]) -> dict:
    """Per-class scores, the confusion matrix, and the most confident mistakes as a labelled grid."""
    classes = final["classes"]
    figures = {"per_class": draw.per_class(final["per_class"], "evaluation"),
               "confusion_matrix": draw.confusion(final["confusion_matrix"], classes, "evaluation")}
    p, pred = logits.softmax(1).max(1)
    wrong = (pred != labels).nonzero().squeeze(1)
    worst = wrong[p[wrong].argsort(descending=True)][:32].tolist()
    if worst:
        figures["mistakes"] = draw.image_grid(images[worst], [
            f"{files[i].name}\n{classes[labels[i]]}\npredicted {classes[pred[i]]} ({float(p[i]):.2f})" for i in worst],
            "the most confident mistakes: the true class, then what the model predicted")
    return figures


def _report_lines(final: dict, figures: dict) -> list[str]:
    classes = final["classes"]
    out = ["# safetrain evaluation", "", f"Checkpoint `{final['checkpoint']}` on `{final['input']}`: "
           f"{final['images']} images.", "", f"Accuracy **{final['acc']:.4f}**, balanced accuracy "
           f"{final['balanced_acc']:.4f}, macro-F1 {final['macro_f1']:.4f}, loss {final['loss']:.4f}.", ""]
    out += [_seen_line(final["seen_in_training"]), ""]
    if final["missing_classes"]:
        out += [f"No images of the training classes {final['missing_classes']}.", ""]
    if final["not_decoded"]:
        out += [f"{len(final['not_decoded'])} files could not be decoded:", ""] + [
            f"- {f}: {why}" for f, why in final["not_decoded"].items()] + [""]
    out += ["## Per class", ""] + per_class_table(final) + [""] + figure("per_class", "precision, recall, F1", figures)
    out += ["## Confusion matrix (rows: true class)", ""] + figure("confusion_matrix", "confusion matrix", figures)
    out += ["| true \\ pred | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    out += [f"| {c} | " + " | ".join(str(int(v)) for v in row) + " |"
            for c, row in zip(classes, final["confusion_matrix"])]
    return out + [""] + (["## The most confident mistakes", ""] + figure("mistakes", "mistakes", figures)
                         if "mistakes" in figures else [])
