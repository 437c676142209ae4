"""report.html and the figures (safetrain/figures.py): every figure is there, labelled with the class names, and
the HTML opens with nothing from outside."""
import re

import matplotlib.text
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


def texts(fig) -> list[str]:
    """Every piece of text drawn in a figure: titles, axis labels, tick labels, legends, cell numbers, captions."""
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A grayscale 8x8 image folder (low resolution, as the digits are), 4 epochs; the figures the report saved
    are kept to look at their labels."""
    tmp = tmp_path_factory.mktemp("report")
    write_images(tmp / "imgs", classes=3, per_class=60, size=(8, 8), mode="L")
    cfg, _ = compose("imagefolder", [f"data.root={tmp / 'imgs'}", "trainer.max_epochs=4", "data.batch_size=16",
                                     "trainer.progress=false", "model=cnn", "optim.lr=1e-3", "sched.name=plateau",
                                     "loss.label_smoothing=0"])  # a model that still makes mistakes to show
    saved, real = {}, F.save

    def keep(fig, path):
        saved[path.stem] = fig
        return real(fig, path)

    F.save = keep
    try:
        final = run(cfg, tmp / "run")
    finally:
        F.save = real
    return tmp / "run", final, saved


def test_class_names_the_font_cannot_draw_are_said_once_and_long_ones_shortened(caplog, recwarn):
    """A class named in Chinese or with an emoji: matplotlib warned 'Glyph ... missing from font' for every figure
    (the names show as boxes); a 100-character name collapsed the confusion matrix's axes. Now one log line names the
    characters, and tick labels are shortened."""
    caplog.set_level("INFO")
    F._UNDRAWN.discard("狗")  # said once a process
    classes = ["chat noir", "狗", "x" * 100]
    for _ in range(2):
        F.png(F.confusion([[1, 0, 0], [0, 1, 0], [0, 0, 1]], classes))
    assert not [w for w in recwarn if "missing from font" in str(w.message) or "collapsed" in str(w.message)]
    assert caplog.text.count("the font has no glyph for 狗") == 1
    assert F.tick("x" * 100) == "x" * 27 + "…" and F.tick("chat noir") == "chat noir"


def test_the_report_has_every_figure_labelled_with_the_class_names(small_run):
    run_dir, final, figures = small_run
    html = (run_dir / "report.html").read_text()
    md = (run_dir / "report.md").read_text()
    for name in RUN_FIGURES:
        png = run_dir / "figures" / f"{name}.png"
        assert png.stat().st_size > 1000, name
        assert f"](figures/{name}.png)" in md  # report.md links the PNG
    pngs = len(list((run_dir / "figures").glob("*.png")))
    assert html.count('<figure><img alt="') == html.count('src="data:image/png;base64,') == pngs == len(figures)
    self_contained(html)
    assert html.index("Result") < html.index("Warnings") < html.index("<figure>")  # result and warnings first
    confusion = figures["confusion_matrix"]
    for ax in confusion.axes[:2]:
        assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES == [t.get_text() for t in ax.get_yticklabels()]
    assert all(str(v) in texts(confusion) for row in final["confusion_matrix"] for v in row)  # counts in the cells
    assert [t.get_text() for t in figures["per_class"].axes[0].get_yticklabels()] == CLASSES
    assert [t.get_text() for t in figures["class_counts"].axes[0].get_xticklabels()] == CLASSES
    assert set(t.get_text() for t in figures["augmented_batch"].axes[0].texts) <= set(CLASSES)  # each image's label
    assert {"loss", "acc (selects the checkpoint)", "learning rate"} <= set(texts(figures["learning_curves"]))


def test_tensorboard_shows_the_same_labelled_figures(small_run):
    run_dir, _, _ = small_run
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
    assert ax.images[0].get_interpolation() == "nearest" and [t.get_text() for t in ax.texts] == ["a", "b", "c", "d"]


def test_evaluate_and_predict_write_the_same_kind_of_report(small_run, tmp_path):
    run_dir, _, _ = small_run
    folder = write_images(tmp_path / "new", classes=3, per_class=12, size=(8, 8), mode="L", seed=7)
    common = [f"predict.checkpoint={run_dir}", f"predict.input={folder}", "predict.num_workers=0"]
    out = evaluate(validate_after_training(["mode=evaluate", *common]))
    html = (out / "report.html").read_text()
    self_contained(html)
    assert (out / "figures" / "confusion_matrix.png").is_file() and (out / "figures" / "per_class.png").is_file()
    assert html.count("<figure>") == 3  # per-class scores, confusion matrix, the most confident mistakes
    csv = predict(validate_after_training(["mode=predict", *common]))
    html = csv.with_suffix(".html").read_text()
    self_contained(html)
    assert html.count("<figure>") == 2  # how many images each class got, the least confident ones
    assert (csv.parent / f"{csv.stem}_figures" / "least_confident.png").is_file()
