"""Config schema: every recipe composes; unknown keys, wrong types and bad choices fail fast."""
import os
import shlex

import pytest

from safetrain.cli import RECIPES_DIR, compose
from safetrain.config import Config, to_container, validate
from safetrain.errors import ConfigError
from safetrain.models import MODELS
from tests.conftest import run_cli

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def test_the_required_recipes_exist():
    assert {"cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder", "smoke"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_validates(recipe):
    extra = ["data.root=/some/folder"] if recipe == "imagefolder" else []
    cfg, _ = compose(recipe, extra)
    assert isinstance(cfg, Config)
    assert isinstance(cfg.model, MODELS[cfg.model.name][0])  # the settings of the model it names
    assert cfg.data.name in ("synthetic", "imagefolder", "cifar10", "cifar100", "mnist", "fashion_mnist")


@pytest.mark.parametrize("group,option", [("data", d) for d in
                                          ("cifar10", "cifar100", "mnist", "fashion_mnist", "synthetic")]
                         + [("model", "cnn"), ("model", "resnet"), ("optim", "adamw"), ("optim", "sgd")])
def test_every_group_option_is_selectable_by_name(group, option):
    cfg, _ = compose("smoke", [f"{group}={option}"])
    assert getattr(cfg, group).name == option


@pytest.mark.parametrize("override,pattern", [
    ("optim.lrr=0.01", r"optim\.lrr.*Did you mean 'optim\.lr'"),  # unknown key: the nearest one
    ("+trainer.max_epoch=3", r"trainer\.max_epoch.*trainer\.max_epochs"),  # '+' slips past Hydra, not past us
    ("+model.depth=20", r"model\.depth"),  # smoke uses model=cnn, which has no depth
    ("data.batch_size=many", r"(?i)data\.batch_size.*'many'.*int"),  # wrong type: key and expected type
    ("model.activation=relux", r"model\.activation='relux'.*Did you mean 'relu'"),  # bad choice: the choices
    ("data=cifar1", r"data=cifar1: no such option.*'cifar100'.*Did you mean 'cifar10'"),  # group option: the options
])
def test_a_bad_override_is_refused_naming_the_key_and_the_fix(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        compose("smoke", [override])


@pytest.mark.parametrize("value", ["~/photos", "~/My Photos (1)", "/data/Photos (1)", "/data/données", "/data/it's",
                                   "/data/cats,dogs", "/data/a=b", "/data/[old]"])
def test_a_path_hydra_cannot_read_unquoted_gets_a_quoted_form_that_works(value):
    """`~`, `(1)`, accents, commas: refused by Hydra's grammar unquoted; the command line the message gives reads it."""
    with pytest.raises(ConfigError, match="without quotes") as refused:
        compose("imagefolder", [f"data.root={value}"])
    suggested = str(refused.value).split("Write it as: ")[1].split(" (the shell puts")[0]
    (override,) = shlex.split(suggested)  # what the shell passes on (and its $HOME)
    cfg, _ = compose("imagefolder", [os.path.expandvars(override)])
    assert cfg.data.root == os.path.expanduser(value)


def test_hydra_run_dir_hydra_cannot_read_is_refused_with_how_to_write_it(tmp_path, monkeypatch, capsys):
    from safetrain.cli import main
    monkeypatch.chdir(tmp_path)  # in-process: the refusal comes before Hydra runs (it made a folder named ~ here)
    assert main(["recipe=smoke", "hydra.run.dir=~/runs/x"]) == 2
    assert '"hydra.run.dir=$HOME/runs/x"' in capsys.readouterr().err and not (tmp_path / "~").exists()


def test_a_number_hydra_cannot_read_is_not_told_to_become_a_string():
    with pytest.raises(ConfigError, match=r"tune\.trials takes a plain int"):
        compose("imagefolder", ["data.root=/x", "tune.trials=(3)"])


@pytest.mark.parametrize("broken,line,hint", [
    ("data:\n\tbatch_size: 64\n", 2, "never tabs"),  # a tab
    ("data:\n  batch_size:64\n  augment: none\n", 3, r"2 spaces under its group.*space after each colon"),
    ("optim:\nlr: 0.1\n  weight_decay: 0.05\n", 3, r"2 spaces under its group"),
])
def test_a_forked_recipe_that_is_not_yaml_names_its_file_line_and_fix(tmp_path, broken, line, hint):
    (tmp_path / "mine.yaml").write_text("defaults:\n  - config\n  - _self_\n\n" + broken)
    with pytest.raises(ConfigError, match=rf"(?s)mine\.yaml, line {line + 4}, .*not valid YAML.*{hint}"):
        compose("mine", [], str(tmp_path))


def test_unknown_recipe_lists_the_recipes():
    with pytest.raises(ConfigError, match=r"(?s)no recipe named 'cifar11'.*smoke"):
        compose("cifar11", [])


@pytest.mark.parametrize("name,given", [("mine.yaml", "{dir}/mine.yaml"), ("mine.yml", "{dir}/mine.yml"),
                                        ("mine.yml", "mine")])
def test_a_recipe_given_as_a_file_gets_the_command_line_that_reads_it(tmp_path, name, given):
    (tmp_path / name).write_text((RECIPES_DIR / "smoke.yaml").read_text())
    with pytest.raises(ConfigError, match=rf"--config-dir {tmp_path} recipe=mine\b") as refused:
        compose(given.format(dir=tmp_path), [], str(tmp_path) if given == "mine" else None)
    assert ("once renamed mine.yaml" in str(refused.value)) == name.endswith(".yml")
    (tmp_path / name).rename(tmp_path / "mine.yaml")
    assert compose("mine", [], str(tmp_path))[0].data.name == "synthetic"  # what the message says works


def test_a_recipe_without_config_in_its_defaults_is_told_how_they_start(tmp_path):
    (tmp_path / "mine.yaml").write_text("defaults:\n  - override data: synthetic\n  - _self_\n")
    with pytest.raises(ConfigError, match=r"recipe 'mine':.*starts with `- config`"):
        compose("mine", [], str(tmp_path))


def test_imagefolder_without_root_says_how_to_set_it():
    with pytest.raises(ConfigError, match=r"data\.root"):
        compose("imagefolder", [])


def test_python_api_validates_a_plain_dict():
    cfg = validate({"data": {"name": "synthetic"}, "model": {"name": "resnet", "depth": 20}})
    assert cfg.model.depth == 20 and cfg.optim.name == "adamw"
    with pytest.raises(ConfigError, match="resnet depths"):
        validate({"data": {"name": "synthetic"}, "model": {"name": "resnet", "depth": 19}})


def test_cli_refuses_bad_key_before_any_run_dir_is_made(tmp_path):
    out = run_cli("recipe=smoke", "optim.lrr=0.1", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2
    assert "optim.lrr" in out.stderr and "optim.lr" in out.stderr
    assert not (tmp_path / "run").exists()


def test_cli_without_recipe_lists_recipes():
    out = run_cli()
    assert out.returncode == 0
    for name in ("cifar10", "smoke", "imagefolder"):
        assert name in out.stdout


def test_settings_written_as_other_tools_take_them_get_safetrain_s_form(capsys):
    """--flags (Hydra printed its usage), a bare setting name (lr=), a torchvision architecture as the model group
    (model=resnet18 was told 'Did you mean resnet', safetrain's CIFAR ResNet), settings without a recipe."""
    from safetrain.cli import main

    for argv, said in ((["recipe=smoke", "--epochs", "3"], "`--epochs 3`: safetrain's settings are written key=value "
                        "(Hydra's syntax), not as --flags: trainer.max_epochs=3."),
                       (["recipe=smoke", "--batch-size=64"], "`--batch-size=64`: safetrain's settings are written "
                        "key=value (Hydra's syntax), not as --flags: data.batch_size=64."),
                       (["data.root=photos/"], "No recipe given (recipe=NAME). For your own images: python -m "
                        "safetrain recipe=imagefolder data.root=photos/\n"),
                       (["data.root=my labels.csv"], "recipe=imagefolder data=csv 'data.root=my labels.csv'\n")):
        assert main(argv) == 2
        assert said in capsys.readouterr().err, argv
    for override, said in (("lr=0.01", "unknown setting 'lr' in `lr=0.01`. Did you mean 'optim.lr'?"),
                           ("epochs=3", "Did you mean 'trainer.max_epochs'?"),
                           ("model=resnet18", "resnet18 is one of torchvision's models: model=torchvision "
                            "model.arch=resnet18 (from scratch"),
                           ("model=cnnsmall", "Did you mean 'cnn_small'?")):
        with pytest.raises(ConfigError) as e:
            compose("smoke", [override])
        assert said in str(e.value) and ("Did you mean 'resnet'" not in str(e.value)), override


def test_user_recipe_in_own_folder_via_config_dir(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "defaults:\n  - config\n  - override data: synthetic\n  - _self_\nmodel:\n  widths: [8]\n")
    cfg, _ = compose("mine", [], config_dir=str(tmp_path))
    assert cfg.model.widths == [8]


def test_cli_runs_a_user_recipe_from_config_dir(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text(
        "# my recipe\ndefaults:\n  - config\n  - override model: cnn_tiny\n  - _self_\ntrainer:\n  max_epochs: 1\n")
    listing = run_cli("--config-dir", str(tmp_path / "recipes"))
    assert "mine" in listing.stdout and "my recipe" in listing.stdout
    out = run_cli("--config-dir", str(tmp_path / "recipes"), "recipe=mine", f"hydra.run.dir={tmp_path / 'run'}",
                  "trainer.progress=false")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "max_epochs: 1" in (tmp_path / "run" / "config.yaml").read_text()


def test_the_cifar10_recipe_sizes_itself_to_the_device_says_so_and_the_command_line_wins(caplog):
    caplog.set_level("INFO")
    cpu, _ = compose("cifar10", ["trainer.device=cpu"])
    assert (cpu.model.widths, cpu.trainer.max_minutes, cpu.trainer.max_epochs) == ([24, 128, 256], 9, 30)
    assert "settings that depend on the device, for a CPU: model.widths=[24, 128, 256], trainer.max_epochs=30, " \
           "trainer.max_minutes=9" in caplog.text
    gpu, _ = compose("cifar10", ["trainer.device=cuda"])  # composed only: no GPU is needed to read the recipe
    assert (gpu.model.widths, gpu.trainer.max_minutes, gpu.trainer.max_epochs) == ([64, 256, 256], None, 12)
    assert "for a GPU: model.widths=[64, 256, 256]" in caplog.text
    mine, _ = compose("cifar10", ["trainer.device=cpu", "trainer.max_epochs=5", "model.widths=[16,32,32]"])
    assert (mine.model.widths, mine.trainer.max_epochs) == ([16, 32, 32], 5)  # (max_minutes still caps the time)
    saved = to_container(cpu)
    assert saved["model"]["widths"] == [24, 128, 256] and saved["trainer"]["max_minutes"] == 9  # values, not ${}
