"""Why bf16 on the CPU turned ResNet-18 and RegNet to NaN, and what safetrain does about it.

    python benchmarks/cpu_bf16.py            # seconds; meaningful on a CPU with AVX512-BF16 or AMX

1. The op: one Conv2d's weight gradient under CPU bf16 autocast against the same gradient in float64, over
   kernel widths, strides, input sizes, groups and both memory formats, each shape 8 times (the wrong values come
   from memory the kernel never writes, so they vary from call to call). Prints which shapes go wrong and whether
   "stride wider than the input, kernel wider than 1 pixel" separates them exactly.
2. The model: torchvision's resnet18 and regnet_y_400mf at 16x16 (the images of the tests that first showed the
   NaN), 20 AdamW steps in bf16, without and with `keep_fp32_where_cpu_bf16_fails`: steps whose gradient norm is
   not finite or above 1e3 (a healthy step's is below 10).
"""
from __future__ import annotations

import itertools
import json

import torch
import torchvision
from torch import nn

from safetrain.engine import cpu_has_bf16, keep_fp32_where_cpu_bf16_fails


def weight_grad_wrong(h: int, w: int, k: int, s: int, groups: int, channels_last: bool, n=16, c=64) -> bool:
    conv = nn.Conv2d(c, c, k, s, k // 2, bias=False, groups=groups)
    x = torch.randn(n, c, h, w)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.float().sum().backward()
    ref = nn.Conv2d(c, c, k, s, k // 2, bias=False, groups=groups).double()
    ref.weight.data = conv.weight.data.double().contiguous()
    ref(x.double()).sum().backward()
    err = (conv.weight.grad.double() - ref.weight.grad).abs().max().item()
    return not err < 0.05 * ref.weight.grad.abs().max().item() + 1e-2  # NaN counts as wrong


def op_table(tries: int = 8) -> dict:
    rows = []
    for h, w, k, s, g in itertools.product([1, 2, 3, 4, 6], [1, 2, 3, 4, 6], [1, 3, 5], [1, 2, 3], [1, 8]):
        if w + 2 * (k // 2) < k or h + 2 * (k // 2) < k:
            continue
        wrong = sum(weight_grad_wrong(h, w, k, s, g, cl) for cl in (False, True) for _ in range(tries // 2))
        rows.append({"h": h, "w": w, "k": k, "stride": s, "groups": g, "wrong": wrong, "tries": tries,
                     "rule": s > w and k > 1})
    predicted = [r for r in rows if r["rule"]]
    return {"shapes": len(rows), "wrong_shapes": sum(r["wrong"] > 0 for r in rows),
            "rule_shapes": len(predicted), "rule_shapes_wrong": sum(r["wrong"] > 0 for r in predicted),
            "wrong_outside_rule": [r for r in rows if r["wrong"] and not r["rule"]],
            "rule_shapes_never_wrong": [r for r in predicted if not r["wrong"]],
            "wrong_calls_share_in_rule": sum(r["wrong"] for r in predicted) / max(1, tries * len(predicted))}


def model_steps(arch: str, guarded: bool, steps: int = 20, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    net = torchvision.models.get_model(arch, num_classes=4).to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (32,))
    kept = keep_fp32_where_cpu_bf16_fails(net, x[:2]) if guarded else []
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    bad = 0
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad()
        loss.backward()
        norm = nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        bad += not float(norm) < 1e3
        opt.step()
    return {"arch": arch, "guarded": guarded, "fp32_convs": kept, "bad_steps": bad, "steps": steps,
            "final_loss": float(loss.detach())}


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(json.dumps({"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "native_bf16": cpu_has_bf16()}))
    table = op_table()
    print(json.dumps({k: v for k, v in table.items() if k not in ("wrong_outside_rule", "rule_shapes_never_wrong")}))
    for key in ("wrong_outside_rule", "rule_shapes_never_wrong"):
        print(key, json.dumps(table[key]))
    for arch, guarded in itertools.product(["resnet18", "regnet_y_400mf"], [False, True]):
        print(json.dumps(model_steps(arch, guarded)))


if __name__ == "__main__":
    main()
