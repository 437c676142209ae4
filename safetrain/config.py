"""The config schema and its validation: the only module besides the spine that knows the tree.

Hydra composes YAML from conf/ and recipes/; `validate` merges the result onto the
dataclass schema below (catching unknown keys and wrong types, with the nearest valid
key suggested), then checks values against their allowed choices and ranges.
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Dict, Optional, get_type_hints

import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from safetrain.data import AUGMENTS, MIXES, SOURCES, DataSpec, flips
from safetrain.data.files import AUTO_SIDE, FITS
from safetrain.data.stored import MODES as DISK_CACHES
from safetrain.errors import ConfigError, check_range
from safetrain.findings import Finding
from safetrain.losses import BALANCE, LOSSES, MULTILABEL_BALANCE
from safetrain.models import MODELS, CNNConfig, ResNetConfig  # noqa: F401  (the model schemas live with the models)
from safetrain.models.layers import ACTIVATIONS, BN_MIN_BATCH, NORMS
from safetrain.optim import OPTIMIZERS, SCHEDULES

# The allowed choices of a setting that picks a builder are that builder registry's keys (above); these are
# the few plain choices.
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOADERS = ("auto", "memory", "stream")
MODES = ("train", "doctor", "tune", "crossfit")
SAMPLERS = ("tpe", "random")  # tune.sampler: Optuna's TPE (default) or random search
PRUNERS = ("median", "halving", "none")  # tune.pruner: Optuna's median or successive-halving pruner, or none
MAX_ROTATION = 30.0  # degrees, beyond which digits, text and most objects change meaning [M05]
MIN_CROP_SCALE = 0.08  # random resized crops: a smaller share of the image often leaves the object out [M05]
MAX_CROP_RATIO = 2.0  # ... and a box more than 2:1 (or 1:2) stretches the object beyond recognition
ON_DEVICE = "on_device"  # ${on_device:CPU_VALUE,GPU_VALUE} in a recipe

log = logging.getLogger("safetrain")


def on_device(cpu: Any, gpu: Any, *, _root_: DictConfig) -> Any:
    """`${on_device:CPU_VALUE,GPU_VALUE}`: a recipe setting that depends on the device the run trains on
    (trainer.device; auto: a GPU where one is visible), e.g. a network's width. Resolved when the config is
    validated; the log names what it chose and config.yaml keeps the value, so the saved config repeats the run."""
    device = _root_.trainer.device
    return gpu if (torch.cuda.is_available() if device == "auto" else device == "cuda") else cpu


OmegaConf.register_new_resolver(ON_DEVICE, on_device, replace=True)


@dataclass
class SyntheticConfig:
    classes: int = 4
    samples_per_class: int = 120
    channels: int = 3
    size: int = 16


@dataclass
class DataConfig:
    name: str = MISSING
    root: Optional[str] = None
    batch_size: int = 128
    max_batch_share: Optional[float] = None  # a batch of at most this share of the training split (None: as given)
    val_fraction: float = 0.1
    test_fraction: float = 0.1  # only used when the source has no test split
    augment: str = "crop_flip"  # a name of data.AUGMENTS, or auto (pipelines.AUTO_AUGMENT: the measured choice)
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])  # random resized crop: share of the area [M05]
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])  # ... and width/height of the box [M05]
    allow_strong_crop: bool = False  # crops below MIN_CROP_SCALE or beyond MAX_CROP_RATIO
    mix: str = "none"  # none, mixup, cutmix: pairs of training images mixed, their labels in the same proportion
    mix_alpha: float = 1.0  # the mixing share is drawn from Beta(alpha, alpha)
    hflip_keeps_label: bool = True  # a recipe fact: False for digits and text [M05]
    rotate_degrees: float = 0.0  # random rotation in [-d, d]; at most 30 unless allow_large_rotation [M05]
    allow_large_rotation: bool = False
    allow_duplicates_across_splits: bool = False  # exact copies across train/val/test are refused [M06]
    min_samples_per_class: int = 5  # in the training split [M08]
    min_eval_per_class: int = 20  # carved val/test take this many of a class where it spares them; fewer: warned [M25]
    imbalance_ratio: Optional[float] = None  # R: make the training split long-tailed (largest/smallest = R)
    image_size: Optional[int] = None  # train folder images at this square size (None: theirs, or chosen if they differ)
    resize: str = "crop"  # how an image of another shape gets there: crop (aspect kept), pad (nothing cut), squash
    path_column: str = "path"  # data=csv: the column of image paths (relative to the CSV file, or absolute)
    label_column: str = "label"  # data=csv: the column of labels (class names)
    label_delimiter: Optional[str] = None  # data=csv: splits a label cell into several labels ("|"): multi-label
    split_column: Optional[str] = None  # data=csv: a column of train/val/test (None: safetrain splits)
    bad_files: str = "refuse"  # unreadable/empty/non-image files: refuse (listing each) or skip (counted)
    allow_similar_labels: bool = False  # labels that differ only in case or spacing ('Cat', 'cat'): refused [M08]
    max_image_pixels: Optional[int] = None  # larger files are bad files; None: PIL's decompression-bomb limit (89 MP)
    loader: str = "auto"  # auto: in memory when the decoded images fit MEMORY_LIMIT_BYTES, else stream
    disk_cache: str = "auto"  # stream: decode every image once into a file under cache_dir that the epochs read:
    # auto (raw where the disk holds it, else JPEG), raw, jpeg, or false (decode the files at every epoch)
    num_workers: int = 4
    cache_dir: Optional[str] = None  # default: $SAFETRAIN_CACHE or ~/.cache/safetrain
    download: bool = True
    fold: Optional[list[int]] = None  # [k, K]: train without the k-th of K stratified folds of the training split, and
    # predict it (held_out.pt): mode=crossfit's runs
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class LossConfig:
    name: str = "auto"  # auto: the loss of the task
    label_smoothing: float = 0.0
    balance: str = "auto"  # how minority classes are made to count on imbalanced data [M24]


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: Any = 1e-3  # a float, or "auto": a learning-rate range test picks it [M16]
    weight_decay: float = 0.05  # never applied to norm or bias parameters [M15]
    momentum: float = 0.9  # SGD momentum, or AdamW's beta1
    nesterov: bool = True  # SGD only
    bias_lr_mult: float = 1.0  # lr multiplier of the parameters without decay (biases, norm shifts)
    lookahead: bool = False  # average the weights over the last 70% of the steps (optim.Lookahead)
    allow_unusual_lr: bool = False


@dataclass
class SchedConfig:
    name: str = "plateau"
    factor: float = 0.5  # plateau: lr multiplier on a plateau
    patience: int = 2  # plateau: epochs without improvement before the lr drops
    min_lr: float = 1e-6
    warmup_fraction: float = 0.2  # onecycle: share of the steps spent warming up


@dataclass
class TrainerConfig:
    max_epochs: int = 30
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 where native (GPUs 8.0+, AVX512-BF16/AMX CPUs), else fp16+scaler/fp32
    grad_clip: float = 5.0  # max global grad norm; 0 turns clipping off
    early_stop_patience: int = 10  # epochs without a better val metric; 0 turns it off
    progress: bool = True
    compile: bool = False  # torch.compile the training step's model (opt-in: minutes of compiling on a CPU)
    max_minutes: Optional[float] = None  # a time budget: the epochs that fit here (measured), at most max_epochs
    checkpoint_minutes: Optional[float] = 30.0  # inside an epoch, last.pt every N minutes (resumable); null: off


@dataclass
class TuneConfig:
    """mode=tune (safetrain/tune.py): an Optuna search whose trials are runs of this recipe."""
    trials: int = 20  # trials in all, those of an interrupted search included
    max_minutes: Optional[float] = None  # no trial starts after N minutes of this command
    sampler: str = "tpe"
    pruner: str = "median"  # on the per-epoch validation metric
    space: Dict[str, Any] = field(default_factory=dict)  # setting -> [low, high(, log|int)] | [choice, ...] | auto


@dataclass
class CrossfitConfig:
    """mode=crossfit (safetrain/crossfit.py): suspected mislabeled samples from out-of-sample predictions."""
    folds: int = 5  # runs of this recipe, each trained without one fold of the training split and predicting it


@dataclass
class Config:
    seed: int = 0
    task: str = "auto"  # auto: from the labels (multilabel where an image has other than one), or stated
    mode: str = "train"  # train; doctor: audit + preflight + overfit-one-batch, no training; tune: a search;
    # crossfit: K runs, each without one fold of the training split (suspects from out-of-sample predictions)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING  # checked against the schema of the chosen model: MODELS[model.name][0]
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    crossfit: CrossfitConfig = field(default_factory=CrossfitConfig)


def schema_keys(schema=Config, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts (all model variants included)."""
    keys = []
    for name, tp in get_type_hints(schema).items():
        keys.append(prefix + name)
        if schema is Config and name == "model":
            subs = [settings for settings, _ in MODELS.values()]
        else:
            subs = [tp] if is_dataclass(tp) else []
        for sub in subs:
            keys += schema_keys(sub, f"{prefix}{name}.")
    return sorted(set(keys))


