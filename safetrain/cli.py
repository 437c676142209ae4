"""`python -m safetrain recipe=NAME [overrides]`: Hydra entry point.

A recipe is a primary config in recipes/ (or in the user's `--config-dir`) whose defaults
list starts from conf/config.yaml. The config is composed and validated before Hydra starts
the job, so a bad key or value fails within seconds with a message, before any data is read.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import shlex
import sys
import time
from pathlib import Path

from dataclasses import dataclass
from typing import Optional

from safetrain import distributed as dist
from safetrain.errors import ConfigError, Interrupted, SafetrainError, TrainingStopped
from safetrain.io import write_json
from safetrain.resume import command as resume_cmd
from safetrain.runtime import refuse_used_run_dir
from safetrain.sweep import job_overrides, record, summarize

PKG = Path(__file__).resolve().parent


def _bundled(name: str) -> Path:
    """conf/ and recipes/ sit inside the package in a wheel and beside it in a checkout."""
    for base in (PKG / name, PKG.parent / name):
        if base.is_dir():
            return base
    raise FileNotFoundError(f"safetrain's {name}/ folder is missing from {PKG} and {PKG.parent}")


CONF_DIR, RECIPES_DIR = _bundled("conf"), _bundled("recipes")


def _register_schema() -> None:
    """conf/config.yaml starts from `schema`: every key exists, typed, whatever the YAML mentions."""
    from hydra.core.config_store import ConfigStore

    from safetrain.config import Config

    ConfigStore.instance().store(name="safetrain_schema", node=Config)


_register_schema()


def list_recipes(extra_dir: str | None = None) -> str:
    lines = ["usage: python -m safetrain recipe=NAME [key=value ...]", "", "recipes:"]
    for d in filter(None, [RECIPES_DIR, extra_dir and Path(extra_dir)]):
        for f in sorted(Path(d).glob("*.yaml")):
            first = next((ln[1:].strip() for ln in f.read_text().splitlines() if ln.startswith("#")), "")
            lines.append(f"  {f.stem:<16} {first}")
    lines += ["", "e.g. python -m safetrain recipe=smoke",
              "     python -m safetrain recipe=cifar10 trainer.max_epochs=5",
              "Your own recipe: python -m safetrain --config-dir my_recipes recipe=mine"]
    return "\n".join(lines)


def compose(recipe: str, overrides: list[str], config_dir: str | None = None):
    """Compose a recipe with overrides (without running it) and validate it -> (Config, raw)."""
    import yaml
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from safetrain.config import validate

    # The recipe folder is Hydra's primary config dir and conf/ joins through hydra.searchpath
    # (a primary config found only through hydra.searchpath is not seen: Hydra caches the miss).
    main_dir = Path(config_dir).resolve() if config_dir else RECIPES_DIR
    try:
        with initialize_config_dir(str(main_dir), version_base="1.3"):
            raw = hydra_compose(recipe, overrides=[*overrides, _searchpath()])
    except HydraException as e:
        raise _explain(e, recipe, overrides, config_dir) from None
    except yaml.MarkedYAMLError as e:  # a recipe file (often a fork being edited) that is not YAML
        raise _not_yaml(e) from None
    return validate(raw), raw


YAML_HINTS = {"'\\t'": "YAML indents with spaces, never tabs: replace the tab with spaces",
              "expected ':'": "a setting is written `key: value`, with a space after the colon",
              "mapping values are not allowed": "check these lines: each setting 2 spaces under its group (`optim:` "
                                                "then `  lr: 0.1`), and a space after each colon (`key: value`)"}


def _not_yaml(e):
    """A YAML syntax error in a recipe file: the file, its lines there as written, and what usually causes it."""
    mark = e.context_mark or e.problem_mark  # where what failed began (the key without its space), else where
    try:
        lines = Path(mark.name).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    shown = "".join(f"\n  {i + 1}: {lines[i]}" for i in range(max(0, mark.line - 1), min(len(lines), mark.line + 1)))
    hint = next((h for k, h in YAML_HINTS.items() if k in f"{e.problem} {e.context}"), "fix the syntax there")
    return ConfigError(f"[config] {mark.name}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML "
                       f"({e.problem}):{shown}\n{hint[0].upper() + hint[1:]}.")


def _recipe_file(recipe: str, config_dir: str | None) -> str:
    """A recipe given as a file, or a file Hydra does not read (.yml): the command line that reads it."""
    folders = [Path(d) for d in (config_dir, ".") if d]
    names = (recipe, f"{recipe}.yml", f"{recipe}.yaml")
    candidates = [Path(recipe).expanduser(), *(d / n for d in folders for n in names)]
    f = next((f for f in candidates if f.is_file() and f.suffix in (".yaml", ".yml")), None)
    if f is None:
        return ""
    rename = f" once renamed {f.stem}.yaml (Hydra reads .yaml files only)" if f.suffix == ".yml" else ""
    return (f" {f} is a recipe file; recipes are read from safetrain's folder and from the one --config-dir names: "
            f"python -m safetrain --config-dir {f.parent} recipe={f.stem}{rename}.")


def _searchpath() -> str:
    return f"hydra.searchpath=[file://{CONF_DIR},file://{RECIPES_DIR}]"


def _explain(e: Exception, recipe: str, overrides: list[str], config_dir: str | None):
    """Hydra's composition errors, restated with the key, the problem and the fix."""
    from safetrain.config import ConfigError, did_you_mean, nearest_key

    msg = f"{e}\n{e.__cause__ or ''}"
    unreadable = getattr(e, "override", None) or next(  # Hydra's OverrideParseException names it; a comma does not
        (ov for ov in overrides if "Ambiguous value" in msg and f"'{ov}'" in msg), None)
    if unreadable:
        return _quote_it(unreadable, msg)
    if "Cannot find primary config" in msg:
        return ConfigError(f"[config] no recipe named '{recipe}'.{_recipe_file(recipe, config_dir)}\n\n"
                           f"{list_recipes(config_dir)}")
    if "No match in the defaults list" in msg:  # `override data: ...` in a recipe whose defaults lack `- config`
        return ConfigError(f"[config] recipe '{recipe}': {msg.splitlines()[0].split(': ', 1)[-1]} A recipe's defaults "
                           "list starts with `- config`, then its `- override GROUP: NAME` lines, then `- _self_` (as "
                           "in recipes/imagefolder.yaml).")
    if "Could not find '" in msg:  # a group option: data=cifar1
        group, value = msg.split("Could not find '")[1].split("'")[0].split("/", 1)
        options = sorted(p.stem for p in (CONF_DIR / group.strip()).glob("*.yaml"))
        hint = (_architecture(value) if group.strip() == "model" else "") or did_you_mean(value, options)
        return ConfigError(f"[config] {group}={value}: no such option. Choose one of {options}.{hint}")
    for ov in sorted(overrides, key=lambda o: -len(o.split("=", 1)[0])):  # model.dropout before model
        key = ov.split("=", 1)[0].lstrip("+~")
        if key in msg or f"'{key.split('.')[-1]}'" in msg:
            if "not in" in msg or "Could not override" in msg or "Could not append" in msg:
                return ConfigError(f"[config] unknown setting '{key}' in `{ov}`.{nearest_key(key)}")
            value_line = next((ln.strip() for ln in msg.splitlines() if ln.strip().startswith("Value")), msg)
            return ConfigError(f"[config] {key}: {value_line} (in `{ov}`).")
    if "full_key:" in msg:  # a key the recipe sets that the schema lacks (e.g. a _target_)
        key = msg.split("full_key:")[1].split()[0]
        near = "" if key.split(".")[-1].startswith("_") else nearest_key(key)
        return ConfigError(f"[config] recipe '{recipe}' sets '{key}', which is not a setting.{near} Remove "
                           "it from the recipe (safetrain builds objects from registry names, never from _target_).")
    return ConfigError(f"[config] {msg.splitlines()[0]}")


