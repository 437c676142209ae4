"""The precision policy (safetrain/engine.py choose_precision) and fp16's gradient scaler, on the CPU: the
decision for each GPU generation, skipped steps that are not a divergence, and a scale that collapses that is."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from safetrain.cli import compose
from safetrain.engine import (Limits, Precision, Setup, choose_precision, cpu_has_bf16,
                              keep_fp32_where_cpu_bf16_fails, train_epoch)
from safetrain.errors import ConfigError, TrainingStopped
from safetrain.monitors import StepGuard
from safetrain.run import run
from tests.conftest import REPO

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("capability, chosen", [((6, 1), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_auto_picks_bf16_only_where_the_gpu_has_it_natively(capability, chosen):
    assert choose_precision("auto", CUDA, capability) == chosen
    assert choose_precision("fp32", CUDA, capability) == "fp32"
    assert choose_precision("fp16", CUDA, capability) == "fp16"


def test_the_cpu_trains_in_bf16_where_it_has_it_natively_and_impossible_choices_are_refused():
    assert choose_precision("auto", CPU, None, cpu_bf16=True) == "bf16"  # AVX512-BF16 / AMX
    assert choose_precision("auto", CPU, None, cpu_bf16=False) == "fp32"
    assert choose_precision("auto", CPU, None) == ("bf16" if cpu_has_bf16() else "fp32")
    for native in (False, True):
        assert choose_precision("fp32", CPU, None, cpu_bf16=native) == "fp32"
    assert choose_precision("bf16", CPU, None, cpu_bf16=True) == "bf16"
    with pytest.raises(ConfigError, match=r"this CPU has no native bf16.*trainer\.precision=auto \(fp32 here\)"):
        choose_precision("bf16", CPU, None, cpu_bf16=False)
    with pytest.raises(ConfigError, match=r"trainer\.precision=fp16 is for GPUs"):
        choose_precision("fp16", CPU, None)
    with pytest.raises(ConfigError, match=r"compute capability 7\.5\) has no native bf16.*trainer\.precision=auto"):
        choose_precision("bf16", CUDA, (7, 5))


def _weight_grad(conv: nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        conv(x).float().sum().backward()
    return conv[0].weight.grad.double().clone()


def test_cpu_bf16_convolutions_strided_past_their_input_run_in_fp32_and_get_the_right_gradient():
    """oneDNN's bf16 weight gradient is garbage (NaN, inf, 1e20-1e38, different every call) for a convolution whose
    stride is wider than its input: ResNet-18's layer4.0.conv1 on 16x16 images (benchmarks/cpu_bf16.py)."""
    torch.manual_seed(0)
    tight = nn.Sequential(nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False))
    roomy = nn.Sequential(nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False))
    x1, x4 = torch.randn(16, 64, 1, 1), torch.randn(16, 64, 4, 4)  # stride 2 > width 1; 2 <= 4
    assert keep_fp32_where_cpu_bf16_fails(tight, x1[:2]) == ["0"]
    assert keep_fp32_where_cpu_bf16_fails(roomy, x4[:2]) == []
    exact = _weight_grad(tight.double(), x1.double(), bf16=False).float()
    tight.float()
    for _ in range(8):  # wrong values come from memory the kernel never writes: they differ between calls
        assert torch.allclose(_weight_grad(tight, x1, bf16=True).float(), exact, rtol=1e-4, atol=1e-4)
    assert tight.training  # the shape probe left the mode as it was


def test_resnet18_trains_in_cpu_bf16_at_16_pixels(tmp_path):
    if not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16: trainer.precision=bf16 is refused here")
    cfg, _ = compose("smoke", ["model=torchvision", "model.arch=resnet18", "trainer.precision=bf16",
                               "trainer.max_epochs=2", "trainer.progress=false"])
    final = run(cfg, tmp_path / "run")  # [M26] in the first epoch before the fp32 convolution
    assert final["test_acc"] > 0.5 and not final["warnings"]


