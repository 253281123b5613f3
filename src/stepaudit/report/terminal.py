"""Terminal summaries of a run and of a comparison: ``rich`` tables when installed, plain text otherwise."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import IO

import numpy as np

from ..cli import rich_console
from .compare import COLUMNS, cell, shown_columns, summary_rows
from .data import LAST_LOSS_NAME, NOT_MEASURED, Run, hyperparameters, summary
from .downsample import envelope
from .scales import fmt

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: np.ndarray, width: int = 48) -> str:
    """The finite values' shape in ``width`` block characters (bucket means; gaps as spaces)."""
    values = np.asarray(values, dtype=float)
    if not np.isfinite(values).any():
        return ""
    mid = envelope(np.arange(len(values), dtype=float), values, width).mid
    finite = mid[np.isfinite(mid)]
    lo, hi = float(finite.min()), float(finite.max())
    span = hi - lo or 1.0
    return "".join(
        " " if not math.isfinite(v) else BLOCKS[min(int((v - lo) / span * len(BLOCKS)), len(BLOCKS) - 1)] for v in mid
    )


def _pct(value: float) -> str:
    return f"{value:.0%}" if isinstance(value, float) and math.isfinite(value) else "–"


def _median(run: Run, name: str) -> float:
    if not run.has(name):
        return math.nan
    values = run.columns[name]
    return float(np.median(values[np.isfinite(values)]))


def run_rows(run: Run) -> list[tuple[str, str, str]]:
    """(quantity, value, how to read it) rows of one run's summary."""
    s = summary(run)
    rows = [
        ("optimizer steps" if run.passive else "audited steps", f"{s['audited_steps']:,}", ""),
        (
            "loss, first → last",
            f"{fmt(s['first_loss'])} → {fmt(s['last_loss'])}",
            f"training batch, before the step; {LAST_LOSS_NAME}",
        ),
    ]
    if run.passive:  # these need the loss after the step on the same batch (an Audit measures it)
        rows += [
            ("lowered / raised / flat", NOT_MEASURED, "needs the loss after the step (stepaudit.Audit)"),
            ("median α", NOT_MEASURED, ""),
            ("median Δloss / g·Δw", NOT_MEASURED, ""),
        ]
    else:
        rows += [
            (
                "lowered / raised / flat",
                f"{_pct(s['share_decrease'])} / {_pct(s['share_increase'])} / {_pct(s['share_flat'])}",
                "share of steps, on their own batch",
            ),
            ("median α", fmt(s["median_alpha"]), "−1 did not move, 0 valley floor, >1 overshot"),
            ("median Δloss / g·Δw", fmt(s["median_delta_over_first_order"]), "1 = the gradient's promise kept"),
        ]
    rows.append(("median ‖Δw‖/‖w‖", fmt(_median(run, "update_ratio")), "rule of thumb ≈ 1e-3"))
    bad = int((run.verdicts == "nonfinite").sum()), int((run.verdicts == "error").sum())
    if any(bad):
        rows.append(("non-finite / failed", f"{bad[0]} / {bad[1]}", "steps"))
    if run.has("sharpness") and run.has("lr"):
        x, sharp = run.xy("sharpness")
        last = sharp[np.isfinite(sharp)][-1]
        lr = run.columns["lr"][np.isfinite(run.columns["lr"])][-1]
        rows.append(("last sharpness λmax", fmt(float(last)), f"2/η = {fmt(2.0 / lr)}" if lr > 0 else ""))
    if run.has("noise_scale"):
        rows.append(
            ("median noise scale", fmt(_median(run, "noise_scale")), f"batch size {fmt(_median(run, 'batch_size'))}")
        )
    return rows


def _finding_line(d: dict) -> tuple[str, str]:
    head = str(d.get("title") or d.get("code") or "finding")
    extra = [str(d["severity"])] if d.get("severity") else []
    confidence = d.get("confidence")
    if isinstance(confidence, float) and 0 <= confidence <= 1:
        extra.append(f"confidence {confidence:.0%}")
    if d.get("first_step") is not None:
        extra.append(f"from step {d['first_step']}")
    fix = f"fix: {d['fix']}" if d.get("fix") and d.get("code") != "healthy" else ""
    return head + (f" ({', '.join(extra)})" if extra else ""), fix