def _architecture(name: str) -> str:
    """model=resnet18: a torchvision (or, installed, timm) architecture given as safetrain's model group."""
    import torchvision

    if name.lower() in torchvision.models.list_models():
        return (f" {name} is one of torchvision's models: model=torchvision model.arch={name.lower()} (from scratch; "
                "add model.weights=DEFAULT for its ImageNet weights from torch's cache).")
    if importlib.util.find_spec("timm") is not None:
        import timm

        if timm.list_models(name) or timm.list_models(name.split(".")[0]):
            return f" {name} is one of timm's models: model=timm model.arch={name}."
    return ""


PLAIN = re.compile(r"[A-Za-z0-9_/\\+.$*%@?|: -]")  # what Hydra's override syntax reads in a value without quotes


def _quote_it(override: str, msg: str):
    """An override Hydra's grammar cannot read (a path with `~`, `(1)`, an accent or a comma): how to quote it."""
    from safetrain.config import ConfigError, _field_type

    key, _, value = override.partition("=")
    if value[:1] in "[{":  # meant as a list or a dict: Hydra's own words say what is wrong with it
        return ConfigError(f"[config] `{override}`: {msg.splitlines()[0]}. A list is written key=[a,b,c].")
    kind = _field_type(key.lstrip("+~"))
    if kind in ("int", "float", "bool"):  # quotes would make it a string: say what the setting takes
        return ConfigError(f"[config] `{override}`: {key} takes a plain {kind} (for example {key}="
                           f"{ {'int': 3, 'float': 0.5, 'bool': 'true'}[kind]}); Hydra cannot read `{value}`.")
    odd = "".join(dict.fromkeys(c for c in value if not PLAIN.fullmatch(c)))
    line = _written(key, value)
    home = " (the shell puts your home folder for $HOME; Hydra does not expand ~)" if "$HOME" in line else ""
    return ConfigError(f"[config] `{override}`: Hydra's command-line syntax does not read "
                       f"{' '.join(f'`{c}`' for c in odd)} in a value without quotes. Write it as: {line}{home}")


