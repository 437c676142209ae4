"""The data audit on the CIFAR-10 JPEG copy: time, near-duplicates found, and recall on planted copies.

    python benchmarks/audit_cifar10.py [--out DIR]

Recall: 700 test images that the audit does not flag are copied into the training split after a
transformation (JPEG re-encode at quality 40, down/up-resize, 1-2 px shift, brightness/contrast
change, all four together, a mirror image, a 28x28 re-crop scaled back); the audit must then flag each.
Precision cannot be computed without labels: the script saves every pair (pairs.json) and image grids of
the pairs it found (random ones, and the ones closest to the threshold) for a person to look at, and prints
the score distribution.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import save_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from safetrain.data import make_splits  # noqa: E402
from safetrain.data.audit import audit  # noqa: E402
from safetrain.data.sources import ImageSet, load_folder  # noqa: E402

TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    buf = io.BytesIO()
    Image.fromarray(x.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=quality)
    return torch.from_numpy(__import__("numpy").array(Image.open(buf))).permute(2, 0, 1)


def transform(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    if kind in ("jpeg", "all"):
        x = jpeg(x, 40)
    if kind in ("resize", "all"):
        small = torch.nn.functional.interpolate(x[None].float(), size=24, mode="bilinear", antialias=True)
        x = torch.nn.functional.interpolate(small, size=32, mode="bilinear")[0].round().clamp(0, 255).byte()
    if kind in ("shift", "all"):
        d = int(torch.randint(1, 3, (1,), generator=g))
        x = torch.roll(x, shifts=(d, -d), dims=(1, 2))
    if kind in ("color", "all"):
        x = (x.float() * 0.8 + 30).clamp(0, 255).byte()
    if kind == "mirror":
        x = x.flip(2)
    if kind == "recrop":  # a 28x28 crop scaled back to 32x32: the re-crops real duplicates differ by
        c = x[None, :, 2:30, 1:29].float()
        x = torch.nn.functional.interpolate(c, size=32, mode="bilinear", antialias=True)[0].round().clamp(0, 255).byte()
    return x


def pairs_grid(pairs, splits, path: Path, n: int = 24) -> None:
    by_id = {s: dict(zip(v.ids, range(len(v)))) for s, v in splits.items()}
    tiles = []
    for p in pairs[:n]:
        tiles += [splits[p["split"]].images[by_id[p["split"]][p["id"]]],
                  splits["train"].images[by_id["train"][p["train_id"]]]]
    if tiles:
        save_image(torch.stack(tiles).float() / 255, path, nrow=8, padding=2)  # pairs side by side


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("audit_out"))
    ap.add_argument("--tarball", type=Path, default=TARBALL)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    device = torch.device(a.device)
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(a.tarball) as t:
            t.extractall(tmp)
        src = load_folder(tmp, None, "memory", Path(tmp) / "cache", 2)
    splits = make_splits(src, 0.1, 0.1, seed=0)
    t0 = time.perf_counter()
    res = audit(splits, device)
    dt = time.perf_counter() - t0
    s = res.summary()
    print(f"audit of {sum(len(v) for v in splits.values())} images on {device}: {dt:.1f} s")
    fractions = ", ".join(f"{k} {v:.2%}" for k, v in s["near_duplicate_fraction"].items())
    print(f"near-duplicates: {s['near_duplicates']} ({fractions}); conflicting copies in train: "
          f"{s['conflicting_copies']}; blank: {s['blank_images']}")
    found = sorted(res.near_duplicates, key=lambda p: p["diff"])
    (a.out / "pairs.json").write_text(json.dumps(found, indent=1))  # every pair, for judging by eye
    if found:
        diffs = torch.tensor([p["diff"] for p in found])
        quantiles = diffs.quantile(torch.tensor([0, .25, .5, .75, 1.]))
        print("diff quantiles (0, .25, .5, .75, 1):", [round(float(q), 3) for q in quantiles])
    g = torch.Generator().manual_seed(0)
    rnd = [found[i] for i in torch.randperm(len(found), generator=g)[:24].tolist()]
    pairs_grid(rnd, splits, a.out / "pairs_random.png")
    pairs_grid(found[::-1], splits, a.out / "pairs_near_threshold.png")
    # recall on planted copies
    flagged = {p["id"] for p in found if p["split"] == "test"}
    test = splits["test"]
    pool = [i for i in torch.randperm(len(test), generator=g).tolist() if test.ids[i] not in flagged][:700]
    kinds = ["jpeg", "resize", "shift", "color", "all", "mirror", "recrop"]
    copies = torch.stack([transform(test.images[i], kinds[k % len(kinds)], g) for k, i in enumerate(pool)])
    train = splits["train"]
    planted = ImageSet(torch.cat([train.labels, test.labels[pool]]), train.ids + [f"copy/{test.ids[i]}" for i in pool],
                       torch.cat([train.images, copies]))
    sub = test.subset(torch.tensor(pool))
    res2 = audit({"train": planted, "val": splits["val"].subset(torch.tensor([0])), "test": sub}, device)
    hit = {p["id"] for p in res2.near_duplicates if p["split"] == "test"}
    for k, kind in enumerate(kinds):
        ids = [test.ids[i] for j, i in enumerate(pool) if j % len(kinds) == k]
        print(f"recall, {kind:>6} copies: {sum(i in hit for i in ids) / len(ids):.1%} of {len(ids)}")
    print(f"grids: {a.out}/pairs_random.png, {a.out}/pairs_near_threshold.png (left: val/test image, right: train)")


if __name__ == "__main__":
    main()
