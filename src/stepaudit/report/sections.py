"""The charts of one run's report: what each shows, and a line on how to read it.

Size (over 400 lines): one short function per chart of the report, in the order the report shows them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .charts import Band, Guide, Series, heatmap, histogram, nonfinite_marks, scatter, time_chart
from .data import Run, layer_matrix
from .scales import fmt

BLUE, ORANGE, GREEN, PURPLE, GREY, RED, TEAL = (
    "#2563eb",
    "#ea580c",
    "#16a34a",
    "#7c3aed",
    "#6b7280",
    "#dc2626",
    "#0d9488",
)
VERDICT_COLORS = {
    "decrease": "#16a34a",
    "increase": "#dc2626",
    "flat": "#9ca3af",
    "nonfinite": "#7c3aed",
    "error": "#f59e0b",
}
RATIO_GUIDE = (
    1e-3  # rule of thumb: an update of about 1e-3 of the weights' norm per step (Karpathy's update:data ratio)
)


@dataclass
class Figure:
    """A chart card: title, SVG, a one-line 'how to read it', legend entries (label, colour, mark) and notes."""

    id: str
    title: str
    svg: str
    how: str
    legend: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wide: bool = False


def run_figures(run: Run, main_only: bool = False) -> list[Figure]:
    """Every chart the run's recorded fields allow, in reading order (``main_only``: those of ``MAIN_FIGURES``)."""
    makers = (
        MAIN_FIGURES
        if main_only
        else (
            loss_figure,
            promise_figure,
            alpha_figure,
            alpha_histogram,
            heatmap_figure,
            update_figure,
            lr_figure,
            metrics_figure,
            norms_figure,
            sharpness_figure,
            precond_figure,
            noise_figure,
            verification_figure,
        )
    )
    return [f for f in (make(run) for make in makers) if f is not None]


def _x_domain(run: Run) -> tuple[float, float]:
    steps = run.columns["step"]
    lo, hi = (float(steps.min()), float(steps.max())) if len(steps) else (0.0, 1.0)
    return (lo, hi) if hi > lo else (lo - 1, hi + 1)


def loss_figure(run: Run) -> Figure | None:
    series, legend = [], []
    for name, label, color, style in (
        ("loss_before", "training loss (batch, before the step)", BLUE, "line"),
        ("loss_after", "same batch, after the step", ORANGE, "dash"),
    ):
        if run.has(name):
            series.append(Series(label, *run.xy(name), color, style))
            legend.append((label, color, style))
    for name in ("ref_loss_after", "ref_loss_before", "ref_loss"):
        if run.has(name):
            label = "reference (held-out) loss" + (", after the step" if name == "ref_loss_after" else "")
            series.append(Series(label, *run.xy(name), GREEN, "line", 2.2))
            legend.append((label, GREEN, "line"))
            break
    if not series:
        return None
    svg, notes = time_chart("loss", "Loss per step", series, y_label="loss", x_domain=_x_domain(run))
    nonfinite = run.columns["step"][np.asarray(run.verdicts == "nonfinite", bool)]
    if len(nonfinite):
        svg = nonfinite_marks(svg, nonfinite, _x_domain(run))
        legend.append((f"non-finite step ({len(nonfinite)})", RED, "tick"))
    how = (
        "Solid: the batch's loss before each step; dashed: the same batch right after it (below solid = the step "
        "helped its own batch)"
        + ("; green: loss on fixed held-out data." if any(s.color == GREEN for s in series) else ".")
    )
    if run.passive and not run.has("loss_after"):
        how = "The batch's loss at each backward pass (the loss after the step is not measured in passive mode)."
    return Figure("loss", "Loss per step", svg, how, legend, notes)


