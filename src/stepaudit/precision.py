"""Float64 re-evaluation: a twin of the model for exact losses, and the rounding error it reveals."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .flat import is_sharded
from .state import AutocastState, RngState, cuda_devices, map_tensors, preserved, without_grad

if TYPE_CHECKING:
    from .context import StepContext

TWIN_KEY = "float64_twin"  # the audit's one float64 twin, in its contexts' shared state objects

FLOAT64_SHARDED_REFUSED = (
    "precision='float64' does not work with FSDP2 (fully_shard): its float64 twin would be a whole copy of the "
    "model on every rank; use precision=None (working-dtype losses, rounding noise from the dtype's epsilon), "
    "or DistributedDataParallel with precision='float64'"
)


def refuse_float64_sharded(model: torch.nn.Module, precision: str | None) -> None:
    """Raise ValueError for ``precision="float64"`` on a model with sharded (DTensor) parameters, at construction.

    The twin is a deep copy, which FSDP2 modules refuse; an unsharded float64 copy would defeat the sharding.
    """
    if precision == "float64" and any(is_sharded(p) for p in model.parameters()):
        raise ValueError(FLOAT64_SHARDED_REFUSED)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (the spacing of numbers near 1)."""
    return float(torch.finfo(dtype).eps)


def working_roundoff(parameters: Sequence[torch.Tensor], autocast: AutocastState) -> float:
    """Epsilon of the least precise dtype the loss is computed in: parameters or autocast."""
    dtypes = {p.dtype for p in parameters if p.is_floating_point()} | {d for _, d in autocast.regions}
    return max((unit_roundoff(d) for d in dtypes), default=unit_roundoff(torch.float32))


def cast_batch(batch: Any, dtype: torch.dtype) -> Any:
    """Cast the floating tensors of a batch (integer labels stay as they are)."""
    return map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)


class Float64Twin:
    """A float64 deep copy of the model, loaded with given weights on demand (for exact losses).

    The twin shares nothing with the live model, so evaluating it can never disturb training.
    Dropout masks are replayed from the same RNG state, but float64 kernels may draw them
    differently from float32 ones: both twin losses of a step share masks with each other, not
    necessarily with the training forward.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.twin = copy.deepcopy(model).to(torch.float64)
        self.flags: dict = {}  # loss_needs_grad: the loss differentiates inside (see state.without_grad)
        self._params = list(self.twin.parameters())
        self._buffers = list(self.twin.buffers())
        self._modules = list(self.twin.modules())

    def load(self, model: torch.nn.Module) -> None:
        """Copy the live model's current parameters, buffers and train/eval flags into the twin."""
        with torch.no_grad():
            for mine, theirs in zip(self._params, model.parameters()):
                mine.copy_(theirs)
            for mine, theirs in zip(self._buffers, model.buffers()):
                mine.copy_(theirs)
        for mine, theirs in zip(self._modules, model.modules()):
            mine.training = theirs.training

    def loss(self, loss_fn: Callable, batch: Any, rng: RngState | None) -> float:
        """The loss of the twin in float64, training mode as the live model, without autocast."""

        def evaluate() -> float:
            with preserved(self.twin, rng, AutocastState()):
                return float(loss_fn(self.twin, cast_batch(batch, torch.float64)))

        return without_grad(evaluate, self.flags)

    def relative_error(
        self, model: torch.nn.Module, loss_fn: Callable, batch: Any, autocast: AutocastState
    ) -> float | None:
        """|loss − loss₆₄| / |loss₆₄| at the current weights, both in eval mode (no random masks).

        None when ``loss_fn`` draws random numbers even in eval mode (noise added to the input, a
        sampled timestep): the two evaluations would see different draws, not just different rounding.
        """
        with torch.no_grad(), preserved(model, None, autocast):
            model.eval()
            devices = cuda_devices(model)
            start = RngState.capture(devices)
            working = float(loss_fn(model, batch))
            end = RngState.capture(devices)
        if not torch.equal(start.cpu, end.cpu) or any(not torch.equal(start.cuda[d], end.cuda[d]) for d in devices):
            return None
        with torch.no_grad(), preserved(self.twin, None, AutocastState()):
            self.twin.eval()
            exact = float(loss_fn(self.twin, cast_batch(batch, torch.float64)))
        return abs(working - exact) / max(abs(exact), torch.finfo(torch.float64).tiny)


def is_float64(ctx: StepContext) -> bool:
    """Whether this step's evaluations run in float64: ``precision="float64"``, or the loss evaluator said so."""
    return ctx.options.get("precision") == "float64" or ctx.record.get("noise_method") == "float64"


def shared_twin(ctx: StepContext) -> Float64Twin:
    """The audit's one float64 twin (built on first use, kept with the probes' state), loaded from the live model.

    The loss evaluator (``precision="float64"``) and the curvature probes (float64 HVPs) share it, so an
    audit holds one float64 copy of the model, not one per user. Each user loads it before use: what
    one leaves in it never reaches the other.
    """
    twin = ctx.state(TWIN_KEY, lambda: Float64Twin(ctx.model))
    twin.load(ctx.model)
    return twin
