"""torchrun: several processes, one run (safetrain/distributed.py). Two CPU processes over gloo on 127.0.0.1; every
launch has a timeout, so a hang fails the test instead of blocking CI."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from safetrain import data as D
from safetrain.checkpoint import load_checkpoint, load_classifier
from safetrain.data.sources import ImageSet
from tests.conftest import run_cli, write_images

# BatchNorm (made global-batch under torchrun), crop+flip augmentation (drawn for the global batch), no dropout
# (each rank has its own dropout masks): one process and two give the same optimisation. 3 classes x 105 images:
# an odd validation split, so the two ranks' shares differ in size. fp32: bf16 rounds each rank's half-batch
# sums differently from the whole batch's, which would hide what this compares.
SETTINGS = ["recipe=smoke", "trainer.progress=false", "data.augment=crop_flip", "data.synthetic.classes=3",
            "data.synthetic.samples_per_class=105", "model.dropout=0", "trainer.precision=fp32"]


def torchrun(*args, nproc=2, cwd, timeout=240):
    """`torchrun --standalone --nproc_per_node=N -m safetrain ...` (or a script: args starting with a path)."""
    target = ["-m", "safetrain", *args] if not str(args[0]).endswith(".py") else list(map(str, args))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *target], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def model_of(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


THEN_THREADS = """
import os
import sys

from safetrain.cli import main

code = main(sys.argv[1:])
if os.path.isdir("/proc/self/task"):  # Linux: the threads this process still runs once the command is done
    names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    print(f"threads after the command, rank {os.environ['RANK']}: {names}", flush=True)
sys.exit(code)
"""


# torchrun launches (the module's 4 runs, a NaN on one rank): the slow tier, with the other launches; the default tier
# is at its 10 minutes on 2 cores and keeps the in-process tests of the shares and the loader below.
LAUNCHES = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (2 epochs); two processes (2 epochs, run directory chosen by Hydra: ${now:}); that run resumed
    to 3 epochs under torchrun; two processes for 3 epochs uninterrupted."""
    tmp = tmp_path_factory.mktemp("ddp")
    env = {"OMP_NUM_THREADS": "1"}
    one = run_cli(*SETTINGS, "trainer.max_epochs=2", f"hydra.run.dir={tmp / 'one'}", env=env, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(*SETTINGS, "trainer.max_epochs=2", cwd=tmp)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    made = [p for p in (tmp / "runs" / "smoke").iterdir()]
    assert len(made) == 1, made  # one run directory, not one per process
    before = {name: model_of(made[0] / "checkpoints" / f"{name}.pt") for name in ("best", "last")}
    lines, final = jsonl(made[0]), json.loads((made[0] / "metrics.json").read_text())
    resumed = torchrun(f"resume={made[0]}", "trainer.max_epochs=3", cwd=tmp)
    (tmp / "then_threads.py").write_text(THEN_THREADS)
    whole = torchrun(tmp / "then_threads.py", *SETTINGS, "trainer.max_epochs=3", f"hydra.run.dir={tmp / 'whole'}",
                     cwd=tmp)
    return {"tmp": tmp, "one": tmp / "one", "two": made[0], "two_log": two, "two_models": before, "two_lines": lines,
            "two_final": final,
            "resumed": resumed,
            "whole": tmp / "whole", "whole_log": whole}


@LAUNCHES
def test_two_processes_with_the_global_batch_train_as_one(runs):
    one = runs["one"]
    for name in ("best", "last"):  # as the two processes left them after 2 epochs (before the resume test)
        a, b = model_of(one / "checkpoints" / f"{name}.pt"), runs["two_models"][name]
        assert a.keys() == b.keys()
        for k in a:
            diff = (a[k].float() - b[k].float()).abs().max()
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), (name, k, diff)
    ra, rb = jsonl(one), runs["two_lines"]
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb]
    for x, y in zip(ra[1:], rb[1:]):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-4)
        assert x["train/acc"] == y["train/acc"]  # the same images, counted once over the two processes


@LAUNCHES
def test_validation_and_test_metrics_equal_one_process_on_an_odd_split(runs):
    one, two = runs["one"], runs["two"]
    n_val = len(json.loads((two / "splits.json").read_text())["val"])
    assert n_val % 2 == 1  # the premise: the two shares differ in size
    for x, y in zip(jsonl(one)[1:], runs["two_lines"][1:]):
        for k in ("val/acc", "val/balanced_acc", "val/macro_f1"):
            assert x[k] == pytest.approx(y[k], abs=1e-6), k
        assert x["val/loss"] == pytest.approx(y["val/loss"], rel=1e-4)
    fa, fb = json.loads((one / "metrics.json").read_text()), runs["two_final"]
    assert fa["confusion_matrix"] == fb["confusion_matrix"]
    assert sum(map(sum, fb["confusion_matrix"])) == len(json.loads((two / "splits.json").read_text())["test"])


