"""Several labels per image: the task from the labels, its loss, thresholds, metrics, splits and detectors."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from safetrain.cli import compose
from safetrain.config import resolve_task
from safetrain.data.sources import Columns, list_csv, load_files
from safetrain.data.splits import class_counts, make_splits
from safetrain.errors import ConfigError
from safetrain.losses import MultilabelLoss, build_loss, chance_losses, positive_weights
from safetrain.metrics import build_multilabel_metrics, selection_metric
from safetrain.monitors import multilabel_findings
from safetrain.preflight import init_and_gradient_checks

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "yellow": (220, 220, 30)}


def mosaics(folder, n: int, seed: int = 0, rare: float = 1.0):
    """2x2 mosaics of coloured noisy tiles, 16x16: each colour present is a label (1-3 per image; `rare` scales how
    often yellow is drawn). -> labels.csv (path,label with labels joined by "|")."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    weights = np.array([1.0, 1.0, 1.0, rare])
    for i in range(n):
        k = int(rng.integers(1, 4))
        chosen = list(rng.choice(4, size=k, replace=False, p=weights / weights.sum()))
        tiles = chosen + list(rng.choice(chosen, size=4 - k))
        rng.shuffle(tiles)
        img = np.zeros((16, 16, 3))
        for t, c in enumerate(tiles):
            img[8 * (t // 2):8 * (t // 2) + 8, 8 * (t % 2):8 * (t % 2) + 8] = COLOURS[names[c]]
        img = np.clip(img + rng.normal(0, 30, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"m{i}.png")
        rows.append((f"m{i}.png", "|".join(names[c] for c in sorted(set(chosen)))))
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return folder / "labels.csv"


@pytest.mark.parametrize("weights", [None, [1.0, 49.0]])
def test_m13_label_smoothing_with_positive_weights_keeps_an_absent_label_unlikely(weights):
    """pos_weight (auto for several labels) with recipe=imagefolder's smoothing 0.1: the targets were pulled to 0.05
    and 0.95, whose best predictions under a weight w are w t / (w t + 1 - t): 0.72 for an absent label with 1
    positive in 50, on every image. The targets are now those whose best predictions are 0.05 and 0.95."""
    from safetrain.losses import MultilabelLoss

    loss = MultilabelLoss(None if weights is None else torch.tensor(weights), label_smoothing=0.1)
    for target, best in ((0.0, 0.05), (1.0, 0.95)):
        z = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([z], max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = loss(z, torch.full((1, 2), target, dtype=torch.float64))
            value.backward()
            return value
        opt.step(closure)
        torch.testing.assert_close(z.detach().sigmoid(), torch.full((1, 2), best, dtype=torch.float64), atol=1e-4,
                                   rtol=0)


def test_m13_the_asymmetric_loss_smooths_its_positives_only():
    """The asymmetric loss barely resists a positive share on an absent label (its focusing): smoothed at 0.1, an
    absent label was best predicted at 0.42 (0.07 unsmoothed). Its negatives are not smoothed now."""
    from safetrain.losses import MULTILABEL_BALANCE

    best = []
    for e in (0.0, 0.1):
        loss = MULTILABEL_BALANCE["asymmetric"]([5], 100, label_smoothing=e)
        z = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([z], max_iter=200, line_search_fn="strong_wolfe")
        opt.step(lambda: (opt.zero_grad(), loss(z, torch.zeros(1, 1, dtype=torch.float64)).backward(),
                          loss(z, torch.zeros(1, 1, dtype=torch.float64)))[2])
        best.append(float(z.detach().sigmoid()))
    assert best[1] == pytest.approx(best[0], abs=1e-6) and best[1] < 0.1
    assert float(loss.smoothed(torch.ones(1))) == pytest.approx(0.95)


def test_a_label_delimiter_makes_several_labels_per_image_and_one_label_each_stays_multiclass(tmp_path):
    path = mosaics(tmp_path / "m", 40)
    src = load_files(list_csv(str(path), Columns(delimiter="|")), None, "memory", tmp_path / "cache", 0)
    y = src.parts["all"].labels
    assert src.task == "multilabel" and src.classes == sorted(COLOURS) and y.shape == (40, 4)
    truth = [row["label"].split("|") for row in csv.DictReader(open(path))]
    assert [sorted(src.classes[k] for k in r.nonzero().squeeze(1).tolist()) for r in y] == [sorted(t) for t in truth]
    assert class_counts(src.parts, 4)["all"] == [sum(c in t for t in truth) for c in src.classes]  # positives
    rows = [("m0.png", "red"), ("m1.png", "green"), ("m2.png", "")]  # with a delimiter an empty cell is no label
    one = tmp_path / "m" / "one.csv"
    one.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    assert list_csv(str(one), Columns(delimiter="|")).rows[2][2] == ()
    one.write_text("path,label\nm0.png,red\nm1.png,green\nm2.png,red\n")
    listing = list_csv(str(one), Columns(delimiter="|"))  # a delimiter, but one label per image: multiclass
    assert [y for _, _, y in listing.rows] == [1, 0, 1]


def test_m13_the_task_comes_from_the_labels_and_a_loss_or_task_that_does_not_fit_them_is_refused(tmp_path):
    cfg, _ = compose("imagefolder", ["data.root=x"])
    assert cfg.task == "auto"
    resolve_task(cfg, "multilabel")
    assert cfg.task == "multilabel"  # saved in config.yaml as what the labels made
    for overrides, data_task, says in (
            (["loss.name=cross_entropy"], "multilabel", r"binary_cross_entropy \(a sigmoid per label"),
            (["task=multiclass"], "multilabel", "several labels .* per image: a multilabel task"),
            (["task=multilabel"], "multiclass", "exactly one label per image: a multiclass task"),
            (["loss.balance=logit_adjust"], "multilabel", r"\[M24\] loss.balance=logit_adjust is for one label"),
            (["data.mix=mixup"], "multilabel", "data.mix=none")):
        cfg, _ = compose("imagefolder", ["data.root=x", *overrides])
        with pytest.raises(ConfigError, match=says):
            resolve_task(cfg, data_task)
    with pytest.raises(ConfigError, match=r"\[M13\] loss.name='binary_cross_entropy' does not fit the multiclass"):
        compose("imagefolder", ["data.root=x", "task=multiclass", "loss.name=binary_cross_entropy"])


def test_m13_multilabel_loss_is_a_sigmoid_per_label_with_positive_weights_and_its_chance_level():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(64, 3, generator=g), (torch.rand(64, 3, generator=g) < 0.3).float()
    plain = build_loss("multilabel", "auto", 0.0, "none", [10, 10, 10], 64)
    assert isinstance(plain, MultilabelLoss)
    assert float(plain(logits, y)) == pytest.approx(float(torch.nn.functional.binary_cross_entropy_with_logits(
        logits, y)))
    assert positive_weights([10, 100, 1], 110).tolist() == pytest.approx([10.0, 1.0, 50.0])  # capped at 50
    weighted = build_loss("multilabel", "auto", 0.0, "pos_weight", [20, 1, 50], 100)
    assert weighted.pos_weight.tolist() == pytest.approx([4.0, 50.0, 1.0])  # balanced but for the capped label
    positives = torch.tensor([20.0, 1.0, 50.0])
    uniform, blind = chance_losses(weighted, positives, 100)
    q, w = positives / 100, weighted.pos_weight
    best = q * w / (q * w + 1 - q)  # the best constant probability per label under weighted BCE
    expect = -(w * q * best.log() + (1 - q) * (1 - best).log()).mean()
    assert blind == pytest.approx(float(expect), rel=1e-3) and blind < uniform - 0.001
    assert chance_losses(plain, positives, 100)[1] == pytest.approx(float(  # no weights: the labels' own entropy
        -(q * q.log() + (1 - q) * (1 - q).log()).mean()), rel=1e-3)
    assert uniform == pytest.approx(float((math.log(2) * (w * q + 1 - q)).mean()), rel=1e-4)
    asl = build_loss("multilabel", "auto", 0.0, "asymmetric", [20, 5, 50], 100)
    easy_negatives = asl(torch.full((4, 3), -6.0), torch.zeros(4, 3))
    assert float(easy_negatives) == 0.0  # below the probability margin: an easy negative costs nothing


def test_m40_map_selects_checkpoints_and_accuracy_is_not_the_headline():
    assert selection_metric("multilabel", imbalanced=False) == ("map", "max")
    y = torch.zeros(500, 5)
    y[:25, 0] = y[25:50, 1] = y[50:75, 2] = y[75:100, 3] = y[100:125, 4] = 1  # each label on 5% of the images
    nothing = torch.full((500, 5), -5.0)  # a model that predicts no label at all
    m = build_multilabel_metrics(5, torch.device("cpu"), thresholds=torch.full((5,), 0.5))
    m.update(nothing, y)
    r = m.compute()
    assert float(r["acc"]) == pytest.approx(0.95)  # 95% "accurate" per label ...
    assert r["macro_f1"] == 0.0 and float(r["map"]) == pytest.approx(float(r["chance_map"]), abs=0.01)  # ... scores 0
    assert r["predicted_at_half"] == 0 and r["predicted_sets"] == 1


def test_m39_test_scores_use_the_thresholds_chosen_on_validation_not_on_test():
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(400, 2, generator=g) < 0.3).float()
    logits = 3 * y - 1.5 + torch.randn(400, 2, generator=g)
    chosen_elsewhere = torch.tensor([0.9, 0.9])
    fixed = build_multilabel_metrics(2, torch.device("cpu"), thresholds=chosen_elsewhere)
    fixed.update(logits, y)
    tuned = build_multilabel_metrics(2, torch.device("cpu"))
    tuned.update(logits, y)
    a, b = fixed.compute(), tuned.compute()
    assert torch.equal(a["thresholds"], chosen_elsewhere) and a["macro_f1"] < b["macro_f1"]
    assert not torch.equal(b["thresholds"], chosen_elsewhere)


def test_m41_a_multilabel_source_is_split_so_every_label_is_in_val_and_test(tmp_path):
    path = mosaics(tmp_path / "m", 300, rare=0.1)
    src = load_files(list_csv(str(path), Columns(delimiter="|")), None, "memory", tmp_path / "cache", 0)
    splits = make_splits(src, 0.1, 0.1, seed=0)
    counts = class_counts(splits, 4)
    assert all(n > 0 for split in ("val", "test") for n in counts[split])
    yellow = src.classes.index("yellow")
    total = sum(c[yellow] for c in counts.values())
    assert counts["val"][yellow] == pytest.approx(0.1 * total, abs=2)  # the rare label in its share
    assert sum(len(s) for s in splits.values()) == 300


def test_m27_m28_multilabel_collapse_and_plateau_are_judged_on_label_sets_and_map():
    history = [{"train/loss": 0.6, "train/chance_loss": 0.6, "train/uniform_loss": 0.69}] * 2
    blind = {"predicted_sets": 1, "predicted_at_half": 0, "true_sets": 7, "map": 0.26, "chance_map": 0.25}
    rows = [(f.row, f.kind) for f in multilabel_findings(3, history, blind)]
    assert rows == [("M27", "collapse"), ("M28", "plateau")]
    learning = {"predicted_sets": 9, "predicted_at_half": 300, "true_sets": 7, "map": 0.45, "chance_map": 0.25}
    assert multilabel_findings(3, history, learning) == []  # a loss near chance while mAP climbs: not a plateau
    assert multilabel_findings(1, history, {**blind, "map": 0.9}) == []  # not judged after the first epoch


def test_m19_multilabel_loss_at_initialization_is_checked_against_ln2():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    x, y = torch.randn(32, 3, 2, 2), (torch.rand(32, 4) < 0.3).float()
    loss = MultilabelLoss()
    ok = init_and_gradient_checks(net, x, y, loss, 4)[0]
    assert ok.row == "M19" and ok.verdict == "pass" and "ln 2" in ok.message and "own entropy" in ok.message
    with torch.no_grad():
        net[1].bias.fill_(8.0)  # every label starts near certain: a broken head
    bad = init_and_gradient_checks(net, x, y, loss, 4)[0]
    assert bad.verdict == "warn" and "0/1 per label" in bad.fix


@pytest.mark.slow
def test_a_multilabel_run_trains_keeps_its_thresholds_and_predicts_evaluates_and_exports_label_sets(tmp_path):
    from safetrain.cli import main
    from safetrain.run import run

    path = mosaics(tmp_path / "m", 600)
    cfg, _ = compose("imagefolder", ["data=csv", f"data.root={path}", 'data.label_delimiter="|"',
                                     "trainer.max_epochs=4", "trainer.progress=false", "data.min_eval_per_class=5"])
    final = run(cfg, tmp_path / "run")
    assert final["task"] == "multilabel" and final["selection_metric"] == "map"
    assert final["test_map"] > 0.9 and final["test_macro_f1"] > 0.8, final
    assert final["warnings"] == []  # a healthy run is silent
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert len(ckpt["thresholds"]) == 4 and final["thresholds"] == pytest.approx(ckpt["thresholds"])
    assert ckpt["config"]["task"] == "multilabel"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Test mAP" in report and "| label | threshold |" in report and "pr_curves.png" in report
    assert "co_occurrence.png" in report
    out = tmp_path / "pred.csv"
    assert main(["mode=predict", f"predict.checkpoint={tmp_path / 'run'}", f"predict.input={tmp_path / 'm'}",
                         f"predict.output={out}"]) == 0
    rows = {r["path"]: r for r in csv.DictReader(open(out))}
    truth = {r["path"]: set(r["label"].split("|")) for r in csv.DictReader(open(path))}
    hits = [set(filter(None, rows[p]["predicted"].split("|"))) == t for p, t in truth.items()]
    assert sum(hits) / len(hits) > 0.8 and "p_yellow" in rows["m0.png"]
    assert main(["mode=evaluate", f"predict.checkpoint={tmp_path / 'run'}", f"predict.input={path}",
                         f"predict.output={tmp_path / 'eval'}"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["map"] > 0.9 and evaluated["per_class"]["red"]["threshold"] == pytest.approx(
        ckpt["thresholds"][list(sorted(COLOURS)).index("red")])
    seen = evaluated["seen_in_training"]  # the training CSV itself: its training images are named as seen
    assert seen["checked"] and seen["near_duplicates"] >= 0.7 * len(truth), seen
    assert main(["mode=export", f"predict.checkpoint={tmp_path / 'run'}",
                         f"predict.output={tmp_path / 'export'}"]) == 0
    meta = json.loads((tmp_path / "export" / "model.json").read_text())
    assert meta["output"]["thresholds"]["red"] == pytest.approx(evaluated["per_class"]["red"]["threshold"])
    assert meta["parity"]["onnx_label_set_agreement"] == 1.0


def test_a_datasets_0_1_label_vectors_make_a_multilabel_source_and_one_hot_ones_stay_refused():
    from safetrain.data.sources import load_dataset
    from safetrain.errors import DataError

    images = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    rows = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 1]])
    src = load_dataset(list(zip(images, rows)))
    assert src.task == "multilabel" and torch.equal(src.parts["all"].labels, rows.float()) and len(src.classes) == 3
    with pytest.raises(DataError, match=r"\[M14\] every label of the dataset is a one-hot vector"):
        load_dataset(list(zip(images, torch.eye(3)[[0, 1, 2, 0, 1, 2]])))
    with pytest.raises(DataError, match=r"\[M14\].*mix class indices and 0/1 vectors"):
        load_dataset([(images[0], rows[0]), (images[1], 1)])


def _held_out(noise: float, strength: float, seed: int = 0):
    """Held-out probabilities of a model that ranks each label's images with `strength` (logit gap), on (N, 6) tags of
    which a share `noise` of the images carry another image's tags."""
    g = torch.Generator().manual_seed(seed)
    truth = (torch.rand(3000, 6, generator=g) < torch.tensor([0.4, 0.3, 0.3, 0.2, 0.2, 0.1])).float()
    logits = strength * (2 * truth - 1) + torch.randn(3000, 6, generator=g) - 1
    given = truth.clone()
    swap = torch.rand(3000, generator=g) < noise
    given[swap] = truth[torch.randperm(3000, generator=g)][swap]
    return logits.sigmoid(), given


def test_m08_wrong_tags_are_estimated_per_label_and_a_weak_models_doubts_are_not_read_as_noise():
    from safetrain.monitors import TAG_NOISE_WARN, tag_noise, tag_noise_finding
    clean, _ = tag_noise(*_held_out(0.0, 3.0))
    noisy, off = tag_noise(*_held_out(0.3, 3.0))
    assert clean < TAG_NOISE_WARN / 2 and noisy > TAG_NOISE_WARN
    found = tag_noise_finding(noisy, off, [{"id": "a.jpg", "given": "cat", "doubted": "missing dog"}])
    assert found.row == "M08" and "a.jpg (cat: missing dog?)" in found.message
    assert tag_noise_finding(clean, off, []) is None


def test_m08_a_label_too_rare_to_learn_is_named_and_a_rare_label_learned_well_is_not():
    from safetrain.monitors import rare_label_findings
    classes, positives = ["a", "b", "c", "d"], [900, 800, 1000, 40]
    found = rare_label_findings(classes, positives, [0.8, 0.75, 0.85, 0.3])
    assert [(f.row, f.evidence["label"]) for f in found] == [("M08", "d")] and "Add images with 'd'" in found[0].fix
    assert rare_label_findings(classes, positives, [0.8, 0.75, 0.85, 0.78]) == []  # rare, but learned
    assert rare_label_findings(classes, [900, 800, 1000, 500], [0.8, 0.75, 0.85, 0.3]) == []  # weak, not rare


def test_m09_multilabel_underfitting_is_a_validation_map_near_chance():
    from safetrain.monitors import fit_findings
    epoch = {"train/loss": 1.1, "train/acc": 0.4, "val/loss": 1.1, "val/acc": 0.4, "val/chance_map": 0.25}
    weak = [{**epoch, "val/map": 0.3}] * 3
    assert [(f.row, f.kind) for f in fit_findings(3, weak, 10, "")] == [("M09", "underfitting")]
    assert fit_findings(3, [{**epoch, "val/map": 0.7}] * 3, 10, "") == []  # label accuracy 0.4 is no sign here


def test_m08_no_tag_noise_estimate_from_a_model_too_weak_to_tell_noise_from_its_limits():
    from safetrain.monitors import TAG_NOISE_WARN, tag_noise, too_weak_for_tag_noise
    weak = _held_out(0.0, 0.3)  # clean tags, a model that barely ranks them
    assert tag_noise(*weak)[0] > TAG_NOISE_WARN  # read as noise, it would cry wolf ...
    assert "too weak" in too_weak_for_tag_noise(*weak)  # ... so it is not estimated
    assert too_weak_for_tag_noise(*_held_out(0.0, 3.0)) is None and too_weak_for_tag_noise(*_held_out(0.3, 3.0)) is None
