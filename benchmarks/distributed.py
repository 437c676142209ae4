"""What torchrun costs: the same recipe=cifar10 run (CIFAR-10 JPEG copy, global batch 256) in one process and in N
processes on this machine, measured in one invocation, with the accuracy each reaches.

    python benchmarks/distributed.py [--nproc 2] [--epochs 2] [--data ../shared/data/cifar10-jpeg.tar.gz]

The data is decoded and audited once first (mode=doctor fills the cache both runs read), so the two timed runs
differ only in how they train. One process gets every core as threads; under torchrun each process gets
cores / N threads (torchrun's OMP_NUM_THREADS), so both use the whole machine.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._cifar import TARBALL, unpack  # noqa: E402


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--data", default=str(TARBALL))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    root = unpack(args.data, tmp / "data")
    cores = os.cpu_count() or 1
    recipe = ["recipe=cifar10", "data=imagefolder", f"data.root={root}", f"data.cache_dir={tmp / 'cache'}",
              "trainer.progress=false"]
    safetrain = [sys.executable, "-m", "safetrain", *recipe]
    timed([*safetrain, "mode=doctor", f"hydra.run.dir={tmp / 'doctor'}"], {})  # decoded, measured, audited: cached
    train = [f"trainer.max_epochs={args.epochs}"]
    runs = {
        "1 process": (timed([*safetrain, *train, f"hydra.run.dir={tmp / 'one'}"], {"OMP_NUM_THREADS": str(cores)}),
                      tmp / "one"),
        f"{args.nproc} processes": (timed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                           f"--nproc_per_node={args.nproc}", "-m", "safetrain", *recipe, *train,
                                           f"hydra.run.dir={tmp / 'many'}"],
                                          {"OMP_NUM_THREADS": str(max(1, cores // args.nproc))}), tmp / "many"),
    }
    print(f"recipe=cifar10, {args.epochs} epochs, global batch 256, {cores} CPU cores")
    base = None
    for name, (wall, run) in runs.items():
        final = json.loads((run / "metrics.json").read_text())
        epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        epoch_s = [e["epoch_seconds"] for e in epochs if "epoch_seconds" in e]
        base = base or wall
        print(f"{name:>12}: wall {wall:6.1f} s ({wall / base:.2f}x), epochs {', '.join(f'{s:.1f}' for s in epoch_s)} s,"
              f" test acc {final['test_acc']:.4f}")


if __name__ == "__main__":
    main()
