"""The built wheel carries conf/ and recipes/ and runs from outside the repository."""
import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:  # no build backend in this environment: build in isolation instead
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return next(out.glob("safetrain-*.whl"))


def test_wheel_contains_configs_and_recipes(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("safetrain/conf/config.yaml", "safetrain/conf/data/cifar10.yaml", "safetrain/conf/model/resnet.yaml",
              "safetrain/recipes/cifar10.yaml", "safetrain/recipes/smoke.yaml", "safetrain/cli.py"):
        assert f in names, f


def test_installed_wheel_runs_smoke_outside_the_repo(wheel, tmp_path):
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", "import safetrain, sys; print(safetrain.__file__)"], cwd=work,
                       env=env, capture_output=True, text=True)
    assert str(site) in r.stdout  # the installed copy, not the checkout
    r = subprocess.run([sys.executable, "-m", "safetrain", "recipe=smoke", "trainer.max_epochs=1",
                        "trainer.progress=false"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(work.glob("runs/smoke/*/metrics.json"))


def test_the_version_safetrain_reports_is_the_packaged_one():
    """export's model.json names safetrain's version from safetrain.__version__, which a run from a clone (never
    installed: no package metadata, as on a lent GPU machine) has too: it must be the version pyproject.toml ships."""
    import tomllib

    import safetrain

    assert safetrain.__version__ == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
