"""Building blocks shared by the builders: norm and activation by name, init, shape plans, the fine-tunable
backbone + head split every model has."""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from safetrain.errors import ConfigError

log = logging.getLogger(__name__)

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


class Model(nn.Module):
    """What a model may offer the trainer, each with a default that does nothing, so the trainer calls them on every
    model without asking (`hooks` gives a user's plain nn.Module these defaults). A new model overrides what it
    needs; its weights are its constructor's to set (Classifier initializes them there, before anything a subclass
    loads after `super().__init__()`)."""
    sizes: Optional[list[tuple[int, int]]] = None  # (H, W) after each downsampling stage, for the log
    backbone_lr_mult = 1.0  # below 1: fine-tuning, the backbone learns at this share of the lr [M36]

    def fit_to_data(self, images: Callable[[], Tensor]) -> None:
        """Fit layers that are measured on the data, not trained (fastcnn's whitening): `images()` gives normalized
        training images (never validation or test ones [M02]). Not called when the model starts from weights."""

    def on_epoch(self, epoch: int) -> None:
        """Called before each training epoch (1-based): changes in what trains (fine-tuning's frozen backbone)."""

    def eval_views(self, which: str) -> None:
        """Which test-time views evaluation averages: "all" (model.tta and model.tta_shift's: the test, predict,
        export), "mirror" (the image and its mirror: validation in every epoch, 3x cheaper than 6 views) or "one"
        (the pass over the training images after training)."""


_PLAIN = Model()  # the hooks of a model that is not a safetrain Model: all defaults


def hooks(model: nn.Module) -> Model:
    """`model`'s hooks: its own, or the defaults for a user's nn.Module that is not a safetrain Model."""
    return model if isinstance(model, Model) else _PLAIN


class FineTunable(Model):
    """A backbone and a head (`head_layer()`, one Linear). Given starting weights (`fine_tune`), epochs
    1..freeze_epochs train the head alone, the backbone's parameters and BatchNorm statistics frozen whatever
    train() says [M37]; then every layer trains, the backbone at backbone_lr_mult x the lr (optim.param_groups)
    [M36]. Without starting weights nothing is frozen and every layer has the one lr."""
    freeze_epochs, frozen = 0, False
    flip_tta = False  # model.tta: evaluation averages the logits of each image and of its mirror
    tta_shift = 0  # model.tta_shift: ... and of both moved diagonally by this many pixels, each way (airbench's)
    views = "all"  # eval_views

    def logits(self, x):
        raise NotImplementedError

    def forward(self, x):
        if self.training or not self.flip_tta or self.views == "one":
            return self.logits(x)
        mirrored = (self.logits(x) + self.logits(x.flip(-1))) / 2
        if not self.tta_shift or self.views == "mirror":
            return mirrored
        p, (h, w) = self.tta_shift, x.shape[-2:]
        padded = F.pad(x, (p, p, p, p), mode="reflect")
        moved = [padded[..., :h, :w], padded[..., 2 * p:, 2 * p:]]  # up-left and down-right
        return (mirrored + sum(self.logits(v) + self.logits(v.flip(-1)) for v in moved) / 4) / 2

    def eval_views(self, which: str) -> None:
        self.views = which

    def head_layer(self) -> nn.Module:
        raise NotImplementedError

    def fine_tune(self, freeze_epochs: int, backbone_lr_mult: float) -> None:
        self.freeze_epochs, self.backbone_lr_mult = freeze_epochs, backbone_lr_mult

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head_layer().parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    def on_epoch(self, epoch: int) -> None:
        if epoch == 1 and self.freeze_epochs:
            log.info("[M36, M37] fine-tuning: the backbone is frozen (its BatchNorm statistics too) for epoch(s) 1-%d "
                     "while the new head warms up (model.freeze_epochs)", self.freeze_epochs)
        if self.backbone_lr_mult < 1 and epoch == self.freeze_epochs + 1:
            log.info("[M36] fine-tuning: from epoch %d every layer trains, the backbone at %gx the head's learning "
                     "rate (model.backbone_lr_mult)", epoch, self.backbone_lr_mult)
        self.frozen = epoch <= self.freeze_epochs
        for p in self.backbone_parameters():
            p.requires_grad_(not self.frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # frozen means the statistics too [M37] (the head is one Linear layer)
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


class Classifier(FineTunable):
    """`features` (B, C, H, W) -> (B, F, h, w), then global average pooling and one linear layer:
    (B, num_classes) raw logits, no activation after it [M11]; the loss owns the link function. The constructor
    initializes every layer for the activation `init` [M19] (None: the layers keep PyTorch's init and whatever
    `features` came with); a subclass that loads weights does so after `super().__init__()`, and keeps them."""

    def __init__(self, features: nn.Module, feature_channels: int, num_classes: int, dropout: float,
                 sizes: list[tuple[int, int]], init: Optional[str] = "relu"):
        super().__init__()
        self.features, self.sizes = features, sizes
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(feature_channels, num_classes))
        if init is not None:
            init_weights(self, init)

    def logits(self, x):
        return self.head(self.features(x))

    def head_layer(self) -> nn.Module:
        return self.head[-1]


class ResidualBlock(nn.Module):
    """A block `act(body(x) + skip(x))` whose branch can start at zero (init_weights calls it)."""

    def zero_init_residual(self) -> None:
        raise NotImplementedError


def init_weights(model: nn.Module, act: str) -> None:
    """Kaiming for convs (matching the activation and its slope), Xavier for linear layers,
    zero biases, norm weights 1 and biases 0; then residual blocks zero their last norm."""
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
    for block in model.modules():
        if isinstance(block, ResidualBlock):
            block.zero_init_residual()


def check_widths(widths: list[int]) -> None:
    if not widths or min(widths) < 1:
        raise ConfigError(f"[config] model.widths={widths} needs at least one positive width.")


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
