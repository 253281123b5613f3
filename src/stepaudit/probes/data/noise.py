"""The ``noise`` probe: how noisy the step's batch gradient is (tr Σ, ‖G‖², B_simple of McCandlish et al., 2018).

Three estimators (``stepaudit.noise``): per-example gradients (read off the training pass when its capture
saw it, else replayed), micro-batches, or two batch sizes; ``method="auto"`` takes the first that applies.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.func import functional_call

from ... import noise as noise_stats
from ...context import StepContext, check_scalar_loss
from ...distributed import world
from ...flat import is_sharded
from ...maths import is_number
from ...noise_ranks import CAPTURE as LOCAL_GRAD
from ...persample import capture, captured_moments, layer_moments, layer_owners
from ...state import preserved
from .. import register
from ..base import Options, Probe

NOISE_METHODS = ("auto", "per_sample", "micro_batch", "two_batch")


@dataclass
class NoiseOptions(Options):
    """The estimator (``method``), the per-example engine, jackknife ``groups``, vmap ``chunk``, ``micro_batches``."""

    method: Literal["auto", "per_sample", "micro_batch", "two_batch"] = "auto"
    engine: Literal["auto", "hooks", "vmap"] = "auto"
    groups: int = noise_stats.DEFAULT_GROUPS
    chunk: int | None = None
    micro_batches: int = 8

    def check(self) -> None:
        """Refuse counts below 1, naming the fix."""
        for name in ("groups", "micro_batches", "chunk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"noise option {name} must be a positive int, got {value!r}")


@dataclass
class NoiseState:
    """Whether the loss was checked to be a mean over examples, and the two-batch estimator's running means."""

    mean_checked: bool = False
    two_batch: noise_stats.TwoBatchAverage | None = None


def _batchnorm_training(model: torch.nn.Module) -> bool:
    """BatchNorm normalising with batch statistics (train mode, or no running statistics kept)."""
    return any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
        for m in model.modules()
    )


def _functional(ctx: StepContext) -> noise_stats.Loss:
    objective = ctx.objective()

    def loss(params, batch):
        return check_scalar_loss(functional_call(objective, dict(params), (batch,)))

    return loss


def _check_mean_reduction(ctx: StepContext, loss, params: dict, state: NoiseState) -> None:
    """Once per audit: refuse a loss that sums over examples (every estimator assumes the mean)."""
    if state.mean_checked:
        return
    batch = ctx.parts[0].batch
    size = noise_stats.batch_len(batch) or 0
    if size >= 2:
        with torch.no_grad(), preserved(ctx.model, None, ctx.autocast):
            ctx.model.eval()  # deterministic: no dropout masks to match
            pair, first, second = (
                float(loss(params, noise_stats.slice_batch(batch, a, b, size))) for a, b in ((0, 2), (0, 1), (1, 2))
            )
        scale = abs(pair)
        if scale > 0 and abs(pair - (first + second)) <= 1e-4 * scale < abs(pair - (first + second) / 2):
            raise ValueError(
                "loss_fn sums over the batch; noise statistics need the mean over examples (e.g. reduction='mean')"
            )
    state.mean_checked = True


