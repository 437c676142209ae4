"""Detectors, preflight, doctor mode and report: each planted fault is caught and named."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from safetrain.cli import compose
from safetrain.monitors import fit_findings, gradient_findings
from safetrain.run import run
from tests.conftest import run_cli, write_images
from tests.test_mistakes import ImagesDataset


def _train(tmp_path, overrides=(), name="run", **api):
    cfg, _ = compose("smoke", ["trainer.progress=false", *overrides])
    return run(cfg, tmp_path / name, **api), tmp_path / name


class Head(nn.Module):
    """conv body -> global pooling -> linear head with a fixed, slightly negative bias (raw logits)."""

    def __init__(self, body: nn.Module, channels: int, classes: int = 3, scale: float = 1.0):
        super().__init__()
        self.body, self.scale = body, scale
        self.fc = nn.Linear(channels, classes)
        with torch.no_grad():
            self.fc.bias.copy_(torch.linspace(-0.1, 0.1, classes))

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3))) * self.scale


def test_m20_dead_relu_units_are_flagged(tmp_path):
    conv = nn.Conv2d(3, 16, 3, padding=1)
    with torch.no_grad():
        conv.bias.fill_(-50.0)  # every unit starts (and stays) dead
    final, _ = _train(tmp_path, ["trainer.max_epochs=1"], model=Head(nn.Sequential(conv, nn.ReLU()), 16),
                      dataset=ImagesDataset())
    assert any(w.startswith("[M20] epoch 1: 100% of ReLU channels never fire") and "LeakyReLU" in w
               for w in final["warnings"])


def test_m26_vanishing_gradients_in_a_deep_sigmoid_net_are_flagged(tmp_path):
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.Sigmoid()]
    for _ in range(9):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.Sigmoid()]
    final, _ = _train(tmp_path, ["trainer.max_epochs=1"], model=Head(nn.Sequential(*layers), 8),
                      dataset=ImagesDataset())
    assert any(w.startswith("[M26] epoch 1: vanishing gradients") for w in final["warnings"])


def test_m26_gradient_ratio_bounds_both_sides():
    assert gradient_findings(1, {"a": 1.0, "b": 1.0}) == []
    assert gradient_findings(1, {"a": 1e-6, "b": 1.0})[0].kind == "vanishing"
    assert gradient_findings(1, {"a": 500.0, "b": 1.0})[0].kind == "exploding"


def test_m09_overfitting_and_underfitting_rules():
    h = lambda ta, va, vl: {"train/acc": ta, "val/acc": va, "val/loss": vl}
    over = [h(0.6, 0.55, 1.0), h(0.8, 0.56, 1.1), h(0.95, 0.55, 1.3)]
    assert [f.kind for f in fit_findings(3, over, 10, "1,000 parameters for 50 training images")] == ["overfitting"]
    assert "1,000 parameters for 50 training images" in fit_findings(3, over, 10, "1,000 parameters for 50 "
                                                                      "training images")[0].message
    healthy = [h(0.6, 0.55, 1.0), h(0.7, 0.62, 0.9), h(0.75, 0.66, 0.85)]
    assert fit_findings(3, healthy, 10, "") == []
    digits = [h(0.95, 0.96, 0.20), h(0.96, 0.97, 0.22), h(0.97, 0.98, 0.25)]  # val loss up, gap negative: fine
    assert fit_findings(3, digits, 10, "") == []
    stuck = [h(0.11, 0.1, 2.3)] * 3
    assert [f.kind for f in fit_findings(3, stuck, 10, "")] == ["underfitting"]


def test_m09_m28_random_labels_are_flagged_as_not_learning(tmp_path):
    final, _ = _train(tmp_path, ["trainer.max_epochs=3"], dataset=RandomLabels(n=600))  # too many to memorize
    text = " ".join(final["warnings"])
    assert "[M09]" in text and "underfitting" in text
    assert "[M28]" in text


class RandomLabels(ImagesDataset):
    def __getitem__(self, i):
        x, _ = super().__getitem__(i)
        return x, int(torch.randint(0, 3, (1,), generator=torch.Generator().manual_seed(i)))


def test_m08_flipped_labels_top_the_suspected_mislabeled_list(tmp_path):
    flipped = set(range(0, 600, 30))  # 20 samples: class k relabelled k+1 (the classes differ in brightness)
    ds = ImagesDataset(n=600)
    labels = {i: (int(ds.y[i]) + 1) % 3 if i in flipped else int(ds.y[i]) for i in range(len(ds))}

    class Flipped(ImagesDataset):
        def __getitem__(self, i):
            return self.x[i], labels[i]

    final, run_dir = _train(tmp_path, ["trainer.max_epochs=10", "data.augment=none", "optim.lr=5e-3"],
                            dataset=Flipped(n=600))
    train_ids = set(json.loads((run_dir / "splits.json").read_text())["train"])
    in_train = train_ids & {f"dataset/{i}" for i in flipped}
    top = {m["id"] for m in final["suspected_mislabeled"]["top"]}
    assert len(in_train) >= 5 and len(in_train & top) >= 0.8 * len(in_train)
    assert "Suspected mislabeled training samples" in (run_dir / "report.md").read_text()


class Unused(nn.Module):
    def __init__(self, scale=1.0):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc, self.spare, self.scale = nn.Linear(8, 3), nn.Linear(8, 3), scale  # spare: never used

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3))) * self.scale


def test_m19_m26_preflight_flags_a_huge_initial_loss_and_a_layer_without_gradient(tmp_path):
    # logits x1000: the loss starts far above chance. That is a broken init [M19], not a divergence [M16]:
    # the run must go on (the divergence guard compares with the loss's own start).
    final, run_dir = _train(tmp_path, ["trainer.max_epochs=1"], model=Unused(scale=1000.0), dataset=ImagesDataset())
    text = " ".join(final["warnings"])
    assert "[M19] loss at initialization" in text and "label mapping" in text
    assert "[M26] gradients reach every parameter: no usable gradient for 2: spare.weight, spare.bias" in text
    assert "| loss at initialization | WARN |" in (run_dir / "report.md").read_text()


def test_m28_doctor_fails_a_model_that_cannot_learn_one_batch(tmp_path):
    from tests.test_mistakes import IgnoresInput
    cfg, _ = compose("smoke", ["mode=doctor"])
    out = run(cfg, tmp_path / "run", model=IgnoresInput())
    checks = {c["kind"]: c for c in out["checks"]}
    assert out["passed"] is False and out["verdict"] == "fail" and checks["overfit one batch"]["verdict"] == "fail"
    assert "labels match the images" in checks["overfit one batch"]["fix"]
    assert not (tmp_path / "run").exists()  # the doctor writes nothing


def test_m28_a_batch_with_one_image_under_two_labels_fails_for_its_labels_not_the_model():
    """The doctor on a folder of images filed under two classes: 'the model cannot even learn one batch ... a larger
    model' sent the user to the model; the cause is inputs no model can tell apart."""
    from safetrain.losses import TaskLoss
    from safetrain.preflight import overfit_one_batch

    x, y = torch.randn(8, 3, 8, 8), torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    x[1], x[3] = x[0], x[2]  # two images, each under both labels
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
    found = overfit_one_batch(net, x, y, TaskLoss(), lambda m, lr: torch.optim.Adam(m.parameters(), lr), 0.05, steps=50)
    assert found.verdict == "fail" and "4 of them are identical images with different labels" in found.message
    assert found.fix.startswith("Fix those labels first")


