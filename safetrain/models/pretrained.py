"""`model=torchvision`: torchvision's classification models, from scratch or from pretrained weights, offline.

The head is re-made for the data's classes; 1-channel data adapts the first convolution (its weights summed over
the input channels, as fastai and timm do). With pretrained weights the input contract is the weights': their
normalization and resolution [M34, M35]; a weights file that does not fit is refused, naming the keys [M38];
fine-tuning starts with the backbone frozen, BatchNorm statistics included, then trains it at a lower rate [M36,
M37]."""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torchvision
from torch import nn

from safetrain.errors import ConfigError, check_range

log = logging.getLogger(__name__)

ARCHS = tuple(torchvision.models.list_models(module=torchvision.models))  # the classification models


class Contract(NamedTuple):
    """What pretrained weights expect as input."""
    mean: list[float]
    std: list[float]
    size: int  # the resolution they were trained at
    source: str  # where this comes from, for the log


@dataclass
class TorchvisionConfig:
    """model=torchvision settings (conf/model/torchvision.yaml)."""
    name: str = "torchvision"
    arch: str = "resnet18"
    weights: Optional[str] = None  # None: from scratch; DEFAULT: torchvision's (torch's cache); or a .pth file
    init_from: Optional[str] = None  # or a safetrain checkpoint of this arch (e.g. trained on another dataset)
    freeze_epochs: int = 1  # with weights: epochs the backbone stays frozen (BatchNorm too) while the head warms up
    backbone_lr_mult: float = 0.1  # with weights: the backbone's learning rate as a share of optim.lr after that

    def check(self) -> None:
        if self.arch not in ARCHS:
            near = difflib.get_close_matches(self.arch, ARCHS, n=1)
            raise ConfigError(f"[config] model.arch={self.arch!r} is not a torchvision classification model."
                              + (f" Did you mean '{near[0]}'?" if near else "")
                              + " Choose one of torchvision.models.list_models().")
        if self.weights and self.init_from:
            raise ConfigError("[config] model.weights and model.init_from both name starting weights; keep one.")
        if self.init_from and not Path(self.init_from).expanduser().is_file():
            raise ConfigError(f"[config] model.init_from={self.init_from}: no such file. Give a safetrain checkpoint "
                              "(RUN_DIR/checkpoints/best.pt) of a model=torchvision run.")
        if self.weights not in (None, "DEFAULT") and not Path(self.weights).expanduser().is_file():
            raise ConfigError(f"[config] model.weights={self.weights}: no such file. Give a torchvision state dict "
                              "(.pth) for model.arch, model.weights=DEFAULT, or leave it unset to train from scratch.")
        check_range("model.freeze_epochs", self.freeze_epochs, 0, 1000)
        check_range("model.backbone_lr_mult", self.backbone_lr_mult, 1e-4, 1.0, fix=" 0.1 is the usual choice.")

    @property
    def pretrained(self) -> bool:
        return self.weights is not None or self.init_from is not None

    def input_contract(self) -> Optional[Contract]:
        """The normalization and resolution of the weights (torchvision's metadata for this arch, or the data facts
        of the safetrain checkpoint), or None."""
        if not self.pretrained:
            return None
        if self.init_from:
            f = torch.load(Path(self.init_from).expanduser(), map_location="cpu", weights_only=True)["data_facts"]
            mean, std = (f["mean"] * 3, f["std"] * 3) if f["channels"] == 1 else (f["mean"], f["std"])
            return Contract(mean, std, min(f["height"], f["width"]), f"the checkpoint {self.init_from}")
        enum = torchvision.models.get_model_weights(self.arch).DEFAULT
        t = enum.transforms()
        what = f"torchvision's {enum}" if self.weights == "DEFAULT" else f"{self.weights} (as torchvision's {enum})"
        return Contract(list(t.mean), list(t.std), int(t.crop_size[0]), what)