def _batches(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 2, 2, 2, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


class _NoSchedule:
    def after_step(self):
        pass


def _epoch(model, prec, batches):
    guard = StepGuard(3, CPU, 0.1, model, scaler=prec.scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return train_epoch(Setup(model, nn.CrossEntropyLoss(), opt, _NoSchedule()), batches, prec, Limits(1), "epoch 1/1",
                       guard)


def test_fp16_steps_the_scaler_skips_are_not_a_divergence():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    before = [p.detach().clone() for p in model.parameters()]
    prec = Precision(CPU, bf16=False, fp16=True, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 30))
    out = _epoch(model, prec, _batches())  # the first ~14 steps overflow at this scale and are skipped
    assert prec.scaler.get_scale() < 2.0 ** 20  # it skipped (and halved) several times ...
    assert out["loss"] == out["loss"]  # ... without a stop, the loss finite
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after) and any(not torch.equal(a, b) for a, b in zip(after, before))


class _Overflow(torch.autograd.Function):
    """Identity forward; a backward that overflows fp16 (and fp32) whatever the scale."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class _Diverged(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return _Overflow.apply(self.fc(x.flatten(1)))


def test_fp16_gradients_that_overflow_at_every_step_stop_the_run_m26():
    model = _Diverged()
    prec = Precision(CPU, bf16=False, fp16=True)  # the default scaler: 2**16, halved at each overflow
    with pytest.raises(TrainingStopped, match=r"\[M26\] the fp16 gradients overflowed at step after step.*"
                                              r"trainer\.precision=fp32"):
        _epoch(model, prec, _batches(45))
    assert prec.scaler.get_scale() < 1.0


def test_trial_steps_have_a_scaler_of_their_own():
    prec = Precision(CPU, bf16=False, fp16=True)
    trial = prec.trial()
    assert trial.fp16 and trial.scaler is not None and trial.scaler is not prec.scaler
    assert Precision(CPU, bf16=False).trial().scaler is None


@pytest.mark.slow  # torch.compile on the CPU: ~20 s of compiling
def test_trainer_compile_trains_the_compiled_model_and_keeps_the_plain_checkpoint_keys(tmp_path):
    import torch._dynamo

    from safetrain.checkpoint import load_checkpoint, load_classifier
    from safetrain.cli import compose
    from safetrain.run import run

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg, _ = compose("smoke", ["trainer.max_epochs=2", "trainer.progress=false", "trainer.compile=true"])
    compiled = run(cfg, tmp_path / "compiled")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the training steps did go through it
    plain = run(compose("smoke", ["trainer.max_epochs=2", "trainer.progress=false"])[0], tmp_path / "plain")
    a = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "best.pt")["model"]
    b = load_checkpoint(tmp_path / "plain" / "checkpoints" / "best.pt")["model"]
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in a)  # loads into the plain model
    assert load_classifier(tmp_path / "compiled" / "checkpoints" / "best.pt")(
        torch.zeros(2, 3, 16, 16, dtype=torch.uint8)).shape == (2, 4)
    assert compiled["test_acc"] == pytest.approx(plain["test_acc"], abs=0.1)  # the same training, to float noise


@pytest.mark.slow  # every part of the GPU check end to end on the CPU (~40 s)
def test_the_gpu_check_runs_every_part_it_can_here_with_tiny(tmp_path):
    """benchmarks/gpu_check.py --tiny: the GPU check's steps on a generated folder, so a session without a GPU can
    tell that the one with a GPU will find it working; parts that need CUDA are recorded as skipped, not dropped."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    parts = result["parts"]
    gpu = torch.cuda.is_available()
    for name in ("airbench94", "cifar10_fp16_scaler", "cifar10_compile"):
        assert parts[name]["status"] == ("ok" if gpu else "skipped"), parts[name]
    for name in ("cifar10_fast_airbench_width", "cifar10_seed0_fresh_cache", "predict_export", "disk_cache_loader"):
        assert parts[name]["status"] == "ok", parts[name]
    run = parts["cifar10_seed0_fresh_cache"]
    assert run["test_acc"] > 0.3 and run["epochs"] == 2  # 10 classes: it learned and set(run["data_seconds"]) == {"load", "split", "audit"}
    assert parts["disk_cache_loader"]["jpeg_images_s"] > 0 and parts["disk_cache_loader"]["jpeg_cache_mb"] >= 0
    parity = parts["predict_export"]["parity"]
    assert parts["predict_export"]["predicted_rows"] == 80 and parity["onnx_argmax_agreement"] == 1.0
    assert parity["onnx_max_abs_diff"] < 1e-3 and parity["torch_export_argmax_agreement"] == 1.0
    section = (tmp_path / "out" / "gpu_check.md").read_text()
    assert section.startswith("## GPU check") and "| cifar10_seed0_fresh_cache | ok | " in section
