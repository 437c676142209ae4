"""The CIFAR-10 JPEG copy the benchmarks run on (where it is, unpacked into a folder), and one timed safetrain run."""
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

TARBALL = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz"


def unpack(tarball: str | Path, into: Path) -> Path:
    """Extract `tarball` under `into`; the folder holding train/ and test/."""
    with tarfile.open(tarball) as t:
        t.extractall(into, filter="data")
    return next(p.parent for p in Path(into).rglob("train") if p.is_dir())


def timed_run(args: list[str], run_dir: Path, cache: Path) -> dict:
    """One `python -m safetrain ARGS` process with its own cache folder, timed from its start to its exit (its output
    in RUN_DIR.log beside the run); its metrics.json and epochs. A failed run raises with the end of its output."""
    env = {**os.environ, "SAFETRAIN_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    done = subprocess.run([sys.executable, "-m", "safetrain", *args, "trainer.progress=false",
                           f"hydra.run.dir={run_dir}"], env=env, capture_output=True, text=True)
    wall = time.time() - t0
    (run_dir.parent / f"{run_dir.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
    m = json.loads((run_dir / "metrics.json").read_text())
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"test_acc": m["test_acc"], "wall_s": round(wall, 1), "epochs": m["epochs_run"],
            "train_s": round(sum(e.get("epoch_seconds", 0) for e in epochs), 1), "data_seconds": m["data_seconds"],
            "peak_gpu_memory_gb": m.get("peak_gpu_memory_gb"), "warnings": [w[:160] for w in m["warnings"]]}