def test_doctor_from_the_command_line_passes_a_healthy_recipe(tmp_path):
    out = run_cli("recipe=smoke", "mode=doctor", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for name in ("inputs standardized", "loss at initialization", "gradients reach every parameter",
                 "overfit one batch", "data audit"):
        assert f"| {name} | PASS |" in out.stdout + out.stderr
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["safetrain.log"]


def test_doctor_has_three_verdicts_and_fails_only_where_training_would_be_wrong(tmp_path):
    from tests.test_mistakes import ImagesDataset
    from torch.utils.data import ConcatDataset, Subset
    fine = ImagesDataset(n=120, size=16)  # 16 px: large enough for the near-duplicate search
    cfg, _ = compose("smoke", ["mode=doctor"])
    out = run(cfg, tmp_path / "a", dataset=ConcatDataset([fine, Subset(fine, range(0, 120, 3))]))  # 40 exact copies
    audit = {c["kind"]: c for c in out["checks"]}["data audit"]
    assert "exact copies" not in audit["message"]  # safetrain's split keeps each group of copies in one split
    root = write_images(tmp_path / "given" / "train", classes=3, per_class=30, size=(16, 16))
    write_images(tmp_path / "given" / "test", classes=3, per_class=10, size=(16, 16), seed=1)
    for f in sorted(root.glob("class_0/*.png"))[:3]:  # the user's own test folder shares 3 training images
        shutil.copy(f, tmp_path / "given" / "test" / "class_0" / f"copy_{f.name}")
    folder, _ = compose("imagefolder", [f"data.root={tmp_path / 'given'}", "mode=doctor", "data.batch_size=16"])
    out = run(folder, tmp_path / "c")
    audit = {c["kind"]: c for c in out["checks"]}["data audit"]
    assert out["verdict"] == "fail" and audit["verdict"] == "fail" and "exact copies" in audit["message"]
    for f in (tmp_path / "given" / "test" / "class_0").glob("copy_*"):  # the same images, slightly changed: WARN
        Image.fromarray((np.asarray(Image.open(f)).astype(int) * 9 // 10 + 12).astype(np.uint8)).save(f)
    out = run(folder, tmp_path / "b")
    checks = {c["kind"]: c for c in out["checks"]}
    assert checks["data audit"]["verdict"] == "warn" and out["verdict"] == "warn" and out["passed"] is True
    assert checks["overfit one batch"]["verdict"] == "pass"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_report_and_log_summary_of_a_healthy_run(tmp_path):
    final, run_dir = _train(tmp_path, ["trainer.max_epochs=3"])
    report = (run_dir / "report.md").read_text()
    for section in ("## Result", "## Warnings (0)", "## Data facts", "## Audit", "## Preflight",
                    "## Test metrics per class"):
        assert section in report
    assert "| class_0 |" in report and final["warnings"] == []


class Scale(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x * self.k


def test_m26_exploding_gradient_ratio_is_flagged_in_a_run(tmp_path):
    # the first conv is reparametrized as k * conv(x; w / k): the same forward pass, a gradient k x larger
    # on its weights (BatchNorm would cancel a plain scale, so none follows it)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight /= 1e7
        conv.bias /= 1e7
    body = nn.Sequential(conv, Scale(1e7), nn.ReLU())
    # one training step (48 samples, batch 32): the ratio is read before that step's update can diverge
    final, _ = _train(tmp_path, ["trainer.max_epochs=1"], model=Head(body, 8), dataset=ImagesDataset(n=60))
    assert any(w.startswith("[M26] epoch 1: exploding gradients") for w in final["warnings"])


def test_m09_memorizing_random_labels_is_flagged_as_overfitting_with_the_labels_as_a_cause(tmp_path):
    """Random labels carry nothing a model can learn: it memorizes them. With held-out accuracy at chance no
    label-noise share can be estimated, so [M09] names what is seen, and wrong labels among its causes."""
    final, run_dir = _train(tmp_path, ["trainer.max_epochs=30", "data.batch_size=8", "data.augment=none",
                                       "optim.lr=3e-3", "model.widths=[32,64]", "trainer.early_stop_patience=0",
                                       "sched.name=cosine", "sched.warmup_fraction=0.05", "optim.weight_decay=0"],
                            dataset=RandomLabels())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("train/acc", 0) for r in rows) > 0.9  # memorized
    over = [f for f in final["findings"] if f["kind"] == "overfitting"]
    assert over and "parameters for" in over[0]["message"] and "labels that do not match" in over[0]["message"]
    assert final["label_noise_estimate"] is None


def test_one_list_of_findings_feeds_report_metrics_and_tensorboard(tmp_path):
    """Unlocks, preflight checks and monitors share one Finding shape: report.md groups them by row with each
    fix; metrics.json carries them as data; metrics.jsonl and TensorBoard carry the same text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tests.test_mistakes import IgnoresInput
    final, run_dir = _train(tmp_path, ["trainer.max_epochs=3", "data.allow_duplicates_across_splits=true"],
                            model=IgnoresInput())
    by_source = {}
    for f in final["findings"]:
        by_source.setdefault(f["source"], []).append(f)
    assert [f["row"] for f in by_source["unlock"]] == ["M06"]
    assert {f["row"] for f in by_source["monitor"]} >= {"M27", "M28"} and all(f["epoch"] for f in by_source["monitor"])
    plateau = next(f for f in by_source["monitor"] if f["row"] == "M28")
    assert "optim.lr=auto" in plateau["fix"] and plateau["evidence"]["chance_loss"] > 0
    assert final["warnings"] == [f"[{f['row']}] {f['message']}" + (f" {f['fix']}" if f["fix"] else "")
                                 for f in final["findings"]]
    report = (run_dir / "report.md").read_text()
    assert f"## Warnings ({len(final['findings'])})" in report
    rows = [line for line in report.splitlines() if line.startswith("### [M")]
    assert rows == sorted(rows) and "### [M28]" in rows  # one heading per row, in order
    assert f"**Fix:** {plateau['fix']}" in report
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("data.allow_duplicates_across_splits=true" in w for w in lines[0]["warnings"])  # epoch 0
    texts = EventAccumulator(str(run_dir / "tb")).Reload().Tags()["tensors"]
    assert any("warnings" in t for t in texts)


class NoisyLabels(ImagesDataset):
    """A learnable dataset whose labels are wrong (another class) for a seeded `share` of the samples."""

    def __init__(self, share: float, n: int = 900):
        super().__init__(n=n)
        g = torch.Generator().manual_seed(1)
        wrong = torch.rand(n, generator=g) < share
        self.labels = torch.where(wrong, (self.y + torch.randint(1, 3, (n,), generator=g)) % 3, self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.labels[i])


@pytest.mark.parametrize("share", [0.2, 0.4])
def test_m08_planted_label_noise_is_estimated_and_named(tmp_path, share):
    final, run_dir = _train(tmp_path, ["trainer.max_epochs=8", "data.augment=none", "data.val_fraction=0.2",
                                       "optim.lr=3e-3"], dataset=NoisyLabels(share))
    assert abs(final["label_noise_estimate"] - share) <= 0.1, final["label_noise_estimate"]
    noise = [f for f in final["findings"] if (f["row"], f["kind"]) == ("M08", "label noise")]
    assert noise and f"about {final['label_noise_estimate']:.0%} of the labels look wrong" in noise[0]["message"]
    assert not any(f["kind"] == "overfitting" for f in final["findings"])  # folded into the root cause


def test_m08_clean_labels_raise_no_label_noise_warning(tmp_path):
    final, _ = _train(tmp_path, ["trainer.max_epochs=8", "data.augment=none", "data.val_fraction=0.2",
                                 "optim.lr=3e-3"], dataset=NoisyLabels(0.0))
    assert final["label_noise_estimate"] < 0.05 and final["warnings"] == []


def test_a_condition_that_clears_by_itself_is_information_one_that_holds_is_a_warning():
    from safetrain.monitors import Monitors, StepGuard
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    collapsed = torch.tensor([[10, 0, 0], [10, 0, 0], [10, 0, 0]])  # every validation image predicted class 0
    healthy = torch.diag(torch.tensor([10, 10, 10]))

    def run_epochs(confusions, best):
        m = Monitors(StepGuard(3, torch.device("cpu"), 1e-3), torch.zeros(2, 1, 2, 2), 3, "")
        history = []
        for epoch, confusion in enumerate(confusions, 1):
            history.append({"train/loss": 0.5, "train/acc": 0.9, "val/loss": 0.5, "val/acc": 0.9,
                            "train/chance_loss": 1.1, "train/uniform_loss": 1.1})
            m.after_epoch(epoch, history, {"confusion": confusion}, model)
        return [f.row for f in m.at_end(best)]

    assert run_epochs([healthy, collapsed, healthy, healthy], best=4) == []  # cleared by itself
    assert run_epochs([healthy, collapsed, collapsed, healthy], best=3) == ["M27"]  # the kept model is collapsed
    assert run_epochs([healthy, healthy, healthy, collapsed], best=2) == ["M27"]  # the last model is
    assert run_epochs([collapsed], best=1) == []  # one epoch: BatchNorm statistics have not settled


def test_m08_the_noise_rule_asks_for_a_model_that_has_fit_its_training_images():
    """monitors.unfit_for_noise: held-out confusions are blamed on the labels only where the kept model's error on
    its own training images (per class, averaged) stays within NOISE_FIT_SLACK of the estimate."""
    from safetrain.monitors import NOISE_FIT_SLACK, unfit_for_noise
    labels = torch.arange(1000) % 4
    classes = ["a", "b", "c", "d"]

    def probs(wrong):  # the model's training predictions: right except for the `wrong` mask (then the next class)
        return torch.nn.functional.one_hot(torch.where(wrong, (labels + 1) % 4, labels), 4).float()
    every_fifth = torch.arange(1000) % 5 == 0
    assert unfit_for_noise(probs(every_fifth), labels, 0.2, classes) is None  # wrong labels, learned data: noise
    assert unfit_for_noise(probs(every_fifth), labels, 0.2 - NOISE_FIT_SLACK + 0.01, classes) is None
    half = torch.arange(1000) % 2 == 0
    why, evidence = unfit_for_noise(probs(half), labels, 0.12, classes)  # underfit: half its training images wrong
    assert "gets 50% of its own training images wrong" in why and evidence["train_error_per_class"] == 0.5
    rare = labels >= 2  # two classes never learned (a long tail): 50% per class on average, the others perfect
    why, evidence = unfit_for_noise(probs(rare), labels, 0.1, classes)
    assert "most: c 100%, d 100%" in why and evidence["worst"]["d"] == 1.0


def _held_out_swaps(swap: float, n: int = 3000):
    """Held-out predictions of 10 classes; a `swap` share of classes 0-3 labelled as their partner (0<->1, 2<->3),
    and a model that is sure of 60% of the images and torn between two partner classes (4<->5 too) on the rest."""
    g = torch.Generator().manual_seed(0)
    true = torch.arange(n) % 10
    partner = true ^ 1
    labels = torch.where((true < 4) & (torch.rand(n, generator=g) < swap), partner, true)
    torn = torch.rand(n, generator=g) < 0.4
    probs = torch.full((n, 10), 0.01)
    probs[torch.arange(n), true] = torch.where(torn, 0.5, 0.92)
    probs[torch.arange(n), partner] += torch.where(torn, 0.41, 0.0)
    return probs, labels


def test_m08_too_few_held_out_images_give_no_label_noise_estimate():
    """With under 2 x SUREST_MIN held-out images of a class, the images a model is "surest" of are about all of them and
    their labels its plain error rate: a CSV of 263 training photos of 5 classes, right labels, 28 held-out images a
    class, read as 41% wrong labels after 5 epochs (59% accuracy) and 32% after 30 (67%). No estimate there; a class
    that has too few is left out of an estimate the others can make."""
    from safetrain.monitors import SUREST_MIN, label_noise, too_few_held_out
    probs, labels = _held_out_swaps(0.3)  # 300 held-out images a class
    assert too_few_held_out(labels, 10) is None
    few = torch.arange(10).repeat_interleave(2 * SUREST_MIN - 1)
    assert "too few validation and test images" in too_few_held_out(few, 10)
    assert too_few_held_out(torch.arange(10).repeat_interleave(2 * SUREST_MIN), 10) is None
    keep = (labels != 9) | (torch.cumsum((labels == 9).long(), 0) <= 10)  # class 9 down to 10 images: left out
    without = labels != 9
    assert label_noise(probs[keep], labels[keep]).estimate == pytest.approx(
        label_noise(probs[without], labels[without]).estimate)


def test_m08_wrong_labels_between_look_alike_classes_are_estimated_and_their_pairs_named():
    """Class-conditional noise sits in a few pairs of classes, as a model's own confusions do: the labels of the
    images the model is surest of tell them apart, where the floor of confident learning sees nothing."""
    from safetrain.monitors import NOISE_WARN, label_noise
    noisy = label_noise(*_held_out_swaps(0.3))  # 30% of 4 classes: 12% of all labels
    assert abs(noisy.estimate - 0.12) < 0.03 and noisy.spread < 0.03
    assert {(j, i) for j, i, _ in noisy.pairs} == {(0, 1), (1, 0), (2, 3), (3, 2)}  # not the torn 4<->5
    assert abs(noisy.explained - noisy.estimate) < 0.01  # named both ways: not what a weak model's confusions do
    clean = label_noise(*_held_out_swaps(0.0))  # the same model's confusions alone
    assert clean.estimate < NOISE_WARN / 4 and clean.pairs == []


def test_m24_a_long_tail_trained_without_balancing_is_not_read_as_wrong_labels():
    """Balancing off on a long tail [M24]: the rare classes the model has not learned make the held-out images it is
    surest of carry other labels; that is the imbalance, named as such, not label noise [M08]."""
    from safetrain.end import _or_unfit
    from safetrain.findings import Finding
    from safetrain.monitors import FIXES, LabelNoise
    labels = torch.arange(400) % 4
    fit = (torch.nn.functional.one_hot(labels, 4).float(), labels)  # a model that fits its training images
    facts = SimpleNamespace(multilabel=False, classes=["a", "b", "c", "d"])
    noise = Finding("M08", "label noise", "about 10% of the labels look wrong", "fix the labels", "monitor")
    estimated = LabelNoise(0.1, 0.02, torch.zeros(400, dtype=torch.bool), [])
    assert _or_unfit(noise, fit, estimated, facts, [], FIXES) is noise
    ignored = Finding("M24", "imbalance ignored", "the largest class has 20x the smallest", "balance", "preflight")
    assert _or_unfit(noise, fit, estimated, facts, [ignored], FIXES) is None


def test_m08_suspects_of_the_classes_with_wrong_labels_come_before_hard_images_of_clean_ones():
    """The same margin over training ranks first in a class whose held-out labels are estimated 20% wrong, then in
    one estimated clean; without the estimate, the lower margin first."""
    from safetrain.monitors import suspected_mislabeled
    labels = torch.tensor([0, 1, 0, 1])
    probs = torch.nn.functional.one_hot(labels, 2).float()
    area = torch.tensor([-0.5, -0.4, 1.0, 1.0])  # samples 0 (class 0) and 1 (class 1) kept a negative margin
    ids, classes = ["a", "b", "c", "d"], ["clean", "noisy"]
    assert [m["id"] for m in suspected_mislabeled(probs, labels, ids, classes, area)] == ["a", "b"]
    prior = torch.tensor([0.0, 0.2], dtype=torch.float64)  # LabelNoise.given_wrong
    assert [m["id"] for m in suspected_mislabeled(probs, labels, ids, classes, area, prior=prior)] == ["b", "a"]


@pytest.mark.parametrize("model", ["cnn", "fastcnn", "resnet", "torchvision"])
def test_the_advice_names_only_settings_this_model_has(model):
    """Every model.X the detectors' advice names must exist for the run's model (fastcnn was told to widen
    model.base_width, a setting only resnet has); an underfit run is also told how many epochs to try."""
    import re

    from safetrain.stages import advice_for
    cfg, _ = compose("smoke", [f"model={model}", "trainer.max_epochs=5"])
    fixes = advice_for(cfg, custom_model=False)
    named = {m for text in fixes.values() for m in re.findall(r"model\.(\w+)", text)}
    assert all(hasattr(cfg.model, k) for k in named) and (named or model == "torchvision"), (model, named)
    assert "trainer.max_epochs=10" in fixes["underfitting"]
    if model == "fastcnn":
        assert "a wider model (model.widths)" in fixes["underfitting"]
