"""Data beyond memory (issue 26): a large folder made from the CIFAR-10 copy, and three measurements on it.

    python benchmarks/scale.py make --out /tmp/scale                 # 240,000 training JPEGs, 24,000 queries
    python benchmarks/scale.py throughput --root /tmp/scale/big      # decoded-once cache vs ImageFolder + PIL
    python benchmarks/scale.py audit --root /tmp/scale               # the audit at N = 15k, 60k, 240k
    python benchmarks/scale.py ram --root /tmp/scale/big             # the data stage's peak memory, streamed
    python benchmarks/scale.py --tiny                                # all three on a few hundred images (seconds)

`make`: every CIFAR-10 training image becomes variants (shifted, scaled to a shorter side of 64-128 px with its own
aspect ratio, recoloured; JPEG quality 90) under big/train/<class>/; the test images become queries/<class>/ the same
way (not copies of any training image, but for CIFAR-10's own near-duplicates); planted/<class>/ holds 100 copies of
training images from the first 15,000 (re-encoded at quality 75, moved 2 px, half of them mirrored, recoloured).

`throughput`: images per second the training loop receives at 64x64 from (a) torchvision `ImageFolder` + PIL
(Resize, CenterCrop, flip, PILToTensor) in a `DataLoader` and (b) safetrain's streamed loader (data.loader=stream) from
its second epoch on, when it reads the disk cache (the same worker count, batch 256, shuffled, flips and crops);
then both feeding the same training step of a small CNN (forward, backward, AdamW) for a fixed number of batches.
The first pass over the files (decode once, write the cache and the audit's copies) is timed on its own. Each kind
of disk cache in --kinds (raw; jpeg: re-encoded at quality 95, for disks too small for raw) is measured; --device
cuda delivers the batches to the GPU (the jpeg cache then decodes there, with nvJPEG). Peak memory:
the process's maximum resident set (ru_maxrss) after each stage, and the workers' (ru_maxrss of the children).

`audit`: the near-duplicate search (safetrain.data.audit.search) of N/10 queries, 100 of them planted copies, against
N training images, N = 15k, 60k, 240k; its seconds, the growth exponent between sizes, the recall of the planted
copies, and the other flags (CIFAR-10's own test/train near-duplicates, re-made as variants). Then, on the planted
copies and --compare other queries, the exact search (as in memory below EXACT_MAX) against the one used at that size:
recall of each and whether they flag the same pairs.

`ram`: safetrain's whole data stage as a run calls it (data.loader=stream), then training batches: seconds and the
process's peak memory, against what the decoded images would take in memory.

Prints one JSON line per measurement; `--json FILE` appends them there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._cifar import TARBALL, unpack  # noqa: E402

SIDE = 64  # the training resolution both loaders deliver
PLANTED = 100


# ---------------------------------------------------------------- the folder
def _variant(job: tuple[str, str, int]) -> None:
    """One variant of a CIFAR image: scaled to a shorter side of 64-128 px (aspect 1-1.3, either way), moved by up to
    1/8 of a side (reflected border), colours scaled by 0.8-1.2 per channel, saved as JPEG quality 90."""
    src, out, seed = job
    rng = np.random.default_rng(seed)
    with Image.open(src) as im:
        im = im.convert("RGB")
    side, aspect = int(rng.integers(64, 129)), float(rng.uniform(1.0, 1.3))
    w, h = (round(side * aspect), side) if rng.random() < 0.5 else (side, round(side * aspect))
    arr = np.asarray(im.resize((w, h), Image.BICUBIC)).astype(np.float32)
    dy, dx = (int(rng.integers(-s // 8, s // 8 + 1)) for s in (h, w))
    arr = np.pad(arr, ((abs(dy),) * 2, (abs(dx),) * 2, (0, 0)), mode="reflect")[
        abs(dy) + dy:abs(dy) + dy + h, abs(dx) + dx:abs(dx) + dx + w]
    arr = arr * rng.uniform(0.8, 1.2, 3)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(out, quality=90)


def _planted(job: tuple[str, str, int]) -> None:
    """A copy of a training file as another person would have saved it: moved 2 px, recoloured a little, half of
    them mirrored, re-encoded at quality 75."""
    src, out, seed = job
    rng = np.random.default_rng(seed)
    with Image.open(src) as im:
        arr = np.asarray(im.convert("RGB")).astype(np.float32)
    arr = np.roll(arr, (2, -2), axis=(0, 1)) * rng.uniform(0.9, 1.1, 3)
    arr = arr[:, ::-1] if seed % 2 else arr
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(out, quality=75)


def _jobs(cifar: Path, split: str, out: Path, n: int, seed: int) -> list[tuple[str, str, int]]:
    """n variants of the split's images, round-robin (every image once before any twice), in a seeded order."""
    files = sorted(cifar.glob(f"{split}/*/*.jpg"))
    order = np.random.default_rng(seed).permutation(len(files))
    jobs = []
    for k in range(n):
        f = files[order[k % len(files)]]
        (out / f.parent.name).mkdir(parents=True, exist_ok=True)
        jobs.append((str(f), str(out / f.parent.name / f"{f.stem}_{k // len(files)}.jpg"), seed * 10**7 + k))
    return jobs


