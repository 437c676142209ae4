"""Time-to-accuracy of `recipe=cifar10` on the CIFAR-10 JPEG copy, against the usual baseline.

    python benchmarks/cifar10_cpu.py --epochs 12                 # safetrain, fresh cache (decode included)
    python benchmarks/cifar10_cpu.py --epochs 12 --baseline 8    # + a two-conv CNN with PIL transforms

Prints test accuracy and wall time of each, and their ratio when both run (same machine, same run).
The baseline is the code people usually write first: Normalize((0.5,)*3, (0.5,)*3), a DataLoader over
torchvision's ImageFolder with per-sample PIL transforms, Adam 1e-3, batch 64, no workers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def run_safetrain(root: Path, epochs: int, work: Path, extra: list[str]) -> dict:
    env = {**os.environ, "SAFETRAIN_CACHE": str(work / "cache")}  # fresh cache: decoding is timed too
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "safetrain", "recipe=cifar10", "data=imagefolder", f"data.root={root}",
                    f"trainer.max_epochs={epochs}", "trainer.progress=false", f"hydra.run.dir={work / 'run'}",
                    *extra], check=True, env=env)
    m = json.loads((work / "run" / "metrics.json").read_text())
    return {"test_acc": m["test_acc"], "wall_s": time.time() - t0, "epochs": epochs}


def run_baseline(root: Path, epochs: int) -> dict:
    import torch
    import torch.nn as nn
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    torch.manual_seed(0)
    t0 = time.time()
    tf = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    train = torch.utils.data.DataLoader(ImageFolder(root / "train", tf), batch_size=64, shuffle=True)
    test = torch.utils.data.DataLoader(ImageFolder(root / "test", tf), batch_size=256)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(epochs):
        net.train()
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    net.eval()
    correct = n = 0
    with torch.no_grad():
        for x, y in test:
            correct += (net(x).argmax(1) == y).sum().item()
            n += len(y)
    return {"test_acc": correct / n, "wall_s": time.time() - t0, "epochs": epochs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--baseline", type=int, default=0, help="epochs of the baseline (0: skip it)")
    ap.add_argument("--tarball", type=Path, default=TARBALL)
    ap.add_argument("overrides", nargs="*", help="extra safetrain overrides")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with tarfile.open(a.tarball) as t:
            t.extractall(work / "cifar")
        rows = {"safetrain": run_safetrain(work / "cifar", a.epochs, work, a.overrides)}
        if a.baseline:
            rows["baseline"] = run_baseline(work / "cifar", a.baseline)
    print(f"\n{'pipeline':<10} {'epochs':>6} {'test acc':>9} {'wall s':>8}")
    for name, r in rows.items():
        print(f"{name:<10} {r['epochs']:>6} {r['test_acc']:>9.4f} {r['wall_s']:>8.1f}")
    if a.baseline:
        s, b = rows["safetrain"], rows["baseline"]
        print(f"safetrain/baseline: accuracy x{s['test_acc'] / b['test_acc']:.3f}, "
              f"wall time x{s['wall_s'] / b['wall_s']:.3f}")


if __name__ == "__main__":
    main()
