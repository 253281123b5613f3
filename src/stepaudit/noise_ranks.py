"""Free gradient-noise scale under DDP: each rank's own gradient is a small batch, the all-reduced one a big batch.

Rank r's gradient g_r (its batch of b examples) and DDP's average ḡ = (1/W) Σ_r g_r (the W·b examples of
all ranks) are the two batches of McCandlish et al. (2018), appendix A: with B_small = b, B_big = W·b,

    |G|² ≈ (B_big |ḡ|² − B_small |G_small|²)/(B_big − B_small),   S = tr Σ ≈ (|G_small|² − |ḡ|²)/(1/B_small − 1/B_big),

and B_simple = S/|G|² (``noise.two_batch_estimate``). |G_small|² is the mean of the ranks' |g_r|²: each is an
unbiased estimate of |G|² + S/b. With unequal batch sizes, E[mean |g_r|²] = |G|² + S·mean(1/b_r) and
E|ḡ|² = |G|² + S·mean(1/b_r)/W, so B_small is the harmonic mean of the b_r and B_big = W·B_small.

Reading g_r costs no backward and no collective: a post-accumulate-grad hook on each parameter, on audited
steps only, takes |p.grad|² when autograd has accumulated this rank's gradient, before DDP's reducer writes
the average back (measured with torch 2.13 and gloo, ``gradient_as_bucket_view`` False and True: the hook
sees the local gradient, ``.grad`` holds ḡ after ``backward()``; tests/distributed_test.py asserts it
against a recomputation). No DDP comm hook is used, so the user's own keep working. With gradient
accumulation, take the intermediate backwards under ``no_sync()`` (the usual pattern): the hook then sees
the local sum at the last backward; without ``no_sync`` the earlier micro-batches are already averaged.

The values ride in the step's one packed all-reduce (``distributed.global_objective``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .distributed import GlobalStep
from .maths import dense
from .noise import noise_scale, two_batch_estimate

CAPTURE = "_local_grad"  # its key in an audited step's captures


class LocalGradNorms:
    """|g_r|² of this rank's gradient before DDP averages it, read by post-accumulate-grad hooks.

    A capture (``stop()`` removes the hooks): it lives from the opening of an audited step to the optimizer
    step pre-hook. Each hook keeps the squared norm of its parameter's ``.grad`` at the latest accumulation
    (a 0-d tensor: no host sync inside the backward).
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self._squares: dict[int, torch.Tensor] = {}
        self._params = list(params)
        self._global: torch.Tensor | None = None  # |ḡ|² read when the backward (and DDP's reducer) finished
        self._queued = False
        self._handles = []
        self.complete = True  # False if a hook could not be registered: the value is then NaN, never a part
        for i, p in enumerate(params):
            if not p.requires_grad:  # frozen (no gradient, no hook allowed): it adds nothing to |g_r|²
                continue
            try:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(i)))
            except Exception:  # noqa: BLE001 - opening an audited step must never break training
                self.complete = False

    def _hook(self, index: int):
        squares = self._squares

        def seen(param: torch.Tensor) -> None:
            grad = param.grad
            if grad is not None:
                grad = grad.detach()
                squares[index] = _square(grad)
            if not self._queued:
                self._queued = True
                _after_backward(self._read_global)

        return seen

    def _read_global(self) -> None:
        """|ḡ|² as the backward left it: DDP's average, before the user's unscaling or clipping changes .grad.

        Both ends of the estimator are then the same gradient (scaled alike under GradScaler, which cancels
        in B_simple = S/|G|²; unclipped); the optimizer pre-hook's ``grad_norm`` may already be clipped.
        """
        self._queued = False
        total = None
        for p in self._params:
            if p.requires_grad and p.grad is not None:
                value = _square(p.grad.detach())
                total = value if total is None else total + value
        self._global = total

    def global_value(self) -> float:
        """Σ |ḡ|² read at the end of the last backward (NaN if none was read)."""
        return math.nan if self._global is None else float(self._global)

    def stop(self) -> None:
        """Remove the hooks (idempotent); what they saw stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def value(self) -> float:
        """Σ over parameters of |g_r|² (NaN if no gradient was seen or a hook is missing)."""
        if not self._squares or not self.complete:
            return math.nan
        return float(torch.stack(list(self._squares.values())).sum())


def _square(grad: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(dense(grad), dtype=torch.float64) ** 2


def _after_backward(callback) -> None:
    """Run ``callback`` when this backward is over, after the callbacks already queued and those queued as
    the backward ends (DDP queues its reducer's finalisation, which writes ḡ into .grad, at the last bucket):
    a first callback queues the second, which the engine runs after every earlier one."""
    engine = torch.autograd.Variable._execution_engine
    engine.queue_callback(lambda: engine.queue_callback(callback))


def rank_values(captures: dict, record: dict) -> tuple[float, float]:
    """(|g_r|², |ḡ|²) of this step's ``LocalGradNorms`` (|ḡ|² from the record's grad_norm if it was not read) for the
    packed all-reduce; NaN if unknown.

    Never raises: it runs on the way to a collective that every rank must join.
    """
    capture = captures.get(CAPTURE)
    try:
        local = capture.value() if capture is not None else math.nan
        averaged = capture.global_value() if capture is not None else math.nan
    except Exception:  # noqa: BLE001 - a missing value is NaN on every rank after the all-reduce
        local = averaged = math.nan
    if math.isfinite(averaged):
        return local, averaged
    norm = record.get("grad_norm")  # no end-of-backward reading: the gradient the optimizer received
    return local, (float(norm) ** 2 if isinstance(norm, (int, float)) else math.nan)


def noise_fields(step: GlobalStep, world_size: int) -> dict:
    """``noise_scale_ranks`` (B_simple of this step from the ranks' and the global gradient) and its standard error.

    Standard error (conditional on |ḡ|², from the spread of the ranks' |g_r|²): write x̄ = mean_r |g_r|²,
    y = |ḡ|², k = B_big/B_small = W. Then |G|² = (k y − x̄)/(k − 1) and S = (x̄ − y)·B_small·k/(k − 1), so
    ∂B/∂x̄ = (B_small·k + B)/((k − 1)|G|²) with B = S/|G|². Var x̄ ≈ s²/W with s² the sample variance of the
    W values |g_r|² (W − 1 degrees of freedom; with two ranks a single one, so a rough guide). The delta
    method gives se(B) = |∂B/∂x̄|·s/√W. The fluctuation of y is not included (y shares the ranks' noise,
    scaled down by W). NaN where the estimate is not finite. One step's estimate is noisy: pool
    ``noise_signal_ranks`` and ``noise_trace_ranks`` over steps before dividing, as McCandlish et al. do.
    """
    nan = {"noise_scale_ranks": math.nan, "noise_scale_ranks_stderr": math.nan}
    if world_size < 2 or not all(math.isfinite(v) for v in (step.local_sq, step.global_sq, step.small)):
        return nan
    signal, trace = two_batch_estimate(step.small, step.local_sq, step.big, step.global_sq)
    scale = noise_scale(trace, signal)
    fields = {**nan, "noise_scale_ranks": scale, "noise_signal_ranks": signal, "noise_trace_ranks": trace}
    if math.isfinite(scale) and signal > 0 and math.isfinite(step.local_sq_var):
        k = world_size
        slope = (step.small * k + scale) / ((k - 1) * signal)
        fields["noise_scale_ranks_stderr"] = abs(slope) * math.sqrt(step.local_sq_var / world_size)
    return fields
