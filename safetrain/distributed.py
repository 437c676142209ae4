"""Several processes, one run: `torchrun` + `torch.distributed` + `DistributedDataParallel`.

Without torchrun (no WORLD_SIZE > 1 in the environment) every function here is the identity or a no-op, and a
run is one process as before. Under torchrun:
- rank 0 owns the run directory (it writes; the others compute and log warnings and errors only);
- what is measured once (decoding, the data facts, the audit) is measured by each machine's first process,
  which fills the cache the others then read, and every rank checks that it sees the same data;
- `data.batch_size` is the global batch: each rank trains on its share of every global batch, drawn from the
  same generators, so the optimisation does not depend on the number of processes;
- every decision is collective: `together` raises on every rank the error that any one rank met, so no rank
  waits forever in a collective the others have left.
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
import pickle
from typing import Any, Callable, Optional

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from safetrain.errors import DataError

log = logging.getLogger("safetrain")
TIMEOUT = datetime.timedelta(minutes=30)  # a rank that waits longer on the others stops with an error


def requested() -> bool:
    """Started by torchrun (or another launcher that sets its variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank() -> int:
    return torch_dist.get_rank() if active() else 0


def world() -> int:
    return torch_dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def is_main() -> bool:
    return rank() == 0


def part() -> tuple[int, int]:
    """(this rank, the number of ranks): which share of each batch and split this process takes."""
    return rank(), world()


def init() -> None:
    """Join torchrun's process group once: gloo for CPU tensors, NCCL for CUDA ones (both where there are GPUs,
    so trainer.device=cpu works on a GPU machine too). Other ranks than 0 log warnings and errors only."""
    if not requested() or torch_dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch_dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
    if not is_main():
        log.setLevel(logging.WARNING)


def close() -> None:
    """Leave the process group (the end of a command): every rank's sockets close in order, not at exit. The run's
    objects keep the group alive in reference cycles until the garbage collector frees them; collected here, its
    gloo worker threads are joined while the interpreter is alive. Left to the exit, a worker still releasing a
    finished collective's tensors needs the GIL of an interpreter being torn down, and the process aborts
    (SIGABRT, "terminate called without an active exception"; about 1 launch in 30 on 2 CPU cores)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
        gc.collect()


def device(name: str) -> torch.device:
    """This rank's device for trainer.device resolved to `name`: one GPU per process (LOCAL_RANK)."""
    return torch.device("cuda", local_rank()) if name == "cuda" and active() else torch.device(name)


def _flag_device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch_dist.get_backend() != "gloo" else torch.device("cpu")


def raise_any(error: Optional[BaseException]) -> None:
    """Collective: if any rank passes an error, every rank raises (its own, or the lowest rank's)."""
    if not active():
        if error is not None:
            raise error
        return
    who = torch.tensor([rank() if error is not None else world()], device=_flag_device())
    torch_dist.all_reduce(who, op=torch_dist.ReduceOp.MIN)
    src = int(who)
    if src == world():
        return
    box = [_portable(error) if rank() == src else None]
    torch_dist.broadcast_object_list(box, src=src)
    if error is not None:
        raise error
    raise box[0]


def _portable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling (safetrain's do), else its text in a RuntimeError."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001  an exception type that cannot be rebuilt elsewhere
        return RuntimeError(f"{type(error).__name__} on rank {rank()}: {error}")


def _attempt(fn: Callable[[], Any]) -> tuple[Any, Optional[Exception]]:
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001  handed to raise_any, raised again there
        return None, e


def together(fn: Callable[[], Any], *, local_first: bool = False) -> Any:
    """fn() on every rank; an error on any rank is raised on all. `local_first`: each machine's first process
    runs fn before the others do (it fills the caches they then read). fn must not depend on collectives that
    another rank may skip by failing first."""
    if not active():
        return fn()
    first = local_rank() == 0
    out, error = _attempt(fn) if first or not local_first else (None, None)
    if local_first:
        raise_any(error)  # the first processes' errors stop everyone before the others start
        if not first:
            out, error = _attempt(fn)
    raise_any(error)
    return out


def from_main(fn: Callable[[], Any]) -> Any:
    """fn() on rank 0 only (it owns the run directory), its result on every rank."""
    if not active():
        return fn()
    out, error = _attempt(fn) if is_main() else (None, None)
    raise_any(error)
    box = [out]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def share(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not active():
        return value
    box = [value if is_main() else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * world()
    torch_dist.all_gather_object(out, obj)
    return out


def total(t: Tensor) -> Tensor:
    """The sum of `t` over the ranks (a new tensor)."""
    t = t.detach().clone()
    if active():
        torch_dist.all_reduce(t)
    return t


def same_everywhere(what: str, value: Any, fix: str) -> None:
    """Refuse to train when the ranks disagree on `value` (e.g. the data facts: another folder on another machine)."""
    values = gather(value)
    odd = [r for r, v in enumerate(values) if v != values[0]]
    if odd:
        raise DataError(f"[distributed] rank(s) {odd} see other {what} than rank 0, so they would train on other "
                        f"data. {fix}")


class _Sum(torch.autograd.Function):
    """The sum over the ranks, differentiable: the gradient of a sum that every rank used is the sum of theirs."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        t = t.clone()
        torch_dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        torch_dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, as in one process: the sums are
    all-reduced over the ranks, differentiably. SyncBatchNorm does this on GPUs; this is its CPU (gloo) twin.
    Same parameters and buffers as BatchNorm, so checkpoints load into the plain model."""

    def _check_input_dim(self, x: Tensor) -> None:
        pass

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims, c = [0, *range(2, x.dim())], x.shape[1]
        xf = x.float()
        count = torch.full((1,), x.numel() / c, device=x.device)
        sums = _Sum.apply(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        n = sums[-1]
        mean = sums[:c] / n
        var = (sums[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _global_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm layer of `module` replaced, in place, by a GlobalBatchNorm sharing its tensors."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                setattr(new, key, getattr(child, key))
            new.train(child.training)
            setattr(module, name, new)
        else:
            _global_batchnorm(child)
    return module


def wrap(model: nn.Module) -> nn.Module:
    """The model as it trains: itself in one process; under torchrun, its BatchNorm layers made to use the global
    batch's statistics (SyncBatchNorm on CUDA, GlobalBatchNorm on CPU) and a DistributedDataParallel around it,
    which averages the gradients. The model itself (checkpoints, evaluation) is `unwrap(trainable)`."""
    if not active():
        return model
    if next(model.parameters()).is_cuda:
        for name, child in list(model.named_children()):  # in place: the optimizer keeps the same tensors
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    else:
        _global_batchnorm(model)
    return _ddp(model)


def _ddp(model: nn.Module) -> nn.Module:
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank()] if next(model.parameters()).is_cuda
                                              else None)
    ddp.trains = _training(model)
    return ddp


def _training(model: nn.Module) -> frozenset:
    return frozenset(n for n, p in model.named_parameters() if p.requires_grad)


def rewrap(trainable: nn.Module) -> nn.Module:
    """After layers were frozen or unfrozen (fine-tuning, [M37]): DDP reduces the gradients of the parameters that
    trained when it was built, so a new one is built for the parameters that train now (all ranks do it), and
    compiled again if it was (trainer.compile)."""
    ddp = _uncompiled(trainable)
    if isinstance(ddp, nn.parallel.DistributedDataParallel) and ddp.trains != _training(ddp.module):
        return torch.compile(_ddp(ddp.module)) if ddp is not trainable else _ddp(ddp.module)
    return trainable


def _uncompiled(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper keeps the module it compiled there


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, out of torch.compile's and DistributedDataParallel's wrappers."""
    model = _uncompiled(model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def share_of(t: Tensor, at: tuple[int, int]) -> Tensor:
    """This rank's columns of draws made for the whole global batch (the last dimension)."""
    r, w = at
    n = t.shape[-1] // w
    return t[..., r * n:(r + 1) * n]


def chunk(n: int, at: tuple[int, int]) -> range:
    """This rank's contiguous share of n samples (evaluation: every sample once, shares differ by one at most)."""
    r, w = at
    return range(n * r // w, n * (r + 1) // w)

