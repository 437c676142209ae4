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
from safetrain.models.layers import Classifier
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
                                          ("data__name", D.SOURCES), ("data__augment", D.AUGMENTS)])
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
        build_model("vgg", channels=3, height=8, width=8, num_classes=2)
    with pytest.raises(DataError, match="data='svhn'"):
        D.load_source("svhn", root=None, download=False, image_size=None, loader="auto", num_workers=0,
                      cache_dir=REPO, seed=0, synthetic={})
    with pytest.raises(ValueError):
        build_loss("multiclass", "auto", 0.0, "focal", [1, 1])
    assert set(BALANCE) >= {"none", "inverse", "effective", "drw", "logit_adjust", "sampler"}


@dataclass
class TinyConfig:
    name: str = "tiny"
    channels_: int = 4
    activation: str = "relu"
    norm: str = "batch"
    dropout: float = 0.0

    def check(self):
        pass


class Tiny(Classifier):
    def __init__(self, in_channels, num_classes, height, width, activation_name, norm_name, dropout, **arch):
        c = arch["channels_"]
        super().__init__(nn.Conv2d(in_channels, c, 3, padding=1), c, num_classes, dropout, [(height, width)])


def test_a_new_model_is_one_registry_line(monkeypatch):
    monkeypatch.setitem(MODELS, "tiny", (TinyConfig, Tiny))
    cfg = validate({"data": {"name": "synthetic"}, "model": {"name": "tiny", "channels_": 6}})
    with pytest.raises(ConfigError, match="unknown setting 'model.depth'"):
        validate({"data": {"name": "synthetic"}, "model": {"name": "tiny", "depth": 6}})
    net = build_model(**vars(cfg.model), channels=3, height=8, width=8, num_classes=5)
    assert net(torch.zeros(2, 3, 8, 8)).shape == (2, 5)


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
