"""Dataset sources -> `Source`: class names plus splits of uint8 images (fast path) or files (stream).

Every source returns the same shape of thing, so splitting, statistics and loading never
need to know where the pixels came from.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import math
import os
import re
import shlex
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from safetrain.data.files import (AUTO_SIDE, IMAGE_EXTENSIONS, TURNED, Fit, auto_side, channels_of, fit_image, header,
                                  hidden, list_images, orientation, pixel_limit, printable, refuse_non_utf8_names,
                                  shrink_on_load, skipped_text, to_array, upright)
from safetrain.data.stored import DiskImages, JpegImages, choose, complete, disk_mode, reader, writers
from safetrain.errors import DataError
from safetrain.findings import Finding
from safetrain.io import cached

log = logging.getLogger(__name__)
MEMORY_LIMIT_BYTES = 4 * 2**30  # folders whose decoded pixels exceed this stream from disk


@dataclass
class ImageSet:
    """The samples of one split: labels, stable ids, and decoded images or image files."""

    labels: Tensor  # (N,) int64 class indices; multi-label: (N, C) float 0/1, one column per label
    ids: list[str]
    images: Optional[Tensor] = None  # (N, C, H, W) uint8: the in-memory fast path
    files: Optional[list[str]] = None  # absolute paths: the streaming path
    digests: Optional[list[bytes]] = None  # content hashes, once computed (splits.copy_groups): kept by subsets
    joined: list = field(default_factory=list)  # train: near-duplicates moved in from carved val/test (splits.py)
    small: Optional[DiskImages] = None  # streamed: every image at AUDIT_SIDE, from the pass that checks the files
    stored: Optional[DiskImages | JpegImages] = None  # streamed: every image decoded once at the training size (the
    # disk cache: data/stored.py)

    def __len__(self) -> int:
        return len(self.labels)

    def digest(self, i: int) -> bytes:
        """Sample i's content hash, of its decoded pixels: kept once computed (a streamed split's come from the pass
        that decoded it)."""
        if self.digests is not None:
            return self.digests[i]
        return hashlib.blake2b(self.images[i].numpy().tobytes(), digest_size=16).digest()

    def subset(self, idx: Tensor) -> "ImageSet":
        pick = idx.tolist()
        return ImageSet(self.labels[idx], [self.ids[i] for i in pick],
                        None if self.images is None else self.images[idx],
                        None if self.files is None else [self.files[i] for i in pick],
                        None if self.digests is None else [self.digests[i] for i in pick],
                        small=None if self.small is None else self.small.subset(idx),
                        stored=None if self.stored is None else self.stored.subset(idx))

    def pixels(self) -> Optional[Tensor]:
        """What the audit searches: the images in memory, or their copies at AUDIT_SIDE when streamed."""
        return self.images if self.images is not None else self.small


AUDIT_SIDE = 32  # the audit searches images shrunk to this shorter side (data/audit.py): a streamed dataset keeps
# such a copy of every image from the pass that checks its files (3 KB an RGB image at 32x32; 300 MB per 100,000)


def audit_hw(h: int, w: int) -> tuple[int, int]:
    """The (height, width) the audit searches an H x W image at: AUDIT_SIDE on the shorter side, never larger."""
    scale = min(1.0, AUDIT_SIDE / min(h, w))
    return round(h * scale), round(w * scale)


def audit_size(images: Tensor, chunk: int = 1024) -> Tensor:
    """(N, C, H, W) uint8 shrunk (antialiased) to audit_hw, or as they are when no larger."""
    size = audit_hw(*images.shape[-2:])
    if size == tuple(images.shape[-2:]):
        return images
    return torch.cat([F.interpolate(images[i:i + chunk].float(), size=size, mode="bilinear", antialias=True)
                      .round().clamp(0, 255).byte() for i in range(0, len(images), chunk)])


@dataclass(frozen=True)
class DataSpec:
    """What a run's data is and how it is split: made once from the data settings (config.data_spec), saved in the
    checkpoints, and read by training, predict, evaluate and export alike, so they all load the same splits."""
    name: str
    root: Optional[str] = None
    image_size: Optional[int] = None  # data.image_size, else the starting weights' resolution [M35]
    resize: str = "crop"  # data.resize: how images of another shape are fitted to it (files.Fit)
    auto_side: tuple[int, int] = AUTO_SIDE["cpu"]  # bounds of the size chosen for mixed sizes: the device's
    max_image_pixels: Optional[int] = None  # larger images are bad files (None: PIL's decompression-bomb limit)
    path_column: str = "path"  # data=csv: the columns of the image paths, the labels, and (optional) the splits
    label_column: str = "label"
    split_column: Optional[str] = None
    label_delimiter: Optional[str] = None  # several labels in one cell: a multi-label task
    loader: str = "auto"
    disk_cache: str = "auto"  # streamed: decoded once into a file on disk that the epochs read (data/stored.py)
    num_workers: int = 4
    download: bool = True
    bad_files: str = "refuse"
    allow_similar_labels: bool = False  # labels that differ only in case or spacing: refused unless true [M08]
    synthetic: tuple = ()  # data.synthetic's (key, value) pairs
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    min_samples_per_class: int = 5
    imbalance_ratio: Optional[float] = None
    min_eval_per_class: int = 20

    def to_dict(self) -> dict:
        return {**asdict(self), "synthetic": dict(self.synthetic)}

    @classmethod
    def from_dict(cls, values: dict) -> "DataSpec":
        return cls(**{**values, "synthetic": tuple(values["synthetic"].items())})


class Decoding(NamedTuple):
    """How a split's files become images: the (C, H, W) every image has after decoding, the square size files are
    resized to (None: they already have it), and how many worker processes decode them."""
    shape: tuple[int, int, int]
    resize: Optional[Fit] = None
    num_workers: int = 0


@dataclass
class Source:
    classes: list[str]
    parts: dict[str, ImageSet]  # "train" always; "val"/"test" when the source defines them
    fingerprint: str  # identifies the pixels and labels, for caches
    shape: tuple[int, int, int]  # (C, H, W) every image has after decoding
    resize: Optional[Fit] = None  # files are decoded to this size (None: they all have it)
    left_out: dict = field(default_factory=dict)  # {"skipped": hidden/non-image entries, "bad": {file: why}}

    def decoding(self, num_workers: int) -> Decoding:
        return Decoding(self.shape, self.resize, num_workers)

    @property
    def task(self) -> str:
        """What the labels make: one class per image (multiclass) or a 0/1 row of labels (multilabel)."""
        return "multilabel" if any(s.labels.ndim == 2 for s in self.parts.values()) else "multiclass"


def digest(*chunks) -> str:
    h = hashlib.blake2b(digest_size=16)
    for c in chunks:
        h.update(c if isinstance(c, bytes) else str(c).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- torchvision datasets
TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def load_torchvision(name: str, root: str, download: bool = True) -> Source:
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION[name])
    parts, classes = {}, None
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(root=root, train=train, download=download)
        except Exception as e:  # network down, checksum mismatch, files missing
            raise DataError(
                f"[data] could not load {TORCHVISION[name]} from data.root={root!r} ({type(e).__name__}: {e}). "
                f"Either let it download (needs internet, data.download=true), put torchvision's files "
                f"for {TORCHVISION[name]} under that folder and set data.root to it, or train on an image "
                f"folder: data=imagefolder data.root=<folder with train/<class>/*.png>.") from None
        images = torch.as_tensor(ds.data)
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # (N,C,H,W)
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        parts[split] = ImageSet(labels, [f"{split}/{i}" for i in range(len(labels))], images.contiguous())
        classes = list(ds.classes)
    fp = digest(name, *(p.images.numpy().tobytes() for p in parts.values()))
    return Source(classes, parts, fp, tuple(parts["train"].images.shape[1:]))


# ---------------------------------------------------------------- synthetic
def load_synthetic(classes: int, samples_per_class: int, channels: int, size: int, seed: int) -> Source:
    """A small learnable dataset made from the seed: each class is a smooth random pattern,
    each sample that pattern shifted, with noise. Learnable in a few epochs on a CPU."""
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.rand(classes, channels, 4, 4, generator=g), size=(size, size),
                           mode="bilinear", align_corners=False)  # (K, C, S, S) in [0, 1]
    labels = torch.arange(classes).repeat_interleave(samples_per_class)
    shifts = torch.randint(-2, 3, (len(labels), 2), generator=g)
    x = torch.stack([protos[y].roll(tuple(s.tolist()), dims=(1, 2)) for y, s in zip(labels, shifts)])
    x = x + 0.15 * torch.randn(x.shape, generator=g)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    all_ = ImageSet(labels, [f"synthetic/{i}" for i in range(len(labels))], images)
    fp = digest("synthetic", classes, samples_per_class, channels, size, seed)
    return Source([f"class_{k}" for k in range(classes)], {"all": all_}, fp, (channels, size, size))


# ---------------------------------------------------------------- image folders
def _list_classes(folder: Path) -> tuple[dict[str, list[Path]], Counter]:
    """{class: image files} of a folder of class folders, and how many entries were skipped (data/files.py)."""
    classes, skipped = {}, Counter()
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        if hidden(d.name):
            skipped["hidden"] += 1
            continue
        files, n = list_images(d)
        skipped += n
        if not files:
            raise DataError(f"[data] class folder {printable(d)} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            f"what it holds: {skipped_text(n) if n else 'nothing'}. Remove it, put its images in it, "
                            "or convert them to one of those formats.")
        classes[d.name] = files
    pooled = {c: sorted({f.relative_to(folder / c).parts[0] for f in fs}) for c, fs in classes.items()
              if all(f.parent != folder / c for f in fs)}
    if any(len(subs) > 1 for subs in pooled.values()):
        log.info("[data] in %s each class is a top folder, the images of its subfolders pooled: %s. If the subfolders "
                 "are the classes, move them up to %s, one folder per class.", folder, "; ".join(
                     f"{c}/ = {', '.join(subs[:4])}{' ...' if len(subs) > 4 else ''}" for c, subs in pooled.items()),
                 folder)
    loose = [f.name for f in folder.iterdir() if f.is_file() and not hidden(f.name)
             and f.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        log.warning("[data] %d image(s) in %s are in no class folder and are not read (e.g. %s): move each into the "
                    "folder of its class", len(loose), folder, sorted(loose)[0])
    return classes, skipped


def decode_image(path: str, channels: int, resize: Optional[Fit]) -> Tensor:
    """One file -> (C, H, W) uint8 with the dataset's channel count (and size, if resizing)."""
    try:
        return _decode(path, channels, resize)
    except (OSError, ValueError) as e:
        raise DataError(f"[data] cannot decode image {path} ({e}). Remove or replace the file.") from None