class _TrainingPass:
    """Layer inputs and output gradients of a step's own training forward/backward (``persample.capture``).

    Under several processes also ``local``: each parameter's gradient as this rank's backward accumulated it,
    before DDP's reducer writes the average ḡ into ``.grad`` (post-accumulate-grad hooks; the per-example
    gradients of this rank's batch average to it, not to ḡ). One copy of the gradient, no collective.
    """

    def __init__(self, owners: dict, captured: dict, handles: list, params: list[Tensor] | None = None) -> None:
        self.owners, self.captured, self.handles = owners, captured, handles
        self.local: list[Tensor | None] | None = None
        if params is not None:
            self.local = [None] * len(params)
            for i, p in enumerate(params):
                if p.requires_grad:  # a frozen parameter gets no gradient (and no hook): zeros, as in ctx.grads
                    self.handles.append(p.register_post_accumulate_grad_hook(self._keep(i)))

    def _keep(self, index: int):
        def keep(param: Tensor) -> None:
            grad = param.grad
            if grad is None:
                return
            kept = self.local[index]  # a view of DDP's bucket, which its all-reduce overwrites: copied now
            if kept is not None and not grad.is_sparse and kept.shape == grad.shape and kept.dtype == grad.dtype:
                kept.copy_(grad.detach())  # a later backward of the step (accumulation): one buffer, not a new one
            else:
                self.local[index] = grad.detach().clone()

        return keep

    def stop(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def noise_capture(
    model: torch.nn.Module, names: list[str], params: list[Tensor], options: dict
) -> _TrainingPass | None:
    """Watch the training pass so the noise probe can skip its own forward/backward at the old weights
    (the ``hooks`` engine's models only; anything else replays the pass as before)."""
    settings = noise_probe.read_options(options)
    if settings.method not in ("auto", "per_sample") or settings.engine not in ("auto", "hooks"):
        return None
    if any(is_sharded(p) for p in params):  # FSDP2: probes are not run (whole parameters needed)
        return None
    owners = layer_owners(model, {"model." + n: p for n, p in zip(names, params)}, "model.")
    if owners is None:
        return None
    captured, handles = capture(owners)
    distributed = world()[1] > 1  # the optimizer may receive an average over ranks: keep this rank's own gradient
    try:
        return _TrainingPass(owners, captured, handles, params if distributed else None)
    except Exception:
        for handle in handles:
            handle.remove()
        raise


def _backward_gradient(ctx: StepContext, seen: _TrainingPass) -> list[Tensor] | None:
    """The gradient of this rank's batch as the training backward left it (what its per-example gradients average
    to): the optimizer's own in one process; under DDP the local copy, if the optimizer received ḡ unchanged
    (|ḡ|² read as the backward ended equals |grad|², so no unscaling or clipping since), else None (replay)."""
    averaged = ctx.captures.get(LOCAL_GRAD)  # DDP only (no wrapper: each rank's .grad is its own)
    if seen.local is None or averaged is None:
        return ctx.grads
    norm = ctx.record.get("grad_norm")
    if not is_number(norm):
        return None
    at_backward, received = averaged.global_value(), float(norm) ** 2
    if not abs(at_backward - received) <= 1e-5 * received:
        return None
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(seen.local, ctx.params)]


def _from_training_pass(ctx: StepContext, params: dict, groups: int) -> noise_stats.Moments | None:
    """Per-example moments from the captured training pass, if it was one plain backward of this batch
    (checked: they must average to the gradient that backward left; clipping or loss scaling fail it)."""
    seen = ctx.captures.get("noise")
    size = noise_stats.batch_len(ctx.parts[0].batch) if len(ctx.parts) == 1 else None
    if seen is None or size is None or size < 2:
        return None
    grads = _backward_gradient(ctx, seen)
    if grads is None:
        return None
    return captured_moments(seen.owners, seen.captured, params, grads, size, groups=groups, vectors=False)


def _per_sample(ctx: StepContext, loss, params: dict, options: NoiseOptions) -> dict:
    """Per-example statistics: layer identities from one backward where they apply, else chunked vmap.

    That backward is the training pass's own when ``noise_capture`` saw it (``noise_pass`` =
    ``training``), else one replayed at the old weights with the step's dropout masks (``replay``).
    """
    groups = options.groups
    try:
        moments = _from_training_pass(ctx, params, groups)
    except Exception:  # e.g. a layer whose captured shapes the identities do not cover: replay instead
        moments = None
    if moments is not None:
        return {
            **noise_stats.estimate(moments, "per_sample").fields(),
            "noise_engine": "hooks",
            "noise_pass": "training",
        }
    merged, engines = None, []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap fallback kernels
        for part in ctx.parts:
            moments = None
            if options.engine in ("auto", "hooks"):
                with preserved(ctx.model, part.rng, ctx.autocast):  # the training forward's dropout masks
                    moments = layer_moments(
                        ctx.model, loss, params, part.batch, groups=groups, vectors=len(ctx.parts) > 1
                    )  # inner products suffice unless merged
                if moments is None and options.engine == "hooks":
                    raise ValueError(
                        "engine 'hooks' needs every audited parameter in a Linear, Conv1d/2d, "
                        "LayerNorm or eval-mode BatchNorm module, each called once"
                    )
            if moments is None:
                with preserved(ctx.model, part.rng, ctx.autocast):
                    moments = noise_stats.per_sample_moments(
                        loss, params, part.batch, chunk=options.chunk, groups=groups
                    )
                engines.append("vmap")
            else:
                engines.append("hooks")
            merged = moments if merged is None else merged.merge(moments)
    return {
        **noise_stats.estimate(merged, "per_sample").fields(),
        "noise_engine": "+".join(sorted(set(engines))),
        "noise_pass": "replay",
    }


