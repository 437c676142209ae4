"""Model registry: every builder takes its shapes from the data facts and is initialized here.

Adding a model: one file with its settings dataclass and an nn.Module class taking (in_channels, num_classes,
height, width, activation_name, norm_name, dropout, *its settings*), one line in MODELS, one conf/model/*.yaml."""
from __future__ import annotations

from torch import nn

from safetrain.errors import ConfigError
from safetrain.models.cnn import CNN, CNNConfig
from safetrain.models.fastcnn import FastCNN, FastCNNConfig
from safetrain.models.layers import init_weights
from safetrain.models.pretrained import Torchvision, TorchvisionConfig, start_from
from safetrain.models.resnet import ResNet, ResNetConfig

MODELS = {"cnn": (CNNConfig, CNN), "resnet": (ResNetConfig, ResNet),  # model=NAME -> (settings, builder)
          "fastcnn": (FastCNNConfig, FastCNN), "torchvision": (TorchvisionConfig, Torchvision)}


def build_model(name: str, *, channels: int, height: int, width: int, num_classes: int,
                activation: str = "relu", norm: str = "batch", dropout: float = 0.0, init_from: str | None = None,
                freeze_epochs: int = 1, backbone_lr_mult: float = 0.1, tta: bool = False,
                classes: list[str] | None = None, **arch) -> nn.Module:
    """`arch` holds the builder's own settings: cnn(widths, blocks), resnet(depth, base_width), torchvision(arch,
    weights). Starting weights (model.weights, model.init_from: `classes` decide whether its head is kept) make it
    a fine-tuning: the backbone frozen for `freeze_epochs`, then trained at `backbone_lr_mult` x the lr. `tta`:
    in eval mode the model returns the mean logits of each image and its mirror (what export writes too)."""
    if name not in MODELS:
        raise ConfigError(f"[config] model={name!r} is not a model; choose one of {list(MODELS)}.")
    model = MODELS[name][1](in_channels=channels, num_classes=num_classes, height=height, width=width,
                            activation_name=activation, norm_name=norm, dropout=dropout, **arch)
    if not getattr(model, "keeps_its_init", False):  # torchvision's own init, or pretrained weights
        init_weights(model, activation)
        for block in model.modules():
            if hasattr(block, "zero_init_residual"):
                block.zero_init_residual()
    if init_from:
        start_from(model, init_from, {"name": name, "activation": activation, "norm": norm, "dropout": dropout,
                                      **arch}, classes)
    if init_from or arch.get("weights"):
        model.fine_tune(freeze_epochs, backbone_lr_mult)
    model.flip_tta = tta
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
