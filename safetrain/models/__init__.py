"""Model registry: every builder takes its shapes from the data facts and is initialized here."""
from __future__ import annotations

from torch import nn

from safetrain.models.cnn import CNN
from safetrain.models.layers import init_weights
from safetrain.models.resnet import ResNet


def build_model(name: str, *, channels: int, height: int, width: int, num_classes: int,
                activation: str = "relu", norm: str = "batch", dropout: float = 0.0, **arch) -> nn.Module:
    """`arch` holds the builder's own knobs: cnn(widths, blocks), resnet(depth, base_width)."""
    common = dict(in_channels=channels, num_classes=num_classes, height=height, width=width,
                  activation_name=activation, norm_name=norm, dropout=dropout)
    if name == "cnn":
        model = CNN(widths=list(arch["widths"]), blocks=arch["blocks"], **common)
    elif name == "resnet":
        model = ResNet(depth=arch["depth"], base_width=arch["base_width"], **common)
    else:
        raise ValueError(f"unknown model {name!r}; registered: cnn, resnet")
    init_weights(model, activation)
    for block in model.modules():
        if hasattr(block, "zero_init_residual"):
            block.zero_init_residual()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
