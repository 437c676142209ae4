"""Diagnostics while training: what cannot be prevented is detected and explained [M16, M26, M27, M28].

`StepGuard` watches every optimizer step on the device without a host sync per step; the
epoch checks read the epoch's numbers. Each finding carries its catalogue row, what was seen,
the likely causes and the setting that fixes it."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from safetrain.errors import SafetrainError


class TrainingStopped(SafetrainError):
    """The run was stopped on purpose (divergence, non-finite values); the last good checkpoint is kept."""


@dataclass
class Finding:
    row: str
    message: str

    def __str__(self) -> str:
        return f"[{self.row}] {self.message}"


class StepGuard:
    """Flags, on the device, a non-finite loss or gradient norm [M26] and a loss exploding far above the
    chance level [M16]; `check` (called where the loop syncs anyway) raises TrainingStopped."""

    def __init__(self, num_classes: int, device: torch.device, lr: float):
        self.limit = 10 * math.log(num_classes)  # no healthy run has a batch loss 10x chance level
        self.lr = lr
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.exploded = torch.zeros((), dtype=torch.bool, device=device)

    def update(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        loss = loss.detach()
        self.nonfinite |= ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)
        self.exploded |= loss > self.limit

    def check(self, where: str) -> None:
        if self.nonfinite.item():
            raise TrainingStopped(
                f"[M26] the loss or the gradients became NaN/inf {where}. Likely causes: a learning rate far too "
                f"high (optim.lr={self.lr:.2e}: try 10x lower, or optim.lr=auto), inputs with non-finite values, "
                "or a custom layer that divides by zero. Training stopped; the last good checkpoint is kept.")
        if self.exploded.item():
            raise TrainingStopped(
                f"[M16] the loss diverged {where}: a batch loss above {self.limit:.1f} (10x the chance level). "
                f"The learning rate is too high (optim.lr={self.lr:.2e}): try 10x lower, or optim.lr=auto. "
                "Training stopped; the last good checkpoint is kept.")


def epoch_findings(epoch: int, history: list[dict], confusion: torch.Tensor, num_classes: int) -> list[Finding]:
    """Checks on one finished epoch: prediction collapse [M27] and a loss stuck at chance [M28]."""
    found = []
    predicted = confusion.sum(0).float()  # (C,) predictions per class on validation
    truth = confusion.sum(1).float()
    share, prior = predicted / predicted.sum(), truth / truth.sum()
    k = int(share.argmax())
    if num_classes > 1 and share[k] > max(0.5, 3 * prior[k]):
        found.append(Finding("M27", (
            f"epoch {epoch}: {share[k]:.0%} of validation predictions are class {k}, which is {prior[k]:.0%} of "
            "the data: the model is collapsing onto one class. Likely causes: class imbalance, a learning rate "
            "too high or too low, labels that do not match the images, or inputs that carry no signal.")))
    chance = math.log(num_classes)
    recent = [h["train/loss"] for h in history[-2:]]
    if epoch >= 2 and all(abs(v - chance) < 0.05 * chance for v in recent):
        found.append(Finding("M28", (
            f"epoch {epoch}: the training loss has stayed at the chance level ln({num_classes})={chance:.3f} "
            f"(last epochs: {', '.join(f'{v:.3f}' for v in recent)}): the model is not learning. Likely causes: "
            "a learning rate far too low or too high (try optim.lr=auto), labels shuffled relative to the images, "
            "or images without class signal.")))
    return found
