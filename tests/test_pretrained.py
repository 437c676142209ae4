"""model=torchvision: every arch from the data facts, pretrained weights loaded whole or refused, the weights' own
input contract, and fine-tuning that keeps a frozen backbone frozen. Offline: weights files are made in the test."""
import json
import logging
import shutil
import urllib.error

import pytest
import torch
import torchvision

from safetrain.checkpoint import load_checkpoint, load_classifier
from safetrain.cli import compose
from safetrain.config import validate_after_training
from safetrain.errors import ConfigError
from safetrain.export import export
from safetrain.models import build_model
from safetrain.run import run
from safetrain.stages import build_training, preflight, prepare_data, start
from tests.conftest import write_images

ARCHS = ["resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
         "regnet_y_400mf"]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_listed_arch_builds_for_the_data_facts(arch):
    for channels, classes in ((1, 3), (3, 17)):
        model = build_model({"name": "torchvision", "arch": arch}, (channels, 32, 32), classes).eval()
        assert model(torch.zeros(2, channels, 32, 32)).shape == (2, classes)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """torchvision-format state dicts (random, as if downloaded): mobilenet_v3_small and resnet18."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    for arch in ("mobilenet_v3_small", "resnet18"):
        torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), folder / f"{arch}.pth")
    return folder


def _tv(arch: str, weights) -> dict:
    return {"name": "torchvision", "arch": arch, "weights": str(weights)}


def test_m38_weights_load_whole_or_are_refused_naming_the_keys(weights):
    state = torch.load(weights / "mobilenet_v3_small.pth", weights_only=True)
    model = build_model(_tv("mobilenet_v3_small", weights / "mobilenet_v3_small.pth"), (3, 32, 32), 5)
    own = model.net.state_dict()
    for k, v in state.items():
        if not k.startswith(model.head_name + "."):
            assert torch.equal(own[k], v), k  # every backbone tensor as in the file
    assert own[f"{model.head_name}.weight"].shape == (5, 1024)  # the head re-made for 5 classes
    with pytest.raises(ConfigError, match=r"\[M38\].*does not fit model.arch=mobilenet_v3_small: missing keys "
                                          r"\['features.0.0.weight'.*unexpected keys \['conv1.weight'"):
        build_model(_tv("mobilenet_v3_small", weights / "resnet18.pth"), (3, 32, 32), 5)
    half = {k: v for i, (k, v) in enumerate(state.items()) if i % 7}  # a file missing some layers
    torch.save(half, weights / "half.pth")
    with pytest.raises(ConfigError, match=r"\[M38\].*missing keys"):
        build_model(_tv("mobilenet_v3_small", weights / "half.pth"), (3, 32, 32), 5)


def test_grayscale_data_sums_the_first_convolution_over_rgb(weights):
    rgb = build_model(_tv("resnet18", weights / "resnet18.pth"), (3, 32, 32), 4)
    gray = build_model(_tv("resnet18", weights / "resnet18.pth"), (1, 32, 32), 4)
    assert torch.allclose(gray.net.conv1.weight, rgb.net.conv1.weight.sum(1, keepdim=True))
    x = torch.rand(2, 1, 32, 32)  # a gray image fed as R=G=B gives the same features
    body = lambda m, v: torch.nn.Sequential(*list(m.net.children())[:-1])(v)  # noqa: E731
    assert torch.allclose(body(gray.eval(), x), body(rgb.eval(), x.expand(-1, 3, -1, -1)), atol=1e-5)


def _folder_run_cfg(tmp_path, weights, extra=()):
    root = write_images(tmp_path / "imgs", classes=2, per_class=24, size=(40, 40))
    shutil.copy(weights / "mobilenet_v3_small.pth", tmp_path / "w.pth")  # removed after training by a test
    cfg, _ = compose("smoke", ["model=torchvision", "model.arch=mobilenet_v3_small",
                               f"model.weights={tmp_path / 'w.pth'}", "data=imagefolder",
                               f"data.root={root}", "data.batch_size=8", "trainer.progress=false", *extra])
    return cfg


def test_m34_m35_pretrained_weights_bring_their_normalization_and_resolution(weights, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = _folder_run_cfg(tmp_path, weights, ["trainer.max_epochs=1"])
    final = run(cfg, tmp_path / "run")
    facts = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["data_facts"]
    assert facts["mean"] == pytest.approx(IMAGENET_MEAN) and facts["std"] == pytest.approx(IMAGENET_STD)  # [M34]
    assert (facts["height"], facts["width"]) == (224, 224)  # resized to the weights' resolution [M35]
    assert "normalization from" in caplog.text and "not the data's own statistics" in caplog.text
    (tmp_path / "w.pth").unlink()  # inference needs the checkpoint only, not the starting weights
    normalize = load_classifier(tmp_path / "run" / "checkpoints" / "best.pt")[0]  # and uses the same statistics
    assert normalize.mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    exported = export(validate_after_training(["mode=export", f"predict.checkpoint={tmp_path / 'run'}",
                                               f"predict.output={tmp_path / 'exp'}"]))
    meta = json.loads((exported / "model.json").read_text())
    assert meta["input"]["shape"] == ["N", 3, 224, 224] and meta["parity"]["images"].endswith("test split")
    import onnx
    dims = onnx.load(exported / "model.onnx").graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][1:] == [3, 224, 224]  # traced on the run's images as it saw them
    assert not [w for w in final["warnings"] if w.startswith("[M35]")]
    small = _folder_run_cfg(tmp_path / "s", weights, ["data.image_size=56", "trainer.max_epochs=1",
                                                      "data=imagefolder"])
    warned = run(small, tmp_path / "small")["warnings"]
    assert any(w.startswith("[M35] the images are 56x56, 4.0x below the 224x224") for w in warned)


def test_m34_grayscale_data_takes_the_weights_statistics_averaged(weights, tmp_path):
    cfg, _ = compose("smoke", ["model=torchvision", "model.arch=resnet18", f"model.weights={weights / 'resnet18.pth'}",
                               "data.synthetic.channels=1", "trainer.progress=false"])
    facts = prepare_data(start(cfg)).facts
    assert facts.mean == pytest.approx([sum(IMAGENET_MEAN) / 3]) and facts.std == pytest.approx([sum(IMAGENET_STD) / 3])


def test_m36_m37_the_frozen_backbone_stays_as_loaded_then_trains_at_a_lower_rate(weights, tmp_path):
    common = ["model=torchvision", "model.arch=resnet18", f"model.weights={weights / 'resnet18.pth'}",
              "model.freeze_epochs=1", "model.backbone_lr_mult=0.1", "trainer.progress=false",
              "trainer.early_stop_patience=0"]
    cfg, _ = compose("smoke", [*common, "trainer.max_epochs=2"])
    setup = build_training(start(cfg), prepare_data(start(cfg)))
    lrs = sorted({g["lr"] for g in setup.optimizer.param_groups})
    assert lrs == pytest.approx([1e-4, 1e-3])  # the backbone at 0.1x the head's rate [M36]
    run(compose("smoke", [*common, "trainer.max_epochs=1"])[0], tmp_path / "one")
    file = torch.load(weights / "resnet18.pth", weights_only=True)
    after = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")["model"]
    backbone = [k for k in file if not k.startswith("fc.")]
    assert all(torch.equal(after[f"net.{k}"], file[k]) for k in backbone)  # weights and BatchNorm statistics [M37]
    assert not torch.equal(after["net.fc.weight"][:, :8], torch.zeros(4, 8))  # ... while the head learned
    run(cfg, tmp_path / "two")
    later = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")["model"]
    assert not torch.equal(later["net.layer1.0.conv1.weight"], file["layer1.0.conv1.weight"])  # then it trains
    assert not torch.equal(later["net.bn1.running_mean"], file["bn1.running_mean"])


def test_default_weights_offline_say_where_to_put_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError, match=r"model.weights=DEFAULT: ResNet18_Weights.IMAGENET1K_V1 is not in torch's "
                                          r"cache.*put it at .*torch/hub/checkpoints/resnet18-f37072fd\.pth"):
        build_model({"name": "torchvision", "arch": "resnet18", "weights": "DEFAULT"}, (3, 32, 32), 2)


def test_settings_of_the_torchvision_model_are_checked():
    with pytest.raises(ConfigError, match=r"model.arch='resnet81' is not a torchvision classification model. Did "
                                          r"you mean 'resnet18'"):
        compose("smoke", ["model=torchvision", "model.arch=resnet81"])
    with pytest.raises(ConfigError, match=r"model.weights=/nope.pth: no such file"):
        compose("smoke", ["model=torchvision", "model.weights=/nope.pth"])
    with pytest.raises(ConfigError, match="unknown setting 'model.dropout'"):
        compose("smoke", ["model=torchvision", "model.dropout=0.2"])


def test_init_from_a_safetrain_checkpoint_of_other_data(tmp_path):
    first, _ = compose("smoke", ["model=torchvision", "model.arch=regnet_y_400mf", "trainer.max_epochs=1",
                                 "trainer.progress=false"])
    run(first, tmp_path / "a")  # 4 classes, 16x16
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoints" / "best.pt")
    cfg, _ = compose("smoke", ["model=torchvision", "model.arch=regnet_y_400mf", "data.synthetic.classes=3",
                               f"model.init_from={tmp_path / 'a' / 'checkpoints' / 'best.pt'}", "seed=3",
                               "trainer.progress=false"])
    data = prepare_data(start(cfg))
    assert data.facts.mean == ckpt["data_facts"]["mean"]  # the checkpoint's normalization, not this data's [M34]
    model = build_training(start(cfg), data).model
    own = model.state_dict()
    assert all(torch.equal(own[k].cpu(), v) for k, v in ckpt["model"].items() if not k.startswith("net.fc."))
    assert own["net.fc.weight"].shape[0] == 3  # the head re-made for 3 classes
    other, _ = compose("smoke", ["model=torchvision", "model.arch=resnet18",
                                 f"model.init_from={tmp_path / 'a' / 'checkpoints' / 'best.pt'}"])
    with pytest.raises(ConfigError, match=r"\[M38\].*was trained with model settings .*regnet_y_400mf.*which are "
                                          r"not these"):
        build_training(start(other), prepare_data(start(other)))


def test_init_from_works_for_safetrain_models_and_keeps_the_head_for_the_same_classes(tmp_path):
    first, _ = compose("smoke", ["trainer.progress=false"])  # model=cnn, 4 classes
    run(first, tmp_path / "a")
    path = tmp_path / "a" / "checkpoints" / "best.pt"
    ckpt = load_checkpoint(path)
    same, _ = compose("smoke", [f"model.init_from={path}", "trainer.progress=false"])
    ctx = start(same)
    data = prepare_data(ctx)
    setup = build_training(ctx, data)
    model = setup.model
    assert all(torch.equal(model.state_dict()[k].cpu(), v) for k, v in ckpt["model"].items())  # head kept too
    m19 = next(c for c in preflight(ctx, data, setup) if c.row == "M19")  # the kept head already knows the classes:
    assert m19.evidence["loss"] < 0.5 * m19.evidence["chance"] and m19.passed  # no false [M19] alarm
    assert "starts from" in m19.message
    assert model.freeze_epochs == 1 and model.backbone_lr_mult == 0.1
    other, _ = compose("smoke", [f"model.init_from={path}", "data.synthetic.classes=3", "trainer.progress=false"])
    model = build_training(start(other), prepare_data(start(other))).model
    assert model.head_layer().weight.shape[0] == 3
    assert all(torch.equal(model.state_dict()[k].cpu(), v) for k, v in ckpt["model"].items() if "head" not in k)
    wider, _ = compose("smoke", [f"model.init_from={path}", "model.widths=[8,16,32]", "trainer.progress=false"])
    with pytest.raises(ConfigError, match=r"\[M38\].*was trained with model settings"):
        build_training(start(wider), prepare_data(start(wider)))