def _decode(path: str, channels: int, resize: Optional[Fit]) -> Tensor:
    """`resize`: the size and the rule (training's, and inference's from the checkpoint), or None."""
    with Image.open(path) as im:  # to_array reads every pixel: a file cut after its header fails here
        turn = orientation(im)
        stored = resize._replace(size=resize.size[::-1]) if resize and turn in TURNED else resize
        arr = upright(to_array(shrink_on_load(im, stored) if resize else im, channels), turn)
    if resize:
        arr = fit_image(arr, resize)
    t = torch.from_numpy(np.array(arr))  # a writable copy
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _scan(files: list[Path], image_size: Optional[int], bounds: tuple[int, int]
          ) -> tuple[list[Path], dict, int, tuple[int, int], bool]:
    """Every file's header: (the good files, the bad ones {file: why}, channels, the size (H, W) they are trained at,
    whether they are resized to it): `image_size`, or for images of several sizes one chosen from their shorter
    sides within `bounds`, or the one size they all have."""
    heads = {f: header(f) for f in files}
    bad = {f: h for f, h in heads.items() if isinstance(h, str)}
    good = {f: h for f, h in heads.items() if f not in bad}
    if not good:
        shown = "\n".join(f"  {f}: {why}" for f, why in list(bad.items())[:3])
        missing = all(why == "no such file" for why in bad.values())
        raise DataError(f"[data] none of the {len(files)} files listed can be used, e.g.:\n{shown}\n"
                        + ("None of them exists: a CSV's paths are read relative to the CSV's own folder (or as "
                           "absolute paths); check that data.root points at the CSV beside the images." if missing
                           else "Check data.root and the files."))
    sizes = {}
    for f, (_, size) in good.items():
        sizes.setdefault(size, f)
    side = image_size
    if len(sizes) > 1:
        sides = {f: min(size) for f, (_, size) in good.items()}
        median = sorted(sides.values())[len(sides) // 2]
        if not image_size:
            side = auto_side(list(sides.values()), bounds)
            log.info("data.image_size not set: the images have %d sizes (shorter side %d to %d px, median %d); "
                     "training at %dx%d, their median within %d-%d px, what this device affords (data.image_size=N "
                     "sets another)", len(sizes), min(sides.values()), max(sides.values()), median, side, side, *bounds)
        _warn_tiny(good, sides, side, median)
    return list(good), bad, channels_of({m for m, _ in good.values()}), (side, side) if side else max(sizes), \
        bool(side)


def _warn_tiny(heads: dict, sides: dict, side: int, median: int) -> None:
    """Images (shorter `sides`) a quarter of the training `side` or less, among larger ones: thumbnails or icons saved
    with the photos (a 4x4 file enlarged to 32x32 is a blur), worth a look."""
    tiny = [f for f, s in sides.items() if 4 * s <= min(side, median)]
    if tiny:
        f, (h, w) = tiny[0], heads[tiny[0]][1]
        log.warning("[data] %d image(s) are a quarter of the training size (%d px) or less, where the median image "
                    "has %d px (e.g. %s, %dx%d): each is enlarged %dx or more and shows little. Thumbnails or icons "
                    "saved among the photos? Look at them, and remove those that are.", len(tiny), side, median, f,
                    w, h, side // min(h, w))


def _refuse_or_skip(bad: dict, total: int, policy: str) -> dict:
    """`bad` ({file: why}) refused in one DataError (data.bad_files=refuse), or logged and returned (skip)."""
    if bad and policy != "skip":
        shown = "\n".join(f"  {f}: {why}" for f, why in list(bad.items())[:50])
        more = "\n  ..." if len(bad) > 50 else ""
        raise DataError(f"[data] {len(bad)} of {total} files cannot be used:\n{shown}{more}\nRemove or "
                        "replace them, or set data.bad_files=skip to train without them.")
    if bad:
        f, why = next(iter(bad.items()))
        log.warning("data.bad_files=skip: left out %d unusable files (e.g. %s: %s)", len(bad), f, why)
    if len(bad) == total:
        raise DataError("[data] no usable image among the files found. Check the folder.")
    return bad


class Listing(NamedTuple):
    """Image files as a source lists them, before any is opened."""
    rows: list[tuple[str, Path, int]]  # (part: all/train/val/test, file, class index)
    classes: list[str]
    base: Path  # sample ids are file paths relative to it
    skipped: dict  # hidden, non-image or special entries left out, counted by kind (files.list_images)
    what: str  # for the log: "image folder DIR", "CSV FILE"


def load_folder(root: str, image_size: Optional[int], loader: str, cache_dir: Path, num_workers: int,
                bad_files: str = "refuse", resize: str = "crop", auto_side: tuple = AUTO_SIDE["cpu"],
                disk_cache: str = "auto", allow_similar_labels: bool = False) -> Source:
    return load_files(refuse_similar_labels(list_folder(root), allow_similar_labels), image_size, loader, cache_dir,
                      num_workers, bad_files, resize, auto_side, disk_cache)


TABLES = (".csv", ".tsv")  # what data=csv reads: a data.root or predict.input with these is a table of labels
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
               "test": "test", "testing": "test"}  # a split column's values and split folders' names (any case);
# valid/: Roboflow's exports, validation/: Kaggle's


def _split_folders(folder: Path) -> dict[str, Path]:
    """{split: its folder} where `folder` holds split folders (train/, val/ or valid/ or validation/, test/: any case,
    each holding class folders; a class may be called Test or train); two folders for one split are refused; other
    folders beside them, which would not be read, are named."""
    dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not hidden(d.name))
    found: dict[str, list[Path]] = {}
    for d in dirs:  # a split folder holds class folders; one named like a split that holds images is a class
        if d.name.lower() in SPLIT_NAMES and any(c.is_dir() and not hidden(c.name) for c in d.iterdir()):
            found.setdefault(SPLIT_NAMES[d.name.lower()], []).append(d)
    twice = [ds for ds in found.values() if len(ds) > 1]
    if twice:
        raise DataError(f"[data] {folder} has {' and '.join(d.name + '/' for d in twice[0])}: two folders for one "
                        "split. Merge them into one, or rename or move the other.")
    unread = [d.name for d in dirs if not any(d in ds for ds in found.values())]
    unlabeled = [d for d in dirs if d.name in unread and d.name.lower() in SPLIT_NAMES]
    for d in unlabeled if found else []:  # Kaggle's layout: train/<class>/ beside a test/ of images with no label
        unread.remove(d.name)
        log.warning("[data] %s holds images in no class folder: without labels it is not a split, and is not read "
                    "(the %s split is carved from train/). To label it, put each image in its class's folder; to "
                    "predict it after training: python -m safetrain mode=predict predict.checkpoint=<the run> "
                    "predict.input=%s", printable(d), SPLIT_NAMES[d.name.lower()], printable(d))
    if found and unread:
        log.warning("[data] %s: the folders %s beside the split folders are not read (split folders: train/, val/ "
                    "or valid/ or validation/, test/). Move their images into a split, or leave them out to silence "
                    "this.", folder, unread)
    return {split: ds[0] for split, ds in found.items()}


