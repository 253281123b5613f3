"""Probes on data the step did not descend: the reference (held-out) loss, the next batch, gradient noise.

A step descends its own mini-batch's loss. ``reference`` measures what it did to fixed reference
data (and how its gradient agrees with the reference gradient), ``next_delta`` what it did to the
next batch, ``noise`` how noisy the batch gradient is (B_simple of McCandlish et al., 2018).
All evaluations are functional (``torch.func.functional_call``) at explicit weights, replayed
and wrapped in ``state.preserved``: nothing the training loop can observe is changed.

Size (over 400 lines): reference, next_delta and noise share the batch replay and the rounding-noise
rule; one file per probe waits for issue 18's Probe type.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from statistics import median
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from .. import noise as noise_stats
from ..context import StepContext, check_scalar_loss
from ..persample import capture, captured_moments, layer_moments, layer_owners
from ..precision import cast_batch
from ..records import flatten, views
from ..state import AutocastState, RngState, _cuda_devices, preserved
from . import register, register_capture

NOISE_METHODS = ("auto", "per_sample", "micro_batch", "two_batch")


# -- reference data -----------------------------------------------------------------------------------
def reference_batches(reference: Any) -> Callable[[], Iterable]:
    """How to iterate the reference data, again and again.

    A tensor, tuple (incl. namedtuple) or dict is ONE batch. A list, a DataLoader or any other
    re-iterable object is a sequence of batches (streamed: one batch in memory at a time). A
    one-shot iterator or generator is refused: it would be empty on the second pass.
    """
    if reference is None:
        raise ValueError("no reference data: pass Audit(..., reference=(x, y)) or a DataLoader")
    if isinstance(reference, (Tensor, tuple, dict)):
        return lambda: (reference,)
    if isinstance(reference, Iterator):
        raise TypeError(
            "reference is a one-shot iterator/generator and would be empty after the first "
            "evaluation; pass a list of batches or a DataLoader (re-iterable), or one batch as a tuple"
        )
    if isinstance(reference, Iterable) and not isinstance(reference, (str, bytes)):
        return lambda: iter(reference)
    raise TypeError(
        f"reference must be a batch (tensor, tuple, dict) or a re-iterable of batches "
        f"(list, DataLoader), got {type(reference).__name__}; wrap a Dataset in a DataLoader"
    )


def check_reference(reference: Any) -> None:
    """Refuse unusable reference data at construction time (for ``Audit.__init__``)."""
    if reference is not None:
        reference_batches(reference)


def _state(ctx: StepContext, weights: Sequence[Tensor], float64: bool) -> dict[str, Tensor]:
    """``functional_call`` state for the objective module: the audited weights (all in float64 if asked)."""
    state = {"model." + n: w for n, w in zip(ctx.names, weights)}
    if not float64:
        return state
    state = {k: v.double() for k, v in state.items()}
    audited = set(ctx.names)
    for n, p in ctx.model.named_parameters():
        if n not in audited:
            state["model." + n] = p.detach().double()
    for n, b in ctx.model.named_buffers():
        state["model." + n] = b.detach().double() if b.is_floating_point() else b.detach().clone()
    return state


def _evaluate(ctx: StepContext, state: dict, batch: Any, float64: bool) -> Tensor:
    if float64:
        batch = cast_batch(batch, torch.float64)
    return check_scalar_loss(functional_call(ctx.objective(), state, (batch,)))


def _reference_loss(
    ctx: StepContext,
    weights: Sequence[Tensor] | None,
    batches: Callable[[], Iterable],
    mode: str,
    rng: RngState | None,
    float64: bool,
) -> tuple[float, Tensor | None]:
    """Example-weighted mean reference loss at ``weights``; with ``weights=None``, at the OLD weights
    together with the reference gradient there (flat, float64). One batch in memory at a time."""
    gradient = weights is None
    if gradient:
        flat = (ctx.flat_before.double() if float64 else ctx.flat_before).detach().requires_grad_(True)
        weights = views(flat, ctx.params)
    total, count, grad = 0.0, 0, None
    with preserved(ctx.model, rng, AutocastState() if float64 else ctx.autocast):
        if mode == "eval":
            ctx.model.eval()
        state = _state(ctx, weights, float64)
        for index, batch in enumerate(batches()):
            n = noise_stats.batch_len(batch) or 1
            try:
                with torch.enable_grad() if gradient else torch.no_grad():
                    value = _evaluate(ctx, state, batch, float64)
                    if gradient:
                        g = torch.autograd.grad(value * n, flat)[0].double()
                        grad = g if grad is None else grad + g
            except Exception as error:
                reference = ctx.options.get("reference")
                if index == 0 and isinstance(reference, list) and all(isinstance(b, Tensor) for b in reference):
                    raise type(error)(
                        f"{error} (reference is a list, read as a list of batches; for one batch (x, y) pass a tuple)"
                    ) from error
                raise
            total += n * float(value.detach())
            count += n
    if count == 0:
        raise ValueError("the reference data yielded no batches")
    return total / count, (grad / count if gradient else None)


def _relative_error(record: dict) -> float:
    """Relative rounding error of one loss evaluation, as the core audit estimated it for this step."""
    noise, a, b = record.get("rounding_noise"), record.get("loss_before"), record.get("loss_after")
    try:
        scale = max(abs(a), abs(b))
        return noise / (2.0 * scale) if math.isfinite(noise) and scale > 0 else math.nan
    except TypeError:
        return math.nan


def _bound(record: dict, a: float, b: float) -> float:
    """Rounding bound of ``b − a`` with the step's relative error (same rule as ``rounding_noise``)."""
    return 2.0 * _relative_error(record) * max(abs(a), abs(b))