def did_you_mean(value, options, cutoff: float = 0.6) -> str:
    match = difflib.get_close_matches(str(value), [str(o) for o in options], n=1, cutoff=cutoff)
    return f" Did you mean '{match[0]}'?" if match else ""


def nearest_key(key: str, candidates=None) -> str:
    """' Did you mean ...?' for an unknown key; for model keys, what each model takes."""
    if key.startswith("model."):
        per_model = "; ".join(f"model={n} takes {', '.join(k for k in get_type_hints(c) if k != 'name')}"
                              for n, (c, _) in MODELS.items())
        return f" The chosen model has no such setting ({per_model})."
    keys = [k for k in (candidates or schema_keys()) if k != key]
    if "." not in key:  # lr=0.01, epochs=5: a setting's last name without its group
        leaves = {k.rsplit(".", 1)[-1] for k in keys}
        near = difflib.get_close_matches(key, leaves, n=1, cutoff=0.6)
        full = [k for k in keys if near and k.rsplit(".", 1)[-1] == near[0] and "." in k]
        if full:
            return f" Did you mean {' or '.join(repr(k) for k in full[:3])}?"
    return did_you_mean(key, keys, cutoff=0.5)


def _merge(schema, node, where: str):
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as e:
        key = ".".join(k for k in (where, str(getattr(e, "full_key", "") or "")) if k)
        if "not in" in str(e) or "ConfigKeyError" in type(e).__name__:
            near = nearest_key(key, schema_keys(schema, f"{where}." if where else ""))
            raise ConfigError(f"[config] unknown setting '{key}'.{near}"
                              f" Valid keys: `python -m safetrain recipe=NAME --cfg job`.") from None
        raise ConfigError(f"[config] {key}: {e.msg if hasattr(e, 'msg') else e}".splitlines()[0]
                          + f" (expected {_field_type(key)}).") from None


