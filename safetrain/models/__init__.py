"""Model registry: every builder takes its shapes from the data facts and initializes its own weights.

Adding a model: one file with its settings dataclass (a StartConfig) and a models.layers.Model (usually a Classifier)
taking (in_channels, num_classes, height, width, activation_name, norm_name, dropout, *its settings*), one line in
MODELS, one conf/model/*.yaml. What the model offers the trainer are the hooks declared on Model."""
from __future__ import annotations

from dataclasses import asdict

from torch import nn

from safetrain.errors import ConfigError
from safetrain.models.cnn import CNN, CNNConfig
from safetrain.models.fastcnn import FastCNN, FastCNNConfig
from safetrain.models.pretrained import Torchvision, TorchvisionConfig, architecture, start_from
from safetrain.models.resnet import ResNet, ResNetConfig
from safetrain.models.timmnet import Timm, TimmConfig

MODELS = {"cnn": (CNNConfig, CNN), "resnet": (ResNetConfig, ResNet),  # model=NAME -> (settings, builder)
          "fastcnn": (FastCNNConfig, FastCNN), "torchvision": (TorchvisionConfig, Torchvision),
          "timm": (TimmConfig, Timm)}
# how it trains and is evaluated, not its layers
RUN_SETTINGS = ("name", "init_from", "freeze_epochs", "backbone_lr_mult", "tta", "tta_shift")


def model_settings(values: dict):
    """A model's settings dataclass from plain values (a checkpoint's saved config, a test's dict)."""
    if values.get("name") not in MODELS:
        raise ConfigError(f"[config] model={values.get('name')!r} is not a model; choose one of {list(MODELS)}.")
    return MODELS[values["name"]][0](**values)


def build_model(settings, shape: tuple[int, int, int], num_classes: int,
                classes: list[str] | None = None) -> nn.Module:
    """The model that `settings` (a MODELS settings dataclass, or its plain values) describe, for (C, H, W) images of
    `num_classes` classes. Starting weights (model.weights, model.init_from: `classes` decide whether its head is
    kept) make it a fine-tuning: the backbone frozen for model.freeze_epochs, then trained at model.backbone_lr_mult
    x the lr. model.tta: in eval mode the model returns the mean logits of each image and its mirror (what export
    writes too); model.tta_shift: and of both moved by that many pixels (Model.eval_views). The builder initializes
    its own weights [M19] (models/layers.py: Classifier)."""
    s = model_settings(settings) if isinstance(settings, dict) else settings
    values = asdict(s)
    arch = {k: v for k, v in values.items() if k not in RUN_SETTINGS}
    own = {k: arch.pop(k) for k in ("activation", "norm", "dropout") if k in arch}  # safetrain's builders have them
    c, h, w = shape
    model = MODELS[s.name][1](in_channels=c, num_classes=num_classes, height=h, width=w,
                              activation_name=own.get("activation", "relu"), norm_name=own.get("norm", "batch"),
                              dropout=own.get("dropout", 0.0), **arch)
    if s.init_from:
        start_from(model, s.init_from, architecture(values), classes)
    if s.init_from or values.get("weights"):
        model.fine_tune(s.freeze_epochs, s.backbone_lr_mult)
    model.flip_tta, model.tta_shift = s.tta, s.tta_shift
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