def _subtitle(run: Run) -> str:
    hyper = ", ".join(f"{k}={v}" for k, v in hyperparameters(run.meta).items())
    optimizer = str(run.meta.get("optimizer") or "?") + (f"({hyper})" if hyper else "")
    return f"{run.meta.get('model', '?')} · {optimizer}"


def plain_run(run: Run) -> str:
    """The run summary as plain text."""
    lines = [f"stepaudit · {run.name}", _subtitle(run), ""]
    width = max(len(r[0]) for r in run_rows(run))
    lines += [f"  {q.ljust(width)}  {v:<22} {h}".rstrip() for q, v, h in run_rows(run)]
    spark = sparkline(run.columns.get("loss_before", np.array([])))
    if spark:
        lines += ["", f"  loss  {spark}"]
    if run.outcome:
        lines += ["", f"✗ {run.outcome}"]
    if run.findings or run.findings_error:
        lines += ["", "doctor's findings" + (" (stored by stepaudit doctor):" if run.passive else ":")]
        for d in run.findings:
            head, fix = _finding_line(d)
            lines += [f"  • {head}"] + ([f"    {fix}"] if fix else [])
        if run.findings_error:
            lines.append(f"  ! {run.findings_error}")
    return "\n".join(lines)


def plain_compare(runs: Sequence[Run]) -> str:
    """The comparison as plain text: one row per quantity, one column per run."""
    rows = summary_rows(runs)
    keys = shown_columns(rows)
    table = [[label] + [cell(k, row[k]) for row in rows] for k, label in keys]
    widths = [max(len(r[i]) for r in table) for i in range(len(rows) + 1)]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in table
    )


def print_run(run: Run, file: IO[str] | None = None, width: int | None = None) -> None:
    """Print the run summary (with rich when installed)."""
    file = file or sys.stdout
    try:
        from rich.console import Console, Group  # noqa: F401 - ImportError selects the plain text
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print(plain_run(run), file=file)
        return
    console = rich_console(file=file, width=width, highlight=False)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right", no_wrap=True)
    table.add_column(style="dim")
    for q, v, h in run_rows(run):
        table.add_row(Text(q), Text(v), Text(h))
    parts: list = [Text(_subtitle(run), style="dim"), Text(""), table]
    spark = sparkline(run.columns.get("loss_before", np.array([])))
    if spark:
        parts += [Text(""), Text.assemble(("loss  ", "bold"), (spark, "blue"))]
    if run.outcome:
        parts += [Text(""), Text(f"✗ {run.outcome}", style="bold red")]
    if run.findings or run.findings_error:
        parts += [
            Text(""),
            Text("doctor's findings" + (" (stored by stepaudit doctor)" if run.passive else ""), style="bold"),
        ]
        for d in run.findings:
            head, fix = _finding_line(d)
            parts.append(Text.assemble(("• ", "yellow"), (head, "")))
            if fix:
                parts.append(Text("  " + fix, style="green"))
        if run.findings_error:
            parts.append(Text(run.findings_error, style="red"))
    console.print(
        Panel(Group(*parts), title=Text(f"stepaudit · {run.name}", style="bold"), title_align="left", expand=False)
    )


def print_compare(runs: Sequence[Run], file: IO[str] | None = None, width: int | None = None) -> None:
    """Print the comparison table (with rich when installed)."""
    file = file or sys.stdout
    try:
        from rich import box
        from rich.console import Console  # noqa: F401 - ImportError selects the plain text
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print(plain_compare(runs), file=file)
        return
    console = rich_console(file=file, width=width, highlight=False)
    rows = summary_rows(runs)
    keys = shown_columns(rows, COLUMNS[1:])
    table = Table(title="stepaudit comparison", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("")  # one row per quantity, one column per run: fits a terminal for a few runs
    budget = max(8, (console.width - 24) // max(len(rows), 1) - 3)  # a run column's share of the terminal
    for row in rows:  # a name never folds mid-word: one longer than its share is cut visibly with "…"
        name = row["run"] if all(len(w) <= budget for w in row["run"].split()) else row["run"][: budget - 1] + "…"
        table.add_column(
            Text(name, style="bold"),
            justify="right",
            overflow="fold",
            min_width=max((len(w) for w in name.split()), default=1),
        )
    for key, label in keys:
        table.add_row(Text(label, style="bold"), *(Text(cell(key, row[key])) for row in rows))
    console.print(table)
