"""After training: predict, evaluate and export use the training's own preprocessing, and say what they could not do."""
import csv
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from safetrain.checkpoint import load_classifier
from safetrain.cli import compose
from safetrain.config import validate_after_training
from safetrain.data.files import Fit
from safetrain.data.sources import decode_image
from safetrain.errors import ConfigError, DataError
from safetrain.export import export
from safetrain.inference import evaluate, predict
from safetrain.run import run
from tests.conftest import run_cli, write_images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run on an image folder with train/ and test/ (12x12 RGB, 3 classes)."""
    tmp = tmp_path_factory.mktemp("trained")
    write_images(tmp / "data" / "train", classes=3, per_class=60, size=(12, 12))
    write_images(tmp / "data" / "test", classes=3, per_class=20, size=(12, 12), seed=5)
    cfg, _ = compose("smoke", ["data=imagefolder", f"data.root={tmp / 'data'}", "trainer.max_epochs=2",
                               "trainer.progress=false", "data.batch_size=16", f"data.cache_dir={tmp / 'cache'}"])
    run(cfg, tmp / "run")
    return tmp


def settings(mode, **kw):
    return validate_after_training([f"mode={mode}", "predict.progress=false", "predict.num_workers=0",
                                    *(f"predict.{k}={v}" for k, v in kw.items())])


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_decodes_as_training_did_and_lists_what_it_could_not_read(trained, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    inp = tmp_path / "in"
    (inp / "sub").mkdir(parents=True)
    for i, f in enumerate(sorted((trained / "data" / "test" / "class_2").glob("*.png"))[:4]):
        Image.open(f).save(inp / f"same_{i}.png")
    Image.open(inp / "same_0.png").resize((30, 20)).save(inp / "sub" / "bigger.png")  # another size
    Image.open(inp / "same_1.png").convert("L").save(inp / "sub" / "gray.png")  # grayscale into an RGB model
    (inp / "sub" / "broken.png").write_text("not an image")
    out = predict(settings("predict", checkpoint=trained / "run" / "checkpoints" / "best.pt", input=inp,
                           output=tmp_path / "p.csv", topk=2))
    got = {r["path"]: r for r in rows(out)}
    assert list(got) == ["same_0.png", "same_1.png", "same_2.png", "same_3.png", "sub/bigger.png", "sub/broken.png",
                         "sub/gray.png"]
    assert got["sub/broken.png"]["predicted"] == "" and "not a readable image" in got["sub/broken.png"]["error"]
    assert "1 could not be decoded" in caplog.text and "1 resized to 12x12, 1 converted to RGB" in caplog.text
    model = load_classifier(trained / "run" / "checkpoints" / "best.pt")
    files = [inp / "same_0.png", inp / "sub" / "bigger.png", inp / "sub" / "gray.png"]
    x = torch.stack([decode_image(str(f), 3, Fit((12, 12), "crop")) for f in files])  # the run's data.resize
    probs = model(x).softmax(1).detach()
    for f, p in zip(files, probs):  # the CSV is what load_classifier gives on the same decoded images
        r = got[str(f.relative_to(inp))]
        assert r["top1"] == f"class_{int(p.argmax())}" and float(r["p1"]) == pytest.approx(float(p.max()), abs=1e-5)
        assert float(r["p1"]) >= float(r["p2"]) and r["top2"] != r["top1"]


def test_evaluate_on_the_test_folder_gives_the_runs_own_test_metrics(trained, tmp_path):
    out = evaluate(settings("evaluate", checkpoint=trained / "run", input=trained / "data" / "test",
                            output=tmp_path / "ev"))
    got, run_final = (json.loads(p.read_text()) for p in (out / "metrics.json", trained / "run" / "metrics.json"))
    assert got["images"] == 60 and got["confusion_matrix"] == run_final["confusion_matrix"]
    for k in ("acc", "balanced_acc", "macro_f1"):
        assert got[k] == pytest.approx(run_final[f"test_{k}"], abs=1e-6)
    assert "| true \\ pred | class_0 | class_1 | class_2 |" in (out / "report.md").read_text()


def test_evaluate_reads_a_csv_of_labels_and_says_a_folder_without_labels_is_for_predict(trained, tmp_path):
    """A run trained from a folder (or a CSV) evaluated on a CSV of path,label: the same metrics as on the folder;
    a folder of images in no class folder was told it 'has class folders none that the model was not trained on'."""
    test = trained / "data" / "test"
    table = tmp_path / "test.csv"
    table.write_text("path,label\n" + "".join(f"{f},{f.parent.name}\n" for f in sorted(test.rglob("*.png"))))
    by_table, by_folder = (json.loads((evaluate(settings("evaluate", checkpoint=trained / "run", input=where,
                                                         output=tmp_path / name)) / "metrics.json").read_text())
                           for where, name in ((table, "t"), (test, "f")))
    assert by_table["images"] == 60 and by_table["confusion_matrix"] == by_folder["confusion_matrix"]
    table.write_text(f"path,label\n{next(test.rglob('*.png'))},class_0|class_1\n")
    with pytest.raises(DataError, match=r"1 row\(s\) give an image other than one label"):
        evaluate(settings("evaluate", checkpoint=trained / "run", input=table, output=tmp_path / "t2"))
    loose = tmp_path / "unlabelled"
    loose.mkdir()
    Image.new("RGB", (12, 12)).save(loose / "1.png")
    with pytest.raises(DataError, match=r"holds no class folders: mode=evaluate needs each image's label, from one "
                                        r"subfolder per class \(class_0, class_1, class_2\) or a CSV.*mode=predict"):
        evaluate(settings("evaluate", checkpoint=trained / "run", input=loose, output=tmp_path / "o"))


def test_evaluate_names_unknown_class_folders_and_warns_about_missing_ones(trained, tmp_path, caplog):
    folder = write_images(tmp_path / "ev", classes=2, per_class=5, size=(12, 12))  # class_0, class_1 only
    evaluate(settings("evaluate", checkpoint=trained / "run", input=folder, output=tmp_path / "o1"))
    assert "no images of the training classes ['class_2']" in caplog.text
    (folder / "class_7").mkdir()
    Image.new("RGB", (12, 12)).save(folder / "class_7" / "x.png")
    with pytest.raises(DataError, match=r"class folders \['class_7'\] that the model was not trained on"):
        evaluate(settings("evaluate", checkpoint=trained / "run", input=folder, output=tmp_path / "o2"))
    export = tmp_path / "export"  # the dataset's root, not its test split: say which folder to give
    write_images(export / "train", classes=2, per_class=2, size=(12, 12))
    write_images(export / "valid", classes=2, per_class=2, size=(12, 12))
    with pytest.raises(DataError, match=r"It holds split folders: evaluate one of them, e\.g\. predict\.input=.*valid$"):
        evaluate(settings("evaluate", checkpoint=trained / "run", input=export, output=tmp_path / "o3"))


def test_a_file_that_is_not_a_safetrain_checkpoint_gets_a_clear_error(trained, tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.pt")
    ckpt = torch.load(trained / "run" / "checkpoints" / "best.pt", weights_only=True)
    torch.save({**ckpt, "format_version": 1}, tmp_path / "old.pt")
    for name, msg in (("notes.pt", "is not a safetrain checkpoint"), ("other.pt", "format None is not"),
                      ("old.pt", "format 1 is not"), ("missing.pt", "does not exist")):
        with pytest.raises(ConfigError, match=msg):
            predict(settings("predict", checkpoint=tmp_path / name, input=trained / "data" / "test"))


def test_export_agrees_with_pytorch_and_loads_without_safetrain(trained, tmp_path):
    out = export(settings("export", checkpoint=trained / "run", output=tmp_path / "exp"))
    meta = json.loads((out / "model.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx", "model.pt2", "model.safetensors"]
    assert meta["parity"]["n_images"] == 60 and meta["parity"]["onnx_argmax_agreement"] == 1.0
    assert meta["parity"]["onnx_max_abs_diff"] < 1e-4 and meta["parity"]["images"].endswith("test split")
    img = np.asarray(Image.open(trained / "data" / "test" / "class_1" / "img_3.png"))
    np.save(tmp_path / "x.npy", img.transpose(2, 0, 1)[None])
    script = f"""