def promise_figure(run: Run) -> Figure | None:
    if not (run.has("first_order") and run.has("delta")):
        return None
    x, y = run.columns["first_order"], run.columns["delta"]
    groups, steps, legend = [], [], []
    total = max(int((np.isfinite(x) & np.isfinite(y)).sum()), 1)
    for verdict, color in VERDICT_COLORS.items():
        mask = (run.verdicts == verdict) & np.isfinite(x) & np.isfinite(y)
        if mask.any():
            groups.append(Series(verdict, x[mask], y[mask], color, "points"))
            steps.append(run.columns["step"][mask])
            legend.append((f"{verdict} ({mask.sum() / total:.0%})", color, "dot"))
    if not groups:
        return None
    svg, notes = scatter(
        "promise",
        "Promise vs reality",
        groups,
        x_label="g·Δw — change the gradient predicted",
        y_label="Δloss — actual change on the batch",
        steps=steps,
    )
    legend.append(("y = x: prediction kept", GREY, "dash"))
    return Figure(
        "promise",
        "Promise vs reality",
        svg,
        "One dot per step. On the dashed diagonal the loss changed exactly as g·Δw predicted; above it "
        "curvature ate part of the gain; above the horizontal 0 line the loss went up. Axes are "
        "symmetric-log.",
        legend,
        notes,
    )


def _alpha_top(alpha: np.ndarray) -> float:
    finite = alpha[np.isfinite(alpha)]
    if not finite.size:
        return 1.6
    return float(min(max(1.6, np.percentile(finite, 98) * 1.1), 5.0))


def alpha_figure(run: Run) -> Figure | None:
    if not run.has("alpha"):
        return None
    x, alpha = run.xy("alpha")
    top = _alpha_top(alpha)
    bands = (
        Band(-1, 0, "#dbeafe", "−1 < α < 0: stopped short of the valley floor"),
        Band(0, 1, "#fef3c7", "0 < α < 1: past the floor, still lower than before"),
        Band(1, top, "#fee2e2", "α > 1: overshot uphill"),
    )
    guides = (
        Guide(-1, "−1 did not move", GREY),
        Guide(0, "0 valley floor", "#111827"),
        Guide(1, "+1 same height", RED),
    )
    svg, notes = time_chart(
        "alpha",
        "Where each step landed (α)",
        [Series("α", x, alpha, PURPLE, "points")],
        y_label="α",
        y_domain=(-1.15, top),
        guides=guides,
        bands=bands,
        x_domain=_x_domain(run),
    )
    legend = [
        ("α per step", PURPLE, "dot"),
        ("stopped short", "#bfdbfe", "band"),
        ("past the floor", "#fde68a", "band"),
        ("overshot uphill", "#fecaca", "band"),
    ]
    return Figure(
        "alpha",
        "Where each step landed (α)",
        svg,
        "α places the step on the parabola through the losses before and after: −1 did not move, 0 landed on "
        "the valley floor, +1 the opposite wall at equal height, above 1 overshot uphill (Cockpit's α).",
        legend,
        notes,
    )


def alpha_histogram(run: Run) -> Figure | None:
    if not run.has("alpha"):
        return None
    _, alpha = run.xy("alpha")
    top = _alpha_top(alpha)
    edges = np.linspace(-1.0, top, int(round((top + 1) / 0.08)) + 1)
    beyond = int((alpha[np.isfinite(alpha)] > top).sum())
    svg = histogram(
        "alpha-hist",
        "Distribution of α",
        alpha,
        edges,
        color=PURPLE,
        x_label="α",
        guides=(Guide(0, "valley floor", "#111827"), Guide(1, "same height", RED)),
    )
    notes = [f"{beyond} step{'s' if beyond > 1 else ''} with α > {fmt(top)} counted in the last bar"] if beyond else []
    finite = alpha[np.isfinite(alpha)]
    median = f"median α = {fmt(float(np.median(finite)))}" if finite.size else "no finite α"
    return Figure(
        "alpha-hist",
        "Distribution of α",
        svg,
        f"Steps per α bin ({median}). A pile near −1 means steps too small to matter; mass above 1 means "
        "the learning rate overshoots.",
        [("steps", PURPLE, "band")],
        notes,
    )


