"""The CIFAR-10 JPEG copy the benchmarks run on: where it is, and unpacked into a folder."""
import tarfile
from pathlib import Path

TARBALL = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz"


def unpack(tarball: str | Path, into: Path) -> Path:
    """Extract `tarball` under `into`; the folder holding train/ and test/."""
    with tarfile.open(tarball) as t:
        t.extractall(into, filter="data")
    return next(p.parent for p in Path(into).rglob("train") if p.is_dir())
