"""mode=tune: a hyperparameter search whose trials are ordinary safetrain runs.

`python -m safetrain recipe=NAME mode=tune [tune.trials=N] [tune.max_minutes=M] [tune.space.optim.lr=[1e-4,1e-2,log]]`

An Optuna study (TPE by default, seeded with `seed`) lives in SEARCH_DIR/study.db (SQLite). Each trial is the recipe
with the command line's settings and the sampled values, validated like any run (a refusal is a failed trial that
took no training time), trained in SEARCH_DIR/trial_NNN with every check on. After each epoch a trial tells the
pruner its validation selection metric [M29] (the value the run keeps its checkpoint by); a pruned trial stops there
(errors.Pruned: its report says why, and `resume=` would train it to its end). A diverged or stopped trial is a
failed trial and a crash is logged: the search goes on. Run again (the same command, or
`resume=SEARCH_DIR`), an interrupted search goes on with its finished trials, and the trial it was in goes on from
its run's last checkpoint (or starts over where there is none).
At the end: summary.md, summary.json, search.png and best.yaml, the best trial as a recipe that runs as is
(`python -m safetrain --config-dir SEARCH_DIR recipe=best`). Every trial's test score is reported, never used to
choose [M07]. Optuna is an optional extra (`pip install -e ".[tune]"`); one process only (not under torchrun)."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from omegaconf import OmegaConf

from safetrain import figures as draw
from safetrain.config import Config, nearest_key, schema_keys
from safetrain.errors import ConfigError, Interrupted, Pruned, SafetrainError
from safetrain.io import write_json, write_text
from safetrain.optim import OPTIMIZERS

STUDY, LOCK, BEST = "study.db", "tune.lock", "best"
log = logging.getLogger("safetrain")


def optuna():
    """Optuna, or a ConfigError naming the extra that installs it."""
    try:
        import optuna as module
    except ImportError:
        raise ConfigError("[config] mode=tune needs Optuna, which safetrain installs as an extra: "
                          "pip install -e \".[tune]\" (or pip install optuna).") from None
    module.logging.set_verbosity(module.logging.WARNING)  # the trials are told in safetrain's own log
    return module


class Dim(NamedTuple):
    """One searched setting: a range (uniform, log scale, integers) or a list of choices."""
    low: Any = None
    high: Any = None
    log: bool = False
    integer: bool = False
    choices: tuple = ()

    def suggest(self, trial, key: str):
        if self.choices:
            return trial.suggest_categorical(key, list(self.choices))
        if self.integer:
            return trial.suggest_int(key, self.low, self.high, log=self.log)
        return trial.suggest_float(key, self.low, self.high, log=self.log)

    def ends(self) -> list:
        return list(self.choices) or [self.low, self.high]

    def __str__(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        scale = " (log)" if self.log else " (integers)" if self.integer else ""
        return f"[{self.low:g}, {self.high:g}]{scale}"


RANGE_HELP = ("Write [low, high] (uniform), [low, high, log] (log scale), [low, high, int] (integers), [choice, a, b, "
              "...] or null (not searched), e.g. tune.space.optim.lr=[1e-4,1e-2,log].")


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict's leaves by dotted key ({"optim": {"lr": x}} -> {"optim.lr": x})."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in leaves(sub, f"{prefix}{key}.").items()}


def space(cfg: Config) -> dict[str, Dim]:
    """tune.space as ranges, the `null` entries left out."""
    out = {key: dim(key, spec, cfg) for key, spec in leaves(cfg.tune.space).items() if spec is not None}
    if not out:
        raise ConfigError("[config] tune.space is empty: the search has nothing to try. " + RANGE_HELP)
    return out


def dim(key: str, spec: Any, cfg: Config) -> Dim:
    where = f"[config] tune.space.{key}={spec}"
    if spec == "auto":
        if key != "optim.lr":
            raise ConfigError(f"{where}: auto is known for optim.lr only (the optimizer's sane range). {RANGE_HELP}")
        low, high = OPTIMIZERS[cfg.optim.name].lr_range
        return Dim(low, high, log=True)
    if isinstance(spec, list) and len(spec) > 1 and spec[0] == "choice":
        return Dim(choices=tuple(spec[1:]))
    numbers = isinstance(spec, list) and len(spec) in (2, 3) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec[:2])
    if not numbers or spec[2:] not in ([], ["log"], ["int"]):
        raise ConfigError(f"{where}: not a search range. {RANGE_HELP}")
    low, high = spec[:2]
    if not low < high:
        raise ConfigError(f"{where}: the low end must be below the high end, e.g. [{min(low, high)}, "
                          f"{max(low, high)}{', ' + spec[2] if spec[2:] else ''}].")
    if spec[2:] == ["log"] and low <= 0:
        raise ConfigError(f"{where}: a log scale needs a low end above 0, e.g. [{high / 1000:g}, {high}, log].")
    return Dim(low, high, log=spec[2:] == ["log"], integer=spec[2:] == ["int"] or all(isinstance(v, int)
                                                                                       for v in spec[:2]))


@dataclass
class Search:
    """What makes a search the same search (kept in the study; one that goes on must match it), and its limits."""
    recipe: str
    overrides: list  # the command line's settings, mode=tune, tune.trials and tune.max_minutes aside
    config_dir: Optional[str]
    space: dict  # tune.space, flat
    limits: list  # tune.trials=N, tune.max_minutes=M as last given (may change from one command to the next)

    def same(self) -> dict:
        return json.loads(json.dumps({k: v for k, v in asdict(self).items() if k != "limits"}))

    def folder(self) -> str:
        """The default search dir's name: the same command goes on with the same search."""
        return "tune_" + hashlib.sha256(json.dumps(self.same(), sort_keys=True).encode()).hexdigest()[:8]


