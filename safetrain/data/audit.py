"""Data audit before training: near-duplicates across splits [M06], copies inside the training split
with different labels, constant or blank images [M08].

Near-duplicates are judged against the dataset's own geometry, in two stages, on uint8 images in memory:
1. candidates: for every val/test image, the 5 nearest distinct training images by cosine similarity of an
   8x8 grayscale thumbnail with its mean removed, the best over query crops moved by up to 2 px, the
   mirrored query, and re-crops (1/16 of each border cut, scaled back) of either side;
2. distances at full resolution: per-image standardized colour pixels (so brightness, contrast and
   re-encoding do not matter), the best over shifts of up to 2 pixels, mirroring and those re-crops.
A val/test image is a near-duplicate of its nearest training image when that distance d1 is far below
the typical nearest-neighbour distance between two training images (REL times its median) and far below
the distance to its 5th candidate (RATIO times it): a copy stands out from the crowd of merely similar
images. Images smaller than MIN_SIDE pixels a side are too small to tell a copy from a look-alike (two
8x8 handwritten digits often coincide): only their exact copies are checked (data/splits.py).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from safetrain.data.sources import ImageSet, audit_size, digest
from safetrain.findings import Finding
from safetrain.io import cached

log = logging.getLogger(__name__)

THUMB = 8  # thumbnail side for candidate search (coarse enough to tolerate 2-px shifts)
CANDIDATES = 5  # distinct training images per val/test image; the last one sets the crowd's distance
CONFLICT_RATIO = 0.35  # a near-copy pair with two labels is named [M08] only when it stands out this clearly from its
# crowd: two labels are far more often two similar shots than one photo labelled twice (a cat and a deer at 0.51 on a
# CIFAR-10 subset; a real copy relabelled, 0.20)
GATE = 0.7  # candidates whose best thumbnail cosine is below this are not compared at full resolution
OFFSETS = [(dy, dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2) if (dy, dx) != (0, 0)]
MAX_SHIFT = 2
REL = 0.5  # d1 at most this share of the median nearest-neighbour distance within the training split ...
RATIO = (0.6, 0.5)  # ... and of the distance to the CANDIDATES-th nearest: 0.6 up to 0.35 x that median, then
# falling to 0.5 at REL x it (the farther the pair, the more it must stand out; judged by eye on CIFAR-10, RESULTS.md)
MIN_SIDE = 16  # smaller images: no near-duplicate search
# AUDIT_SIDE (data/sources.py): larger images are searched shrunk to this shorter side: the scale the judgement was
# calibrated at (CIFAR-10), and a cost that does not grow with the image size (12,000 images: 117 s at 64 px)
REF_CHUNK = 65536  # training thumbnails compared at once: bounds the similarity buffer (1024 x this x 4 bytes)
EXACT_MAX = 50_000  # larger training splits are searched approximately (faiss's HNSW graph, when installed):
HNSW_LINKS, HNSW_SEARCH = 32, 64  # its links per node and search breadth (recall of planted copies: RESULTS.md)
BLANK_STD = 2.0  # an image whose pixels vary less than this (0-255 scale) is blank or constant


@dataclass
class Audit:
    near_duplicates: list[dict] = field(default_factory=list)  # {"split", "id", "train_id", "cosine", "diff"}
    conflicting_copies: list[dict] = field(default_factory=list)  # same pixels, different labels
    kept_together: list[dict] = field(default_factory=list)  # near-duplicates moved to join their copy (splits.py)
    copy_groups: int = 0  # groups of exact copies that safetrain's split kept within one split
    blank: list[str] = field(default_factory=list)
    eval_sizes: dict = field(default_factory=dict)
    typical_distance: float = 0.0  # median nearest-neighbour distance within the training split
    skipped: str = ""  # why the near-duplicate search did not run, if it did not

    def summary(self) -> dict:
        per_split = {s: sum(p["split"] == s for p in self.near_duplicates) for s in self.eval_sizes}
        return {"near_duplicates": len(self.near_duplicates),
                "near_duplicate_fraction": {s: per_split[s] / max(1, n) for s, n in self.eval_sizes.items()},
                "conflicting_copies": len(self.conflicting_copies), "blank_images": len(self.blank),
                "exact_copy_groups_kept_in_one_split": self.copy_groups,
                "near_duplicates_kept_in_train": len(self.kept_together),
                "kept_together_with_other_label": sum(p["labels"][0] != p["labels"][1] for p in self.kept_together),
                "typical_train_distance": round(self.typical_distance, 4),
                **({"near_duplicate_search": f"skipped: {self.skipped}"} if self.skipped else {})}


def thumbnails(images: Tensor, offset: tuple[int, int] = (0, 0), chunk: int = 4096) -> Tensor:
    """(N, C, H, W) uint8 -> (N, THUMB*THUMB) float32, mean-free and unit-norm (zero for blank images),
    of the crop that leaves MAX_SHIFT pixels at each border, moved by `offset`."""
    h, w = images.shape[-2:]
    m = MAX_SHIFT if min(h, w) > 4 * MAX_SHIFT else 0
    dy, dx = offset if m else (0, 0)
    out = []
    for i in range(0, len(images), chunk):
        g = images[i:i + chunk, :, m + dy:h - m + dy, m + dx:w - m + dx].float().mean(1, keepdim=True)
        t = F.adaptive_avg_pool2d(g, THUMB).flatten(1)
        t = t - t.mean(1, keepdim=True)
        out.append(t / t.norm(dim=1, keepdim=True).clamp_min(1e-6))
    return torch.cat(out)


def _standardize(x: Tensor) -> Tensor:
    """Per image and channel: zero mean, unit std (removes brightness/contrast/colour shifts)."""
    x = x.float()
    return (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True).clamp_min(1.0)


def shifted_diff(a: Tensor, b: Tensor, max_shift: int = MAX_SHIFT) -> Tensor:
    """Mean |a - b| of standardized images, minimized over integer shifts of b (crops of the overlap)."""
    return _shifted_diff(_standardize(a), _standardize(b), max_shift)


def _shifted_diff(a: Tensor, b: Tensor, max_shift: int = MAX_SHIFT) -> Tensor:
    """shifted_diff of images already standardized (most of its cost: each image is standardized once)."""
    h, w = a.shape[-2:]
    m = max_shift
    best = torch.full((len(a),), float("inf"))
    for dy in range(-m, m + 1):
        for dx in range(-m, m + 1):
            pa = a[..., m + dy:h - m + dy, m + dx:w - m + dx] if h > 2 * m and w > 2 * m else a
            pb = b[..., m:h - m, m:w - m] if h > 2 * m and w > 2 * m else b
            best = torch.minimum(best, (pa - pb).abs().mean((1, 2, 3)))
    return best


def zoom(x: Tensor) -> Tensor:
    """(N, C, H, W) uint8 -> the central crop without 1/16 of each border, scaled back to H x W: a re-crop."""
    h, w = x.shape[-2:]
    m = max(1, round(h / 16))  # uint8 in and out: 15x faster than through float32 on a CPU (within 1 level of it)
    return F.interpolate(x[..., m:h - m, m:w - m], size=(h, w), mode="bilinear", align_corners=False)


class Reference(NamedTuple):
    """The training split's thumbnails, as is and re-cropped (N, THUMB*THUMB), and, for a large split, a graph over
    each for approximate nearest-neighbour search (None: every query is compared with every thumbnail)."""
    thumbs: Tensor
    zoomed: Tensor
    graphs: Optional[tuple] = None


def candidates(imgs: Tensor, ref: Reference, device: torch.device, exclude: Tensor | None = None):
    """(cosine, index), each (n, CANDIDATES): the nearest distinct training thumbnails of each image, over views
    of it shifted, mirrored and re-cropped (and re-cropped training images). `exclude`: (n,) training indices not to
    return (the image itself)."""
    zoomed = zoom(imgs)
    views = [(v, off, 0) for v in (imgs, imgs.flip(3)) for off in [(0, 0), *OFFSETS]]
    views += [(zoomed, (0, 0), 0), (zoomed.flip(3), (0, 0), 0), (imgs, (0, 0), 1), (imgs.flip(3), (0, 0), 1)]
    exact = ref.graphs is None  # one buffer for every view and chunk: a new one each time costs as much as the product
    buffer = torch.empty(len(imgs) * min(len(ref.thumbs), REF_CHUNK), device=device) if exact else None  # (CPU)
    values, indices = [], []
    for v, off, which in views:
        q = thumbnails(v, off).to(device)
        top = _exact(q, ref[which], buffer, exclude) if exact else _from_graph(ref.graphs[which], q, exclude)
        values += top[0]
        indices += top[1]
    cos = torch.cat(values, 1).cpu()
    idx = torch.cat(indices, 1).cpu()
    cos, order = cos.sort(1, descending=True)
    idx = idx.gather(1, order)
    repeat = (idx[:, :, None] == idx[:, None, :]).triu(1).any(1)  # (n, m): seen earlier in the row
    rank = torch.where(repeat, torch.full_like(cos, 9.0), -cos).argsort(dim=1, stable=True)[:, :CANDIDATES]
    return cos.gather(1, rank), idx.gather(1, rank)


def _exact(q: Tensor, ref: Tensor, buffer: Tensor, exclude: Tensor | None) -> tuple[list[Tensor], list[Tensor]]:
    """The CANDIDATES most similar thumbnails of `ref` to each row of `q`, per chunk of REF_CHUNK: (values, indices)."""
    n, width = len(q), len(buffer) // max(1, len(q))
    rows = torch.arange(n, device=q.device)
    values, indices = [], []
    for j in range(0, len(ref), width):
        part = ref[j:j + width]
        sim = torch.matmul(q, part.T, out=buffer[:n * len(part)].view(n, len(part)))  # (n, chunk)
        if exclude is not None:
            inside = (exclude.to(q.device) >= j) & (exclude.to(q.device) < j + len(part))
            sim[rows[inside], exclude.to(q.device)[inside] - j] = -2.0
        top = sim.topk(min(CANDIDATES, len(part)), dim=1)
        values.append(top.values)
        indices.append(top.indices + j)
    return values, indices


def _from_graph(graph, q: Tensor, exclude: Tensor | None) -> tuple[list[Tensor], list[Tensor]]:
    """The same from the approximate search (one more, to drop the image itself); places it did not fill: -2."""
    sim, idx = graph.search(q.cpu().float().numpy(), CANDIDATES + 1)
    sim, idx = torch.from_numpy(sim), torch.from_numpy(idx)
    drop = (idx < 0) | ((idx == exclude[:, None]) if exclude is not None else False)
    return [sim.masked_fill(drop, -2.0)], [idx.clamp_min(0)]


def distances(imgs: Tensor, train_images: Tensor, idx: Tensor) -> Tensor:
    """(n, k) full-resolution distances to the candidates: the best of the image, its mirror and its re-crop
    against the candidate, and of the image and its mirror against the candidate's re-crop."""
    views = [_standardize(v) for v in (imgs, zoom(imgs))]
    views = [views[0], views[0].flip(3), views[1], views[1].flip(3)]  # as is, mirrored, re-cropped, both
    cols = []
    for c in range(idx.shape[1]):
        match = train_images[idx[:, c]]
        as_is, zoomed = _standardize(match), _standardize(zoom(match))
        pairs = [(v, as_is) for v in views] + [(v, zoomed) for v in views[:2]]
        cols.append(torch.stack([_shifted_diff(a, b) for a, b in pairs]).min(0).values)
    return torch.stack(cols, 1)


