"""Builders infer shapes from the data, emit logits, and are initialized by the rules."""
import math

import pytest
import torch
from torch import nn

from safetrain.errors import ConfigError
from safetrain.models import build_model, model_settings


@pytest.mark.parametrize("name,arch", [("cnn", dict(widths=[8, 16], blocks=1)),
                                       ("resnet", dict(depth=20, base_width=8)),
                                       ("resnet", dict(depth=18, base_width=8)),
                                       ("fastcnn", dict(widths=[8, 16]))])
@pytest.mark.parametrize("c,h,w,k", [(1, 8, 8, 3), (3, 28, 28, 10), (3, 40, 56, 7)])
def test_builders_take_every_shape_from_the_data(name, arch, c, h, w, k):
    model = build_model({"name": name, **arch}, (c, h, w), k)
    out = model(torch.randn(2, c, h, w))
    assert out.shape == (2, k)
    assert isinstance(list(model.modules())[-1], nn.Linear)  # raw logits: no activation after the head


def test_plan_that_pools_below_1x1_is_refused_with_sizes_per_stage():
    with pytest.raises(ConfigError, match=r"\[M10\].*8x8 -> 4x4 -> 2x2 -> 1x1 -> 0x0.*at most 3"):
        build_model({"name": "cnn", "widths": [4, 4, 4, 4], "blocks": 0}, (1, 8, 8), 2)


def test_images_of_one_pixel_are_refused_by_fastcnn_with_the_fix_and_shifted_without_a_crash():
    """A folder of 1x1 images (a colour each): the crop's reflect padding and fastcnn's 2x2 whitening conv failed
    with tracebacks (padding size; max() of an empty sequence)."""
    from safetrain.data.pipelines import batch_crop

    with pytest.raises(ConfigError, match=r"\[M10\] fastcnn's first layer.*these are 1x1\. Enlarge them with "
                                          r"data\.image_size=8\.$"):
        build_model({"name": "fastcnn", "widths": [8, 8, 8]}, (3, 1, 1), 2)
    x = torch.rand(4, 3, 1, 1)
    torch.testing.assert_close(batch_crop(x, 1, torch.Generator().manual_seed(0)), x)  # a shift of one colour
    assert build_model({"name": "fastcnn", "widths": [8, 8, 8]}, (3, 8, 8), 2)(torch.rand(2, 3, 8, 8)).shape == (2, 2)


@pytest.mark.parametrize("act,gain", [("relu", math.sqrt(2)), ("leaky_relu", math.sqrt(2 / (1 + 0.01 ** 2))),
                                      ("prelu", math.sqrt(2 / (1 + 0.25 ** 2)))])
def test_kaiming_init_matches_the_activation(act, gain):
    torch.manual_seed(0)
    model = build_model({"name": "cnn", "widths": [64, 128], "blocks": 1, "activation": act}, (3, 16, 16), 5)
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx(gain / math.sqrt(fan_out), rel=0.05)
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)][0]
    bound = math.sqrt(6 / (lin.in_features + lin.out_features))  # Xavier uniform
    assert lin.weight.abs().max().item() <= bound and lin.weight.abs().max().item() > 0.8 * bound
    assert torch.all(lin.bias == 0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_group_norm_option_replaces_batch_norm():
    model = build_model({"name": "cnn", "widths": [8], "blocks": 1, "norm": "group"}, (3, 8, 8), 2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


@pytest.mark.parametrize("name,arch", [("cnn", dict(widths=[24, 48, 96], blocks=1)),
                                       ("resnet", dict(depth=20, base_width=16)),
                                       ("resnet", dict(depth=56, base_width=16)),
                                       ("resnet", dict(depth=18, base_width=32)),
                                       ("fastcnn", dict(widths=[32, 128, 128]))])
def test_initial_loss_is_near_chance(name, arch):
    torch.manual_seed(0)
    model = build_model({"name": name, **arch}, (3, 32, 32), 10)
    loss = nn.functional.cross_entropy(model(torch.randn(64, 3, 32, 32)), torch.randint(0, 10, (64,)))
    assert abs(loss.item() - math.log(10)) < 0.25


def test_fastcnn_whitening_is_fitted_to_the_data_and_never_trained():
    """The first layer decorrelates the training patches to unit variance; it is a buffer (saved, not trained),
    and fine-tuning's unfreezing does not make it (or the fixed BatchNorm scales) trainable."""
    torch.manual_seed(0)
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.5, 0.4], [0.0, 0.0, 0.3]])  # strongly correlated channels
    x = torch.einsum("ij,bjhw->bihw", mix, torch.randn(400, 3, 12, 12))
    x = x + torch.roll(x, 1, dims=3)  # and correlated neighbours
    model = build_model({"name": "fastcnn", "widths": [8], "init_from": None}, (3, 12, 12), 4)
    whitening = model.features[0]
    whitening.fit(x)
    out = nn.functional.conv2d(x, whitening.weight[:12])  # the 12 eigen-directions (the rest: their negatives)
    cov = torch.cov(out.permute(1, 0, 2, 3).reshape(12, -1))
    assert torch.allclose(cov, torch.eye(12), atol=0.05)
    assert torch.equal(whitening.weight[12:], -whitening.weight[:12])
    assert "features.0.weight" in model.state_dict()
    assert all(p is not whitening.weight for p in model.parameters())
    model.fine_tune(1, 0.1)
    model.on_epoch(2)  # the backbone unfrozen
    fixed = {n for n, _ in model.named_buffers()}
    assert {"features.0.weight", "features.4.weight"} <= fixed  # whitening, first BatchNorm's scale
    assert all(p.requires_grad for p in model.parameters())


def test_tta_averages_each_image_with_its_mirror_in_eval_only():
    torch.manual_seed(0)
    model = build_model({"name": "cnn", "widths": [8], "tta": True}, (3, 8, 8), 3).eval()
    x = torch.randn(4, 3, 8, 8)
    plain = build_model({"name": "cnn", "widths": [8]}, (3, 8, 8), 3).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(x), (plain(x) + plain(x.flip(-1))) / 2, atol=1e-6)
        assert not torch.allclose(model(x), plain(x), atol=1e-4)
        model.train()
        plain.train()
        assert torch.allclose(model(x), plain(x), atol=1e-6)  # training sees single images


def test_tta_shift_adds_the_moved_views_to_the_test_but_not_to_validation():
    torch.manual_seed(0)
    model = build_model({"name": "cnn", "widths": [8], "tta": True, "tta_shift": 1}, (3, 8, 8), 3).eval()
    plain = build_model({"name": "cnn", "widths": [8]}, (3, 8, 8), 3).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 8, 8)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [x, padded[..., :8, :8], padded[..., 2:, 2:]]
    with torch.no_grad():
        both = [(plain(v) + plain(v.flip(-1))) / 2 for v in views]
        assert torch.allclose(model(x), (both[0] + (both[1] + both[2]) / 2) / 2, atol=1e-6)  # 6 views
        model.eval_views("mirror")  # validation in training
        assert torch.allclose(model(x), both[0], atol=1e-6)
        model.eval_views("one")  # the pass over the training images after training
        assert torch.allclose(model(x), plain(x), atol=1e-6)


def test_tta_shift_without_tta_is_refused():
    with pytest.raises(ConfigError, match=r"model\.tta_shift=1 moves the views of model\.tta, which is false"):
        model_settings({"name": "cnn", "widths": [8], "tta_shift": 1}).check()
