"""Image files as a folder holds them: which files count, what each one decodes to, and which are bad and why.

Skipped, and counted: hidden files and folders (`.ipynb_checkpoints/`, `.img.png`, macOS `._*` copies),
`__MACOSX/`, files without an image extension, anything that is not a regular file (a FIFO would hang a read).
Decoded: upright, as the camera's EXIF orientation says (a phone's portrait photo is stored sideways with a tag that
viewers apply; so does safetrain, everywhere an image is read); 16-bit images scaled to 8 bits (not clipped at 255);
transparency composited over white (documented in the README); palette and CMYK images converted. Bad (unreadable, empty, not an image, too large to be safe,
not permitted): listed by path and reason, refused together (`data.bad_files=refuse`) or left out (`skip`)."""
from __future__ import annotations

import math
import os
import stat
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from safetrain.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                    ".avif", ".heic", ".heif")
# formats Pillow reads only with help: what a file of them that does not open needs (listed with the bad files, whose
# policy applies: refused with this fix, or left out with data.bad_files=skip)
NEEDS = {".heic": "an HEIC photo (as iPhones save them): pip install pillow-heif (safetrain then reads them), or "
                  "convert it to JPEG",
         ".avif": "an AVIF image: this Pillow has no AVIF support (pip install -U 'pillow>=11.3'), or convert it to "
                  "JPEG or PNG"}
NEEDS[".heif"] = NEEDS[".heic"]
try:  # HEIC/HEIF photos where pillow-heif is installed (optional: it is a compiled library)
    from pillow_heif import register_heif_opener
    register_heif_opener()
except ImportError:
    pass
