"""Curvature probes: why a step did what it did beyond its first-order promise g·Δw.

``delta − first_order`` is curvature: ½ Δwᵀ H Δw (``quadratic``) plus higher-order terms
(``cubic_remainder``). The cross-layer part of ``quadratic`` is ``interplay``; the largest Hessian
eigenvalue (``sharpness``) sets the learning rate below which gradient descent is stable
(``safe_lr``); for Adam-like optimizers the preconditioned sharpness λ_max(P⁻¹H) plays that role
(``precond_sharpness`` vs ``precond_bound``). Every Hessian is taken at the old weights on the
step's own batch with the training forward's semantics (same dropout masks, BatchNorm batch
statistics, buffers restored), via ``StepContext.hvp``.

Settings (tolerance, HVP budget, batch vs reference) go through ``configure(audit, ...)``.

Size (over 400 lines): the five curvature probes share one HVP and Lanczos set-up per step and the
global/local scope logic; splitting them into one file each is issue 18's Probe type, not yet done.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import distributed, linalg
from ..context import Part, StepContext
from ..precision import Float64Twin, cast_batch
from ..state import AutocastState, RngState, _cuda_devices
from . import register
from .preconditioner import preconditioner


@dataclass
class CurvatureSettings:
    """Knobs of the curvature probes; the defaults give λ_max to a guaranteed 1e-3 relative residual."""

    sharpness_on: str = "batch"  # "batch" (the step's own) or "reference" (Audit(reference=<one batch>))
    tol: float = 1e-3  # relative accuracy of λ_max (see ``stop``)
    stop: str = "residual"  # Lanczos stopping rule: "residual" (‖Hv − λv‖ ≤ tol·|λ|, which bounds the error
    #   rigorously) or "eigenvalue" (an estimated error ≤ tol·|λ|: a quarter fewer HVPs, but it can stop on
    #   the second eigenvalue before finding the first: errors up to 1.3e-2 at tol 1e-3, bench/stopping.py)
    verify: bool = False  # one extra HVP per estimate for a directly computed ‖Hv − λv‖ (else Lanczos's own)
    max_hvps: int = 40  # Lanczos steps per estimate (warm starts usually need far fewer)
    trace_samples: int = 20  # Rademacher vectors per Hutchinson trace estimate
    top_pairs: int = 5  # layer pairs named in interplay_top
    seed: int = 0  # private generator for random vectors (the global RNG is never touched)
    scope: str = "local"  # several processes: "local" (this rank's batch) or "global" (mean over ranks; sharpness)
    reference_batch: Any = field(default=None, repr=False)  # an explicit fixed batch for sharpness


def configure(audit: Any, **settings: Any) -> CurvatureSettings:
    """Set the curvature probes' options on an ``Audit`` (stored in ``audit.options["curvature"]``).

    ``sharpness_on`` is "batch" (default), "reference" (the Audit's ``reference`` must then be a
    single batch), or a batch itself (tensor, tuple, list or dict) used as the fixed reference.
    """
    known = {f.name for f in dataclasses.fields(CurvatureSettings)} - {"reference_batch"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown curvature setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    on = settings.get("sharpness_on", "batch")
    if not isinstance(on, str):
        settings["reference_batch"], settings["sharpness_on"] = on, "reference"
    elif on == "reference":
        settings["reference_batch"] = _single_batch(audit.options.get("reference"))
    elif on != "batch":
        raise ValueError(f"sharpness_on must be 'batch', 'reference' or a batch, got {on!r}")
    for name in ("max_hvps", "trace_samples", "top_pairs"):
        value = settings.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if settings.get("stop", "residual") not in ("eigenvalue", "residual"):
        raise ValueError(f"stop must be 'eigenvalue' or 'residual', got {settings['stop']!r}")
    if settings.get("scope", "local") not in ("local", "global"):
        raise ValueError(f"scope must be 'local' or 'global', got {settings['scope']!r}")
    if not 0 < float(settings.get("tol", 1e-3)) < 1:
        raise ValueError(f"tol must lie in (0, 1), got {settings.get('tol')!r}")
    chosen = CurvatureSettings(**settings)
    audit.options["curvature"] = chosen
    return chosen


def _single_batch(reference: Any) -> Any:
    """The Audit's reference if it is one replayable batch; otherwise refuse, naming the fix."""
    if reference is None:
        raise ValueError(
            "sharpness_on='reference' needs Audit(..., reference=<one batch>) or "
            "configure(audit, sharpness_on=<a batch>)"
        )
    if isinstance(reference, (torch.Tensor, tuple, dict)):  # a list is a set of batches (as for reference data)
        return reference
    raise ValueError(
        f"sharpness_on='reference' needs a single batch (tensor, tuple, list or dict), "
        f"not a {type(reference).__name__}; pass configure(audit, sharpness_on=next(iter(loader)))"
    )


