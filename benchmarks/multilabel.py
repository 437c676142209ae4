"""Several labels per image: safetrain's default against plain binary cross-entropy with one 0.5 threshold for every
label (the same model, the same epochs), on mosaics of real photos.

    python benchmarks/multilabel.py --train 10000 --test 2000 --epochs 12

The data: 2x2 mosaics of CIFAR-10 images (../shared/data/cifar10-jpeg.tar.gz), each tile 16x16, so each mosaic is a
32x32 JPEG holding 1 to 4 distinct classes (uniform); the classes of a mosaic are drawn with long-tailed frequencies
(class k weighs --tail**(-k/9): the first class is --tail times as common as the last, as tags are in real
collections), tiles beyond the distinct classes repeat them. Training mosaics come from CIFAR's training images, test
mosaics from its test images; labels in a CSV (`path,label,split`, labels joined by "|"). Both runs are one command:
`recipe=imagefolder data=csv data.root=labels.csv data.label_delimiter="|" data.split_column=split`; the baseline adds
`loss.balance=none` and is scored at 0.5 from `mode=predict`'s probabilities on the test mosaics. The ablation scores
each run both ways; --also runs other loss.balance methods (how the default was chosen). Planted faults (--faults), in
every split as a dataset carries them: tags shuffled for 30% of the images, and the most common label made 50x rarer;
each run's warnings are printed with their rows. The last line is JSON."""
import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar import TARBALL, unpack  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_mosaics(cifar: Path, out: Path, n_train: int, n_test: int, tail: float = 10.0, seed: int = 0) -> Path:
    """The mosaics and labels.csv (see the module doc); returns the CSV's path."""
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in (cifar / "train").iterdir())
    weights = np.array([tail ** (-k / (len(classes) - 1)) for k in range(len(classes))])
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        pools = {c: sorted((cifar / split / c).iterdir()) for c in classes}
        (out / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            k = int(rng.integers(1, 5))
            chosen = list(rng.choice(len(classes), size=k, replace=False, p=weights / weights.sum()))
            tiles = chosen + list(rng.choice(chosen, size=4 - k))
            rng.shuffle(tiles)
            mosaic = Image.new("RGB", (32, 32))
            for t, c in enumerate(tiles):
                pool = pools[classes[c]]
                with Image.open(pool[int(rng.integers(len(pool)))]) as im:
                    mosaic.paste(im.convert("RGB").resize((16, 16), Image.BICUBIC), (16 * (t % 2), 16 * (t // 2)))
            name = f"{split}/{i:06d}.jpg"
            mosaic.save(out / name, quality=95)
            rows.append((name, "|".join(classes[c] for c in sorted(set(chosen))), split))
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return out / "labels.csv"


def plant(csv_path: Path, out: Path, fault: str, seed: int = 0) -> Path:
    """A copy of labels.csv with a fault in every split, as a dataset carries it: `shuffled` (30% of the images get
    another image's tags) or `rare` (the most common label kept on 1 in 50 of its images)."""
    rows = list(csv.DictReader(open(csv_path)))
    rng = random.Random(seed)
    if fault == "shuffled":
        picked = rng.sample(rows, int(0.3 * len(rows)))
        tags = [r["label"] for r in picked]
        rng.shuffle(tags)
        for r, t in zip(picked, tags):
            r["label"] = t
    else:
        counts = {}
        for r in rows:
            for t in r["label"].split("|"):
                counts[t] = counts.get(t, 0) + 1
        common = max(counts, key=counts.get)
        for r in rows:
            tags = r["label"].split("|")
            if common in tags and rng.random() > 1 / 50:
                r["label"] = "|".join(t for t in tags if t != common)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"labels_{fault}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "path": str((csv_path.parent / r["path"]).resolve())})
    return path


def safetrain(args: list[str], run_dir: Path) -> tuple[dict, float]:
    """A training run into `run_dir` (kept: a finished one is read, not run again); -> (metrics.json, wall s)."""
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        final = json.loads(metrics.read_text())
        return final, final["wall_time_s"]
    t0 = time.perf_counter()
    command(args + ["trainer.progress=false", f"hydra.run.dir={run_dir}"], run_dir.parent)
    return json.loads(metrics.read_text()), time.perf_counter() - t0


def command(args: list[str], work: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "safetrain", *args], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "SAFETRAIN_CACHE": str(work / "cache")})
    if out.returncode:
        raise SystemExit(f"safetrain {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")


def scored(csv_path: Path, predictions: Path, thresholds) -> dict:
    """Macro/micro F1 of predict's probabilities on the test mosaics at `thresholds` (a number or one per label)."""
    from safetrain.metrics import thresholded_f1

    truth = {r["path"].split("/")[-1]: r["label"].split("|") for r in csv.DictReader(open(csv_path))
             if r["split"] == "test"}
    rows = list(csv.DictReader(open(predictions)))
    classes = [k.removeprefix("p_") for k in rows[0] if k.startswith("p_")]
    probs = torch.tensor([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    y = torch.tensor([[float(c in truth[Path(r["path"]).name]) for c in classes] for r in rows])
    t = torch.full((len(classes),), float(thresholds)) if isinstance(thresholds, float) else torch.tensor(thresholds)
    out = thresholded_f1(probs, y, t)
    return {"macro_f1": out["macro_f1"], "micro_f1": out["micro_f1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=10000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--tail", type=float, default=10.0)
    ap.add_argument("--faults", action="store_true", help="also the planted-fault runs")
    ap.add_argument("--also", nargs="*", default=[], help="more loss.balance methods to compare (e.g. asymmetric)")
    ap.add_argument("--work", default=None, help="a folder to keep (default: a temporary one)")
    ap.add_argument("--cifar", default=None, help="an extracted copy (default: unpack %s)" % TARBALL)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="safetrain-multilabel-"))
    cifar = Path(args.cifar) if args.cifar else unpack(TARBALL, work / "cifar")
    labels = work / "mosaics" / "labels.csv"
    if not labels.exists():
        labels = make_mosaics(cifar, work / "mosaics", args.train, args.test, args.tail)
    common = ["recipe=imagefolder", "data=csv", f"data.root={labels}", 'data.label_delimiter="|"',
              "data.split_column=split", f"trainer.max_epochs={args.epochs}"]
    results, warned = {}, {}
    runs = [("safetrain", []), ("bce_0.5", ["loss.balance=none"])]
    runs += [(f"balance_{m}", [f"loss.balance={m}"]) for m in args.also]
    for name, extra in runs:
        final, wall = safetrain(common + extra, work / name)
        pred = work / f"{name}_test.csv"
        if not pred.exists():
            command(["mode=predict", f"predict.checkpoint={work / name}", f"predict.input={labels.parent / 'test'}",
                     f"predict.output={pred}"], work)
        results[name] = {"test_map": final["test_map"], "wall_s": round(wall, 1),
                         "at_chosen_thresholds": scored(labels, pred, final["thresholds"]),
                         "at_0.5": scored(labels, pred, 0.5), "warnings": [f["row"] for f in final["findings"]]}
        warned[name] = final["warnings"]
    if args.faults:
        for fault in ("shuffled", "rare"):
            final, _ = safetrain(["recipe=imagefolder", "data=csv", f"data.root={plant(labels, work, fault)}",
                                        'data.label_delimiter="|"', "data.split_column=split",
                                        f"trainer.max_epochs={args.epochs}"], work / f"fault_{fault}")
            results[f"fault_{fault}"] = {"test_map": final["test_map"], "test_macro_f1": final["test_macro_f1"],
                                         "warnings": [f["row"] for f in final["findings"]]}
            warned[f"fault_{fault}"] = final["warnings"]
    ours, base = results["safetrain"]["at_chosen_thresholds"], results["bce_0.5"]["at_0.5"]
    print(f"mosaics: {args.train} train, {args.test} test, 32x32, 1-4 of 10 labels, tail {args.tail:g}; "
          f"{args.epochs} epochs each; CPU {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores")
    for name, r in results.items():
        print(f"{name:16s} mAP {r['test_map']:.4f}  " + (
            f"macro-F1 {r['at_chosen_thresholds']['macro_f1']:.4f} at its thresholds, {r['at_0.5']['macro_f1']:.4f} "
            f"at 0.5 | {r['wall_s']:.0f} s" if "at_0.5" in r else f"macro-F1 {r['test_macro_f1']:.4f}")
            + f" | warnings {r['warnings'] or 'none'}")
        for w in warned[name]:
            print("    ", w[:300])
    print(f"safetrain default macro-F1 {ours['macro_f1']:.4f} vs plain BCE + 0.5 {base['macro_f1']:.4f}: "
          f"{100 * (ours['macro_f1'] - base['macro_f1']):+.1f} points")
    print(json.dumps({"benchmark": "multilabel", "train": args.train, "test": args.test, "epochs": args.epochs,
                      "tail": args.tail, "cpu": torch.backends.cpu.get_cpu_capability(), "results": results}))


if __name__ == "__main__":
    main()
