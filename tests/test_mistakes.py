"""The mistake catalogue (../shared/MISTAKES.md, docs/mistakes.md): each test tries the mistake the
way a user would (command-line override, recipe value, own Dataset or nn.Module) and asserts the
answer: refused before anything but the log is written, or impossible to express."""
import json
import logging
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from safetrain import data as D
from safetrain.checkpoint import load_checkpoint, load_classifier
from safetrain.cli import compose
from safetrain.engine import Limits, Precision, Setup, evaluate, train_epoch
from safetrain.errors import ConfigError, DataError, TrainingStopped
from safetrain.metrics import build_metrics
from safetrain.models import build_model
from safetrain.optim import LRSchedule
from safetrain.run import run
from safetrain.stages import prepare_data, start
from tests.conftest import run_cli, write_images

FAST = ["trainer.max_epochs=1", "trainer.progress=false"]


def refused(tmp_path, overrides, pattern, recipe="smoke", exc=ConfigError, **api):
    """Compose + run with `overrides`; the mistake must raise `exc` matching `pattern` (the key, the value,
    why, the fix) before the run directory is created."""
    run_dir = tmp_path / "refused_run"
    with pytest.raises(exc) as e:
        cfg, _ = compose(recipe, overrides)
        run(cfg, run_dir, **api)
    assert re.search(pattern, str(e.value), re.S), str(e.value)
    assert not run_dir.exists()
    return str(e.value)


def train(tmp_path, overrides=(), recipe="smoke", name="run", **api):
    cfg, _ = compose(recipe, [*FAST, *overrides])
    final = run(cfg, tmp_path / name, **api)
    return final, tmp_path / name


class ImagesDataset(torch.utils.data.Dataset):
    """A user's own dataset: (C, H, W) float images in [0, 1] and int labels, learnable."""

    def __init__(self, n=120, classes=3, c=3, size=12, label=lambda y: int(y), pixels=lambda x: x):
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % classes
        self.x = (self.y.view(-1, 1, 1, 1) / classes + 0.2 * torch.rand(n, c, size, size, generator=g)).clamp(0, 1)
        self.label, self.pixels, self.classes = label, pixels, [f"c{k}" for k in range(classes)]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.pixels(self.x[i]), self.label(self.y[i])


# ---------------------------------------------------------------- M01-M04 normalization and pipelines
def test_m01_normalization_is_always_on_and_has_no_off_switch(tmp_path):
    refused(tmp_path, ["+data.normalize=false"], r"unknown setting 'data\.normalize'")
    cfg, _ = compose("smoke", ["data.synthetic.classes=3", "data.synthetic.size=8", "data.augment=none"])
    data = prepare_data(start(cfg))  # the data stage alone: whatever the loader yields is normalized
    x = torch.cat([x for x, _ in data.loaders.train_in_order])
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2, rtol=0)


@pytest.mark.parametrize("override", ["+data.mean=[0.5,0.5,0.5]", "+data.std=[0.2023,0.1994,0.2010]",
                                      "+data.normalize.std=[0.5,0.5,0.5]"])
def test_m01_m03_hand_typed_normalization_stats_cannot_be_given(tmp_path, override):
    """The often-copied Normalize((0.5,)*3, (0.5,)*3) and CIFAR std (0.2023, 0.1994, 0.2010): no such knob."""
    refused(tmp_path, [override], r"unknown setting 'data\.(mean|std|normalize)")


def test_m01_m33_a_dataset_that_normalizes_itself_is_refused(tmp_path):
    import torchvision.transforms as T
    norm = T.Normalize((0.5,) * 3, (0.5,) * 3)  # the tutorial transform, inside the user's Dataset
    refused(tmp_path, [], r"\[M33\].*float pixels span \[-.*without Normalize", exc=DataError,
            dataset=ImagesDataset(pixels=norm))


def test_m02_one_normalization_travels_with_the_checkpoint_and_the_loaded_model(tmp_path):
    _, run_dir = train(tmp_path)
    facts = json.loads((run_dir / "data_facts.json").read_text())
    ckpt = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert (ckpt["data_facts"]["mean"], ckpt["data_facts"]["std"]) == (facts["mean"], facts["std"])
    assert "normalization" not in ckpt  # stored once, with the data facts
    clf = load_classifier(run_dir / "checkpoints" / "best.pt")  # takes raw uint8 images
    x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    net = build_model({**ckpt["config"]["model"]}, (3, 16, 16), 4)
    net.load_state_dict(ckpt["model"])
    expected = net.eval()((x.float() / 255 - torch.tensor(facts["mean"]).view(1, 3, 1, 1))
                          / torch.tensor(facts["std"]).view(1, 3, 1, 1))
    torch.testing.assert_close(clf(x), expected)


