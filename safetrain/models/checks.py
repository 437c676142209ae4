"""Preflight checks of any model, built here or handed in by the user, on one real batch."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from safetrain.errors import ConfigError
from safetrain.models.layers import BN_MIN_BATCH

# Layers that must not come after a classifier's last linear layer: the loss owns the link [M11].
OUTPUT_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                      nn.Mish, nn.Softplus, nn.Softmax, nn.Softmax2d, nn.LogSoftmax, nn.Sigmoid, nn.Tanh,
                      nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish)


def check_model(model: nn.Module, x: Tensor, num_classes: int, batch_size: int, processes: int = 1) -> None:
    """Raise ConfigError unless `model` takes the data's (B, C, H, W) batches, returns
    (B, num_classes) raw logits and can use BatchNorm at this batch size (per process, under torchrun)."""
    b, c, h, w = x.shape
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d) and first.in_channels != c:
        raise ConfigError(f"[M10] the model's first layer expects {first.in_channels} input channels but the "
                          f"images have {c} ({c}x{h}x{w}). Build it with in_channels={c} (safetrain's builders "
                          "read it from the data).")
    order: list[tuple[str, nn.Module]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=name: order.append((n, mod)))
             for name, m in model.named_modules() if not any(m.children())]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as e:
        raise ConfigError(f"[M10] the model fails on a batch of the data's shape ({b}, {c}, {h}, {w}): "
                          f"{str(e).splitlines()[0]}. A hard-coded flatten size (nn.Linear(16*5*5, ...)) breaks "
                          "when the image size changes: use global pooling or nn.LazyLinear.") from None
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    if not isinstance(out, Tensor) or tuple(out.shape) != (b, num_classes):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"[M10] the model returns {shape} for a batch of {b}; a classifier of {num_classes} "
                          f"classes must return ({b}, {num_classes}): one logit per class.")
    if order and isinstance(order[-1][1], OUTPUT_ACTIVATIONS):
        name, layer = order[-1]
        raise ConfigError(f"[M11] the model's output goes through {type(layer).__name__} (layer '{name}') after "
                          "its last linear layer. A classifier must return raw logits: remove that layer; the "
                          "loss applies softmax itself.")
    rows = out.float().sum(1)
    if ((out >= 0) & (out <= 1)).all() and torch.allclose(rows, torch.ones_like(rows), atol=1e-3):
        raise ConfigError("[M11] the model's outputs are probabilities (each row sums to 1): it applies softmax. "
                          "Return raw logits; the cross-entropy loss applies softmax itself.")
    if out.numel() >= 16 and (out >= 0).all() and (out == 0).float().mean() > 0.25:  # a ReLU's mark: many exact 0s
        raise ConfigError("[M11] every output of the model is >= 0 on a batch, many exactly 0, as after a ReLU: a "
                          "classifier must return raw logits (negative too). Remove the activation after the last "
                          "layer.")
    per_process = batch_size // processes
    if per_process < BN_MIN_BATCH and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        batch = f"data.batch_size={batch_size}" if processes == 1 else \
            f"each of the {processes} processes' batch (data.batch_size={batch_size} / {processes} = {per_process})"
        raise ConfigError(f"[M12] the model has BatchNorm layers but {batch} is below "
                          f"{BN_MIN_BATCH}. Use GroupNorm (model.norm=group for safetrain's models) or "
                          f"data.batch_size={BN_MIN_BATCH * 4 * processes} or more.")
