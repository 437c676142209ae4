"""`python -m safetrain resume=RUN_DIR`: a stopped run (a signal, SIGKILL, a full disk, a power cut) goes on from
its last complete epoch, in its own directory, with the config saved there.

The checkpoint holds everything that decides what happens next (checkpoint.Checkpointer), so a resumed run ends
with the same checkpoint tensors and metrics as one that was never stopped (same machine and thread count).
Only settings that cannot change that may differ from the saved config; `trainer.max_epochs` may extend a run
whose schedule and loss do not depend on it."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from omegaconf import OmegaConf

from safetrain.checkpoint import load_checkpoint
from safetrain.config import Config, to_container, validate
from safetrain.distributed import world
from safetrain.errors import ConfigError
from safetrain.optim import SCHEDULES
from safetrain.tracking import flatten

SAFE = ("trainer.max_epochs", "trainer.progress", "data.num_workers", "trainer.checkpoint_minutes",
        "data.disk_cache")  # may differ on resume (the raw cache gives the batches the files give; the JPEG one,
# the same batches within a few grey levels: data/stored.py)


def command(run_dir: Path, processes: int = 1) -> str:
    """The command that continues the run in `run_dir` (quoted for a shell), with as many processes as it started."""
    launch = "python -m safetrain" if processes == 1 else f"torchrun --nproc_per_node={processes} -m safetrain"
    return f"{launch} {shlex.quote(f'resume={run_dir}')}"


def finished(run_dir: Path) -> dict | None:
    """The final metrics.json of a run that went through its test, else None (unfinished or stopped)."""
    try:
        final = json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return final if "test_loss" in final else None


def saved_config(run_dir: Path, overrides: list[str] = ()) -> Config:
    """The config saved in `run_dir` with the command line's `overrides` on top (checked by `check`)."""
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        home = next((d for d in Path(run_dir).parents if (d / "config.yaml").is_file()), None)  # a file in a run
        raise ConfigError(f"[config] resume={run_dir}: " + (
            f"that is a file of the run in {home}: resume={home}" if Path(run_dir).is_file() and home else
            "there is no such folder. Give the directory of the run to go on with (the one that holds its "
            "config.yaml and checkpoints/)."))
    if not path.is_file():
        raise ConfigError(f"[config] resume={run_dir}: there is no config.yaml in it, so no run started there "
                          "(a run stopped before training began writes none). Start it again with its command.")
    return validate(OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides))))


def last_checkpoint(run_dir: Path) -> dict | None:
    """checkpoints/last.pt of the run, or None where the run stopped before its first epoch ended; a damaged file or
    a missing one beside best.pt is refused with what to do (starting over would overwrite best.pt)."""
    folder = Path(run_dir) / "checkpoints"
    last, best = folder / "last.pt", folder / "best.pt"
    if not last.exists():
        if best.exists():
            raise ConfigError(f"[config] resume={run_dir}: {best} exists but {last} does not, so the run cannot go on "
                              f"from its last epoch, and starting over would overwrite best.pt. Copy best.pt to "
                              f"last.pt to go on from the best epoch, or start a new run.")
        return None
    try:
        return load_checkpoint(last)
    except Exception as e:  # noqa: BLE001  cut short (a full disk, an unfinished copy) or not a checkpoint
        fix = f" To go on from the best epoch instead, copy {best} over it" if best.exists() else ""
        raise ConfigError(f"[config] resume={run_dir}: {last} cannot be read ({type(e).__name__}: {str(e)[:120]}): it "
                          f"was cut short or damaged.{fix}; or start a new run.") from None