def _settings(ctx: StepContext) -> CurvatureSettings:
    return ctx.options.get("curvature") or CurvatureSettings()


def _generator(ctx: StepContext) -> torch.Generator:
    """A private CPU generator kept across steps: random start vectors never consume training RNG."""
    if "_curvature_generator" not in ctx.memory:
        ctx.memory["_curvature_generator"] = torch.Generator().manual_seed(_settings(ctx).seed)
    return ctx.memory["_curvature_generator"]


# -- the Hessian operator -------------------------------------------------------------------------
def _wants_float64(ctx: StepContext) -> bool:
    return ctx.options.get("precision") == "float64" or ctx.record.get("noise_method") == "float64"


def _twin_loss(ctx: StepContext, parts: list[Part]) -> Callable:
    """``params -> loss`` on a float64 twin of the model (Audit(precision="float64"))."""
    twin = ctx.memory.get("_curvature_twin")
    if twin is None:
        twin = ctx.memory["_curvature_twin"] = Float64Twin(ctx.model)
    twin.load(ctx.model)  # buffers and train/eval flags; the weights are substituted anyway
    parts64 = [Part(cast_batch(p.batch, torch.float64), p.rng) for p in parts]
    shadow = dataclasses.replace(ctx, model=twin.twin, parts=parts64, autocast=AutocastState(), cache={})
    return shadow.loss_of_params()


def _in_eval_mode(model: torch.nn.Module, loss: Callable) -> Callable:
    """Wrap ``loss`` so it runs with every module in eval mode, flags restored afterwards."""

    def evaluated(params: tuple) -> torch.Tensor:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            return loss(params)
        finally:
            for module, mode in modes:
                module.training = mode

    return evaluated


def _seeded_rng_state(seed: int, cuda_devices: list[int]) -> RngState:
    """Generator states as after seeding with ``seed``, read from private generators.

    torch.manual_seed would reseed every CUDA device (or queue that for a lazy CUDA init): a change to
    the training run's random streams even inside fork_rng, which restores only the devices it is given.
    """
    cuda = {d: torch.Generator(device=f"cuda:{d}").manual_seed(seed).get_state() for d in cuda_devices}
    return RngState(torch.Generator().manual_seed(seed).get_state(), cuda)


def _reference_part(ctx: StepContext, batch: Any) -> Part:
    """The fixed reference batch with a fixed RNG state (same dropout masks at every step)."""
    if "_curvature_reference_rng" not in ctx.memory:
        ctx.memory["_curvature_reference_rng"] = _seeded_rng_state(_settings(ctx).seed, _cuda_devices(ctx.model))
    return Part(batch, ctx.memory["_curvature_reference_rng"])


