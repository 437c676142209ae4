"""Predict throughput and export parity on the CIFAR-10 test folder (10,000 JPEGs).

mode=predict (safetrain's decoding in DataLoader workers, batched) against a plain torchvision ImageFolder +
DataLoader loop over the same files, model and workers in the same invocation (the ratio is what to compare across
machines); mode=evaluate against the run's own test metrics; mode=export's parity numbers.

    python benchmarks/after_training.py [--run RUN_DIR]   # without --run: trains recipe=cifar10 for 2 epochs first
"""
import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._cifar import TARBALL, unpack  # noqa: E402
from safetrain.checkpoint import load_classifier  # noqa: E402
from safetrain.cli import compose  # noqa: E402
from safetrain.config import validate_after_training  # noqa: E402
from safetrain.export import export  # noqa: E402
from safetrain.inference import evaluate, predict  # noqa: E402
from safetrain.run import run  # noqa: E402

WORKERS = 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="a finished run of recipe=cifar10 on the JPEG copy")
    ap.add_argument("--data", default=str(TARBALL))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.run:
        run_dir = Path(args.run)
        root = Path(_config(run_dir)["data"]["root"])
    else:
        tmp = Path(tempfile.mkdtemp())
        root = unpack(args.data, tmp / "data")
        cfg, _ = compose("cifar10", ["data=imagefolder", f"data.root={root}", "trainer.max_epochs=2",
                                     "trainer.progress=false"])
        run_dir = tmp / "run"
        run(cfg, run_dir)
    out = Path(tempfile.mkdtemp())
    common = [f"predict.checkpoint={run_dir}", "predict.progress=false", f"predict.num_workers={WORKERS}"]
    plain_before = plain_loop(run_dir, root / "test")  # also warms the page cache for both
    t0 = time.perf_counter()
    csv = predict(validate_after_training(["mode=predict", f"predict.input={root / 'test'}",
                                           f"predict.output={out / 'p.csv'}", *common]))
    ours = time.perf_counter() - t0
    n = len(csv.read_text().splitlines()) - 1
    plain_after = plain_loop(run_dir, root / "test")
    plain = (plain_after[0], (plain_before[1] + plain_after[1]) / 2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {WORKERS} workers")
    print(f"predict: {n} images in {ours:.1f} s = {n / ours:.0f} images/s (CSV written, headers scanned); plain "
          f"ImageFolder loop (NCHW, mean of a run before and after): {plain[0]} images in {plain[1]:.1f} s = "
          f"{plain[0] / plain[1]:.0f} images/s; ratio "
          f"{(n / ours) / (plain[0] / plain[1]):.2f}")
    ev = json.loads((evaluate(validate_after_training(["mode=evaluate", f"predict.input={root / 'test'}",
                                                       f"predict.output={out / 'ev'}", *common])) /
                     "metrics.json").read_text())
    final = json.loads((run_dir / "metrics.json").read_text())
    print(f"evaluate on test/: acc {ev['acc']:.4f} (the run's test stage: {final['test_acc']:.4f}), macro-F1 "
          f"{ev['macro_f1']:.4f} ({final['test_macro_f1']:.4f}); seen in training: {ev['seen_in_training']}"[:400])
    t0 = time.perf_counter()
    exp = export(validate_after_training(["mode=export", f"predict.output={out / 'export'}", *common]))
    parity = json.loads((exp / "model.json").read_text())["parity"]
    print(f"export in {time.perf_counter() - t0:.1f} s: {parity}")


def _config(run_dir: Path) -> dict:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))


@torch.no_grad()
def plain_loop(run_dir: Path, folder: Path) -> tuple[int, float]:
    """What a user would write: ImageFolder + PILToTensor + DataLoader + the classifier (uint8 in)."""
    model = load_classifier(run_dir / "checkpoints" / "best.pt")
    t0 = time.perf_counter()
    ds = torchvision.datasets.ImageFolder(str(folder), transform=torchvision.transforms.PILToTensor())
    n = 0
    for x, _ in torch.utils.data.DataLoader(ds, batch_size=256, num_workers=WORKERS):
        model(x).argmax(1)
        n += len(x)
    return n, time.perf_counter() - t0


if __name__ == "__main__":
    main()