@dataclass
class Job:
    """How to make a trial's config: `compose(overrides)` is the recipe with the search's settings, mode=train and
    `overrides` (cli.compose, validated); `recipe_file`: the recipe's YAML (best.yaml starts from it)."""
    search: Search
    compose: Callable[[list[str]], Config]
    recipe_file: Path
    groups: tuple  # the config groups (conf/*/): their options go into best.yaml's defaults list

    def overrides(self, params: dict) -> list[str]:
        return [*self.search.overrides, "mode=train", *(f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in params.items())]


def check_space(job: Job, dims: dict[str, Dim]) -> None:
    """Every end of every range is a config the catalogue accepts [M16, M21], before any trial runs."""
    for key, d in dims.items():
        if key not in schema_keys():
            raise ConfigError(f"[config] tune.space.{key}: {key} is not a setting, so it cannot be searched."
                              f"{nearest_key(key)}")
        for end in d.ends():
            try:
                job.compose(job.overrides({key: end}))
            except ConfigError as e:
                raise ConfigError(f"[config] tune.space.{key}={d}: the search could try {key}={end}, which is "
                                  f"refused:\n  {e}\nNarrow the range (or drop the setting with "
                                  f"tune.space.{key}=null).") from None


def saved_search(search_dir: Path) -> Search:
    """The search whose study is in `search_dir` (for resume=SEARCH_DIR)."""
    study = optuna().load_study(study_name="safetrain", storage=_storage(search_dir))
    return Search(**study.user_attrs["search"])


def _storage(search_dir: Path) -> str:
    return f"sqlite:///{(Path(search_dir) / STUDY).resolve()}"