def _readable(overrides: list[str]) -> None:
    """Every override as Hydra's grammar will read it, refused with how to write it where it cannot."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise _quote_it(e.override, e.message) from None


def _written(key: str, value: str) -> str:
    """`key=value` as a shell passes it whole to Hydra: $HOME for a leading ~ (Hydra does not expand it; the shell
    does, inside double quotes), the value in Hydra's quotes inside the shell's where Hydra needs them."""
    if value == "~" or value.startswith("~/"):
        home = "$HOME" + value[1:]
        if all(PLAIN.fullmatch(c) for c in home):
            return f'"{key}={home}"'
        if not set(home) & set('"`\\'):
            return f'"{key}=\\"{home}\\""'
    return f'"{key}=\\"{value}\\""' if "'" in value else f"'{key}=\"{value}\"'"


# Hydra's own settings a command line may change: where runs go and what they are called. Everything else under
# `hydra` (callbacks, logging handlers, env_set, launchers, ...) can run code or write anywhere: recipes and
# --config-dir folders are code the user trusts, command-line overrides are not.
HYDRA_SAFE = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.job.name", "hydra.verbose")
OPTION = re.compile(r"[A-Za-z0-9_.,()-]+")  # a config-group option (or a sweep over options), never a path


def refuse_code_overrides(overrides: list[str]) -> None:
    """Only the known-safe Hydra settings, and config-group options by name (data=cifar10), on the command line."""
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    for ov in overrides:
        key, _, value = ov.partition("=")
        bare = key.lstrip("+~")
        if bare == "hydra" or bare.startswith("hydra/") or (bare.startswith("hydra.") and bare not in HYDRA_SAFE):
            raise ConfigError(f"[config] `{ov}`: {bare} is one of Hydra's own settings, which can run code or write "
                              f"files anywhere; only {', '.join(HYDRA_SAFE)} are accepted on the command line. Put "
                              "others in a recipe you trust (--config-dir) if you really need them.")
        if (bare in groups or "/" in bare) and (not OPTION.fullmatch(value) or ".." in value):
            options = sorted(p.stem for p in (CONF_DIR / bare.split("/")[0]).glob("*.yaml"))
            raise ConfigError(f"[config] `{ov}`: {bare} takes the name of an option, not a path. Choose one of "
                              f"{options}, or put your own YAML in a recipe folder you trust (--config-dir).")


@dataclass(frozen=True)
class Command:
    """The command line, read once: what to do (`kind`, a key of COMMANDS) and with what."""
    kind: str  # list, train, doctor, sweep, tune, resume, predict, evaluate, export
    settings: list[str]  # key=value settings (and Hydra's flags, for train/doctor/sweep)
    recipe: Optional[str] = None
    run_dir: Optional[Path] = None  # resume (and tune): the run (the search) to go on with


def parse(argv: list[str]) -> Command:
    """mode=predict|evaluate|export (the checkpoint has the recipe), resume=RUN_DIR (a run or a search), recipe=NAME
    (train, doctor, tune, or a sweep with -m), or nothing: the list of recipes."""
    modes = {a.split("=", 1)[1] for a in argv if a.startswith("mode=")}
    after = next((m for m in ("predict", "evaluate", "export") if m in modes), None)
    if after:  # the checkpoint has the recipe
        return Command(after, [a for a in argv if not a.startswith("recipe=")])
    resumed = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
    if resumed is not None:
        return Command("resume", [a for a in argv if not a.startswith("resume=")], run_dir=Path(resumed))
    recipe = next((a.split("=", 1)[1] for a in argv if a.startswith("recipe=")), None)
    rest = [a for a in argv if not a.startswith("recipe=")]
    if recipe is None:
        return Command("list", rest)
    kind = next((m for m in ("tune", "crossfit") if m in modes), None) or \
        ("sweep" if {"-m", "--multirun"} & set(rest) else "doctor" if "doctor" in modes else "train")
    return Command(kind, rest, recipe)


def main(argv: list[str] | None = None) -> int:
    command = parse(list(sys.argv[1:] if argv is None else argv))
    try:
        refuse_flags(command.settings)
        return COMMANDS[command.kind](command)
    except SafetrainError as e:  # a refusal before any run started: its real type and its row ID
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before a run started (composing, Hydra's setup) or after it ended
        print("Interrupted: SIGINT received before a run began (or after it ended); run the command again.",
              file=sys.stderr)
        return 130
    finally:
        dist.close()  # under torchrun: leave the process group before exit


def list_command(command: Command) -> int:
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(command.settings)
    print(list_recipes(args.config_dir))
    if args.overrides:  # settings without a recipe: data.root=photos/ alone
        from safetrain.data.sources import TABLES

        data = " data=csv" if any(o.startswith("data.root=") and o.lower().endswith(TABLES)
                                  for o in args.overrides) else ""
        print(f"\nNo recipe given (recipe=NAME). For your own images: python -m safetrain "
              f"recipe=imagefolder{data} {' '.join(shlex.quote(o) for o in args.overrides)}", file=sys.stderr)
    return 0 if not command.settings else 2


def refuse_flags(argv: list[str]) -> None:
    """`--epochs 3`, `--lr=0.01`: argparse habits, which Hydra answers with its usage. Refused with the key=value
    that says it."""
    from hydra._internal.utils import get_args_parser
    from safetrain.config import ConfigError, nearest_key

    known = {s for a in get_args_parser()._actions for s in a.option_strings} | {"--local-rank", "--local_rank"}
    # (the last two: what torch.distributed.launch, torchrun's predecessor, adds to the command line)
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and flag not in known:
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            value = value if eq else nxt if nxt and "=" not in nxt and not nxt.startswith("-") else "..."
            key = flag[2:].replace("-", "_")
            near = re.search(r"'([\w.]+)'", nearest_key(key))
            given = arg if eq else f"{flag} {value}" if value != "..." else flag
            raise ConfigError(f"[config] `{given}`: safetrain's settings are "
                              f"written key=value (Hydra's syntax), not as --flags: "
                              + (f"{near.group(1)}={value}" if near else f"{key}={value}, with its group "
                                 "(optim.lr, trainer.max_epochs, data.batch_size ...)")
                              + ". Every key: python -m safetrain recipe=NAME --cfg job.")


def train_command(command: Command) -> int:
    """train, doctor and sweep: compose and validate every job first, then Hydra runs them."""
    from hydra._internal.utils import get_args_parser

    dist.init()  # under torchrun: join the other processes (no-op otherwise)
    if not dist.is_main():
        _log_to(level=logging.WARNING, rank=dist.rank())  # warnings and errors only; rank 0 keeps the run's log
    args = get_args_parser().parse_args(command.settings)
    task_overrides = [o for o in args.overrides if not o.startswith("hydra.")]
    refuse_code_overrides(args.overrides)
    _readable(args.overrides)  # hydra.run.dir too, which compose below does not see
    if args.multirun and dist.active():
        raise ConfigError("[config] a sweep (-m) under torchrun is not supported: launch one torchrun per job (each "
                          "job's settings on its own command line).")
    if not (args.help or args.hydra_help):  # fail fast, before Hydra makes a run dir: every job of a sweep
        for job in job_overrides(task_overrides) if args.multirun else [task_overrides]:
            cfg, _ = compose(command.recipe, job, args.config_dir)
        given = "hydra.sweep.dir=" if args.multirun else "hydra.run.dir="
        run_dir = next((o.split("=", 1)[1] for o in args.overrides if o.startswith(given)), None)
        if run_dir and cfg.mode != "doctor":
            refuse_used_run_dir(Path(run_dir))  # before Hydra writes its log there
    if not dist.is_main() and not (args.help or args.hydra_help):  # rank 0's Hydra job decides the run directory
        from safetrain.run import run as run_training  # (its ${now:} would differ per process)

        run_dir = Path(dist.share(None))
        return _attempt(lambda: run_training(cfg, run_dir, task_overrides), run_dir)[2]
    flags = [a for a in command.settings if a not in args.overrides]  # argparse wants the overrides together
    sys.argv = [sys.argv[0], *args.overrides, _searchpath(), *flags, f"--config-name={command.recipe}"]
    import hydra

    sweeps: list[Path] = []  # the sweep directory, as the jobs of a sweep report it
    hydra.main(config_path=str(RECIPES_DIR), config_name=None, version_base="1.3")(lambda raw: _job(raw, sweeps))()
    if args.multirun and sweeps:
        rows, text = summarize(sweeps[0])
        print(text + f"\n{sweeps[0] / 'summary.md'}")
        return 0 if all(r["status"] == "done" for r in rows) else 1
    return 0


def _attempt(work, run_dir: Path) -> tuple[str, object, int]:
    """Run `work()` (a run) -> (status, metrics or the reason, exit code): done 0, stopped on purpose 1, refused 2,
    interrupted 130/143 (with the command that continues it). A crash propagates."""
    log = logging.getLogger("safetrain")
    try:
        return "done", work(), 0
    except SafetrainError as e:  # a refusal (2), training stopped on purpose (1), a signal (130/143)
        go_on = f"\nContinue it with: {resume_cmd(run_dir, dist.world())}" if e.resumable else ""
        log.error("%s: %s%s", type(e).__name__, e, go_on)
        if isinstance(e, Interrupted):
            return "interrupted", str(e), e.exit_code
        return ("stopped", str(e), 1) if isinstance(e, TrainingStopped) else ("refused", str(e), 2)


def _job(raw, sweeps: list[Path]) -> None:
    """One Hydra job: validate, then run in Hydra's run directory. In a sweep (whose directory goes into `sweeps`),
    a job that is refused, stopped or crashes is recorded and the next one runs; an interrupted one stops the
    sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from safetrain.config import validate
    from safetrain.run import run

    hc = HydraConfig.get()
    run_dir, overrides = Path(hc.runtime.output_dir), list(hc.overrides.task)
    if hc.mode != RunMode.MULTIRUN:
        dist.share(str(run_dir))  # under torchrun: the other processes' run directory
        status, out, code = _attempt(lambda: run(validate(raw), run_dir, overrides), run_dir)
        if status == "done" and out.get("mode") == "doctor":  # the table is in the log; WARN still exits 0
            code = 0 if out["passed"] else 1
        if code:
            sys.exit(code)
        return
    sweeps[:] = [Path(hc.sweep.dir)]
    try:
        status, out, code = _attempt(lambda: run(validate(raw), run_dir, overrides), run_dir)
    except Exception as e:  # noqa: BLE001  a crash ends one job of a sweep, not the sweep
        logging.getLogger("safetrain").exception("job %d crashed", hc.job.num)
        status, out, code = "crashed", f"{type(e).__name__}: {e}", 1
    record(sweeps[0], hc.job.num, overrides, status, **({"final": out} if status == "done" else {"message": out}))
    if status == "interrupted":
        sys.exit(code)