ARCHIVES = {".zip": "unzip {a} -d {d}", ".7z": "7z x {a} -o{d}", ".rar": "mkdir {d} && unrar x {a} {d}/",
            **dict.fromkeys((".tar", ".tar.gz", ".tgz", ".tar.xz"), "mkdir {d} && tar xf {a} -C {d}")}  # -> {d}/


def refuse_archive(path: Path, root: str, table: bool = False) -> None:
    """data.root given as the archive a dataset was downloaded as: refused with the command that extracts it
    beside itself and the data.root to give then (from a zip's table of contents: its one top folder, or for
    data=csv its one table of labels)."""
    kind = next((k for k in sorted(ARCHIVES, key=len, reverse=True) if path.name.lower().endswith(k)), None)
    if kind is None or not path.is_file():
        return
    folder = path.with_name(path.name[:-len(kind)] or "data")
    inside: set[str] = set()
    if kind == ".zip":
        with contextlib.suppress(OSError, zipfile.BadZipFile):
            names = [n for n in zipfile.ZipFile(path).namelist() if not n.startswith("__MACOSX")]
            inside = ({n for n in names if n.lower().endswith(TABLES)} if table
                      else {n.split("/")[0] for n in names if "/" in n})
    given = folder / inside.pop() if len(inside) == 1 else folder
    hint = "/<the table of labels in it>" if table else " (or the folder in it that holds the class folders)"
    command = ARCHIVES[kind].format(a=shlex.quote(str(path)), d=shlex.quote(str(folder)))
    raise DataError(f"[data] data.root={root!r} is a {kind} archive, which safetrain does not read inside. Extract "
                    f"it first, for example `{command}`, then give data.root={given}"
                    + (hint if given == folder else "") + ".")