def _refuse_unknown(node, schema, prefix: str) -> None:
    """Keys the schema does not have (`+key=value` slips past Hydra's struct mode)."""
    hints = get_type_hints(schema)
    for key in node:
        full = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"[config] unknown setting '{full}'.{nearest_key(full)}"
                              " Valid keys: `python -m safetrain recipe=NAME --cfg job`.")
        sub = MODELS.get(node[key].get("name"), (None,))[0] if (schema is Config and key == "model") else hints[key]
        if is_dataclass(sub) and node[key] is not None:
            _refuse_unknown(node[key], sub, f"{full}.")


def _field_type(key: str) -> str:
    node: Any = Config
    for part in key.split("."):
        node = get_type_hints(node).get(part) if is_dataclass(node) else None
    return getattr(node, "__name__", str(node)) if node else "a value of the schema's type"


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"[config] {key}={value!r} is not one of {list(allowed)}.{did_you_mean(value, allowed)}")


def validate(cfg: DictConfig | dict) -> Config:
    """Check a composed config and return it as typed dataclasses; raise ConfigError otherwise."""
    raw = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    model_raw = raw.get("model") if "model" in raw else None
    if model_raw is None or "name" not in model_raw:
        raise ConfigError(f"[config] model is not chosen. Add model=NAME, one of {list(MODELS)}.")
    _choice("model", model_raw.name, MODELS)
    _refuse_unknown(raw, Config, "")
    out: Config = _merge(Config, raw, "")  # model is Any here: a plain dict ...
    model_raw = OmegaConf.create(OmegaConf.to_container(model_raw, resolve=True))  # ${data.x} resolved in place
    out.model = _merge(MODELS[model_raw.name][0], model_raw, "model")  # ... checked by its own schema
    _check_values(out)
    by_device = _keys_using(OmegaConf.to_container(raw, resolve=False), "${" + ON_DEVICE + ":")
    if by_device:
        log.info("settings that depend on the device, for %s: %s (recipe: ${on_device:CPU,GPU}; saved in config.yaml)",
                 on_device("a CPU", "a GPU", _root_=raw), ", ".join(f"{k}={_plain(OmegaConf.select(raw, k))}"
                                                                     for k in by_device))
    return out


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _keys_using(tree: Any, marker: str, prefix: str = "") -> list[str]:
    """Dotted keys of `tree` (a plain, unresolved config) whose value is a string containing `marker`."""
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _keys_using(v, marker, f"{prefix}{key}.")]
    return [prefix[:-1]] if isinstance(tree, str) and marker in tree else []


