"""mode=crossfit: every training image predicted once by a model that never saw it; the wrong labels ranked first."""
import csv
import json

import pytest
import torch

from safetrain.cli import compose, main
from safetrain.data import hold_out
from safetrain.data.sources import ImageSet
from safetrain.errors import ConfigError
from safetrain.run import run
from tests.conftest import write_images

QUICK = ["recipe=imagefolder", "mode=crossfit", "crossfit.folds=3", "model=cnn_tiny", "trainer.max_epochs=12",
         "data.batch_size=8", "trainer.progress=false"]


PER, WRONG = 100, 12


def planted_folder(root):
    """3 classes told apart by their brightness, PER images each (enough for an estimate: too_few_held_out); WRONG of class_0 filed under class_2 as
    wrong_<i>."""
    write_images(root, classes=3, per_class=PER, size=(8, 8))
    for i in range(WRONG):
        (root / "class_0" / f"img_{i}.png").rename(root / "class_2" / f"wrong_{i}.png")
    return root


def test_m08_crossfit_predicts_each_training_image_once_and_ranks_the_wrong_labels_first(tmp_path):
    root, out = planted_folder(tmp_path / "imgs"), tmp_path / "cf"
    assert main([*QUICK, f"data.root={root}", f"hydra.run.dir={out}"]) == 0
    parts = [torch.load(out / f"fold_{k}" / "held_out.pt", weights_only=True) for k in (1, 2, 3)]
    held = [i for p in parts for i in p["ids"]]
    for k, p in enumerate(parts, 1):  # a fold is left out of its own run's training split, and nothing else is
        trained = json.loads((out / f"fold_{k}" / "splits.json").read_text())["train"]
        assert not set(p["ids"]) & set(trained) and set(held) == set(trained) | set(p["ids"])
    assert len(held) == len(set(held))  # each training image once
    wrong = {i for i in held if "wrong_" in i}
    assert len(wrong) >= 5
    probs, labels = torch.cat([p["probs"] for p in parts]), torch.cat([p["labels"] for p in parts])
    margin = probs.gather(1, labels[:, None]).squeeze(1) - probs.scatter(1, labels[:, None], -1.0).amax(1)
    assert {held[i] for i in margin.argsort()[:len(wrong)].tolist()} == wrong  # out of sample, they stand out
    rows = list(csv.DictReader(open(out / "suspects.csv")))  # those confident learning flags, lowest margin first
    assert len(rows) >= 3 and all(r["id"] in wrong and (r["given"], r["predicted"]) == ("class_2", "class_0")
                                  for r in rows)
    assert [float(r["p_given"]) - float(r["p_predicted"]) for r in rows] == sorted(
        float(r["p_given"]) - float(r["p_predicted"]) for r in rows)
    summary = json.loads((out / "crossfit.json").read_text())
    assert summary["training_images"] == len(held)
    assert abs(summary["label_noise_estimate"] - len(wrong) / len(held)) < 0.05  # all in one pair of classes ...
    assert summary["label_noise_pairs"][0][:2] == ["class_0", "class_2"]  # ... named: class_0 images labelled class_2
    assert (out / "suspects.png").stat().st_size > 5000


@pytest.mark.slow  # three more fold runs end to end (the default tier has the ranking's)
def test_a_crossfit_goes_on_with_the_folds_it_has_and_refuses_another_in_its_folder(tmp_path):
    root, out = planted_folder(tmp_path / "imgs"), tmp_path / "cf"
    args = [*QUICK, "trainer.max_epochs=1", f"data.root={root}", f"hydra.run.dir={out}"]
    assert main(args) == 0
    kept = (out / "fold_1" / "held_out.pt").stat().st_mtime_ns
    (out / "fold_3" / "held_out.pt").unlink()  # a kill after fold 3's test: nothing to resume, it starts again
    trained = (out / "fold_2" / "checkpoints" / "last.pt").stat().st_mtime_ns
    for name in ("held_out.pt", "metrics.json"):  # a kill after fold 2's last epoch: it goes on to its test
        (out / "fold_2" / name).unlink()
    assert main(args) == 0
    assert (out / "fold_1" / "held_out.pt").stat().st_mtime_ns == kept  # not run again
    assert (out / "fold_2" / "checkpoints" / "last.pt").stat().st_mtime_ns == trained  # resumed, not trained again
    assert all((out / f"fold_{k}" / "held_out.pt").exists() for k in (2, 3))
    log = (out / "safetrain.log").read_text()
    assert "fold_2 goes on from its last checkpoint" in log and "fold_3 did not finish; it starts again" in log
    assert main([*args, "seed=1"]) == 2  # another crossfit: refused, the folder untouched
    assert (out / "fold_1" / "held_out.pt").stat().st_mtime_ns == kept


def test_hold_out_deals_each_class_over_the_folds_and_keeps_exact_copies_together():
    labels = torch.tensor([0] * 12 + [1] * 9)
    images = torch.randint(0, 255, (21, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[5] = images[0]  # an exact copy
    data = ImageSet(labels, [f"s{i}" for i in range(21)], images)
    seen = []
    for k in range(3):
        rest, held = hold_out(data, k, 3, seed=0)
        assert sorted(rest.ids + held.ids, key=lambda s: int(s[1:])) == data.ids
        assert ("s0" in held.ids) == ("s5" in held.ids)
        assert 3 <= int((held.labels == 0).sum()) <= 5 and int((held.labels == 1).sum()) == 3
        seen += held.ids
    assert sorted(seen) == sorted(data.ids)


def test_a_bad_fold_and_several_labels_per_image_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"data.fold=\[3, 3\] is not \[k, K\]"):
        compose("smoke", ["data.fold=[3,3]"])
    (tmp_path / "imgs").mkdir()
    rows = ["path,label"]
    for i in range(40):
        write_images(tmp_path / "imgs" / str(i), classes=1, per_class=1, seed=i)
        rows.append(f"imgs/{i}/class_0/img_0.png,{'a|b' if i % 2 else 'a'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    cfg, _ = compose("smoke", ["data=csv", f"data.root={tmp_path / 'labels.csv'}", "data.label_delimiter=|",
                               "data.fold=[0,3]", "trainer.progress=false"])
    with pytest.raises(ConfigError, match="mode=crossfit ranks images with one label each"):
        run(cfg, tmp_path / "run")


def test_m08_crossfit_warns_of_label_noise_only_where_the_fold_runs_could_tell_it(tmp_path):
    """The same out-of-sample predictions (a third of the labels confidently contradicted): [M08] when most fold runs
    found label noise by their own checks, not when their models could not tell it from their own confusions."""
    from safetrain.crossfit import merge
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 10  # 60 a class: enough for their surest to be a selection (too_few_held_out)
    seen = torch.where(torch.rand(600, generator=g) < 0.3, (labels + 1) % 10, labels)  # what the models see
    probs = torch.full((600, 10), 0.02).scatter(1, seen[:, None], 0.82)
    for warned, folds_saying in ((True, (True, True, False)), (False, (False, False, True))):
        parts = [{"classes": [f"c{k}" for k in range(10)], "ids": [f"s{i}" for i in range(f, 600, 3)],
                  "probs": probs[f::3], "labels": labels[f::3], "noise_warned": said, "shown": [], "images": []}
                 for f, said in enumerate(folds_saying)]
        out = merge(parts, tmp_path, 3, 0.0)
        assert out["label_noise_estimate"] > 0.2 and out["label_noise_warned"] is warned