def make(out: Path, cifar: Path, train: int, queries: int, workers: int) -> dict:
    t0 = time.time()
    big = _jobs(cifar, "train", out / "big" / "train", train, 1)
    with Pool(workers) as pool:
        pool.map(_variant, big, chunksize=256)
        pool.map(_variant, _jobs(cifar, "test", out / "queries", queries, 2), chunksize=256)
        first = sorted(big[:min(15000, len(big) // 4)], key=lambda j: j[1])  # planted from the first 15k: in every N
        pick = np.random.default_rng(3).choice(len(first), min(PLANTED, len(first) // 2), replace=False)
        planted = []
        for k in pick.tolist():
            src = Path(first[k][1])
            (out / "planted" / src.parent.name).mkdir(parents=True, exist_ok=True)
            planted.append((str(src), str(out / "planted" / src.parent.name / f"copy_of_{src.name}"), k))
        pool.map(_planted, planted)
    (out / "order.json").write_text(json.dumps([j[1] for j in big]))  # training files in the order N grows by
    return {"made": str(out), "train": train, "queries": queries, "planted": len(planted),
            "seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------- throughput
def peak_mb() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own), "peak_worker_rss_mb": round(kids)}


def _torchvision_loader(root: Path, workers: int, batch: int):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    tf = T.Compose([T.Resize(SIDE), T.CenterCrop(SIDE), T.RandomHorizontalFlip(), T.PILToTensor()])
    ds = ImageFolder(str(root / "train"), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=False)


def _safetrain_loader(root: Path, cache: Path, workers: int, batch: int, kind: str = "raw", device: str = "cpu"):
    from safetrain import data as D
    from safetrain.data.sources import load_folder
    t0 = time.time()
    src = load_folder(str(root), SIDE, "stream", cache, workers, disk_cache=kind)
    first = time.time() - t0
    data = src.parts.get("train") or src.parts["all"]
    pipe = D.BatchPipeline(D.Normalize([0.5] * 3, [0.25] * 3), torch.device(device), D.Augment("crop_flip"))
    loader = D.make_loader(data, pipe, batch_size=batch, train=True, seed=0, decoding=src.decoding(workers))
    return loader, first, len(data)


MODELS = {  # the training step's model: one whose step costs more than the data (small), one that costs less (tiny)
    "small CNN (3 convs 32-64-128, 41 MMAC an image)": lambda nn: [
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU()],
    "tiny CNN (stride-2 convs 16-32, 1.6 MMAC an image)": lambda nn: [
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]}


def _model(name: str):
    from torch import nn
    layers = MODELS[name](nn)
    width = [m for m in layers if isinstance(m, nn.Conv2d)][-1].out_channels
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))
    return net, torch.optim.AdamW(net.parameters(), 1e-3)


def _rate(batches, limit: int, step=None, device: str = "cpu") -> float:
    """Images per second over `limit` batches (after the first, which pays for starting the workers), each on
    `device` (a GPU: synchronized at the end)."""
    n, t0 = 0, None
    for i, (x, y) in enumerate(batches):
        x = x.to(device, non_blocking=True)
        if step is not None:
            step(x, y)
        if i == 0:
            t0 = time.perf_counter()
        else:
            n += len(x)
        if i >= limit:
            break
    if device != "cpu":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def throughput(root: Path, workers: int, batches: int, train_batches: int, batch: int = 256, kinds=("raw",),
               device: str = "cpu", models=tuple(MODELS)) -> list[dict]:
    """The first pass and the loader alone for each kind of disk cache (`kinds`: raw, jpeg) against ImageFolder +
    PIL, batches delivered to `device`; then training steps of `models` on the CPU with the first kind."""
    torch.set_num_threads(os.cpu_count() or 1)
    out = []
    with tempfile.TemporaryDirectory() as cache:
        theirs = None  # measured after the first pass, which leaves the files in the OS's cache for it too
        for kind in kinds:
            loader, first, n = _safetrain_loader(root, Path(cache), workers, batch, kind, device)
            theirs = theirs or _rate(iter(_torchvision_loader(root, workers, batch)), batches, device=device)
            size = sum(f.stat().st_size for f in Path(cache).rglob(f"*.images.{'jpg' if kind == 'jpeg' else 'u8'}"))
            out.append({"stage": f"first pass (decode once, write the {kind} cache)", "images": n,
                        "seconds": round(first, 1), "images_per_s": round(n / first), "cache_mb": round(size / 1e6),
                        **peak_mb()})
            ours = _rate(iter(loader), batches, device=device)
            out.append({"stage": f"loader only, {kind} cache, to {device}", "workers": workers, "batch": batch,
                        "safetrain_disk_cache": round(ours), "torchvision_imagefolder_pil": round(theirs),
                        "ratio": round(ours / theirs, 2), **peak_mb()})
        loader = _safetrain_loader(root, Path(cache), workers, batch, kinds[0])[0]  # cached: the training steps on CPU
        norm = loader.pipeline.normalize
        for name in models:
            net, opt = _model(name)

            def step(x, y):
                x = x if x.is_floating_point() else norm(x)
                loss = torch.nn.functional.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            ours = _rate(iter(loader), train_batches, step)
            theirs = _rate(iter(_torchvision_loader(root, workers, batch)), train_batches, step)
            out.append({"stage": f"training, {name}, fp32", "workers": workers, "safetrain_disk_cache": round(ours),
                        "torchvision_imagefolder_pil": round(theirs), "ratio": round(ours / theirs, 2), **peak_mb()})
    return out


# ---------------------------------------------------------------- audit
def audit(root: Path, sizes: list[int], workers: int, exact_max: int | None = None, cache: Path | None = None,
          compare: int = 0) -> list[dict]:
    from safetrain.data import audit as A
    from safetrain.data.sources import ImageSet, load_folder
    if exact_max is not None:
        A.EXACT_MAX = exact_max
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = cache or Path(tmp)
        t0 = time.time()
        big = load_folder(str(root / "big"), SIDE, "stream", Path(cache), workers).parts["train"]
        queries = load_folder(str(root / "queries"), SIDE, "stream", Path(cache), workers).parts["all"]
        planted = load_folder(str(root / "planted"), SIDE, "stream", Path(cache), workers).parts["all"]
        out.append({"stage": "decode and check once", "images": len(big) + len(queries) + len(planted),
                    "seconds": round(time.time() - t0, 1), **peak_mb()})
        where = {str(Path(f).resolve()): i for i, f in enumerate(big.files)}
        order = [where[str(Path(f).resolve())] for f in json.loads((root / "order.json").read_text())]
        source = {f"{Path(big.files[i]).parent.name}/copy_of_{Path(big.files[i]).name}": big.ids[i]
                  for i in order[:15000]}
        previous = None
        for n in sizes:
            train = big.subset(torch.tensor(order[:n]))
            q = max(0, n // 10 - len(planted))
            both = ImageSet(torch.cat([queries.labels[:q], planted.labels]), queries.ids[:q] + planted.ids,
                            torch.cat([queries.small[0:q], planted.small[0:len(planted)]]))  # N/10 at most
            t0 = time.time()
            pairs, typical = A.search(train, {"test": both}, torch.device("cpu"))
            seconds = time.time() - t0
            found = {p["id"]: p["train_id"] for p in pairs}
            hits = sum(found.get(pid) == source[pid] for pid in planted.ids)
            row = {"stage": "audit", "train": n, "queries": len(both), "seconds": round(seconds, 1),
                   "search": "exact" if n <= A.EXACT_MAX else "approximate (faiss HNSW)",
                   "planted_recall": hits / len(planted), "other_flags": len(pairs) - hits,
                   "typical_distance": round(typical.pixels, 4), **peak_mb()}
            if compare:  # the planted copies and `compare` other queries, searched exactly too (as in memory)
                few = ImageSet(torch.cat([queries.labels[:compare], planted.labels]), queries.ids[:compare] +
                               planted.ids, torch.cat([queries.small[0:compare], planted.small[0:len(planted)]]))
                flagged = {}
                for name, limit in (("exact", 10**9), ("approximate", A.EXACT_MAX)):
                    A.EXACT_MAX, kept = limit, A.EXACT_MAX
                    flagged[name] = {(p["id"], p["train_id"]) for p in A.search(train, {"test": few},
                                                                                 torch.device("cpu"))[0]}
                    A.EXACT_MAX = kept
                row["subset"] = {name: {"planted_recall": sum((pid, source[pid]) in f for pid in planted.ids)
                                        / len(planted), "flags": len(f)} for name, f in flagged.items()}
                row["subset"]["same_flags"] = flagged["exact"] == flagged["approximate"]
            if previous:
                row["exponent_since_previous"] = round(math.log(seconds / previous[1]) / math.log(n / previous[0]), 2)
            previous = (n, seconds)
            out.append(row)
    return out


# ---------------------------------------------------------------- RAM
def ram(root: Path, cache: Path | None, batches: int, workers: int) -> list[dict]:
    """safetrain's data stage on the folder as a run calls it (data.loader=stream: files listed and checked, decoded
    once to the disk cache, split with the near-copy search, statistics, audit, loaders), then `batches` training
    batches: the seconds of each part and the peak resident memory, against what the images would take in memory."""
    from safetrain.cli import compose
    from safetrain.stages import prepare_data, start
    with tempfile.TemporaryDirectory() as tmp:
        cfg, _ = compose("imagefolder", [f"data.root={root}", f"data.image_size={SIDE}", "data.loader=stream",
                                         f"data.num_workers={workers}", f"data.cache_dir={cache or tmp}",
                                         "trainer.device=cpu"])
        t0 = time.time()
        data = prepare_data(start(cfg))
        prepared = time.time() - t0
        n = sum(len(s) for s in data.splits.values())
        rate = _rate(iter(data.loaders.train), batches)
        return [{"stage": "data stage, streamed (disk cache)", "images": n, "seconds": round(prepared, 1),
                 "data_seconds": data.seconds, "train_images_per_s": round(rate),
                 "decoded_in_memory_would_be_mb": round(n * 3 * SIDE * SIDE / 2**20), **peak_mb()}]


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", choices=["make", "throughput", "audit", "ram"], default=None)
    ap.add_argument("--out", type=Path, default=Path("/tmp/scale"))
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--cifar", type=Path, default=None, help="the CIFAR-10 JPEG folder (default: unpack the tarball)")
    ap.add_argument("--train", type=int, default=240_000)
    ap.add_argument("--queries", type=int, default=24_000)
    ap.add_argument("--sizes", default="15000,60000,240000")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=200, help="loader-only batches timed")
    ap.add_argument("--train-batches", type=int, default=40, help="training-step batches timed")
    ap.add_argument("--exact-max", type=int, default=None, help="audit: set audit.EXACT_MAX (0: approximate always)")
    ap.add_argument("--compare", type=int, default=400, help="audit: the planted copies and this many other queries "
                                                                  "also searched both ways, exactly and as at that size")
    ap.add_argument("--cache", type=Path, default=None, help="audit: a cache folder kept between invocations")
    ap.add_argument("--tiny", action="store_true", help="all three on a few hundred images (seconds)")
    ap.add_argument("--kinds", default="raw,jpeg", help="throughput: the kinds of disk cache (data.disk_cache)")
    ap.add_argument("--device", default="cpu", help="throughput: where the loader delivers its batches (cuda: JPEGs "
                                                    "decoded there)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cifar = a.cifar or unpack(TARBALL, Path(tmp) / "cifar")
        if a.tiny:
            root = Path(tmp) / "scale"
            rows.append(make(root, cifar, 600, 160, a.workers))
            rows += throughput(root / "big", a.workers, 1, 1, batch=64, kinds=("raw", "jpeg"), device=a.device)
            rows += audit(root, [150, 600], a.workers, exact_max=0, compare=20)
            rows += ram(root / "big", None, 1, a.workers)
        elif a.what == "make":
            rows.append(make(a.out, cifar, a.train, a.queries, a.workers))
        elif a.what == "throughput":
            rows += throughput(a.root or a.out / "big", a.workers, a.batches, a.train_batches,
                               kinds=tuple(a.kinds.split(",")), device=a.device)
        elif a.what == "ram":
            rows += ram(a.root or a.out / "big", a.cache, a.batches, a.workers)
        elif a.what == "audit":
            rows += audit(a.root or a.out, [int(s) for s in a.sizes.split(",")], a.workers, a.exact_max, a.cache,
                          a.compare)
    for r in rows:
        line = json.dumps({**r, "date": time.strftime("%Y-%m-%d"), "cpu": _cpu()})
        print(line, flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(line + "\n")


def _cpu() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    return f"{name}, {os.cpu_count()} cores" + (", avx512_bf16" if "avx512_bf16" in flags else "")


if __name__ == "__main__":
    main()
