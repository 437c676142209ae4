"""Imbalanced data (issue 5 mechanisms): long-tailed splits, balancing methods, selection by macro-F1 [M24]."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from safetrain import data as D
from safetrain.cli import compose
from safetrain.losses import (DeferredReweightedLoss, LogitAdjustedLoss, TaskLoss, build_loss, class_weights,
                              resolve_balance)
from safetrain.run import run
from tests.conftest import write_images


def two_class_folder(tmp_path, majority: int, minority: int):
    """An image folder of two classes, `majority` : `minority` images (class_1 is the rare one)."""
    write_images(tmp_path / "imgs", 2, majority)
    for f in sorted((tmp_path / "imgs" / "class_1").iterdir())[minority:]:
        f.unlink()
    return tmp_path / "imgs"


def test_m24_long_tailed_split_follows_the_exponential_profile_and_keeps_val_test_balanced(tmp_path):
    src = D.load_source(D.DataSpec("synthetic", synthetic=tuple(dict(classes=5, samples_per_class=400, channels=1,
                                                                     size=8).items())), tmp_path)
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
    assert type(loss) is TaskLoss and loss.weight is None  # cross-entropy, unweighted, nothing added
    torch.testing.assert_close(loss(logits, y), F.cross_entropy(logits, y))
    def facts(train):
        return D.DataFacts([str(k) for k in range(len(train))], 3, 8, 8, [0.5] * 3, [0.2] * 3, {"train": train}, "")
    assert resolve_balance("auto", facts([100, 90, 80]))[0] == "none" and not facts([100, 90, 80]).imbalanced
    assert resolve_balance("auto", facts([100, 10]))[0] != "none" and facts([100, 10]).imbalanced
    assert resolve_balance("none", facts([100, 1]))[0] == "none"


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


@pytest.mark.parametrize("counts", [[1221, 8], [4500, 1000, 45]])
def test_m24_logit_adjustment_with_label_smoothing_still_predicts_the_true_class(counts):
    """Label smoothing (0.1 in recipe=imagefolder) towards uniform under logit adjustment: the raw logits that
    minimize the loss of a clear image of the common class put the rare class first (ratio 152: every image was
    predicted rare, balanced accuracy 0.62 against 0.99 without smoothing). Smoothed towards the prior, the true
    class wins, with the same margin over every other class (the balanced space's label smoothing)."""
    la = LogitAdjustedLoss(counts, label_smoothing=0.1)
    for true in range(len(counts)):
        z = torch.zeros(1, len(counts), dtype=torch.float64, requires_grad=True)  # the logits of this one image
        opt = torch.optim.LBFGS([z], max_iter=200, line_search_fn="strong_wolfe")
        opt.step(lambda: (opt.zero_grad(), la(z, torch.tensor([true])).backward(), la(z, torch.tensor([true])))[2])
        z, others = z.detach(), [k for k in range(len(counts)) if k != true]
        assert int(z.argmax()) == true, (true, z)
        margins = z[0, true] - z[0, others]
        torch.testing.assert_close(margins, margins[:1].expand_as(margins), atol=1e-3, rtol=0)
        assert float(margins[0]) == pytest.approx(math.log(0.9 + 0.1 * float(la.smooth_to[true])) - math.log(0.1)
                                                  - float(la.shift[true]), abs=1e-3)
    soft = torch.tensor([[0.3, 0.7]])  # a mixed target (MixUp/CutMix) is smoothed the same way
    la2 = LogitAdjustedLoss([1221, 8], label_smoothing=0.1)
    logits = torch.randn(1, 2)
    expected = -((0.9 * soft + 0.1 * la2.smooth_to) * (logits + la2.shift).log_softmax(1)).sum()
    torch.testing.assert_close(la2(logits, soft), expected)


@pytest.mark.parametrize("balance", ["inverse", "effective", "drw"])
def test_m24_class_weights_with_label_smoothing_still_predict_the_true_class(balance):
    """PyTorch's weighted cross-entropy weighs each class's share of the smoothing by that class's weight: with
    inverse weights for 1,221:8 and smoothing 0.1 the best prediction for a clear common image was 0.89 rare. Each
    sample is weighed by its class now, so its best prediction is the smoothed target (0.95 / 0.05), for either class;
    a mixed target is weighed by its mix."""
    loss = build_loss("multiclass", "auto", 0.1, balance, [1221, 8])
    loss.on_epoch(30, 30)  # drw: its weights on
    for true in (0, 1):
        z = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([z], max_iter=200, line_search_fn="strong_wolfe")
        opt.step(lambda: (opt.zero_grad(), loss(z, torch.tensor([true])).backward(), loss(z, torch.tensor([true])))[2])
        assert float(z.detach().softmax(1)[0, true]) == pytest.approx(0.95, abs=1e-4)
    logits, soft = torch.randn(3, 2), torch.tensor([[0.3, 0.7], [1.0, 0.0], [0.0, 1.0]])
    w = soft @ loss.weight
    expected = (-w * ((0.9 * soft + 0.05) * logits.log_softmax(1)).sum(1)).sum() / w.sum()
    torch.testing.assert_close(loss(logits, soft), expected)
    hard = torch.tensor([1, 0, 1])  # class indices: the same as their one-hot targets
    torch.testing.assert_close(loss(logits, hard), loss(logits, F.one_hot(hard, 2).float()))


def test_m08_the_margin_over_training_is_taken_on_the_logits_the_loss_fits():
    """Under logit adjustment the raw logits carry minus the log prior: a common image the loss fits well (raw margin
    -2, adjusted +3 for a 150:1 prior) read as 'another class above its label', so the suspects were the common
    class's images. The margin is taken on the adjusted logits now; plain cross-entropy is unchanged."""
    from types import SimpleNamespace

    from safetrain.engine import _tally
    from safetrain.monitors import Margins

    logits, y, batch = torch.tensor([[1.0, 3.0], [-1.0, 4.0]]), torch.tensor([0, 1]), SimpleNamespace(
        batch_ids=torch.tensor([0, 1]))
    for loss, expected in ((LogitAdjustedLoss([150, 1]), [-2 + math.log(150), 5 - math.log(150)]),
                           (TaskLoss(), [-2.0, 5.0])):
        margins = Margins(2, torch.device("cpu"))
        _tally(logits, y, loss, None, margins, batch)
        torch.testing.assert_close(margins.area(), torch.tensor(expected))


def test_m24_class_balanced_sampler_draws_classes_evenly():
    labels = torch.tensor([0] * 900 + [1] * 100)
    s = D.ImageSet(labels, [str(i) for i in range(1000)], torch.zeros(1000, 1, 2, 2, dtype=torch.uint8))
    loader = D.make_loader(s, D.BatchPipeline(D.Normalize([0.5], [0.5]), torch.device("cpu")), batch_size=100,
                           train=True, seed=0, class_counts=[900, 100])
    drawn = torch.cat([y for _, y in loader])
    assert 0.4 < drawn.float().mean().item() < 0.6  # ~half minority, from 10% of the data


@pytest.mark.parametrize("balance", ["none", "inverse", "effective", "drw", "logit_adjust", "sampler"])
def test_m24_m25_binary_imbalanced_folder_reports_the_minority_class(tmp_path, balance):
    # 1:20; the classes differ in brightness, so a class-balanced batch is far from the split's statistics:
    # the [M33] input check must look at the split's own mix
    root = two_class_folder(tmp_path, 400, 20)
    cfg, _ = compose("imagefolder", [f"data.root={root}", "data.batch_size=16", "model=cnn_tiny",
                                     "trainer.max_epochs=2", "trainer.progress=false", f"loss.balance={balance}"])
    final = run(cfg, tmp_path / "run")
    assert final["selection_metric"] == "macro_f1" and final["balance"]["method"] == balance
    assert set(final["per_class"]["class_1"]) == {"precision", "recall", "f1"}
    report = (tmp_path / "run" / "report.md").read_text()
    m, n1 = final["per_class"]["class_1"], 20 - 3 - 4  # 3 went to val, 4 to test
    assert (f"Rarest training class 'class_1' ({n1} images): test precision {m['precision']:.3f}, "
            f"recall {m['recall']:.3f}, F1 {m['f1']:.3f}") in report
    assert f"| class_1 | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} |" in report
    assert math.isfinite(final["test_loss"])
    thin = [w for w in final["warnings"] if w.startswith("[M25]")]  # 20 minority images: 3 in val, 4 in test
    assert len(thin) == 2 and all("class_1" in w and "noisy" in w for w in thin) and "[M25]" in report
    ignored = [f for f in final["findings"] if (f["row"], f["kind"]) == ("M24", "imbalance ignored")]
    assert len(ignored) == (balance == "none") and all("loss.balance=auto" in f["fix"] for f in ignored)


def test_m25_carved_val_and_test_keep_a_minimum_per_class_where_the_class_can_spare_it():
    labels = torch.tensor([0] * 150 + [1] * 1000 + [2] * 20)
    _, carved = D.stratified_split(labels, 0.1, seed=0, minimum=20)
    assert torch.bincount(labels[carved]).tolist() == [20, 100, 4]  # 15 raised to 20; 2 raised to a fifth
    _, carved = D.stratified_split(labels, 0.1, seed=0)
    assert torch.bincount(labels[carved]).tolist() == [15, 100, 2]  # the plain stratified fraction


def test_m24_auto_on_an_imbalanced_folder_says_what_it_chose_and_why(tmp_path, caplog):
    import logging
    caplog.set_level(logging.INFO)
    root = two_class_folder(tmp_path, 200, 20)
    cfg, _ = compose("imagefolder", [f"data.root={root}", "data.batch_size=16", "model=cnn_tiny",
                                     "trainer.max_epochs=1", "trainer.progress=false"])
    final = run(cfg, tmp_path / "run")
    assert final["balance"]["method"] != "none" and "auto picks" in final["balance"]["why"]
    facts = json.loads((tmp_path / "run" / "data_facts.json").read_text())
    n0, n1 = facts["counts"]["train"]
    assert n0 > 5 * n1
    report = (tmp_path / "run" / "report.md").read_text()
    m = final["per_class"]["class_1"]
    row = f"| class_1 | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} |"
    for text in (caplog.text, report):  # counts, the method and why, the per-class table: log and report
        assert f"used {final['balance']['method']} ({final['balance']['why']})" in text
        assert "auto picks" in text and row in text and "Rarest training class 'class_1'" in text
    assert f"images per class: class_0 {n0}, class_1 {n1}" in caplog.text
    assert f"| class_0 | {n0} |" in report and f"| class_1 | {n1} |" in report


class Scripted(torch.nn.Module):
    """Predicts from a plan per epoch (the input carries the true label): epoch 1 says 'class 0' for
    everything, epoch 2 finds every minority sample at the cost of 20 majority ones, epoch 3 repeats 1."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(2))
        self.epoch = 0

    def train(self, mode=True):
        self.epoch += mode
        return super().train(mode)

    def forward(self, x):
        y, i = x[:, 0, 0, 0].long(), x[:, 0, 0, 1]
        pred = y if self.epoch == 2 else torch.zeros_like(y)
        pred = torch.where((self.epoch == 2) & (i < 20), torch.ones_like(y), pred)
        return F.one_hot(pred, 2).float() * 10 + self.bias


@pytest.mark.parametrize("selection", [("macro_f1", "max"), ("acc", "max")])
def test_m24_m29_checkpoint_schedule_and_early_stop_follow_the_selection_metric(tmp_path, selection):
    from safetrain.engine import Limits, Precision, Setup, fit
    from safetrain.losses import TaskLoss
    from safetrain.metrics import build_metrics
    y = torch.tensor([0] * 90 + [1] * 10)  # validation: 90 majority, 10 minority
    x = torch.zeros(100, 1, 2, 2)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = y.float(), torch.arange(100).float()
    net, seen, saved = Scripted(), [], {}

    class Spy:  # records what the scheduler is stepped on
        def after_step(self):
            pass

        def after_validation(self, value):
            seen.append(value)

    setup = Setup(net, TaskLoss(), torch.optim.SGD(net.parameters(), 0.0), Spy(), selection,
                  build_metrics(2, torch.device("cpu")))
    result = fit(setup, [(x, y)], [(x, y)], Limits(5, grad_clip=1.0, early_stop_patience=1),
                 prec=Precision(torch.device("cpu"), False),
                 save=lambda name, state: saved.setdefault(f"{name}.pt", []).append(state["epoch"]),
                 track=lambda *a: None)
    # epoch 1: acc 0.90, macro-F1 (0.947 + 0) / 2; epoch 2: acc 0.80, macro-F1 (0.875 + 0.5) / 2
    f1 = [(2 * 0.9 / 1.9) / 2, (2 * 70 / 160 + 2 * 10 / 40) / 2, (2 * 0.9 / 1.9) / 2]
    if selection[0] == "macro_f1":  # the minority-aware epoch wins; one epoch without gain then stops
        assert result.best["epoch"] == 2 and saved["best.pt"] == [1, 2] and result.epochs_run == 3
        assert seen == pytest.approx(f1, abs=1e-6)
    else:  # on accuracy, predicting the majority class looks best
        assert result.best["epoch"] == 1 and saved["best.pt"] == [1] and result.epochs_run == 2
        assert seen == pytest.approx([0.9, 0.8], abs=1e-6)


def _best_constant_logits_loss(loss_fn, counts):
    """The input-blind loss found by brute force: constant logits fitted by L-BFGS."""
    y = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    b = torch.zeros(len(counts), requires_grad=True)
    opt = torch.optim.LBFGS([b], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss_fn(b.expand(len(y), -1), y)
        value.backward()
        return value
    opt.step(closure)
    return float(loss_fn(torch.zeros(len(y), len(counts)), y)), float(loss_fn(b.detach().expand(len(y), -1), y))


@pytest.mark.parametrize("balance", ["none", "inverse", "effective", "drw", "logit_adjust"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_m28_chance_level_follows_the_loss_and_the_class_mix(balance, smoothing):
    from safetrain.losses import chance_losses
    lt = [int(4500 * 100 ** (-k / 9)) for k in range(10)]  # CIFAR-10-LT
    for counts in (lt, [50, 0, 20, 3, 9]):  # an epoch may draw no sample of a class
        loss = build_loss("multiclass", "auto", smoothing, balance, counts)
        if balance == "drw":
            loss.on_epoch(10, 10)  # its weights are on
        assert chance_losses(loss, torch.tensor(counts)) == pytest.approx(_best_constant_logits_loss(loss, counts),
                                                                          abs=1e-4)
    p = torch.tensor(lt, dtype=torch.float64) / sum(lt)
    entropy, ln10 = float(-(p * p.log()).sum()), math.log(10)  # 1.64 vs 2.30
    level = chance_losses(build_loss("multiclass", "auto", 0.0, balance, lt), torch.tensor(lt))
    expected = {"none": (ln10, entropy), "logit_adjust": (entropy, entropy), "inverse": (ln10, ln10)}
    if balance in expected:  # the known values: a blind model learns the prior, unless weights undo it
        assert level == pytest.approx(expected[balance], abs=1e-3)


class Blind(torch.nn.Module):
    """A planted fault: two logits that do not depend on the image, starting near uniform."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([0.01, -0.01]))

    def forward(self, x):
        return self.bias.expand(len(x), -1) + 0 * x.mean()


@pytest.mark.parametrize("balance", ["none", "logit_adjust"])
def test_m19_m28_on_imbalanced_data_chance_is_not_ln_c(tmp_path, balance):
    """With 160:13 images, a model that learns nothing but the prior sits at a loss of 0.27, far below ln(2)=0.69;
    under logit adjustment a healthy model starts there too. Neither may be misread."""
    root = two_class_folder(tmp_path, 200, 20)
    common = [f"data.root={root}", "data.batch_size=16", "trainer.progress=false",
              f"loss.balance={balance}"]
    cfg, _ = compose("imagefolder", common + ["model=cnn_tiny", "trainer.max_epochs=1"])
    healthy = run(cfg, tmp_path / "healthy")
    assert not [w for w in healthy["warnings"] if "[M19]" in w]  # the preflight's loss at init: no false alarm
    cfg, _ = compose("imagefolder", common + ["trainer.max_epochs=4", "optim.lr=0.1",
                                              "optim.allow_unusual_lr=true"])
    blind = run(cfg, tmp_path / "blind", model=Blind())
    assert [w for w in blind["warnings"] if "[M28]" in w and "chance level" in w]


def test_m39_per_label_thresholds_find_a_rare_label_that_one_half_never_predicts():
    """F1 at thresholds as torchmetrics computes it, and one threshold
    per label chosen on validation (a rare label's probabilities stay below 0.5: at 0.5 it is never predicted)."""
    from torchmetrics.classification import MultilabelF1Score

    from safetrain.metrics import build_multilabel_metrics, choose_thresholds, thresholded_f1
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(2000, 3, generator=g) < torch.tensor([0.4, 0.2, 0.03])).int()
    p = y * torch.tensor([0.5, 0.5, 0.2]) + torch.rand(2000, 3, generator=g) * torch.tensor([0.5, 0.5, 0.25])
    half = thresholded_f1(p, y, torch.full((3,), 0.5))
    for avg in ("micro", "macro"):
        assert half[f"{avg}_f1"] == pytest.approx(float(MultilabelF1Score(3, threshold=0.5, average=avg)(p, y)))
    assert half["f1"][2] == 0.0  # the rare label: never predicted at 0.5
    t = choose_thresholds(p, y)
    tuned = thresholded_f1(p, y, t)
    assert 0.18 <= float(t[2]) <= 0.3 and tuned["f1"][2] > 0.9 and tuned["macro_f1"] > half["macro_f1"] + 0.25
    m = build_multilabel_metrics(3, torch.device("cpu"))
    m.update(p, y)
    assert float(m.compute()["map"]) > 0.95  # threshold-free: it ranks the rare label's images right