class Torchvision(nn.Module):
    """A torchvision model with a head for this data. `backbone` and `head` split the parameters for fine-tuning;
    `frozen` keeps the backbone's parameters and BatchNorm statistics as they are, whatever train() says."""
    keeps_its_init = True  # torchvision initializes it (or the weights do): build_model leaves it alone

    def __init__(self, in_channels: int, num_classes: int, height: int, width: int, arch: str = "resnet18",
                 weights: Optional[str] = None, init_from: Optional[str] = None, freeze_epochs: int = 1,
                 backbone_lr_mult: float = 0.1, **_):
        super().__init__()
        self.net = torchvision.models.get_model(arch, weights=None)
        if weights is not None:
            load_weights(self.net, arch, weights)
        if init_from is not None:
            load_checkpoint_weights(self.net, arch, init_from)
            weights = init_from
        head_name, old = [(n, m) for n, m in self.net.named_modules() if isinstance(m, nn.Linear)][-1]
        head = nn.Linear(old.in_features, num_classes)
        nn.init.normal_(head.weight, std=1e-3)  # near-0 logits even on large pretrained features (norms of a few
        nn.init.zeros_(head.bias)  # hundred): loss ~ ln(C) at the start [M19], as BiT's zero-initialized head
        self.net.set_submodule(head_name, head)
        self.head_name, self.frozen = head_name, False
        self.freeze_epochs, self.backbone_lr_mult = (freeze_epochs, backbone_lr_mult) if weights else (0, 1.0)
        conv_name, conv = next((n, m) for n, m in self.net.named_modules() if isinstance(m, nn.Conv2d))
        if in_channels != conv.in_channels:
            self.net.set_submodule(conv_name, adapt_first_conv(conv, in_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def head(self) -> list[nn.Parameter]:
        return list(self.net.get_submodule(self.head_name).parameters())

    def backbone(self) -> list[nn.Parameter]:
        mine = {id(p) for p in self.head()}
        return [p for p in self.net.parameters() if id(p) not in mine]

    def on_epoch(self, epoch: int) -> None:
        """Epochs 1..freeze_epochs: backbone frozen; then all layers (the optimizer gives the backbone its lower lr)."""
        if epoch == 1 and self.freeze_epochs:
            log.info("[M36, M37] fine-tuning: the backbone is frozen (its BatchNorm statistics too) for epoch(s) 1-%d "
                     "while the new head warms up (model.freeze_epochs)", self.freeze_epochs)
        if self.backbone_lr_mult < 1 and epoch == self.freeze_epochs + 1:
            log.info("[M36] fine-tuning: from epoch %d every layer trains, the backbone at %gx the head's learning "
                     "rate (model.backbone_lr_mult)", epoch, self.backbone_lr_mult)
        self.frozen = epoch <= self.freeze_epochs
        for p in self.backbone():
            p.requires_grad_(not self.frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # frozen means the statistics too [M37] (the head is one Linear layer)
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def adapt_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The first convolution for 1-channel input: the RGB kernels summed (a gray image as R=G=B gives the same
    response), as fastai and timm do."""
    if in_channels != 1:
        raise ConfigError(f"[config] model=torchvision: {in_channels}-channel images; the first convolution can be "
                          "adapted to 1 channel only.")
    new = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
                    conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def load_weights(net: nn.Module, arch: str, weights: str) -> None:
    """torchvision's DEFAULT weights (from torch's cache) or a state dict file, all keys matching [M38]; the head
    may differ (it is re-made for the data)."""
    if weights == "DEFAULT":
        enum = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            state = enum.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # noqa: BLE001  offline: urllib's errors, or a damaged cached file
            where = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
            raise ConfigError(f"[config] model.weights=DEFAULT: {enum} is not in torch's cache and could not be "
                              f"downloaded ({type(e).__name__}: {str(e)[:100]}). Download {enum.url} once and put it "
                              f"at {where}, or pass the file: model.weights=/path/to/{where.name}.") from None
        what = str(enum)
    else:
        try:
            state = torch.load(Path(weights).expanduser(), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"[M38] model.weights={weights} is not a state dict torch can load safely "
                              f"({type(e).__name__}: {str(e)[:100]}).") from None
        what = weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"[M38] model.weights={weights} is not a plain state dict (name -> tensor). A safetrain "
                          "checkpoint goes in model.init_from instead.")
    _refuse_misfit(net, state, arch, what)
    net.load_state_dict(state, strict=False)


def load_checkpoint_weights(net: nn.Module, arch: str, path: str) -> None:
    """The network of a safetrain model=torchvision checkpoint: same arch; the head may have other classes, and a
    1-channel checkpoint's first convolution is repeated over RGB for 3-channel data (its sum is unchanged)."""
    ckpt = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    model = ckpt.get("config", {}).get("model", {})
    if model.get("name") != "torchvision" or model.get("arch") != arch:
        raise ConfigError(f"[M38] model.init_from={path} holds a model={model.get('name')} "
                          f"{model.get('arch', '')} checkpoint, not model.arch={arch}. Use a checkpoint of that arch.")
    state = {k.removeprefix("net."): v for k, v in ckpt["model"].items()}
    conv = next(n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)) + ".weight"
    if state[conv].shape[1] == 1 and net.state_dict()[conv].shape[1] == 3:
        state[conv] = state[conv].repeat(1, 3, 1, 1) / 3
    _refuse_misfit(net, state, arch, f"model.init_from={path}")
    net.load_state_dict(state, strict=False)


def _refuse_misfit(net: nn.Module, state: dict, arch: str, what: str) -> None:
    own = net.state_dict()
    head = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape and not k.startswith(head + ".")]
    if missing or unexpected or shapes:
        parts = [f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}" for label, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("other shapes", shapes)) if items]
        raise ConfigError(f"[M38] {what} does not fit model.arch={arch}: {'; '.join(parts)}. Loading it would leave "
                          "those layers random. Use the weights file of that architecture.")
    for k in [k for k in own if k.startswith(head + ".") and state[k].shape != own[k].shape]:
        state.pop(k)  # another number of classes: the head is re-made anyway
