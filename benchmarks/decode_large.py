"""First decode of a folder of large JPEG photos: safetrain's decode (straight to about the training size: PIL's draft,
then the exact resize) against decoding every pixel and resizing, in the same run, on the same files.

    python benchmarks/decode_large.py --images 200 --size 3000x2000 --train 128

Prints seconds per image for both, the speed-up, and how far the pixels differ (JPEG's DCT scaling vs a full decode
then a bilinear resize: both are estimates of the same scene at 128 px). The photos are made here from random 8x12
blocks upscaled with grain added (--noise), saved as quality-90 JPEGs."""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from safetrain.data.files import Fit, fit_image, to_array  # noqa: E402
from safetrain.data.sources import _decode  # noqa: E402


def make_photos(folder: Path, n: int, size: tuple[int, int], noise: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, (n, 8, 12, 3), dtype=np.uint8)
    files = []
    for i in range(n):
        im = Image.fromarray(base[i]).resize((w, h), Image.BICUBIC)
        arr = np.asarray(im).astype(np.int16) + rng.integers(-noise, noise + 1, (h, w, 3), dtype=np.int16)
        files.append(folder / f"{i}.jpg")
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(files[-1], quality=90)
    return files


def full_then_resize(path: Path, fit: Fit) -> np.ndarray:
    with Image.open(path) as im:
        return fit_image(to_array(im, 3), fit)


def timed(fn, files, fit) -> tuple[float, list[np.ndarray]]:
    t0 = time.perf_counter()
    out = [np.asarray(fn(f, fit)) for f in files]
    return (time.perf_counter() - t0) / len(files), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", default="3000x2000")
    ap.add_argument("--train", type=int, default=128)
    ap.add_argument("--noise", type=int, default=3, help="pixel noise +-N: sensor grain (the entropy the decoder "
                                                             "must read whatever the scale)")
    a = ap.parse_args()
    w, h = map(int, a.size.split("x"))
    fit = Fit((a.train, a.train), "crop")
    with tempfile.TemporaryDirectory() as tmp:
        files = make_photos(Path(tmp), a.images, (w, h), a.noise)
        full_s, full = timed(full_then_resize, files, fit)
        ours_s, ours = timed(lambda f, fit: _decode(str(f), 3, fit).permute(1, 2, 0).numpy(), files, fit)
    diff = np.abs(np.stack(full).astype(np.int16) - np.stack(ours).astype(np.int16))
    print(f"{a.images} JPEGs {w}x{h} (noise +-{a.noise}) -> {a.train}x{a.train} (crop), 1 process")
    print(f"full decode + resize : {1000 * full_s:7.1f} ms/image")
    print(f"safetrain (draft)    : {1000 * ours_s:7.1f} ms/image")
    print(f"speed-up             : {full_s / ours_s:7.1f}x")
    print(f"pixel difference     : mean {diff.mean():.2f}, 99th percentile {np.percentile(diff, 99):.0f}, "
          f"max {diff.max()} (of 255)")


if __name__ == "__main__":
    main()