def test_m03_normalization_stats_come_from_the_training_split_only(tmp_path):
    _, run_dir = train(tmp_path)
    facts = json.loads((run_dir / "data_facts.json").read_text())
    splits = json.loads((run_dir / "splits.json").read_text())
    src = D.load_source(D.DataSpec("synthetic", synthetic=tuple(dict(classes=4, samples_per_class=120, channels=3,
                                                                     size=16).items())), tmp_path)
    imgs = src.parts["all"].images
    train_idx = [int(i.split("/")[1]) for i in splits["train"]]
    every_idx = list(range(len(imgs)))
    ref_train = imgs[train_idx].double().div(255).mean(dim=(0, 2, 3))
    ref_all = imgs[every_idx].double().div(255).mean(dim=(0, 2, 3))
    np.testing.assert_allclose(facts["mean"], ref_train.numpy(), rtol=1e-9)
    assert not np.allclose(facts["mean"], ref_all.numpy(), rtol=1e-9, atol=0)


def test_m04_evaluation_batches_are_never_augmented(tmp_path, monkeypatch):
    refused(tmp_path, ["+data.eval_augment=flip"], r"unknown setting 'data\.eval_augment'")
    built = []
    real = D.make_loader

    def spy(data, pipeline, *, train, **kw):
        loader = real(data, pipeline, train=train, **kw)
        built.append((train, data, loader))
        return loader

    monkeypatch.setattr(D, "make_loader", spy)
    train(tmp_path, ["trainer.max_epochs=1", "data.augment=crop_flip", "data.rotate_degrees=15"])
    evals = [(data, loader) for is_train, data, loader in built if not is_train]
    assert len(evals) >= 2 and any(is_train for is_train, _, _ in built)  # val, test (and more), and train
    for data, loader in evals:
        first, again = torch.cat([x for x, _ in loader]), torch.cat([x for x, _ in loader])
        assert torch.equal(first, again)  # deterministic
        norm = loader.pipeline.normalize
        torch.testing.assert_close(first, norm(data.images.to(first.device)))  # normalization only, in order


# ---------------------------------------------------------------- M05-M08 data
def test_m05_flips_refused_where_they_change_the_label(tmp_path):
    msg = refused(tmp_path, ["data.augment=crop_flip"], r"\[M05\].*data\.augment=crop_flip.*hflip_keeps_label",
                  recipe="mnist")
    assert "data.augment=crop" in msg  # the fix
    for recipe, keeps in [("mnist", False), ("fashion_mnist", False), ("cifar10", True), ("cifar100", True)]:
        assert compose(recipe, [])[0].data.hflip_keeps_label is keeps
    assert "flip" not in compose("mnist", [])[0].data.augment


def test_m05_mirror_tta_refused_where_a_mirror_changes_the_label(tmp_path):
    msg = refused(tmp_path, ["data.augment=crop", "model.tta=true"], r"\[M05\] model\.tta=true.*hflip_keeps_label",
                  recipe="mnist")
    assert "Use model.tta=false" in msg


def test_m05_large_rotation_refused_unless_unlocked_and_the_unlock_is_logged(tmp_path, caplog):
    refused(tmp_path, ["data.rotate_degrees=90"], r"\[M05\] data\.rotate_degrees=90.*data\.allow_large_rotation=true")
    caplog.set_level(logging.WARNING)
    _, run_dir = train(tmp_path, ["data.rotate_degrees=90", "data.allow_large_rotation=true"])
    assert "allow_large_rotation" in caplog.text and "[M05]" in caplog.text
    assert "allow_large_rotation: true" in (run_dir / "config.yaml").read_text()


def test_m05_rotation_stays_within_its_bound():
    x = torch.zeros(64, 1, 33, 33)
    x[:, :, 16, 16:] = 1  # a horizontal ray from the centre
    out = D.BatchPipeline(D.Normalize([0.0], [1.0]), torch.device("cpu"), D.Augment("none", rotate_degrees=20))
    rot = out.normalize.denormalize(out((x * 255).to(torch.uint8)))
    ys, xs = torch.meshgrid(torch.arange(33.0) - 16, torch.arange(33.0) - 16, indexing="ij")
    angle = torch.rad2deg(torch.atan2((rot[:, 0] * ys).sum((1, 2)), (rot[:, 0] * xs).sum((1, 2))))
    assert angle.abs().max() <= 21 and angle.abs().max() > 5  # rotated, but never past the bound


def _folder_with_copy(tmp_path):
    write_images(tmp_path / "imgs" / "train", 2, 20)
    write_images(tmp_path / "imgs" / "test", 2, 5, seed=1)
    src = tmp_path / "imgs" / "train" / "class_0" / "img_3.png"
    (tmp_path / "imgs" / "test" / "class_0" / "copy.png").write_bytes(src.read_bytes())
    return tmp_path / "imgs"


