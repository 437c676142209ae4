"""Where and how any command runs: the device, the seed, and the run directory it may write. Training, the
commands after it (predict, evaluate, export) and the CLI use these without importing the training stages."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from safetrain import distributed as dist
from safetrain.errors import ConfigError
from safetrain.resume import command, finished


def seed_everything(seed: int) -> None:
    """One seed drives splits, init, shuffling and augmentation [M32]; 0 is a valid seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str, setting: str = "trainer.device") -> torch.device:
    """`setting`: the one the user gave it as (trainer.device, predict.device), for the message."""
    if name == "auto":
        return dist.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"[config] {setting}=cuda but no CUDA device is visible. Use {setting}=auto (or cpu).")
    return dist.device(name)  # under torchrun: this process's GPU


MARK = "safetrain-run.json"  # written first into a run directory: what marks it as a run's
RUN_FILES = (MARK, "config.yaml", "checkpoints", "metrics.jsonl", "metrics.json")  # a run's own files
HYDRA_LOG = "safetrain.log"  # Hydra writes it into the run directory before the run starts
SYSTEM = tuple(Path(p) for p in ("/proc", "/sys", "/dev", "/etc", "/boot", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
                                  "/usr", "/run", "/snap"))


def refuse_used_run_dir(run_dir: Path) -> None:
    """A run writes only into a folder that is new or empty (Hydra's log aside), never into another run's (they would
    mix [M31]), a folder of the user's (its files would be overwritten), or a system folder."""
    path = Path(run_dir).expanduser().absolute()
    real = path.resolve()
    home, system = Path.home().resolve(), [s for s in SYSTEM if s == real or s in real.parents]
    if real in (Path(real.anchor), home) or system:
        what = "your home folder" if real == home else "a system folder" if real == Path(real.anchor) or \
            system[0] == real else f"inside the system folder {system[0]}"
        raise ConfigError(f"[config] {run_dir} is {what}: a run writes a dozen files and folders into its directory. "
                          "Give it a folder of its own, e.g. hydra.run.dir=runs/my_run.")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not (ancestor.is_dir() and os.access(ancestor, os.W_OK | os.X_OK)):
        raise ConfigError(f"[config] cannot create or write the run directory {run_dir}: {ancestor} is not a "
                          "writable folder. Choose another one with hydra.run.dir=... (or run from a writable folder).")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    used = [f for f in RUN_FILES if f in entries]
    if used:
        go_on = "" if finished(run_dir) else f" If it is this run, stopped before its end, continue it: " \
                                              f"{command(run_dir)}"
        raise ConfigError(f"[M31] {run_dir} already holds a run ({', '.join(used)}); writing into it would mix two "
                          "runs' checkpoints and metrics. Choose another directory (hydra.run.dir=...), or move that "
                          f"run away first.{go_on}")
    theirs = [e for e in entries if e != HYDRA_LOG]
    if theirs:
        shown = ", ".join(theirs[:5]) + (" ..." if len(theirs) > 5 else "")
        raise ConfigError(f"[config] {run_dir} is not empty ({shown}): a run writes report.md, figures/, "
                          "checkpoints/ and more into its directory and would overwrite files there. Give a new or "
                          "empty folder (hydra.run.dir=...).")
