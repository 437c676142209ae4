"""`fastcnn`: the network of the CIFAR-10 speed runs (airbench), written for safetrain. Short schedules (a few
epochs) are its purpose: every choice below makes large learning rates safe from the first step.

- a first layer that whitens k x k patches with the training images' own covariance: a measured data fact
  (fitted on the training split by `fit_to_data`, frozen, saved with the weights), so the first stage sees
  decorrelated unit-variance inputs from step one;
- stages of two 3x3 convs (the first followed by 2x2 max-pooling), each conv initialised to pass its input
  through (identity on the first channels: an implicit residual) on top of PyTorch's default init, which the
  published settings were tuned with; BatchNorm learns its shift only (its scale is fixed at 1, so the
  optimizer's bias_lr_mult can move the shifts fast without touching a scale);
- global max-pooling and a linear head without bias, its logits scaled by 1/9 (so the loss starts at ln C);
- on images too small for every stage to halve (8x8 digits), the last stages keep the size they get.
Shapes come from the data facts; the head emits raw logits [M11]."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from safetrain.errors import ConfigError, check_range
from safetrain.models.layers import Classifier, activation, check_widths, norm, plan_sizes
from safetrain.models.pretrained import StartConfig

LOGIT_SCALE = 1 / 9  # airbench's: with its learning rates, larger logits overfit the label smoothing target


@dataclass
class FastCNNConfig(StartConfig):
    """model=fastcnn settings (conf/model/fastcnn.yaml)."""
    name: str = "fastcnn"
    widths: list[int] = field(default_factory=lambda: [64, 256, 256])
    whiten_kernel: int = 2  # side of the whitened patches; the first layer has 2 * channels * k * k outputs
    activation: str = "gelu"
    norm: str = "batch"
    dropout: float = 0.0

    def check(self) -> None:
        check_widths(self.widths)
        check_range("model.whiten_kernel", self.whiten_kernel, 1, 5)
        self.check_start()


class Whitening(nn.Conv2d):
    """A k x k conv, C -> 2 * C * k * k channels: the eigenvectors of the training patches' covariance scaled to
    unit variance, and their negatives (the activation after it then loses no sign). Its weight is a buffer, not a
    parameter: it is measured, never trained."""

    def __init__(self, channels: int, k: int, eps: float = 5e-4):
        super().__init__(channels, 2 * channels * k * k, k, bias=False)
        self.eps = eps
        del self.weight
        self.register_buffer("weight", torch.zeros(2 * channels * k * k, channels, k, k))
        nn.init.dirac_(self.weight[:channels])  # until fitted: the first channels pass the input through

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """`x`: (N, C, H, W) normalized training images (never validation or test ones [M02])."""
        c, k = x.shape[1], self.kernel_size[0]
        patches = x.float().unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        eigenvalues, vectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        w = (vectors.T / torch.sqrt(eigenvalues.clamp_min(0) + self.eps)[:, None]).flip(0).reshape(-1, c, k, k)
        self.weight.copy_(torch.cat([w, -w]))


class GlobalMaxPool(nn.Module):
    """AdaptiveMaxPool2d(1) as a max over the map: the same numbers, and an ONNX ReduceMax on every torch (torch 2.11's
    ONNX exporter has no translation of adaptive_max_pool2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax((2, 3), keepdim=True)


def _identity_conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:cin])
    return conv


def _shift_only(layer: nn.Module) -> nn.Module:
    """A norm layer whose scale stays 1 (a buffer); BatchNorm with a short memory (momentum 0.4) of its batches."""
    weight = layer.weight.detach()
    del layer.weight
    layer.register_buffer("weight", weight)
    if isinstance(layer, nn.BatchNorm2d):
        layer.momentum, layer.eps = 0.4, 1e-12
    return layer


class FastCNN(Classifier):
    """PyTorch's default init + identity convs (above): Classifier's init is not applied (init=None)."""

    def __init__(self, in_channels: int, num_classes: int, height: int, width: int, widths: list[int],
                 whiten_kernel: int = 2, activation_name: str = "gelu", norm_name: str = "batch", dropout: float = 0.0):
        k = whiten_kernel
        if min(height, width) < k:  # 1x1 images (a colour each): the unpadded whitening conv would leave nothing
            raise ConfigError(f"[M10] fastcnn's first layer, a {k}x{k} whitening convolution without padding, needs "
                              f"images of at least {k}x{k}; these are {height}x{width}. Enlarge them with "
                              "data.image_size=8.")
        h, w = height - k + 1, width - k + 1
        pools = min(len(widths), int(math.log2(max(1, min(h, w)))))  # small images: the last stages stop halving
        sizes = plan_sizes(h, w, pools, f"model.widths={list(widths)}")
        layers: list[nn.Module] = [Whitening(in_channels, k), activation(activation_name)]
        cin = 2 * in_channels * k * k
        for i, w in enumerate(widths):
            layers += [_identity_conv(cin, w), nn.MaxPool2d(2) if i < pools else nn.Identity(),
                       _shift_only(norm(norm_name, w)),
                       activation(activation_name), _identity_conv(w, w), _shift_only(norm(norm_name, w)),
                       activation(activation_name)]
            cin = w
        super().__init__(nn.Sequential(*layers), cin, num_classes, dropout, sizes, init=None)
        self.head = nn.Sequential(GlobalMaxPool(), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(cin, num_classes, bias=False))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return super().logits(x) * LOGIT_SCALE

    def fit_to_data(self, images) -> None:
        """The whitening layer, fitted on `images()` (normalized training images)."""
        self.features[0].fit(images())
