"""CIFAR-10 on this machine's CPU: `recipe=cifar10` against the first CNN people write, at equal wall time.

    python benchmarks/cifar10_cpu.py --seeds 0 1 2                     # the README's command (sized to this CPU)
    python benchmarks/cifar10_cpu.py --recipe cifar10_fast --seeds 0 --no-baseline   # the fixed-size recipe

Each safetrain run is the README's CPU command, timed from the process start with a fresh cache (JPEG decoding,
the data audit, preflight, monitors, figures and report all included). The baseline is the code people usually
write first: Normalize((0.5,)*3, (0.5,)*3), torchvision's ImageFolder with per-sample PIL transforms, a two-conv
CNN, Adam 1e-3, batch 64, no workers; it trains until the safetrain runs' mean wall time (its own test pass
included) and is then tested. Prints every run, safetrain's mean +- std and the accuracy ratio at equal time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar import TARBALL, timed_run, unpack  # noqa: E402


def run_safetrain(root: Path, seed: int, work: Path, extra: list[str], recipe: str = "cifar10") -> dict:
    run = timed_run([f"recipe={recipe}", "data=imagefolder", f"data.root={root}", f"seed={seed}", *extra],
                    work / f"run{seed}", work / f"cache{seed}")  # fresh cache: decoding is timed too
    return {"pipeline": "safetrain", "seed": seed, **run}


def run_baseline(root: Path, budget_s: float, eval_reserve_s: float = 20.0) -> dict:
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
    seen, epochs = 0, 0.0
    while time.time() - t0 < budget_s - eval_reserve_s:
        net.train()
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            seen += len(y)
            if time.time() - t0 >= budget_s - eval_reserve_s:
                break
    epochs = seen / len(train.dataset)
    net.eval()
    correct = n = 0
    with torch.no_grad():
        for x, y in test:
            correct += (net(x).argmax(1) == y).sum().item()
            n += len(y)
    return {"pipeline": "baseline", "seed": 0, "test_acc": correct / n, "wall_s": time.time() - t0,
            "train_s": None, "epochs": round(epochs, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipe", default="cifar10")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--tarball", type=Path, default=TARBALL)
    ap.add_argument("--jsonl", type=Path, default=None, help="append every run as a JSON line here")
    ap.add_argument("overrides", nargs="*", help="extra safetrain overrides")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = unpack(a.tarball, work / "cifar")
        for seed in a.seeds:
            rows.append(run_safetrain(root, seed, work, a.overrides, a.recipe))
            print(json.dumps(rows[-1]), flush=True)
        if not a.no_baseline:
            rows.append(run_baseline(root, statistics.mean(r["wall_s"] for r in rows)))
            print(json.dumps(rows[-1]), flush=True)
    if a.jsonl:
        with a.jsonl.open("a") as f:
            for r in rows:
                f.write(json.dumps({**r, "recipe": a.recipe, "overrides": a.overrides}) + "\n")
    print(f"\n{'pipeline':<10} {'seed':>4} {'epochs':>6} {'test acc':>9} {'wall s':>8}")
    for r in rows:
        print(f"{r['pipeline']:<10} {r['seed']:>4} {r['epochs']:>6} {r['test_acc']:>9.4f} {r['wall_s']:>8.1f}")
    ours = [r for r in rows if r["pipeline"] == "safetrain"]
    accs = [r["test_acc"] for r in ours]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"safetrain: {statistics.mean(accs):.4f} +- {std:.4f} test accuracy, "
          f"{statistics.mean(r['wall_s'] for r in ours):.0f} s mean wall ({len(accs)} seeds)")
    if not a.no_baseline:
        b = rows[-1]
        print(f"at equal wall time: safetrain/baseline accuracy x{statistics.mean(accs) / b['test_acc']:.3f} "
              f"({b['epochs']} baseline epochs)")


if __name__ == "__main__":
    main()
