"""`model=torchvision`: torchvision's classification models, from scratch or from pretrained weights, offline.

The head is re-made for the data's classes; 1-channel data adapts the first convolution (its weights summed over
the input channels, as fastai and timm do). With pretrained weights the input contract is the weights': their
normalization and resolution [M34, M35]; a weights file that does not fit is refused, naming the keys [M38];
fine-tuning starts with the backbone frozen, BatchNorm statistics included, then trains it at a lower rate [M36,
M37]."""
from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torchvision
from torch import nn

from safetrain.errors import ConfigError, check_range
from safetrain.models.layers import FineTunable

log = logging.getLogger(__name__)

ARCHS = tuple(torchvision.models.list_models(module=torchvision.models))  # the classification models


class Contract(NamedTuple):
    """What pretrained weights expect as input."""
    mean: list[float]
    std: list[float]
    size: int  # the resolution they were trained at
    source: str  # where this comes from, for the log


START = ("weights", "init_from")  # the model.* settings that name starting weights, not the architecture


def architecture(model_settings: dict) -> dict:
    """A run's model.* settings without its starting weights: a trained model is rebuilt from these and its
    checkpoint's state, so the starting files need not exist any more."""
    return {k: v for k, v in model_settings.items() if k not in START}


@dataclass
class StartConfig:
    """Settings every model has: where training starts from, and how fine-tuning treats the backbone."""
    init_from: Optional[str] = None  # a safetrain checkpoint of this model (e.g. trained on another dataset)
    freeze_epochs: int = 1  # with starting weights: epochs the backbone stays frozen (BatchNorm too) [M36, M37]
    backbone_lr_mult: float = 0.1  # with starting weights: the backbone's lr as a share of optim.lr after that
    tta: bool = False  # evaluate on each image and its mirror, logits averaged (needs data.hflip_keeps_label [M05])
    tta_shift: int = 0  # with tta: the test (predict, export) also averages both moved by this many px each way

    def check_start(self) -> None:
        if self.init_from and not Path(self.init_from).expanduser().is_file():
            raise ConfigError(f"[config] model.init_from={self.init_from}: no such file. Give a safetrain checkpoint "
                              "(RUN_DIR/checkpoints/best.pt) of a run with the same model settings.")
        check_range("model.freeze_epochs", self.freeze_epochs, 0, 1000)
        check_range("model.backbone_lr_mult", self.backbone_lr_mult, 1e-4, 1.0, fix=" 0.1 is the usual choice.")
        check_range("model.tta_shift", self.tta_shift, 0, 4, fix=" 1 is airbench's (1 px each way).")
        if self.tta_shift and not self.tta:
            raise ConfigError(f"[config] model.tta_shift={self.tta_shift} moves the views of model.tta, which is "
                              "false. Use model.tta=true (where mirrors keep the label [M05]) or model.tta_shift=0.")

    def builder_settings(self) -> dict:
        """The settings of safetrain's own builders that this model has (activation, norm, dropout): what the checks
        and the detectors' advice may name. torchvision's models have none."""
        return {k: getattr(self, k) for k in ("activation", "norm", "dropout") if hasattr(self, k)}

    def input_contract(self) -> Optional[Contract]:
        """The normalization and resolution the starting weights expect (a checkpoint's data facts), or None."""
        if not self.init_from:
            return None
        f = torch.load(Path(self.init_from).expanduser(), map_location="cpu", weights_only=True)["data_facts"]
        if not all(math.isfinite(v) for v in f["mean"] + f["std"]) or min(f["std"]) < 1e-3:
            raise ConfigError(f"[M34] model.init_from={self.init_from}: its normalization (mean {f['mean']}, std "
                              f"{f['std']}) is degenerate: that run saw images of (almost) one colour, or the file is "
                              "damaged, and dividing these images by that std would blow them up. Start from a "
                              "checkpoint of a run on real images, or from scratch.")
        mean, std = (f["mean"] * 3, f["std"] * 3) if f["channels"] == 1 else (f["mean"], f["std"])
        return Contract(mean, std, min(f["height"], f["width"]), f"the checkpoint {self.init_from}")