def _log_to(*handlers: logging.Handler, level: int = logging.INFO, rank: int | None = None) -> None:
    """Logging as Hydra's job logging sets it up, for the commands that run without a Hydra job; the ranks other
    than 0 of a distributed run log warnings and errors to stderr, marked with their rank."""
    who = "" if rank is None else f"[rank {rank}]"
    logging.basicConfig(level=level, format=f"[%(asctime)s][%(name)s][%(levelname)s]{who} - %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout if rank is None else sys.stderr), *handlers],
                        force=True)
    logging.getLogger("safetrain").setLevel(level)


def after_training(command: Command) -> int:
    """`python -m safetrain mode=predict|evaluate|export predict.checkpoint=... [predict.KEY=VALUE ...]`."""
    from safetrain.config import validate_after_training

    if dist.requested():
        raise ConfigError(f"[config] mode={command.kind} runs in one process: use `python -m safetrain`, not "
                          "torchrun.")
    _log_to()
    cfg = validate_after_training(command.settings)
    try:
        if cfg.mode == "export":
            from safetrain.export import export
            export(cfg)
        else:
            from safetrain.inference import evaluate, predict
            {"predict": predict, "evaluate": evaluate}[cfg.mode](cfg)
    except OSError as e:  # a read-only or full file system where the results go
        raise ConfigError(f"[io] mode={cfg.mode}: could not write {e.filename or 'its results'} ({e.strerror or e}). "
                          "Write elsewhere with predict.output=PATH (or free space, or fix the permissions there).") \
            from None
    return 0


