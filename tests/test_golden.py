"""Golden runs, as in torchtune's regression tests: a fixed seed gives the same test metrics and the same
checkpoint tensors. The numbers below were recorded before the spine was cut into stages (2026-11-24) and are
kept true from then on. Bit for bit on the platforms they were recorded on (torch build, CPU instruction set,
AMX, 2 threads); other platforms round differently, so there only the metrics are compared, within a tolerance."""
import hashlib

import pytest
import torch

from safetrain.cli import compose
from safetrain.run import run
from tests.conftest import write_images

# Per platform: torch build, torch's CPU capability, and AMX (oneDNN picks other fp32 kernels on a CPU with AMX:
# same torch and "AVX512", another last bit; seen on 2026-12-07 when CI landed on such a CPU).
GOLDEN = {
    ("2.14.1+cu130", "AVX512", False): {
        "smoke": {"test_acc": 0.9750000238418579, "test_loss": 0.328518009185791,
                  "test_macro_f1": 0.9749373197555542, "best_epoch": 3,
                  "best": "c597fd3a41d76d8f03665d1fd371c51062a505d2f05253661365899dbf7737fb",
                  "last": "c597fd3a41d76d8f03665d1fd371c51062a505d2f05253661365899dbf7737fb"},
        "folder": {"test_acc": 0.9444444179534912, "test_loss": 0.8805902269151475,
                   "test_macro_f1": 0.9440560340881348, "best_epoch": 1,
                   "best": "c13d5c2610d1656432da12253bf16677621434846c35b3bb0a678901b4e2da57",
                   "last": "fcac4eb5795bb443f7d086cafad15164e9dfceb662962ca40c016e7ab970be63"},
    },
    ("2.14.1+cu130", "AVX512", True): {  # recorded 2026-12-07, Xeon with AVX512-BF16 and AMX-BF16
        "smoke": {"test_acc": 0.9750000238418579, "test_loss": 0.3285179138183594,
                  "test_macro_f1": 0.9749373197555542, "best_epoch": 3,
                  "best": "eee8fc7a209feae8b71fe87a2c5b8788f8dabc39aac425d09b6d5152327efc47",
                  "last": "eee8fc7a209feae8b71fe87a2c5b8788f8dabc39aac425d09b6d5152327efc47"},
        "folder": {"test_acc": 0.9444444179534912, "test_loss": 0.8805902269151475,
                   "test_macro_f1": 0.9440560340881348, "best_epoch": 1,
                   "best": "198a655578baae228e8be2f953c04aebdfa9605b0e606328a37172e49bb6cef3",
                   "last": "7e0034a2f2c8a8450aa1871df1fc8cc14da8733af949bd3e20fb925692a3a71c"},
    },
}
REFERENCE = GOLDEN[("2.14.1+cu130", "AVX512", False)]  # what other platforms are compared with, within a tolerance


def platform() -> tuple:
    return torch.__version__, torch.backends.cpu.get_cpu_capability(), torch.cpu._is_amx_tile_supported()


def tensor_digest(path) -> str:
    state = torch.load(path, weights_only=True)["model"]
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # reductions split by thread: the thread count is part of the arithmetic
    yield
    torch.set_num_threads(before)


def golden_run(tmp_path, name):
    if name == "smoke":
        cfg, _ = compose("smoke", ["trainer.progress=false", "trainer.precision=fp32"])  # recorded in fp32
    else:
        write_images(tmp_path / "imgs", classes=3, per_class=30, size=(12, 12))
        cfg, _ = compose("imagefolder", [f"data.root={tmp_path / 'imgs'}", "trainer.max_epochs=2", "data.batch_size=16",
                                         "model=cnn", "model.widths=[8,16]", "trainer.progress=false",
                                         "trainer.precision=fp32",
                                         # the recipe's training settings as they were recorded (it changed since)
                                         "optim.lr=1e-3", "sched.name=plateau", "loss.label_smoothing=0",
                                         "trainer.early_stop_patience=10", "data.max_batch_share=null"])
    final = run(cfg, tmp_path / name)
    return final, {k: tensor_digest(tmp_path / name / "checkpoints" / f"{k}.pt") for k in ("best", "last")}


@pytest.mark.parametrize("name", ["smoke", "folder"])
def test_golden_run_gives_the_recorded_metrics_and_weights(tmp_path, two_threads, name):
    final, digests = golden_run(tmp_path, name)
    want = GOLDEN.get(platform(), {}).get(name)
    if want is not None and not torch.cuda.is_available():
        assert {k: final[k] for k in ("test_acc", "test_loss", "test_macro_f1", "best_epoch")} == \
            {k: want[k] for k in ("test_acc", "test_loss", "test_macro_f1", "best_epoch")}
        assert digests == {"best": want["best"], "last": want["last"]}
    else:  # another rounding: the same run, a few ulps apart after a few hundred steps
        assert final["test_acc"] == pytest.approx(REFERENCE[name]["test_acc"], abs=0.06)
        assert final["test_loss"] == pytest.approx(REFERENCE[name]["test_loss"], rel=0.1)