def reference(train: ImageSet, device: torch.device, chunk: int = 4096) -> Reference:
    """The training split's thumbnails, as is and re-cropped (computed once per audit, `chunk` images at a time), and
    above EXACT_MAX training images, when faiss is installed, an HNSW graph over each (approximate search)."""
    parts = [(thumbnails(x), thumbnails(zoom(x))) for x in (train.images[i:i + chunk]
                                                             for i in range(0, len(train), chunk))]
    thumbs, zoomed = (torch.cat([p[k] for p in parts]) for k in (0, 1))
    if len(train) <= EXACT_MAX:
        return Reference(thumbs.to(device), zoomed.to(device))
    try:
        import faiss
    except ImportError:
        log.warning("the near-duplicate search compares each val/test image with all %d training images (its time "
                    "grows with train x val/test); pip install faiss-cpu (or safetrain's [scale] extra) makes it "
                    "approximate, with a time that grows about as N log N", len(train))
        return Reference(thumbs.to(device), zoomed.to(device))
    graphs, threads = [], faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # a graph built by one thread is the same on every run (the split depends on it)
    try:
        for t in (thumbs, zoomed):
            graph = faiss.IndexHNSWFlat(t.shape[1], HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efSearch = HNSW_SEARCH
            graph.add(t.numpy())
            graphs.append(graph)
    finally:
        faiss.omp_set_num_threads(threads)
    return Reference(thumbs, zoomed, tuple(graphs))


def typical_distance(train: ImageSet, refs: Reference, device: torch.device, sample: int = 1000,
                     seed: int = 0) -> float:
    """Median distance from a training image to its nearest other training image (a seeded sample)."""
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:sample]
    imgs = train.images[pick]
    _, idx = candidates(imgs, refs, device, exclude=pick)
    return float(distances(imgs, train.images, idx).min(1).values.median())