@contextmanager
def locked(search_dir: Path):
    """One command at a time in a search dir (a lock left by a killed command is taken over)."""
    lock = Path(search_dir) / LOCK
    if lock.exists():
        try:
            pid = int(lock.read_text().strip())
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except (OSError, ValueError):  # gone, or a lock file cut short
            pid, alive = 0, False
        if alive:
            raise ConfigError(f"[config] {search_dir} is being searched by another command (process {pid}). Wait for "
                              "it, or stop it and run this command again to go on.")
    write_text(lock, str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def open_study(search_dir: Path, search: Search, cfg: Config):
    """The study in search_dir/study.db, new or the one an earlier command left (same search, or a ConfigError);
    trials a killed command left running are marked interrupted and queued to run again."""
    op = optuna()
    t, store = cfg.tune, op.storages.RDBStorage(_storage(search_dir))
    study = op.create_study(storage=store, study_name="safetrain", direction="maximize", load_if_exists=True)
    saved = study.user_attrs.get("search")
    if saved is not None and Search(**saved).same() != search.same():
        differ = ", ".join(k for k, v in Search(**saved).same().items() if v != search.same()[k])
        raise ConfigError(f"[config] {search_dir} holds another search (its {differ} differ: {saved}). Go on with "
                          f"that one with `python -m safetrain resume={search_dir}` (tune.trials=N and "
                          "tune.max_minutes=M may change), or give this search its own folder (hydra.run.dir=...).")
    study.set_user_attr("search", asdict(search))
    for trial in study.get_trials(deepcopy=False, states=(op.trial.TrialState.RUNNING,)):
        tid = store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name("safetrain"), trial.number)
        store.set_trial_user_attr(tid, "status", "interrupted")
        store.set_trial_user_attr(tid, "note", "the command running it was stopped: run again")
        store.set_trial_state_values(tid, op.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False, user_attrs={"resume_from": trial.user_attrs.get(
            "run_dir", "")})
    done = len(counted(study))
    # reseeded by the trials done: a resumed search does not draw its first trials' values again
    sampler = (op.samplers.TPESampler(seed=cfg.seed + done, n_startup_trials=min(10, max(3, t.trials // 3)))
               if t.sampler == "tpe" else op.samplers.RandomSampler(seed=cfg.seed + done))
    first = first_prunable_epoch(cfg)
    pruner = {"median": lambda: op.pruners.MedianPruner(n_startup_trials=min(5, max(2, t.trials // 5)),
                                                        n_warmup_steps=first),
              "halving": lambda: op.pruners.SuccessiveHalvingPruner(min_resource=first),
              "none": lambda: op.pruners.NopPruner()}[t.pruner]()
    return op.load_study(study_name="safetrain", storage=store, sampler=sampler, pruner=pruner)


def first_prunable_epoch(cfg: Config) -> int:
    """The pruner compares trials at the same epoch. While a schedule warms up (onecycle, cosine) the learning rate
    still climbs, and a trial with a high one looks worse there than it ends (on a CIFAR-10 subset, a trial pruned
    at epoch 1 of 8 would have been the search's best): no trial is pruned before its warm-up's last epoch."""
    warm = cfg.sched.warmup_fraction * cfg.trainer.max_epochs if cfg.sched.name in ("onecycle", "cosine") else 0
    return max(1, math.ceil(warm))


def counted(study) -> list:
    """The trials that count toward tune.trials: finished, not interrupted."""
    states = optuna().trial.TrialState
    return [t for t in study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.FAIL))
            if t.user_attrs.get("status") != "interrupted"]


def search(job: Job, cfg: Config, search_dir: Path) -> int:
    """Run the search in `search_dir` (new: checked by the caller with runtime.refuse_used_run_dir before its log
    goes there; or one to go on with) up to tune.trials trials (tune.max_minutes: no trial starts after that); write
    its summary and best recipe; the exit code: 0, or that of an interruption."""
    dims = space(cfg)
    check_space(job, dims)
    search_dir, fresh = Path(search_dir), not (Path(search_dir) / STUDY).exists()
    search_dir.mkdir(parents=True, exist_ok=True)
    with locked(search_dir):
        study = open_study(search_dir, job.search, cfg)
        t, start, code = cfg.tune, time.monotonic(), 0
        first = first_prunable_epoch(cfg)
        delayed = f" (from epoch {first}, the end of the warm-up)" if t.pruner != "none" and first > 1 else ""
        log.info("search %s: %d of %d trials done; %s; sampler %s, pruner %s%s", search_dir, len(counted(study)),
                 t.trials, "; ".join(f"{k} {d}" for k, d in dims.items()), t.sampler, t.pruner, delayed)
        while len(counted(study)) < t.trials:
            if t.max_minutes is not None and time.monotonic() - start > 60 * t.max_minutes:
                log.info("tune.max_minutes=%g reached: no new trial starts", t.max_minutes)
                break
            trial = study.ask()
            outcome = run_trial(study, trial, dims, job, search_dir)
            if isinstance(outcome, Interrupted):
                code = outcome.exit_code
                break
            status, note = outcome
            if status == "refused" and not any(key in note for key in dims):  # it would refuse every trial
                code = 2
                break
        if code == 2 and fresh and all(t.user_attrs.get("status") == "refused" for t in counted(study)):
            raise refused_at_once(search_dir, note)
        summarize(study, search_dir, job, dims)
    if code == 2:
        log.error("the search stopped: trial %d was refused for a reason that names none of the searched settings, so "
                  "every trial would be. Fix it, then go on: python -m safetrain resume=%s\n%s", trial.number,
                  search_dir, note)
    elif code:
        log.info("go on with this search: python -m safetrain resume=%s", search_dir)
    return code


def refused_at_once(search_dir: Path, why: str) -> ConfigError:
    """A new search whose first trials were refused for a reason that no searched value changes (a data folder
    that is not there): its study and trial folders go (only their logs were in them), so that the command, once
    fixed, starts it anew -> the error to raise, the reason first."""
    import shutil

    for trial_dir in search_dir.glob("trial_*"):
        shutil.rmtree(trial_dir)
    (search_dir / STUDY).unlink()
    return ConfigError(f"{why}\n(mode=tune: every trial would be refused for this, so the search did not start; "
                      "fix it and run the command again.)")


def run_trial(study, trial, dims: dict[str, Dim], job: Job, search_dir: Path):
    """One trial: its sampled values, its run, and what the study is told -> (status: done, pruned, refused,
    stopped or crashed; the reason) or the Interrupted error that ends the search."""
    from safetrain.run import run

    op = optuna()
    params = {key: d.suggest(trial, key) for key, d in dims.items()}
    resumed = resumable(search_dir, trial.user_attrs.get("resume_from"))
    run_dir, t0 = resumed or search_dir / f"trial_{trial.number:03d}", time.time()
    trial.set_user_attr("run_dir", run_dir.name)
    log.info("trial %d: %s -> %s", trial.number, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in params.items()), run_dir)
    state, value, status = op.trial.TrialState.FAIL, None, "done"
    note = f"went on with {run_dir.name} from its checkpoint" if resumed else ""
    try:
        # the interrupted trial's run goes on from its checkpoint (its epochs told to the pruner again), or a new one
        cfg = replay(trial, resumed) if resumed else job.compose(job.overrides(params))
        with trial_log(run_dir):
            final = run(cfg, run_dir, job.overrides(params), resume=bool(resumed),
                        prune=pruning(trial, cfg.tune.pruner))
        state, value = op.trial.TrialState.COMPLETE, final["best_val"]
        for key in ("best_epoch", "epochs_run", "test_acc", "test_macro_f1", "test_map", "selection_metric"):
            if final.get(key) is not None:
                trial.set_user_attr(key, final[key])
    except Pruned as e:
        state, status, note = op.trial.TrialState.PRUNED, "pruned", str(e)
    except Interrupted as e:
        study.enqueue_trial(params, skip_if_exists=False, user_attrs={"resume_from": run_dir.name})  # goes on
        trial.set_user_attr("status", "interrupted")
        trial.set_user_attr("note", "stopped by a signal: runs again when the search goes on")
        study.tell(trial, state=state)
        return e
    except SafetrainError as e:
        status, note = ("refused" if not (run_dir / "config.yaml").exists() else "stopped"), str(e)
    except Exception as e:  # noqa: BLE001  a crash ends one trial, not the search
        log.exception("trial %d crashed", trial.number)
        status, note = "crashed", f"{type(e).__name__}: {e}"
    for key, v in (("status", status), ("note", note[:500]), ("seconds", round(time.time() - t0, 1))):
        trial.set_user_attr(key, v)
    study.tell(trial, value if state == op.trial.TrialState.COMPLETE else None, state=state)
    log.info("trial %d %s%s", trial.number, status, f": val {value:.4f}" if value is not None else f": {note}")
    return status, note


def resumable(search_dir: Path, name: Optional[str]) -> Optional[Path]:
    """The run dir of an interrupted trial where its run can go on from a checkpoint (else it starts over)."""
    from safetrain.resume import finished, last_checkpoint

    folder = Path(search_dir) / name if name else None
    if folder is None or not (folder / "config.yaml").exists() or finished(folder):
        return None
    try:
        return folder if last_checkpoint(folder) else None
    except ConfigError as e:  # a damaged last.pt: the trial starts over in a new directory
        log.warning("trial in %s starts over: %s", folder, e)
        return None


def replay(trial, run_dir: Path) -> Config:
    """The interrupted trial's saved config (checked for resuming), its complete epochs reported to this trial."""
    from safetrain.resume import check, saved_config

    cfg = saved_config(run_dir)
    ckpt = check(run_dir, cfg)
    metric = ckpt["best"]["metric"]
    for epoch, scalars in enumerate(ckpt["history"], 1):
        trial.report(scalars[f"val/{metric}"], epoch)
    log.info("trial %d goes on with %s after epoch %d", trial.number, run_dir, len(ckpt["history"]))
    return cfg


def pruning(trial, pruner: str):
    """fit's prune hook: the epoch's validation value to the study, and a stop where the pruner says so."""
    def prune(epoch: int, metric: str, value: float) -> None:
        trial.report(value, epoch)
        if trial.should_prune():
            complete = optuna().trial.TrialState.COMPLETE,
            others = [t.intermediate_values[epoch] for t in trial.study.get_trials(deepcopy=False, states=complete)
                      if epoch in t.intermediate_values]
            there = f", where the complete trials' median was {statistics.median(others):.4f}" if others else ""
            raise Pruned(f"pruned by the search (tune.pruner={pruner}) after epoch {epoch}: val {metric} "
                         f"{value:.4f}{there}.")
    return prune


@contextmanager
def trial_log(run_dir: Path):
    """The trial's lines in its own run_dir/safetrain.log too (as Hydra does for a run)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "safetrain.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger("safetrain").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("safetrain").removeHandler(handler)
        handler.close()


def rows(study) -> list[dict]:
    """One dict per trial (queued ones aside), for summary.md/json and the figure."""
    states = optuna().trial.TrialState
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state in (states.WAITING, states.RUNNING):
            continue
        a = t.user_attrs
        out.append({"trial": t.number, "state": t.state.name.lower(), "status": a.get("status", "done"),
                    "value": t.value, "params": t.params, "last_epoch": max(t.intermediate_values, default=0),
                    "history": dict(t.intermediate_values), "run_dir": a.get("run_dir"),
                    "note": a.get("note", ""), "seconds": a.get("seconds"), "metric": a.get("selection_metric"),
                    **{k: a[k] for k in ("best_epoch", "test_acc", "test_macro_f1", "test_map") if k in a}})
    return out


def summarize(study, search_dir: Path, job: Job, dims: dict[str, Dim]) -> Optional[Path]:
    """summary.md, summary.json, search.png and (once a trial completed) best.yaml -> best.yaml's path."""
    table = rows(study)
    done = [r for r in table if r["state"] == "complete"]
    best = max(done, key=lambda r: r["value"]) if done else None
    metric = next((r["metric"] for r in done if r["metric"]), "metric")
    test = "test_map" if any("test_map" in r for r in table) else "test_acc"
    importances = _importances(study) if len(done) > 2 else {}
    recipe = write_recipe(job, best, metric, search_dir) if best else None
    fig = draw.search_history(table, metric, importances)
    if fig is not None:
        draw.save(fig, search_dir / "search.png")
    text = summary_text(table, best, metric, test, job, dims, importances, recipe, search_dir)
    write_text(search_dir / "summary.md", text)
    write_json(search_dir / "summary.json", {"search": asdict(job.search), "metric": metric, "trials": table,
                                             "best": best, "importances": importances,
                                             "recipe": recipe and str(recipe)})
    log.info("search summary: %s%s", search_dir / "summary.md",
             f"; best trial {best['trial']}: val {metric} {best['value']:.4f}; its recipe: python -m safetrain "
             f"--config-dir {search_dir} recipe={BEST}" if best else "; no trial completed")
    return recipe


def _importances(study) -> dict[str, float]:
    """Each searched setting's share of the metric's variation (Optuna's default evaluator), or {} where the
    completed trials cannot tell."""
    try:
        return {k: round(float(v), 4) for k, v in optuna().importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError, ZeroDivisionError) as e:
        log.info("parameter importance not computed: %s", e)
        return {}


def summary_text(table, best, metric, test, job: Job, dims, importances, recipe, search_dir) -> str:
    n = {s: sum(r["state"] == s for r in table) for s in ("complete", "pruned", "fail")}
    s, test_name = job.search, test.replace("_", " ").replace("map", "mAP")
    lines = [f"# Search: recipe {s.recipe}", "",
             f"Settings: {' '.join(s.overrides) or '(the recipe as is)'}; searched: "
             + "; ".join(f"`{k}` {d}" for k, d in dims.items()) + ".",
             f"Objective: val {metric} (the value each run keeps its checkpoint by), maximised; the {test_name} of "
             "every trial is shown, never used to choose [M07].",
             f"{len(table)} trials: {n['complete']} complete, {n['pruned']} pruned, {n['fail']} failed "
             f"({sum(r['seconds'] or 0 for r in table) / 60:.1f} minutes).", ""]
    if best:
        lines += [f"**Best: trial {best['trial']}**, val {metric} {best['value']:.4f}"
                  + (f", {test_name} {best[test]:.4f}" if best.get(test) is not None else "") + ", with "
                  + ", ".join(f"`{k}={_short(v)}`" for k, v in best["params"].items()) + ".",
                  f"As a recipe: `{recipe.name}` (`python -m safetrain --config-dir {search_dir} recipe={BEST}`).", ""]
    if importances:
        lines += ["Importance (share of the metric's variation): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()) + ".", ""]
    lines += ["![search](search.png)", "", f"| trial | {' | '.join(dims)} | state | val {metric} | epochs | "
              f"{test_name} | seconds | note |", "|" + "---|" * (len(dims) + 7)]
    shown = [r["value"] if r["value"] is not None else r["history"].get(r["last_epoch"]) for r in table]
    lines += [f"| {r['trial']} | " + " | ".join(_short(r["params"].get(k, "")) for k in dims)
              + f" | {r['status']} | {_num(value)} | {r['last_epoch']} | {_num(r.get(test))} | {r['seconds'] or ''} | "
              f"{r['note'].splitlines()[0] if r['note'] else ''} |" for r, value in zip(table, shown)]
    return "\n".join(lines) + "\n"


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _num(x) -> str:
    return "" if x is None else f"{x:.4f}"


def write_recipe(job: Job, best: dict, metric: str, search_dir: Path) -> Path:
    """best.yaml: the recipe's YAML with the search's settings and the best trial's values, a recipe that
    `python -m safetrain --config-dir SEARCH_DIR recipe=best` runs as is (same seed: the same trial)."""
    node = OmegaConf.load(job.recipe_file)
    defaults = list(node.pop("defaults", ["config", "_self_"]))
    settings = [o.lstrip("+") for o in job.overrides(best["params"]) if not o.startswith("~")]
    for o in settings:
        key, value = o.split("=", 1)
        if key in job.groups:  # a config group: its option in the defaults list
            entry = next((e for e in defaults if isinstance(e, dict) and f"override {key}" in e), None)
            if entry is None:
                at = defaults.index("_self_") if "_self_" in defaults else len(defaults)
                defaults.insert(at, {f"override {key}": value})
            else:
                entry[f"override {key}"] = value
        else:
            node = OmegaConf.merge(node, OmegaConf.from_dotlist([o]))
    if "tune" in node:
        node.pop("tune")  # the recipe trains; a new search starts from the recipe it was made from
    path = search_dir / f"{BEST}.yaml"
    head = (f"# The best trial of the search in {search_dir} (trial {best['trial']}: val {metric} {best['value']:.4f})"
            f", from recipe {job.search.recipe}.\n# python -m safetrain --config-dir {search_dir} recipe={BEST}\n")
    write_text(path, head + OmegaConf.to_yaml(OmegaConf.create({"defaults": defaults, **OmegaConf.to_container(node)})))
    return path
