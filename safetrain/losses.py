"""The loss is derived from the task; the model emits logits and the loss owns the link [M11, M13]."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def build_loss(task: str, name: str = "auto", label_smoothing: float = 0.0,
               class_weights: Optional[torch.Tensor] = None) -> nn.Module:
    if task == "multiclass" and name in ("auto", "cross_entropy"):
        return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)
    raise ValueError(f"no loss {name!r} for task {task!r}")  # config.validate refuses this earlier
