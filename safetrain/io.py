"""Files written whole or not at all, and results cached by the fingerprint of what they were computed from.

Every file safetrain writes goes through `atomic_write`: a temp file in the same folder, fsync, then
`os.replace`, so a crash or a signal leaves the previous file (or none), never half of one."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

log = logging.getLogger(__name__)

UMASK = os.umask(0o022)
os.umask(UMASK)  # read once: the process's umask, for files created through temp names


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # as open() would create it (mkstemp makes it private)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(path: Path, obj) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2))


def cache_root(configured: str | None) -> Path:
    """data.cache_dir, else $SAFETRAIN_CACHE, else ~/.cache/safetrain."""
    return Path(configured or os.environ.get("SAFETRAIN_CACHE") or Path.home() / ".cache" / "safetrain").expanduser()


FORMATS = {  # suffix -> (load(path), save(path, value))
    ".json": (lambda p: json.loads(p.read_text()), write_json),
    ".pt": (lambda p: torch.load(p, weights_only=True), save_torch),
}


def cached(path: Path, compute: Callable[[], Any]) -> tuple[Any, bool]:
    """(value, hit): the value stored at `path` (a fingerprint-keyed name, .json or .pt), or `compute()`
    stored there atomically. A cache hit never calls `compute`."""
    load, save = FORMATS[Path(path).suffix]
    if Path(path).exists():
        try:
            return load(Path(path)), True
        except Exception as e:  # a half-written or damaged entry: it must not break every later run
            log.warning("cache entry %s is unreadable (%s: %s); discarded and rebuilt", path, type(e).__name__,
                        str(e)[:100])
            Path(path).unlink(missing_ok=True)
    value = compute()
    save(path, value)
    return value, False
