"""Imbalanced data (issue 5 mechanisms): long-tailed splits, balancing methods, selection by macro-F1 [M24]."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from safetrain import data as D
from safetrain.cli import compose
from safetrain.losses import (DeferredReweightedLoss, LogitAdjustedLoss, build_loss, class_weights,
                              resolve_balance)
from safetrain.run import run
from tests.conftest import write_images


def test_m24_long_tailed_split_follows_the_exponential_profile_and_keeps_val_test_balanced(tmp_path):
    src = D.load_source("synthetic", root=None, download=False, image_size=None, loader="auto", num_workers=0,
                        cache_dir=tmp_path, seed=0, synthetic=dict(classes=5, samples_per_class=400, channels=1,
                                                                   size=8))
    splits = D.make_splits(src, 0.1, 0.1, seed=0, imbalance_ratio=20)
    train = torch.bincount(splits["train"].labels).tolist()
    n_max = train[0]
    assert train == [min(n_max, max(1, int(n_max * 20 ** (-k / 4)))) for k in range(5)]
    assert train[0] / train[-1] == pytest.approx(20, rel=0.05)
    for s in ("val", "test"):
        assert len(set(torch.bincount(splits[s].labels).tolist())) == 1  # balanced
    again = D.make_splits(src, 0.1, 0.1, seed=0, imbalance_ratio=20)
    assert again["train"].ids == splits["train"].ids


def test_m24_class_weights():
    w = class_weights([100, 10, 1], "inverse")
    assert w.mean().item() == pytest.approx(1) and (w[2] / w[0]).item() == pytest.approx(100)
    e = class_weights([100, 10, 1], "effective", beta=0.99)
    ref = torch.tensor([(1 - 0.99) / (1 - 0.99 ** n) for n in (100, 10, 1)])
    torch.testing.assert_close(e, (ref / ref.mean()).float())
    assert e[0] < e[1] < e[2]


def test_m24_none_is_plain_cross_entropy_and_auto_leaves_balanced_data_alone():
    logits, y = torch.randn(16, 4), torch.randint(0, 4, (16,))
    loss = build_loss("multiclass", "auto", 0.0, "none", [10, 10, 10, 10])
    assert type(loss) is torch.nn.CrossEntropyLoss and loss.weight is None
    torch.testing.assert_close(loss(logits, y), F.cross_entropy(logits, y))
    assert resolve_balance("auto", [100, 90, 80])[0] == "none"
    assert resolve_balance("auto", [100, 10])[0] != "none"
    assert resolve_balance("none", [100, 1])[0] == "none"


def test_m24_logit_adjustment_and_deferred_reweighting():
    counts = [90, 9, 1]
    logits, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    la = LogitAdjustedLoss(counts)
    prior = torch.tensor(counts, dtype=torch.float32) / 100
    torch.testing.assert_close(la(logits, y), F.cross_entropy(logits + prior.log(), y))
    drw = DeferredReweightedLoss(counts, start=0.5)
    drw.on_epoch(1, 10)
    torch.testing.assert_close(drw(logits, y), F.cross_entropy(logits, y))
    drw.on_epoch(6, 10)
    torch.testing.assert_close(drw(logits, y), F.cross_entropy(logits, y, weight=class_weights(counts, "effective")))


def test_m24_class_balanced_sampler_draws_classes_evenly():
    labels = torch.tensor([0] * 900 + [1] * 100)
    s = D.ImageSet(labels, [str(i) for i in range(1000)], torch.zeros(1000, 1, 2, 2, dtype=torch.uint8))
    loader = D.make_loader(s, D.BatchPipeline(D.Normalize([0.5], [0.5]), torch.device("cpu")), batch_size=100,
                           train=True, seed=0, shape=(1, 2, 2), resize=None, num_workers=0, class_balanced=True)
    drawn = torch.cat([y for _, y in loader])
    assert 0.4 < drawn.float().mean().item() < 0.6  # ~half minority, from 10% of the data


@pytest.mark.parametrize("balance", ["none", "inverse", "effective", "drw", "logit_adjust", "sampler"])
def test_m24_m25_binary_imbalanced_folder_reports_the_minority_class(tmp_path, balance):
    write_images(tmp_path / "imgs", 2, 200)
    for f in sorted((tmp_path / "imgs" / "class_1").iterdir())[20:]:
        f.unlink()  # 200 : 20 in the folder
    cfg, _ = compose("imagefolder", [f"data.root={tmp_path / 'imgs'}", "data.batch_size=16", "model=cnn_tiny",
                                     "trainer.max_epochs=2", "trainer.progress=false", f"loss.balance={balance}"])
    final = run(cfg, tmp_path / "run")
    assert final["selection_metric"] == "macro_f1" and final["balance"]["method"] == balance
    assert set(final["per_class"]["class_1"]) == {"precision", "recall", "f1"}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| class_1 |" in report
    assert math.isfinite(final["test_loss"])
    thin = [w for w in final["warnings"] if w.startswith("[M25]")]  # 20 minority images: 3 in val, 4 in test
    assert len(thin) == 2 and all("class_1" in w and "noisy" in w for w in thin) and "[M25]" in report


def test_m25_carved_val_and_test_keep_a_minimum_per_class_where_the_class_can_spare_it():
    labels = torch.tensor([0] * 150 + [1] * 1000 + [2] * 20)
    _, carved = D.stratified_split(labels, 0.1, seed=0, minimum=20)
    assert torch.bincount(labels[carved]).tolist() == [20, 100, 4]  # 15 raised to 20; 2 raised to a fifth
    _, carved = D.stratified_split(labels, 0.1, seed=0)
    assert torch.bincount(labels[carved]).tolist() == [15, 100, 2]  # the plain stratified fraction


def test_m24_auto_on_an_imbalanced_folder_says_what_it_chose_and_why(tmp_path, caplog):
    import logging
    caplog.set_level(logging.INFO)
    write_images(tmp_path / "imgs", 2, 200)
    for f in sorted((tmp_path / "imgs" / "class_1").iterdir())[20:]:
        f.unlink()
    cfg, _ = compose("imagefolder", [f"data.root={tmp_path / 'imgs'}", "data.batch_size=16", "model=cnn_tiny",
                                     "trainer.max_epochs=1", "trainer.progress=false"])
    final = run(cfg, tmp_path / "run")
    assert final["balance"]["method"] != "none" and "auto picks" in final["balance"]["why"]
    assert "imbalance ratio" in caplog.text and "auto picks" in caplog.text
    facts = json.loads((tmp_path / "run" / "data_facts.json").read_text())
    assert facts["counts"]["train"][0] > 5 * facts["counts"]["train"][1]
