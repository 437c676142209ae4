"""mode=tune: an Optuna search whose trials are safetrain runs, pruned on the validation metric, kept in SQLite so
that it goes on after a kill, and handing back its best trial as a recipe."""
import json
import signal
import subprocess
import sys
import time

import pytest

from safetrain.cli import compose, main
from safetrain.run import run
from tests.conftest import REPO, run_cli

SMOKE = ["recipe=smoke", "mode=tune", "trainer.progress=false"]


def summary(search_dir) -> dict:
    return json.loads((search_dir / "summary.json").read_text())


def test_m07_a_search_prunes_chooses_on_validation_and_hands_back_a_recipe_that_repeats_its_best(tmp_path):
    s = tmp_path / "s"
    assert main([*SMOKE, "tune.trials=4", f"hydra.run.dir={s}"]) == 0
    out = summary(s)
    states = [t["state"] for t in out["trials"]]
    assert len(states) == 4 and "pruned" in states and "complete" in states, states
    pruned = next(t for t in out["trials"] if t["state"] == "pruned")
    stopped = json.loads((s / pruned["run_dir"] / "metrics.json").read_text())["stopped"]
    assert "pruned by the search" in stopped and f"after epoch {pruned['last_epoch']}" in stopped  # it says why
    assert (s / pruned["run_dir"] / "checkpoints" / "last.pt").exists()  # and keeps its run dir
    assert pruned["last_epoch"] < 3  # smoke trains 3 epochs: it stopped early
    complete = [t for t in out["trials"] if t["state"] == "complete"]
    assert out["best"]["trial"] == max(complete, key=lambda t: t["value"])["trial"]  # chosen on validation [M07]
    assert all("test_acc" in t for t in complete)  # the test score is shown for every trial, not what chooses
    text = (s / "summary.md").read_text()
    assert f"**Best: trial {out['best']['trial']}**" in text and (s / "search.png").stat().st_size > 10_000
    cfg, _ = compose("best", [], str(s))  # best.yaml, as `--config-dir SEARCH_DIR recipe=best` runs it
    assert run(cfg, tmp_path / "again")["best_val"] == out["best"]["value"]  # same seed, same machine


@pytest.mark.slow  # end-to-end launches of the command line (the default tier is at its 10 minutes)
def test_a_search_goes_on_after_a_kill_with_its_finished_trials_kept(tmp_path):
    import optuna

    s = tmp_path / "s"
    quick = [*SMOKE, "tune.pruner=none", "trainer.max_epochs=1"]
    assert main([*quick, "tune.trials=2", f"hydra.run.dir={s}"]) == 0
    before = summary(s)["trials"]
    study = optuna.load_study(study_name="safetrain", storage=f"sqlite:///{s / 'study.db'}")
    cut = study.ask()  # what a command killed in its third trial leaves: a trial the study thinks is running
    lr = cut.suggest_float("optim.lr", 1e-5, 1e-2, log=True)
    cut.suggest_float("optim.weight_decay", 1e-5, 0.1, log=True)
    assert main([f"resume={s}", "tune.trials=3"]) == 0
    after = summary(s)["trials"]
    assert after[:2] == before  # kept as they were, not run again
    assert after[2]["status"] == "interrupted" and after[3]["params"]["optim.lr"] == lr  # run again
    assert after[3]["state"] == "complete" and len(after) == 4
    # the same command again: the same search (tune.trials reached: nothing to do), found by its folder's name
    assert main([*quick, "tune.trials=3", f"hydra.run.dir={s}"]) == 0
    assert len(summary(s)["trials"]) == 4
    code = main([*quick, "tune.trials=3", "seed=1", f"hydra.run.dir={s}"])
    assert code == 2  # another search in the same folder: refused


def test_refused_and_diverged_trials_are_failed_trials_and_the_search_goes_on(tmp_path):
    s = tmp_path / "s"
    code = main([*SMOKE, "tune.trials=6", "tune.sampler=random", "tune.pruner=none", "trainer.max_epochs=1",
                 "optim=sgd", "optim.allow_unusual_lr=true", "trainer.grad_clip=0",
                 "tune.space.optim.lr=[choice,0.05,1000]", "tune.space.optim.weight_decay=null",
                 "+tune.space.data.batch_size=[choice,32,5000]", f"hydra.run.dir={s}"])
    trials = summary(s)["trials"]
    assert code == 0 and len(trials) == 6
    expect = {(0.05, 32): "done", (1000, 32): "stopped", (0.05, 5000): "refused", (1000, 5000): "refused"}
    seen = {(t["params"]["optim.lr"], t["params"]["data.batch_size"]): t["status"] for t in trials}
    assert seen == {k: expect[k] for k in seen} and len(set(seen.values())) == 3, seen
    refused = next(t for t in trials if t["status"] == "refused")
    assert "[M23]" in refused["note"] and not (s / refused["run_dir"] / "config.yaml").exists()  # no training


def test_a_refusal_no_searched_value_changes_stops_a_new_search_before_it_starts(tmp_path, capsys):
    s = tmp_path / "s"
    assert main(["recipe=imagefolder", f"data.root={tmp_path / 'missing'}", "mode=tune", f"hydra.run.dir={s}"]) == 2
    err = capsys.readouterr().err
    assert "data.root=" in err and "is not a folder" in err and "the search did not start" in err
    assert not (s / "study.db").exists() and not list(s.glob("trial_*"))  # the fixed command starts it anew


