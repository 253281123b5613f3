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
from pathlib import Path
from typing import Iterator

import torch


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without an initialised process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(the module the user's code trains, its DDP/DataParallel wrapper or None)."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    if isinstance(model, wrappers):
        return model.module, model
    return model, None


def unwrap_optimizer(optimizer: object) -> object:
    """The torch optimizer inside a launcher's wrapper (Accelerate's ``AcceleratedOptimizer``), else ``optimizer``.

    Such a wrapper's ``step()`` calls the wrapped optimizer's, so the audit's step hooks go there.
    """
    inner = getattr(optimizer, "optimizer", None)
    # AcceleratedOptimizer subclasses Optimizer without running its __init__: it has no hook dicts of its own
    if isinstance(inner, torch.optim.Optimizer) and not hasattr(optimizer, "_optimizer_step_pre_hooks"):
        return inner
    return optimizer


@contextlib.contextmanager
def wrapper_state_kept(wrapper: torch.nn.Module | None) -> Iterator[None]:
    """DDP's forward-sync flags as they were, whatever forwards the audit runs (through the wrapper or not)."""
    names = ("require_forward_param_sync", "require_backward_grad_sync")
    saved = {n: getattr(wrapper, n) for n in names if wrapper is not None and hasattr(wrapper, n)}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(wrapper, name, value)


def rank_folder(run: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Each rank's own run folder: ``run`` alone, ``run-rank<r>`` when several processes audit."""
    return Path(run) if world_size <= 1 else Path(f"{run}-rank{rank}")


def global_objective(loss_before: float, loss_after: float, noise: float, failed: bool,
                     device: torch.device | str = "cpu") -> tuple[float, float, float, int]:
    """(mean loss before, mean loss after, mean rounding noise, ranks that failed) over all ranks: one all-reduce.

    The rounding noise of the mean difference is taken as the mean of the ranks' noises, an upper bound
    on the noise of (1/W) Σ (a_r − b_r) whatever the correlation between ranks.
    """
    dist = torch.distributed
    local = [math.nan] * 3 if failed else [float(v) if isinstance(v, (int, float)) else math.nan
                                           for v in (loss_before, loss_after, noise)]
    tensor = torch.tensor(local + [float(failed)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)  # NaN or Inf on any rank stays in the sums: the global step is non-finite too
    size = dist.get_world_size()
    before, after, noise_sum, failures = tensor.tolist()
    return before / size, after / size, noise_sum / size, int(round(failures))


def collective_device() -> torch.device:
    """Where the process group's tensors live: CUDA for NCCL, else CPU."""
    dist = torch.distributed
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