def _check_values(c: Config) -> None:
    own = c.model.builder_settings()
    choices = {"task": (c.task, ("auto", *LOSSES)), "mode": (c.mode, MODES), "data": (c.data.name, SOURCES),
               "data.augment": (c.data.augment, ("auto", *AUGMENTS)), "data.mix": (c.data.mix, MIXES),
               "data.loader": (c.data.loader, LOADERS),
               "data.disk_cache": (str(c.data.disk_cache).lower(), (*DISK_CACHES, "true")),
               "data.bad_files": (c.data.bad_files, ("refuse", "skip")), "data.resize": (c.data.resize, FITS),
               "loss.balance": (c.loss.balance, ("auto", *BALANCE, *MULTILABEL_BALANCE)),
               **{f"model.{k}": (own[k], allowed) for k, allowed in (("activation", ACTIVATIONS), ("norm", NORMS))
                  if k in own},  # safetrain's own models
               "optim": (c.optim.name, OPTIMIZERS), "sched.name": (c.sched.name, SCHEDULES),
               "trainer.device": (c.trainer.device, DEVICES), "trainer.precision": (c.trainer.precision, PRECISIONS),
               "tune.sampler": (c.tune.sampler, SAMPLERS), "tune.pruner": (c.tune.pruner, PRUNERS)}
    for key, (value, allowed) in choices.items():
        _choice(key, value, allowed)
    if c.loss.name != "auto" and not any(c.loss.name in names for names in LOSSES.values()):
        raise ConfigError(f"[M13] loss.name={c.loss.name!r} fits no task: safetrain's losses are "
                          + ", ".join(f"{n} ({task}: {TASK_LOSS[task]})" for task, names in LOSSES.items()
                                      for n in names)
                          + ". Use loss.name=auto; safetrain derives the loss from the task, and the task from the "
                            "labels.")
    if c.task != "auto":
        resolve_task(c, c.task)
    _check_data(c.data, own.get("norm"))
    _check_optim(c.optim)
    check_range("optim.weight_decay", c.optim.weight_decay, 0.0, 0.5, "M21")
    check_range("optim.momentum", c.optim.momentum, 0.0, 0.999)
    if "dropout" in own:
        check_range("model.dropout", own["dropout"], 0.0, 0.7, "M21")
    check_range("loss.label_smoothing", c.loss.label_smoothing, 0.0, 0.4)
    check_range("optim.bias_lr_mult", c.optim.bias_lr_mult, 0.01, 1000.0)
    if c.model.tta and not c.data.hflip_keeps_label:
        raise ConfigError("[M05] model.tta=true averages each image with its mirror at evaluation, but this recipe "
                          "declares data.hflip_keeps_label=false (a mirrored digit or letter is another symbol). "
                          "Use model.tta=false.")
    check_range("trainer.max_epochs", c.trainer.max_epochs, 1, 100000)
    if c.trainer.max_minutes is not None:
        check_range("trainer.max_minutes", c.trainer.max_minutes, 0.1, 1e6)
    if c.trainer.checkpoint_minutes is not None:
        check_range("trainer.checkpoint_minutes", c.trainer.checkpoint_minutes, 0.0, 1e6,
                    fix=" null writes checkpoints at epoch ends only.")
    check_range("trainer.grad_clip", c.trainer.grad_clip, 0.0, 1e6)
    check_range("tune.trials", c.tune.trials, 1, 100000)
    check_range("crossfit.folds", c.crossfit.folds, 2, 20, fix=" 5 is usual: each run trains on 4/5 of the training "
                "split and predicts the rest.")
    if c.data.fold is not None and (len(c.data.fold) != 2 or not 0 <= c.data.fold[0] < c.data.fold[1]):
        raise ConfigError(f"[config] data.fold={c.data.fold} is not [k, K] with 0 <= k < K: it names the fold of the "
                          "training split a run leaves out (mode=crossfit sets it).")
    if c.tune.max_minutes is not None:
        check_range("tune.max_minutes", c.tune.max_minutes, 0.1, 1e6)
    check_range("sched.factor", c.sched.factor, 0.01, 0.99)
    check_range("sched.warmup_fraction", c.sched.warmup_fraction, 0.0, 0.9)
    c.model.check()  # each model's own settings, checked by its schema (safetrain/models/)


