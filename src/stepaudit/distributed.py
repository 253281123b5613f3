"""Several processes: which rank this is, the model inside a DDP wrapper, and the step's global objective.

Under DistributedDataParallel every rank takes the same step Δw along the all-reduced gradient
ḡ = (1/W) Σ_r g_r (DDP averages with equal weights), so g·Δw is already global. The objective whose
first-order promise that is, is the mean of the ranks' batch losses, L = (1/W) Σ_r L_r; the audit
all-reduces the losses before and after the step so that Δloss, the remainder Δloss − ḡ·Δw, α and
the verdict describe that same objective on every rank, and keeps each rank's own values as
``local_*`` fields. (With equal per-rank batch sizes L is also the example-weighted mean.)

Lockstep: the one collective here runs on every audited step of every rank, whatever happened
locally (a failed audit contributes NaN and a failure count), so no rank waits on a peer that
skipped it. Re-evaluations run on the wrapped module, not through the DDP wrapper: DDP's forward
broadcasts buffers and, under ``no_grad``, clears the flag that makes the next training forward
broadcast them, which would change training.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .maths import is_number
from .store import new_run_dir


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without an initialised process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(the module the user's code trains, its DDP/DataParallel wrapper or None); FSDP1 is refused."""
    refuse_fsdp1(model)
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    if isinstance(model, wrappers):
        return model.module, model
    return model, None


FSDP1_REFUSED = (
    "stepaudit does not audit FSDP1 (FullyShardedDataParallel: its flat parameters hide the real ones and "
    "its re-evaluations would issue unmatched collectives); use fully_shard (FSDP2) or "
    "DistributedDataParallel"
)


def refuse_fsdp1(model: torch.nn.Module) -> None:
    """Raise ValueError if ``model`` is, or contains, an FSDP1 ``FullyShardedDataParallel`` module."""
    if not torch.distributed.is_available():
        return
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without FSDP
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(FSDP1_REFUSED)


def unwrap_optimizer(optimizer: object) -> object:
    """The torch optimizer inside a launcher's wrapper (Accelerate's ``AcceleratedOptimizer``), else ``optimizer``.

    Such a wrapper's ``step()`` calls the wrapped optimizer's, so the audit's step hooks go there.
    """
    inner = getattr(optimizer, "optimizer", None)
    # AcceleratedOptimizer subclasses Optimizer without running its __init__: it has no hook dicts of its own
    if isinstance(inner, torch.optim.Optimizer) and not hasattr(optimizer, "_optimizer_step_pre_hooks"):
        return inner
    return optimizer


def wrapper_state_kept(wrapper: torch.nn.Module | None) -> contextlib.AbstractContextManager:
    """DDP's forward-sync flags as they were, whatever forwards the audit runs (through the wrapper or not).

    No wrapper (one process, on every audited step): a shared no-op, without building a generator.
    """
    return _NOTHING_KEPT if wrapper is None else _flags_kept(wrapper)


_NOTHING_KEPT = contextlib.nullcontext()  # reusable: nullcontext holds no state


@contextlib.contextmanager
def _flags_kept(wrapper: torch.nn.Module) -> Iterator[None]:
    names = ("require_forward_param_sync", "require_backward_grad_sync")
    saved = {n: getattr(wrapper, n) for n in names if hasattr(wrapper, n)}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(wrapper, name, value)


RANK_FOLDER = "rank{rank}"  # rank r > 0's store, inside the run folder


def shared_new_run(name: str | None = None, root: str | os.PathLike = "stepaudit-runs") -> Path:
    """One new run folder for all ranks: rank 0 makes it (``store.new_run_dir``) and broadcasts its path.

    A collective (one ``broadcast_object_list``): every rank of the process group calls it, else one process
    alone gets a new folder (the value ``Audit(run=None)`` gives without a process group).
    """
    rank, size = world()
    if size <= 1:
        return new_run_dir(root, name=name)
    made = [None, None]  # (folder, error): a failure on rank 0 is raised on every rank, none waits
    if rank == 0:
        try:
            made[0] = str(new_run_dir(root, name=name))
        except Exception as error:
            made[1] = f"{type(error).__name__}: {error}"
    torch.distributed.broadcast_object_list(made, src=0)
    if made[1] is not None:
        raise OSError(f"rank 0 could not make the run folder: {made[1]}; pass run= a folder every rank can write")
    return Path(made[0])


