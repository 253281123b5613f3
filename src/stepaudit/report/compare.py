"""Several runs on one page: a summary table and overlaid charts (e.g. SGD vs momentum vs Adam)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from html import escape
from pathlib import Path

import numpy as np

from ..doctor.summary import LAST_LOSS
from ..store import output_file
from .charts import Guide, Series, time_chart
from .data import NOT_MEASURED, Run, hyperparameters, load_run, optimizer_label, stored_result, summary
from .downsample import blocks
from .html import figure_html, page
from .scales import fmt
from .sections import RATIO_GUIDE, Figure

PALETTE = ("#2563eb", "#ea580c", "#16a34a", "#7c3aed", "#dc2626", "#0d9488", "#ca8a04", "#db2777", "#4b5563", "#0891b2")


def run_label(run: Run, runs: Sequence[Run]) -> str:
    """The run's name, with its folder when two runs share a name."""
    if sum(r.name == run.name for r in runs) > 1:
        return f"{run.name} ({run.path})"
    return run.name


def summary_rows(runs: Sequence[Run]) -> list[dict]:
    """One row of headline numbers per run, for the HTML and the terminal tables."""
    rows = []
    for run in runs:
        s = summary(run)
        hyper = hyperparameters(run.meta)
        top = run.findings[0] if run.findings else None
        rows.append(
            {
                "run": run_label(run, runs),
                "optimizer": optimizer_label(run.meta),
                "lr": hyper.get("lr"),
                "steps": s["audited_steps"],
                "loss": f"{fmt(s['first_loss'])} → {fmt(s['last_loss'])}",
                **(
                    {key: NOT_MEASURED for key in ("lowered", "raised", "flat", "median_alpha", "kept")}
                    if run.passive
                    else {
                        "lowered": s["share_decrease"],
                        "raised": s["share_increase"],
                        "flat": s["share_flat"],
                        "median_alpha": s["median_alpha"],
                        "kept": s["median_delta_over_first_order"],
                    }
                ),
                "result": stored_result(run.meta, run.metrics),
                "finding": str(top.get("title") or top.get("code")) if top else "",
            }
        )
    return rows


COLUMNS = (
    ("run", "run"),
    ("optimizer", "optimizer"),
    ("lr", "lr"),
    ("steps", "steps"),
    ("loss", f"loss first → last ({LAST_LOSS})"),
    ("lowered", "lowered"),
    ("raised", "raised"),
    ("flat", "flat"),
    ("median_alpha", "median α"),
    ("kept", "Δloss/g·Δw"),
    ("result", "stored result"),
    ("finding", "doctor's top finding"),
)


OPTIONAL = ("result", "finding")  # columns shown only when some run has a value


def shown_columns(rows: list[dict], columns: Sequence[tuple[str, str]] = COLUMNS) -> list[tuple[str, str]]:
    """The columns to print: optional ones only when a run fills them."""
    return [(k, label) for k, label in columns if k not in OPTIONAL or any(r[k] for r in rows)]


def cell(key: str, value) -> str:
    """A table cell as text: shares as percentages, numbers shortened."""
    if value is None or value == "":
        return "–" if key not in OPTIONAL else ""
    if value == NOT_MEASURED:
        return value
    if key in ("lowered", "raised", "flat"):
        return f"{value:.0%}" if isinstance(value, float) and math.isfinite(value) else "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return fmt(value, 3)
    return str(value)