def test_m06_exact_copies_across_splits_are_refused_unless_allowed(tmp_path, caplog):
    root = _folder_with_copy(tmp_path)
    ov = [f"data.root={root}", "data.batch_size=8", "model=cnn_tiny"]
    refused(tmp_path, ov, r"\[M06\] 1 images appear in two splits.*(train|val):train/class_0/img_3\.png = "
            r"test:test/class_0/copy\.png.*data\.allow_duplicates_across_splits=true", recipe="imagefolder",
            exc=DataError)
    caplog.set_level(logging.WARNING)
    final, _ = train(tmp_path, [*ov, "data.allow_duplicates_across_splits=true"], recipe="imagefolder")
    assert final["epochs_run"] == 1 and "[M06]" in caplog.text


def test_m06_splits_are_seeded_stratified_and_disjoint():
    labels = torch.tensor([0] * 90 + [1] * 30)
    kept, cut = D.stratified_split(labels, 0.1, seed=0)
    assert set(kept.tolist()).isdisjoint(cut.tolist())
    assert torch.bincount(labels[cut]).tolist() == [9, 3]
    assert cut.tolist() != list(range(9)) + list(range(90, 93))  # shuffled, not the first samples


def test_m07_a_validation_split_always_exists(tmp_path):
    refused(tmp_path, ["data.val_fraction=0"], r"data\.val_fraction=0.*outside")
    refused(tmp_path, ["+trainer.eval_split=train"], r"unknown setting 'trainer\.eval_split'")


