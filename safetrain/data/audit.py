"""Data audit before training: near-duplicates across splits [M06], copies with different labels (identical images
in any split; the same photo re-encoded, resized or converted inside the training split: `same_photo_other_label`),
constant or blank images [M08].

Near-duplicates are judged against the dataset's own geometry, in three stages, on uint8 images in memory:
1. candidates: for every val/test image, the 5 nearest distinct training images by cosine similarity of an
   8x8 grayscale thumbnail with its mean removed, the best over query crops moved by up to 2 px, the
   mirrored query, and re-crops (1/16 of each border cut, scaled back) of either side;
2. distances at full resolution: per-image standardized colour pixels (so brightness, contrast and
   re-encoding do not matter), the best over shifts of up to 2 pixels, mirroring and those re-crops.
   A val/test image is a near-duplicate of its nearest training image when that distance d1 is far below
   the typical nearest-neighbour distance between two training images (REL times its median) and far below
   the distance to its 5th candidate (RATIO times it): a copy stands out from the crowd of merely similar images.
3. aligned distances, for the images stage 2 leaves out that are still within ALIGN_FROM x the typical distance of
   a training image. Real copies are often re-cropped at another scale, or recoloured, or have several copies in
   train (so none stands out from the 5th candidate): on CIFAR-10, stage 2 found about 1 in 3 of the same-photo
   copies judged by eye. Each candidate (and its mirror) is aligned to the image by a scale and a shift per axis
   (Adam steps on grey images, blurred then sharp) and compared on the central region: the standardized pixels plus
   the colour balance the standardization removes (a brown and a black horse in the same pose), and, as a second,
   independent descriptor, the correlation of the fine detail (the image minus its blur: the same edges in the
   same places). A copy (ALIGNED, DETAIL): d1 at most 0.25 x the typical aligned distance; or at most 0.4 x it
   with a detail correlation of 0.8 (a photo with several copies in train, all as close); or at most 0.5 x the
   3rd candidate's distance and 0.7 x the typical (judged by eye on CIFAR-10, RESULTS.md).
Images smaller than MIN_SIDE pixels a side are too small to tell a copy from a look-alike (two
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
ALIGN_FROM = 1.3  # stage 3 aligns the images stage 2 leaves out whose d1 is at most this x the typical distance
# (on CIFAR-10 none beyond it was found: 19 copies between 1.0 and 1.3)
ALIGN_STEPS = (10, 10)  # Adam steps on blurred, then sharp grey images ((20, 20): a few more copies, more look-alikes)
ALIGN_BORDER = 4 / 32  # share of each side left out of the aligned comparison (what a re-crop or shift brings in)
BALANCE = 0.5  # weight of the colour balance difference in the aligned distance
ALIGNED = (0.25, 0.4, 0.5, 0.7)  # a copy: d1 <= 0.25 x the typical aligned distance; or <= 0.4 x it with the same
# fine detail (DETAIL: a photo with several copies in train, all as close); or <= 0.5 x the 3rd candidate's and
# <= 0.7 x the typical (judged by eye on CIFAR-10, RESULTS.md)
DETAIL = 0.8
MANY_CONFLICTS = 10  # identical images under two labels this often: maybe a multi-label task filed in folders
SAME_PHOTO, SAME_COSINE = 0.2, 0.95  # two training images with different labels within SAME_PHOTO x the typical
# distance (stage 2) are one photo filed twice (re-encoded, resized, converted: a CMYK JPEG and its RGB PNG, 0.15);
# compared where their thumbnails agree this well. CIFAR-10's training split: its closest pair of different labels is
# 0.29, two look-alike scenes (none is a copy)
BLANK_STD = 2.0  # an image whose pixels vary less than this (0-255 scale) is blank or constant


@dataclass
class Audit:
    near_duplicates: list[dict] = field(default_factory=list)  # {"split", "id", "train_id", "cosine", "diff"}
    conflicting_copies: list[dict] = field(default_factory=list)  # same pixels, different labels
    same_photo_other_label: list[dict] = field(default_factory=list)  # training images: one photo, two labels
    kept_together: list[dict] = field(default_factory=list)  # near-duplicates moved to join their copy (splits.py)
    copy_groups: int = 0  # groups of exact copies that safetrain's split kept within one split
    blank: list[str] = field(default_factory=list)
    eval_sizes: dict = field(default_factory=dict)
    typical_distance: float = 0.0  # median nearest-neighbour distance within the training split
    typical_aligned: float = 0.0  # the same, aligned (stage 3)
    skipped: str = ""  # why the near-duplicate search did not run, if it did not

    def summary(self) -> dict:
        per_split = {s: sum(p["split"] == s for p in self.near_duplicates) for s in self.eval_sizes}
        return {"near_duplicates": len(self.near_duplicates),
                "near_duplicate_fraction": {s: per_split[s] / max(1, n) for s, n in self.eval_sizes.items()},
                "conflicting_copies": len(self.conflicting_copies),
                "same_photo_other_label_in_train": len(self.same_photo_other_label), "blank_images": len(self.blank),
                "exact_copy_groups_kept_in_one_split": self.copy_groups,
                "near_duplicates_kept_in_train": len(self.kept_together),
                "kept_together_with_other_label": sum(p["labels"][0] != p["labels"][1] for p in self.kept_together),
                "typical_train_distance": round(self.typical_distance, 4),
                "typical_train_distance_aligned": round(self.typical_aligned, 4),
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


def _blur(x: Tensor) -> Tensor:
    """A 5x5 binomial blur per channel (edges repeated), as two passes of shifted sums (a grouped convolution is
    20x slower on a CPU)."""
    h, w = x.shape[-2:]
    k = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
    x = F.pad(x, (2, 2, 0, 0), mode="replicate")
    x = sum(c * x[..., :, i:i + w] for i, c in enumerate(k))
    x = F.pad(x, (0, 0, 2, 2), mode="replicate")
    return sum(c * x[..., i:i + h, :] for i, c in enumerate(k))


def _warp(x: Tensor, p: Tensor) -> Tensor:
    """x (n, C, H, W) float resampled at a scale and shift per axis: p (n, 4) = log scale x, y; shift x, y (in
    units of half the side)."""
    h, w = x.shape[-2:]
    gx = (torch.arange(w, device=x.device) * 2 + 1) / w - 1  # pixel centres in [-1, 1] (align_corners=False)
    gy = (torch.arange(h, device=x.device) * 2 + 1) / h - 1
    sx, sy = p[:, 0].exp()[:, None, None], p[:, 1].exp()[:, None, None]
    grid = torch.stack(((sx * gx[None, None, :] + p[:, 2, None, None]).expand(-1, h, w),
                        (sy * gy[None, :, None] + p[:, 3, None, None]).expand(-1, h, w)), -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _inner(x: Tensor) -> Tensor:
    """The central region (ALIGN_BORDER of each side left out), standardized per image and channel."""
    h, w = x.shape[-2:]
    m, n = round(h * ALIGN_BORDER), round(w * ALIGN_BORDER)
    return _standardize(x[..., m:h - m, n:w - n])


def _balance(x: Tensor) -> Tensor:
    """(n, C): each channel's mean over the central region relative to the image's, in units of its spread: the
    colour balance that _inner removes."""
    h, w = x.shape[-2:]
    m, n = round(h * ALIGN_BORDER), round(w * ALIGN_BORDER)
    x = x[..., m:h - m, n:w - n]
    mean = x.mean((2, 3))
    return (mean - mean.mean(1, keepdim=True)) / x.std((1, 2, 3)).clamp_min(1.0)[:, None]


def align(a: Tensor, b: Tensor) -> Tensor:
    """(n, 4) _warp parameters that best map each b onto its a (float, same shape): Adam steps on the grey central
    regions, blurred first (a wider basin), then sharp; the loss is a smooth L1 (an object that moved between the
    two shots does not pull the rest out of place)."""
    with torch.inference_mode(False), torch.enable_grad():
        a, b = a.mean(1, keepdim=True).clone(), b.mean(1, keepdim=True).clone()
        p = torch.zeros(len(a), 4, device=a.device, requires_grad=True)
        opt = torch.optim.Adam([p], lr=0.03)
        for blurred, steps in zip((True, False), ALIGN_STEPS):
            x, y = (_blur(a), _blur(b)) if blurred else (a, b)
            target = _inner(x)
            for _ in range(steps):
                opt.zero_grad()
                ((_inner(_warp(y, p)) - target) ** 2 + 0.01).sqrt().mean((1, 2, 3)).sum().backward()  # ~L1: robust
                opt.step()
                with torch.no_grad():  # within a third larger or smaller, 15% of the side away
                    p[:, :2].clamp_(-0.35, 0.35)
                    p[:, 2:].clamp_(-0.3, 0.3)
    return p.detach()


def _detail(x: Tensor) -> Tensor:
    """(n, P): the fine detail of the grey central region (the image minus its blur), mean-free and unit-norm."""
    g = x.mean(1, keepdim=True)
    h, w = x.shape[-2:]
    m, n = round(h * ALIGN_BORDER), round(w * ALIGN_BORDER)
    d = (g - _blur(g))[..., m:h - m, n:w - n].flatten(1)
    d = d - d.mean(1, keepdim=True)
    return d / d.norm(dim=1, keepdim=True).clamp_min(1e-6)


def aligned_distances(imgs: Tensor, train_images: Tensor, idx: Tensor, device: torch.device, chunk: int = 128
                      ) -> tuple[Tensor, Tensor]:
    """(distances, detail), each (n, k), to the candidates after aligning each (or its mirror, the closer one before
    aligning: as good on CIFAR-10's copies as aligning both, at half the cost) to the image: mean |difference| of the
    standardized central regions + BALANCE x the difference of colour balance; and the correlation of their fine
    detail (1: the same edges in the same places). The k candidates of `chunk` images are aligned in one batch (larger
    batches are slower on a CPU: the working set leaves the cache)."""
    if len(imgs) > chunk:
        parts = [aligned_distances(imgs[i:i + chunk], train_images, idx[i:i + chunk], device, chunk)
                 for i in range(0, len(imgs), chunk)]
        return torch.cat([d for d, _ in parts]), torch.cat([c for _, c in parts])
    n, k = idx.shape
    q = imgs.to(device).float().repeat(k, 1, 1, 1)  # candidate-major: row c * n + i
    match = train_images[idx.T.flatten()].to(device).float()
    inner = _inner(q)
    flip = (_inner(match.flip(3)) - inner).abs().mean((1, 2, 3)) < (_inner(match) - inner).abs().mean((1, 2, 3))
    b = torch.where(flip[:, None, None, None], match.flip(3), match)
    w = _warp(b, align(q, b))
    dist = (_inner(w) - inner).abs().mean((1, 2, 3)) + BALANCE * (_balance(w) - _balance(q)).abs().mean(1)
    corr = (_detail(w) * _detail(q)).sum(1)
    return dist.view(k, n).T.cpu(), corr.view(k, n).T.cpu()


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


class Typical(NamedTuple):
    """The median distance from a training image to its nearest other training image: in pixels (stage 2) and
    aligned (stage 3)."""
    pixels: float
    aligned: float


def typical_distance(train: ImageSet, refs: Reference, device: torch.device, sample: int = 1000,
                     seed: int = 0) -> Typical:
    """The typical distances, measured on a seeded sample of training images, to the nearest training image that is
    not an exact copy (a folder whose images are mostly in two class folders at once made the median 0, and every
    distance divided by it a ZeroDivisionError); 1.0 where every candidate is a copy (nothing left to judge by)."""
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:sample]
    imgs = train.images[pick]
    _, idx = candidates(imgs, refs, device, exclude=pick)

    def nearest_other(d: Tensor) -> float:
        d = d.masked_fill(d <= 1e-6, float("inf")).min(1).values
        return float(d[d.isfinite()].median()) if d.isfinite().any() else 1.0

    return Typical(nearest_other(distances(imgs, train.images, idx)),
                   nearest_other(aligned_distances(imgs, train.images, idx, device)[0]))


def is_copy(relative: float, ratio: float) -> bool:
    """Stage 2. relative: d1 / the typical training distance; ratio: d1 / the CANDIDATES-th candidate's distance."""
    near, far = RATIO
    limit = near - (near - far) * min(1.0, max(0.0, (relative - 0.35) / (REL - 0.35)))
    return relative <= REL and ratio <= limit


def is_aligned_copy(relative: float, ratio: float, detail: float) -> bool:
    """Stage 3. relative: aligned d1 / the typical aligned distance; ratio: d1 / the 3rd candidate's distance;
    detail: the correlation of the image's fine detail with its nearest candidate's."""
    alone, group, crowd, far = ALIGNED
    return relative <= alone or (relative <= group and detail >= DETAIL) or (ratio <= crowd and relative <= far)


def _pair(split: str, qid: str, tid: str, cosine: float, d: float, typical: float, ratio: float, **more) -> dict:
    return {"split": split, "id": qid, "train_id": tid, "cosine": round(cosine, 4), "diff": round(d, 4),
            "relative": round(d / typical, 4), "ratio": round(ratio, 4), **more}


def near_duplicates(train: ImageSet, other: ImageSet, split: str, typical: Typical, refs: Reference,
                    device: torch.device = torch.device("cpu"), chunk: int = 1024) -> list[dict]:
    found = []
    for i in range(0, len(other), chunk):
        imgs, ids = other.images[i:i + chunk], other.ids[i:i + chunk]
        cos, idx = candidates(imgs, refs, device)
        rows = (cos[:, 0] >= GATE).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        d = distances(imgs[rows], train.images, idx[rows])  # (r, k)
        d1, best = d.min(1)
        ratio = d1 / d.max(1).values.clamp_min(1e-6)
        left = []
        for k, (r, j, x, q) in enumerate(zip(rows.tolist(), best.tolist(), d1.tolist(), ratio.tolist())):
            if is_copy(x / typical.pixels, q):
                found.append(_pair(split, ids[r], train.ids[int(idx[r, j])], float(cos[r, j]), x, typical.pixels, q))
            elif x <= ALIGN_FROM * typical.pixels:
                left.append(r)
        if left:
            found += _aligned_copies(train, imgs, ids, cos, idx, torch.tensor(left), split, typical, device)
    return found


def _aligned_copies(train: ImageSet, imgs: Tensor, ids: list[str], cos: Tensor, idx: Tensor, rows: Tensor,
                    split: str, typical: Typical, device: torch.device) -> list[dict]:
    """Stage 3 for the images `rows` of `imgs` (their candidates `idx`, thumbnail cosines `cos`)."""
    d, detail = aligned_distances(imgs[rows], train.images, idx[rows], device)  # (r, k) each
    d1, best = d.min(1)
    third = d.sort(1).values[:, min(2, d.shape[1] - 1)]
    same = detail.gather(1, best[:, None]).squeeze(1)
    out = []
    for r, j, x, t, e in zip(rows.tolist(), best.tolist(), d1.tolist(), third.tolist(), same.tolist()):
        if is_aligned_copy(x / typical.aligned, x / max(t, 1e-6), e):
            out.append(_pair(split, ids[r], train.ids[int(idx[r, j])], float(cos[r, j]), x, typical.aligned,
                             x / max(t, 1e-6), aligned=True, detail=round(e, 4)))
    return out


def shrunk(s: ImageSet) -> ImageSet:
    """`s` as the audit searches it: its images (a streamed split's copies) at AUDIT_SIDE on the shorter side."""
    return ImageSet(s.labels, s.ids, audit_size(s.pixels()))


def search(train: ImageSet, queries: dict[str, ImageSet], device: torch.device,
           typical: Typical | None = None) -> tuple[list[dict], Typical]:
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
    key = digest("near copies v5", fingerprint, *carved, *(i for s in splits.values() for i in s.ids))
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


def same_photo_other_label(train: ImageSet, typical: float, chunk: int = 1024) -> list[dict]:
    """The same photo filed under two labels inside the training split, not byte for byte (re-encoded, resized,
    converted to another mode; an exact copy is `conflicting_copies`'): for each training image, its nearest training
    thumbnail of another label, compared at full resolution (stage 2's distance) where the thumbnails agree
    (SAME_COSINE); within SAME_PHOTO x the `typical` distance, one pair. One label per image only."""
    if train.labels.ndim != 1:
        return []
    thumbs, labels, found = thumbnails(train.images), train.labels, {}
    for i in range(0, len(train), chunk):
        sim = (thumbs[i:i + chunk] @ thumbs.T).masked_fill_(labels[i:i + chunk, None] == labels[None, :], -2.0)
        cos, idx = sim.max(1)
        rows = (cos >= SAME_COSINE).nonzero().squeeze(1)
        if len(rows):
            d = distances(train.images[i + rows], train.images, idx[rows, None]).squeeze(1) / typical
            for r, j, x in zip((i + rows).tolist(), idx[rows].tolist(), d.tolist()):
                if x <= SAME_PHOTO:
                    found.setdefault(tuple(sorted((r, j))), round(x, 4))
    return [{"ids": [train.ids[a], train.ids[b]], "labels": [int(labels[a]), int(labels[b])], "relative": x}
            for (a, b), x in sorted(found.items())]


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
        small = shrunk(train)  # once for both searches (search's own shrunk() leaves it as it is)
        a.near_duplicates, typical = search(small, {s: splits[s] for s in ("val", "test") if s not in joined}, device)
        a.typical_distance, a.typical_aligned = typical
        kept = {frozenset((p["id"], p["train_id"])) for p in train.joined}  # named with the pairs kept together
        a.same_photo_other_label = [p for p in same_photo_other_label(small, typical.pixels)
                                    if frozenset(p["ids"]) not in kept]
    a.conflicting_copies = conflicting_copies(splits)
    a.kept_together = train.joined
    hashed = Counter(d for s in splits.values() for d in (s.digests or []))  # digests: where safetrain split
    a.copy_groups = sum(n > 1 for n in hashed.values())
    a.blank = [i for s in splits.values() for i in blank_images(s)]
    return a


def cached_audit(splits: dict[str, ImageSet], fingerprint: str, cache_dir: Path, device: torch.device,
                 joined: tuple[str, ...] = ()) -> Audit:
    """`audit`, cached by the fingerprint of the source and the split assignment."""
    key = digest("audit v14", fingerprint, *joined, *(i for s in splits.values() for i in s.ids))
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
        several = len(a.conflicting_copies) >= MANY_CONFLICTS and isinstance(ex["labels"][0], int)
        out.append(Finding("M08", "conflicting copies", f"{len(a.conflicting_copies)} identical images "
                           f"carry different labels (e.g. {ex['ids'][0]} and {ex['ids'][1]}): at least one label of "
                           "each pair is wrong" + (", or the images show several classes at once" if several else "")
                           + ".", "Fix or remove them." + (
                               " If an image may carry several labels (a cat outdoors), that is a multi-label task: "
                               "list each image once in a CSV with its labels joined (path,labels: x.jpg,cat|outdoor) "
                               "and train with data=csv data.label_column=labels 'data.label_delimiter=|'"
                               if several else ""), "audit", evidence={"count": len(a.conflicting_copies)}))
    conflicts = [p for p in a.kept_together if p["labels"][0] != p["labels"][1] and not p.get("aligned")
                 and p["ratio"] <= CONFLICT_RATIO]  # an aligned pair (stage 3) is too close a call to name a label
    if conflicts:
        ex = conflicts[0]
        out.append(Finding("M08", "near-copies with different labels", f"{len(conflicts)} of the "
                           f"{len(a.kept_together)} near-duplicate pairs kept together in train carry different "
                           f"labels (e.g. {ex['id']} and {ex['train_id']}): one label of each pair is likely wrong.",
                           "Look at the pairs (audit.json, kept_together) and fix or remove them.", "audit",
                           evidence={"count": len(conflicts)}))
    if a.same_photo_other_label:
        ex = a.same_photo_other_label[0]
        out.append(Finding("M08", "one photo, two labels", f"{len(a.same_photo_other_label)} pairs of training images "
                           f"are the same photo under different labels (re-encoded, resized or converted; e.g. "
                           f"{ex['ids'][0]} and {ex['ids'][1]}): at least one label of each pair is wrong.",
                           "Look at the pairs (audit.json, same_photo_other_label) and fix or remove them.", "audit",
                           evidence={"count": len(a.same_photo_other_label)}))
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