def _table_html(runs: Sequence[Run]) -> str:
    rows = summary_rows(runs)
    columns = shown_columns(rows)
    head = "".join(f"<th>{escape(label)}</th>" for _, label in columns)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for key, _ in columns:
            text = escape(cell(key, row[key]))
            if key == "run":
                text = f'<span class="swatch" style="background:{PALETTE[i % len(PALETTE)]}"></span>{text}'
            cells.append(f"<td>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<div class="table-card"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def _window(runs: Sequence[Run]) -> int:
    longest = max((len(r.steps) for r in runs), default=1)
    return max(1, longest // 60)


def _overlay(
    uid: str,
    title: str,
    how: str,
    runs: Sequence[Run],
    field: str,
    *,
    y_label: str,
    y_kind: str = "auto",
    stat: str | None = None,
    guides: tuple[Guide, ...] = (),
    transform=None,
    y_domain=None,
) -> Figure | None:
    """One series per run of ``field`` (or of its per-window ``stat`` when ``stat`` is given)."""
    series, legend = [], []
    window = _window(runs)
    for i, run in enumerate(runs):
        if not run.has(field) and transform is None:
            continue
        x, y = transform(run) if transform is not None else run.xy(field)
        if not len(x):
            continue
        if stat is not None:
            x, y = blocks(x, y, window, stat)
        color = PALETTE[i % len(PALETTE)]
        series.append(Series(run_label(run, runs), x, y, color))
        legend.append((run_label(run, runs), color, "line"))
    if not series or not any(np.isfinite(s.y).any() for s in series):
        return None
    svg, notes = time_chart(uid, title, series, y_label=y_label, y_kind=y_kind, guides=guides, y_domain=y_domain)
    if stat is not None and window > 1:
        notes.insert(0, f"each point: the {stat} over {window} consecutive audited steps")
    return Figure(uid, title, svg, how, legend, notes)


def _lowered(run: Run) -> tuple[np.ndarray, np.ndarray]:
    if run.passive:  # no verdicts: the loss after the step is not measured in passive mode
        return np.array([]), np.array([])
    return run.columns["step"], (run.verdicts == "decrease").astype(float)


def _kept(run: Run) -> tuple[np.ndarray, np.ndarray]:
    if not (run.has("delta") and run.has("first_order")):
        return np.array([]), np.array([])
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = run.columns["delta"] / run.columns["first_order"]
    return run.columns["step"], np.where(run.columns["first_order"] != 0, ratio, np.nan)


def compare_figures(runs: Sequence[Run]) -> list[Figure]:
    """The overlaid charts, each only when at least one run recorded its field."""
    figures = [
        _overlay(
            "c-loss",
            "Training loss",
            "The batch loss before each step, one line per run.",
            runs,
            "loss_before",
            y_label="loss",
        ),
        _overlay(
            "c-ref",
            "Reference (held-out) loss",
            "Loss on the fixed held-out data.",
            runs,
            "ref_loss_after",
            y_label="loss",
        ),
        _overlay(
            "c-lowered",
            "Share of steps that lowered their batch's loss",
            "Per window of steps: 1 = every step went downhill on its own batch; near 0.5 the steps are a coin flip.",
            runs,
            "verdict",
            y_label="share",
            stat="mean",
            transform=_lowered,
            y_domain=(-0.02, 1.02),
        ),
        _overlay(
            "c-kept",
            "How much of the gradient's promise was kept",
            "Median of Δloss / g·Δw per window: 1 = the loss fell as the gradient predicted, 0 = no change, "
            "below 0 = it rose.",
            runs,
            "delta",
            y_label="Δloss / g·Δw",
            stat="median",
            transform=_kept,
            guides=(Guide(1.0, "promise kept", "#6b7280"), Guide(0.0, "", "#9ca3af")),
        ),
        _overlay(
            "c-alpha",
            "Where the steps landed (median α)",
            "Median α per window: −1 did not move, 0 valley floor, +1 opposite wall, above 1 overshot uphill.",
            runs,
            "alpha",
            y_label="α",
            stat="median",
            y_kind="linear",
            guides=(Guide(0.0, "valley floor", "#111827"), Guide(1.0, "same height", "#dc2626")),
        ),
        _overlay(
            "c-update",
            "Update size ‖Δw‖/‖w‖",
            "Relative size of each step; the dashed line is the 10⁻³ rule of thumb.",
            runs,
            "update_ratio",
            y_label="‖Δw‖ / ‖w‖",
            y_kind="log",
            guides=(Guide(RATIO_GUIDE, "10⁻³", "#6b7280"),),
        ),
        _overlay("c-grad", "Gradient norm", "Global L2 norm of the gradient.", runs, "grad_norm", y_label="‖g‖"),
        _overlay(
            "c-sharp",
            "Sharpness λmax",
            "Largest Hessian eigenvalue, where recorded.",
            runs,
            "sharpness",
            y_label="λmax",
        ),
        _overlay(
            "c-noise",
            "Gradient noise scale",
            "B_simple = tr(Σ)/‖G‖², where recorded.",
            runs,
            "noise_scale",
            y_label="examples",
            y_kind="log",
        ),
    ]
    names = sorted({name for run in runs for name in run.metrics})
    for i, name in enumerate(names[:4]):  # each metric logged with Audit.log; ids by index: names are user text
        figures.append(
            _overlay(
                f"c-metric-{i}",
                f"Logged: {name}",
                f"{name} as each run logged it (audit.log).",
                runs,
                name,
                y_label=name,
                transform=_metric(name),
            )
        )
    return [f for f in figures if f is not None]


def _metric(name: str):
    """A transform reading a logged metric of a run (empty where the run did not log it)."""

    def read(run: Run) -> tuple[np.ndarray, np.ndarray]:
        steps, values = run.metrics.get(name, ([], []))
        return np.asarray(steps, float), np.asarray(values, float)

    return read


def render_compare(runs: Sequence[Run]) -> str:
    """The complete comparison page."""
    names = ", ".join(run_label(r, runs) for r in runs)
    charts = "".join(figure_html(f) for f in compare_figures(runs))
    body = (
        f'<header><p class="brand">stepaudit comparison</p><h1>{len(runs)} runs</h1><p class="sub">{escape(names)}</p></header>'
        f'<h2>Summary</h2>{_table_html(runs)}<h2>Overlaid</h2><section class="charts">{charts}</section>'
    )
    return page(f"stepaudit — compare {len(runs)} runs", body)


def write_compare(runs: Sequence[str | os.PathLike], out: str | os.PathLike = "compare.html") -> Path:
    """Write the comparison page of the given run folders to ``out`` and return its path."""
    if not runs:
        raise ValueError("compare needs at least one run folder")
    loaded = [load_run(r) for r in runs]
    path = output_file(out, "compare.html")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_compare(loaded), encoding="utf-8")
    return path