def heatmap_figure(run: Run) -> Figure | None:
    names, edges, matrix = layer_matrix(run.layers, "module", "update_ratio")
    if not names:
        return None
    described = run.meta.get("modules") if isinstance(run.meta.get("modules"), dict) else {}
    labels = [f"{name} · {described[name]}" if name in described else name for name in names]
    svg = heatmap(
        "ratio-heatmap",
        "Update ratio per layer",
        labels,
        edges,
        matrix,
        center=math.log10(RATIO_GUIDE),
        half_range=3.0,
        x_label="step",
        value_label=lambda v: f"‖Δw‖/‖w‖ ≈ {fmt(10.0**v)}",
        colorbar_label="‖Δw‖/‖w‖",
        guide_label="10⁻³ guide",
    )
    notes = (
        [
            f"{int(edges[-1] - edges[0]):,} steps in {len(edges) - 1} columns; each cell is the geometric mean over its steps"
        ]
        if len(edges) - 1 < len(np.unique([r["step"] for r in run.layers]))
        else []
    )
    return Figure(
        "ratio-heatmap",
        "Update ratio per layer",
        svg,
        "One row per module (its path, type and weight shape), one column per span of steps; colour is ‖Δw‖/‖w‖ on a log scale, white at the "
        "10⁻³ rule of thumb: blue rows barely move, red rows are rewritten fast.",
        [],
        notes,
        wide=True,
    )


def update_figure(run: Run) -> Figure | None:
    if not run.has("update_ratio"):
        return None
    series = [Series("global ‖Δw‖/‖w‖", *run.xy("update_ratio"), BLUE)]
    groups = sorted({r["name"] for r in run.layers if r.get("kind") == "group"})
    legend = [("all parameters", BLUE, "line")]
    if len(groups) > 1:
        palette = (ORANGE, GREEN, PURPLE, TEAL, RED)
        for i, name in enumerate(groups[:5]):
            rows = [
                (r["step"], r["update_ratio"]) for r in run.layers if r.get("kind") == "group" and r["name"] == name
            ]
            x, y = (np.array(v, float) for v in zip(*rows))
            series.append(Series(f"group {name}", x, y, palette[i], "dash"))
            legend.append((f"param group {name}", palette[i], "dash"))
    svg, notes = time_chart(
        "update",
        "Update size",
        series,
        y_label="‖Δw‖ / ‖w‖",
        y_kind="log",
        guides=(Guide(RATIO_GUIDE, "10⁻³ guide", GREY),),
        x_domain=_x_domain(run),
    )
    legend.append(("10⁻³ rule of thumb", GREY, "dash"))
    return Figure(
        "update",
        "Update size relative to the weights",
        svg,
        "How much each step changes the weights, relative to their size. Far below 10⁻³ the model barely "
        "moves; far above it, each step rewrites it.",
        legend,
        notes,
    )


def lr_figure(run: Run) -> Figure | None:
    """The learning rate each step used: param group 0 (the record's ``lr``), and every group when recorded."""
    if not run.has("lr"):
        return None
    series = [Series("lr, param group 0", *run.xy("lr"), BLUE)]
    legend = [("param group 0", BLUE, "line")]
    palette = (ORANGE, GREEN, PURPLE, TEAL, RED)
    for i in range(1, 6):
        name = f"lr_group_{i}"
        if run.has(name):
            series.append(Series(f"lr, param group {i}", *run.xy(name), palette[i - 1], "dash"))
            legend.append((f"param group {i}", palette[i - 1], "dash"))
    values = np.concatenate([s.y for s in series])  # every group decides: a frozen group (lr 0) forces linear
    positive = bool(np.all(values[np.isfinite(values)] > 0))
    svg, notes = time_chart(
        "lr",
        "Learning rate",
        series,
        y_label="learning rate",
        y_kind="log" if positive else "auto",
        x_domain=_x_domain(run),
    )
    return Figure(
        "lr",
        "Learning rate per step",
        svg,
        "The learning rate each audited step used, after any scheduler. A schedule that falls by orders of "
        "magnitude early stops training as surely as a bug.",
        legend,
        notes,
    )