def resume_command(command: Command) -> int:
    """`python -m safetrain resume=RUN_DIR [trainer.max_epochs=N ...]`: the run goes on in RUN_DIR, logging to its
    safetrain.log, with its saved config (safetrain/resume.py); no Hydra job, so nothing else is composed."""
    from omegaconf import OmegaConf

    from safetrain import resume as resuming
    from safetrain.run import run
    from safetrain.tune import STUDY

    if (Path(command.run_dir) / STUDY).exists():  # a search
        return tune_command(Command("tune", command.settings, run_dir=Path(command.run_dir)))
    dist.init()
    run_dir, args = command.run_dir, command.settings
    bad = [a for a in args if "=" not in a or a.startswith(("-", "hydra.", "recipe="))]
    if bad:
        raise ConfigError(f"[config] resume={run_dir} takes key=value settings only, not {' '.join(bad)} (the run "
                          "keeps its recipe and directory).")

    def checked():
        cfg = resuming.saved_config(run_dir, args)
        resuming.check(run_dir, cfg)
        return cfg

    cfg = dist.from_main(checked)  # under torchrun the run directory is rank 0's (other machines need not see it)
    overrides = []
    if dist.is_main():
        _log_to(logging.FileHandler(run_dir / "safetrain.log"))  # the log goes on in the same file
        if (run_dir / "overrides.yaml").exists():
            overrides = list(OmegaConf.load(run_dir / "overrides.yaml"))
    else:
        _log_to(level=logging.WARNING, rank=dist.rank())
    logging.getLogger("safetrain").info("resuming %s%s", run_dir, f" with {' '.join(args)}" if args else "")
    return _attempt(lambda: run(cfg, run_dir, overrides, resume=True), run_dir)[2]


