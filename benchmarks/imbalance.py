"""loss.balance methods on CIFAR-10-LT (imbalance ratio 100) built from the CIFAR-10 JPEG copy.

    python benchmarks/imbalance.py --seeds 3 [--epochs 30] [--methods none,inverse,...] [overrides ...]

Runs `recipe=cifar10_lt data=imagefolder` once per method and seed (same splits per seed; seed-major, so
an interrupted sweep still covers every method equally), appends one JSON line per run to --log, and prints
balanced test accuracy and test macro-F1, mean +- std over seeds, per method. Results: RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
METHODS = ["none", "inverse", "effective", "drw", "logit_adjust", "sampler"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tarball", type=Path, default=TARBALL)
    ap.add_argument("--log", type=Path, default=Path("imbalance_runs.jsonl"), help="one JSON line per run")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(a.tarball) as t:
            t.extractall(tmp)
        for seed in range(a.seeds):
            for method in a.methods.split(","):
                out = Path(tmp) / f"run_{method}_{seed}"
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "safetrain", "recipe=cifar10_lt", "data=imagefolder",
                                f"data.root={tmp}", f"loss.balance={method}", f"seed={seed}",
                                f"trainer.max_epochs={a.epochs}", "trainer.progress=false",
                                f"hydra.run.dir={out}", *a.overrides], check=True)
                m = json.loads((out / "metrics.json").read_text())
                rows.setdefault(method, []).append((m["test_balanced_acc"], m["test_macro_f1"]))
                line = {"method": method, "seed": seed, "epochs": a.epochs,
                        "seconds": round(time.perf_counter() - start),
                        "test_balanced_acc": m["test_balanced_acc"], "test_macro_f1": m["test_macro_f1"],
                        "test_acc": m.get("test_acc"), "overrides": a.overrides}
                with a.log.open("a") as f:
                    f.write(json.dumps(line) + "\n")
                print(json.dumps(line), flush=True)
    print(f"\n{'loss.balance':<14} {'balanced acc':>20} {'macro-F1':>20}   ({a.seeds} seeds, {a.epochs} epochs)")
    for method, r in rows.items():
        ba, f1 = [x for x, _ in r], [y for _, y in r]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"{method:<14} {statistics.mean(ba):>12.4f} +- {sd(ba):.4f} {statistics.mean(f1):>12.4f} +- {sd(f1):.4f}")


if __name__ == "__main__":
    main()
