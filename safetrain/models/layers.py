"""Building blocks shared by the builders: norm and activation by name, init, shape plans."""
from __future__ import annotations

import math

from torch import nn

from safetrain.errors import ConfigError

# model.activation: name -> (layer, (nonlinearity, negative slope) for the Kaiming init that matches it [M19])
ACTIVATIONS = {"relu": (nn.ReLU, ("relu", 0.0)), "leaky_relu": (lambda: nn.LeakyReLU(0.01), ("leaky_relu", 0.01)),
               "prelu": (nn.PReLU, ("leaky_relu", 0.25)), "gelu": (nn.GELU, ("relu", 0.0)),
               "silu": (nn.SiLU, ("relu", 0.0))}
BN_MIN_BATCH = 8  # BatchNorm statistics of fewer samples are too noisy to train with [M12]
# model.norm: name -> layer for a number of channels; group norm is batch-size independent [M12]
NORMS = {"batch": nn.BatchNorm2d, "group": lambda channels: nn.GroupNorm(math.gcd(32, channels), channels)}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name][0]()


def norm(name: str, channels: int) -> nn.Module:
    return NORMS[name](channels)


def conv_norm_act(cin: int, cout: int, norm_name: str, act: str, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm(norm_name, cout), activation(act)]


class Classifier(nn.Module):
    """`features` (B, C, H, W) -> (B, F, h, w), then global average pooling and one linear layer:
    (B, num_classes) raw logits, no activation after it [M11]; the loss owns the link function."""

    def __init__(self, features: nn.Module, feature_channels: int, num_classes: int, dropout: float,
                 sizes: list[tuple[int, int]]):
        super().__init__()
        self.features, self.sizes = features, sizes
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(feature_channels, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def init_weights(model: nn.Module, act: str) -> None:
    """Kaiming for convs (matching the activation and its slope), Xavier for linear layers,
    zero biases, norm weights 1 and biases 0 (residual blocks then zero their last norm)."""
    nonlinearity, slope = ACTIVATIONS[act][1]
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=slope, mode="fan_out", nonlinearity=nonlinearity)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            nn.init.zeros_(m.bias)


def plan_sizes(height: int, width: int, halvings: int, what: str) -> list[tuple[int, int]]:
    """Spatial size after each of `halvings` stride-2 stages; refuse a plan that pools below 1x1 [M10]."""
    sizes = [(height, width)]
    for _ in range(halvings):
        h, w = sizes[-1]
        sizes.append((h // 2, w // 2))
    if min(sizes[-1]) < 1:
        trail = " -> ".join(f"{h}x{w}" for h, w in sizes)
        ok = max(i for i, (h, w) in enumerate(sizes) if min(h, w) >= 1)
        raise ConfigError(f"[M10] {what} halves the image {halvings} times: {trail}, below 1x1 for "
                          f"{height}x{width} inputs. Use at most {ok} downsampling stages for this image size "
                          "(or data.image_size=N to resize the images).")
    return sizes