def metrics_figure(run: Run) -> Figure | None:
    """What the run logged with ``Audit.log`` (accuracy, validation loss …), one line per metric."""
    if not run.metrics:
        return None
    palette = (GREEN, PURPLE, ORANGE, TEAL, RED, BLUE)
    series, legend = [], []
    for i, (name, (steps, values)) in enumerate(sorted(run.metrics.items())[:6]):
        color = palette[i % len(palette)]
        series.append(Series(name, np.asarray(steps, float), np.asarray(values, float), color, "line"))
        legend.append((name, color, "line"))
    lo, hi = _x_domain(run)  # widened to every logged step: a metric logged after the last audited step still shows
    logged = [s for steps, _ in run.metrics.values() for s in steps]
    domain = (min([lo, *logged]), max([hi, *logged])) if logged else (lo, hi)
    svg, notes = time_chart("metrics", "Logged metrics", series, y_label="value", x_domain=domain)
    if len(run.metrics) > 6:
        notes.append(f"{len(run.metrics) - 6} more metrics logged; the first six by name are drawn")
    return Figure(
        "metrics",
        "Metrics logged by the run",
        svg,
        "What the training script logged with audit.log(name, value): held-out accuracy or loss against "
        "the step, beside the per-step audit above.",
        legend,
        notes,
    )


def norms_figure(run: Run) -> Figure | None:
    series, legend = [], []
    for name, label, color in (("grad_norm", "‖g‖ gradient", RED), ("update_norm", "‖Δw‖ update", BLUE)):
        if run.has(name):
            series.append(Series(label, *run.xy(name), color))
            legend.append((label, color, "line"))
    if not series:
        return None
    svg, notes = time_chart("norms", "Gradient and update norms", series, y_label="L2 norm", x_domain=_x_domain(run))
    return Figure(
        "norms",
        "Gradient and update norms",
        svg,
        "Global L2 norms per step. A gradient norm growing by orders of magnitude warns of divergence; an "
        "update norm stuck near zero, of a learning rate too small or a dead network.",
        legend,
        notes,
    )


def _bound_label(ratio: float) -> str:
    return "2/η" if abs(ratio - 1) < 1e-3 else "(2+2β)/η"


def sharpness_figure(run: Run) -> Figure | None:
    if not run.has("sharpness"):
        return None
    x, sharp = run.xy("sharpness")
    series = [Series("sharpness λmax", x, sharp, BLUE, "points")]
    legend = [("sharpness λmax", BLUE, "dot")]
    adaptive = "safe_lr" in run.columns and not run.has("safe_lr")  # the probe found no 2/η-type rule (Adam …)
    notes_extra = ["no plain stability bound for this optimizer: see the preconditioned sharpness"] if adaptive else []
    if run.has("lr") and not adaptive:
        lr = run.columns["lr"]
        bound = np.where(lr > 0, 2.0 / np.where(lr > 0, lr, 1.0), np.nan)
        label = "2/η"
        if run.has("safe_lr"):  # safe_lr = c/λ ⇒ the bound on λ at this η is c/η = safe_lr·λ/η (c = 2 or 2+2β)
            with np.errstate(invalid="ignore", divide="ignore"):
                c = run.columns["safe_lr"] * run.columns["sharpness"] / 2.0
            finite = c[np.isfinite(c)]
            if finite.size:
                bound = bound * float(np.median(finite))
                label = _bound_label(float(np.median(finite)))
        series.append(Series(f"stability bound {label}", run.columns["step"], bound, RED, "dash"))
        legend.append((f"stability bound {label}", RED, "dash"))
    svg, notes = time_chart(
        "sharpness",
        "Sharpness against the stability bound",
        series,
        y_label="λmax of the Hessian",
        x_domain=_x_domain(run),
    )
    notes += notes_extra
    return Figure(
        "sharpness",
        "Sharpness against the stability bound",
        svg,
        "The Hessian's largest eigenvalue against the largest one gradient descent tolerates at this learning "
        "rate; above the dashed line the step diverges along the sharpest direction (edge of stability).",
        legend,
        notes,
    )


