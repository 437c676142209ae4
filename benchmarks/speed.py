"""GPU: safetrain's `recipe=cifar10_fast` against airbench94 (the public CIFAR-10 speed record's package), side by
side in one invocation on the same JPEG copy of CIFAR-10. Needs a CUDA GPU and `pip install airbench`.

    python benchmarks/speed.py                         # airbench94 x3, then safetrain x3 (seeds 0-2)
    python benchmarks/speed.py --runs 1 model.widths=[64,256,256] trainer.max_epochs=12   # safetrain overrides

airbench reads cifar10/{train,test}.pt; they are written from the decoded JPEG copy (not downloaded), so both
train on identical pixels. airbench94 is timed as its own script times itself (training and its test-time
augmented evaluation, data already on the GPU), after its warm-up run; safetrain is timed twice: the training
(the epochs' seconds in metrics.jsonl) and the whole process (start-up, decoding on a fresh cache, audit,
preflight, report). The ratio of training times is the one the recipe is tuned on; both are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar import TARBALL, timed_run, unpack  # noqa: E402

GPU_RECIPE = ["model.widths=[64,256,256]"]  # airbench94's width: the recipe's other settings are already its own


def airbench_files(root: Path, into: Path) -> None:
    """cifar10/train.pt and test.pt as airbench's CifarLoader reads them: uint8 (N, H, W, C), labels, classes."""
    import torch
    from torchvision.io import decode_jpeg, read_file

    into.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
        files = [(f, k) for k, c in enumerate(classes) for f in sorted((root / split / c).iterdir())]
        images = torch.stack(decode_jpeg([read_file(str(f)) for f, _ in files])).permute(0, 2, 3, 1).contiguous()
        torch.save({"images": images, "labels": torch.tensor([k for _, k in files]), "classes": classes},
                   into / f"{split}.pt")


def run_airbench(work: Path, runs: int) -> list[dict]:
    import torch
    import airbench

    os.chdir(work)  # airbench reads ./cifar10/
    airbench.warmup94(verbose=False)
    test = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    out = []
    for run in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model = airbench.train94(verbose=False)
        acc = airbench.evaluate(model, test, tta_level=2)
        torch.cuda.synchronize()
        out.append({"pipeline": "airbench94", "run": run, "test_acc": float(acc), "train_s": time.perf_counter() - t0})
        print(json.dumps(out[-1]), flush=True)
    return out


def run_safetrain(root: Path, work: Path, seed: int, extra: list[str]) -> dict:
    run = timed_run(["recipe=cifar10_fast", "data=imagefolder", f"data.root={root}", f"seed={seed}", *GPU_RECIPE,
                     *extra], work / f"safetrain{seed}", work / f"cache{seed}")
    return {"pipeline": "safetrain", "run": seed, **run}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tarball", type=Path, default=TARBALL)
    ap.add_argument("overrides", nargs="*", help="extra safetrain overrides")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = unpack(a.tarball, work / "jpeg")
        airbench_files(root, work / "cifar10")
        ab = run_airbench(work, a.runs)
        st = []
        for seed in range(a.runs):
            st.append(run_safetrain(root, work, seed, a.overrides))
            print(json.dumps(st[-1]), flush=True)

    def mean(rows, key):
        return statistics.mean(r[key] for r in rows)

    print(f"\nairbench94: {mean(ab, 'test_acc'):.4f} test accuracy, {mean(ab, 'train_s'):.2f} s ({a.runs} runs)")
    print(f"safetrain cifar10_fast: {mean(st, 'test_acc'):.4f} test accuracy, {mean(st, 'train_s'):.2f} s training, "
          f"{mean(st, 'wall_s'):.1f} s whole process")
    print(f"training time ratio safetrain/airbench94: x{mean(st, 'train_s') / mean(ab, 'train_s'):.2f}")


if __name__ == "__main__":
    main()
