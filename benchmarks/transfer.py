"""Transfer without a download: pretrain on five CIFAR-10 classes with safetrain, fine-tune on the other five with
50 images per class (model.init_from), against the same model trained from scratch on those 250 images.

    python benchmarks/transfer.py [--pretrain-epochs 8] [--epochs 30] [--seeds 0 1 2] [--arch resnet18]

Prints each run's test accuracy on the 5,000 CIFAR-10 test images of the five new classes, and mean +- std.
"""
import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._cifar import TARBALL, unpack  # noqa: E402
from safetrain.cli import compose  # noqa: E402
from safetrain.run import run  # noqa: E402

OLD, NEW = ["airplane", "automobile", "bird", "cat", "deer"], ["dog", "frog", "horse", "ship", "truck"]


def link(src: Path, dst: Path, classes: list[str], per_class: int | None, seed: int) -> Path:
    """dst/<class>/ with symlinks to `per_class` images of each class (all if None), picked by `seed`."""
    for c in classes:
        files = sorted((src / c).glob("*.jpg"))
        if per_class is not None:
            files = random.Random(seed).sample(files, per_class)
        (dst / c).mkdir(parents=True)
        for f in files:
            os.symlink(f, dst / c / f.name)
    return dst


def train(root: Path, out: Path, arch: str, epochs: int, seed: int, extra: list[str]) -> dict:
    cfg, _ = compose("imagefolder", ["model=torchvision", f"model.arch={arch}", f"data.root={root}",
                                     f"trainer.max_epochs={epochs}", f"seed={seed}", "trainer.progress=false", *extra])
    t0 = time.time()
    final = run(cfg, out)
    final["seconds"] = time.time() - t0
    return final


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--pretrained", help="best.pt of an earlier pretraining run (skips pretraining)")
    ap.add_argument("--data", default=str(TARBALL))
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp())
    cifar = unpack(a.data, tmp / "cifar")
    old = tmp / "old"
    link(cifar / "train", old / "train", OLD, None, 0)
    link(cifar / "test", old / "test", OLD, None, 0)
    ckpt = Path(a.pretrained) if a.pretrained else tmp / "pretrain" / "checkpoints" / "best.pt"
    if not a.pretrained:
        pre = train(old, tmp / "pretrain", a.arch, a.pretrain_epochs, 0, ["sched.name=onecycle",
                                                                          "data.batch_size=128"])
        print(f"pretrain {a.arch} on {OLD}: test acc {pre['test_acc']:.4f} in {pre['seconds']:.0f} s", flush=True)
    small = ["data.batch_size=32", "data.val_fraction=0.2", "data.min_eval_per_class=10"]
    rows = {"fine-tuned (model.init_from)": [], "from scratch": []}
    for seed in a.seeds:
        new = tmp / f"new{seed}"
        link(cifar / "train", new / "train", NEW, 50, seed)
        link(cifar / "test", new / "test", NEW, None, 0)
        for name, extra in (("fine-tuned (model.init_from)", [f"model.init_from={ckpt}"]), ("from scratch", [])):
            out = train(new, tmp / f"{name.split()[0]}{seed}", a.arch, a.epochs, seed, small + extra)
            rows[name].append(out["test_acc"])
            print(json.dumps({"run": name, "seed": seed, "test_acc": round(out["test_acc"], 4),
                              "best_epoch": out["best_epoch"], "seconds": round(out["seconds"])}), flush=True)
    for name, accs in rows.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{name}: test acc {statistics.mean(accs):.4f} +- {sd:.4f} over seeds {a.seeds} ({accs})")


if __name__ == "__main__":
    main()