@pytest.mark.slow  # a 6-second budget spent on trials (the other tests cover the search itself)
def test_tune_max_minutes_ends_a_search_with_successive_halving_before_its_trials(tmp_path, caplog):
    s = tmp_path / "s"
    assert main([*SMOKE, "tune.trials=500", "tune.max_minutes=0.1", "tune.pruner=halving", f"hydra.run.dir={s}"]) == 0
    trials = summary(s)["trials"]
    assert 1 <= len(trials) < 500 and "tune.max_minutes=0.1 reached" in (s / "safetrain.log").read_text()
    assert {t["state"] for t in trials} <= {"complete", "pruned"}


@pytest.mark.parametrize("setting,says", [
    ("tune.space.optim.lr=[1e-3,5.0,log]", r"tune.space.optim.lr.*\[M16\] optim.lr=5.0"),
    ("tune.space.optim.weight_decay=[0.01,0.9]", r"tune.space.optim.weight_decay.*\[M21\]"),
    ("tune.space.optim.lr=[1e-3]", "not a search range"),
    ("tune.space.optim.lr=[0,1e-2,log]", "log scale needs a low end above 0"),
    ("tune.space.optim.lr=[1e-2,1e-3]", "low end must be below"),
    ("+tune.space.optim.lrr=[1e-3,1e-2]", "optim.lrr is not a setting.*Did you mean 'optim.lr'"),
    ("tune.sampler=grid", r"tune.sampler.*tpe"),
])
def test_m16_m21_a_search_space_beyond_the_sane_ranges_is_refused_before_any_trial(tmp_path, capsys, setting, says):
    import re

    assert main([*SMOKE, setting, f"hydra.run.dir={tmp_path / 's'}"]) == 2
    assert re.search(says, capsys.readouterr().err, re.S), setting
    assert not (tmp_path / "s" / "study.db").exists()


def test_without_optuna_the_message_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    assert main([*SMOKE, f"hydra.run.dir={tmp_path / 's'}"]) == 2
    assert 'pip install -e ".[tune]"' in capsys.readouterr().err


def test_a_search_is_not_run_under_torchrun_or_as_a_sweep(tmp_path, monkeypatch, capsys):
    assert main([*SMOKE, "-m", f"hydra.run.dir={tmp_path / 's'}"]) == 2
    assert "drop -m" in capsys.readouterr().err
    assert main([*SMOKE, "--cfg", "job", f"hydra.run.dir={tmp_path / 's'}"]) == 0  # prints, runs nothing
    assert "weight_decay:" in capsys.readouterr().out and not (tmp_path / "s").exists()
    assert main([*SMOKE, "--hydra-help", f"hydra.run.dir={tmp_path / 's'}"]) == 2
    assert "--hydra-help" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main([*SMOKE, f"hydra.run.dir={tmp_path / 's'}"]) == 2
    assert "not torchrun" in capsys.readouterr().err


@pytest.mark.slow  # a real SIGKILL in a subprocess, and the search run again to its end (about 40 s)
def test_a_search_killed_with_sigkill_goes_on_when_the_same_command_runs_again(tmp_path):
    command = [*SMOKE, "tune.trials=4", "tune.pruner=none", "trainer.max_epochs=30", "trainer.early_stop_patience=0"]
    proc = subprocess.Popen([sys.executable, "-m", "safetrain", *command], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 180
    metrics = []
    while time.time() < deadline and len(metrics) < 3:
        metrics = [line for p in tmp_path.glob("runs/smoke/tune_*/trial_001/metrics.jsonl")
                   for line in p.read_text().splitlines()]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    search_dir = next(tmp_path.glob("runs/smoke/tune_*"))
    first = json.loads((search_dir / "trial_000" / "metrics.json").read_text())
    out = run_cli(*command, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    trials = summary(search_dir)["trials"]
    assert [t["status"] for t in trials] == ["done", "interrupted", "done", "done", "done"]
    assert trials[0]["value"] == first["best_val"]  # trial 0 kept, not run again
    assert trials[2]["params"] == trials[1]["params"]  # the interrupted trial goes on ...
    assert trials[2]["run_dir"] == "trial_001" and "from its checkpoint" in trials[2]["note"]  # ... where it was
    lines = (search_dir / "trial_001" / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line)["epoch"] for line in lines if "train/loss" in line]
    assert epochs == list(range(1, 31))  # every epoch once: resumed, not started over
    assert sorted(int(e) for e in trials[2]["history"]) == list(range(1, 31))  # and the pruner was told every epoch


def test_one_command_at_a_time_in_a_search_dir_and_a_dead_commands_lock_is_taken_over(tmp_path):
    from safetrain.errors import ConfigError
    from safetrain.tune import LOCK, locked

    (tmp_path / LOCK).write_text("1")  # a live process (init) holds it
    with pytest.raises(ConfigError, match="being searched by another command"):
        with locked(tmp_path):
            pass
    for stale in ("999999999", ""):  # a pid no process has, a lock file cut short
        (tmp_path / LOCK).write_text(stale)
        with locked(tmp_path):
            assert (tmp_path / LOCK).read_text() == str(__import__("os").getpid())
        assert not (tmp_path / LOCK).exists()