SKIPPED_FOLDERS = {"__MACOSX"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def hidden(name: str) -> bool:
    return name.startswith(".") or name in SKIPPED_FOLDERS


def list_images(folder: Path) -> tuple[list[Path], Counter]:
    """(image files under `folder`, sorted; the entries skipped, counted by kind: 'hidden', 'not a file' or the
    file's extension)."""
    found, skipped = [], Counter()
    for root, dirs, files in os.walk(folder):
        skipped["hidden"] += sum(hidden(d) for d in dirs)
        dirs[:] = sorted(d for d in dirs if not hidden(d))
        for name in files:
            path = Path(root) / name
            kind = ("hidden" if hidden(name) else path.suffix.lower() or "no extension"
                    if path.suffix.lower() not in IMAGE_EXTENSIONS else None if _regular(path) else "not a file")
            found += [path] if kind is None else []
            skipped[kind] += kind is not None
    return sorted(found), +skipped


def skipped_text(skipped: dict) -> str:
    """'3 hidden, 2 .txt, 1 .ico' (most first): what a listing left out, for the log and the report."""
    counts = Counter(skipped if isinstance(skipped, dict) else {"entries": skipped})  # an int in runs before 2026-12-08
    return ", ".join(f"{n} {kind}" for kind, n in counts.most_common() if n) or "none"


def printable(path) -> str:
    """A path as text: a name that is not UTF-8 (its bytes kept by Python as surrogates) shown as its bytes."""
    try:
        str(path).encode("utf-8")
        return str(path)
    except UnicodeEncodeError:
        return repr(os.fsencode(path))


def refuse_non_utf8_names(paths: list[Path], folder: Path) -> None:
    """File or folder names that are not UTF-8 (made where another encoding was the rule: a zip from an older
    Windows, a Latin-1 disk) cannot be written to the log, JSON or the report: refused before anything is read, each
    name shown as its bytes once (a folder with how many images it holds), with how to rename them."""
    names: dict[Path, int] = {}
    for p in paths:
        parts = Path(p).relative_to(folder).parts
        first = next((i for i, part in enumerate(parts) if printable(part) != part), None)
        if first is not None:
            name = Path(*parts[:first + 1])
            names[name] = names.get(name, 0) + (1 if first < len(parts) - 1 else 0)
    if names:
        shown = "\n".join(f"  {printable(n)}" + (f" (a folder of {k} images)" if k else "")
                          for n, k in list(names.items())[:10]) + ("\n  ..." if len(names) > 10 else "")
        raise DataError(f"[data] {len(names)} file or folder names under {printable(folder)} are not UTF-8 text "
                        "(written where another encoding was the rule, e.g. a zip made on an older Windows):\n"
                        f"{shown}\nRename them to UTF-8: convmv -f cp1252 -t utf-8 -r --notest {printable(folder)} "
                        "(or extract the archive again with unzip -O cp437), or rename them by hand.")


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return True  # unreadable: reported as a bad file by `header`, not skipped silently


EXIF_ORIENTATION = 0x0112
# the EXIF orientation tag -> the transpose that makes the stored pixels upright (PIL's ImageOps.exif_transpose table)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
TURNED = {5, 6, 7, 8}  # stored a quarter turn from upright: height and width swap


def orientation(im: Image.Image) -> int:
    """The EXIF orientation still to apply to an opened image: 1 (as stored) where it has none or an unreadable one,
    and for TIFF, whose reader in Pillow applies its orientation tag itself (size and pixels). Only an EXIF block read
    with the header is parsed: most files have none, and a PNG's getexif() without one would decode every pixel to
    look for it."""
    if im.format == "TIFF" or "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: PIL raises whatever its parser met; the pixels may still be fine
        return 1
    return value if value in UPRIGHT else 1


def upright(arr: np.ndarray, turn: int) -> np.ndarray:
    """Stored pixels (H, W[, C]) uint8 -> as the EXIF orientation `turn` says they are seen."""
    return arr if turn not in UPRIGHT else np.asarray(Image.fromarray(arr).transpose(UPRIGHT[turn]))


PIL_PIXEL_LIMIT = Image.MAX_IMAGE_PIXELS  # PIL's guard against decompression bombs (about 89 megapixels)


def pixel_limit(limit: int | None) -> None:
    """data.max_image_pixels: the largest image decoded (None: PIL's own limit), in this process and the loader
    workers it forks."""
    Image.MAX_IMAGE_PIXELS = limit or PIL_PIXEL_LIMIT


def header(path: Path) -> tuple[str, tuple[int, int]] | str:
    """(mode, (H, W)) from the file's header (upright: as its EXIF orientation turns it), or the reason it cannot be
    an image."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.mode, im.size if orientation(im) in TURNED else im.size[::-1]
    except FileNotFoundError:
        return f"a link to {os.readlink(path)}, which does not exist" if os.path.islink(path) else "no such file"
    except PermissionError:
        return "permission denied"
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return (f"more than {Image.MAX_IMAGE_PIXELS:,} pixels (a decompression bomb, or an image far too large; if "
                "you trust the file, data.max_image_pixels=N raises the limit)")
    except (OSError, ValueError, SyntaxError) as e:
        if isinstance(e, Image.UnidentifiedImageError) and Path(path).suffix.lower() in NEEDS:
            return NEEDS[Path(path).suffix.lower()]
        return f"not a readable image ({type(e).__name__}: {str(e)[:80]})"


FITS = ("crop", "pad", "squash")  # data.resize: how an image of another shape is brought to the training size
# bounds of the size chosen for images of mixed sizes, by the device that trains (data.image_size sets any other). On
# 2 CPU cores, 3 minutes (benchmarks/RESULTS.md, own images): 75.3% test accuracy at 32 px, 39.2% at 48 px (1 epoch
# fit), none at 64 px (no epoch fit): a CPU affords 32 px; a GPU affords larger
AUTO_SIDE = {"cpu": (24, 32), "accelerator": (32, 128)}


class Fit(NamedTuple):
    """The size (H, W) images are decoded to, and how another shape gets there (data.resize)."""
    size: tuple[int, int]
    mode: str = "crop"


def fit_image(arr: np.ndarray, fit: Fit) -> np.ndarray:
    """(h, w[, C]) uint8 -> fit.size: `crop` scales the shorter side to fit and keeps the centre (the aspect ratio
    kept, the edges cut), `pad` scales the longer side to fit and pads the rest with black (nothing cut), `squash`
    resizes to the size (the aspect ratio changed). Bilinear, antialiased when shrinking."""
    (h, w), (H, W) = arr.shape[:2], fit.size
    if (h, w) == (H, W):
        return arr
    im = Image.fromarray(arr)
    if fit.mode == "squash":
        return np.asarray(im.resize((W, H), Image.BILINEAR))
    scale = max(H / h, W / w) if fit.mode == "crop" else min(H / h, W / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    nh, nw = (max(nh, H), max(nw, W)) if fit.mode == "crop" else (min(nh, H), min(nw, W))
    small = np.asarray(im.resize((nw, nh), Image.BILINEAR))
    if fit.mode == "crop":
        top, left = (nh - H) // 2, (nw - W) // 2
        return small[top:top + H, left:left + W]
    out = np.zeros((H, W, *arr.shape[2:]), dtype=np.uint8)
    top, left = (H - nh) // 2, (W - nw) // 2
    out[top:top + nh, left:left + nw] = small
    return out


def shrink_on_load(im: Image.Image, fit: Fit) -> Image.Image:
    """A large image decoded straight to about the size `fit` needs, never below it: JPEGs through PIL's `draft`
    (the decoder's DCT scaling by 1/2, 1/4 or 1/8: most of the pixels are never computed), other formats reduced by
    a whole factor (box filter) before fit_image's exact resize."""
    (w, h), (H, W) = im.size, fit.size
    sx, sy = W / w, H / h
    if fit.mode != "squash":
        sx = sy = max(sx, sy) if fit.mode == "crop" else min(sx, sy)
    need = (max(1, math.ceil(w * sx)), max(1, math.ceil(h * sy)))
    if im.format == "JPEG":
        im.draft(im.mode, need)
        return im
    factor = min(w // need[0], h // need[1])
    if factor < 2:
        return im
    if im.mode == "P":  # PIL reduces no palette image: its colours first (transparency kept for to_array)
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    try:  # the last partial block kept: cutting it would change the scale fit_image then applies
        return im.reduce(factor)
    except ValueError:  # a mode reduce does not take ("1", "I;16B", ...): decoded in full, resized exactly
        return im


def auto_side(sides: list[int], bounds: tuple[int, int]) -> int:
    """The training size for images whose shorter sides are `sides`: their median, to a multiple of 8, within
    `bounds` (AUTO_SIDE: what the device affords; data.image_size sets another)."""
    median = sorted(sides)[len(sides) // 2]
    return int(min(max(8 * round(median / 8), bounds[0]), bounds[1]))


def channels_of(modes: set[str]) -> int:
    """1 when every file is grayscale, else 3: decided from every file's header, not a sample."""
    return 1 if modes <= GRAY_MODES else 3


def to_array(im: Image.Image, channels: int) -> np.ndarray:
    """A PIL image -> (H, W) or (H, W, 3) uint8: 16-bit scaled, transparency over white, palette/CMYK converted."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        scale = 65535.0 if im.mode != "F" else max(1.0, float(arr.max()))
        gray = np.clip(arr / scale * 255 + 0.5, 0, 255).astype(np.uint8)
        return gray if channels == 1 else np.repeat(gray[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(im.convert("L" if channels == 1 else "RGB"))