def _micro_batch(
    ctx: StepContext, loss, params: dict, options: NoiseOptions, bn_train: bool
) -> noise_stats.NoiseEstimate:
    wanted = options.micro_batches
    per_part = max(1, -(-wanted // len(ctx.parts)))
    pieces = []
    for part in ctx.parts:
        size = noise_stats.batch_len(part.batch) or 0
        count = min(per_part, size // 2 if bn_train else size)  # BatchNorm needs 2 examples per micro-batch
        with preserved(ctx.model, part.rng, ctx.autocast):
            pieces.append(noise_stats.micro_batch_moments(loss, params, part.batch, max(count, 1)))
    moments = noise_stats.Moments.concat(pieces)
    if float(moments.units.sum()) < 2:
        raise ValueError("the batch is too small to split into 2 micro-batches")
    return noise_stats.estimate(moments, "micro_batch")


def _two_batch(ctx: StepContext, loss, params: dict, options: NoiseOptions, bn_train: bool, state: NoiseState) -> dict:
    """Small batch: the first micro-batch; big batch: the whole step batch (both functional gradients)."""
    big, sizes = None, []
    for part in ctx.parts:
        with preserved(ctx.model, part.rng, ctx.autocast):
            g, _ = noise_stats.flat_grad(loss, params, part.batch)
        big = g if big is None else big + g
        sizes.append(noise_stats.batch_len(part.batch) or 0)
    big, big_size = big / len(ctx.parts), sum(sizes)
    first = ctx.parts[0]
    small_size = max(2 if bn_train else 1, sizes[0] // options.micro_batches)
    if small_size >= big_size:
        raise ValueError(f"batch of {big_size} examples is too small for the two-batch estimator")
    with preserved(ctx.model, first.rng, ctx.autocast):
        small, _ = noise_stats.flat_grad(loss, params, noise_stats.slice_batch(first.batch, 0, small_size, sizes[0]))
    signal, trace = noise_stats.two_batch_estimate(small_size, float(small @ small), big_size, float(big @ big))
    if state.two_batch is None:
        state.two_batch = noise_stats.TwoBatchAverage()
    average = state.two_batch
    average.add(signal, trace)
    mean_signal, mean_trace, scale, stderr = average.result()
    return {
        "noise_scale": scale,
        "noise_stderr": stderr,
        "grad_sq_norm": signal,
        "trace_sigma": trace,
        "grad_snr": big_size * mean_signal / mean_trace if mean_trace > 0 else math.inf,
        "noise_scale_method": "two_batch",
        "noise_units": 2,
        "noise_scale_steps": average.n,
    }


def _noise(ctx: StepContext, options: NoiseOptions, state: NoiseState) -> dict:
    """tr Σ, ‖G‖², B_simple and SNR of the step's batch gradient at the old weights."""
    method = options.method
    loss = _functional(ctx)
    params = {"model." + n: w for n, w in zip(ctx.names, ctx.before)}
    bn_train = _batchnorm_training(ctx.model)
    _check_mean_reduction(ctx, loss, params, state)
    reasons = []
    if method in ("auto", "per_sample"):
        if bn_train:
            if method == "per_sample":
                raise ValueError(
                    "per-example gradients are undefined with BatchNorm in train mode; "
                    "use method 'micro_batch' or 'two_batch'"
                )
            reasons.append("BatchNorm in train mode")
        else:
            try:
                return _per_sample(ctx, loss, params, options)
            except Exception as error:
                if method == "per_sample":
                    raise
                reasons.append(f"per_sample: {type(error).__name__}: {error}"[:200])
    if method in ("auto", "micro_batch"):
        try:
            fields = _micro_batch(ctx, loss, params, options, bn_train).fields()
            return {**fields, "noise_fallback": "; ".join(reasons)} if reasons else fields
        except ValueError as error:
            if method == "micro_batch":
                raise
            reasons.append(f"micro_batch: {error}"[:200])
    fields = _two_batch(ctx, loss, params, options, bn_train, state)
    return {**fields, "noise_fallback": "; ".join(reasons)} if reasons else fields


FIELDS = (
    "trace_sigma",
    "grad_sq_norm",
    "noise_scale",
    "grad_snr",
    "noise_stderr",
    "trace_sigma_stderr",
    "grad_sq_norm_stderr",
    "noise_scale_method",
    "noise_units",
    "noise_engine",
    "noise_pass",
    "noise_fallback",
    "noise_scale_steps",
)
noise_probe = register(
    Probe(
        "noise",
        _noise,
        fields=FIELDS,
        options=NoiseOptions,
        needs=frozenset({"weights_before", "gradient", "batch", "training_pass"}),
        state=NoiseState,
        capture=noise_capture,
    )
)