def hessian(ctx: StepContext, on: str = "batch") -> linalg.Hvp:
    """H·v at the old weights on the step's batch (``on="batch"``) or the fixed reference (cached per step).

    With ``Audit(precision="float64")`` the products run on a float64 twin; otherwise in the
    model's dtype. The HVP method is chosen once per audit ("auto": measured) and then reused.
    """
    key = f"_hessian:{on}"
    if key in ctx.cache:
        return ctx.cache[key]
    float64 = _wants_float64(ctx)
    if on == "batch" and not float64:
        operator = ctx.hvp()
    else:
        if on == "batch":
            parts = ctx.parts
        else:
            parts = [_reference_part(ctx, _settings(ctx).reference_batch)]
        loss = _twin_loss(ctx, parts) if float64 else ctx.loss_of_params(parts)
        if on == "reference" and ctx.options.get("reference_mode", "eval") == "eval":
            loss = _in_eval_mode(ctx.memory["_curvature_twin"].twin if float64 else ctx.model, loss)
        params = tuple(p.detach().to(torch.float64) if float64 else p for p in ctx.before)
        slot = ctx.memory.setdefault("_hvp_method64" if float64 else "_hvp_method", {})
        operator = linalg.make_hvp(loss, params, method=slot.get("method", "auto"))
        slot["method"] = operator.method
    slot = ctx.memory.setdefault("_hvp_method64" if float64 else "_hvp_method", {})
    if operator.fallback_reason:
        slot["fallback"] = operator.fallback_reason
    ctx.cache[key] = operator
    return operator


def _method_fields(ctx: StepContext, operator: linalg.Hvp) -> dict:
    fields = {"hvp_method": operator.method}
    slot = ctx.memory.get("_hvp_method64" if _wants_float64(ctx) else "_hvp_method", {})
    if slot.get("fallback"):
        fields["hvp_fallback"] = slot["fallback"]
    return fields


def _working_dtype(ctx: StepContext) -> torch.dtype:
    """Dtype of the Lanczos vectors: the Hessian operator's (float64 twin or model dtype), at least float32."""
    return linalg.working_dtype(torch.float64 if _wants_float64(ctx) else ctx.flat_before.dtype)


def _delta_w(ctx: StepContext) -> torch.Tensor:
    """Δw in the dtype of the Hessian operator (float64 twin: recomputed from the weights, exactly)."""
    if _wants_float64(ctx):
        return torch.cat([p.detach().reshape(-1).double() for p in ctx.params]) - ctx.flat_before.double()
    return ctx.flat_delta_w


def _dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.to(torch.float64), b.to(torch.float64)))


# -- quadratic and interplay -----------------------------------------------------------------------
def _quadratic_fields(ctx: StepContext, quadratic: float) -> dict:
    delta, first_order = ctx.record.get("delta", math.nan), ctx.record.get("first_order", math.nan)
    return {"quadratic": quadratic, "cubic_remainder": delta - first_order - quadratic}


@register("quadratic")
def quadratic_probe(ctx: StepContext) -> dict:
    """``quadratic`` = ½ Δwᵀ H Δw (one HVP) and ``cubic_remainder`` = delta − first_order − quadratic."""
    operator = hessian(ctx)
    delta_w = _delta_w(ctx)
    quadratic = 0.5 * _dot64(delta_w, operator(delta_w))
    return {**_quadratic_fields(ctx, quadratic), **_method_fields(ctx, operator)}


def _layers(ctx: StepContext) -> tuple[list[str], torch.Tensor]:
    """Module paths (the parameters' parent modules, first-seen order) and each element's module index."""
    key = "_curvature_layers"
    if key not in ctx.memory:
        paths: list[str] = []
        index = []
        for name, p in zip(ctx.names, ctx.params):
            path = name.rsplit(".", 1)[0] if "." in name else "(root)"
            if path not in paths:
                paths.append(path)
            index.append(torch.full((p.numel(),), paths.index(path), dtype=torch.long))
        ctx.memory[key] = (paths, torch.cat(index).to(ctx.flat_before.device))
    return ctx.memory[key]


