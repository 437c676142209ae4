import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Every test gets a private cache, so nothing leaks between tests or into ~/.cache."""
    monkeypatch.setenv("SAFETRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))


def write_images(folder: Path, classes: int, per_class: int, size=(8, 8), mode="RGB", seed=0, ext="png"):
    """class_k/img_i.png with a class-dependent mean brightness (learnable), seeded."""
    rng = np.random.default_rng(seed)
    h, w = size
    for k in range(classes):
        d = folder / f"class_{k}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = 40 + 170 * k / max(1, classes - 1)
            shape = (h, w) if mode == "L" else (h, w, 3)
            arr = np.clip(rng.normal(base, 25, shape), 0, 255).astype(np.uint8)
            Image.fromarray(arr, mode=mode).save(d / f"img_{i}.{ext}")
    return folder


def run_cli(*args, cwd=REPO, timeout=300, env=None):
    """`python -m safetrain ...` in a subprocess; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "safetrain", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