def list_folder(root: str) -> Listing:
    """A folder of class folders (`train/`, `val/`, `test/` above them where the user split the data)."""
    folder = Path(root).expanduser()
    refuse_archive(folder, root)
    if folder.is_file() and folder.suffix.lower() in TABLES:
        raise DataError(f"[data] data.root={root!r} is a table of labels: read it with data=csv data.root={root}")
    if not folder.is_dir():
        image = folder.is_file() and folder.suffix.lower() in IMAGE_EXTENSIONS
        raise DataError(f"[data] data.root={root!r} is not a folder. Point data.root at a folder with "
                        "train/<class>/ images (and optional val/, test/), or with one folder per class."
                        + (" To classify this one image with a trained model: python -m safetrain mode=predict "
                           f"predict.checkpoint=<the run> predict.input={root}" if image else ""))
    layout = _split_folders(folder)
    if layout and "train" not in layout:
        raise DataError(f"[data] {folder} has {sorted(d.name for d in layout.values())} but no train/ folder. Rename "
                        "the training split to train/, or use one folder per class at the top.")
    layout = layout or {"all": folder}
    listed = {part: _list_classes(d) for part, d in layout.items()}
    refuse_non_utf8_names([f for found, _ in listed.values() for fs in found.values() for f in fs], folder)
    per_part, skipped = {p: c for p, (c, _) in listed.items()}, sum((n for _, n in listed.values()), Counter())
    first = "train" if "train" in per_part else "all"
    classes = list(per_part[first])
    tables = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in TABLES)
    labels = f"It holds {tables[0].name}: to read the labels from it, data=csv data.root={tables[0]}" if tables else ""
    if len(classes) < 2:
        inner = layout[first] / classes[0] if classes else None
        nested = inner is not None and len([d for d in inner.iterdir() if d.is_dir() and not hidden(d.name)]) > 1
        raise DataError(f"[M08] {layout[first]} has {len(classes)} class folder(s) {classes}; a classifier needs at "
                        "least 2. " + (f"The class folders seem to be one level down: data.root={inner}" if nested
                                       else labels or _labels_in_names(inner or layout[first])))
    as_split = {c: SPLIT_NAMES.get(re.sub(r"\d+$", "", c.lower())) for c in classes}  # test1/: Kaggle's
    if all(as_split.values()):
        train_like = layout[first] / max(classes, key=lambda c: as_split[c] == "train")
        raise DataError(f"[data] {layout[first]}: the class folders {classes} are named like splits, and hold images, "
                        "not class folders: trained as they are, the model would learn to tell the splits apart. A "
                        "split folder holds one folder per class (train/cat/, train/dog/). "
                        + (labels or _labels_in_names(train_like)))
    for part, found in per_part.items():
        extra = set(found) - set(classes)
        if extra:
            raise DataError(f"[data] {layout[part]} has class folders {sorted(extra)} that {layout[first]} "
                            f"lacks. Every split must use the training split's classes.")
    rows = [(part, f, classes.index(c)) for part, found in per_part.items() for c, fs in found.items() for f in fs]
    _table_beside(tables, {f.stem for _, f, _ in rows}, classes)
    return Listing(rows, classes, folder, skipped, f"image folder {folder}")


def _table_beside(tables: list[Path], stems: set[str], classes: list[str]) -> None:
    """A table beside the class folders that names their images but none of the classes (Kaggle's labels.csv beside
    images/ of files named by id): the classes are the folders' names, which may not be the labels; warned with the
    line that reads the table. Only its first 64 KB are read."""
    for table in tables:
        with open(table, encoding="utf-8", errors="replace") as f:
            text = f.read(65536)
        raw = {c.strip().strip('"') for line in text.splitlines() for c in re.split("[,;\t]", line)}
        named = len({Path(c).stem for c in raw} & stems)
        if named >= 2 and not raw & set(classes):  # a table that uses the folders' names agrees with them
            log.warning("[data] %s names %d of the images in the class folders %s: the classes are those folders' "
                        "names. If the table holds the labels: data=csv data.root=%s", table, named, classes[:5], table)


