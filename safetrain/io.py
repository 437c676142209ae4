"""Files written whole or not at all, and results cached by the fingerprint of what they were computed from.

Every file safetrain writes goes through `atomic_write`: a temp file in the same folder, fsync, then
`os.replace`, so a crash or a signal leaves the previous file (or none), never half of one."""
from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

log = logging.getLogger(__name__)

UMASK = os.umask(0o022)
os.umask(UMASK)  # read once: the process's umask, for files created through temp names


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as e:  # named by the file meant, not by a temp name
        raise OSError(e.errno, e.strerror, str(path)) from None
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
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except RuntimeError as e:  # torch reports a failed write (a full disk) as a RuntimeError of its own
        if "inline_container" not in str(e) and "write" not in str(e).lower():
            raise  # not a write: a bug
        free = shutil.disk_usage(path.parent).free / 2**20
        raise OSError(errno.EIO, f"the write failed with {free:.0f} MB free on that disk: "
                                 f"{str(e).splitlines()[0][:160]}", str(path)) from None


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2))


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """`rows` under a header of `columns` (a key a row lacks: an empty cell)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, restval="")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def cache_root(configured: str | None) -> Path:
    """data.cache_dir, else $SAFETRAIN_CACHE, else ~/.cache/safetrain."""
    return Path(configured or os.environ.get("SAFETRAIN_CACHE") or Path.home() / ".cache" / "safetrain").expanduser()


FORMATS = {  # suffix -> (load(path), save(path, value))
    ".json": (lambda p: json.loads(p.read_text()), write_json),
    ".pt": (lambda p: torch.load(p, weights_only=True), save_torch),
}


def sweep_temp_files(folder: Path, min_age_s: float = 60.0) -> None:
    """Remove the temp files of writes that never finished (a process killed mid-write): those of processes that no
    longer run (the pid is in the name), a minute old at least."""
    for tmp in Path(folder).glob(".*.tmp"):
        parts = tmp.name.split(".")
        pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
        try:
            if pid is not None and not _alive(pid) and time.time() - tmp.stat().st_mtime > min_age_s:
                tmp.unlink()
        except OSError:
            pass  # gone already, or not ours to remove


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def cached(path: Path, compute: Callable[[], Any], keys: tuple[str, ...] = ()) -> tuple[Any, bool]:
    """(value, hit): the value stored at `path` (a fingerprint-keyed name, .json or .pt), or `compute()`
    stored there atomically. A cache hit never calls `compute`. An entry that cannot be read, or is not a dict with
    `keys`, is discarded and rebuilt; a cache that cannot be written is said, and the run goes on without it."""
    load, save = FORMATS[Path(path).suffix]
    if Path(path).parent.is_dir():
        sweep_temp_files(Path(path).parent)
    if Path(path).exists():
        try:
            value = load(Path(path))
            missing = [k for k in keys if not isinstance(value, dict) or k not in value]
            if not missing:
                return value, True
            why = f"ValueError: not an entry of this kind (missing {', '.join(missing)})"
        except Exception as e:  # noqa: BLE001  a half-written or damaged entry: it must not break every later run
            why = f"{type(e).__name__}: {str(e)[:100]}"
        log.warning("cache entry %s is unreadable (%s); discarded and rebuilt", path, why)
        Path(path).unlink(missing_ok=True)
    value = compute()
    try:
        save(path, value)
    except OSError as e:
        log.warning("could not write the cache entry %s (%s): going on without it, so this work is redone next time. "
                    "Free space there, or put the cache elsewhere with data.cache_dir=DIR or SAFETRAIN_CACHE=DIR.",
                    path, e.strerror or e)
    return value, False