def tune_command(command: Command) -> int:
    """`python -m safetrain recipe=NAME mode=tune [settings]`, or `resume=SEARCH_DIR [tune.trials=N
    tune.max_minutes=M]`: a search (safetrain/tune.py), its trials one after another in this process, logged to
    SEARCH_DIR/safetrain.log. Without hydra.run.dir the search dir is runs/NAME/tune_<hash of the search>: the same
    command goes on with the same search."""
    from safetrain import tune

    if dist.requested():
        raise ConfigError("[config] mode=tune runs its trials one after another in one process: use `python -m "
                          "safetrain`, not torchrun (a trial under torchrun is not supported).")
    if command.run_dir is not None:
        search, search_dir = _saved_search(command)
    else:
        search, search_dir = _new_search(command)
        if search is None:  # --cfg job: printed
            return 0
    limits = {o.split("=", 1)[0]: o for o in search.limits}  # the last given
    search.limits = list(limits.values())
    recipe_file = next(p for p in (Path(d) / f"{search.recipe}.yaml" for d in (search.config_dir, RECIPES_DIR) if d)
                       if p.exists())
    make = lambda overrides: compose(search.recipe, overrides, search.config_dir)[0]  # noqa: E731
    cfg = make([*search.overrides, *search.limits])
    if not (search_dir / tune.STUDY).exists():
        refuse_used_run_dir(search_dir)  # before its log is written there
    search_dir.mkdir(parents=True, exist_ok=True)
    _log_to(logging.FileHandler(search_dir / "safetrain.log"))
    groups = tuple(p.name for p in CONF_DIR.iterdir() if p.is_dir())
    return tune.search(tune.Job(search, make, recipe_file, groups), cfg, search_dir)


LIMITS = ("tune.trials=", "tune.max_minutes=")  # what a search may change from one command to the next