def check(run_dir: Path, cfg: Config) -> dict | None:
    """Refuse a resume that could not end as the uninterrupted run would: a config.yaml edited since the checkpoint
    was written, other settings on the command line, or a finished run. -> the last checkpoint (read once here, for
    resume_point)."""
    saved = flatten(to_container(saved_config(run_dir)))
    ckpt = last_checkpoint(run_dir)
    trained = flatten(ckpt["config"]) if ckpt else saved
    edited = [k for k in sorted(saved.keys() | trained.keys()) if saved.get(k) != trained.get(k) and k not in SAFE]
    if edited:
        raise ConfigError(f"[config] resume={run_dir}: config.yaml was edited after the run trained: " + ", ".join(
            f"{k}={saved.get(k)} (the checkpoint was trained with {trained.get(k)})" for k in edited)
            + ". A resumed run goes on with the settings it trained with: put those values back in config.yaml, or "
            "start a new run with the new ones.")
    before, now = saved, flatten(to_container(cfg))
    changed = [k for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k) and k not in SAFE]
    if changed:
        raise ConfigError(f"[config] resume={run_dir}: " + ", ".join(f"{k}={now.get(k)} (the run has {before.get(k)})"
                                                                     for k in changed)
                          + f" would change what the run already trained. A resumed run keeps its config; only "
                          f"{', '.join(SAFE)} may be given. For other settings start a new run.")
    extended = now["trainer.max_epochs"] != before["trainer.max_epochs"]
    sized = [f"sched.name={cfg.sched.name}"] * (not SCHEDULES[cfg.sched.name][1]) + ["loss.balance=drw"] * (
        cfg.loss.balance == "drw")  # what depends on max_epochs from the first epoch on
    if extended and sized:
        raise ConfigError(f"[config] resume={run_dir} trainer.max_epochs={cfg.trainer.max_epochs}: "
                          f"{' and '.join(sized)} is sized to "
                          f"trainer.max_epochs={before['trainer.max_epochs']}, so the epochs already trained would not "
                          "be those of a longer run. Start a new run with the longer trainer.max_epochs.")
    final = finished(run_dir)
    if final and final["stopped_early"]:
        raise ConfigError(f"[config] resume={run_dir}: the run stopped early at epoch {final['epochs_run']} (no better "
                          f"val {final['selection_metric']} for trainer.early_stop_patience epochs); more epochs would "
                          "not change it. Start a new run with another trainer.early_stop_patience.")
    if final and not extended:
        processes = ckpt.get("processes", 1) if ckpt else 1
        raise ConfigError(f"[config] resume={run_dir}: the run finished (metrics.json has its test results). To train "
                          f"it longer: {command(run_dir, processes)} trainer.max_epochs=N (N > "
                          f"{cfg.trainer.max_epochs}).")
    return ckpt


def resume_point(run_dir: Path, ckpt: dict | None, data_facts: dict, max_epochs: int) -> dict | None:
    """`ckpt` (the last complete epoch's checkpoint, as `check` read it) if the run can go on from it; None: the run
    stopped before its first epoch ended, so it starts over in place. Temp files a killed process left are removed."""
    run_dir = Path(run_dir)
    for tmp in run_dir.rglob(".*.tmp"):
        tmp.unlink()
    path = run_dir / "checkpoints" / "last.pt"
    if ckpt is None:
        return None
    if "loader" not in ckpt:
        raise ConfigError(f"[config] {path} was written by an older safetrain without the state a resume needs "
                          "(the generators, the detectors). It still loads for inference; train a new run.")
    processes = ckpt.get("processes", 1)
    if processes != world():
        raise ConfigError(f"[config] resume={run_dir}: the run trained in {processes} process(es), this is {world()}; "
                          "each process's random generators are saved (dropout), so it goes on exactly only with as "
                          f"many processes as it started with: {command(run_dir, processes)}")
    if ckpt["data_facts"] != data_facts:
        changed = [k for k in data_facts if ckpt["data_facts"].get(k) != data_facts[k]]
        raise ConfigError(f"[M31] resume={run_dir}: the data is not what the run trained on (changed: "
                          f"{', '.join(changed)}), so it cannot go on as it was. Restore the data or start a new run.")
    if ckpt["epoch"] > max_epochs:
        raise ConfigError(f"[config] resume={run_dir}: the run already trained {ckpt['epoch']} epochs, more than "
                          f"trainer.max_epochs={max_epochs}.")
    return ckpt
