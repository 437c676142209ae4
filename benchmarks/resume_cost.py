"""What exact resume costs per epoch: the time and bytes of last.pt (everything a resume needs) against the epoch
it follows, and against a weights-only file of the same model, in one run of recipe=cifar10 on the CIFAR-10 copy.

    python benchmarks/resume_cost.py [--epochs 2] [--data ../shared/data/cifar10-jpeg.tar.gz]
"""
import argparse
import io
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._cifar import TARBALL, unpack  # noqa: E402
from safetrain import checkpoint  # noqa: E402
from safetrain.cli import compose  # noqa: E402
from safetrain.run import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--data", default=str(TARBALL))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp())
    root = unpack(args.data, tmp / "data")
    writes, real = [], checkpoint.save_torch

    def timed(path, obj):
        t0 = time.perf_counter()
        real(path, obj)
        weights = io.BytesIO()
        torch.save(obj["model"], weights)
        writes.append({"file": path.name, "epoch": obj["epoch"], "seconds": time.perf_counter() - t0,
                       "bytes": path.stat().st_size, "weights_only_bytes": weights.getbuffer().nbytes,
                       "resume_state_bytes": len(_bytes({k: obj[k] for k in ("loader", "monitors", "rng",
                                                                              "history")}))})

    checkpoint.save_torch = timed
    cfg, _ = compose("cifar10", ["data=imagefolder", f"data.root={root}", f"trainer.max_epochs={args.epochs}",
                                 "trainer.progress=false", f"data.cache_dir={tmp / 'cache'}"])
    run(cfg, tmp / "run")
    epochs = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch_s = {e["epoch"]: e["epoch_seconds"] for e in epochs if "epoch_seconds" in e}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for w in writes:
        print(f"epoch {w['epoch']} {w['file']}: {w['bytes'] / 1e6:.2f} MB (weights alone "
              f"{w['weights_only_bytes'] / 1e6:.2f} MB; generators, RNGs, detectors and history "
              f"{w['resume_state_bytes'] / 1e3:.1f} kB), written in "
              f"{w['seconds']:.3f} s = {100 * w['seconds'] / epoch_s[w['epoch']]:.2f}% of the "
              f"{epoch_s[w['epoch']]:.1f} s epoch")


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


if __name__ == "__main__":
    main()