def _check_data(d: DataConfig, norm: str) -> None:
    if d.name == "imagefolder" and not d.root:
        raise ConfigError("[config] data=imagefolder needs data.root=<folder with train/ or class "
                          "subfolders>. Add data.root=/path/to/images to the command.")
    if d.name == "csv" and not d.root:
        raise ConfigError("[config] data=csv needs data.root=<a CSV or TSV file> with a column of image paths "
                          f"(data.path_column={d.path_column}) and one of labels (data.label_column={d.label_column}).")
    if d.label_delimiter is not None and (d.name != "csv" or not d.label_delimiter):
        raise ConfigError(f"[config] data.label_delimiter={d.label_delimiter!r} splits a CSV's label cells into "
                          "several labels: it needs data=csv and a non-empty string, e.g. data.label_delimiter='|'.")
    _check_crops(d)
    if d.mix != "none":
        check_range("data.mix_alpha", d.mix_alpha, 0.05, 10.0)
    if d.augment != "auto" and flips(d.augment) and not d.hflip_keeps_label:
        raise ConfigError(f"[M05] data.augment={d.augment} flips images horizontally, but this "
                          "recipe declares data.hflip_keeps_label=false (a mirrored digit or letter is "
                          "another symbol). Use data.augment=crop or data.augment=none.")
    if d.rotate_degrees < 0:
        raise ConfigError(f"[M05] data.rotate_degrees={d.rotate_degrees} must be >= 0 (rotations are "
                          "drawn from [-d, d]).")
    if not d.allow_large_rotation:
        check_range("data.rotate_degrees", d.rotate_degrees, 0.0, MAX_ROTATION, "M05",
               " Rotations that large turn a 6 into a 9 and make most objects unnatural. Use at most "
               f"{MAX_ROTATION:.0f}, or add data.allow_large_rotation=true if the classes are rotation-invariant.")
    if d.imbalance_ratio is not None:
        check_range("data.imbalance_ratio", d.imbalance_ratio, 1.0, 1000.0, "M24")
    check_range("data.min_samples_per_class", d.min_samples_per_class, 1, 10**6, "M08")
    check_range("data.min_eval_per_class", d.min_eval_per_class, 1, 10**6, "M25")
    if norm == "batch" and d.batch_size < BN_MIN_BATCH:
        raise ConfigError(f"[M12] data.batch_size={d.batch_size} is too small for BatchNorm (statistics of "
                          f"fewer than {BN_MIN_BATCH} samples are noise, and 1 fails outright). Use model.norm=group, "
                          f"or data.batch_size={BN_MIN_BATCH * 4} or more.")
    check_range("data.batch_size", d.batch_size, 1, 65536, "M23")
    if d.max_batch_share is not None:
        check_range("data.max_batch_share", d.max_batch_share, 0.01, 1.0, "M23")
    if d.max_image_pixels is not None:
        check_range("data.max_image_pixels", d.max_image_pixels, 10**6, 10**10)
    check_range("data.val_fraction", d.val_fraction, 0.01, 0.5)
    check_range("data.test_fraction", d.test_fraction, 0.01, 0.5)