def interplay_matrix(ctx: StepContext) -> tuple[list[str], torch.Tensor]:
    """Layer names and the matrix C with C_ij = ½ Δw_iᵀ H_ij Δw_j (one HVP per layer); ΣC = quadratic."""
    if "_interplay" in ctx.cache:
        return ctx.cache["_interplay"]
    operator = hessian(ctx)
    delta_w = _delta_w(ctx)
    paths, element_layer = _layers(ctx)
    n = len(paths)
    columns = torch.zeros(n, n, dtype=torch.float64, device=delta_w.device)
    for j in range(n):
        # H (Δw restricted to layer j), then dotted with Δw_i for every layer i: column j of the matrix.
        v = torch.where(element_layer == j, delta_w, torch.zeros_like(delta_w))
        if not bool(v.any()):
            continue
        products = (delta_w * operator(v)).to(torch.float64)
        columns[:, j] = torch.zeros(n, dtype=torch.float64, device=delta_w.device).index_add_(
            0, element_layer, products
        )
    matrix = 0.25 * (columns + columns.T)  # ½ and symmetrised (H is symmetric; HVPs are so to rounding)
    ctx.cache["_interplay"] = (paths, matrix.cpu())
    return ctx.cache["_interplay"]


def _interplay_fields(ctx: StepContext) -> dict:
    paths, matrix = interplay_matrix(ctx)
    quadratic = float(matrix.sum())
    interplay = quadratic - float(matrix.diagonal().sum())
    pairs = [(2.0 * float(matrix[i, j]), i, j) for i in range(len(paths)) for j in range(i + 1, len(paths))]
    pairs.sort(key=lambda item: -abs(item[0]))
    top = [
        {"a": paths[i], "b": paths[j], "value": value}
        for value, i, j in pairs[: _settings(ctx).top_pairs]
        if value != 0.0
    ]
    fields = {"interplay": interplay, "interplay_top": top, **_method_fields(ctx, hessian(ctx))}
    if "quadratic" not in ctx.record:  # free here (ΣC); the quadratic probe's own value wins if it ran
        fields.update(_quadratic_fields(ctx, quadratic))
    return fields


@register("interplay")
def interplay_probe(ctx: StepContext) -> dict:
    """``interplay``: cross-layer part of ``quadratic``; ``interplay_top``: the largest Δw_iᵀH_ijΔw_j pairs."""
    return _interplay_fields(ctx)


@register("interplay_matrix")
def interplay_matrix_probe(ctx: StepContext) -> dict:
    """Everything ``interplay`` records plus the full matrix (``interplay_matrix``, ``interplay_layers``)."""
    paths, matrix = interplay_matrix(ctx)
    return {**_interplay_fields(ctx), "interplay_layers": list(paths), "interplay_matrix": matrix.tolist()}


# -- sharpness ---------------------------------------------------------------------------------------
def _top_eigen(
    ctx: StepContext,
    operator: Callable,
    dim: int,
    memory_key: str,
    hint: torch.Tensor | None = None,
    agree: Callable[[bool], bool] | None = None,
) -> linalg.LanczosResult:
    """Lanczos for λ_max, warm-started from the previous step's top eigenvector (plus a little noise).

    A cold start mixes a random vector with ``hint`` (the gradient): gradients lie largely in the
    top Hessian eigenspace (Gur-Ari et al. 2018), which cuts iterations and the chance of settling
    on the second eigenvalue when the first is barely present in a random start. Under DDP the start
    is the same on every rank: the generator is seeded alike, the gradient is the all-reduced one, and
    the previous vector came out of the same global products.
    """
    settings, generator, dtype = _settings(ctx), _generator(ctx), _working_dtype(ctx)
    previous = ctx.memory.get(memory_key)
    if previous is not None and previous.numel() == dim:
        # A small random admixture keeps the start from being exactly orthogonal to a new top direction.
        previous = previous.to(dtype)
        noise = linalg._rademacher(dim, generator, dtype, previous.device)
        start = previous + 1e-2 * noise / math.sqrt(dim)
    else:
        start = linalg._rademacher(dim, generator, dtype, ctx.flat_before.device) / math.sqrt(dim)
        if hint is not None:
            norm = float(torch.linalg.vector_norm(hint))
            if math.isfinite(norm) and norm > 0:
                start = start + hint.to(start) / norm
    result = linalg.lanczos(
        operator,
        dim,
        iterations=settings.max_hvps,
        start=start,
        tol=settings.tol,
        stop=settings.stop,
        verify=settings.verify,
        agree=agree,
    )
    ctx.memory[memory_key] = result.eigenvector
    return result


