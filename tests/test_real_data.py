"""Real data that ships inside a package (scikit-learn's 1,797 8x8 handwritten digits): a healthy run is
silent, and planted wrong labels are named with the right share. Offline and a few seconds each."""
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from safetrain.cli import compose
from safetrain.run import run

DIGITS = ["data.augment=crop", "data.hflip_keeps_label=false", "trainer.progress=false"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    root = tmp_path_factory.mktemp("digits")
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        f = root / f"digit_{y}" / f"{i:04d}.png"
        f.parent.mkdir(exist_ok=True)
        Image.fromarray((img * 255 / 16).round().astype(np.uint8), mode="L").save(f)
    return root


def test_a_healthy_run_on_real_digits_is_silent(digits, tmp_path):
    cfg, _ = compose("imagefolder", [f"data.root={digits}", *DIGITS])
    final = run(cfg, tmp_path / "run")
    assert final["test_acc"] > 0.9 and final["warnings"] == [] and final["label_noise_estimate"] < 0.05
    assert "too small" in (tmp_path / "run" / "audit.json").read_text()  # 8x8: look-alikes, not copies


def test_m08_wrong_labels_in_real_digits_are_estimated_named_and_listed_first(digits, tmp_path):
    """20% of the digits relabelled at random: the share estimated, [M08] and nothing else, and the suspects ranked
    by their margin over training are the relabelled images (the final model, which has fit many of them, doubted
    none of them enough to list it: 0 of 20 on this run)."""
    rng, noisy, wrong = random.Random(0), tmp_path / "noisy", set()
    files = sorted(digits.rglob("*.png"))
    for f in files:
        label = f.parent.name
        if rng.random() < 0.2:
            label = rng.choice([c for c in (f"digit_{k}" for k in range(10)) if c != label])
            wrong.add(f"{label}/{f.name}")
        (noisy / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, noisy / label / f.name)
    cfg, _ = compose("imagefolder", [f"data.root={noisy}", *DIGITS])
    final = run(cfg, tmp_path / "run")
    assert abs(final["label_noise_estimate"] - len(wrong) / len(files)) <= 0.1
    assert {f["row"] for f in final["findings"]} == {"M08"}  # the root cause, nothing else
    top = final["suspected_mislabeled"]["top"]
    assert len(top) == 20 and all(m["margin"] < 0 for m in top)
    assert sum(m["id"] in wrong for m in top) >= 18, top
    listed = (tmp_path / "run" / "suspects.csv").read_text().splitlines()
    assert listed[0] == "id,given,predicted,margin,p_given,p_predicted"
    assert len(listed) >= 1 + final["suspected_mislabeled"]["count"]


def test_m08_an_underfit_model_on_real_digits_is_not_said_to_see_wrong_labels(digits, tmp_path):
    """A learning rate 20x below the default, 10 epochs: the model stays near chance (0.2-0.4) and its confusions
    read as 60-80% wrong labels to confident learning; the run says it did not learn [M28], not [M08]."""
    cfg, _ = compose("imagefolder", [f"data.root={digits}", *DIGITS, "optim.lr=5e-5", "trainer.max_epochs=10"])
    final = run(cfg, tmp_path / "run")
    rows = {f["row"] for f in final["findings"]}
    assert "M28" in rows and "M08" not in rows, final["warnings"]