def precond_figure(run: Run) -> Figure | None:
    if not run.has("precond_sharpness"):
        return None
    series = [Series("preconditioned sharpness λmax(P⁻¹H)", *run.xy("precond_sharpness"), TEAL, "points")]
    legend = [("λmax(P⁻¹H)", TEAL, "dot")]
    if run.has("precond_bound"):
        series.append(Series("bound (2+2β₁)/(η(1−β₁))", *run.xy("precond_bound"), RED, "dash"))
        legend.append(("bound (2+2β₁)/(η(1−β₁))", RED, "dash"))
    svg, notes = time_chart(
        "precond", "Preconditioned sharpness", series, y_label="λmax(P⁻¹H)", x_domain=_x_domain(run)
    )
    return Figure(
        "precond",
        "Preconditioned sharpness (Adam-like steps)",
        svg,
        "For adaptive optimizers the stability limit applies to the preconditioned Hessian: above the dashed "
        "bound the step is unstable along its sharpest direction (Cohen et al., 2022).",
        legend,
        notes,
    )


def noise_figure(run: Run) -> Figure | None:
    if not run.has("noise_scale"):
        return None
    series = [Series("noise scale B_simple", *run.xy("noise_scale"), ORANGE, "points")]
    legend = [("noise scale B_simple", ORANGE, "dot")]
    if run.has("batch_size"):
        series.append(Series("batch size", *run.xy("batch_size"), GREY, "dash"))
        legend.append(("batch size", GREY, "dash"))
    svg, notes = time_chart(
        "noise", "Gradient noise scale", series, y_label="examples", y_kind="log", x_domain=_x_domain(run)
    )
    return Figure(
        "noise",
        "Gradient noise scale against the batch size",
        svg,
        "B_simple = tr(Σ)/‖G‖² (McCandlish et al., 2018): batches much smaller than it are dominated by "
        "gradient noise; much larger ones waste compute.",
        legend,
        notes,
    )


def verification_figure(run: Run) -> Figure | None:
    """``doctor --verify``: the original run's loss and each fixed run's, per step, on one chart."""
    stored = run.meta.get("verification_losses")
    if not isinstance(stored, dict) or not stored.get("fixes"):
        return None

    def curve(points: list) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(
            [p for p in points if isinstance(p, (list, tuple)) and len(p) == 2 and p[1] is not None], float
        ).reshape(-1, 2)
        return rows[:, 0], rows[:, 1]

    series, legend = [], []
    if stored.get("original"):
        series.append(Series("original", *curve(stored["original"]), GREY, "line", 2.2))
        legend.append(("original run", GREY, "line"))
    for fix, color in zip(stored["fixes"], (GREEN, BLUE, PURPLE)):
        label = f"{fix.get('code')}: {fix.get('fix')} ({fix.get('verdict')})"
        series.append(Series(label, *curve(fix.get("losses") or []), color, "line"))
        legend.append((label, color, "line"))
        if fix.get("original"):  # a rewired loss: the original measured with it, to compare like with like
            name = f"original, measured with {fix.get('code')}'s rewired loss"
            series.append(Series(name, *curve(fix["original"]), color, "dash"))
            legend.append((name, color, "dash"))
    steps = np.concatenate([s.x for s in series])
    domain = (float(steps.min()), float(steps.max())) if len(steps) and steps.max() > steps.min() else _x_domain(run)
    svg, notes = time_chart("verify", "Loss with each fix", series, y_label="loss", x_domain=domain)
    return Figure(
        "verify",
        "Verification: the loss with each fix applied",
        svg,
        "stepaudit doctor --verify re-ran the unchanged script with each diagnosis's fix applied by hooks: "
        "grey is the original run's loss per step, each colour a fixed run's (same seeds and steps); a "
        "dashed line is the original measured with a rewired loss.",
        legend,
        notes,
    )


# The report's main charts, in its order: what a notebook shows inline (loss, promise, α, update size, lr).
MAIN_FIGURES = (loss_figure, promise_figure, alpha_figure, update_figure, lr_figure)
