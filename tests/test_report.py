"""report.html and the figures (safetrain/figures.py): every figure is there, labelled with the class names, and
the HTML opens with nothing from outside."""
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from safetrain import figures as F
from safetrain.cli import compose
from safetrain.config import validate_after_training
from safetrain.inference import evaluate, predict
from safetrain.run import run
from tests.conftest import write_images

CLASSES = ["class_0", "class_1", "class_2"]
RUN_FIGURES = ["learning_curves", "class_counts", "augmented_batch", "per_class", "confusion_matrix"]


def self_contained(html: str) -> None:
    """No file, URL, script or stylesheet from outside: everything the page shows is in it."""
    assert "<link" not in html and "<script" not in html and "@import" not in html
    for ref in re.findall(r'(?:src|href)="([^"]*)"', html) + re.findall(r"url\(([^)]*)\)", html):
        assert ref.startswith(("#", "data:")), ref


def svg_texts(html: str) -> list[str]:
    """The text drawn in the inlined figures (their labels, titles, tick labels, cell numbers)."""
    return re.findall(r"<text[^>]*>([^<]*)</text>", html)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A grayscale 8x8 image folder (low resolution, as the digits are), 4 epochs."""
    tmp = tmp_path_factory.mktemp("report")
    write_images(tmp / "imgs", classes=3, per_class=60, size=(8, 8), mode="L")
    cfg, _ = compose("imagefolder", [f"data.root={tmp / 'imgs'}", "trainer.max_epochs=4", "data.batch_size=16",
                                     "trainer.progress=false"])
    final = run(cfg, tmp / "run")
    return tmp / "run", final


def test_the_report_has_every_figure_labelled_with_the_class_names(small_run):
    run_dir, final = small_run
    html = (run_dir / "report.html").read_text()
    md = (run_dir / "report.md").read_text()
    for name in RUN_FIGURES:
        png = run_dir / "figures" / f"{name}.png"
        assert png.stat().st_size > 1000, name
        assert f"](figures/{name}.png)" in md  # report.md links the PNG
    assert html.count("<svg") == len(list((run_dir / "figures").glob("*.png")))  # the same figures, inlined
    texts = svg_texts(html)
    for c in CLASSES:  # in the confusion matrix, the per-class bars, the counts, the batch's captions
        assert texts.count(c) >= 5, (c, texts.count(c))
    counts = [str(v) for row in final["confusion_matrix"] for v in row]
    assert all(v in texts for v in counts)  # the confusion matrix's numbers are written in its cells
    self_contained(html)
    # the result and the warnings come before any figure
    assert html.index("Result") < html.index("Warnings") < html.index("<svg")


def test_tensorboard_shows_the_same_labelled_figures(small_run):
    run_dir, _ = small_run
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()["images"]
    for tag in ("test/confusion_matrix", "train/augmented_batch", "train/learning_curves", "test/per_class",
                "data/class_counts"):
        assert tag in tags, tags
    confusion = events.Images("test/confusion_matrix")[-1]
    assert confusion.width >= 600  # a figure with axes, names and numbers, not a 3x3 heat map blown up


def test_the_confusion_figure_names_every_class_on_both_axes():
    fig = F.confusion([[5, 1, 0], [0, 6, 0], [2, 0, 4]], CLASSES)
    for ax in fig.axes[:2]:
        assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
        assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
        assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true"
    share = fig.axes[1].images[0].get_array()
    assert torch.allclose(torch.tensor(share.sum(1)), torch.ones(3, dtype=torch.float64))  # per true class


def test_small_images_are_upscaled_so_they_can_be_judged(tmp_path):
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    fig = F.image_grid(images, ["a", "b", "c", "d"], "tiny")
    F.save(fig, tmp_path / "grid.png")
    from PIL import Image
    width, _ = Image.open(tmp_path / "grid.png").size
    assert width / 4 >= 100  # each 8x8 image is at least 100 pixels wide: 12x or more
    ax = fig.axes[0]
    assert ax.images[0].get_interpolation() == "nearest" and ax.get_title() == "a"


def test_evaluate_and_predict_write_the_same_kind_of_report(small_run, tmp_path):
    run_dir, _ = small_run
    folder = write_images(tmp_path / "new", classes=3, per_class=12, size=(8, 8), mode="L", seed=7)
    common = [f"predict.checkpoint={run_dir}", f"predict.input={folder}", "predict.num_workers=0"]
    out = evaluate(validate_after_training(["mode=evaluate", *common]))
    html = (out / "report.html").read_text()
    self_contained(html)
    assert (out / "figures" / "confusion_matrix.png").is_file() and (out / "figures" / "per_class.png").is_file()
    assert all(svg_texts(html).count(c) >= 4 for c in CLASSES)
    csv = predict(validate_after_training(["mode=predict", *common]))
    html = csv.with_suffix(".html").read_text()
    self_contained(html)
    assert html.count("<svg") == 2 and all(c in svg_texts(html) for c in CLASSES)
    assert (csv.parent / f"{csv.stem}_figures" / "least_confident.png").is_file()