def _options(ctx: StepContext, name: str) -> dict:
    return _probe_options(ctx.options, name)


def _probe_options(options: dict, name: str) -> dict:
    """The ``probe_options[name]`` settings of an Audit's options (a copy; empty if none)."""
    return dict((options.get("probe_options") or {}).get(name) or {})


def _is_float64(ctx: StepContext) -> bool:
    return ctx.options.get("precision") == "float64" or ctx.record.get("noise_method") == "float64"


def _same_buffers(ctx: StepContext, saved: list[Tensor]) -> bool:
    live = list(ctx.model.buffers())
    return len(live) == len(saved) and all(torch.equal(a, b) for a, b in zip(live, saved))


@register("reference")
def reference_probe(ctx: StepContext) -> dict:
    """ref_delta = L_ref(w_{t+1}) − L_ref(w_t) on fixed reference data, and grad_cos_ref at w_t.

    Both losses use the buffers as they are after the step (BatchNorm running statistics already
    updated by this step's forward): ref_delta is what the weight update did.
    """
    batches = reference_batches(ctx.options.get("reference"))
    mode = ctx.options.get("reference_mode", "eval")
    want_cos = bool(_options(ctx, "reference").get("grad_cos", True))
    float64 = _is_float64(ctx)
    memory = ctx.memory.setdefault("reference", {})
    rng = None
    if mode == "train":  # one fixed set of dropout masks for the whole run: L_ref stays one function of w
        rng = memory.setdefault("rng", RngState.capture(_cuda_devices(ctx.model)))
    key = (mode, float64)
    cached = memory.pop("after", None)
    grad = None
    if want_cos:
        loss_before, grad = _reference_loss(ctx, None, batches, mode, rng, float64)
    elif cached and cached[2] == key and torch.equal(cached[0], ctx.flat_before) and _same_buffers(ctx, cached[3]):
        loss_before = cached[1]  # the previous step's "after" at exactly these weights and buffers
    else:
        loss_before, _ = _reference_loss(ctx, ctx.before, batches, mode, rng, float64)
    live = [p.detach() for p in ctx.params]
    loss_after, _ = _reference_loss(ctx, live, batches, mode, rng, float64)
    if not want_cos and ctx.options.get("reference_every", 1) == 1:
        memory["after"] = (flatten(ctx.params), loss_after, key, [b.detach().clone() for b in ctx.model.buffers()])
    fields = {
        "ref_loss_before": loss_before,
        "ref_loss_after": loss_after,
        "ref_delta": loss_after - loss_before,
        "ref_rounding_noise": _bound(ctx.record, loss_before, loss_after),
        "ref_mode": mode,
    }
    if grad is not None:
        g = ctx.flat_grad.double()
        denominator = float(torch.linalg.vector_norm(g) * torch.linalg.vector_norm(grad))
        fields["grad_cos_ref"] = float(g @ grad) / denominator if denominator > 0 else math.nan
    return fields