@dataclass
class TorchvisionConfig(StartConfig):
    """model=torchvision settings (conf/model/torchvision.yaml)."""
    name: str = "torchvision"
    arch: str = "resnet18"
    weights: Optional[str] = None  # None: from scratch; DEFAULT: torchvision's (torch's cache); or a .pth file

    def check(self) -> None:
        if self.arch not in ARCHS:
            near = difflib.get_close_matches(self.arch, ARCHS, n=1)
            raise ConfigError(f"[config] model.arch={self.arch!r} is not a torchvision classification model."
                              + (f" Did you mean '{near[0]}'?" if near else "")
                              + " Choose one of torchvision.models.list_models().")
        if self.weights and self.init_from:
            raise ConfigError("[config] model.weights and model.init_from both name starting weights; keep one.")
        if self.weights not in (None, "DEFAULT") and not Path(self.weights).expanduser().is_file():
            raise ConfigError(f"[config] model.weights={self.weights}: no such file. Give a torchvision state dict "
                              "(.pth) for model.arch, model.weights=DEFAULT, or leave it unset to train from scratch.")
        self.check_start()

    def input_contract(self) -> Optional[Contract]:
        """torchvision's metadata for this arch's weights, or what StartConfig says."""
        if not self.weights:
            return super().input_contract()
        enum = torchvision.models.get_model_weights(self.arch).DEFAULT
        t = enum.transforms()
        what = f"torchvision's {enum}" if self.weights == "DEFAULT" else f"{self.weights} (as torchvision's {enum})"
        return Contract(list(t.mean), list(t.std), int(t.crop_size[0]), what)


class Torchvision(FineTunable):
    """A torchvision model with a head for this data; its weights, if given, loaded whole [M38]. torchvision
    initializes it (or the weights do)."""

    def __init__(self, in_channels: int, num_classes: int, height: int, width: int, arch: str = "resnet18",
                 weights: Optional[str] = None, **_):
        super().__init__()
        self.net = torchvision.models.get_model(arch, weights=None)
        if weights is not None:
            load_weights(self.net, arch, weights)
        head_name, old = [(n, m) for n, m in self.net.named_modules() if isinstance(m, nn.Linear)][-1]
        head = nn.Linear(old.in_features, num_classes)
        nn.init.normal_(head.weight, std=1e-3)  # near-0 logits even on large pretrained features (norms of a few
        nn.init.zeros_(head.bias)  # hundred): loss ~ ln(C) at the start [M19], as BiT's zero-initialized head
        self.net.set_submodule(head_name, head)
        self.head_name = head_name
        conv_name, conv = next((n, m) for n, m in self.net.named_modules() if isinstance(m, nn.Conv2d))
        if in_channels != conv.in_channels:
            self.net.set_submodule(conv_name, adapt_first_conv(conv, in_channels))
            log.info("model: %s's first convolution (%s) takes 1-channel images: its RGB kernels summed, so a gray "
                     "image gives the response the weights give it as R=G=B", arch, conv_name)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def head_layer(self) -> nn.Module:
        return self.net.get_submodule(self.head_name)


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
    head = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1] + "."
    _refuse_misfit(net.state_dict(), state, head, what, f"model.arch={arch}")
    net.load_state_dict(state, strict=False)


def start_from(model: FineTunable, path: str, settings: dict, classes: Optional[list[str]]) -> None:
    """`model.init_from`: the weights of a safetrain checkpoint whose model settings are these (starting points
    aside). The head is kept when the classes are the same ones, else it stays new; a first convolution trained on
    the other channel count is summed over RGB (1 channel) or spread over it (3 channels) [M38]."""
    ckpt = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    saved = {k: v for k, v in architecture(ckpt["config"]["model"]).items()  # what decides the weights' shapes
             if k not in ("freeze_epochs", "backbone_lr_mult", "tta", "tta_shift")}
    if saved != {k: v for k, v in architecture(settings).items() if k in saved} or saved.keys() - settings.keys():
        raise ConfigError(f"[M38] model.init_from={path} was trained with model settings {saved}, which are not "
                          f"these ({architecture(settings)}): its weights would not fit. Use the same model.* "
                          "settings.")
    own, state = model.state_dict(), dict(ckpt["model"])
    head = [n for n, m in model.named_modules() if m is model.head_layer()][0] + "."
    if ckpt["data_facts"]["classes"] != classes:  # other classes: a new head
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    conv = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)) + ".weight"
    if conv in state and state[conv].shape[1] != own[conv].shape[1]:
        state[conv] = (state[conv].sum(1, keepdim=True) if own[conv].shape[1] == 1 else
                       state[conv].repeat(1, own[conv].shape[1], 1, 1) / own[conv].shape[1])
    _refuse_misfit(own, state, head, f"model.init_from={path}", "this model")
    model.load_state_dict(state, strict=False)


def _refuse_misfit(own: dict, state: dict, head: str, what: str, target: str) -> None:
    """Every tensor of `own` (a state dict) in `state` with its shape, the head's (keys under `head`) aside [M38]."""
    missing = [k for k in own if k not in state and not k.startswith(head)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape and not k.startswith(head)]
    if missing or unexpected or shapes:
        parts = [f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}" for label, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("other shapes", shapes)) if items]
        raise ConfigError(f"[M38] {what} does not fit {target}: {'; '.join(parts)}. Loading it would leave "
                          "those layers random. Use the weights of that architecture.")
    for k in [k for k in own if k.startswith(head) and k in state and state[k].shape != own[k].shape]:
        state.pop(k)  # another number of classes: the head is re-made anyway
