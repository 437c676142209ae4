"""The shape of the code that the later features plug into: registries whose keys are the config's choices
and that never fall back silently, no import cycle, short functions."""
import ast
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from safetrain import data as D
from safetrain.config import validate
from safetrain.errors import ConfigError, DataError
from safetrain.losses import BALANCE, build_loss
from safetrain.models import MODELS, build_model
from safetrain.models.layers import Classifier, Model, hooks
from safetrain.models.pretrained import StartConfig
from safetrain.run import run
from safetrain.optim import OPTIMIZERS, SCHEDULES, LRSchedule, build_optimizer
from tests.conftest import REPO

PACKAGE = REPO / "safetrain"


def _config(**over):
    base = {"data": {"name": "synthetic", "root": "/data"}, "model": {"name": "cnn"}}
    for key, value in over.items():
        group, name = key.split("__")
        base.setdefault(group, {})[name] = value
    return base


@pytest.mark.parametrize("key,registry", [("optim__name", OPTIMIZERS), ("sched__name", SCHEDULES),
                                          ("data__name", D.SOURCES), ("data__augment", ["auto", *D.AUGMENTS]),
                                          ("data__mix", D.MIXES)])
def test_the_config_offers_exactly_the_registered_names(key, registry):
    with pytest.raises(ConfigError) as e:
        validate(_config(**{key: "no_such_thing"}))
    assert str(list(registry)) in str(e.value)
    for name in registry:  # every registered name is accepted (the synthetic data keeps flips legal)
        assert validate(_config(**{key: name}))


def test_builders_refuse_an_unknown_name_instead_of_falling_back():
    net = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="optim='adam'"):
        build_optimizer(net, "adam", 1e-3, 0.0, 0.9)  # once silently AdamW
    with pytest.raises(ConfigError, match="sched.name='linear'"):
        LRSchedule(torch.optim.SGD(net.parameters(), 0.1), "linear", mode="max", total_steps=10)  # once cosine
    with pytest.raises(ConfigError, match="model='vgg'"):
        build_model({"name": "vgg"}, (3, 8, 8), 2)
    with pytest.raises(DataError, match="data='svhn'"):
        D.load_source(D.DataSpec("svhn"), REPO)
    with pytest.raises(ValueError):
        build_loss("multiclass", "auto", 0.0, "focal", [1, 1])
    assert set(BALANCE) >= {"none", "inverse", "effective", "drw", "logit_adjust", "sampler"}


@dataclass
class TinyConfig(StartConfig):
    name: str = "tiny"
    channels_: int = 4
    activation: str = "relu"
    norm: str = "batch"
    dropout: float = 0.0

    def check(self):
        self.check_start()


class Tiny(Classifier):
    """The smallest model a user adds: its settings, a Classifier, one registry line; every hook is the default."""

    def __init__(self, in_channels, num_classes, height, width, activation_name, norm_name, dropout, **arch):
        c = arch["channels_"]
        features = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                 nn.MaxPool2d(2), nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        super().__init__(features, c, num_classes, dropout, [(height, width)], init=activation_name)


def test_a_new_model_is_one_registry_line(monkeypatch):
    monkeypatch.setitem(MODELS, "tiny", (TinyConfig, Tiny))
    cfg = validate({"data": {"name": "synthetic"}, "model": {"name": "tiny", "channels_": 6}})
    with pytest.raises(ConfigError, match="unknown setting 'model.depth'"):
        validate({"data": {"name": "synthetic"}, "model": {"name": "tiny", "depth": 6}})
    net = build_model(cfg.model, (3, 8, 8), 5)
    assert net(torch.zeros(2, 3, 8, 8)).shape == (2, 5)


def test_a_minimal_custom_model_trains_through_the_whole_run(tmp_path, monkeypatch):
    """Registered as above, with none of the hooks of models/layers.py:Model overridden: the run trains it (the
    defaults are called, nothing is probed), and it learns the synthetic classes."""
    monkeypatch.setitem(MODELS, "tiny", (TinyConfig, Tiny))
    cfg = validate({"data": {"name": "synthetic", "cache_dir": str(tmp_path / "cache")},
                    "model": {"name": "tiny", "channels_": 16},
                    "trainer": {"max_epochs": 4, "progress": False}, "optim": {"lr": 3e-3}})
    final = run(cfg, tmp_path / "run")
    assert final["epochs_run"] == 4 and final["test_acc"] > 0.6  # 4 classes: chance is 0.25


