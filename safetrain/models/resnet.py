"""`resnet`: CIFAR-style ResNets (depth 6n+2: 20, 32, 56, 110) and ResNet-18 with a small-image
stem (3x3 conv, no max-pool). Shapes come from the data facts; the head emits logits."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from safetrain.errors import ConfigError
from safetrain.models.layers import Classifier, ResidualBlock, activation, conv_norm_act, norm, plan_sizes
from safetrain.models.pretrained import StartConfig


@dataclass
class ResNetConfig(StartConfig):
    """model=resnet settings (conf/model/resnet.yaml)."""
    name: str = "resnet"
    depth: int = 18  # 18 (ResNet-18, small-image stem) or 6n+2 (CIFAR ResNet-20/32/56/110)
    base_width: int = 64  # channels of the first stage; doubled at each later stage
    activation: str = "relu"
    norm: str = "batch"
    dropout: float = 0.0

    def check(self) -> None:
        if self.depth != 18 and (self.depth - 2) % 6:
            raise ConfigError(f"[config] model.depth={self.depth}: resnet depths are 18 or 6n+2 "
                              "(20, 32, 44, 56, 110). Pick one of those.")
        self.check_start()


class BasicBlock(ResidualBlock):
    def __init__(self, cin: int, cout: int, stride: int, norm_name: str, act: str):
        super().__init__()
        self.body = nn.Sequential(*conv_norm_act(cin, cout, norm_name, act, stride),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), norm(norm_name, cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(norm_name, cout)))
        self.act = activation(act)

    def zero_init_residual(self) -> None:
        """The branch's last norm starts at 0, so the block starts as the identity and the
        initial logits stay small at any depth (Goyal et al. 2017): loss at step 0 ~ ln(C)."""
        nn.init.zeros_(self.body[-1].weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.skip(x))


class ResNet(Classifier):
    def __init__(self, in_channels: int, num_classes: int, height: int, width: int, depth: int = 18,
                 base_width: int = 64, activation_name: str = "relu", norm_name: str = "batch",
                 dropout: float = 0.0):
        stages = [2, 2, 2, 2] if depth == 18 else [(depth - 2) // 6] * 3  # basic blocks per stage
        sizes = plan_sizes(height, width, len(stages) - 1, f"model=resnet model.depth={depth}")
        layers = conv_norm_act(in_channels, base_width, norm_name, activation_name)  # small-image stem
        cin = base_width
        for i, n in enumerate(stages):  # stage i: base_width * 2**i channels, stride 2 from stage 1 on
            for j in range(n):
                w = base_width * 2 ** i
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1, norm_name, activation_name))
                cin = w
        super().__init__(nn.Sequential(*layers), cin, num_classes, dropout, sizes, init=activation_name)