def _check_crops(d: DataConfig) -> None:
    """data.crop_scale and data.crop_ratio: [low, high] pairs, within the bounds that keep the label [M05]."""
    for key, pair in (("data.crop_scale", d.crop_scale), ("data.crop_ratio", d.crop_ratio)):
        if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
            example = "[0.35,1.0]" if key.endswith("scale") else "[0.75,1.33]"
            raise ConfigError(f"[M05] {key}={list(pair)} must be two numbers [low, high] with 0 < low <= high, "
                              f"e.g. {key}={example}.")
    if d.crop_scale[1] > 1:
        raise ConfigError(f"[M05] data.crop_scale={list(d.crop_scale)}: a crop cannot take more than the whole "
                          "image (1.0). Use e.g. data.crop_scale=[0.35,1.0].")
    (lo, _), (r_lo, r_hi) = d.crop_scale, d.crop_ratio
    if not d.allow_strong_crop and (lo < MIN_CROP_SCALE or max(r_hi, 1 / r_lo) > MAX_CROP_RATIO):
        raise ConfigError(f"[M05] data.crop_scale={list(d.crop_scale)}, data.crop_ratio={list(d.crop_ratio)}: "
                          f"crops of less than {MIN_CROP_SCALE:.0%} of the image often leave the object out, and boxes "
                          f"beyond {MAX_CROP_RATIO:g}:1 stretch it out of shape, so the label may no longer hold. Keep "
                          f"the low scale >= {MIN_CROP_SCALE} and the ratios within [{1 / MAX_CROP_RATIO:g}, "
                          f"{MAX_CROP_RATIO:g}], or add data.allow_strong_crop=true if the classes survive it.")


def _check_optim(o: OptimConfig) -> None:
    if o.name == "sgd" and o.momentum <= 0:
        raise ConfigError("[M15] optim=sgd with optim.momentum=0 is plain SGD, which trains CNNs "
                          "slowly or not at all. Set optim.momentum=0.9 (or use optim=adamw).")
    if isinstance(o.lr, str):
        if o.lr != "auto":
            raise ConfigError(f"[M16] optim.lr={o.lr!r} is neither a number nor 'auto'. "
                              "Write e.g. optim.lr=1e-3, or optim.lr=auto for a range test.")
    elif not isinstance(o.lr, (int, float)) or isinstance(o.lr, bool):
        raise ConfigError(f"[M16] optim.lr={o.lr!r} is not a number. Write e.g. optim.lr=1e-3.")
    elif not o.allow_unusual_lr:
        lo, hi = OPTIMIZERS[o.name].lr_range
        check_range("optim.lr", o.lr, lo, hi, "M16", f" That is not a sane learning rate for {o.name}: pick a value in "
               "range, or add optim.allow_unusual_lr=true if you really mean it.")