def rank_folder(run: str | os.PathLike, rank: int, world_size: int) -> Path:
    """This rank's store of the training run ``run``: ``run`` itself for rank 0 (and one process), ``run/rank<r>``.

    One run folder per training run: rank 0's store holds the global records (the same on every rank) and is
    the one a listing shows; each other rank's is a complete store of the same schema inside it, for its
    ``local_*`` fields.
    """
    return Path(run) if world_size <= 1 or rank == 0 else Path(run) / RANK_FOLDER.format(rank=rank)


@dataclass(frozen=True)
class GlobalStep:
    """What the packed all-reduce of one audited step gives every rank alike."""

    loss_before: float  # mean over ranks of the batch loss before the step
    loss_after: float
    noise: float  # mean of the ranks' rounding noises (an upper bound on the noise of the mean difference)
    failures: int  # ranks whose audit failed
    global_batch: int | None  # Σ_r b_r (None if a rank did not know its batch size)
    local_sq: float  # mean over ranks of |g_r|², the local gradients before DDP's all-reduce (NaN if not read)
    local_sq_var: float  # sample variance of the ranks' |g_r|² (W − 1 degrees of freedom)
    global_sq: float  # |ḡ|² of the all-reduced gradient (averaged over ranks, so bitwise the same everywhere)
    small: float  # harmonic mean of the ranks' batch sizes: the effective B_small of mean |g_r|²
    big: float  # W · small: the effective B_big of |ḡ|²


def _number(value: object) -> float:
    return float(value) if is_number(value) else math.nan


def global_objective(
    loss_before: float,
    loss_after: float,
    noise: float,
    failed: bool,
    device: torch.device | str = "cpu",
    batch: int | None = None,
    local_sq: float | None = None,
    global_sq: float | None = None,
) -> GlobalStep:
    """The step's global objective and gradient statistics over all ranks: ONE float64 all-reduce.

    Packed: losses before and after, rounding noise, failure flag, b_r, 1/b_r, |g_r|², |g_r|⁴ and
    |ḡ|² (nine float64s). A failed rank contributes NaN losses and a failure count; NaN or Inf on any
    rank stays in the sums, so the global step is non-finite too.
    """
    dist = torch.distributed
    losses = [math.nan] * 3 if failed else [_number(v) for v in (loss_before, loss_after, noise)]
    b, sq = _number(batch), _number(local_sq)
    b = b if b > 0 else math.nan
    local = losses + [float(failed), b, 1.0 / b, sq, sq * sq, _number(global_sq)]
    tensor = torch.tensor(local, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    size = dist.get_world_size()
    before, after, noise_sum, failures, batches, inverse, sq_sum, sq_sq_sum, global_sum = tensor.tolist()
    mean_sq = sq_sum / size
    variance = (sq_sq_sum - size * mean_sq**2) / (size - 1) if size > 1 else math.nan
    small = size / inverse
    return GlobalStep(
        before / size,
        after / size,
        noise_sum / size,
        int(round(failures)),
        int(round(batches)) if math.isfinite(batches) else None,
        mean_sq,
        max(variance, 0.0) if math.isfinite(variance) else math.nan,
        global_sum / size,
        small,
        size * small,
    )


def collective_device() -> torch.device:
    """Where the process group's tensors live: CUDA for NCCL, else CPU."""
    dist = torch.distributed
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(*flags: bool) -> list[bool]:
    """Each flag OR-ed over all ranks (one all-reduce MAX of a few bytes): a decision every rank takes alike."""
    dist = torch.distributed
    tensor = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [v > 0 for v in tensor.tolist()]


def mean_over_ranks(product: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> (1/W) Σ_r product_r(v)``: one all-reduce per call, on every rank alike.

    A rank whose own product fails contributes NaN instead of leaving its peers waiting, so every rank
    sees the same non-finite result (and Lanczos raises FloatingPointError everywhere).
    """
    dist = torch.distributed

    def mean(v: torch.Tensor) -> torch.Tensor:
        try:
            out = product(v).detach().reshape(-1).to(v.dtype).clone()
        except Exception:  # noqa: BLE001 - the peers are already in the all-reduce: join it with NaN
            out = torch.full_like(v, math.nan)
        dist.all_reduce(out)
        return out / dist.get_world_size()

    return mean
