"""Cost of safetrain's always-on checks, against the training they guard (same process, same data).

    python benchmarks/monitor_overhead.py [--steps 40] [--device auto]

On CIFAR-shaped random data with the cifar10 recipe's model (cnn_small, batch 256): one training epoch
slice with the per-step guard (non-finite/divergence flags, gradient norm, per-layer norms once) vs
without, and the once-per-epoch or once-per-run checks (dead-unit probe, preflight, suspected-mislabeled
pass) in seconds and as a share of a 45,000-image epoch.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from safetrain.engine import Limits, Precision, Setup, train_epoch  # noqa: E402
from safetrain.models import build_model  # noqa: E402
from safetrain.monitors import StepGuard, dead_unit_share, predicted_probs, suspected_mislabeled  # noqa: E402
from safetrain.optim import LRSchedule, build_optimizer  # noqa: E402
from safetrain.preflight import init_and_gradient_checks  # noqa: E402


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    prec = Precision(device, bf16=device.type == "cuda")
    torch.manual_seed(0)
    x = torch.randn(a.steps * 256, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (len(x),), device=device)
    batches = [(x[i:i + 256], y[i:i + 256]) for i in range(0, len(x), 256)]
    net = build_model({"name": "cnn", "widths": [24, 48, 96], "blocks": 1}, (3, 32, 32), 10)
    net = net.to(device, memory_format=torch.channels_last)
    opt = build_optimizer(net, "adamw", 1e-3, 0.05, 0.9)
    sched = LRSchedule(opt, "plateau", mode="max", total_steps=1)
    loss = nn.CrossEntropyLoss()
    setup, limits = Setup(net, loss, opt, sched), Limits(1, grad_clip=5.0)
    run = lambda guard: train_epoch(setup, batches, prec, limits, "bench", guard)
    run(None)  # warm-up
    plain, guarded = [], []
    for _ in range(3):  # alternate, to share the machine's noise
        plain.append(timed(lambda: run(None), device)[0])
        guarded.append(timed(lambda: run(StepGuard(10, device, 1e-3)), device)[0])
    p, g = min(plain), min(guarded)
    per_image = p / len(x)
    epoch = per_image * 45000
    print(f"device {device}: {a.steps} steps of 256 images; without guard {p:.2f} s, with guard {g:.2f} s "
          f"-> per-step overhead {100 * (g / p - 1):+.1f}%")
    probe = x[:512]
    dead_unit_share(net, probe)  # warm-up (first call of this batch shape)
    t_dead, _ = timed(lambda: dead_unit_share(net, probe), device)
    t_pre, _ = timed(lambda: init_and_gradient_checks(net, x[:256], y[:256], loss, 10, prec), device)

    t_mis, _ = timed(lambda: suspected_mislabeled(*predicted_probs(net, batches, prec),
                                                   [str(i) for i in range(len(x))], [str(k) for k in range(10)]),
                     device)
    t_mis_epoch = t_mis / len(x) * 45000
    print(f"per epoch: dead-unit probe {t_dead:.3f} s ({100 * t_dead / epoch:.2f}% of a 45k-image epoch of "
          f"{epoch:.1f} s)")
    print(f"per run: preflight {t_pre:.2f} s; suspected-mislabeled pass over 45k images {t_mis_epoch:.1f} s "
          f"({100 * t_mis_epoch / epoch:.0f}% of one epoch)")


if __name__ == "__main__":
    main()
