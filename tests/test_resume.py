"""Exact resume: a run stopped at any point (SIGKILL included) and resumed ends as if it had never stopped."""
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from safetrain.cli import compose
from safetrain.errors import ConfigError
from safetrain.resume import saved_config
from safetrain.run import run
from tests.conftest import REPO, run_cli, write_images

TIMING = ("wall_time_s", "data_seconds", "peak_gpu_memory_gb", "epoch_seconds", "train/images_per_s")  # may differ


def same_run(a, b) -> None:
    """Checkpoint tensors (model, optimizer, generators), metrics.json and metrics.jsonl of two run dirs are equal."""
    for name in ("best", "last"):
        x, y = (torch.load(d / "checkpoints" / f"{name}.pt", weights_only=True) for d in (a, b))
        assert x["epoch"] == y["epoch"] and x["history"] == _untimed(y["history"], x["history"])
        for k in x["model"]:
            assert torch.equal(x["model"][k], y["model"][k]), (name, k)
        for i, s in x["optimizer"]["state"].items():
            assert all(torch.equal(v, y["optimizer"]["state"][i][n]) for n, v in s.items()), (name, i)
        assert all(torch.equal(x["loader"][k], y["loader"][k]) for k in x["loader"])
        assert x["schedule"] == y["schedule"] and x["monitors"]["by_epoch"] == y["monitors"]["by_epoch"]
        assert x.keys() == y.keys() and all(torch.equal(x["margins"][k], y["margins"][k]) for k in x.get("margins", ()))
    fa, fb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert {k: v for k, v in fa.items() if k not in TIMING} == {k: v for k, v in fb.items() if k not in TIMING}
    la, lb = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b))
    assert _untimed(la, la) == _untimed(lb, la)
    assert tensorboard_scalars(a, "val/loss") == tensorboard_scalars(b, "val/loss")  # no epoch twice


