"""Does mode=tune pay? A search with pruning against the same number of trials without, and the recipe's default.

    python benchmarks/search.py [--cifar PATH_TO_cifar10-jpeg.tar.gz] [--trials 16] [--epochs 8]

Data: a CIFAR-10 subset from the JPEG copy (--train images a class for training and validation, --test a class for
the test), or scikit-learn's handwritten digits when the tarball is missing. Everything runs as a user runs it, on
the command line (`python -m safetrain recipe=imagefolder data.root=... [mode=tune ...]`), on the CPU:
1. the recipe's default settings: one run, its test accuracy;
2. mode=tune with the default pruner (median) and 3. the same search without pruning (tune.pruner=none), both
   TPE with the same seed over the recipe's default space (optim.lr, optim.weight_decay; --space adds settings),
   --trials trials each;
4. the best trial's recipe (best.yaml) run again: its validation accuracy against the trial's;
5. a search killed with SIGKILL in its third trial and run again: the finished trials kept.
Printed: each search's wall time, its best trial (val, test), the ratio of wall times, and the time each search
took to reach the best validation accuracy the pruned search found (its trials' seconds added up in order). One
JSON line at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.diagnosis import TARBALL, cifar_subset, digits_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> tuple[int, float]:
    """`python -m safetrain ARGS` -> (exit code, wall seconds)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "safetrain", *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
    return out.returncode, time.perf_counter() - t0


def searched(search_dir: Path, wall: float) -> dict:
    s = json.loads((search_dir / "summary.json").read_text())
    states = [t["state"] for t in s["trials"]]
    return {"wall_s": round(wall), "trials": len(states), "complete": states.count("complete"),
            "pruned": states.count("pruned"), "failed": states.count("fail"), "best_trial": s["best"]["trial"],
            "best_val": s["best"]["value"], "best_test": s["best"].get("test_acc"), "params": s["best"]["params"],
            "trial_seconds": [t["seconds"] for t in s["trials"]], "values": [t["value"] for t in s["trials"]]}


def time_to_reach(run: dict, target: float) -> float | None:
    """Seconds of trials, in order, until a trial's value reached `target` (None: never)."""
    spent = 0.0
    for seconds, value in zip(run["trial_seconds"], run["values"]):
        spent += seconds or 0
        if value is not None and value >= target - 1e-9:
            return spent
    return None


def killed_and_resumed(base: list[str], work: Path) -> dict:
    """A search killed with SIGKILL once its third trial has trained an epoch, then the same command again."""
    d = work / "killed"
    command = [*base, "mode=tune", "tune.trials=4", f"hydra.run.dir={d}"]
    proc = subprocess.Popen([sys.executable, "-m", "safetrain", *command], cwd=work, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    while proc.poll() is None and not (d / "trial_002" / "metrics.jsonl").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = sorted(p.parent.name for p in d.glob("trial_*/metrics.json"))  # finished trials (done or pruned)
    code, wall = cli(*command, cwd=work)
    trials = json.loads((d / "summary.json").read_text())["trials"]
    return {"exit": code, "finished_before_kill": before, "statuses": [t["status"] for t in trials],
            "kept": all(t["status"] != "interrupted" for t in trials if t["run_dir"] in before),
            "rerun_wall_s": round(wall)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cifar", type=Path, default=TARBALL)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--train", type=int, default=500, help="CIFAR-10 training images a class")
    ap.add_argument("--test", type=int, default=200, help="CIFAR-10 test images a class")
    ap.add_argument("--space", nargs="*", default=[], help="tune.space settings added to the recipe's, e.g. "
                    "+tune.space.data.batch_size=[choice,64,128,256]")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if a.cifar.exists():
            root, name = cifar_subset(a.cifar, work / "cifar", a.train, a.test), "CIFAR-10 subset"
        else:
            root, name = digits_folder(work / "digits"), "digits"
        base = ["recipe=imagefolder", f"data.root={root}", f"trainer.max_epochs={a.epochs}", "trainer.progress=false"]
        base += [] if name != "digits" else ["data.hflip_keeps_label=false"]
        code, wall = cli(*base, f"hydra.run.dir={work / 'default'}", cwd=work)
        default = json.loads((work / "default" / "metrics.json").read_text())
        print(f"{name}, {a.epochs} epochs; the recipe's default: val {default['best_val']:.4f}, test "
              f"{default['test_acc']:.4f}, {wall:.0f} s", flush=True)
        runs = {}
        for label, extra in (("pruned (median)", []), ("no pruning", ["tune.pruner=none"])):
            d = work / label.split()[0]
            code, wall = cli(*base, "mode=tune", f"tune.trials={a.trials}", *a.space, *extra, f"hydra.run.dir={d}",
                             cwd=work)
            runs[label] = searched(d, wall)
            r = runs[label]
            print(f"search {label}: {r['trials']} trials ({r['complete']} complete, {r['pruned']} pruned, "
                  f"{r['failed']} failed) in {r['wall_s']} s; best trial {r['best_trial']}: val {r['best_val']:.4f}, "
                  f"test {r['best_test']:.4f}, {r['params']}", flush=True)
        p, n = runs["pruned (median)"], runs["no pruning"]
        reach, own = time_to_reach(n, p["best_val"]), time_to_reach(p, p["best_val"])
        code, _ = cli("--config-dir", str(work / "pruned"), "recipe=best", f"hydra.run.dir={work / 'again'}", cwd=work)
        again = json.loads((work / "again" / "metrics.json").read_text())["best_val"]
        print(f"wall without/with pruning: {n['wall_s'] / p['wall_s']:.2f}x; val {p['best_val']:.4f} (the pruned "
              f"search's best) reached after {own:.0f} s of trials with pruning, "
              + (f"{reach:.0f} s without ({reach / own:.2f}x)" if reach else "never without"), flush=True)
        print(f"best.yaml run again: val {again:.4f} (trial: {p['best_val']:.4f})", flush=True)
        kill = killed_and_resumed(base, work)
        print(f"killed in trial 2 and run again: exit {kill['exit']}, statuses {kill['statuses']}", flush=True)
        print(json.dumps({"data": name, "epochs": a.epochs, "space": a.space, "default": {"val": default["best_val"],
                          "test": default["test_acc"]}, "searches": runs,
                          "time_to_reach_s": {"pruned": own, "no pruning": reach},
                          "best_yaml_val": again, "killed": kill}))


if __name__ == "__main__":
    main()