def _labels_in_names(folder: Path) -> str:
    """How to give images classes when they have none: where their names start with a label (Kaggle's
    cat.0.jpg, dog.1.jpg), the shell loop that moves each into its label's folder."""
    names = [f.name for f in sorted(folder.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS] \
        if folder.is_dir() else []
    stems = [re.sub(r"[._ -]*[0-9]+\.[^.]+$", "", n) for n in names]  # as the loop's sed reads them
    labels = Counter(t for t, n in zip(stems, names) if t != n and re.search("[A-Za-z]", t))
    if len(labels) < 2 or sum(labels.values()) < 0.9 * len(names) or len(labels) > len(names) / 4:
        return "Put each class's images in its own subfolder."
    ext = Counter(Path(n).suffix for n in names).most_common(1)[0][0]  # a loop over *.* would move notes.txt too
    counts = ", ".join(f"{k} {n}" for k, n in labels.most_common(5)) + (" ..." if len(labels) > 5 else "")
    return (f"The names of the {len(names)} images in {folder} start with a label ({counts}): to move each into its "
            f"label's folder, run `cd {shlex.quote(str(folder))} && for f in *{ext}; do d=$(echo \"$f\" | sed -E "
            "'s/[._ -]*[0-9]+\\.[^.]+$//'); mkdir -p \"$d\" && mv \"$f\" \"$d/\"; done`, then give data.root="
            f"{folder}.")


class Columns(NamedTuple):
    """data=csv: which columns hold the image paths, the labels and (optionally) the splits."""
    path: str = "path"
    label: str = "label"
    split: Optional[str] = None
    delimiter: Optional[str] = None  # between several labels in one cell


def refuse_similar_labels(listing: Listing, allow: bool) -> Listing:
    """[M08] Labels written more than one way ('CAT', 'cat', 'Cat ', 'sea-lion' and 'sea_lion') would train as
    classes of their own, each with a share of the images: refused, every group with its image counts, unless
    data.allow_similar_labels (where case or spacing is the class: letters, say)."""
    groups: dict[str, list[int]] = {}
    for k, name in enumerate(listing.classes):
        groups.setdefault(" ".join(re.split(r"[\s_-]+", name.casefold())).strip(), []).append(k)
    similar = [g for g in groups.values() if len(g) > 1]
    if similar and not allow:
        counts = Counter(k for _, _, y in listing.rows for k in (y if isinstance(y, tuple) else (y,)))
        shown = "; ".join(" and ".join(f"{listing.classes[k]!r} ({counts[k]})" for k in g) for g in similar[:5])
        raise DataError(f"[M08] {listing.what}: {len(similar)} label(s) written more than one way, which would train "
                        f"as different classes: {shown}{' ...' if len(similar) > 5 else ''} (images each). Write each "
                        "label one way (in the file, or as one folder), or, if case or spacing is what tells those "
                        "classes apart, set data.allow_similar_labels=true.")
    return listing


JOINERS = "|;,+ "  # characters that join several labels in one cell (a space: Planet's 'clear primary water')


def joined_labels(classes: list[str]) -> Optional[Finding]:
    """[M13] A CSV read with one label a cell (data.label_delimiter unset) whose labels look like several joined by
    one character ('cat|animal', 'cat|animal|outdoor', 'dog|animal'): most of them hold it, and its parts recur across
    labels. Trained as they are, each combination would be a class of its own (a multi-class task over 12 combinations
    of 8 tags, softmax where each tag needs its own sigmoid). Warned with the setting that reads them as tags."""
    for c in JOINERS:
        joined = [k for k in classes if c in k]
        parts = Counter(t.strip() for k in joined for t in k.split(c) if t.strip())
        shared = [t for t, n in parts.items() if n > 1]
        combined = c != " " or len(joined) > len(parts)  # spaces join words of names too ('golden retriever'): tags
        # only where the labels outnumber their parts, as combinations of a few tags do
        if 2 * len(joined) >= len(classes) and shared and combined:
            return Finding("M13", "labels joined in one cell", (
                f"{len(joined)} of the {len(classes)} labels hold '{c}' ({', '.join(repr(k) for k in joined[:3])}"
                f"{' ...' if len(joined) > 3 else ''}), and parts of them recur ({', '.join(repr(t) for t in shared[:3])}"
                f"): they look like several labels of one image, each combination trained as a class of its own."),
                f"For several labels per image: data.label_delimiter='{c}'" + (" (quoted in the shell: "
                "'data.label_delimiter=\" \"')" if c == " " else "") + " (a multi-label task, a sigmoid per label). "
                f"If '{c}' is part of your class names, leave it unset.", "data", evidence={"joiner": c,
                                                                                         "labels": len(joined)})
    return None


def _one_row_per_image(rows: list[tuple], problems: list[str], base: Path) -> tuple[list[tuple], list[str]]:
    """An image listed twice: with the same label and split, the second row is dropped (it would count the image
    twice); with another, both rows are a problem (which label is right?)."""
    first, kept = {}, []
    for split, file, label in rows:
        if file not in first:
            first[file] = (split, label)
            kept.append((split, file, label))
        elif first[file] != (split, label):
            problems.append(f"{os.path.relpath(file, base)} listed twice, as {first[file][1] or 'no label'!r} and "
                            f"{label or 'no label'!r}")
    if len(kept) < len(rows):
        log.info("data=csv: %d rows list an image a row above already lists: read once", len(rows) - len(kept))
    return kept, problems


def _parts(file: str) -> tuple[str, ...]:
    """A path as a CSV holds it, in parts: Windows' (backslashes, a drive) or POSIX's."""
    windows = "\\" in file or re.match(r"^[A-Za-z]:", file)
    return (PureWindowsPath(file) if windows else PurePosixPath(file)).parts


def _locate(files: list[str], csv_file: Path) -> list[Path]:
    """A CSV's paths -> files: relative to the CSV's folder or absolute, backslashes read as folders. Where none of
    them exists as written, the ways such a CSV is usually meant are tried on its first path: written on another
    machine (C:\\Users\\ana\\photos\\cat\\1.jpg, /home/ana/photos/cat/1.jpg: found under the CSV's folder without
    their first parts), or ids of files in a folder beside the CSV, with or without their extension (Kaggle's
    `image_id,label` beside `train_images/`). The first way that finds it is applied to every path, and the log says
    which. Files still missing are bad files (listed, refused or skipped)."""
    base = csv_file.parent
    parts = [_parts(f) for f in files]
    found = [(base / Path(*p)).resolve() if p and not PurePosixPath(f).is_absolute() else Path(*p)
             for f, p in zip(files, parts)]
    if not found or any(f.exists() for f in found):
        return found
    for how, move in _ways(parts[0], base, "\\" in files[0]):
        moved = [move(p) for p in parts]
        there = sum(m is not None and m.exists() for m in moved)
        log.warning("%s: none of its paths exists as written (e.g. %s); %s, where %d of the %d files are (write "
                    "the paths relative to the CSV to read them as written)", csv_file, files[0], how, there,
                    len(files))
        return [m.resolve() if m is not None else f for m, f in zip(moved, found)]
    return found


def _ways(first: tuple[str, ...], base: Path, windows: bool):
    """(what was done, parts -> file or None) for each way of reading a CSV's paths under which its first path
    `first` (in parts) exists; see _locate."""
    for k in range(1, len(first)):
        if (base / Path(*first[k:])).exists():
            prefix = first[:k]
            shown = PureWindowsPath(*prefix) if windows else PurePosixPath(*prefix)
            yield (f"they start with {shown}, which is not on this machine: read from under the CSV's folder {base}",
                   lambda p: base / Path(*p[k:]) if p[:k] == prefix else None)
            return
    named = PurePosixPath(first[-1]).suffix.lower() in IMAGE_EXTENSIONS
    for folder in [base] + sorted(d for d in base.iterdir() if d.is_dir() and not hidden(d.name)):
        for ext in [""] + ([] if named else list(IMAGE_EXTENSIONS)):
            if (folder / Path(*first[:-1]) / (first[-1] + ext)).is_file():
                yield (f"read from {folder}" + (f" with {ext} added to each name" if ext else ""),
                       lambda p: folder / Path(*p[:-1]) / (p[-1] + ext))
                return


def _columns_seen(table: list[dict], names: list) -> str:
    """The settings that name a CSV's columns, filled in where its cells tell: the one column of image file names
    (else the one whose cells are all different: ids), the one with a few repeated values, the one of train/val/test."""
    cells = {c: [(r[c] or "").strip() for r in table] for c in names if isinstance(c, str)}
    split = [c for c, v in cells.items() if {x.lower() for x in v} <= set(SPLIT_NAMES) and len(set(v)) > 1]
    files = [c for c, v in cells.items() if sum(x.lower().endswith(IMAGE_EXTENSIONS) for x in v) > 0.9 * len(v)]
    paths = files or [c for c, v in cells.items() if len(set(v)) == len(v) and all(v) and c not in split]
    labels = [c for c, v in cells.items() if 1 < len(set(v)) <= len(v) / 2 and c not in split + paths]
    said = [f"data.path_column={paths[0] if len(paths) == 1 else '...'}",
            f"data.label_column={labels[0] if len(labels) == 1 else '...'}",
            *(f"data.split_column={c}" for c in split[:1])]
    return (" ".join(said) + (" (as its cells suggest)" if len(paths) == len(labels) == 1 else "")
            + ("" if split else ", and data.split_column=... if a column holds train/val/test") + ".")


def list_csv(root: str, columns: Columns) -> Listing:
    """A CSV or TSV file (the delimiter sniffed) of image paths (relative to the file, or absolute) and labels, and
    optionally the split of each row. Classes are the labels' names, sorted. With `columns.delimiter` a cell may hold
    several labels, or none (an image showing none of them); if any row then has other than one label, the rows'
    labels are tuples of class indices: a multi-label task. Else one class index per row."""
    path = Path(root).expanduser()
    refuse_archive(path, root, table=True)
    if not path.is_file():
        raise DataError(f"[data] data.root={root!r} is not a file. With data=csv, data.root is a CSV or TSV file with "
                        f"a column of image paths ({columns.path}) and one of labels ({columns.label}).")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"[data] {path} is not UTF-8 text (byte {e.object[e.start]:#x} at position {e.start}: saved "
                        "in another encoding, as Excel's 'CSV' does on Windows). Save it as 'CSV UTF-8', or convert "
                        f"it: iconv -f cp1252 -t utf-8 {path} > labels_utf8.csv") from None
    try:
        dialect = csv.Sniffer().sniff(text[:8192], delimiters=",\t;")
    except csv.Error:
        dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
    table = [{(k.strip() if isinstance(k, str) else k): v for k, v in r.items()}  # "path, label": spaces not names
             for r in csv.DictReader(io.StringIO(text), dialect=dialect)]
    names = list(table[0]) if table else []
    wanted = [c for c in (columns.path, columns.label, columns.split) if c]
    if [c for c in wanted if c not in names]:
        raise DataError(f"[data] {path} has no column {[c for c in wanted if c not in names]}; its columns are "
                        f"{names}. Name them with " + _columns_seen(table, names))
    rows, problems = [], []
    for line, r in enumerate(table, start=2):
        file, label = (r[columns.path] or "").strip(), (r[columns.label] or "").strip()
        split = SPLIT_NAMES.get((r[columns.split] or "").strip().lower()) if columns.split else "all"
        if columns.delimiter:
            label = tuple(sorted({t.strip() for t in label.split(columns.delimiter) if t.strip()}))
        if not file or not (label or columns.delimiter) or split is None:
            problems.append(f"line {line}: " + ("no path" if not file else "no label" if not label else
                                                f"split {r[columns.split]!r}"))
        else:
            rows.append((split, file, label))
    files = _locate([f for _, f, _ in rows], path)
    rows, problems = _one_row_per_image([(s, f, y) for (s, _, y), f in zip(rows, files)], problems, path.parent)
    if problems:
        raise DataError(f"[data] {path}: {len(problems)} rows cannot be used ({'; '.join(problems[:10])}"
                        f"{' ...' if len(problems) > 10 else ''}). Every row needs a path and a label"
                        + (f", and {columns.split} one of {sorted(SPLIT_NAMES)}" if columns.split else "")
                        + ", and an image one row. Fix or remove those rows.")
    multi = columns.delimiter is not None and any(len(label) != 1 for _, _, label in rows)
    if columns.delimiter and not multi:  # one label per image after all: multiclass
        rows = [(s, f, label[0]) for s, f, label in rows]
    classes = sorted({t for _, _, label in rows for t in (label if multi else [label])})
    if len(classes) < 2:
        raise DataError(f"[M08] {path} has {len(classes)} label(s) {classes} in column {columns.label}; a classifier "
                        "needs at least 2.")
    if columns.split and "train" not in {s for s, _, _ in rows}:
        raise DataError(f"[data] {path}: no row has split 'train' in column {columns.split}. Mark the training rows, "
                        "or leave data.split_column unset for safetrain to split.")
    index = {c: k for k, c in enumerate(classes)}
    return Listing([(s, f, tuple(index[t] for t in label) if multi else index[label]) for s, f, label in rows],
                   classes, path.parent, {}, f"CSV {path}" + (f", {len(classes)} labels, several per image" if multi
                                                            else ""))