# -- next batch -------------------------------------------------------------------------------------------
def _replayed_loss(ctx: StepContext, flat_weights: Tensor, float64: bool) -> float:
    """This step's objective (its batch, its dropout masks) at other weights, nothing left changed."""
    weights = views(flat_weights, ctx.params)
    total = 0.0
    with torch.no_grad():
        for part in ctx.parts:
            with preserved(ctx.model, part.rng, AutocastState() if float64 else ctx.autocast):
                state = _state(ctx, weights, float64)
                if not float64:  # fresh buffer clones, as ctx.loss_of_params does
                    state.update({"model." + n: b.detach().clone() for n, b in ctx.model.named_buffers()})
                total += float(_evaluate(ctx, state, part.batch, float64))
    return total / len(ctx.parts)


@register("next_delta")
def next_delta_probe(ctx: StepContext) -> dict:
    """For the previous step t: next_delta = L_{t+1}(w_{t+1}) − L_{t+1}(w_t), one extra forward at w_t."""
    memory = ctx.memory.setdefault("next_delta", {})
    previous = memory.get("previous")
    memory["previous"] = (ctx.step, ctx.flat_before.clone())  # the audit reuses its buffers next step
    if previous is None:
        return {}
    if previous[0] != ctx.step - 1:
        gaps = memory["gaps"] = memory.get("gaps", 0) + 1
        if gaps >= 2:
            raise ValueError("next_delta compares consecutive steps; schedule it every step: probes={'next_delta': 1}")
        return {}  # one gap: a step in between failed to audit
    memory["gaps"] = 0
    float64 = _is_float64(ctx)
    loss_at_old = _replayed_loss(ctx, previous[1], float64)
    loss_at_new = ctx.record.get("loss_before", math.nan)  # L_{t+1}(w_{t+1}), same masks
    return {
        "previous_step": {
            "next_delta": loss_at_new - loss_at_old,
            "next_loss_before": loss_at_old,
            "next_loss_after": loss_at_new,
            "next_rounding_noise": _bound(ctx.record, loss_at_old, loss_at_new),
        }
    }


# -- gradient noise ------------------------------------------------------------------------------------------
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


def _check_mean_reduction(ctx: StepContext, loss, params: dict) -> None:
    """Once per audit: refuse a loss that sums over examples (every estimator assumes the mean)."""
    if ctx.memory.get("noise_mean_checked"):
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
    ctx.memory["noise_mean_checked"] = True


