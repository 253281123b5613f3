"""The record vocabulary: every field an audited (or passively watched) step can carry, in one table.

``stepaudit.schema`` derives from it the store's column types, the export column order and the field
reference in docs/audit.md (``python -m stepaudit.schema --markdown``). A new record field is one line here.
Writers: ``core`` (audit.py, records.py, the step probe), ``probe:<name>`` (an optional probe),
``distributed`` (several processes), ``passive`` (the doctor's passive capture).

Size (over 400 lines): it is a table, one entry per field; splitting it would scatter the one vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TYPES = ("float", "int", "str", "bool", "json")
QUADRATIC = "probe:quadratic, probe:interplay, probe:interplay_matrix"  # interplay writes ΣC when quadratic did not run
CURVATURE = (
    "probe:quadratic, probe:interplay, probe:interplay_matrix, probe:sharpness, probe:precond_sharpness, "
    "probe:hessian_trace"
)
LOSS = "loss units"
GRAD = "loss/weight units"
GRAD_SQ = "(loss/weight units)²"
WEIGHT = "weight units"


@dataclass(frozen=True)
class Field:
    """One record field: its name (``<n>`` marks a numbered family), value type, unit, meaning and writer."""

    name: str
    type: str
    unit: str
    meaning: str
    writer: str

    def __post_init__(self) -> None:
        """Refuse a type outside ``TYPES`` (a typo would silently change a column's SQL type)."""
        if self.type not in TYPES:
            raise ValueError(f"field {self.name!r}: type must be one of {TYPES}, got {self.type!r}")

    @property
    def pattern(self) -> re.Pattern[str] | None:
        """For a numbered family such as ``lr_group_<n>``: the regular expression of its names, else None."""
        if "<n>" not in self.name:
            return None
        return re.compile("^" + re.escape(self.name).replace(re.escape("<n>"), "[1-9][0-9]*") + "$")


def _f(name: str, type_: str, unit: str, meaning: str, writer: str) -> Field:
    """One table row (positional, to keep the table readable)."""
    return Field(name, type_, unit, meaning, writer)


CORE_AND_PASSIVE = "core, passive"

FIELDS: tuple[Field, ...] = (
    # -- the step itself (core; the passive capture writes the ones marked so) ---------------------------
    _f("step", "int", "", "optimizer step index (0-based)", CORE_AND_PASSIVE),
    _f(
        "loss_before",
        "float",
        LOSS,
        "training loss on this batch at the old weights (passive: the loss at backward)",
        CORE_AND_PASSIVE,
    ),
    _f("loss_after", "float", LOSS, "same loss function, same batch, same dropout masks, at the new weights", "core"),
    _f("delta", "float", LOSS, "`loss_after − loss_before`", "core"),
    _f(
        "first_order",
        "float",
        LOSS,
        "g·Δw, the change the gradient predicts (g: the gradient the optimizer received, after any clipping/unscaling)",
        CORE_AND_PASSIVE,
    ),
    _f("remainder", "float", LOSS, "`delta − first_order`: what curvature and higher orders added", "core"),
    _f(
        "alpha",
        "float",
        "",
        "where the step landed on the parabola p(t) = loss_before + first_order·t + "
        "remainder·t² (Cockpit's normalisation): −1 did not move, 0 valley floor, +1 opposite wall at equal height, "
        "> 1 overshoot; −1 also when no curvature is measurable; NaN when first_order ≥ 0 (no valley ahead)",
        "core",
    ),
    _f(
        "best_scale",
        "float",
        "",
        "t* = −first_order / (2·remainder), the multiple of Δw that minimises that parabola (∞ if none)",
        "core",
    ),
    _f("descent_cos", "float", "", "cos(Δw, −g): 1 for plain SGD, lower for momentum/Adam", CORE_AND_PASSIVE),
    _f("grad_norm", "float", GRAD, "global L2 norm ‖g‖ of the gradient the optimizer received", CORE_AND_PASSIVE),
    _f("update_norm", "float", WEIGHT, "global L2 norm ‖Δw‖ of the update", CORE_AND_PASSIVE),
    _f("weight_norm", "float", WEIGHT, "global L2 norm ‖w‖ of the weights before the step", CORE_AND_PASSIVE),
    _f(
        "update_ratio",
        "float",
        "",
        "‖Δw‖/‖w‖ (cs231n's rule of thumb: about 1e-3); per module and per parameter group in `layers`",
        CORE_AND_PASSIVE,
    ),
    _f(
        "verdict",
        "str",
        "",
        "`decrease`, `increase`, `flat` (\\|delta\\| within rounding noise), `nonfinite`, `error` (with `error`)",
        "core",
    ),
    _f("rounding_noise", "float", LOSS, "the bound on \\|delta\\| that rounding alone can produce", "core"),
    _f("noise_method", "str", "", "how `rounding_noise` was obtained: `measured` (float64 twin) or `roundoff`", "core"),
    _f("lr", "float", "lr", "learning rate of the first parameter group", CORE_AND_PASSIVE),
    _f("lr_group_<n>", "float", "lr", "learning rate of parameter group n (1 to 5; group 0 is `lr`)", "core"),
    _f(
        "batch_size",
        "int",
        "examples",
        "examples in the step (leading dimension of the batch's first tensor)",
        CORE_AND_PASSIVE,
    ),
    _f(
        "layers",
        "json",
        "",
        "per-module and per-parameter-group rows (kind, name, norms, ratio), stored in the `layers` table",
        CORE_AND_PASSIVE,
    ),
    _f("error", "str", "", "why auditing this step failed (`verdict` is then `error`)", "core, distributed"),
    _f(
        "probe_errors",
        "json",
        "",
        "probe name → the message of a probe that failed or could not run at this step",
        "core",
    ),
    # -- several processes (DDP, FSDP2): the own-batch fields above then describe the mean over ranks -----
    _f(
        "local_loss_before",
        "float",
        LOSS,
        "this rank's own `loss_before` (the record's is the mean over ranks)",
        "distributed",
    ),
    _f("local_loss_after", "float", LOSS, "this rank's own `loss_after`", "distributed"),
    _f("local_delta", "float", LOSS, "this rank's own `delta`", "distributed"),
    _f("local_verdict", "str", "", "this rank's own `verdict`", "distributed"),
    _f("world_size", "int", "ranks", "number of processes in the group", "distributed"),
    _f("rank", "int", "", "this process's rank", "distributed"),
    _f(
        "global_batch",
        "int",
        "examples",
        "Σ of the ranks' batch sizes (empty if a rank did not know its own)",
        "distributed",
    ),
    _f(
        "local_grad_norm",
        "float",
        GRAD,
        "‖g_r‖ of this rank's gradient before DDP averages it, as the backward left it (×GradScaler's scale if one is used)",
        "distributed",
    ),
    _f(
        "noise_scale_ranks",
        "float",
        "examples",
        "B_simple of this step from the ranks' and the all-reduced "
        "gradient (two-batch estimator, B_small = the ranks' harmonic-mean batch, B_big = W·B_small)",
        "distributed",
    ),
    _f(
        "noise_scale_ranks_stderr",
        "float",
        "examples",
        "delta-method standard error of `noise_scale_ranks` from the spread of the ranks' ‖g_r‖²",
        "distributed",
    ),
    _f(
        "noise_signal_ranks",
        "float",
        GRAD_SQ,
        "‖G‖² estimate of that two-batch estimator (pool over steps before dividing)",
        "distributed",
    ),
    _f("noise_trace_ranks", "float", GRAD_SQ, "tr Σ estimate of that two-batch estimator", "distributed"),
    _f(
        "probe_scope",
        "str",
        "",
        "`rank`: the probes of this step ran on this rank's batch alone, without a collective",
        "distributed",
    ),
    # -- curvature probes (probes.md) ---------------------------------------------------------------------
    _f("quadratic", "float", LOSS, "½ Δwᵀ H Δw: the second-order Taylor term of the step (one HVP)", QUADRATIC),
    _f(
        "cubic_remainder",
        "float",
        LOSS,
        "`delta − first_order − quadratic`: everything beyond second order",
        QUADRATIC,
    ),
    _f(
        "interplay",
        "float",
        LOSS,
        "Σ_{i≠j} ½ Δw_iᵀ H_ij Δw_j over layers: the part of `quadratic` that comes from layers moving together",
        "probe:interplay, probe:interplay_matrix",
    ),
    _f(
        "interplay_top",
        "json",
        LOSS,
        "the layer pairs with the largest \\|Δw_iᵀ H_ij Δw_j\\|, with sign: `[{a, b, value}]`",
        "probe:interplay, probe:interplay_matrix",
    ),
    _f(
        "interplay_matrix",
        "json",
        LOSS,
        "the full matrix C_ij = ½ Δw_iᵀ H_ij Δw_j (entries sum to `quadratic`)",
        "probe:interplay_matrix",
    ),
    _f(
        "interplay_layers",
        "json",
        "",
        "the layer names of the rows and columns of `interplay_matrix`",
        "probe:interplay_matrix",
    ),
    _f(
        "sharpness",
        "float",
        "1/lr",
        "λ_max(H), the largest Hessian eigenvalue (Lanczos, warm-started)",
        "probe:sharpness",
    ),
    _f(
        "sharpness_residual",
        "float",
        "1/lr",
        "‖Hv − λv‖ for the returned unit vector v: some eigenvalue lies within it of `sharpness`",
        "probe:sharpness",
    ),
    _f("sharpness_hvps", "int", "HVPs", "Hessian-vector products spent on `sharpness`", "probe:sharpness"),
    _f("sharpness_on", "str", "", "whose Hessian: `batch` (the step's own) or `reference`", "probe:sharpness"),
    _f(
        "sharpness_scope",
        "str",
        "",
        "several processes: `local` (this rank's batch) or `global` (mean loss over the ranks' batches)",
        "probe:sharpness",
    ),
    _f(
        "sharpness_note",
        "str",
        "",
        "why `sharpness` is NaN (e.g. a non-finite Hessian-vector product)",
        "probe:sharpness",
    ),
    _f(
        "safe_lr",
        "float",
        "lr",
        "the largest stable learning rate on the local quadratic model (2/λ for plain "
        "SGD; momentum and Nesterov variants in probes.md)",
        "probe:sharpness",
    ),
    _f("safe_lr_rule", "str", "", "which formula gave `safe_lr`", "probe:sharpness"),
    _f(
        "lr_exceeds_safe",
        "bool",
        "",
        "`lr > safe_lr` (first parameter group); empty for adaptive optimizers",
        "probe:sharpness",
    ),
    _f(
        "precond_sharpness",
        "float",
        "1/lr",
        "λ_max(P⁻¹H) for Adam, AdamW and RMSprop, P from the optimizer's second-moment state",
        "probe:precond_sharpness",
    ),
    _f(
        "precond_sharpness_residual",
        "float",
        "1/lr",
        "the Lanczos residual of `precond_sharpness`",
        "probe:precond_sharpness",
    ),
    _f(
        "precond_hvps", "int", "HVPs", "Hessian-vector products spent on `precond_sharpness`", "probe:precond_sharpness"
    ),
    _f(
        "precond_bound",
        "float",
        "1/lr",
        "the stability threshold of λ_max(P⁻¹H), e.g. (2+2β₁)/(η(1−β₁)) for Adam",
        "probe:precond_sharpness",
    ),
    _f(
        "precond_rule",
        "str",
        "",
        "which bound `precond_bound` is (and whether coupled weight decay is in the operator)",
        "probe:precond_sharpness",
    ),
    _f(
        "precond_exceeds", "bool", "", "whether `precond_sharpness` is above `precond_bound`", "probe:precond_sharpness"
    ),
    _f(
        "precond_sharpness_note",
        "str",
        "",
        "why `precond_sharpness` is NaN (e.g. an optimizer without second-moment state)",
        "probe:precond_sharpness",
    ),
    _f(
        "hessian_trace",
        "float",
        "1/lr",
        "tr(H) by Hutchinson's estimator over Rademacher vectors",
        "probe:hessian_trace",
    ),
    _f("hessian_trace_stderr", "float", "1/lr", "standard error of `hessian_trace`", "probe:hessian_trace"),
    _f("hessian_trace_samples", "int", "vectors", "Rademacher vectors behind `hessian_trace`", "probe:hessian_trace"),
    _f(
        "hvp_method",
        "str",
        "",
        "which Hessian-vector product ran: `forward-over-reverse` or `reverse-over-reverse`",
        CURVATURE,
    ),
    _f("hvp_fallback", "str", "", "why forward mode failed, when it did", CURVATURE),
    # -- data probes: held-out data, the next batch, gradient noise (probes.md) ---------------------------
    _f("ref_loss_before", "float", LOSS, "L_ref, the reference (held-out) loss, at the old weights", "probe:reference"),
    _f("ref_loss_after", "float", LOSS, "L_ref at the new weights", "probe:reference"),
    _f(
        "ref_delta",
        "float",
        LOSS,
        "`ref_loss_after − ref_loss_before`: what the step did to the held-out loss",
        "probe:reference",
    ),
    _f(
        "ref_rounding_noise",
        "float",
        LOSS,
        "rounding bound of `ref_delta` (same rule as `rounding_noise`)",
        "probe:reference",
    ),
    _f("ref_mode", "str", "", "`eval` (dropout off, BatchNorm running statistics) or `train`", "probe:reference"),
    _f(
        "grad_cos_ref",
        "float",
        "",
        "cos(g, ∇L_ref(w_t)): does the batch gradient point where the held-out gradient points?",
        "probe:reference",
    ),
    _f(
        "next_delta",
        "float",
        LOSS,
        "L_{t+1}(w_{t+1}) − L_{t+1}(w_t): what step t did to the next batch (written into step t's record at step t+1)",
        "probe:next_delta",
    ),
    _f("next_loss_before", "float", LOSS, "the next batch's loss at this step's old weights", "probe:next_delta"),
    _f("next_loss_after", "float", LOSS, "the next batch's loss at this step's new weights", "probe:next_delta"),
    _f("next_rounding_noise", "float", LOSS, "rounding bound of `next_delta`", "probe:next_delta"),
    _f("trace_sigma", "float", GRAD_SQ, "tr Σ̂, the trace of the per-example gradient covariance", "probe:noise"),
    _f("grad_sq_norm", "float", GRAD_SQ, "‖G‖²̂, the squared norm of the true (expected) gradient", "probe:noise"),
    _f("noise_scale", "float", "examples", "B_simple = tr Σ̂ / ‖G‖²̂ (`inf` when ‖G‖²̂ ≤ 0)", "probe:noise"),
    _f(
        "grad_snr",
        "float",
        "",
        "B·‖G‖²̂ / tr Σ̂ = B / B_simple: signal over noise of this batch's gradient",
        "probe:noise",
    ),
    _f("noise_stderr", "float", "examples", "jackknife standard error of `noise_scale`", "probe:noise"),
    _f("trace_sigma_stderr", "float", GRAD_SQ, "jackknife standard error of `trace_sigma`", "probe:noise"),
    _f("grad_sq_norm_stderr", "float", GRAD_SQ, "jackknife standard error of `grad_sq_norm`", "probe:noise"),
    _f("noise_scale_method", "str", "", "`per_sample`, `micro_batch` or `two_batch`", "probe:noise"),
    _f(
        "noise_units",
        "int",
        "units",
        "units the batch was cut into (examples, micro-batches, or 2 for two_batch)",
        "probe:noise",
    ),
    _f("noise_engine", "str", "", "per_sample only: `hooks` or `vmap`", "probe:noise"),
    _f(
        "noise_pass", "str", "", "per_sample only: `training` (read off the step's own pass) or `replay`", "probe:noise"
    ),
    _f(
        "noise_fallback",
        "str",
        "",
        "why the preferred method was not used (e.g. `BatchNorm in train mode`)",
        "probe:noise",
    ),
    _f(
        "noise_scale_steps",
        "int",
        "steps",
        "two_batch only: steps the running means behind `noise_scale` cover",
        "probe:noise",
    ),
    # -- the doctor's passive capture (doctor.md) ---------------------------------------------------------
    _f(
        "optimizer",
        "int",
        "",
        "which optimizer of the script took the step (0-based; empty for a hand-written update)",
        "passive",
    ),
    _f("local_step", "int", "", "the step index of that optimizer alone", "passive"),
    _f("backward_passes", "int", "passes", "backward passes since that optimizer's previous step", "passive"),
    _f("custom_update", "bool", "", "no `torch.optim` step ran: each backward pass stands for a step", "passive"),
    _f(
        "measured",
        "bool",
        "",
        "a sampled step with gradient/update statistics (a stored NaN then means NaN)",
        "passive",
    ),
    _f("capture_error", "str", "", "why the statistics of this step could not be taken", "passive"),
    _f(
        "grads_kept",
        "float",
        "share",
        "share of gradients never cleared since the optimizer's previous step",
        "passive",
    ),
    _f("grad_nonfinite", "bool", "", "the gradient held NaN/Inf", "passive"),
    _f("weights_nonfinite", "bool", "", "the weights held NaN/Inf", "passive"),
    _f("grad_cos_prev", "float", "", "cosine between this step's gradient and the previous step's", "passive"),
    _f(
        "dead_output_share",
        "float",
        "share",
        "largest share of a ReLU on the model's output at 0 for the whole batch",
        "passive",
    ),
    _f(
        "dead_relu_share",
        "float",
        "share",
        "share of hidden ReLU units at 0 for the whole batch (unit-weighted)",
        "passive",
    ),
    _f("dead_relu_max", "float", "share", "the largest such share of one ReLU", "passive"),
    _f("dead_relu_layers", "int", "layers", "hidden ReLUs behind `dead_relu_share`", "passive"),
    _f(
        "saturated_share", "float", "share", "share of hidden sigmoid/tanh outputs saturated (unit-weighted)", "passive"
    ),
    _f("saturated_max", "float", "share", "the largest such share of one activation", "passive"),
    _f("saturated_layers", "int", "layers", "hidden sigmoid/tanh activations behind `saturated_share`", "passive"),
    _f("input_layer", "str", "", "type of the first parametrised layer whose input is measured", "passive"),
    _f(
        "input_normalized",
        "bool",
        "",
        "the first layer is a normalisation layer (the input scale is not judged)",
        "passive",
    ),
    _f("input_nonfinite", "bool", "", "that input held NaN/Inf", "passive"),
    _f("input_rows", "int", "examples", "pooled input rows (one per example) behind the input statistics", "passive"),
    _f("input_rms", "float", "input units", "RMS of that input", "passive"),
    _f("input_feature_rms_median", "float", "input units", "median over features of the per-feature RMS", "passive"),
    _f("input_feature_rms_max", "float", "input units", "largest per-feature RMS", "passive"),
    _f("input_mean_abs", "float", "input units", "mean over features of \\|feature mean\\|", "passive"),
    _f("input_feature_std_median", "float", "input units", "median over features of the per-feature std", "passive"),
    _f("input_feature_offset_median", "float", "", "median over varying features of \\|mean\\|/std", "passive"),
    _f("input_feature_std_max", "float", "input units", "largest per-feature std among varying features", "passive"),
    _f("input_feature_std_ratio", "float", "", "largest over median per-feature std", "passive"),
    _f(
        "input_feature_std_min_ratio",
        "float",
        "",
        "median over smallest per-feature std (at most 100 features)",
        "passive",
    ),
)

LAYER_FIELDS: tuple[Field, ...] = (
    _f("step", "int", "", "the step the row belongs to", CORE_AND_PASSIVE),
    _f(
        "kind",
        "str",
        "",
        "`module` (the module owning the parameters) or `group` (a parameter group)",
        CORE_AND_PASSIVE,
    ),
    _f("name", "str", "", "module path, or the parameter group's index", CORE_AND_PASSIVE),
    _f("grad_norm", "float", GRAD, "‖g‖ over the row's parameters", CORE_AND_PASSIVE),
    _f("update_norm", "float", WEIGHT, "‖Δw‖ over the row's parameters", CORE_AND_PASSIVE),
    _f("weight_norm", "float", WEIGHT, "‖w‖ over the row's parameters", CORE_AND_PASSIVE),
    _f("update_ratio", "float", "", "‖Δw‖/‖w‖ of the row", CORE_AND_PASSIVE),
)