def load_files(listing: Listing, image_size: Optional[int], loader: str, cache_dir: Path, num_workers: int,
               bad_files: str = "refuse", resize: str = "crop", auto_side: tuple = AUTO_SIDE["cpu"],
               disk_cache: str = "auto") -> Source:
    """Listed files -> Source: every header read (bad files refused or skipped, one list), the training size and
    rule decided, every image decoded once and cached by the files' fingerprint: into memory, or, when streamed,
    into a file on disk that the epochs read (`disk_cache`: data/stored.py; "false": the files are checked once and
    decoded at every epoch)."""
    base, classes = listing.base, listing.classes
    good, bad_headers, channels, (h, w), resized = _scan([f for _, f, _ in listing.rows], image_size, auto_side)
    fit = Fit((h, w), resize) if resized else None
    good = set(good)
    listed = [(part, str(f), y) for part, f, y in listing.rows if f in good]
    multi = any(isinstance(y, tuple) for _, _, y in listing.rows)
    stat = [(os.path.relpath(f, base), *_size_and_time(f), part, y) for part, f, y in listed]
    fp = digest("files v3", str(base.resolve()), fit, channels, classes, *stat)  # v3: EXIF orientation applied
    stream = loader == "stream" or (loader == "auto" and len(listed) * channels * h * w > MEMORY_LIMIT_BYTES)
    done = _decode_all([f for _, f, _ in listed], (channels, h, w), fit, cache_dir, fp, num_workers, keep=not stream,
                       disk=disk_mode(disk_cache))
    images, bad, digests = done["images"], done["bad"], done.get("digests")
    unusable = _refuse_or_skip(dict(sorted({**bad_headers, **{Path(listed[i][1]): why for i, why in bad.items()}}
                                           .items())), len(listed) + len(bad_headers), bad_files)  # one list to fix
    parts = {}
    for part in dict.fromkeys(p for p, _, _ in listed):
        idx = [i for i, (p, _, _) in enumerate(listed) if p == part and i not in bad]
        parts[part] = ImageSet(label_tensor([listed[i][2] for i in idx], len(classes), multi),
                               [os.path.relpath(listed[i][1], base) for i in idx],
                               None if images is None else images[idx], files=[listed[i][1] for i in idx],
                               digests=None if digests is None else [digests[i] for i in idx],
                               **{k: done[k].subset(idx) for k in ("small", "stored") if k in done})
    left_out = {"skipped": dict(listing.skipped), "bad": {os.path.relpath(f, base): why
                                                    for f, why in unusable.items()}}
    log.info("%s: %d images, %d classes, %s, %s; entries that are not images skipped: %s", listing.what,
             sum(len(s) for s in parts.values()), len(classes), f"{channels}x{h}x{w}",
             "in-memory path" if not stream else "streaming path" if "stored" not in done else
             f"disk-cache path ({'JPEG' if isinstance(done['stored'], JpegImages) else 'raw'})",
             skipped_text(listing.skipped))
    return Source(classes, parts, fp, (channels, h, w), resize=fit, left_out=left_out)


