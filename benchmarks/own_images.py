"""Your own images, as they come: safetrain's one command against a torchvision-only script written the standard way,
at equal wall time, on a folder of photos of varied sizes and shapes.

    python benchmarks/own_images.py --per-class 1000 --test-per-class 200 --minutes 5

The folder: CIFAR-10's images (../shared/data/cifar10-jpeg.tar.gz) re-delivered as JPEGs of random sizes, the shorter
side from 40 to 200 px and the aspect ratio from 3:4 to 4:3 (bicubic, quality 90), in train/<class>/ and
test/<class>/. safetrain runs `recipe=imagefolder data.root=DIR trainer.max_minutes=M` (no size, augmentation or copy
setting: it chooses), once per --augments value (`default` is the recipe's own choice). The baseline gets the wall
time of safetrain's whole first run (decoding and audit included): torchvision ImageFolder, RandomResizedCrop(64) +
flip + TrivialAugmentWide, ResNet-18 from scratch, AdamW with a one-cycle schedule sized to the time (measured on its
first steps), Resize(73) + CenterCrop(64) for the test images, 2 loader workers. Prints test accuracy and macro-F1
side by side; the last line is JSON."""
import argparse
import json
import math
import os
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


def make_varied(cifar: Path, out: Path, per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """CIFAR-10 images at random sizes (shorter side 40-200 px) and aspect ratios (3:4 to 4:3), as JPEG files."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for cls in sorted(p.name for p in (cifar / split).iterdir()):
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            for f in sorted((cifar / split / cls).iterdir())[:n]:
                side, ratio = rng.integers(40, 201), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
                w, h = (round(side * ratio), side) if ratio >= 1 else (side, round(side / ratio))
                with Image.open(f) as im:
                    im.convert("RGB").resize((w, h), Image.BICUBIC).save(out / split / cls / f.name, quality=90)
    return out


def safetrain_run(root: Path, run_dir: Path, minutes: float, augment: str) -> dict:
    """One command, as a user types it; -> test accuracy, macro-F1 and the wall seconds of the whole process."""
    cmd = [sys.executable, "-m", "safetrain", "recipe=imagefolder", f"data.root={root}",
           f"trainer.max_minutes={minutes}", "trainer.progress=false", f"hydra.run.dir={run_dir}"]
    cmd += [] if augment == "default" else [f"data.augment={augment}"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "SAFETRAIN_CACHE": str(run_dir.parent / "cache")})
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"safetrain failed ({out.returncode}):\n{out.stderr[-3000:]}")
    final = json.loads((run_dir / "metrics.json").read_text())
    said = [line for line in (out.stdout + out.stderr).splitlines() if "data.image_size not set" in line or "[4/9]" in line]
    return {"acc": final["test_acc"], "macro_f1": final["test_macro_f1"], "seconds": wall, "decided": said}


def baseline(root: Path, seconds: float, workers: int = 2) -> dict:
    """The torchvision-only script, written the standard way, trained for `seconds` of wall time in all."""
    import torchmetrics
    from torchvision import datasets, models
    from torchvision.transforms import v2

    t0 = time.perf_counter()
    torch.manual_seed(0)
    norm = v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_tf = v2.Compose([v2.RandomResizedCrop(64, antialias=True), v2.RandomHorizontalFlip(), v2.TrivialAugmentWide(),
                           v2.ToImage(), v2.ToDtype(torch.float32, scale=True), norm])
    test_tf = v2.Compose([v2.Resize(73, antialias=True), v2.CenterCrop(64), v2.ToImage(),
                          v2.ToDtype(torch.float32, scale=True), norm])
    train = datasets.ImageFolder(str(root / "train"), train_tf)
    test = datasets.ImageFolder(str(root / "test"), test_tf)
    loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=True)
    model = models.resnet18(num_classes=len(train.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    eval_s = 0.0
    steps, sched, done = None, None, 0
    while True:
        for x, y in loader:
            model.train()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if sched is not None:
                sched.step()
            if done == 10:  # the time a step takes here sizes the one-cycle schedule to the budget
                per_step = (time.perf_counter() - t0) / done
                eval_s = per_step * len(test) / 128 / 2  # a forward pass of the test set, roughly
                steps = max(20, int((seconds - eval_s) / per_step))
                sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps - done + 1)
            if steps is not None and done >= steps:
                break
        if steps is not None and done >= steps:
            break
    model.eval()
    f1 = torchmetrics.classification.MulticlassF1Score(len(train.classes), average="macro")
    acc = torchmetrics.classification.MulticlassAccuracy(len(train.classes), average="micro")
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test, batch_size=256, num_workers=workers):
            p = model(x)
            f1.update(p, y)
            acc.update(p, y)
    return {"acc": float(acc.compute()), "macro_f1": float(f1.compute()), "seconds": time.perf_counter() - t0,
            "steps": done, "epochs": done * 128 / len(train)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--augments", default="default", help="comma-separated data.augment values for safetrain")
    ap.add_argument("--no-baseline", action="store_true")
    a = ap.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    print(f"CPU: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        root = make_varied(unpack(TARBALL, tmp / "cifar"), tmp / "varied", a.per_class, a.test_per_class)
        print(f"folder: {a.per_class}/class train, {a.test_per_class}/class test, JPEG 40-200 px, 3:4-4:3 "
              f"({time.perf_counter() - t0:.0f} s to make)")
        rows = {}
        for augment in a.augments.split(","):
            rows[f"safetrain ({augment})"] = r = safetrain_run(root, tmp / f"run_{augment}", a.minutes, augment)
            print(f"safetrain data.augment={augment}: test acc {r['acc']:.4f} macro-F1 {r['macro_f1']:.4f} in "
                  f"{r['seconds']:.0f} s | " + " | ".join(s.split("] ", 1)[-1][:160] for s in r["decided"]), flush=True)
        if not a.no_baseline:
            budget = next(iter(rows.values()))["seconds"]
            rows["torchvision baseline"] = r = baseline(root, budget)
            print(f"torchvision baseline: test acc {r['acc']:.4f} macro-F1 {r['macro_f1']:.4f} in {r['seconds']:.0f} s "
                  f"({r['steps']} steps, {r['epochs']:.1f} epochs)", flush=True)
        print(json.dumps({"cpu": cpu, "per_class": a.per_class, "minutes": a.minutes,
                          **{k: {m: v for m, v in r.items() if m != "decided"} for k, r in rows.items()}}))


if __name__ == "__main__":
    main()