class _TrainingPass:
    """Layer inputs and output gradients of a step's own training forward/backward (``persample.capture``)."""

    def __init__(self, owners: dict, captured: dict, handles: list) -> None:
        self.owners, self.captured, self.handles = owners, captured, handles

    def stop(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@register_capture("noise")
def noise_capture(
    model: torch.nn.Module, names: list[str], params: list[Tensor], options: dict
) -> _TrainingPass | None:
    """Watch the training pass so the noise probe can skip its own forward/backward at the old weights
    (the ``hooks`` engine's models only; anything else replays the pass as before)."""
    settings = _probe_options(options, "noise")
    if settings.get("method", "auto") not in ("auto", "per_sample") or settings.get("engine", "auto") not in (
        "auto",
        "hooks",
    ):
        return None
    owners = layer_owners(model, {"model." + n: p for n, p in zip(names, params)}, "model.")
    if owners is None:
        return None
    captured, handles = capture(owners)
    return _TrainingPass(owners, captured, handles)


def _from_training_pass(ctx: StepContext, params: dict, groups: int) -> noise_stats.Moments | None:
    """Per-example moments from the captured training pass, if it was one plain backward of this batch
    (checked: they must average to the gradient the optimizer received; clipping or loss scaling fail it)."""
    seen = ctx.captures.get("noise")
    size = noise_stats.batch_len(ctx.parts[0].batch) if len(ctx.parts) == 1 else None
    if seen is None or size is None or size < 2:
        return None
    return captured_moments(seen.owners, seen.captured, params, ctx.grads, size, groups=groups, vectors=False)


def _per_sample(ctx: StepContext, loss, params: dict, options: dict) -> dict:
    """Per-example statistics: layer identities from one backward where they apply, else chunked vmap.

    That backward is the training pass's own when ``noise_capture`` saw it (``noise_pass`` =
    ``training``), else one replayed at the old weights with the step's dropout masks (``replay``).
    """
    groups = options.get("groups", noise_stats.DEFAULT_GROUPS)
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
            if options.get("engine", "auto") in ("auto", "hooks"):
                with preserved(ctx.model, part.rng, ctx.autocast):  # the training forward's dropout masks
                    moments = layer_moments(
                        ctx.model, loss, params, part.batch, groups=groups, vectors=len(ctx.parts) > 1
                    )  # inner products suffice unless merged
                if moments is None and options.get("engine") == "hooks":
                    raise ValueError(
                        "engine 'hooks' needs every audited parameter in a Linear, Conv1d/2d, "
                        "LayerNorm or eval-mode BatchNorm module, each called once"
                    )
            if moments is None:
                with preserved(ctx.model, part.rng, ctx.autocast):
                    moments = noise_stats.per_sample_moments(
                        loss, params, part.batch, chunk=options.get("chunk"), groups=groups
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


def _micro_batch(ctx: StepContext, loss, params: dict, options: dict, bn_train: bool) -> noise_stats.NoiseEstimate:
    wanted = int(options.get("micro_batches", 8))
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


def _two_batch(ctx: StepContext, loss, params: dict, options: dict, bn_train: bool) -> dict:
    """Small batch: the first micro-batch; big batch: the whole step batch (both functional gradients)."""
    big, sizes = None, []
    for part in ctx.parts:
        with preserved(ctx.model, part.rng, ctx.autocast):
            g, _ = noise_stats._flat_grad(loss, params, part.batch)
        big = g if big is None else big + g
        sizes.append(noise_stats.batch_len(part.batch) or 0)
    big, big_size = big / len(ctx.parts), sum(sizes)
    first = ctx.parts[0]
    small_size = max(2 if bn_train else 1, sizes[0] // int(options.get("micro_batches", 8)))
    if small_size >= big_size:
        raise ValueError(f"batch of {big_size} examples is too small for the two-batch estimator")
    with preserved(ctx.model, first.rng, ctx.autocast):
        small, _ = noise_stats._flat_grad(loss, params, noise_stats.slice_batch(first.batch, 0, small_size, sizes[0]))
    signal, trace = noise_stats.two_batch_estimate(small_size, float(small @ small), big_size, float(big @ big))
    average = ctx.memory.setdefault("noise_two_batch", noise_stats.TwoBatchAverage())
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


@register("noise")
def noise_probe(ctx: StepContext) -> dict:
    """tr Σ, ‖G‖², B_simple and SNR of the step's batch gradient at the old weights."""
    options = _options(ctx, "noise")
    method = options.get("method", "auto")
    if method not in NOISE_METHODS:
        raise ValueError(f"noise method must be one of {', '.join(NOISE_METHODS)}, got {method!r}")
    loss = _functional(ctx)
    params = {"model." + n: w for n, w in zip(ctx.names, ctx.before)}
    bn_train = _batchnorm_training(ctx.model)
    _check_mean_reduction(ctx, loss, params)
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
    fields = _two_batch(ctx, loss, params, options, bn_train)
    return {**fields, "noise_fallback": "; ".join(reasons)} if reasons else fields


# -- per-run shares ----------------------------------------------------------------------------------------
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _share(rows: list[dict], test: Callable[[dict], bool]) -> float:
    return sum(map(test, rows)) / len(rows) if rows else math.nan


def run_shares(records: Sequence[dict]) -> dict:
    """Per-run shares of steps that helped their own batch but hurt the next batch / the reference,
    the median grad_cos_ref and the pooled B_simple (mean tr Σ / mean ‖G‖², averaged before dividing).

    "Hurt" means the loss rose by more than its rounding bound; "helped own" means verdict decrease.
    """

    def hurt(key: str) -> Callable[[dict], bool]:
        noise_key = {"next_delta": "next_rounding_noise", "ref_delta": "ref_rounding_noise"}[key]
        return lambda r: r[key] > (r.get(noise_key) if _finite(r.get(noise_key)) else 0.0)

    out: dict = {}
    for key, label in (("next_delta", "next"), ("ref_delta", "ref")):
        rows = [r for r in records if _finite(r.get(key))]
        out[f"steps_with_{key}"] = len(rows)
        out[f"share_hurt_{label}"] = _share(rows, hurt(key))
        out[f"share_helped_own_hurt_{label}"] = _share(
            rows, lambda r, key=key: r.get("verdict") == "decrease" and hurt(key)(r)
        )
    cosines = [r["grad_cos_ref"] for r in records if _finite(r.get("grad_cos_ref"))]
    out["median_grad_cos_ref"] = median(cosines) if cosines else math.nan
    noisy = [r for r in records if _finite(r.get("trace_sigma")) and _finite(r.get("grad_sq_norm"))]
    if noisy:
        out["noise_scale_pooled"] = noise_stats.noise_scale(
            sum(r["trace_sigma"] for r in noisy) / len(noisy), sum(r["grad_sq_norm"] for r in noisy) / len(noisy)
        )
    else:
        out["noise_scale_pooled"] = math.nan
    return out
