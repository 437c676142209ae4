"""The report of two real runs, as a person sees it: scikit-learn's handwritten digits (1,797 8x8 grayscale images,
shipped inside the package) and the CIFAR-10 JPEG copy; each report.html is opened in headless Chromium and its
screenshot written to docs/.

    python benchmarks/report_screenshots.py [--cifar-epochs 3] [--data ../shared/data/cifar10-jpeg.tar.gz]

Needs `chromium-headless-shell` (or `chromium`) from the system packages, e.g. `apt-get install
chromium-headless-shell`.
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageChops

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks._cifar import TARBALL, unpack  # noqa: E402
from benchmarks.diagnosis import DIGITS, digits_folder  # noqa: E402

WIDTH = 1280


def screenshot(html: Path, out: Path) -> None:
    """A full-page screenshot of `html` (a tall window, then the blank bottom cut off), saved as JPEG."""
    browser = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    if browser is None:
        sys.exit("no chromium-headless-shell or chromium on PATH (apt-get install chromium-headless-shell)")
    raw = out.with_suffix(".raw.png")
    subprocess.run([browser, "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={WIDTH},16000",
                    f"--screenshot={raw}", html.as_uri()], check=True, capture_output=True, timeout=120)
    img = Image.open(raw).convert("RGB")
    box = ImageChops.invert(img).getbbox()  # the page's content: everything not white
    img.crop((0, 0, WIDTH, min(img.height, box[3] + 40))).save(out, quality=82, optimize=True)
    raw.unlink()
    print(f"{out}: {img.width}x{min(img.height, box[3] + 40)}")


def train(args: list[str], run_dir: Path) -> Path:
    subprocess.run([sys.executable, "-m", "safetrain", *args, "trainer.progress=false", f"hydra.run.dir={run_dir}"],
                   check=True, cwd=REPO, capture_output=True)
    return run_dir / "report.html"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cifar-epochs", type=int, default=3)
    ap.add_argument("--data", default=str(TARBALL))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    digits = digits_folder(tmp / "digits")
    screenshot(train(["recipe=imagefolder", f"data.root={digits}", *DIGITS], tmp / "digits_run"),
               REPO / "docs" / "report_digits.jpg")
    cifar = unpack(args.data, tmp / "cifar")
    screenshot(train(["recipe=cifar10", "data=imagefolder", f"data.root={cifar}",
                      f"trainer.max_epochs={args.cifar_epochs}"], tmp / "cifar_run"),
               REPO / "docs" / "report_cifar10.jpg")
    print(f"runs in {tmp}")


if __name__ == "__main__":
    main()