def safe_lr(optimizer: torch.optim.Optimizer, sharpness: float) -> tuple[float, str]:
    """Largest stable learning rate on the quadratic model with curvature ``sharpness``, and its rule.

    Plain GD: η < 2/λ (descent lemma). Heavy-ball momentum β with PyTorch's dampening d:
    η(1−d) < (2+2β)/λ; Nesterov: η < (2+2β)/((1+2β)λ) (Cohen et al., ICLR 2021, Appendix).
    Weight decay wd adds wd to the curvature the optimizer sees. Dampening 1: after the first step no
    gradient enters the momentum buffer, so no learning rate diverges. Uses the first parameter group.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return math.nan, "adaptive or unknown optimizer: see precond_sharpness"
    group = optimizer.param_groups[0]
    beta, dampening = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
    curvature = sharpness + float(group.get("weight_decay", 0.0))
    if curvature <= 0:
        return math.inf, "no positive curvature"
    if beta == 0:
        return 2.0 / curvature, "2/λ"
    if dampening == 1:
        return math.inf, "dampening 1: no gradient enters the momentum buffer"
    if group.get("nesterov"):
        return (2 + 2 * beta) / ((1 + 2 * beta) * curvature), "(2+2β)/((1+2β)λ) nesterov"
    return (2 + 2 * beta) / ((1 - dampening) * curvature), "(2+2β)/((1−d)λ) heavy-ball"


def _nan_fields(prefix: str, note: str) -> dict:
    return {prefix: math.nan, f"{prefix}_note": note}


def collective(options: dict) -> set[str]:
    """Probes that issue collectives of their own (global-scope sharpness under several processes)."""
    chosen = options.get("curvature")
    return {"sharpness"} if distributed.world()[1] > 1 and chosen and chosen.scope == "global" else set()


def _global_hessian(ctx: StepContext, on: str) -> linalg.Hvp:
    """H = (1/W) Σ_r H_r, the Hessian of the mean of the ranks' losses: this rank's HVPs, each all-reduced.

    Lockstep: the HVP method is agreed first (reverse-mode everywhere if any rank chose or fell back to
    it; a rank whose operator could not be built makes every rank refuse), and each product goes
    through ``distributed.mean_over_ranks`` (a failing rank sends NaN). The caller runs it on every
    rank or on none (after the step's packed all-reduce).
    """
    try:
        local, failure = hessian(ctx, on), None
    except Exception as error:  # noqa: BLE001 - the peers must hear of it before any product
        local, failure = None, error
    failed, reverse = distributed.any_rank(failure is not None, local is not None and local.method == linalg.REVERSE)
    if failed:
        raise RuntimeError(f"the Hessian operator could not be built on every rank ({failure or 'another rank'})")
    if reverse and local.method != linalg.REVERSE:  # timings differ between ranks; the method must not
        ctx.memory.setdefault("_hvp_method64" if _wants_float64(ctx) else "_hvp_method", {})["method"] = "reverse"
        for key in ("hvp", f"_hessian:{on}"):
            ctx.cache.pop(key, None)
        local = hessian(ctx, on)
    return linalg.Hvp(distributed.mean_over_ranks(local), local.method, local.dim, local.fallback_reason)


@register("sharpness")
def sharpness_probe(ctx: StepContext) -> dict:
    """λ_max of the Hessian (Lanczos, warm-started), its residual, HVPs used, and the safe learning rate.

    With several processes, ``scope`` says whose Hessian: "local" (this rank's batch, no collective) or
    "global" (the mean loss over all ranks' batches: one all-reduce per HVP, the stopping test agreed
    across ranks); recorded as ``sharpness_scope``.
    """
    on = _settings(ctx).sharpness_on
    scope = "global" if "sharpness" in collective(ctx.options) else "local"
    operator = _global_hessian(ctx, on) if scope == "global" else hessian(ctx, on)
    agree = (lambda stop: distributed.any_rank(stop)[0]) if scope == "global" else None
    labels = {"sharpness_on": on, **({"sharpness_scope": scope} if distributed.world()[1] > 1 else {})}
    calls = operator.calls
    try:
        result = _top_eigen(ctx, operator, operator.dim, f"_sharpness_vector:{on}", hint=ctx.flat_grad, agree=agree)
    except FloatingPointError as error:
        return {
            **_nan_fields("sharpness", f"non-finite Hessian-vector product ({error}); diverged weights?"),
            **labels,
            **_method_fields(ctx, operator),
        }
    safe, rule = safe_lr(ctx.optimizer, result.eigenvalue)
    lr = ctx.lr()
    return {
        "sharpness": result.eigenvalue,
        "sharpness_residual": result.residual,
        "sharpness_hvps": operator.calls - calls,
        **labels,
        "safe_lr": safe,
        "safe_lr_rule": rule,
        "lr_exceeds_safe": (lr > safe) if math.isfinite(safe) else (None if math.isnan(safe) else False),
        **_method_fields(ctx, operator),
    }


@register("precond_sharpness")
def precond_sharpness_probe(ctx: StepContext) -> dict:
    """λ_max(P⁻¹(H + wd)) with P from the optimizer's second-moment state and wd its L2 (coupled) weight decay,
    vs the stability bound (Cohen et al. 2022)."""
    found = preconditioner(ctx.optimizer, ctx.params)
    if found.inverse_sqrt is None:
        return _nan_fields("precond_sharpness", found.rule)
    operator = hessian(ctx)
    scale = found.inverse_sqrt.to(device=ctx.flat_before.device)
    dtype = _working_dtype(ctx)  # never the 16-bit model dtype: P⁻ᐟ² rounded to 8 bits is another matrix
    d = scale.to(dtype)
    decay = None if found.weight_decay is None else (scale**2 * found.weight_decay.to(scale.device)).to(dtype)
    calls = operator.calls

    def preconditioned(v: torch.Tensor) -> torch.Tensor:
        # λ(P⁻¹(H + wd)) = λ(P^{-½} H P^{-½} + P⁻¹wd): a similar, symmetric operator Lanczos can handle.
        v = v.to(dtype)
        out = d * operator(d * v).to(dtype)
        return out if decay is None else out + decay * v

    try:
        hint = None if ctx.flat_grad is None else scale * ctx.flat_grad.to(scale.dtype)
        result = _top_eigen(ctx, preconditioned, operator.dim, "_precond_vector", hint=hint)
    except FloatingPointError as error:
        return {
            **_nan_fields("precond_sharpness", f"non-finite Hessian-vector product ({error})"),
            "precond_bound": found.bound,
        }
    return {
        "precond_sharpness": result.eigenvalue,
        "precond_sharpness_residual": result.residual,
        "precond_hvps": operator.calls - calls,
        "precond_bound": found.bound,
        "precond_rule": found.rule,
        "precond_exceeds": result.eigenvalue > found.bound,
        **_method_fields(ctx, operator),
    }


@register("hessian_trace")
def hessian_trace_probe(ctx: StepContext) -> dict:
    """tr(H) by Hutchinson's estimator with Rademacher vectors, and its standard error."""
    operator = hessian(ctx)
    samples = _settings(ctx).trace_samples
    trace, stderr = linalg.hutchinson_trace(
        operator,
        operator.dim,
        samples=samples,
        generator=_generator(ctx),
        dtype=ctx.flat_before.dtype if not _wants_float64(ctx) else torch.float64,
        device=ctx.flat_before.device,
    )
    return {
        "hessian_trace": trace,
        "hessian_trace_stderr": stderr,
        "hessian_trace_samples": samples,
        **_method_fields(ctx, operator),
    }