def is_copy(relative: float, ratio: float) -> bool:
    """relative: d1 / the typical training distance; ratio: d1 / the CANDIDATES-th candidate's distance."""
    near, far = RATIO
    limit = near - (near - far) * min(1.0, max(0.0, (relative - 0.35) / (REL - 0.35)))
    return relative <= REL and ratio <= limit


def near_duplicates(train: ImageSet, other: ImageSet, split: str, typical: float, refs: Reference,
                    device: torch.device = torch.device("cpu"), chunk: int = 1024) -> list[dict]:
    found = []
    for i in range(0, len(other), chunk):
        imgs = other.images[i:i + chunk]
        cos, idx = candidates(imgs, refs, device)
        rows = (cos[:, 0] >= GATE).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        d = distances(imgs[rows], train.images, idx[rows])  # (r, k)
        d1, best = d.min(1)
        crowd = d.max(1).values
        for r, j, x, c in zip(rows.tolist(), best.tolist(), d1.tolist(), crowd.tolist()):
            if is_copy(x / typical, x / max(c, 1e-6)):
                found.append({"split": split, "id": other.ids[i + r], "train_id": train.ids[int(idx[r, j])],
                              "cosine": round(float(cos[r, j]), 4), "diff": round(x, 4),
                              "relative": round(x / typical, 4), "ratio": round(x / max(c, 1e-6), 4)})
    return found


