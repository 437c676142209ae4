"""`cnn`: stages of conv-norm-act with 2x2 max-pooling, then global pooling and a linear head.

Shapes come from the data facts; the head emits raw logits [M11]."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from safetrain.errors import check_range
from safetrain.models.layers import Classifier, activation, check_widths, conv_norm_act, norm, plan_sizes
from safetrain.models.pretrained import StartConfig


@dataclass
class CNNConfig(StartConfig):
    """model=cnn settings (conf/model/cnn*.yaml)."""
    name: str = "cnn"
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    blocks: int = 1  # conv-norm-act layers per stage, after the stage's first conv
    activation: str = "relu"
    norm: str = "batch"
    dropout: float = 0.0

    def check(self) -> None:
        check_widths(self.widths)
        check_range("model.blocks", self.blocks, 0, 16)
        self.check_start()


class CNN(Classifier):
    def __init__(self, in_channels: int, num_classes: int, height: int, width: int, widths: list[int],
                 blocks: int = 1, activation_name: str = "relu", norm_name: str = "batch", dropout: float = 0.0):
        sizes = plan_sizes(height, width, len(widths), f"model.widths={list(widths)}")
        layers = conv_norm_act(in_channels, widths[0], norm_name, activation_name)  # stem, full resolution
        cin = widths[0]
        for w in widths:  # (B, cin, H, W) -> (B, w, H/2, W/2): conv, then pool (as airbench)
            layers += [nn.Conv2d(cin, w, 3, 1, 1, bias=False), nn.MaxPool2d(2), norm(norm_name, w),
                       activation(activation_name)]
            for _ in range(blocks):
                layers += conv_norm_act(w, w, norm_name, activation_name)
            cin = w
        super().__init__(nn.Sequential(*layers), cin, num_classes, dropout, sizes, init=activation_name)