def test_m07_test_split_is_touched_once_after_training_with_the_validation_choice(tmp_path, monkeypatch):
    import safetrain.engine as engine
    import safetrain.end as spine
    calls = []
    real_evaluate, real_test = engine.evaluate, spine.test

    def spy_evaluate(model, loader, *a, **k):
        calls.append(("evaluate", id(loader)))
        return real_evaluate(model, loader, *a, **k)

    def spy_test(model, loader, *a, **k):
        calls.append(("test", id(loader)))
        return real_test(model, loader, *a, **k)

    monkeypatch.setattr(engine, "evaluate", spy_evaluate)
    monkeypatch.setattr(spine, "test", spy_test)
    final, run_dir = train(tmp_path, ["trainer.max_epochs=3"])
    tests = [c for c in calls if c[0] == "test"]
    assert len(tests) == 1 and calls.index(tests[0]) == len(calls) - 2  # last, after every validation
    val_loaders = {c[1] for c in calls[:-2]}
    assert len(val_loaders) == 1 and tests[0][1] not in val_loaders  # training never saw the test loader
    best = max(json.loads(l)["val/acc"] for l in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert final["best_val"] == best


def test_m08_labels_outside_the_class_range_are_refused(tmp_path):
    ds = ImagesDataset(label=lambda y: int(y) + 1)  # labels 1..3 for classes c0..c2
    refused(tmp_path, [], r"\[M08\].*label 3, outside \[0, 3\)", exc=DataError, dataset=ds)
    refused(tmp_path, [], r"\[M08\].*label -1", exc=DataError, dataset=ImagesDataset(label=lambda y: int(y) - 1))


def test_m08_too_few_samples_per_class_and_single_class_are_refused(tmp_path):
    write_images(tmp_path / "imgs", 2, 30)
    write_images(tmp_path / "rare", 1, 4, seed=2)
    (tmp_path / "rare" / "class_0").rename(tmp_path / "imgs" / "rare")
    refused(tmp_path, [f"data.root={tmp_path / 'imgs'}", "model=cnn_tiny"],
            r"\[M08\] classes with fewer than 5 training samples: \{'rare': \d\}.*data\.min_samples_per_class",
            recipe="imagefolder", exc=DataError)
    write_images(tmp_path / "one", 1, 10)
    refused(tmp_path, [f"data.root={tmp_path / 'one'}"], r"\[M08\].*at least 2", recipe="imagefolder", exc=DataError)


def test_m09_parameter_count_and_training_samples_are_reported(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    final, _ = train(tmp_path)
    assert re.search(rf"{final['parameters']:,} parameters for \d+ training images", caplog.text)


# ---------------------------------------------------------------- M10-M14 model, head, loss, labels
class LeNet(nn.Module):
    """The classic tutorial model: flatten size hard-coded for 32x32 RGB inputs."""

    def __init__(self, head=None):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 3)
        self.head = head or nn.Identity()

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(self.fc2(torch.relu(self.fc1(x.flatten(1)))))


def test_m10_hard_coded_flatten_size_is_refused_for_another_input_size(tmp_path):
    refused(tmp_path, [], r"\[M10\] the model fails on a batch of the data's shape \(16, 3, 12, 12\).*flatten",
            model=LeNet(), dataset=ImagesDataset(size=12))


def test_m10_wrong_input_channels_are_refused(tmp_path):
    refused(tmp_path, [], r"\[M10\] the model's first layer expects 3 input channels but the images have 1",
            model=LeNet(), dataset=ImagesDataset(c=1, size=32))


def test_m10_wrong_number_of_outputs_is_refused(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    refused(tmp_path, [], r"\[M10\].*returns \(16, 10\).*3 classes must return \(16, 3\)", model=net,
            dataset=ImagesDataset())


def test_m10_builders_infer_shapes_and_refuse_pooling_below_1x1(tmp_path):
    final, run_dir = train(tmp_path, dataset=ImagesDataset(c=1, size=12))
    facts = json.loads((run_dir / "data_facts.json").read_text())
    assert (facts["channels"], facts["height"], facts["width"]) == (1, 12, 12)
    refused(tmp_path, ["model.widths=[8,8,8,8]"], r"\[M10\].*12x12 -> 6x6 -> 3x3 -> 1x1 -> 0x0.*at most 3",
            dataset=ImagesDataset(size=12))


@pytest.mark.parametrize("head,name", [(nn.ReLU(), "ReLU"), (nn.Softmax(dim=1), "Softmax"),
                                       (nn.Sigmoid(), "Sigmoid"), (nn.LogSoftmax(dim=1), "LogSoftmax")])
def test_m11_activation_after_the_last_layer_is_refused_naming_it(tmp_path, head, name):
    refused(tmp_path, [], rf"\[M11\].*through {name} \(layer 'head'\).*raw logits", model=LeNet(head),
            dataset=ImagesDataset(size=32))


def test_m11_functional_softmax_output_is_refused_too(tmp_path):
    class Probs(LeNet):
        def forward(self, x):
            return torch.softmax(super().forward(x), dim=1)

    refused(tmp_path, [], r"\[M11\].*probabilities", model=Probs(), dataset=ImagesDataset(size=32))


def test_m11_functional_relu_output_is_refused_but_logits_that_happen_to_be_positive_are_not():
    from safetrain.models.checks import check_model
    x = torch.randn(16, 3, 32, 32)

    class Relu(LeNet):
        def forward(self, x):
            return torch.relu(super().forward(x))

    with pytest.raises(ConfigError, match=r"\[M11\].*>= 0.*ReLU"):
        check_model(Relu(), x, 3, 16)

    class Positive(LeNet):  # healthy logits, shifted: all > 0 on this batch by chance, none exactly 0
        def forward(self, x):
            out = super().forward(x)
            return out - out.min().detach() + 0.01

    check_model(Positive(), x, 3, 16)


def test_m11_built_heads_emit_raw_logits():
    net = build_model({"name": "resnet", "depth": 20, "base_width": 8}, (3, 16, 16), 5)
    assert isinstance(list(net.modules())[-1], nn.Linear)
    assert (net(torch.randn(8, 3, 16, 16)) < 0).any()


def test_m12_batchnorm_with_batch_size_2_is_refused_groupnorm_accepted(tmp_path):
    refused(tmp_path, ["data.batch_size=2"], r"\[M12\] data\.batch_size=2.*model\.norm=group")
    refused(tmp_path, ["data.batch_size=1"], r"\[M12\] data\.batch_size=1")
    final, _ = train(tmp_path, ["data.batch_size=2", "model.norm=group"])
    assert final["epochs_run"] == 1
    bn_net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(8, 3))
    refused(tmp_path, ["data.batch_size=4", "model.norm=group"], r"\[M12\] the model has BatchNorm layers",
            model=bn_net, dataset=ImagesDataset())


@pytest.mark.parametrize("loss", ["mse", "bce", "bce_with_logits", "nll"])
def test_m13_loss_that_does_not_fit_multiclass_is_refused(tmp_path, loss):
    msg = refused(tmp_path, [f"loss.name={loss}"], rf"\[M13\] loss\.name='{loss}' fits no task")
    assert "loss.name=auto" in msg and "cross_entropy (multiclass" in msg


@pytest.mark.parametrize("label,pattern", [
    (lambda y: nn.functional.one_hot(y, 3), r"\[M14\].*one-hot vector of length 3.*argmax"),
    (lambda y: float(y), r"\[M14\].*label 0\.0 is a float.*class indices"),
    (lambda y: f"class{int(y)}", r"\[M14\].*label 'class0' is a str")])
def test_m14_labels_in_the_wrong_format_are_refused(tmp_path, label, pattern):
    refused(tmp_path, [], pattern, exc=DataError, dataset=ImagesDataset(label=label))


def test_m14_integer_tensor_labels_are_converted(tmp_path):
    final, _ = train(tmp_path, dataset=ImagesDataset(label=lambda y: torch.tensor(int(y))))
    assert final["classes"] == ["c0", "c1", "c2"]


# ---------------------------------------------------------------- M15-M17 optimizer and schedule
def test_m15_sgd_without_momentum_is_refused_with_momentum_accepted(tmp_path):
    refused(tmp_path, ["optim=sgd", "optim.momentum=0"], r"\[M15\] optim=sgd with optim\.momentum=0.*0\.9")
    assert compose("smoke", ["optim=sgd"])[0].optim.momentum == 0.9


def test_m15_weight_decay_never_touches_norm_or_bias():
    from safetrain.optim import build_optimizer
    net = build_model({"name": "cnn", "widths": [8], "blocks": 1}, (3, 8, 8), 3)
    opt = build_optimizer(net, "adamw", 1e-3, 0.05, 0.9)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in net.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name


def test_m16_lr_01_with_adam_is_refused_and_the_unlock_is_logged(tmp_path, caplog):
    refused(tmp_path, ["optim.lr=0.1"], r"\[M16\] optim\.lr=0\.1 is outside.*adamw.*optim\.allow_unusual_lr=true")
    refused(tmp_path, ["optim.lr=1e-8"], r"\[M16\] optim\.lr=1e-08 is outside")
    caplog.set_level(logging.WARNING)
    _, run_dir = train(tmp_path, ["optim.lr=0.02", "optim.allow_unusual_lr=true"])
    assert "[M16]" in caplog.text and "allow_unusual_lr: true" in (run_dir / "config.yaml").read_text()


def test_m16_an_unlocked_learning_rate_that_stops_learning_is_named_as_the_cause(tmp_path):
    """optim.lr 1000x below AdamW's range, unlocked: the model underfits [M09] and collapses onto a class [M27]; the
    run names the learning rate for both [M16], as the one thing to change."""
    final, _ = train(tmp_path, ["optim.lr=1e-8", "optim.allow_unusual_lr=true", "trainer.max_epochs=4"])
    found = [f for f in final["findings"] if f["source"] != "unlock"]
    assert [f["row"] for f in found] == ["M16"], final["warnings"]
    assert "optim.lr=1e-08 is 1000x below the sane range for adamw" in found[0]["message"]
    assert "did not learn: [M09]" in found[0]["message"] and "optim.lr=auto" in found[0]["fix"]


def test_m16_lr_auto_runs_a_range_test_and_picks_a_sane_rate(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    final, _ = train(tmp_path, ["optim.lr=auto", "trainer.max_epochs=3"])
    assert 1e-5 <= final["lr"] <= 1e-2 and "range test chose" in caplog.text
    assert final["test_acc"] > 0.5


def test_m17_plateau_schedule_is_default_and_steps_on_the_validation_metric(tmp_path):
    cfg, _ = compose("smoke", [])  # a recipe that does not choose: the default (one-cycle is a recipe's choice)
    assert cfg.sched.name == "plateau"
    refused(tmp_path, ["+sched.monitor=train_loss"], r"unknown setting 'sched\.monitor'")
    net = build_model({"name": "cnn", "widths": [8], "blocks": 0}, (3, 8, 8), 3)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    s = LRSchedule(opt, "plateau", mode="max", total_steps=10, patience=0)
    for _ in range(30):
        s.after_step()  # training steps: a plateau schedule ignores them
    s.after_validation(0.9)
    s.after_validation(0.95)  # accuracy went up: no decay in mode "max"
    assert opt.param_groups[0]["lr"] == 1e-3
    s.after_validation(0.5)
    assert opt.param_groups[0]["lr"] < 1e-3


# ---------------------------------------------------------------- M18-M23 loop, init, activations, batches
def test_m18_the_loop_owns_modes_no_grad_and_zero_grad():
    states = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            states.append((self.training, torch.is_grad_enabled()))
            return self.lin(self.drop(x.flatten(1)))

    net, grads = Spy(), []
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    real_step = opt.step
    opt.step = lambda: (grads.append(net.lin.weight.grad.clone()), real_step())[1]
    x, y = torch.ones(8, 1, 2, 2), torch.zeros(8, dtype=torch.long)
    sched = LRSchedule(opt, "plateau", mode="max", total_steps=2)
    net.drop.p = 0.0  # same batch twice, lr 0: gradients must be equal, not accumulated
    train_epoch(Setup(net, nn.CrossEntropyLoss(), opt, sched), [(x, y), (x, y)], Precision(torch.device("cpu"), False),
                Limits(1), "")
    torch.testing.assert_close(grads[0], grads[1])
    evaluate(net, [(x, y)], nn.CrossEntropyLoss(), build_metrics(3, torch.device("cpu")),
             Precision(torch.device("cpu"), False))
    assert states[:2] == [(True, True)] * 2 and states[2] == (False, False)


def test_m19_init_follows_the_activation_and_starts_at_chance_loss():
    torch.manual_seed(0)
    for act in ("relu", "leaky_relu", "prelu", "gelu", "silu"):
        net = build_model({"name": "resnet", "depth": 20, "base_width": 16, "activation": act}, (3, 32, 32), 10)
        loss = nn.functional.cross_entropy(net(torch.randn(64, 3, 32, 32)), torch.randint(0, 10, (64,)))
        assert abs(loss.item() - math.log(10)) < 0.25, act
        assert all(torch.all(m.bias == 0) for m in net.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("act,cls", [("leaky_relu", nn.LeakyReLU), ("prelu", nn.PReLU)])
def test_m20_leaky_activations_are_one_override_away(tmp_path, act, cls):
    cfg, _ = compose("cifar10", [f"model.activation={act}"])
    net = build_model({**vars(cfg.model)}, (3, 32, 32), 10)
    assert any(isinstance(m, cls) for m in net.modules()) and not any(isinstance(m, nn.ReLU) for m in net.modules())


@pytest.mark.parametrize("key,value", [("model.dropout", 0.9), ("optim.weight_decay", 0.9)])
def test_m21_regularization_strong_enough_to_underfit_is_refused(tmp_path, key, value):
    refused(tmp_path, [f"{key}={value}"], rf"\[M21\] {re.escape(key)}={value} is outside")


def test_m22_training_batches_are_shuffled_validation_is_not(tmp_path):
    refused(tmp_path, ["+data.shuffle=false"], r"unknown setting 'data\.shuffle'")
    s = D.ImageSet(torch.arange(40) % 2, [str(i) for i in range(40)],
                   torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 2, 2).contiguous())
    pipe = D.BatchPipeline(D.Normalize([0.0], [1.0]), torch.device("cpu"))
    kw = dict(seed=0, batch_size=8)
    order = lambda loader: [round(v * 255) for x, _ in loader for v in x[:, 0, 0, 0].tolist()]
    assert order(D.make_loader(s, pipe, train=False, **kw)) == list(range(40))
    assert order(D.make_loader(s, pipe, train=True, **kw)) != list(range(40))


def test_m23_batch_larger_than_the_dataset_is_refused(tmp_path):
    refused(tmp_path, ["data.batch_size=1000"], r"\[M23\] data\.batch_size=1000 is larger than the training split")


# ---------------------------------------------------------------- M24-M33 metrics, tracking, inputs
def test_m24_class_counts_are_measured_and_imbalance_selects_macro_f1(tmp_path):
    write_images(tmp_path / "imgs", 2, 60)
    for f in sorted((tmp_path / "imgs" / "class_1").iterdir())[10:]:
        f.unlink()  # 60 vs 10 images: ratio 6
    final, run_dir = train(tmp_path, [f"data.root={tmp_path / 'imgs'}", "data.batch_size=16", "model=cnn_tiny"],
                           recipe="imagefolder")
    facts = json.loads((run_dir / "data_facts.json").read_text())
    assert facts["counts"]["train"][0] > 4 * facts["counts"]["train"][1]
    assert final["selection_metric"] == "macro_f1"
    assert final["balance"]["method"] != "none"
    balanced, _ = train(tmp_path, name="balanced")  # balanced data: plain cross-entropy and accuracy, as before
    assert balanced["selection_metric"] == "acc" and balanced["balance"]["method"] == "none"


def test_m25_macro_f1_per_class_metrics_and_confusion_matrix_are_always_reported(tmp_path):
    final, run_dir = train(tmp_path)
    for key in ("test_acc", "test_macro_f1", "test_balanced_acc", "per_class", "confusion_matrix"):
        assert key in final
    assert set(final["per_class"]["class_0"]) == {"precision", "recall", "f1"}
    assert np.array(final["confusion_matrix"]).sum() == len(json.loads((run_dir / "splits.json").read_text())["test"])
    assert "val/macro_f1" in json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


def test_m26_gradient_clipping_is_on_by_default_and_applied():
    cfg, _ = compose("cifar10", [])
    assert cfg.trainer.grad_clip > 0
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    norms = []
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    real_step = opt.step
    opt.step = lambda: (norms.append(torch.norm(torch.stack([p.grad.norm() for p in net.parameters()]))),
                        real_step())[1]
    x, y = 1000 * torch.randn(8, 1, 2, 2), torch.zeros(8, dtype=torch.long)
    train_epoch(Setup(net, nn.CrossEntropyLoss(), opt, LRSchedule(opt, "plateau", mode="max", total_steps=1)),
                [(x, y)], Precision(torch.device("cpu"), False), Limits(1, grad_clip=0.5), "")
    assert norms[0] <= 0.5 + 1e-4


class NaNAfter(nn.Module):
    """A model that goes NaN during its second training epoch (a planted numerical fault)."""

    def __init__(self, after_calls: int):
        super().__init__()
        self.net = build_model({"name": "cnn", "widths": [8], "blocks": 0}, (3, 16, 16), 4)
        self.calls, self.after = 0, after_calls

    def forward(self, x):
        if self.training:
            self.calls += 1
        out = self.net(x)
        return out * float("nan") if self.calls > self.after else out


def test_m26_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg, _ = compose("smoke", ["trainer.max_epochs=3", "trainer.progress=false"])
    steps = 388 // 32  # training steps per epoch of the smoke data
    with pytest.raises(TrainingStopped, match=r"\[M26\] the loss or the gradients became NaN/inf in epoch 2/3.*"
                                              r"first non-finite layer: net\.features\.0\.weight"):
        run(cfg, tmp_path / "run", model=NaNAfter(steps + 3))
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values())
    assert "M26" in json.loads((tmp_path / "run" / "metrics.json").read_text())["stopped"]


def test_m16_a_diverging_loss_stops_with_a_learning_rate_diagnosis(tmp_path):
    cfg, _ = compose("smoke", ["optim=sgd", "optim.lr=1000", "optim.allow_unusual_lr=true", "trainer.grad_clip=0",
                               "trainer.max_epochs=2", "trainer.progress=false"])
    with pytest.raises(TrainingStopped, match=r"\[M(16|26)\].*learning rate.*optim\.lr=1\.00e\+03"):
        run(cfg, tmp_path / "run")


class IgnoresInput(nn.Module):
    """A planted fault: the output does not depend on the image."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.01, -0.01, -0.01, -0.01]))  # loss starts at chance

    def forward(self, x):
        return self.bias.expand(len(x), -1) + 0 * x.mean()


def test_m27_m28_a_model_that_ignores_its_input_is_flagged_as_collapsed_and_stuck(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    final, run_dir = train(tmp_path, ["trainer.max_epochs=3"], model=IgnoresInput())
    text = " ".join(final["warnings"])
    assert "[M27]" in text and "of validation predictions are class 0" in text
    assert "[M28]" in text and "chance level" in text and "ln(4) = 1.386" in text
    assert "[M27]" in caplog.text
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("[M28]" in w for r in rows for w in r["warnings"])


def test_m27_m28_a_healthy_run_raises_no_alarm(tmp_path):
    final, _ = train(tmp_path, ["trainer.max_epochs=3"])
    assert final["warnings"] == [] and final["test_acc"] > 0.9


def test_m29_one_selection_metric_drives_checkpoint_scheduler_and_early_stopping(tmp_path):
    refused(tmp_path, ["+trainer.monitor=val_loss"], r"unknown setting 'trainer\.monitor'")
    final, run_dir = train(tmp_path, ["trainer.max_epochs=4", "trainer.early_stop_patience=1"])
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    accs = [r["val/acc"] for r in rows]
    assert final["best_epoch"] == 1 + accs.index(max(accs)) and final["best_val"] == max(accs)
    assert load_checkpoint(run_dir / "checkpoints" / "best.pt")["epoch"] == final["best_epoch"]


def test_m30_augmented_training_images_and_class_counts_go_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, run_dir = train(tmp_path)
    ev = EventAccumulator(str(run_dir / "tb")).Reload()
    assert "train/augmented_batch" in ev.Tags()["images"]
    assert any("data/counts" in t for t in ev.Tags()["tensors"])


def test_m31_config_environment_metrics_and_hparams_are_saved(tmp_path):
    _, run_dir = train(tmp_path, ["seed=3"])
    assert "seed: 3" in (run_dir / "config.yaml").read_text()
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"].startswith(torch.__version__[:4])
    assert (run_dir / "metrics.json").is_file() and (run_dir / "metrics.jsonl").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(run_dir / "tb")).Reload()
    assert any("hparam" in t for t in ev.Tags()["scalars"])


def test_m32_one_seed_reproduces_the_run_and_seed_0_is_a_seed(tmp_path):
    a, da = train(tmp_path, ["seed=0"], name="a")
    b, db = train(tmp_path, ["seed=0"], name="b")
    c, dc = train(tmp_path, ["seed=1"], name="c")
    assert a["test_loss"] == b["test_loss"]
    assert (da / "splits.json").read_text() == (db / "splits.json").read_text()
    assert (da / "splits.json").read_text() != (dc / "splits.json").read_text()


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_m32_a_warm_cache_gives_the_same_run_as_a_cold_one(tmp_path, loader):
    """Decoding the images (first run) or reading them from the cache (later runs) must not move the seeded
    random streams: the same seed gives the same weights either way."""
    write_images(tmp_path / "imgs", 3, 30)
    over = [f"data.root={tmp_path / 'imgs'}", "data.batch_size=16", "model=cnn_tiny", "data.num_workers=1",
            f"data.loader={loader}"]
    cold, dc = train(tmp_path, over, recipe="imagefolder", name="cold")
    warm, dw = train(tmp_path, over, recipe="imagefolder", name="warm")
    assert cold["test_loss"] == warm["test_loss"]
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (dc, dw))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("pixels,pattern", [(lambda x: x * 255, r"\[M33\].*float pixels span \[\d.*255"),
                                            (lambda x: (x - 0.5) / 0.25, r"\[M33\].*float pixels span \[-")])
def test_m33_pixels_in_the_wrong_range_are_refused(tmp_path, pixels, pattern):
    refused(tmp_path, [], pattern, exc=DataError, dataset=ImagesDataset(pixels=pixels))


def test_m33_inputs_are_checked_after_the_pipeline():
    from safetrain.preflight import input_check
    with pytest.raises(DataError, match=r"\[M33\]"):
        input_check(torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8))
    with pytest.raises(DataError, match=r"\[M33\].*far from standardized"):
        input_check(torch.rand(16, 3, 8, 8) * 255)
    g = torch.Generator().manual_seed(0)
    assert input_check(torch.randn(64, 3, 8, 8, generator=g)).passed  # standardized floats pass
    mild = input_check(torch.randn(64, 3, 8, 8, generator=g) * 0.3 + 0.8)  # off, but could be these images
    assert not mild.passed and mild.row == "M33" and "clear the cache" in mild.fix


def test_m33_a_run_refuses_inputs_that_normalization_does_not_standardize(tmp_path, monkeypatch):
    import os
    train(tmp_path, name="first")  # fills the statistics cache
    cache = next((tmp_path.parent / os.environ["SAFETRAIN_CACHE"]).glob("stats/*.json"))
    cache.write_text(json.dumps({"mean_std": [[0.9, 0.9, 0.9], [0.05, 0.05, 0.05]]}))  # stale or corrupt
    refused(tmp_path, [], r"\[M33\] inputs after normalization are far from standardized.*clear the cache",
            exc=DataError)


def test_m33_uint8_and_pil_images_from_a_dataset_are_accepted(tmp_path):
    pil = ImagesDataset(pixels=lambda x: Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)))
    final, _ = train(tmp_path, dataset=pil)
    assert final["epochs_run"] == 1


def test_mistakes_from_the_command_line_are_refused_with_the_fix(tmp_path):
    out = run_cli("recipe=smoke", "optim.lr=0.1", f"hydra.run.dir={tmp_path / 'r'}")
    assert out.returncode == 2 and "[M16]" in out.stderr and "optim.allow_unusual_lr=true" in out.stderr
    assert not (tmp_path / "r").exists()
    out = run_cli("recipe=smoke", "data.batch_size=1000", f"hydra.run.dir={tmp_path / 'r2'}")
    assert out.returncode == 2 and "[M23]" in out.stdout + out.stderr  # raised in the job: logged
    assert [p.name for p in (tmp_path / "r2").iterdir()] == ["safetrain.log"]  # only the log


def test_m23_a_recipe_batch_fits_a_small_folder_only_where_the_recipe_says_so(tmp_path, caplog):
    caplog.set_level("INFO", logger="safetrain")
    write_images(tmp_path / "imgs", 2, 40)  # 80 images
    over = [f"data.root={tmp_path / 'imgs'}", "model=cnn_tiny", "trainer.max_epochs=1", "trainer.progress=false"]
    cfg, _ = compose("imagefolder", over)  # batch 256, at most a quarter of the split
    run(cfg, tmp_path / "run")
    n = len(json.loads((tmp_path / "run" / "splits.json").read_text())["train"])
    fitted = max(8, n // 4 // 8 * 8)
    assert f"of the {n} training images: batches of {fitted}" in caplog.text
    assert f"batch_size: {fitted}" in (tmp_path / "run" / "config.yaml").read_text()  # what a resume goes on with
    refused(tmp_path, [*over, "data.max_batch_share=null"], r"\[M23\] data\.batch_size=256 is larger than the "
            r"training split", recipe="imagefolder", exc=ConfigError)