def _size_and_time(file: str) -> tuple[int, int]:
    st = os.stat(file)
    return st.st_size, st.st_mtime_ns


def label_tensor(labels: list, num_classes: int, multi: bool) -> Tensor:
    """Class indices -> (N,) int64; with `multi`, tuples of them (several labels per image) -> (N, C) float 0/1."""
    if not multi:
        return torch.tensor(labels, dtype=torch.int64)
    out = torch.zeros(len(labels), num_classes)
    for i, ks in enumerate(labels):
        out[i, list(ks)] = 1.0
    return out


def label_sets(rows: Tensor, classes: list[str], joiner: str = "+", empty: str = "(none)") -> list[str]:
    """Each (C,) 0/1 or boolean row of several labels as text: its labels' names joined, `empty` for none."""
    return [joiner.join(classes[k] for k in row.nonzero().flatten().tolist()) or empty for row in rows.cpu()]


class FileDataset(torch.utils.data.Dataset):
    def __init__(self, files, channels, resize):
        self.files, self.channels, self.resize = files, channels, resize

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return decode_image(self.files[i], self.channels, self.resize)


def file_loader(dataset, *, num_workers: int, **kw) -> torch.utils.data.DataLoader:
    """A DataLoader whose workers decode files. Workers are forked, except once CUDA is initialized in
    this process (forking then can deadlock): then they are spawned. Its workers' seed comes from a
    generator of its own: drawn from the global one, it would make model init depend on whether the
    images were decoded now or read from the cache [M32]."""
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    workers = min(num_workers, os.cpu_count() or 1)
    spawn = workers > 0 and torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.utils.data.DataLoader(dataset, num_workers=workers,
                                       multiprocessing_context="spawn" if spawn else None, **kw)


def _decode_all(files: list[str], shape: tuple[int, int, int], resize: Optional[Fit], cache_dir: Path, fp: str,
                num_workers: int, keep: bool, disk: Optional[str] = "auto") -> dict:
    """Decode every file once, before training, in worker processes: {"images": (N, C, H, W) uint8 if `keep`, else
    None; "bad": {index: why} of the files that cannot be decoded}; when not `keep` (a streamed folder), also
    "digests" (of the decoded pixels, as in memory), "small" (every image at AUDIT_SIDE, for the audit) and, with
    `disk` (data/stored.py: disk_mode), "stored" (every image at the training size: the disk cache its epochs read
    instead of the files). Cached by the folder's fingerprint, so a folder is decoded (or checked) once."""
    c, h, w = shape
    small_shape, full = (len(files), c, *audit_hw(h, w)), (len(files), c, h, w)
    mode = None if keep else disk
    if mode == "auto":  # the kind an earlier run cached, else the one the disk holds
        mode = next((m for m in ("raw", "jpeg") if (cache_dir / CACHES[m] / f"{fp}.pt").is_file()), None) or \
            choose("auto", math.prod(small_shape), math.prod(full), cache_dir)
    folder = cache_dir / ("decoded" if keep else CACHES[mode])
    raw = {} if keep else {"small": (folder / f"{fp}.small.u8", small_shape)}
    if mode:
        raw["stored"] = (folder / f"{fp}.images.{'jpg' if mode == 'jpeg' else 'u8'}", full)

    def decode():
        out = torch.empty(full, dtype=torch.uint8) if keep else None
        bad, digests, made = {}, [b""] * len(files), {}
        if not keep:
            choose(mode or "raw", math.prod(small_shape), math.prod(full) if mode else 0, folder)
        writing = writers(raw, mode)
        try:
            for batch in file_loader(CheckedFiles(files, c, resize), batch_size=256, num_workers=num_workers,
                                     collate_fn=list):
                good = [(i, img) for i, img in batch if not isinstance(img, str)]
                bad.update((i, img) for i, img in batch if isinstance(img, str))
                if not good:
                    continue
                idx, imgs = [i for i, _ in good], torch.stack([img for _, img in good])
                if keep:
                    out[idx] = imgs
                    continue
                for i, img in good:
                    digests[i] = hashlib.blake2b(img.numpy().tobytes(), digest_size=16).digest()
                writing["small"].write(idx, audit_size(imgs))
                if "stored" in writing:
                    writing["stored"].write(idx, imgs)
            for writer in writing.values():  # complete: then under their final names
                made.update(writer.commit())
        finally:
            for writer in writing.values():
                writer.discard()
        return {"images": out, "bad": bad, **({} if keep else {"digests": digests}), **made}

    path = folder / f"{fp}.pt"
    entry, hit = cached(path, decode, keys=("images", "bad"))
    if hit and not all(complete(p, s, entry, name == "stored" and mode == "jpeg")
                       for name, (p, s) in raw.items()):
        log.warning("the cache entry %s lacks its image files (removed?): decoding again", path)
        path.unlink(missing_ok=True)
        entry, hit = cached(path, decode, keys=("images", "bad"))
    log.info("%s %s", "decoded images loaded from cache" if hit else "every image decoded once, cached at", path)
    return {**entry, **{name: reader(p, s, entry, name == "stored" and mode == "jpeg")
                        for name, (p, s) in raw.items()}}


CACHES = {"raw": "stored v1", "jpeg": "jpeg v1", None: "checked v3"}  # a streamed folder's cache, by data.disk_cache


class CheckedFiles(FileDataset):
    """(index, image) or (index, why the file cannot be decoded): one bad file does not stop the others."""

    def __getitem__(self, i):
        try:
            return i, _decode(self.files[i], self.channels, self.resize)
        except (OSError, ValueError) as e:
            return i, f"cannot be decoded ({type(e).__name__}: {str(e)[:80]})"


def _torchvision_source(name: str):
    def load(*, root, download, cache_dir, **_):
        return load_torchvision(name, root or str(cache_dir / "datasets"), download)
    return load