def shrunk(s: ImageSet) -> ImageSet:
    """`s` as the audit searches it: its images (a streamed split's copies) at AUDIT_SIDE on the shorter side."""
    return ImageSet(s.labels, s.ids, audit_size(s.pixels()))


def search(train: ImageSet, queries: dict[str, ImageSet], device: torch.device,
           typical: float | None = None) -> tuple[list[dict], float]:
    """(the near-duplicates of training images among each named set of `queries`, the typical distance between
    training images they were judged by: measured, or `typical`), on the images shrunk to AUDIT_SIDE."""
    train = shrunk(train)
    refs = reference(train, device)
    typical = typical or typical_distance(train, refs, device)
    return [p for name, q in queries.items() for p in near_duplicates(train, shrunk(q), name, typical, refs, device)
            ], typical


def near_copies(splits: dict[str, ImageSet], carved: list[str], fingerprint: str, cache_dir: Path,
                device: torch.device) -> list[dict]:
    """The audit's near-duplicates of training images in the `carved` splits (those safetrain made, so their copies
    can join train: splits.join_near_copies), and, when both val and test are carved, of val images in test (those
    go `into` val); searched once per source and split and cached."""
    train = splits["train"]
    if train.pixels() is None or min(train.pixels().shape[-2:]) < MIN_SIDE:
        return []

    def both() -> dict:
        pairs, typical = search(train, {s: splits[s] for s in carved}, device)
        if {"val", "test"} <= set(carved):  # judged by the training images' typical distance, not val's sparser one
            pairs += [{**p, "into": "val"} for p in search(splits["val"], {"test": splits["test"]}, device, typical)[0]]
        return {"pairs": pairs}
    key = digest("near copies v3", fingerprint, *carved, *(i for s in splits.values() for i in s.ids))
    return cached(cache_dir / "audit" / f"{key}.json", both, keys=("pairs",))[0]["pairs"]


def conflicting_copies(splits: dict[str, ImageSet]) -> list[dict]:
    """Byte-identical images with different labels, in any split (copies are kept within one split)."""
    seen: dict[bytes, tuple[str, int]] = {}
    out = []
    for s in splits.values():
        for i in range(len(s)):
            label = s.labels[i].tolist()  # a class index, or a multi-label row
            sid, y = seen.setdefault(s.digest(i), (s.ids[i], label))  # hashed once, at the split
            if sid != s.ids[i] and y != label:
                out.append({"ids": [sid, s.ids[i]], "labels": [y, label]})
    return out


def blank_images(s: ImageSet, chunk: int = 4096) -> list[str]:
    out = []
    for i in range(0, len(s), chunk):
        std = s.pixels()[i:i + chunk].float().flatten(1).std(1)
        out += [s.ids[i + k] for k in (std < BLANK_STD).nonzero().squeeze(1).tolist()]
    return out


