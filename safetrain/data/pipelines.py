"""Normalization, batch augmentation and the two loaders (in-memory tensor, streamed files).

Both loaders yield uint8 batches to one `BatchPipeline`, which normalizes with the single
`Normalize` built from the data facts and, for training only, augments whole batches on
the training device (random crop with reflect padding, random resized crop, horizontal flip), as airbench
does; photo policies (TrivialAugment, RandAugment: torchvision.transforms.v2) per sample on the uint8 images
before that, and MixUp/CutMix (torchvision.transforms.v2) on the normalized batch, which turns the labels into
class probabilities (the loss takes them as they are; training accuracy counts the larger share's class).
Eval pipelines have no augmentation by construction [M04].
"""
from __future__ import annotations

import math
import queue
import threading
from functools import partial
from typing import Iterable, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

from safetrain.data.files import Fit
from safetrain.data.sources import Decoding, FileDataset, ImageSet, file_loader
from safetrain.data.stored import JpegImages
from safetrain.distributed import chunk, share_of
from safetrain.errors import DataError


class Normalize(nn.Module):
    """uint8 (B, C, H, W) -> float32 standardized with the training split's mean/std [M01, M02]."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:  # (x / 255 - mean) / std in one new tensor: 13x faster than in four
        return x.to(torch.float32, copy=True).div_(255).sub_(self.mean).div_(self.std)

    def denormalize(self, x: Tensor) -> Tensor:
        return (x * self.std + self.mean).clamp(0, 1)


# Every random operation draws for the whole global batch and keeps its share (`at`: (rank, ranks), see
# safetrain/distributed.py), so the same sample gets the same crop and flip whatever the number of processes.

def batch_crop(x: Tensor, pad: int, g: torch.Generator, at: tuple[int, int] = (0, 1)) -> Tensor:
    """Random translation by up to `pad` pixels with reflect padding, per sample, in 2*(2*pad+1)
    masked copies instead of a Python loop over the batch (airbench's batch_crop)."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect" if pad < min(h, w) else "replicate")  # 1x1 px: no reflection
    shifts = share_of(torch.randint(0, 2 * pad + 1, (2, b * at[1]), device=x.device, generator=g), at)
    rows = torch.empty((b, c, h, w + 2 * pad), device=x.device, dtype=x.dtype)
    for s in range(2 * pad + 1):
        m = shifts[0] == s
        rows[m] = xp[m, :, s:s + h, :]
    out = torch.empty_like(x)
    for s in range(2 * pad + 1):
        m = shifts[1] == s
        out[m] = rows[m, :, :, s:s + w]
    return out


def batch_flip(x: Tensor, g: torch.Generator, at: tuple[int, int] = (0, 1)) -> Tensor:
    flip = share_of(torch.rand(x.shape[0] * at[1], device=x.device, generator=g), at) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def batch_rotate(x: Tensor, degrees: float, g: torch.Generator, at: tuple[int, int] = (0, 1)) -> Tensor:
    """Rotate each sample by its own angle in [-degrees, degrees] (reflection at the borders)."""
    a = (share_of(torch.rand(x.shape[0] * at[1], device=x.device, generator=g), at) * 2 - 1) * degrees * torch.pi / 180
    cos, sin, zero = a.cos(), a.sin(), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def batch_crop_eighth(x: Tensor, g: torch.Generator, at: tuple[int, int] = (0, 1)) -> Tensor:
    return batch_crop(x, max(1, round(x.shape[-1] / 8)), g, at)  # 4 px at 32x32


def batch_crop_sixteenth(x: Tensor, g: torch.Generator, at: tuple[int, int] = (0, 1)) -> Tensor:
    return batch_crop(x, max(1, round(x.shape[-1] / 16)), g, at)  # 2 px at 32x32: for schedules of a few epochs


def batch_resized_crop(x: Tensor, g: torch.Generator, at: tuple[int, int] = (0, 1),
                       scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Random resized crop, per sample, in one grid_sample: a box of `scale` (a share of the image's area) and
    `ratio` (width / height, drawn log-uniformly) at a random place, resized back to the image's size (bilinear)."""
    b = x.shape[0]
    draws = share_of(torch.rand(4, b * at[1], device=x.device, generator=g), at)
    area = scale[0] + (scale[1] - scale[0]) * draws[0]
    r = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * draws[1])
    w, h = (area * r).sqrt().clamp(max=1.0), (area / r).sqrt().clamp(max=1.0)  # shares of the side
    cx, cy = (1 - w) * (2 * draws[2] - 1), (1 - h) * (2 * draws[3] - 1)  # the box's centre, inside the image
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


PIXEL_MOVES = (batch_crop_eighth, batch_crop_sixteenth, batch_flip)  # copy pixels, never interpolate them

# data.augment=NAME -> (the per-sample policy on uint8 images (torchvision.transforms.v2) or None, the batch
# operations of the training pipeline in order). Eval pipelines have none [M04].
AUGMENTS = {"none": (None, ()), "flip": (None, (batch_flip,)), "crop": (None, (batch_crop_eighth,)),
            "crop_flip": (None, (batch_crop_eighth, batch_flip)),
            "shift": (None, (batch_crop_sixteenth,)), "shift_flip": (None, (batch_crop_sixteenth, batch_flip)),
            "rrc": (None, (batch_resized_crop,)), "rrc_flip": (None, (batch_resized_crop, batch_flip)),
            "rrc_trivial": (v2.TrivialAugmentWide, (batch_resized_crop, batch_flip)),
            "rrc_randaugment": (v2.RandAugment, (batch_resized_crop, batch_flip))}
MIXES = {"none": None, "mixup": v2.MixUp, "cutmix": v2.CutMix}  # data.mix: mixing images and their labels
# data.augment=auto -> (where flips keep the label, where they do not), for images resized to the training size from
# their own (varied sizes, data.image_size) or not. Measured (benchmarks/RESULTS.md, own images: CIFAR-10 re-delivered
# at 40-200 px, 32 px, 3 minutes on 2 CPU cores): shift_flip 75.3% test accuracy, rrc_flip 73.1% (crop_scale
# [0.7, 1]) and 66.8% ([0.35, 1]): on short schedules the milder augmentation wins; rrc_* are for long ones
AUTO_AUGMENT = {True: ("shift_flip", "shift"), False: ("crop_flip", "crop")}


def resolve_augment(name: str, resized: bool, flips_keep_label: bool) -> str:
    """data.augment, with `auto` resolved by AUTO_AUGMENT (whether the images were `resized` to the training size
    from their own), flips only where they keep the label [M05]."""
    return AUTO_AUGMENT[resized][not flips_keep_label] if name == "auto" else name


def hard_labels(y: Tensor) -> Tensor:
    """Class indices of a batch's labels: as they are, or the larger share of data.mix's class probabilities."""
    return y if y.ndim == 1 else y.argmax(1)


def flips(augment: str) -> bool:
    """Whether data.augment mirrors images (refused where a mirror changes the label [M05])."""
    return batch_flip in AUGMENTS[augment][1]


def resized_crops(augment: str) -> bool:
    return batch_resized_crop in AUGMENTS[augment][1]


class Augment(NamedTuple):
    """The training pipeline's random operations: data.augment (a name of AUGMENTS, resolved), data.rotate_degrees,
    the random resized crop's data.crop_scale and data.crop_ratio [M05], data.mix and data.mix_alpha."""
    name: str = "none"
    rotate_degrees: float = 0.0
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    mix: str = "none"
    mix_alpha: float = 1.0


def _seeded(g: torch.Generator, n: int, at: tuple[int, int]) -> list[int]:
    """One seed per sample of this rank's share of the global batch, drawn from `g` (torchvision's transforms draw
    from the global generator: each sample's draws are made under its own seed, so they do not depend on the
    number of processes, and resume exactly with `g`)."""
    seeds = torch.randint(0, 2 ** 62, (n * at[1],), device=g.device, generator=g)
    return share_of(seeds, at).tolist()


class BatchPipeline:
    """uint8 batch on any device -> normalized float batch on `device`, augmented if training. `at`: (rank, ranks)
    when each batch is this rank's share of a global one. `num_classes`: for data.mix (its labels are one-hot)."""

    def __init__(self, normalize: Normalize, device: torch.device, augment: Augment = Augment(), seed: int = 0,
                 at: tuple[int, int] = (0, 1), num_classes: int = 0):
        self.normalize = normalize.to(device)
        self.device, self.augment, self.at = device, augment, at
        self.g = torch.Generator(device=device).manual_seed(seed)
        policy, ops = AUGMENTS[augment.name]
        self.policy = policy() if policy else None
        ops = [partial(op, scale=augment.crop_scale, ratio=augment.crop_ratio) if op is batch_resized_crop
               else op for op in ops]
        moves = next((k for k, op in enumerate(ops) if op not in PIXEL_MOVES), len(ops))
        self.moves, self.ops = ops[:moves], ops[moves:]  # the leading pixel moves run on uint8: the same result as
        # after normalizing (a per-channel affine map), 1.4x faster at 64 px (4x fewer bytes moved)
        mix = MIXES[augment.mix]
        self.mix = mix(alpha=augment.mix_alpha, num_classes=num_classes) if mix else None

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.policy is not None:
            x = torch.stack([self._policy(img, s) for img, s in zip(x, _seeded(self.g, len(x), self.at))])
        for op in self.moves:
            x = op(x, self.g, self.at)
        x = self.normalize(x)
        for op in self.ops:
            x = op(x, self.g, self.at)
        if self.augment.rotate_degrees:
            x = batch_rotate(x, self.augment.rotate_degrees, self.g, self.at)
        return x

    def _policy(self, img: Tensor, seed: int) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.policy(img)

    def labelled(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """A training batch and its labels: with data.mix, pairs of images mixed (within this process's share) and
        the labels turned into the matching class probabilities (B, C)."""
        x, y = self(x), y.to(self.device, non_blocking=True)
        if self.mix is None:
            return x, y
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seeded(self.g, 1, (0, 1))[0])
            return self.mix(x, y)


class _RandomState:
    """A training loader's random state, for exact resume: the order of the samples (shuffling or class-balanced
    draws) and the augmentation. `batch_ids`: the positions in the split of the batch last yielded (this rank's
    share), for what is recorded per sample during training (monitors.Margins). Both generators are seeded once per
    run and move on from epoch to epoch.
    Inside an epoch (a mid-epoch checkpoint: engine.train_epoch) the state is the order's at the epoch's start, the
    augmentation's now and `skip`, the batches already trained: the next pass draws the same order and starts after
    them, without drawing their augmentation again."""
    skip = 0
    batch_ids: Optional[Tensor] = None

    def state_dict(self) -> dict:
        return {"order": self.g.get_state(), "augment": self.pipeline.g.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.g.set_state(state["order"])
        self.pipeline.g.set_state(state["augment"])
        self.skip = int(state.get("skip", 0))

    def _skipped(self) -> int:
        """The batches the next pass leaves out (once)."""
        skip, self.skip = self.skip, 0
        return skip


class TensorLoader(_RandomState):
    """Batches from uint8 images held in memory on the training device (the fast path). `at` (rank, ranks): in
    training (drop_last) this rank's share of each global batch, every rank drawing the same order; in evaluation
    this rank's contiguous share of the split (every sample once over the ranks)."""

    def __init__(self, data: ImageSet, pipeline: BatchPipeline, batch_size: int, shuffle: bool,
                 drop_last: bool, seed: int = 0, sample_weights: Optional[Tensor] = None, at: tuple = (0, 1)):
        device = pipeline.device
        self.images, self.labels = data.images.to(device), data.labels.to(device)
        self.sample_weights = None if sample_weights is None else sample_weights.to(device)
        self.pipeline, self.batch_size, self.shuffle, self.drop_last = pipeline, batch_size, shuffle, drop_last
        self.g = torch.Generator(device=device).manual_seed(seed)
        self.at = at

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.labels) // self.batch_size
        return -(-len(chunk(len(self.labels), self.at)) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.labels)
        if self.sample_weights is not None:  # class-balanced: draw with replacement, by weight
            order = torch.multinomial(self.sample_weights, n, replacement=True, generator=self.g)
        elif self.shuffle:
            order = torch.randperm(n, device=self.images.device, generator=self.g)
        else:
            share = chunk(n, self.at)
            order = torch.arange(share.start, share.stop, device=self.images.device)
        for i in range(self._skipped(), len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            if self.drop_last:
                idx = share_of(idx, self.at)
            self.batch_ids = idx
            yield self.pipeline.labelled(self.images[idx], self.labels[idx])


class StreamLoader(_RandomState):
    """Batches of a split not held in memory: read from the disk cache, where the images were decoded once
    (data.disk_cache, data/stored.py), each batch one read of its rows (JPEGs: and one batched decode, on the GPU when
    training runs there) in a thread a few batches ahead (reads and decodes release the GIL; worker processes cost
    more than they save here: 17,600 against 11,600 images/s at 64 px on 2 cores); else decoded from the files in
    DataLoader workers."""

    def __init__(self, data: ImageSet, pipeline: Optional[BatchPipeline], batch_size: int, shuffle: bool,
                 drop_last: bool, decoding: Decoding, seed: int = 0, sample_weights: Optional[Tensor] = None,
                 at: tuple = (0, 1)):
        shape, resize, num_workers = decoding
        self.data, self.pipeline, self.shape = data, pipeline, shape
        self.g = g = torch.Generator().manual_seed(seed)  # the order and the workers' seeds
        if sample_weights is not None:
            sampler = torch.utils.data.WeightedRandomSampler(sample_weights, len(data), generator=g)
        elif shuffle:
            sampler = torch.utils.data.RandomSampler(range(len(data)), generator=g)
        else:
            sampler = chunk(len(data), at)  # evaluation: this rank's share of the split (as TensorLoader)
        batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last)
        self.batches = _Shares(batches, at if drop_last else (0, 1), self)
        self.loader = None if data.stored is not None else file_loader(
            _LabelledFiles(data, shape[0], resize), batch_sampler=self.batches, generator=g, num_workers=num_workers,
            collate_fn=partial(_stack, shape=tuple(shape)),
            pin_memory=pipeline is not None and pipeline.device.type == "cuda")

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for x, y, ids in self._stored() if self.loader is None else self.loader:
            self.batch_ids = ids
            if self.pipeline is None:  # raw uint8 batches (statistics)
                yield x, y
                continue
            yield self.pipeline.labelled(x, y)

    def _stored(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The epoch's batches from the disk cache: the order drawn here, from `g` as DataLoader draws it for the files
        (its workers' base seed, then the sampler's), so both paths give the same batches; the reads in a thread."""
        torch.empty((), dtype=torch.int64).random_(generator=self.g)
        order = list(self.batches)
        images, labels = self.data.stored, self.data.labels
        if isinstance(images, JpegImages) and self.pipeline is not None and self.pipeline.device.type == "cuda":
            images = images.on(self.pipeline.device)  # decoded by nvjpeg, where the batch goes
        return _ahead(((images[idx], labels[idx], torch.tensor(idx)) for idx in order))


def _ahead(batches: Iterable, depth: int = 4) -> Iterator:
    """`batches`, produced by a background thread up to `depth` ahead of the consumer; its error raised here."""
    out, stop, end = queue.Queue(depth), threading.Event(), object()

    def fill():
        try:
            for b in batches:
                if stop.is_set():
                    return
                out.put(b)
            out.put(end)
        except BaseException as e:  # noqa: BLE001  handed to the consumer
            out.put(e)
    thread = threading.Thread(target=fill, daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # the consumer stopped (or failed): let the thread finish
        stop.set()
        while thread.is_alive():
            try:
                out.get(timeout=0.05)
            except queue.Empty:
                pass


class _Shares:
    """This rank's share of each global batch (training), as TensorLoader takes it, after the batches `owner` skips
    (the sampler still draws the whole epoch's order: the same one as before the stop)."""

    def __init__(self, batches, at: tuple[int, int], owner: "_RandomState"):
        self.batches, self.at, self.owner = batches, at, owner

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        skip = self.owner._skipped()
        for i, batch in enumerate(self.batches):
            if i >= skip:
                yield share_of(torch.tensor(batch), self.at).tolist() if self.at[1] > 1 else batch


def _stack(items, shape: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """(images, labels, positions in the split) of a batch of _LabelledFiles items."""
    for img, _, path, _ in items:
        if tuple(img.shape) != shape:
            raise DataError(f"[data] {path} decodes to {tuple(img.shape)} but the dataset's images are {shape}. "
                            "Set data.image_size=N to train every image at NxN.")
    return (torch.stack([item[0] for item in items]), torch.tensor([item[1] for item in items]),
            torch.tensor([item[3] for item in items]))


class _LabelledFiles(FileDataset):
    def __init__(self, data: ImageSet, channels: int, resize: Optional[Fit]):
        super().__init__(data.files, channels, resize)
        self.labels = data.labels.tolist()

    def __getitem__(self, i):
        return super().__getitem__(i), self.labels[i], self.files[i], i


def make_loader(data: ImageSet, pipeline: Optional[BatchPipeline], *, batch_size: int, train: bool, seed: int,
                decoding: Optional[Decoding] = None, class_counts: Optional[list[int]] = None,
                at: tuple[int, int] = (0, 1)):
    """Train: shuffled, augmented, last partial batch dropped [M22]; given `class_counts` (the split's), samples
    are drawn with probability 1/(count of their class): class-balanced batches [M24]. Eval: in order, whole, plain.
    `at` (rank, ranks) under torchrun: train yields this rank's share of each global batch of `batch_size` (the
    pipeline's `at` must be the same), eval this rank's share of the split. `decoding`: for a split of files."""
    weights = None
    if class_counts is not None:
        weights = 1.0 / torch.tensor(class_counts, dtype=torch.float64)[data.labels]
    kw = dict(batch_size=batch_size, shuffle=train, drop_last=train, seed=seed, sample_weights=weights, at=at)
    if data.images is not None:
        return TensorLoader(data, pipeline, **kw)
    return StreamLoader(data, pipeline, decoding=decoding, **kw)


def uint8_batches(data: ImageSet, decoding: Decoding, batch_size: int = 1024) -> Iterator[Tensor]:
    """The split's images as plain uint8 batches, in order, from memory, the disk cache, or decoded from files."""
    if data.images is not None:
        for i in range(0, len(data), batch_size):
            yield data.images[i:i + batch_size]
        return
    loader = StreamLoader(data, None, batch_size, shuffle=False, drop_last=False, decoding=decoding)
    for x, _ in loader:
        yield x


def pick_images(data: ImageSet, ids: list[str], decoding: Decoding) -> Tensor:
    """The images of the samples `ids` as uint8 (N, C, H, W): from memory, the disk cache, or their files."""
    where = {sid: i for i, sid in enumerate(data.ids)}
    idx = [where[sid] for sid in ids]
    if data.images is not None or data.stored is not None:
        return (data.images if data.images is not None else data.stored)[idx]
    files = FileDataset([data.files[i] for i in idx], decoding.shape[0], decoding.resize)
    return torch.stack([files[i] for i in range(len(idx))])
