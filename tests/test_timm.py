"""model=timm (an optional extra; the dev install has it): any timm model, weights found offline, the input contract
from its pretrained config, fine-tuning as for torchvision's models."""
import pytest
import torch

from safetrain.errors import ConfigError
from safetrain.models import build_model

timm = pytest.importorskip("timm")
from safetrain.models.timmnet import TimmConfig, pretrained_cfg  # noqa: E402

ARCH = "resnet10t"  # a small timm model with Hugging Face weights


def _fake_hub(cache, arch: str = ARCH) -> dict:
    """The local Hugging Face cache as `hf download` leaves it, holding (random) weights of `arch`."""
    from safetensors.torch import save_file
    repo = pretrained_cfg(arch)["hf_hub_id"]
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("abc123")
    state = timm.create_model(arch, num_classes=1000).state_dict()
    save_file(state, str(folder / "snapshots" / "abc123" / "model.safetensors"))
    return state


def test_timm_model_from_scratch_fits_the_data_and_starts_near_chance():
    model = build_model({"name": "timm", "arch": ARCH}, (1, 24, 24), 3)
    out = model(torch.randn(4, 1, 24, 24))
    assert out.shape == (4, 3) and out.abs().max() < 0.1  # the head re-made small: loss ~ ln(C) [M19]
    assert model.freeze_epochs == 0  # from scratch: nothing frozen


def test_timm_weights_from_the_local_hugging_face_cache_nothing_downloaded(tmp_path, monkeypatch):
    import huggingface_hub.constants
    saved = _fake_hub(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_model({"name": "timm", "arch": ARCH, "weights": "hub"}, (3, 32, 32), 5)
    own = model.net.state_dict()
    backbone = [k for k in saved if not k.startswith("fc.")]
    assert all(torch.equal(own[k], saved[k]) for k in backbone)  # loaded whole, the head aside
    assert model.head_layer().out_features == 5 and model.freeze_epochs == 1  # fine-tuning [M36]
    contract = TimmConfig(arch=ARCH, weights="hub").input_contract()  # [M34, M35]: the pretrained config's
    cfg = pretrained_cfg(ARCH)
    assert contract.mean == list(cfg["mean"]) and contract.size == cfg["input_size"][-1]


def test_timm_weights_missing_from_the_cache_say_how_to_get_them(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError) as e:
        build_model({"name": "timm", "arch": ARCH, "weights": "hub"}, (3, 32, 32), 5)
    msg = str(e.value)
    assert "not in the local Hugging Face cache" in msg and "hf download timm/" in msg and "model.weights=/path" in msg


def test_m38_timm_weights_of_another_architecture_are_refused_naming_the_keys(tmp_path):
    torch.save(timm.create_model(ARCH).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ConfigError) as e:
        build_model({"name": "timm", "arch": "resnet18", "weights": str(tmp_path / "w.pth")}, (3, 32, 32), 5)
    assert str(e.value).startswith("[M38]") and "does not fit model.arch=resnet18" in str(e.value)
    assert "downsample" in str(e.value)  # the layers named


def test_timm_settings_are_checked_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="'resnet10' is not a timm model. Did you mean"):
        TimmConfig(arch="resnet10").check()
    with pytest.raises(ConfigError, match="no such file"):
        TimmConfig(arch=ARCH, weights=str(tmp_path / "nope.pth")).check()
