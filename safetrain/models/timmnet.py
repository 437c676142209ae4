"""`model=timm` (the optional extra `pip install 'safetrain[timm]'`): any timm model by name, from scratch or from
pretrained weights found offline: the local Hugging Face cache (`model.weights=hub`) or a file. Nothing is downloaded
at run time. The head is re-made for the data's classes, 1-channel data adapts the first convolution (timm sums its
RGB kernels); with weights the input contract is the model's pretrained config: its normalization and resolution
[M34, M35]; weights that do not fit are refused, naming the keys [M38]; fine-tuning as for torchvision's models
(backbone frozen, then a lower rate [M36, M37])."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from safetrain.errors import ConfigError
from safetrain.models.layers import FineTunable
from safetrain.models.pretrained import Contract, StartConfig


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("[config] model=timm needs the timm package, an optional extra: pip install "
                          "'safetrain[timm]' (or pip install timm).") from None
    return timm


def pretrained_cfg(arch: str) -> dict:
    """timm's pretrained config of `arch` (e.g. resnet50, or resnet50.a1_in1k for one set of weights)."""
    cfg = _timm().models.get_pretrained_cfg(arch)
    return cfg.to_dict() if cfg is not None else {}


def hub_file(arch: str) -> Path:
    """The weights of `arch` in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE); nothing is downloaded."""
    from huggingface_hub import constants, try_to_load_from_cache
    repo = pretrained_cfg(arch).get("hf_hub_id")
    if not repo:
        raise ConfigError(f"[config] model.weights=hub: timm has no Hugging Face weights for model.arch={arch}. Pass "
                          "a weights file: model.weights=/path/to/weights.safetensors (or .pth).")
    for name in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, name, cache_dir=constants.HF_HUB_CACHE)
        if isinstance(found, str):
            return Path(found)
    raise ConfigError(f"[config] model.weights=hub: the weights of {repo} are not in the local Hugging Face cache "
                      f"({constants.HF_HUB_CACHE}), and safetrain downloads nothing at run time. On a machine online: "
                      f"`hf download {repo}` (then copy the cache here), or pass the file: "
                      "model.weights=/path/to/model.safetensors.")


@dataclass
class TimmConfig(StartConfig):
    """model=timm settings (conf/model/timm.yaml)."""
    name: str = "timm"
    arch: str = "resnet18"  # any name of timm.list_models(), optionally with a weights tag (resnet50.a1_in1k)
    weights: Optional[str] = None  # None: from scratch; hub: the local Hugging Face cache; or a file

    def check(self) -> None:
        timm = _timm()
        if not timm.is_model(self.arch.split(".")[0]):
            near = difflib.get_close_matches(self.arch, timm.list_models(), n=1)
            raise ConfigError(f"[config] model.arch={self.arch!r} is not a timm model."
                              + (f" Did you mean '{near[0]}'?" if near else "") + " Choose one of timm.list_models().")
        if self.weights and self.init_from:
            raise ConfigError("[config] model.weights and model.init_from both name starting weights; keep one.")
        if self.weights not in (None, "hub") and not Path(self.weights).expanduser().is_file():
            raise ConfigError(f"[config] model.weights={self.weights}: no such file. Give timm weights for model.arch "
                              "(.safetensors or .pth), model.weights=hub (the local Hugging Face cache), or leave it "
                              "unset to train from scratch.")
        self.check_start()

    def input_contract(self) -> Optional[Contract]:
        """The normalization and resolution of the model's pretrained config, or what StartConfig says."""
        if not self.weights:
            return super().input_contract()
        cfg = pretrained_cfg(self.arch)
        what = f"timm's pretrained config of {self.arch}" + ("" if self.weights == "hub" else f" ({self.weights})")
        return Contract(list(cfg["mean"]), list(cfg["std"]), int(cfg["input_size"][-1]), what)


class Timm(FineTunable):
    """A timm model with a head for this data; its weights, if given, loaded whole by timm (strict) [M38]."""

    def __init__(self, in_channels: int, num_classes: int, height: int, width: int, arch: str = "resnet18",
                 weights: Optional[str] = None, **_):
        super().__init__()
        timm = _timm()
        if weights is None:
            self.net = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        else:
            path = hub_file(arch) if weights == "hub" else Path(weights).expanduser()
            try:
                self.net = timm.create_model(arch, pretrained=True, num_classes=num_classes, in_chans=in_channels,
                                             pretrained_cfg_overlay={"file": str(path)})
            except RuntimeError as e:  # load_state_dict(strict=True): missing, unexpected keys, other shapes
                lines = [line.strip() for line in str(e).splitlines() if line.strip()][:4]
                raise ConfigError(f"[M38] model.weights={weights} ({path}) does not fit model.arch={arch}: "
                                  f"{' | '.join(lines)[:600].rstrip('.')}. Loading it would leave those layers random. Use the "
                                  "weights of that architecture.") from None
        head = self.head_layer()
        nn.init.normal_(head.weight, std=1e-3)  # near-0 logits at the start [M19], as for torchvision's models
        if head.bias is not None:
            nn.init.zeros_(head.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def head_layer(self) -> nn.Module:
        return self.net.get_classifier()
