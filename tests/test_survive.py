"""A run that survives what users do: a reused run directory, a damaged cache, code smuggled in an override."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from safetrain.cli import compose
from safetrain.errors import ConfigError
from safetrain.run import run
from tests.conftest import REPO, run_cli


def test_m31_a_run_never_writes_into_a_directory_that_holds_another_run(tmp_path):
    cfg, _ = compose("smoke", ["trainer.max_epochs=2", "trainer.progress=false"])
    run(cfg, tmp_path / "run")
    before = {f: (tmp_path / "run" / f).read_bytes() for f in ("metrics.jsonl", "metrics.json", "config.yaml")}
    other, _ = compose("smoke", ["trainer.max_epochs=1", "trainer.progress=false", "seed=5"])
    with pytest.raises(ConfigError, match=r"\[M31\].*already holds a run.*hydra\.run\.dir"):
        run(other, tmp_path / "run")
    assert before == {f: (tmp_path / "run" / f).read_bytes() for f in before}  # untouched


@pytest.mark.slow  # four command-line runs (24 s): the API-level refusal above stays in the default tier
def test_the_command_line_refuses_a_used_run_dir_and_default_dirs_never_collide(tmp_path):
    out = run_cli("recipe=smoke", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'r'}")
    assert out.returncode == 0, out.stderr[-2000:]
    again = run_cli("recipe=smoke", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'r'}")
    assert again.returncode == 2 and "[M31]" in again.stderr
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 1  # the first run's epoch only
    for _ in range(2):  # default names: one directory per run, even within one second
        assert run_cli("recipe=smoke", "trainer.max_epochs=1", cwd=tmp_path).returncode == 0
    assert len(list((tmp_path / "runs" / "smoke").iterdir())) == 2


def test_a_damaged_cache_entry_is_discarded_and_rebuilt(tmp_path, caplog):
    cfg, _ = compose("smoke", ["trainer.max_epochs=1", "trainer.progress=false"])
    first = run(cfg, tmp_path / "a")
    stats = next((tmp_path.parent / os.environ["SAFETRAIN_CACHE"]).glob("stats/*.json"))
    stats.write_text('{"mean_std": [[0.5')  # cut off mid-write by a crash
    second = run(cfg, tmp_path / "b")
    assert second["test_loss"] == first["test_loss"] and f"cache entry {stats}" in caplog.text
    assert json.loads(stats.read_text())["mean_std"]  # rebuilt


def test_code_in_a_hydra_override_is_refused(tmp_path):
    out = run_cli("recipe=smoke", "+hydra.callbacks.x._target_=os.system", f"hydra.run.dir={tmp_path / 'r'}")
    assert out.returncode == 2 and "hydra.callbacks" in out.stderr and "can run code" in out.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # end-to-end launches of the command line (the default tier is at its 10 minutes)
def test_a_sweep_goes_on_after_a_refused_and_a_diverging_job_and_summarizes(tmp_path):
    out = run_cli("-m", "recipe=smoke", "trainer.max_epochs=1", "trainer.progress=false", "optim=sgd",
                  "optim.allow_unusual_lr=true", "trainer.grad_clip=0", "optim.lr=0.05,1000", "data.batch_size=32,5000",
                  "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sw'}", timeout=600)
    assert out.returncode == 1, out.stderr[-2000:]  # some jobs failed: said in the exit code, not by stopping
    rows = json.loads((tmp_path / "sw" / "summary.json").read_text())["jobs"]
    assert len(rows) == 8  # every job ran
    status = {(r["overrides"][-3], r["overrides"][-2], r["overrides"][-1]): r["status"] for r in rows}
    assert status[("optim.lr=0.05", "data.batch_size=32", "seed=0")] == "done"
    assert status[("optim.lr=1000", "data.batch_size=32", "seed=1")] == "stopped"  # diverged [M16]/[M26]
    assert status[("optim.lr=0.05", "data.batch_size=5000", "seed=0")] == "refused"  # [M23]
    summary = (tmp_path / "sw" / "summary.md").read_text()
    assert "| job | overrides | status |" in summary and "[M23]" in summary
    assert "Over seeds (mean +- std)" in summary  # the two done seeds of lr 0.05, batch 32


def test_every_job_of_a_sweep_is_validated_before_the_first_one_starts(tmp_path):
    out = run_cli("-m", "recipe=smoke", "trainer.max_epochs=1", "optim.lr=1e-3,0.5",
                  f"hydra.sweep.dir={tmp_path / 'sw'}")
    assert out.returncode == 2 and "[M16] optim.lr=0.5" in out.stderr
    assert not (tmp_path / "sw").exists()  # job 0 did not train first


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143),  # SIGINT: the slow tier (default tier near 10 min)
                                      pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_a_signal_stops_training_cleanly_keeping_the_checkpoints(tmp_path, sig, code):
    run_dir = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "safetrain", "recipe=smoke", "trainer.max_epochs=100000",
                             "trainer.early_stop_patience=0", "trainer.progress=false", f"hydra.run.dir={run_dir}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists()
                                          and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    final = json.loads((run_dir / "metrics.json").read_text())
    assert signal.Signals(sig).name in final["interrupted"]
    epochs = len((run_dir / "metrics.jsonl").read_text().splitlines())
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] in (epochs, epochs - 1) and "Training stopped" in (run_dir / "report.md").read_text()
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]  # no half-written file left


def test_a_full_disk_stops_training_with_a_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    from safetrain import checkpoint
    from safetrain.errors import TrainingStopped
    real, calls = checkpoint.save_torch, []

    def fills_up(path, obj):  # the disk fills up at epoch 2's last.pt
        calls.extend([path] if path.name == "last.pt" else [])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(checkpoint, "save_torch", fills_up)
    cfg, _ = compose("smoke", ["trainer.max_epochs=3", "trainer.progress=false"])
    with pytest.raises(TrainingStopped, match=r"\[io\] could not write .*last\.pt \(No space left on device\).*"
                                              r"checkpoints are kept \(best\.pt, last\.pt\)"):
        run(cfg, tmp_path / "run")
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    stopped = json.loads((tmp_path / "run" / "metrics.json").read_text())["stopped"]
    assert "No space left" in stopped and f"resume={tmp_path / 'run'}" in stopped  # it can go on once there is space


def test_a_run_dir_that_cannot_be_created_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    cfg, _ = compose("smoke", ["trainer.progress=false"])
    with pytest.raises(ConfigError, match=r"a_file is not a writable folder.*hydra\.run\.dir"):
        run(cfg, tmp_path / "a_file" / "run")


def test_a_run_dir_under_a_read_only_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        cfg, _ = compose("smoke", ["trainer.progress=false"])
        with pytest.raises(ConfigError, match="is not a writable folder"):
            run(cfg, locked / "sub" / "run")
    finally:
        locked.chmod(0o700)


@pytest.mark.slow  # end-to-end launches of the command line (the default tier is at its 10 minutes)
def test_exit_codes_are_the_documented_ones(tmp_path):
    """0 done, 2 refused (config or data), 1 stopped on purpose; 130/143 are tested with the signals."""
    assert run_cli("recipe=smoke", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'ok'}").returncode == 0
    refused = run_cli("recipe=smoke", "data.batch_size=5000", f"hydra.run.dir={tmp_path / 'no'}")
    assert refused.returncode == 2 and "[M23]" in refused.stdout + refused.stderr
    diverged = run_cli("recipe=smoke", "optim=sgd", "optim.allow_unusual_lr=true", "optim.lr=1000",
                       "trainer.grad_clip=0", f"hydra.run.dir={tmp_path / 'nan'}")
    assert diverged.returncode == 1 and "Training stopped" in diverged.stdout + diverged.stderr
    assert "resume=" not in diverged.stdout + diverged.stderr  # resuming would diverge again: not offered