@LAUNCHES
def test_rank_zero_writes_one_log_and_the_checkpoint_loads(runs):
    two, log = runs["two"], runs["two_log"]
    assert log.stdout.count("[8/9] training up to 2 epochs") == 1  # rank 1 logs warnings and errors only
    assert "[rank 1]" not in log.stderr or "WARNING" in log.stderr or "ERROR" in log.stderr
    assert (two / "safetrain.log").is_file() and json.loads((two / "metrics.json").read_text())["test_acc"] > 0.5
    ckpt = load_checkpoint(two / "checkpoints" / "best.pt")
    assert ckpt["processes"] == 2 and len(ckpt["rng"]) == 2  # each rank's generators, for an exact resume
    model = load_classifier(two / "checkpoints" / "best.pt")
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    assert model(x).shape == (4, 3)


@LAUNCHES
def test_a_distributed_run_resumes_exactly(runs):
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-3000:]
    assert runs["whole_log"].returncode == 0, runs["whole_log"].stderr[-3000:]
    a, b = model_of(runs["two"] / "checkpoints" / "last.pt"), model_of(runs["whole"] / "checkpoints" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = jsonl(runs["two"]), jsonl(runs["whole"])
    assert [r["val/loss"] for r in ra if "val/loss" in r] == [r["val/loss"] for r in rb if "val/loss" in r]


@LAUNCHES
def test_the_process_group_is_gone_before_the_interpreter_exits(runs):
    """Its gloo worker threads, left to the interpreter's teardown, abort a finished run now and then (SIGABRT)."""
    said = [ln for ln in runs["whole_log"].stdout.splitlines() if ln.startswith("threads after the command")]
    if not said:
        pytest.skip("no /proc/self/task on this system")
    assert len(said) == 2 and not any("gloo" in ln for ln in said), said


@LAUNCHES
def test_resume_with_another_number_of_processes_is_refused(runs):
    out = run_cli(f"resume={runs['two']}", "trainer.max_epochs=4")
    assert out.returncode == 2
    said = out.stdout + out.stderr
    assert "2 process(es)" in said and "torchrun --nproc_per_node=2" in said


NAN_ON_RANK_1 = """
import sys

import torch
import torch.distributed as dist
from torch import nn

from safetrain.cli import compose
from safetrain.errors import TrainingStopped
from safetrain.run import run


class Net(nn.Module):  # healthy, until rank 1's 15th training forward (epoch 3) returns NaN
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        self.calls = 0

    def forward(self, x):
        out = self.body(x)
        self.calls += self.training
        if self.training and dist.is_initialized() and dist.get_rank() == 1 and self.calls >= 15:
            out = out * float("nan")
        return out


cfg, _ = compose("smoke", sys.argv[2:])
try:
    run(cfg, sys.argv[1], model=Net())
except TrainingStopped as e:
    print(f"stopped on rank {dist.get_rank()}: {e}", file=sys.stderr, flush=True)
    dist.barrier()  # torchrun ends every rank once one exits: each has said why it stopped before any exits
    dist.destroy_process_group()
    sys.exit(1)
"""


@LAUNCHES
def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(textwrap.dedent(NAN_ON_RANK_1))
    out = torchrun(script, tmp_path / "run", *SETTINGS[1:], "trainer.max_epochs=4", cwd=tmp_path, timeout=180)
    assert out.returncode != 0
    for r in (0, 1):
        assert f"stopped on rank {r}: [M26]" in out.stderr, out.stderr[-3000:]
    stopped = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "[M26]" in stopped["stopped"]
    kept = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")  # the last good epoch, before the NaN
    assert kept["epoch"] >= 1 and f"in epoch {kept['epoch'] + 1}/4" in stopped["stopped"]
    assert all(torch.isfinite(v.float()).all() for v in kept["model"].values())


def _set(n: int, folder: Path | None) -> ImageSet:
    """n random 8x8 images, in memory or (folder) as PNG files."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels, ids = torch.arange(n) % 3, [str(i) for i in range(n)]
    if folder is None:
        return ImageSet(labels, ids, images=images)
    files = [str(folder / f"{i}.png") for i in range(n)]
    for f, img in zip(files, images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(f)
    return ImageSet(labels, ids, files=files)


def _batches(data: ImageSet, at, train: bool):
    augment = D.Augment("rrc_trivial" if train else "none", rotate_degrees=10 * train)
    pipe = D.BatchPipeline(D.Normalize([0.5] * 3, [0.25] * 3), torch.device("cpu"), augment, seed=1,
                           at=at if train else (0, 1))
    return list(D.make_loader(data, pipe, batch_size=8, train=train, seed=3, decoding=D.Decoding((3, 8, 8)), at=at))


@pytest.fixture(params=["memory", "files"])
def images(request, tmp_path):
    return _set(37, tmp_path if request.param == "files" else None)


def test_a_loader_resumed_inside_an_epoch_gives_the_rest_of_that_epoch_and_the_next_ones(images):
    """A mid-epoch checkpoint's loader state (the order's at the epoch start, the augmentation's now, the batches
    done): the resumed loader yields exactly the batches the uninterrupted one yields after them, augmentation
    included, in memory and streamed from files alike."""
    def loader():
        augment = D.Augment("rrc_trivial", rotate_degrees=10)
        pipe = D.BatchPipeline(D.Normalize([0.5] * 3, [0.25] * 3), torch.device("cpu"), augment, seed=1)
        return D.make_loader(images, pipe, batch_size=8, train=True, seed=3, decoding=D.Decoding((3, 8, 8)))
    whole = loader()
    list(whole)  # epoch 1
    at_start = whole.state_dict()
    epoch2 = iter(whole)
    done = [next(epoch2) for _ in range(2)]
    state = {**at_start, "augment": whole.state_dict()["augment"], "skip": len(done)}
    rest = list(epoch2) + [b for b in whole]  # the rest of epoch 2, then epoch 3
    resumed = loader()
    resumed.load_state_dict(state)
    again = list(resumed) + [b for b in resumed]
    assert len(again) == len(rest) == 2 * len(whole) - len(done)
    for (x, y), (x2, y2) in zip(rest, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_each_rank_takes_its_share_of_every_global_batch_with_its_augmentation(images):
    whole = _batches(images, (0, 1), train=True)
    shares = [_batches(images, (r, 2), train=True) for r in (0, 1)]
    assert len(whole) == len(shares[0]) == len(shares[1]) == 37 // 8  # equal steps: no rank waits
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shares):
        assert torch.equal(torch.cat([y0, y1]), y) and torch.allclose(torch.cat([x0, x1]), x, atol=1e-6)


def test_evaluation_shares_cover_every_sample_once(images):
    whole = torch.cat([y for _, y in _batches(images, (0, 1), train=False)])
    shares = [torch.cat([y for _, y in _batches(images, (r, 3), train=False)]) for r in range(3)]
    assert torch.equal(torch.cat(shares), whole) and sum(map(len, shares)) == 37


@pytest.mark.slow  # a torchrun launch of its own
def test_a_global_batch_that_does_not_split_evenly_is_refused(tmp_path):
    out = torchrun(*SETTINGS, "data.batch_size=33", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert out.returncode != 0
    said = out.stdout + out.stderr
    assert "data.batch_size=33 is the global batch" in said and "data.batch_size=32" in said
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # a torchrun launch of its own
def test_m12_batchnorm_checks_the_batch_of_each_process(tmp_path):
    out = torchrun(*SETTINGS, "data.batch_size=12", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert out.returncode != 0
    said = out.stdout + out.stderr
    assert "[M12] the model has BatchNorm layers but each of the 2 processes' batch (data.batch_size=12 / 2 = 6)" \
        in said
    assert "data.batch_size=64 or more" in said


@pytest.mark.slow  # a torchrun launch of its own
def test_fine_tuning_under_torchrun_freezes_then_trains_every_layer(tmp_path):
    base = run_cli("recipe=smoke", "trainer.progress=false", f"hydra.run.dir={tmp_path / 'base'}")
    assert base.returncode == 0, base.stderr[-2000:]
    out = torchrun("recipe=smoke", "trainer.progress=false", f"hydra.run.dir={tmp_path / 'ft'}",
                   f"model.init_from={tmp_path / 'base' / 'checkpoints' / 'best.pt'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[M36] fine-tuning: from epoch 2 every layer trains" in out.stdout
    assert "Warning" not in out.stderr and "WARNING" not in out.stdout  # no DDP complaint, no false [M19]
    first, second = load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.pt")["history"][:2]
    assert "grad_norm/features.0.weight" not in first and second["grad_norm/features.0.weight"] > 0  # frozen, trained


@pytest.mark.slow  # three launches of their own
def test_two_processes_read_their_shares_of_the_disk_cache(tmp_path):
    """A streamed folder (data.loader=stream) under torchrun: rank 0 decodes it once into the disk cache and rank 1
    reads that cache; each rank reads its share of every global batch: the same batches as two processes decoding
    the files (bitwise equal weights), and the same images as one process (equal training accuracy per epoch)."""
    write_images(tmp_path / "imgs", classes=3, per_class=35, size=(12, 12))
    base = ["recipe=smoke", "trainer.progress=false", "data=imagefolder", f"data.root={tmp_path / 'imgs'}",
            "data.loader=stream", "data.augment=crop_flip", "model.dropout=0", "trainer.precision=fp32",
            "trainer.max_epochs=2", "data.batch_size=16", f"data.cache_dir={tmp_path / 'cache'}"]
    for name, more in (("disk", []), ("files", ["data.disk_cache=false"])):
        out = torchrun(*base, *more, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert len(list((tmp_path / "cache" / "stored v1").iterdir())) == 3  # decoded once (.pt, images, 32 px): no temp
    assert "disk-cache path" in (tmp_path / "disk" / "safetrain.log").read_text()
    assert "streaming path" in (tmp_path / "files" / "safetrain.log").read_text()
    a, b = (model_of(tmp_path / name / "checkpoints" / "last.pt") for name in ("disk", "files"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    one = run_cli(*base, f"hydra.run.dir={tmp_path / 'one'}", env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    acc = [[r.get("train/acc") for r in jsonl(tmp_path / name)] for name in ("one", "disk")]
    assert acc[0] == acc[1] and acc[0][-1] > 0.5
