"""The disk cache of a streamed dataset (data.disk_cache): its images decoded once, at the training size, into one
file that the epochs read instead of the original files.

- `raw`: an (N, C, H, W) uint8 array as it is (12 KB an RGB image at 64x64): a batch is a few reads, nothing to
  decode. The default where the disk holds it.
- `jpeg`: each image re-encoded as a JPEG at quality 95 at the training size (about 4-6x smaller; within a few grey
  levels of the decoded pixels, so not bit-identical to the in-memory path), decoded again in batches by TorchCodec
  (torchvision's image codecs' successor; 2.6x PIL's speed at 64 px): on the GPU (nvJPEG) when training runs there,
  else on the CPU. For disks that cannot hold the raw file.

Both files are written under a temp name in their folder and renamed once complete, so a killed pass leaves no
half-written cache (the temp file is swept by a later run).
"""
from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from safetrain.errors import DataError
from safetrain.io import UMASK

log = logging.getLogger(__name__)
MODES = ("auto", "raw", "jpeg", "false")  # data.disk_cache ("true" reads as auto)
JPEG_QUALITY = 95
JPEG_SHARE = 0.25  # the size of the JPEG file assumed before writing it, as a share of the raw one (measured: 0.16)
SPARE = 2**30  # bytes kept free on the cache's disk, for checkpoints and logs


def disk_mode(value) -> Optional[str]:
    """data.disk_cache -> "auto", "raw", "jpeg", or None (off: the files decoded at every epoch)."""
    mode = {"true": "auto"}.get(str(value).lower(), str(value).lower())
    assert mode in MODES, f"data.disk_cache={value!r}: one of {MODES}"
    return None if mode == "false" else mode


class _Rows:
    """Rows of an (N, C, H, W) uint8 array in a file on disk: indexing reads only the rows asked for (runs of
    consecutive rows in one read each) into a new tensor. The pages read stay in the OS's file cache, which the OS
    takes back when memory is short, not in this process's memory. Subsets and concatenations keep row numbers, not
    pixels."""

    def __init__(self, path: str, shape: tuple):
        self.path, self.full = str(path), tuple(shape)
        self.rows = torch.arange(shape[0])

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.full[1:]))

    def __getitem__(self, key) -> Tensor:
        """`images[key]` as for a tensor (rows: an int, a slice, indices; then slices of C, H, W), read from disk."""
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        assert all(k is not Ellipsis for k in (first, *rest)), "rows first, then C, H, W"
        rows = self.rows[first]
        out = self._read(rows.reshape(-1).numpy()).view(*rows.shape, *self.full[1:])
        return out[rest if rows.ndim == 0 else (slice(None), *rest)] if rest else out

    def _read(self, rows: np.ndarray) -> Tensor:
        """(len(rows), C, H, W) in the order of `rows`."""
        raise NotImplementedError

    def _runs(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, int, int]]:
        """(open file, positions in `rows`, first row, count) of each run of consecutive rows."""
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        starts = np.flatnonzero(np.diff(ordered, prepend=-2) != 1)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for a, b in zip(starts, [*starts[1:], len(rows)]):
                yield fd, order[a:b], int(ordered[a]), int(b - a)
        finally:
            os.close(fd)

    def subset(self, idx) -> "_Rows":
        out = copy.copy(self)
        out.rows = self.rows[idx]
        return out

    @staticmethod
    def concat(parts: list["_Rows"]) -> "_Rows":
        assert len({(type(m), m.path, m.full) for m in parts}) == 1, "rows of one file only"
        out = copy.copy(parts[0])
        out.rows = torch.cat([m.rows for m in parts])
        return out


class DiskImages(_Rows):
    """The raw cache: row i at byte i * C * H * W."""

    def _read(self, rows: np.ndarray) -> Tensor:
        size, out = math.prod(self.full[1:]), np.empty((len(rows), *self.full[1:]), np.uint8)
        for fd, at, first, count in self._runs(rows):
            out[at] = np.frombuffer(os.pread(fd, count * size, first * size), np.uint8).reshape(count, *self.full[1:])
        return torch.from_numpy(out)


class JpegImages(_Rows):
    """The JPEG cache: image i's bytes at offsets[i]:offsets[i + 1]; a batch's images decoded on `device` in one
    batched call (on CUDA: one nvJPEG call)."""

    def __init__(self, path: str, shape: tuple, offsets: Tensor, device: str = "cpu"):
        super().__init__(path, shape)
        self.offsets, self.device = offsets.long(), torch.device(device)

    def on(self, device: torch.device) -> "JpegImages":
        """The same rows, decoded on `device`; batches then come back there."""
        out = copy.copy(self)
        out.device = torch.device(device)
        return out

    def _read(self, rows: np.ndarray) -> Tensor:
        if not len(rows):
            return torch.empty((0, *self.full[1:]), dtype=torch.uint8, device=self.device)
        data = [None] * len(rows)
        for fd, at, first, count in self._runs(rows):
            ends = self.offsets[first:first + count + 1]
            block = torch.frombuffer(bytearray(os.pread(fd, int(ends[-1] - ends[0]), int(ends[0]))), dtype=torch.uint8)
            for i, b in zip(at.tolist(), torch.split(block, (ends[1:] - ends[:-1]).tolist())):
                data[i] = b
        mode = "RGB" if self.full[1] == 3 else "GRAY"
        return torch.stack(codec()[0](data, mode=mode, device=self.device))


