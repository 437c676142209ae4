"""End to end: the CLI trains and leaves the promised run directory behind."""
import json
import shutil
import tarfile

import pytest
import torch
import yaml

from safetrain.cli import compose
from safetrain.errors import ConfigError
from safetrain.run import run
from safetrain.runtime import resolve_device
from tests.conftest import SHARED_CIFAR, run_cli, write_images

RUN_FILES = ["config.yaml", "overrides.yaml", "env.json", "data_facts.json", "splits.json", "metrics.jsonl",
             "metrics.json", "checkpoints/best.pt", "checkpoints/last.pt", "safetrain.log"]


def test_smoke_recipe_end_to_end_in_a_subprocess(tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli("recipe=smoke", f"hydra.run.dir={run_dir}", "seed=0", "trainer.progress=false")
    assert out.returncode == 0, out.stderr[-3000:]
    for f in RUN_FILES:
        assert (run_dir / f).is_file(), f
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["data"]["name"] == "synthetic" and cfg["seed"] == 0
    assert "seed=0" in yaml.safe_load((run_dir / "overrides.yaml").read_text())
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] and env["device"] == str(resolve_device("auto"))
    facts = json.loads((run_dir / "data_facts.json").read_text())
    assert facts["channels"] == 3 and facts["height"] == 16 and len(facts["mean"]) == 3
    assert set(facts["counts"]) == {"train", "val", "test"}
    splits = json.loads((run_dir / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["test"])
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    assert {"train/loss", "val/loss", "val/acc", "val/macro_f1", "lr", "train/grad_norm",
            "train/images_per_s"} <= set(lines[0])
    final = json.loads((run_dir / "metrics.json").read_text())
    assert final["test_acc"] > 0.5  # 4 learnable classes: well above chance (0.25)
    assert len(final["confusion_matrix"]) == 4 and set(final["per_class"]) == set(facts["classes"])
    assert 1 <= final["best_epoch"] <= 3 and final["wall_time_s"] > 0
    ckpt = torch.load(run_dir / "checkpoints/best.pt", weights_only=True)
    assert ckpt["epoch"] == final["best_epoch"] and ckpt["data_facts"]["mean"] == facts["mean"]
    assert "[9/9] test" in (run_dir / "safetrain.log").read_text()


def test_max_minutes_sizes_the_run_to_this_machine_and_saves_what_it_chose(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO")
    cfg, _ = compose("smoke", ["trainer.max_minutes=0.3", "trainer.max_epochs=1000", "trainer.early_stop_patience=0",
                               "trainer.progress=false"])
    final = run(cfg, tmp_path / "run")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["trainer"]
    assert saved["max_minutes"] is None and saved["max_epochs"] > 3  # a smoke epoch takes a fraction of a second
    assert final["wall_time_s"] < 18 + 4  # the budget (18 s), give or take a shared machine's noise
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= saved["max_epochs"]
    assert f"epochs fit (trainer.max_epochs={saved['max_epochs']}" in caplog.text
    again, _ = compose("smoke", [f"trainer.max_epochs={saved['max_epochs']}", "trainer.progress=false"])
    assert run(again, tmp_path / "again")["test_loss"] == final["test_loss"]  # the timing steps left no trace
    capped, _ = compose("smoke", ["trainer.max_minutes=0.3", "trainer.max_epochs=2", "trainer.progress=false"])
    assert run(capped, tmp_path / "capped")["epochs_run"] == 2  # trainer.max_epochs stays the most epochs
    assert "at most trainer.max_epochs=2 (trainer.max_epochs=2 in the saved config)" in caplog.text
    monkeypatch.setattr("safetrain.stages.step_times", lambda *a, **k: (5.0, 1.0))  # a very slow machine
    cfg, _ = compose("smoke", ["trainer.max_minutes=0.5", "trainer.progress=false"])
    with pytest.raises(ConfigError, match=r"trainer\.max_minutes=0\.5 leaves no time for one epoch.*"
                                          r"trainer\.max_minutes=\d+\.\d or more"):
        run(cfg, tmp_path / "slow")
    assert not (tmp_path / "slow").exists()


def test_cifar10_fast_recipe_fits_its_whitening_averages_and_mirrors(tmp_path, caplog):
    caplog.set_level("INFO")
    """recipe=cifar10_fast on synthetic data: the first layer measured on the training images, the lookahead's
    average in the checkpoint (its step count that of the run), and a model that learns."""
    cfg, _ = compose("cifar10_fast", ["data=synthetic", "data.batch_size=32", "model.widths=[16,32]",
                                      "trainer.max_epochs=3", "trainer.progress=false"])
    assert cfg.model.tta and cfg.optim.lookahead and cfg.optim.bias_lr_mult == 64
    final = run(cfg, tmp_path / "run")
    assert final["test_acc"] > 0.5  # 4 learnable classes: well above chance (0.25)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    whitening = ckpt["model"]["features.0.weight"]  # (24, 3, 2, 2): 12 directions and their negatives
    assert (whitening[:12].flatten(1).norm(dim=1) > 0).all()  # fitted: before, 3 pass-through rows, 9 of zeros
    assert torch.equal(whitening[12:], -whitening[:12])
    assert ckpt["average"]["step"] == 3 * (320 // 32) and ckpt["average"]["average"] is not None
    assert "lookahead weight averaging" in caplog.text and "which learn at 64x" in caplog.text


@pytest.mark.parametrize("size,mode,channels", [((8, 8), "L", 1), ((28, 28), "RGB", 3), ((40, 56), "RGB", 3)])
def test_imagefolder_run_infers_shapes(tmp_path, size, mode, channels):
    write_images(tmp_path / "imgs", classes=3, per_class=20, size=size, mode=mode)
    cfg, _ = compose("imagefolder", [f"data.root={tmp_path / 'imgs'}", "trainer.max_epochs=2", "data.batch_size=16",
                                     "model=cnn", "model.widths=[8,16]", "trainer.progress=false"])
    final = run(cfg, tmp_path / "run")
    facts = json.loads((tmp_path / "run" / "data_facts.json").read_text())
    assert (facts["channels"], facts["height"], facts["width"]) == (channels, *size)
    assert facts["classes"] == ["class_0", "class_1", "class_2"]
    assert sum(facts["counts"]["train"]) + sum(facts["counts"]["val"]) + sum(facts["counts"]["test"]) == 60
    assert final["epochs_run"] == 2 and 0 <= final["test_acc"] <= 1


def test_seed_makes_runs_repeatable(tmp_path):
    results = []
    for i in range(2):
        cfg, _ = compose("smoke", ["trainer.max_epochs=1", "trainer.progress=false"])
        results.append(run(cfg, tmp_path / f"r{i}"))
    assert results[0]["test_loss"] == results[1]["test_loss"]
    a, b = (json.loads((tmp_path / f"r{i}" / "splits.json").read_text()) for i in range(2))
    assert a == b


def test_batch_larger_than_training_split_is_refused(tmp_path):
    from safetrain.errors import ConfigError
    cfg, _ = compose("smoke", ["data.batch_size=5000"])
    with pytest.raises(ConfigError, match=r"\[M23\].*data\.batch_size=5000"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason="needs ../shared/data/cifar10-jpeg.tar.gz")
def test_cifar10_jpeg_copy_trains_above_chance(tmp_path):
    with tarfile.open(SHARED_CIFAR) as t:
        t.extractall(tmp_path / "cifar")
    out = run_cli("recipe=cifar10", "data=imagefolder", f"data.root={tmp_path / 'cifar'}", "trainer.max_epochs=1",
                  f"hydra.run.dir={tmp_path / 'run'}", "trainer.progress=false", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert final["test_acc"] > 0.4
    shutil.rmtree(tmp_path / "cifar")