class Loaded(Tiny):
    """A model that sets its own weights in its constructor, after the base class's init."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        with torch.no_grad():
            for p in self.parameters():
                p.fill_(0.125)


def test_weights_a_model_loads_in_its_constructor_are_kept(monkeypatch):
    monkeypatch.setitem(MODELS, "loaded", (TinyConfig, Loaded))
    monkeypatch.setitem(MODELS, "tiny", (TinyConfig, Tiny))
    net = build_model({"name": "loaded", "channels_": 4}, (3, 8, 8), 3)
    assert all(bool((p == 0.125).all()) for p in net.parameters())  # not re-initialised by build_model
    plain = build_model({"name": "tiny", "channels_": 4}, (3, 8, 8), 3)  # the same layers, initialised [M19]
    conv = plain.features[0].weight
    assert conv.std() > 0.05 and plain.head[-1].bias.abs().sum() == 0


def test_hooks_are_declared_with_defaults_and_a_plain_module_gets_them():
    plain = nn.Linear(2, 2)
    assert hooks(plain).sizes is None and hooks(plain).backbone_lr_mult == 1.0
    hooks(plain).on_epoch(1)  # no-ops, without asking the module anything
    hooks(plain).fit_to_data(lambda: pytest.fail("a plain module fits nothing"))
    net = build_model({"name": "cnn", "widths": [8]}, (3, 8, 8), 2)
    assert hooks(net) is net and net.sizes == [(8, 8), (4, 4)]


def _modules() -> dict[str, ast.Module]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        name = ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(p.read_text())
    return out


def test_no_import_cycle_between_safetrain_modules():
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, tree in mods.items():
        for n in ast.walk(tree):  # lazy imports count too: a cycle is a cycle
            if isinstance(n, ast.ImportFrom) and n.module in mods:
                graph[m] |= {n.module} | {f"{n.module}.{a.name}" for a in n.names if f"{n.module}.{a.name}" in mods}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for nxt in graph[m]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[m] = 2

    for m in mods:
        if m not in state:
            visit(m, [m])


def test_no_function_is_longer_than_a_screen():
    long = [f"{m}.{n.name}: {n.end_lineno - n.lineno + 1} lines" for m, tree in _modules().items()
            for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 60]
    assert long == []


def _parameters(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [x.arg for x in (a.vararg, a.kwarg) if x]
    return len([n for n in names if n not in ("self", "cls")])


def test_no_function_takes_more_than_ten_parameters():
    """Parameters that travel together are an object (engine.Setup, engine.Limits, data.DataSpec)."""
    many = [f"{m}.{n.name}: {_parameters(n)}" for m, tree in _modules().items() for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _parameters(n) > 10]
    assert many == []


def _hook_names() -> set[str]:
    """What a model or its settings may offer (models/layers.py: Model; models/pretrained.py: StartConfig)."""
    declared = {n for cls in (Model, StartConfig) for n in vars(cls) if not n.startswith("_")}
    return declared | {"keeps_its_init", "fit_whitening", "zero_init_residual", "activation", "norm", "dropout",
                       "init_from", "tta", "input_contract", "head_parameters", "backbone_parameters", "flip_tta"}


def test_no_model_hook_is_probed_with_hasattr_outside_models():
    """A hook is declared on the base class with a no-op default and called; a probe would silently skip a model
    that spells it differently."""
    names, probes = _hook_names(), []
    for m, tree in _modules().items():
        if m.startswith("safetrain.models"):
            continue
        for n in ast.walk(tree):
            if (isinstance(n, ast.Call) and getattr(n.func, "id", None) in ("hasattr", "getattr") and len(n.args) >= 2
                    and isinstance(n.args[1], ast.Constant) and n.args[1].value in names):
                probes.append(f"{m}:{n.lineno} {n.func.id}(..., {n.args[1].value!r})")
    assert probes == []


def _imports(tree: ast.Module) -> set[str]:
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module:
            out |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
        elif isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
    return out


@pytest.mark.parametrize("module", ["safetrain.inference", "safetrain.cli", "safetrain.export"])
def test_inference_and_the_cli_do_not_import_the_training_stages(module):
    mods = _modules()
    assert not {"safetrain.stages", "safetrain.end"} & _imports(mods[module])


def test_one_meaning_per_short_alias():
    """`D` is safetrain.data, `dist` safetrain.distributed, `F` torch.nn.functional, `draw` safetrain.figures, in
    every module that uses them."""
    meaning = {}
    for m, tree in _modules().items():
        for n in ast.walk(tree):
            names = n.names if isinstance(n, (ast.Import, ast.ImportFrom)) else []
            for a in names:
                if a.asname and len(a.asname) <= 4:
                    target = f"{n.module}.{a.name}" if isinstance(n, ast.ImportFrom) else a.name
                    meaning.setdefault(a.asname, set()).add(target)
    assert {k: v for k, v in meaning.items() if len(v) > 1} == {}