def _new_search(command: Command):
    from hydra._internal.utils import get_args_parser

    from safetrain.tune import Search, leaves

    args = get_args_parser().parse_intermixed_args(command.settings)  # -m or --config-dir anywhere
    if args.multirun:
        raise ConfigError("[config] mode=tune runs its own search: drop -m (a Hydra sweep of searches is not "
                          "supported).")
    refuse_code_overrides(args.overrides)
    flags = [f"--{k.replace('_', '-')}" for k in ("help", "hydra_help", "info", "config_path", "config_name",
                                                   "shell_completion", "experimental_rerun") if getattr(args, k, None)]
    if flags:
        raise ConfigError(f"[config] mode=tune takes --config-dir and --cfg job among Hydra's flags, not "
                          f"{' '.join(flags)}. The search's settings: tune.* in conf/config.yaml (README: mode=tune).")
    task = [o for o in args.overrides if not o.startswith("hydra.")]
    config_dir = args.config_dir and str(Path(args.config_dir).resolve())
    cfg, raw = compose(command.recipe, task, config_dir)
    if args.cfg:  # --cfg job: the composed config, as for a run, and nothing run
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(raw))
        return None, None
    plain = [o.lstrip("+") for o in task]
    search = Search(command.recipe, [o for o, p in zip(task, plain) if not p.startswith(("mode=", *LIMITS))],
                    config_dir, leaves(cfg.tune.space), [p for p in plain if p.startswith(LIMITS)])
    given = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("hydra.run.dir=")), None)
    return search, Path(given) if given else Path("runs", command.recipe, search.folder())


def _saved_search(command: Command):
    from safetrain.tune import saved_search

    bad = [a for a in command.settings if not a.startswith(LIMITS)]
    if bad:
        raise ConfigError(f"[config] resume={command.run_dir} goes on with a search: it takes tune.trials=N and "
                          f"tune.max_minutes=M only, not {' '.join(bad)} (the search keeps its recipe, settings "
                          "and space).")
    search = saved_search(command.run_dir)
    search.limits = [*search.limits, *command.settings]
    return search, Path(command.run_dir)


def crossfit_command(command: Command) -> int:
    """`python -m safetrain recipe=NAME mode=crossfit [crossfit.folds=K] [settings]`: K runs of the recipe, one after
    another in this process, each without one fold of the training split (safetrain/crossfit.py). The same command
    with the same hydra.run.dir goes on where it stopped."""
    from hydra._internal.utils import get_args_parser

    from safetrain.crossfit import crossfit

    if dist.requested():
        raise ConfigError("[config] mode=crossfit runs its folds one after another in one process: use `python -m "
                          "safetrain`, not torchrun.")
    args = get_args_parser().parse_intermixed_args(command.settings)  # -m anywhere
    if args.multirun:
        raise ConfigError("[config] mode=crossfit runs its own K runs: drop -m.")
    refuse_code_overrides(args.overrides)
    task = [o for o in args.overrides if not o.startswith("hydra.")]
    make = lambda overrides: compose(command.recipe, overrides, args.config_dir)[0]  # noqa: E731
    folds = make(task).crossfit.folds  # every setting checked before anything runs
    given = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("hydra.run.dir=")), None)
    out_dir = Path(given) if given else Path("runs", command.recipe, time.strftime("crossfit_%Y-%m-%d_%H-%M-%S"))
    plan = {"recipe": command.recipe, "overrides": task}
    saved = out_dir / "plan.json"
    other = json.loads(saved.read_text()) if saved.exists() else None
    if other is None:
        refuse_used_run_dir(out_dir)
    elif other != plan:
        raise ConfigError(f"[config] {out_dir} holds another crossfit (recipe={other['recipe']} "
                          f"{' '.join(other['overrides'])}): give this one a new hydra.run.dir, or the same recipe and "
                          "settings to go on with that one.")
    write_json(saved, plan)
    _log_to(logging.FileHandler(out_dir / "safetrain.log"))
    try:
        crossfit(make, task, out_dir, folds)
    except SafetrainError as e:  # a fold refused, stopped or interrupted: the folds before it are kept
        logging.getLogger("safetrain").error("%s: %s\nGo on with the same command and hydra.run.dir=%s",
                                             type(e).__name__, e, out_dir)
        return e.exit_code if isinstance(e, Interrupted) else 1 if isinstance(e, TrainingStopped) else 2
    return 0


# what each kind of command runs; a new mode joins here
COMMANDS = {"list": list_command, "train": train_command, "doctor": train_command, "sweep": train_command,
            "tune": tune_command, "crossfit": crossfit_command, "resume": resume_command, "predict": after_training,
            "evaluate": after_training, "export": after_training}