def unlocks(c: Config) -> list[Finding]:
    """A finding for every safety bound the config unlocks (logged at the start of a run, listed in the report)."""
    out = []
    if c.optim.allow_unusual_lr:
        out.append(Finding("M16", "unlocked", f"optim.allow_unusual_lr=true: optim.lr={c.optim.lr} is not "
                           "range-checked.", source="unlock"))
    if c.data.allow_large_rotation:
        out.append(Finding("M05", "unlocked", f"data.allow_large_rotation=true: rotations up to "
                           f"{c.data.rotate_degrees} degrees.", source="unlock"))
    if c.data.allow_strong_crop:
        out.append(Finding("M05", "unlocked", f"data.allow_strong_crop=true: random resized crops of "
                           f"{c.data.crop_scale} of the area, ratios {c.data.crop_ratio}.", source="unlock"))
    if c.data.allow_duplicates_across_splits:
        out.append(Finding("M06", "unlocked", "data.allow_duplicates_across_splits=true: exact copies across "
                           "train/val/test are allowed, so validation and test scores may be optimistic.",
                           source="unlock"))
    if c.data.allow_similar_labels:
        out.append(Finding("M08", "unlocked", "data.allow_similar_labels=true: labels that differ only in case or "
                           "spacing are trained as different classes.", source="unlock"))
    return out


TASK_LOSS = {"multiclass": "softmax over one logit per class: one label per image",
             "multilabel": "a sigmoid per label: each label present or absent on its own"}


def resolve_task(c: Config, data_task: str) -> None:
    """The task the labels make (`data_task`) becomes c.task (saved in config.yaml); a task or loss stated otherwise is
    refused with what to write instead [M13]. Multi-label settings that have no meaning there are refused too."""
    if c.task not in ("auto", data_task):
        have = "several labels (or none) per image" if data_task == "multilabel" else "exactly one label per image"
        raise ConfigError(f"[M13] task={c.task}, but the labels have {have}: a {data_task} task. Use task=auto (or "
                          f"task={data_task}); safetrain takes the task from the labels"
                          + (", and a CSV label cell holds several labels only with data.label_delimiter set."
                             if c.task == "multilabel" else "."))
    c.task = data_task
    if c.loss.name not in ("auto", *LOSSES[data_task]):
        raise ConfigError(f"[M13] loss.name={c.loss.name!r} does not fit the {data_task} task: it needs "
                          f"{' or '.join(LOSSES[data_task])} ({TASK_LOSS[data_task]}). Use loss.name=auto; safetrain "
                          "derives the loss from the task.")
    if data_task != "multilabel":
        if c.loss.balance in MULTILABEL_BALANCE and c.loss.balance not in BALANCE:
            raise ConfigError(f"[M24] loss.balance={c.loss.balance} is for multi-label tasks; this one is multiclass. "
                              f"Use loss.balance=auto, or one of {sorted(BALANCE)}.")
        return
    if c.loss.balance not in ("auto", *MULTILABEL_BALANCE):
        raise ConfigError(f"[M24] loss.balance={c.loss.balance} is for one label per image; with several labels per "
                          f"image use loss.balance=auto (each label's positives weighed against its negatives) or "
                          f"one of {sorted(MULTILABEL_BALANCE)}.")
    if c.data.mix != "none":
        raise ConfigError(f"[config] data.mix={c.data.mix} mixes one label per image; this task has several. Use "
                          "data.mix=none.")
    if c.data.imbalance_ratio is not None:
        raise ConfigError("[M24] data.imbalance_ratio makes one-label-per-image data long-tailed; this task has "
                          "several labels per image. Remove data.imbalance_ratio.")


