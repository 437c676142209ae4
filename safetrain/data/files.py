"""Image files as a folder holds them: which files count, what each one decodes to, and which are bad and why.

Skipped, and counted: hidden files and folders (`.ipynb_checkpoints/`, `.img.png`, macOS `._*` copies),
`__MACOSX/`, files without an image extension, anything that is not a regular file (a FIFO would hang a read).
Decoded: 16-bit images scaled to 8 bits (not clipped at 255); transparency composited over white (documented
in the README); palette and CMYK images converted. Bad (unreadable, empty, not an image, too large to be safe,
not permitted): listed by path and reason, refused together (`data.bad_files=refuse`) or left out (`skip`)."""
from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SKIPPED_FOLDERS = {"__MACOSX"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def hidden(name: str) -> bool:
    return name.startswith(".") or name in SKIPPED_FOLDERS


def list_images(folder: Path) -> tuple[list[Path], int]:
    """(image files under `folder`, sorted; how many entries were skipped)."""
    found, skipped = [], 0
    for root, dirs, files in os.walk(folder):
        skipped += sum(hidden(d) for d in dirs)
        dirs[:] = sorted(d for d in dirs if not hidden(d))
        for name in files:
            path = Path(root) / name
            ok = not hidden(name) and path.suffix.lower() in IMAGE_EXTENSIONS and _regular(path)
            found += [path] if ok else []
            skipped += not ok
    return sorted(found), skipped


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return True  # unreadable: reported as a bad file by `header`, not skipped silently


def header(path: Path) -> tuple[str, tuple[int, int]] | str:
    """(mode, (H, W)) from the file's header, or the reason it cannot be an image."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.mode, im.size[::-1]
    except PermissionError:
        return "permission denied"
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return f"more than {Image.MAX_IMAGE_PIXELS:,} pixels (a decompression bomb, or an image far too large)"
    except (OSError, ValueError, SyntaxError) as e:
        return f"not a readable image ({type(e).__name__}: {str(e)[:80]})"


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