def tensorboard_scalars(run_dir, tag):
    """[(step, value)] as TensorBoard shows them (it drops the steps a resumed run purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _untimed(rows, like):
    """`rows` with the timing fields taken from `like` (so that everything else must match)."""
    return [{**r, **{k: o[k] for k in TIMING if k in o}} for r, o in zip(rows, like)] + rows[len(like):]


@pytest.mark.slow  # seven launches, SIGKILL at random (exact resume in the default tier: the streamed-run test below)
def test_a_run_killed_at_random_points_and_resumed_ends_bit_for_bit_as_an_uninterrupted_one(tmp_path):
    args = ["recipe=smoke", "trainer.max_epochs=20", "trainer.progress=false", "model.dropout=0.2",
            "data.synthetic.samples_per_class=400", "data.augment=crop_flip"]  # dropout: the global RNG matters too
    assert run_cli(*args, f"hydra.run.dir={tmp_path / 'whole'}").returncode == 0
    whole = tmp_path / "whole"
    assert json.loads((whole / "metrics.json").read_text())["stopped_early"]  # early stopping is part of it
    cut, rng, kills, proc = tmp_path / "cut", random.Random(0), 0, None
    jsonl = cut / "metrics.jsonl"
    for k in range(5):  # once during start-up, then at a random step of a random epoch
        cmd = ([f"resume={cut}"] if (cut / "config.yaml").exists() else [*args, f"hydra.run.dir={cut}"])
        proc = subprocess.Popen([sys.executable, "-m", "safetrain", *cmd], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if k == 0:
            time.sleep(rng.uniform(1.0, 4.0))
        else:
            epochs = len(jsonl.read_text().splitlines()) if jsonl.exists() else 0
            target = epochs + rng.randint(1, 3)
            while proc.poll() is None and not (jsonl.exists() and len(jsonl.read_text().splitlines()) >= target):
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is not None:  # it finished before the kill
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 3
    if proc.returncode != 0:
        done = run_cli(f"resume={cut}")
        assert done.returncode == 0, done.stderr[-3000:]
    same_run(whole, cut)
    assert not [p for p in cut.rglob("*") if p.name.endswith(".tmp")]  # the killed writes are cleaned up


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_a_run_killed_inside_an_epoch_resumes_from_that_step_bit_for_bit(tmp_path, loader):
    """trainer.checkpoint_minutes: SIGKILL in the middle of an epoch loses only the steps since the last checkpoint
    inside it; the resumed run starts after that step and ends with the tensors of a run never killed."""
    write_images(tmp_path / "imgs", classes=3, per_class=300, size=(12, 12))
    args = ["recipe=smoke", "data=imagefolder", f"data.root={tmp_path / 'imgs'}", f"data.loader={loader}",
            "data.batch_size=8", "trainer.max_epochs=3", "trainer.progress=false", "model.dropout=0.2",
            "data.augment=crop_flip", "trainer.checkpoint_minutes=0.002"]  # every 0.12 s: dozens inside an epoch
    assert run_cli(*args, f"hydra.run.dir={tmp_path / 'whole'}").returncode == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "safetrain", *args, f"hydra.run.dir={cut}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last, inside = cut / "checkpoints" / "last.pt", None
    while proc.poll() is None and not inside:  # killed as soon as a checkpoint inside epoch 2 exists
        if last.exists():
            ckpt = torch.load(last, weights_only=True)
            inside = ckpt["epoch"] == 1 and ckpt.get("sums")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert inside, "the run ended before a checkpoint inside epoch 2 was written"
    done = run_cli(f"resume={cut}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"resumed inside epoch 2, after step \d+ of \d+", done.stderr + done.stdout)
    same_run(tmp_path / "whole", cut)


def test_resume_extends_a_streamed_run_exactly_and_keeps_its_generators(tmp_path):
    write_images(tmp_path / "imgs", classes=3, per_class=40, size=(12, 12))
    base = ["data=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.loader=stream", "data.num_workers=2",
            "trainer.progress=false", "model=cnn_tiny", "data.batch_size=16"]
    whole, _ = compose("smoke", base + ["trainer.max_epochs=4"])
    run(whole, tmp_path / "whole")
    short, _ = compose("smoke", base + ["trainer.max_epochs=2"])
    run(short, tmp_path / "cut")
    run(saved_config(tmp_path / "cut", ["trainer.max_epochs=4", "data.num_workers=0", "data.disk_cache=false"]),
        tmp_path / "cut", resume=True)  # the files decoded where the first part read the disk cache
    same_run(tmp_path / "whole", tmp_path / "cut")


def test_a_run_stopped_before_its_first_epoch_ended_starts_over_in_place(tmp_path):
    cfg, _ = compose("smoke", ["trainer.max_epochs=2", "trainer.progress=false", "data.augment=crop_flip"])
    run(cfg, tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints")  # as if killed during epoch 1 of the second run of this config
    (tmp_path / "cut" / "metrics.json").unlink()
    run(saved_config(tmp_path / "cut"), tmp_path / "cut", resume=True)
    same_run(tmp_path / "whole", tmp_path / "cut")
    assert len(tensorboard_scalars(tmp_path / "cut", "train/loss")) == 2


def test_resume_refuses_what_would_not_end_as_the_uninterrupted_run(tmp_path):
    cfg, _ = compose("smoke", ["trainer.max_epochs=2", "trainer.progress=false"])
    run(cfg, tmp_path / "r")
    with pytest.raises(ConfigError, match=r"seed=4 \(the run has 0\) would change"):
        run(saved_config(tmp_path / "r", ["seed=4", "trainer.max_epochs=3"]), tmp_path / "r", resume=True)
    with pytest.raises(ConfigError, match=r"the run finished.*trainer\.max_epochs=N"):
        run(saved_config(tmp_path / "r"), tmp_path / "r", resume=True)
    with pytest.raises(ConfigError, match="there is no such folder"):  # not "no config.yaml in it"
        run(cfg, tmp_path / "nothing", resume=True)
    with pytest.raises(ConfigError, match=rf"a file of the run in {tmp_path / 'r'}: resume={tmp_path / 'r'}$"):
        run(cfg, tmp_path / "r" / "checkpoints" / "best.pt", resume=True)  # the checkpoint given for its run
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.yaml"):
        run(cfg, tmp_path / "empty", resume=True)
    one, _ = compose("smoke", ["trainer.max_epochs=2", "trainer.progress=false", "sched.name=onecycle"])
    run(one, tmp_path / "o")
    with pytest.raises(ConfigError, match=r"sched\.name=onecycle is sized to trainer\.max_epochs=2"):
        run(saved_config(tmp_path / "o", ["trainer.max_epochs=4"]), tmp_path / "o", resume=True)


def test_resume_refuses_data_that_changed_since_the_run_began(tmp_path):
    write_images(tmp_path / "imgs", classes=2, per_class=30, size=(8, 8))
    cfg, _ = compose("smoke", ["data=imagefolder", f"data.root={tmp_path / 'imgs'}", "trainer.max_epochs=1",
                               "trainer.progress=false", "data.batch_size=8"])
    run(cfg, tmp_path / "r")
    write_images(tmp_path / "imgs", classes=2, per_class=40, size=(8, 8), seed=1)  # more images, others rewritten
    with pytest.raises(ConfigError, match=r"\[M31\].*the data is not what the run trained on"):
        run(saved_config(tmp_path / "r", ["trainer.max_epochs=2"]), tmp_path / "r", resume=True)


@pytest.mark.slow  # end-to-end launches of the command line (the default tier is at its 10 minutes)
def test_the_command_line_says_how_to_resume_and_refuses_other_arguments(tmp_path):
    cut = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "safetrain", "recipe=smoke", "trainer.max_epochs=100000",
                             "trainer.early_stop_patience=0", "trainer.progress=false", f"hydra.run.dir={cut}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not ((cut / "metrics.jsonl").exists() and len((cut / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143 and f"python -m safetrain resume={cut}" in out
    assert f"resume={cut}" in json.loads((cut / "metrics.json").read_text())["interrupted"]
    again = run_cli("recipe=smoke", f"hydra.run.dir={cut}")
    assert again.returncode == 2 and f"continue it: python -m safetrain resume={cut}" in again.stderr
    bad = run_cli(f"resume={cut}", "-m", "hydra.run.dir=x")
    assert bad.returncode == 2 and "key=value settings only" in bad.stderr
    done = run_cli(f"resume={cut}", "trainer.max_epochs=1")  # fewer than it ran: refused
    assert done.returncode == 2 and re.search(r"already trained \d+ epochs, more than", done.stdout)


def _children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGTERM,  # SIGKILL: the slow tier (the default tier is near its 10 minutes)
                                 pytest.param(signal.SIGKILL, marks=pytest.mark.slow)])
def test_data_loader_workers_do_not_outlive_a_stopped_run(tmp_path, sig):
    root = write_images(tmp_path / "imgs", classes=2, per_class=300, size=(16, 16))
    proc = subprocess.Popen([sys.executable, "-m", "safetrain", "recipe=smoke", "data=imagefolder",
                             f"data.root={root}", "data.loader=stream", "data.disk_cache=false",  # decoding workers
                             "data.num_workers=2", "trainer.max_epochs=1000",
                             "trainer.early_stop_patience=0", "trainer.progress=false",
                             f"hydra.run.dir={tmp_path / 'r'}"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    workers, deadline = set(), time.time() + 120
    while len(workers) < 2 and time.time() < deadline and proc.poll() is None:
        if (tmp_path / "r" / "metrics.jsonl").exists():  # training: the loader's workers are up
            workers = _children(proc.pid)
        time.sleep(0.05)
    assert len(workers) >= 2
    proc.send_signal(sig)
    proc.wait(timeout=60)
    deadline = time.time() + 15  # a worker notices a killed parent within its 5 s status check
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in workers if _alive(p)]
