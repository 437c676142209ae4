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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return dist.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("[config] trainer.device=cuda but no CUDA device is visible. "
                          "Use trainer.device=auto (or cpu).")
    return dist.device(name)  # under torchrun: this process's GPU


RUN_FILES = ("config.yaml", "checkpoints", "metrics.jsonl", "metrics.json")  # what marks a directory as a run's


def refuse_used_run_dir(run_dir: Path) -> None:
    """A run never writes into a directory that holds another run's files (they would mix) [M31]."""
    ancestor = Path(run_dir).absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not (ancestor.is_dir() and os.access(ancestor, os.W_OK | os.X_OK)):
        raise ConfigError(f"[config] cannot create or write the run directory {run_dir}: {ancestor} is not a "
                          "writable folder. Choose another one with hydra.run.dir=... (or run from a writable folder).")
    used = [f for f in RUN_FILES if (Path(run_dir) / f).exists()]
    if used:
        go_on = "" if finished(run_dir) else f" If it is this run, stopped before its end, continue it: " \
                                              f"{command(run_dir)}"
        raise ConfigError(f"[M31] {run_dir} already holds a run ({', '.join(used)}); writing into it would mix two "
                          "runs' checkpoints and metrics. Choose another directory (hydra.run.dir=...), or move that "
                          f"run away first.{go_on}")
