"""Everything that needs a GPU to be trusted, in one command: at most 8 minutes on one H100/H200.

    python benchmarks/gpu_check.py --out gpu_check             # a GPU, `pip install airbench`, ../shared/data's copy
    python benchmarks/gpu_check.py --tiny --out /tmp/check     # any machine, seconds: the same steps, a tiny folder

On the lent GPU machine of DEVELOPERS.md (no internet, no hydra): `bash benchmarks/device_prep.sh` here first; it
prepares what the machine lacks and prints the one call of the device tool that runs this script there.

Parts, in order (each one's result is written to OUT/gpu_check.json as soon as it ends, so a run cut short keeps
what it measured; a part that would start after --budget-s is recorded as skipped):
  1. airbench94 (the `airbench` package, its own timing: training + its test-time augmentation) x3, then
     `recipe=cifar10_fast model.widths=[64,256,256]` (airbench94's width) x3 on the same pixels: accuracy, the
     training seconds (metrics.jsonl) and the whole process.
  2. The default `recipe=cifar10`, seeds 0 and 1, wall from process start to exit (seed 0 on a fresh cache:
     decoding and the audit on the GPU included; seed 1 reuses the decoded images).
  3. trainer.precision=fp16 (the gradient scaler): the run must end without [M26] or a stop.
  4. trainer.compile=true.
  5. mode=predict and mode=export (ONNX + torch.export parity) from seed 0's CUDA-trained checkpoint.
  6. The streamed loader's disk cache, raw and JPEG (decoded by nvJPEG), delivering 64-px batches to the GPU, against
     ImageFolder + PIL (benchmarks/scale.py throughput, on the same copy).
Each safetrain run's data seconds (load, split with the near-copy search, audit) and peak GPU memory come from its
metrics.json. OUT/gpu_check.md is a RESULTS.md section with the targets of issue 25 marked met or not.

--tiny: a generated 10-class folder of 32x32 images, 1 run each with 1-2 epochs of a tiny network; airbench, fp16 and
compile are recorded as skipped where there is no GPU. It checks that every step of this script still works.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar import TARBALL, timed_run, unpack  # noqa: E402
import scale  # noqa: E402
from safetrain.data import stored  # noqa: E402
from safetrain.errors import DataError  # noqa: E402

TARGETS = {"cifar10_acc": 0.925, "cifar10_wall_s": 60.0, "fast_acc": 0.905, "fast_vs_airbench": 1.5}
TINY = ["model.widths=[8,16,16]", "trainer.max_epochs=2", "data.batch_size=32"]


def tiny_folder(root: Path, per_class: int = 24, test_per_class: int = 8, seed: int = 0) -> Path:
    """10 classes of 32x32 PNGs: a class is a colour and a stripe direction, plus noise (learnable in 2 epochs)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for k in range(10):
            (root / split / f"c{k}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = torch.zeros(3, 32, 32)
                base[k % 3] += 0.5
                stripes = torch.arange(32).float().div(2 + k // 3).floor().remainder(2)
                base += 0.4 * (stripes[None, :, None] if k % 2 else stripes[None, None, :])
                img = (base + 0.15 * torch.randn(3, 32, 32, generator=g)).clamp(0, 1).mul(255).byte()
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / split / f"c{k}" / f"{i}.png")
    return root


def after_training(mode: str, run_dir: Path, extra: list[str]) -> dict:
    t0 = time.time()
    done = subprocess.run([sys.executable, "-m", "safetrain", f"mode={mode}", f"predict.checkpoint={run_dir}",
                           "predict.progress=false", *extra], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
    return {"wall_s": round(time.time() - t0, 1)}


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


class Check:
    """The parts, each timed and written to OUT/gpu_check.json as it ends; past the budget, skipped."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.budget_s, self.t0 = out, budget_s, time.time()
        cuda = torch.cuda.is_available()
        self.result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                       "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({cpu_model()})",
                       "cpu_threads": torch.get_num_threads(), "parts": {}}

    def part(self, name: str, fn, *, needs_gpu: bool = False):
        if needs_gpu and not torch.cuda.is_available():
            row = {"status": "skipped", "why": "needs a CUDA GPU"}
        elif time.time() - self.t0 > self.budget_s:
            row = {"status": "skipped", "why": f"past the {self.budget_s:.0f} s budget"}
        else:
            t = time.time()
            try:
                row = {"status": "ok", **fn()}
            except Exception as e:  # recorded, and the next part runs: one broken path must not hide the others
                row = {"status": "failed", "error": f"{type(e).__name__}: {e}"[-2000:]}
            row["part_s"] = round(time.time() - t, 1)
        self.result["parts"][name] = row
        self.result["elapsed_s"] = round(time.time() - self.t0, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=1))
        print(name, json.dumps(row)[:600], flush=True)
        return row


def airbench_part(root: Path, work: Path, runs: int) -> dict:
    from speed import airbench_files, run_airbench

    airbench_files(root, work / "cifar10")
    rows = run_airbench(work, runs)
    return {"runs": rows, **summary(rows)}


def summary(rows: list[dict]) -> dict:
    accs = [r["test_acc"] for r in rows]
    out = {"acc_mean": round(statistics.mean(accs), 4), "acc_std": round(statistics.pstdev(accs), 4)}
    for key in ("train_s", "wall_s"):
        if all(key in r for r in rows):
            out[f"{key}_mean"] = round(statistics.mean(r[key] for r in rows), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a generated folder, tiny runs: seconds, any machine")
    ap.add_argument("--out", type=Path, default=Path("gpu_check"))
    ap.add_argument("--tarball", type=Path, default=TARBALL)
    ap.add_argument("--runs", type=int, default=None, help="airbench94 and cifar10_fast runs (3; --tiny: 1)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="no part starts after this (8 minutes in all)")
    a = ap.parse_args()
    runs = a.runs or (1 if a.tiny else 3)
    check = Check(a.out, a.budget_s)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = tiny_folder(work / "tiny") if a.tiny else unpack(a.tarball, work / "jpeg")
        data = ["data=imagefolder", f"data.root={root}"]
        small = TINY if a.tiny else []
        check.result["data"] = ("generated 10-class folder, 32x32" if a.tiny
                                else f"CIFAR-10 JPEG copy ({a.tarball.name})")

        check.part("airbench94", lambda: airbench_part(root, work, runs), needs_gpu=True)

        def fast() -> dict:
            rows = [{"seed": s, **timed_run(["recipe=cifar10_fast", *data, f"seed={s}", "model.widths=[64,256,256]",
                                            *small], work / f"fast{s}", work / "cache")} for s in range(runs)]
            return {"runs": rows, **summary(rows)}
        check.part("cifar10_fast_airbench_width", fast)

        def default(seed: int, cache: str) -> dict:
            return timed_run(["recipe=cifar10", *data, f"seed={seed}", *small], work / f"cifar10_{seed}", work / cache)
        check.part("cifar10_seed0_fresh_cache", lambda: default(0, "fresh"))
        if not a.tiny:
            check.part("cifar10_seed1", lambda: default(1, "fresh"))
        check.part("cifar10_fp16_scaler", lambda: timed_run(["recipe=cifar10", *data, "trainer.precision=fp16", *small],
                                                            work / "fp16", work / "fresh"), needs_gpu=True)
        check.part("cifar10_compile", lambda: timed_run(["recipe=cifar10", *data, "trainer.compile=true", *small],
                                                        work / "compiled", work / "fresh"), needs_gpu=True)
        trained = work / "cifar10_0"

        def predict_export() -> dict:
            if not (trained / "checkpoints" / "best.pt").exists():
                raise RuntimeError("seed 0's run left no checkpoint")
            pred = after_training("predict", trained, [f"predict.input={root / 'test'}",
                                                       f"predict.output={work / 'pred.csv'}"])
            exp = after_training("export", trained, [f"predict.output={work / 'export'}"])
            meta = json.loads((work / "export" / "model.json").read_text())
            rows = len((work / "pred.csv").read_text().splitlines()) - 1
            return {"predict_s": pred["wall_s"], "predicted_rows": rows, "export_s": exp["wall_s"],
                    "parity": meta["parity"]}
        check.part("predict_export", predict_export)
        device = "cuda" if torch.cuda.is_available() else "cpu"

        def loader() -> dict:
            kinds, why = ("raw", "jpeg"), {}
            try:
                stored.codec()
            except DataError as e:  # TorchCodec does not load here: the raw cache alone
                kinds, why = ("raw",), {"jpeg": f"skipped: {e}"}
            rows = scale.throughput(root, 8 if device == "cuda" else 2, 1 if a.tiny else 100, 0,
                                    batch=64 if a.tiny else 256, kinds=kinds, device=device, models=())
            first, speed = rows[0::2], rows[1::2]
            return {"to": device, "imagefolder_pil_images_s": speed[0]["torchvision_imagefolder_pil"],
                    **{f"{kind}_images_s": r["safetrain_disk_cache"] for kind, r in zip(kinds, speed)},
                    **{f"{kind}_cache_mb": r["cache_mb"] for kind, r in zip(kinds, first)},
                    **{f"{kind}_first_pass_s": r["seconds"] for kind, r in zip(kinds, first)}, **why}
        check.part("disk_cache_loader", loader)
    check.result["targets"] = verdicts(check.result)
    (a.out / "gpu_check.json").write_text(json.dumps(check.result, indent=1))
    (a.out / "gpu_check.md").write_text(markdown(check.result))
    print((a.out / "gpu_check.md").read_text())


def verdicts(r: dict) -> dict:
    """Issue 25's GPU targets, met or not (None: not measured)."""
    p = r["parts"]
    out = {}
    runs = [p.get(k, {}) for k in ("cifar10_seed0_fresh_cache", "cifar10_seed1")]
    if all(x.get("status") == "ok" for x in runs):
        out["cifar10 >= 92.5% in <= 60 s"] = all(x["test_acc"] >= TARGETS["cifar10_acc"]
                                                 and x["wall_s"] <= TARGETS["cifar10_wall_s"] for x in runs)
    ab, fast = p.get("airbench94", {}), p.get("cifar10_fast_airbench_width", {})
    if ab.get("status") == fast.get("status") == "ok":
        out["cifar10_fast >= 90.5% in <= 1.5x airbench94's time"] = (
            fast["acc_mean"] >= TARGETS["fast_acc"]
            and fast["train_s_mean"] <= TARGETS["fast_vs_airbench"] * ab["train_s_mean"])
    fp16 = p.get("cifar10_fp16_scaler", {})
    if fp16.get("status") == "ok":
        out["fp16 + scaler: no [M26]"] = not any(w.startswith("[M26]") for w in fp16["warnings"])
    return out


def markdown(r: dict) -> str:
    lines = [f"## GPU check (`benchmarks/gpu_check.py`), {r['device']}, {r['date']}", "",
             f"torch {r['torch']}, {r['data']}, {r['elapsed_s']:.0f} s in all.", "",
             "| part | status | test accuracy | training s | wall s | data s (load/split/audit) | peak GPU GB |",
             "|---|---|---|---|---|---|---|"]
    for name, row in r["parts"].items():
        if row["status"] != "ok":
            why = " ".join((row.get("why") or row.get("error", "")).split())  # one table row: no line breaks
            lines.append(f"| {name} | {row['status']}: {why[:200]} | | | | | |")
            continue
        if "runs" in row:
            acc = f"{row['acc_mean']:.4f} +- {row['acc_std']:.4f} ({len(row['runs'])} runs)"
            first = row["runs"][0]
            lines.append(f"| {name} | ok | {acc} | {row.get('train_s_mean', '')} | {row.get('wall_s_mean', '')} | "
                         f"{_data_s(first)} | {first.get('peak_gpu_memory_gb') or ''} |")
        elif "test_acc" in row:
            lines.append(f"| {name} | ok | {row['test_acc']:.4f} ({row['epochs']} epochs) | {row['train_s']} | "
                         f"{row['wall_s']} | {_data_s(row)} | {row.get('peak_gpu_memory_gb') or ''} |")
        else:
            lines.append(f"| {name} | ok: {json.dumps({k: v for k, v in row.items() if k != 'status'})[:300]} "
                         "| | | | | |")
    lines += ["", "Targets: " + ("; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in r["targets"].items())
                                 or "none measured (no GPU)"), ""]
    return "\n".join(lines)


def _data_s(row: dict) -> str:
    d = row.get("data_seconds") or {}
    return "/".join(f"{d.get(k, 0):.0f}" for k in ("load", "split", "audit"))


if __name__ == "__main__":
    main()