# data=NAME -> loader; every loader takes the same keywords and uses those it needs
SOURCES = {
    **{name: _torchvision_source(name) for name in TORCHVISION},
    "imagefolder": lambda *, root, image_size, loader, cache_dir, num_workers, bad_files, resize, auto_side,
    disk_cache, allow_similar_labels, **_: load_folder(root, image_size, loader, cache_dir, num_workers, bad_files,
                                                       resize, auto_side, disk_cache, allow_similar_labels),
    "csv": lambda *, root, image_size, loader, cache_dir, num_workers, bad_files, resize, auto_side, disk_cache,
    columns, allow_similar_labels, **_: load_files(refuse_similar_labels(list_csv(root, columns), allow_similar_labels),
                                                   image_size, loader, cache_dir, num_workers, bad_files, resize,
                                                   auto_side, disk_cache),
    "synthetic": lambda *, seed, synthetic, **_: load_synthetic(seed=seed, **synthetic),
}


def load_source(spec: DataSpec, cache_dir: Path) -> Source:
    """The source `spec` names, decoded (or checked) once and cached under `cache_dir`."""
    if spec.name not in SOURCES:
        raise DataError(f"[config] data={spec.name!r} is not a dataset; choose one of {list(SOURCES)}.")
    pixel_limit(spec.max_image_pixels)
    return SOURCES[spec.name](root=spec.root, download=spec.download, image_size=spec.image_size, loader=spec.loader,
                              num_workers=spec.num_workers, cache_dir=cache_dir, seed=spec.seed,
                              synthetic=dict(spec.synthetic), bad_files=spec.bad_files, resize=spec.resize,
                              auto_side=tuple(spec.auto_side), disk_cache=spec.disk_cache,
                              allow_similar_labels=spec.allow_similar_labels,
                              columns=Columns(spec.path_column, spec.label_column, spec.split_column,
                                              spec.label_delimiter))


# ---------------------------------------------------------------- a user's own Dataset
def load_dataset(ds, classes: Optional[list[str]] = None) -> Source:
    """A torch `Dataset` of (image, label) -> Source, decoded once into memory.

    Images: PIL images, uint8 tensors (C, H, W) or arrays (H, W[, C]), or float tensors in [0, 1]
    (not normalized: safetrain normalizes). Labels: class indices (int), or for several labels per image a 0/1
    vector of one entry per label (a multi-label task) [M14, M33]."""
    images, labels = [], []
    for i in range(len(ds)):
        x, y = ds[i]
        images.append(_to_uint8(x, i))
        labels.append(_to_label(y, i))
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise DataError(f"[data] the dataset's images have different shapes {sorted(shapes)[:3]}; they must "
                        "all have one (C, H, W). Resize them in the dataset.")
    labels_t = _label_rows(labels) if any(isinstance(y, Tensor) for y in labels) else torch.tensor(labels)
    count = labels_t.shape[1] if labels_t.ndim == 2 else int(labels_t.max()) + 1
    classes = list(classes or getattr(ds, "classes", None) or [str(k) for k in range(count)])
    all_ = ImageSet(labels_t, [f"dataset/{i}" for i in range(len(labels))], torch.stack(images))
    fp = digest("dataset", type(ds).__name__, all_.images.numpy().tobytes(), labels_t.numpy().tobytes())
    return Source(classes, {"all": all_}, fp, tuple(images[0].shape))


def _to_uint8(x, i: int) -> Tensor:
    if isinstance(x, Image.Image):
        arr = np.array(x.convert("L" if x.mode in ("L", "1", "I", "I;16") else "RGB"))
        x = torch.from_numpy(arr)
        return x[None] if x.ndim == 2 else x.permute(2, 0, 1).contiguous()
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # numpy images are (H, W, C)
    if not isinstance(x, Tensor):
        raise DataError(f"[M33] dataset item {i}: the image is a {type(x).__name__}; return a PIL image, a uint8 "
                        "tensor (C, H, W) or a float tensor in [0, 1].")
    x = x[None] if x.ndim == 2 else x
    if x.dtype == torch.uint8:
        return x.contiguous()
    if x.is_floating_point():
        lo, hi = float(x.min()), float(x.max())
        if not (torch.isfinite(x).all() and lo >= 0 and hi <= 1):
            raise DataError(f"[M33] dataset item {i}: float pixels span [{lo:.3g}, {hi:.3g}]; safetrain expects "
                            "uint8 (0-255) or floats in [0, 1] before normalization (it normalizes with the "
                            "training split's statistics itself). Return ToTensor() output without Normalize, "
                            "or divide 0-255 floats by 255.")
        return (x * 255).round().to(torch.uint8).contiguous()
    raise DataError(f"[M33] dataset item {i}: pixels of dtype {x.dtype}; return uint8 or float in [0, 1].")


def _to_label(y, i: int) -> int | Tensor:
    """A class index, or a 0/1 float vector (several labels per image)."""
    y = torch.from_numpy(y) if isinstance(y, np.ndarray) else y
    if isinstance(y, Tensor) and y.ndim == 1 and y.numel() > 1:
        if not bool(((y == 0) | (y == 1)).all()):
            raise DataError(f"[M14] dataset item {i}: the label is a vector of length {y.numel()} with values other "
                            "than 0 and 1; labels are class indices (an int 0..C-1), or 0/1 per label for several "
                            "labels per image.")
        return y.float()
    if isinstance(y, Tensor):
        if y.numel() != 1:
            raise DataError(f"[M14] dataset item {i}: label of shape {tuple(y.shape)}; expected one class index.")
        y = y.item()
    if isinstance(y, (bool, np.bool_)) or not isinstance(y, (int, np.integer)):
        raise DataError(f"[M14] dataset item {i}: label {y!r} is a {type(y).__name__}; multiclass labels are "
                        "class indices (int 0..C-1), not floats or strings. Map each class to its index.")
    return int(y)


def _label_rows(labels: list) -> Tensor:
    """The dataset's 0/1 label vectors as (N, C): several labels per image. One-hot rows throughout are one label per
    image written the wrong way, and are refused [M14]; so is a mix of vectors and indices."""
    sizes = {y.numel() if isinstance(y, Tensor) else None for y in labels}
    if len(sizes) > 1:
        raise DataError(f"[M14] the dataset's labels mix class indices and 0/1 vectors (or vectors of lengths "
                        f"{sorted(s for s in sizes if s)}); return one kind for every item.")
    rows = torch.stack(labels)
    if bool((rows.sum(1) == 1).all()):
        raise DataError(f"[M14] every label of the dataset is a one-hot vector of length {rows.shape[1]}: one label "
                        "per image. Multiclass labels are class indices (an int 0..C-1): return int(label.argmax()) "
                        "instead.")
    return rows
