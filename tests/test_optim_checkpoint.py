"""Optimizer groups, schedule stepping, and checkpoints that load with weights_only=True."""
import pytest
import torch
from torch import nn

from safetrain.checkpoint import Checkpointer, load_checkpoint
from safetrain.io import save_torch
from safetrain.models import build_model
from safetrain.optim import Lookahead, LRSchedule, build_optimizer, param_groups


def _model():
    return build_model({"name": "cnn", "widths": [8], "blocks": 1}, (3, 8, 8), 3)


def test_no_weight_decay_on_norm_and_bias_parameters():
    model = _model()
    decay, exempt = param_groups(model, 0.05, 1e-3)
    assert decay["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
    norm_and_bias = {id(p) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.Linear))
                     for n, p in m.named_parameters() if n == "bias" or isinstance(m, nn.BatchNorm2d)}
    assert norm_and_bias <= {id(p) for p in exempt["params"]}
    assert not norm_and_bias & {id(p) for p in decay["params"]}


def test_bias_lr_mult_speeds_up_the_parameters_without_decay_only():
    decay, exempt = param_groups(_model(), 0.05, 1e-3, bias_lr_mult=64)
    assert decay["lr"] == 1e-3 and exempt["lr"] == pytest.approx(64e-3)
    opt = build_optimizer(_model(), "sgd", 0.1, 5e-4, 0.9, bias_lr_mult=8)
    assert [g["lr"] for g in opt.param_groups] == [0.1, pytest.approx(0.8)]


def _lookahead_run(steps: int, state=None):
    """`steps` SGD steps on a fixed problem with lookahead (10 steps in all, averaging from step 3 every 2)."""
    torch.manual_seed(0)
    model = _model()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), 0.1)
    la = Lookahead(model, total_steps=10, start=0.3, every=2)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        la.load_state_dict(state["la"])
    seen = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        before = [t.clone() for t in la._tensors()]
        la.after_step()
        seen.append(any(not torch.equal(a, b) for a, b in zip(before, la._tensors())))
    return model, opt, la, seen


def test_lookahead_averages_from_its_start_and_resumes_exactly():
    model, _, la, seen = _lookahead_run(10)
    assert seen == [False] * 5 + [True, False, True, False, True]  # first average at step 4, moves from step 6
    straight = {k: v.clone() for k, v in model.state_dict().items()}
    model, opt, la, _ = _lookahead_run(6)
    la.after_epoch()  # an epoch ends here: the weights are the average, and the checkpoint is written
    assert all(torch.equal(a, t) for a, t in zip(la.average, la._tensors()))
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "la": la.state_dict()}
    plain, _, _, _ = _lookahead_run(6)
    model, _, _, _ = _lookahead_run(4, state)
    resumed = model.state_dict()
    # the epoch end set the weights to the average (as after step 6 anyway): resuming continues identically
    assert torch.equal(plain.state_dict()["features.0.weight"], state["model"]["features.0.weight"])
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_plateau_steps_on_validation_metric_only_and_in_its_direction():
    opt = build_optimizer(_model(), "adamw", 1e-3, 0.05, 0.9)
    s = LRSchedule(opt, "plateau", mode="max", total_steps=100, factor=0.5, patience=0)
    for _ in range(50):
        s.after_step()  # per-batch hook: must not move a plateau schedule
    assert opt.param_groups[0]["lr"] == 1e-3
    s.after_validation(0.5)
    s.after_validation(0.6)  # improving accuracy (mode max): no drop
    assert opt.param_groups[0]["lr"] == 1e-3
    s.after_validation(0.4)  # worse: drop
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_onecycle_warms_up_then_decays_to_near_zero():
    opt = build_optimizer(_model(), "adamw", 1e-3, 0.05, 0.9)
    s = LRSchedule(opt, "onecycle", mode="max", total_steps=100, warmup_fraction=0.2)
    lrs = []
    for _ in range(100):
        opt.step()
        s.after_step()
        lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(1e-3, rel=0.02) and lrs.index(max(lrs)) in range(18, 22)
    assert 0 < lrs[-1] < 2e-5


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = _model()
    opt = build_optimizer(model, "adamw", 1e-3, 0.05, 0.9)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    opt.step()
    sched = LRSchedule(opt, "onecycle", mode="max", total_steps=10)
    saver = Checkpointer(tmp_path / "c", model=model, optimizer=opt, schedule=sched, config={"seed": 0},
                         data_facts={"classes": ["a", "b", "c"], "mean": [0.1], "std": [0.2]})
    saver.save("best", {"epoch": 3, "metrics": {"val/acc": 0.5}, "best": {"metric": "acc", "value": 0.5, "epoch": 3}})
    path = tmp_path / "c" / "best.pt"
    ckpt = load_checkpoint(path)  # torch.load(..., weights_only=True) inside
    ckpt2 = torch.load(path, weights_only=True)
    assert ckpt2["epoch"] == 3 and ckpt["data_facts"]["std"] == [0.2] and "normalization" not in ckpt
    fresh = _model()
    fresh.load_state_dict(ckpt["model"])
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = build_optimizer(fresh, "adamw", 1e-3, 0.05, 0.9)
    opt2.load_state_dict(ckpt["optimizer"])
    LRSchedule(opt2, "onecycle", mode="max", total_steps=10).load_state_dict(ckpt["schedule"])
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temp file left behind


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pt"
    save_torch(path, {"v": torch.tensor(1)})

    class Boom:
        def __reduce__(self):  # what torch raises when the disk is full mid-write
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.raises(OSError, match="the write failed"):  # an I/O error, which the callers turn into a message
        save_torch(path, {"v": Boom()})
    assert torch.load(path, weights_only=True)["v"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