def codec():
    """TorchCodec's (decode_jpeg, JpegEncoder), imported where the JPEG cache is used: everything else runs without
    it (TorchCodec is built for one torch version; a machine whose torch it does not match fails at its import)."""
    try:
        from torchcodec.decoders import decode_jpeg
        from torchcodec.encoders import JpegEncoder
    except (ImportError, OSError, RuntimeError) as e:  # not installed; built for another torch or without its libraries
        raise DataError(f"[data] the JPEG disk cache (data.disk_cache=jpeg, or auto on a disk too small for the decoded "
                        f"images) needs TorchCodec, which does not load here ({type(e).__name__}: {e}). Install the "
                        f"TorchCodec made for torch {torch.__version__} (pip install torchcodec), or keep the decoded "
                        "images: data.disk_cache=raw, with data.cache_dir=DIR on a disk that holds them.") from e
    return decode_jpeg, JpegEncoder


class _Writer:
    """A cache file being written: under a temp name in its folder (swept if the process dies), then complete under
    its own (`commit`), or removed (`discard`)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd, self.tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        os.chmod(self.tmp, 0o666 & ~UMASK)  # as the cache's other files

    def commit(self) -> dict:
        """-> what the cache entry keeps to read the file again."""
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.replace(self.tmp, self.path)
        return {}

    def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        Path(self.tmp).unlink(missing_ok=True)


class RawWriter(_Writer):
    def __init__(self, path: Path, shape: tuple):
        super().__init__(path)
        self.row = math.prod(shape[1:])
        os.ftruncate(self.fd, math.prod(shape))

    def write(self, idx: list[int], images: Tensor) -> None:
        for i, img in zip(idx, images.numpy()):
            os.pwrite(self.fd, img.tobytes(), i * self.row)


class JpegWriter(_Writer):
    """Images appended in the order of their indices (the decode pass's order), each a JPEG; the offsets of those
    that never come (bad files) are empty. The free disk is checked as it grows: SPARE is never given up."""

    def __init__(self, path: Path, shape: tuple):
        self.encoder = codec()[1]
        super().__init__(path)
        self.sizes, self.next = torch.zeros(shape[0], dtype=torch.int64), 0

    def write(self, idx: list[int], images: Tensor) -> None:
        assert idx[0] >= self.next, "written in the order of the indices"
        data = [self.encoder(img).to_tensor(quality=JPEG_QUALITY) for img in images]
        block = b"".join(d.numpy().tobytes() for d in data)
        if shutil.disk_usage(self.path.parent).free < len(block) + SPARE:
            raise DataError(f"[data] the disk of the cache folder {self.path.parent} filled up while the images were "
                            f"re-encoded into it (1 GiB kept spare): {too_large}")
        os.write(self.fd, block)
        self.sizes[idx] = torch.tensor([len(d) for d in data])
        self.next = idx[-1] + 1

    def commit(self) -> dict:
        super().commit()
        return {"offsets": torch.cat([torch.zeros(1, dtype=torch.int64), self.sizes.cumsum(0)])}


too_large = ("free space there, or put the cache on a larger disk: data.cache_dir=DIR (or SAFETRAIN_CACHE=DIR), or "
             "decode the files at every epoch instead of once: data.disk_cache=false (slower).")


def choose(mode: str, small: int, images: int, folder: Path) -> str:
    """The cache's kind for `mode` ("auto": raw where the disk of `folder` holds it with SPARE left, else jpeg), given
    the bytes of the audit's copies (`small`) and of the images at the training size (`images`, 0: not cached); a
    DataError that says how much is needed, where, and what to do when even that does not fit."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    need = {"raw": small + images, "jpeg": small + int(images * JPEG_SHARE)}
    if mode == "auto":
        mode = "raw" if need["raw"] + SPARE <= free else "jpeg"
        if mode == "jpeg":
            log.warning("the images decoded once (%.1f GB) do not fit on the disk of the cache folder %s (%.1f GB "
                        "free): they are kept re-encoded as JPEG at quality %d (about %.1f GB), which the epochs "
                        "decode again (within a few grey levels of the decoded pixels). For the exact pixels: "
                        "data.cache_dir=DIR on a larger disk.", need["raw"] / 1e9, folder, free / 1e9, JPEG_QUALITY,
                        need["jpeg"] / 1e9)
    if need[mode] + SPARE > free:
        what = "decoded once" + (", even re-encoded as JPEG," if mode == "jpeg" else "")
        raise DataError(f"[data] the images {what} ({need[mode] / 1e9:.1f} GB) do not fit on the disk of the cache "
                        f"folder {folder} ({free / 1e9:.1f} GB free, 1 GiB kept spare). "
                        + (too_large[0].upper() + too_large[1:] if images else
                           "Free space there, or put the cache on a larger disk: data.cache_dir=DIR."))
    return mode


def writers(raw: dict, mode: Optional[str]) -> dict:
    """{name: writer} of the `raw` files {name: (path, shape)}: the training-size one ("stored") of `mode`."""
    if mode == "jpeg":
        codec()  # without TorchCodec: stop before any file is opened
    return {name: (JpegWriter if name == "stored" and mode == "jpeg" else RawWriter)(path, shape)
            for name, (path, shape) in raw.items()}


def reader(path: Path, shape: tuple, entry: dict, jpeg: bool) -> _Rows:
    return JpegImages(path, shape, entry["offsets"]) if jpeg else DiskImages(path, shape)


def complete(path: Path, shape: tuple, entry: dict, jpeg: bool) -> bool:
    """Whether the cache file at `path` is there and of the size its entry says."""
    size = int(entry["offsets"][-1]) if jpeg else math.prod(shape)
    return path.is_file() and path.stat().st_size == size