def data_spec(c: Config, weights_size: Optional[int] = None, device_type: str = "cpu") -> DataSpec:
    """The run's one description of its data (data/sources.py): the data settings, with image folders resized to
    data.image_size or else to `weights_size`, the resolution of the starting weights [M35], or else (mixed sizes)
    to a size chosen from the images within what the device (`device_type`) affords."""
    d = c.data
    return DataSpec(name=d.name, root=d.root, image_size=d.image_size or weights_size, resize=d.resize,
                    auto_side=AUTO_SIDE["cpu" if device_type == "cpu" else "accelerator"],
                    max_image_pixels=d.max_image_pixels,
                    path_column=d.path_column, label_column=d.label_column, split_column=d.split_column,
                    label_delimiter=d.label_delimiter,
                    loader=d.loader, disk_cache=d.disk_cache, num_workers=d.num_workers, download=d.download,
                    bad_files=d.bad_files, allow_similar_labels=d.allow_similar_labels,
                    synthetic=tuple(vars(d.synthetic).items()), seed=c.seed, val_fraction=d.val_fraction,
                    test_fraction=d.test_fraction, min_samples_per_class=d.min_samples_per_class,
                    imbalance_ratio=d.imbalance_ratio, min_eval_per_class=d.min_eval_per_class)


def to_container(c: Config) -> dict:
    """Plain dict of a validated config (for config.yaml, checkpoints and hparams)."""
    return OmegaConf.to_container(OmegaConf.structured(c), resolve=True)


# ---------------------------------------------------------------- after training: no recipe, a checkpoint
AFTER_TRAINING = ("predict", "evaluate", "export")  # modes that use a trained model (safetrain/inference.py)


@dataclass
class PredictConfig:
    checkpoint: Optional[str] = None  # RUN_DIR/checkpoints/best.pt, or RUN_DIR (its best.pt)
    input: Optional[str] = None  # predict: an image or a folder (recursive); evaluate: a folder per class, or a CSV
    # like the training one for several labels per image
    output: Optional[str] = None  # predict: the CSV; evaluate, export: a folder. Default: inside the run directory
    topk: int = 5
    batch_size: int = 256
    num_workers: int = 4
    device: str = "auto"
    progress: bool = True


@dataclass
class AfterTrainingConfig:
    mode: str = "predict"
    predict: PredictConfig = field(default_factory=PredictConfig)


def validate_after_training(args: list[str]) -> AfterTrainingConfig:
    """`mode=predict|evaluate|export predict.KEY=VALUE ...`: the model's own settings come from its checkpoint."""
    other = [a for a in args if "=" not in a or not a.startswith(("mode=", "predict."))]
    if other:
        raise ConfigError(f"[config] {' '.join(other)}: with mode=predict, evaluate or export only predict.* settings "
                          "are taken; the data, model and normalization come from the checkpoint.")
    keys = schema_keys(AfterTrainingConfig)
    for key in (a.split("=", 1)[0] for a in args):
        if key not in keys:
            raise ConfigError(f"[config] unknown setting '{key}'.{did_you_mean(key, keys, 0.5)} Valid keys: "
                              f"{', '.join(k for k in keys if k.startswith('predict.'))}.")
    out: AfterTrainingConfig = _merge(AfterTrainingConfig, OmegaConf.from_dotlist(args), "")
    p = out.predict
    _choice("mode", out.mode, AFTER_TRAINING)
    _choice("predict.device", p.device, DEVICES)
    needs = ["checkpoint"] + (["input"] if out.mode != "export" else [])
    missing = [k for k in needs if getattr(p, k) is None]
    if missing:
        raise ConfigError(f"[config] mode={out.mode} needs " + " and ".join(
            {"checkpoint": "predict.checkpoint=RUN_DIR/checkpoints/best.pt",
             "input": "predict.input=" + ("FOLDER (one subfolder per class)" if out.mode == "evaluate" else
                                          "IMAGE_OR_FOLDER")}[k] for k in missing) + ".")
    check_range("predict.topk", p.topk, 1, 1000)
    check_range("predict.batch_size", p.batch_size, 1, 65536)
    check_range("predict.num_workers", p.num_workers, 0, 64)
    return out