import json, sys
import numpy as np, onnxruntime as ort, torch
meta = json.load(open({str(out / 'model.json')!r}))
x = np.load({str(tmp_path / 'x.npy')!r})
onnx = ort.InferenceSession({str(out / 'model.onnx')!r}).run(None, {{"images": x}})[0]
prog = torch.export.load({str(out / 'model.pt2')!r}).module()(torch.from_numpy(x)).detach().numpy()
assert "safetrain" not in sys.modules
print(json.dumps({{"onnx": meta["classes"][int(onnx.argmax())], "prog": prog.tolist(), "logits": onnx.tolist()}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    ref = load_classifier(trained / "run" / "checkpoints" / "best.pt")(torch.from_numpy(np.load(tmp_path / "x.npy")))
    assert got["onnx"] == f"class_{int(ref.argmax())}"
    assert np.allclose(got["logits"], ref.detach().numpy(), atol=1e-4) and np.allclose(got["prog"], got["logits"],
                                                                                         atol=1e-4)
    with pytest.raises(ConfigError, match="already holds files"):
        export(settings("export", checkpoint=trained / "run", output=tmp_path / "exp"))


def test_the_command_line_runs_the_three_modes_without_a_recipe(trained, tmp_path):
    ok = run_cli("mode=predict", f"predict.checkpoint={trained / 'run'}", f"predict.input={trained / 'data' / 'test'}",
                 f"predict.output={tmp_path / 'p.csv'}", "predict.progress=false")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert len(rows(tmp_path / "p.csv")) == 60 and "predicted 60 images" in ok.stdout
    bad = run_cli("mode=predict", f"predict.checkpoint={trained / 'run'}", "optim.lr=0.1")
    assert bad.returncode == 2 and "only predict.* settings" in bad.stderr
    missing = run_cli("mode=evaluate", f"predict.checkpoint={trained / 'run'}")
    assert missing.returncode == 2 and "predict.input=FOLDER (one subfolder per class)" in missing.stderr


def test_evaluate_says_how_many_images_were_seen_in_training(tmp_path):
    write_images(tmp_path / "data", classes=2, per_class=80, size=(24, 24))
    cfg, _ = compose("smoke", ["data=imagefolder", f"data.root={tmp_path / 'data'}", "trainer.max_epochs=1",
                               "trainer.progress=false", "data.batch_size=16"])
    run(cfg, tmp_path / "run")
    train_ids = json.loads((tmp_path / "run" / "splits.json").read_text())["train"]
    ev = write_images(tmp_path / "ev", classes=2, per_class=10, size=(24, 24), seed=9)  # new images ...
    for rel in [i for i in train_ids if i.startswith("class_1/")][:3]:  # ... and 3 training images, copied
        Image.open(tmp_path / "data" / rel).save(ev / "class_1" / f"seen_{rel.split('/')[-1]}")
    out = evaluate(settings("evaluate", checkpoint=tmp_path / "run", input=ev, output=tmp_path / "o"))
    seen = json.loads((out / "metrics.json").read_text())["seen_in_training"]
    assert seen["checked"] and seen["of"] == 23
    assert sorted(p["id"] for p in seen["pairs"]) == sorted(f"class_1/seen_{r.split('/')[-1]}" for r in
                                                            [i for i in train_ids if i.startswith("class_1/")][:3])
    assert "3 of the 23 evaluation images were seen in training" in (out / "report.md").read_text()


def test_predict_takes_a_single_image_and_names_the_output_after_it(trained):
    image = trained / "data" / "test" / "class_0" / "img_2.png"
    out = predict(settings("predict", checkpoint=trained / "run", input=image))
    assert out.parent == trained / "run" / "predictions" and out.name.startswith("img_2.png-")
    assert [r["path"] for r in rows(out)] == ["img_2.png"] and rows(out)[0]["predicted"].startswith("class_")


def test_predict_takes_a_pattern_and_refuses_an_address(trained):
    test = trained / "data" / "test"  # predict.input=photos/*.jpg reaches safetrain whole: the shell cannot expand it
    out = predict(settings("predict", checkpoint=trained / "run", input=f"{test}/**/img_1*.png"))
    want = sorted(str(f.relative_to(test)) for f in test.glob("*/img_1*.png"))
    assert len(want) >= 3 and [r["path"] for r in rows(out)] == want  # named from the folder before the wildcard
    assert out.name.startswith("test-")
    with pytest.raises(DataError, match=r"matches no image \(0 entries"):
        predict(settings("predict", checkpoint=trained / "run", input=f"{test}/*/*.bmp"))
    with pytest.raises(DataError, match="Download it first"):
        predict(settings("predict", checkpoint=trained / "run", input="https://example.com/cat.jpg"))


def test_predict_checkpoint_given_as_users_point_at_a_run(trained):
    image = trained / "data" / "test" / "class_0" / "img_2.png"
    out = predict(settings("predict", checkpoint=trained / "run" / "checkpoints", input=image))  # its best.pt
    assert out.parent == trained / "run" / "predictions"
    with pytest.raises(ConfigError, match=rf"holds 1 run\(s\); the newest: predict\.checkpoint={trained / 'run'}$"):
        predict(settings("predict", checkpoint=trained, input=image))  # the folder the runs are in
    with pytest.raises(ConfigError, match=rf"a file of the run in {trained / 'run'}, not a checkpoint"):
        predict(settings("predict", checkpoint=trained / "run" / "config.yaml", input=image))
    failed = trained / "failed"  # the newest run (`ls -t runs/x | head -1`) stopped at a data error
    (failed / ".hydra").mkdir(parents=True)
    (failed / "__main__.log").write_text("[2026-12-08 01:30:00][safetrain][ERROR] - DataError: [data] no column\n")
    with pytest.raises(ConfigError, match=r"no checkpoints/best\.pt in that folder\. It is a run that ended before its "
                                          r"first checkpoint \(its log: DataError: \[data\] no column\)\. The newest run "
                                          rf"beside it with one: predict\.checkpoint={trained / 'run'}$"):
        predict(settings("predict", checkpoint=failed, input=image))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_predict_device_cuda_without_a_gpu_names_predict_device(trained):
    """It said 'trainer.device=cuda but no CUDA device is visible' to a user who had typed predict.device=cuda."""
    with pytest.raises(ConfigError, match=r"predict\.device=cuda but no CUDA device is visible\. Use "
                                          r"predict\.device=auto"):
        predict(settings("predict", checkpoint=trained / "run", input=trained / "data" / "test", device="cuda"))


def test_export_without_its_extra_says_how_to_install_it(trained, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ConfigError, match=r"mode=export needs onnxruntime: pip install \"safetrain\[export\]\""):
        export(settings("export", checkpoint=trained / "run", output=tmp_path / "e"))
    assert not (tmp_path / "e").exists()