def audit(splits: dict[str, ImageSet], device: torch.device = torch.device("cpu"), joined: tuple[str, ...] = ()
          ) -> Audit:
    """Everything the audit measures, on the images in memory or a streamed split's copies at AUDIT_SIDE. `joined`:
    the splits safetrain carved, whose near-copies of training images were searched at the split and moved into
    train (near_copies): none are left there to find, so only the user's own val/test are searched again."""
    train = splits["train"]
    a = Audit(eval_sizes={s: len(splits[s]) for s in ("val", "test")})
    if train.pixels() is None:
        a.skipped = "the images are neither in memory nor copied at the audit's size (a dataset of this kind " \
                    "cannot be searched yet)"
        return a
    if min(train.pixels().shape[-2:]) < MIN_SIDE:
        a.skipped = (f"images of {tuple(train.pixels().shape[-2:])} pixels are too small to tell a copy from a "
                     "look-alike; exact copies are still refused")
    else:
        a.near_duplicates, a.typical_distance = search(train, {s: splits[s] for s in ("val", "test")
                                                              if s not in joined}, device)
    a.conflicting_copies = conflicting_copies(splits)
    a.kept_together = train.joined
    hashed = Counter(d for s in splits.values() for d in (s.digests or []))  # digests: where safetrain split
    a.copy_groups = sum(n > 1 for n in hashed.values())
    a.blank = [i for s in splits.values() for i in blank_images(s)]
    return a


def cached_audit(splits: dict[str, ImageSet], fingerprint: str, cache_dir: Path, device: torch.device,
                 joined: tuple[str, ...] = ()) -> Audit:
    """`audit`, cached by the fingerprint of the source and the split assignment."""
    key = digest("audit v11", fingerprint, *joined, *(i for s in splits.values() for i in s.ids))
    stored, _ = cached(cache_dir / "audit" / f"{key}.json", lambda: asdict(audit(splits, device, joined)),
                       keys=tuple(f.name for f in fields(Audit)))
    return Audit(**stored)


def findings(a: Audit) -> list[Finding]:
    """The audit's warnings, each with its catalogue row and what to do."""
    out = []
    s = a.summary()
    if a.near_duplicates:
        frac = ", ".join(f"{k} {v:.1%}" for k, v in s["near_duplicate_fraction"].items())
        out.append(Finding("M06", "near-duplicates", f"{len(a.near_duplicates)} val/test images are near-duplicates "
                           f"of training images ({frac}; pairs in audit.json, closest ones in TensorBoard under "
                           "audit/): their scores flatter the model.",
                           "Remove them from val/test for an honest estimate.", "audit",
                           evidence={"count": len(a.near_duplicates), "fraction": s["near_duplicate_fraction"]}))
    if a.conflicting_copies:
        ex = a.conflicting_copies[0]
        out.append(Finding("M08", "conflicting copies", f"{len(a.conflicting_copies)} identical images "
                           f"carry different labels (e.g. {ex['ids'][0]} and {ex['ids'][1]}): at least one label of "
                           "each pair is wrong.", "Fix or remove them.", "audit",
                           evidence={"count": len(a.conflicting_copies)}))
    conflicts = [p for p in a.kept_together if p["labels"][0] != p["labels"][1] and p["ratio"] <= CONFLICT_RATIO]
    if conflicts:
        ex = conflicts[0]
        out.append(Finding("M08", "near-copies with different labels", f"{len(conflicts)} of the "
                           f"{len(a.kept_together)} near-duplicate pairs kept together in train carry different "
                           f"labels (e.g. {ex['id']} and {ex['train_id']}): one label of each pair is likely wrong.",
                           "Look at the pairs (audit.json, kept_together) and fix or remove them.", "audit",
                           evidence={"count": len(conflicts)}))
    if a.blank:
        out.append(Finding("M08", "blank images", f"{len(a.blank)} images are blank or constant (e.g. {a.blank[0]}): "
                           "they carry no class signal.", "Remove them.", "audit", evidence={"count": len(a.blank)}))
    return out


def pair_images(a: Audit, splits: dict[str, ImageSet], n: int = 16):
    """The n closest near-duplicate pairs as ((2n, C, H, W) uint8, 2n captions), each val/test image next to its
    training match; None when there are none (or the images are not in memory)."""
    if not a.near_duplicates or splits["train"].pixels() is None:
        return None
    index = {name: {sid: i for i, sid in enumerate(s.ids)} for name, s in splits.items()}
    tiles, captions = [], []
    for p in sorted(a.near_duplicates, key=lambda p: p["diff"])[:n]:
        tiles += [splits[p["split"]].pixels()[index[p["split"]][p["id"]]],
                  splits["train"].pixels()[index["train"][p["train_id"]]]]
        captions += [f"{p['split']}:\n{p['id']}", f"train:\n{p['train_id']}\n(diff {p['diff']:.3f})"]
    return torch.stack(tiles), captions
