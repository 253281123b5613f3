"""The range test as one standalone SVG in the report's style: loss against a log lr axis, suggestions marked.

Built on the report's chart frame and scales (``report.charts.Frame``, ``report.scales.Scale`` with a log x
axis); the report's own ``svg.chart`` CSS rules are embedded so the SVG looks the same outside a report page.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

import numpy as np

from .report.charts import BOTTOM, PLOT_HEIGHT, TOP, WIDTH, Frame, coord, polyline
from .report.scales import Scale, padded

COLORS = {
    "stepaudit": "#2563eb",
    "valley": "#059669",
    "steep": "#d97706",
    "minimum": "#7c3aed",
    "slide": "#6b7280",
    "bound": "#dc2626",
}


def chart_css() -> str:
    """The report stylesheet's ``svg.chart`` rules (so a standalone SVG renders like the report's charts)."""
    css = (Path(__file__).parent / "report" / "report.css").read_text(encoding="utf-8")
    return "\n".join(line for line in css.splitlines() if line.startswith("svg.chart"))


def _vertical(frame: Frame, x: float, label: str, color: str, row: int) -> None:
    """A dashed vertical guide at pixel ``x`` with a label staggered by ``row``."""
    x0, y0, x1, y1 = frame.plot
    if not (math.isfinite(x) and x0 <= x <= x1):
        return
    frame.body.append(
        f'<line class="guide" x1="{coord(x)}" x2="{coord(x)}" y1="{coord(y0)}" y2="{coord(y1)}" stroke="{color}"/>'
    )
    anchor = "end" if x > (x0 + x1) / 2 else "start"
    dx = -4 if anchor == "end" else 4
    frame.overlay.append(
        f'<text class="guide-label" x="{coord(x + dx)}" y="{coord(y0 + 12 + 13 * row)}" '
        f'text-anchor="{anchor}" style="fill:{color}">{escape(label)}</text>'
    )


def lr_find_svg(result) -> str:
    """The chart of an ``LRFindResult`` (raw and smoothed loss, own-batch rises, suggestions, 2/λ_max)."""
    from .lrfind_result import LABELS, ORDER

    lrs, raw, smooth = result.lrs, result.losses, result.smooth_losses
    finite = np.concatenate([raw[np.isfinite(raw)], smooth[np.isfinite(smooth)]])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    start = max((v for v in (raw[0], smooth[0]) if math.isfinite(v)), default=math.nan) if len(raw) else math.nan
    if math.isfinite(start) and start > lo:
        hi = min(hi, start + 0.3 * (start - lo))  # a diverged tail leaves the top of the plot
    height = PLOT_HEIGHT + TOP + BOTTOM
    left = 64
    xs = Scale("log", float(result.grid[0]), float(result.grid[-1]), left, WIDTH - 18)
    ys = Scale("linear", *padded(lo, hi), height - BOTTOM, TOP)
    frame = Frame("lrfind", xs, ys, height, left, "learning rate (log scale)", "training loss")
    frame.body.append(f'<path d="{polyline(xs(lrs), ys(raw))}" fill="none" stroke="#94a3b8" stroke-width="1"/>')
    frame.body.append(f'<path d="{polyline(xs(lrs), ys(smooth))}" fill="none" stroke="#111827" stroke-width="1.8"/>')
    rises = np.array([v == "increase" for v in result.verdicts])
    if rises.any():
        marks = "".join(f"M{coord(x)},{coord(TOP)}v7" for x in xs(lrs[rises]))
        frame.body.append(
            f'<path d="{marks}" stroke="{COLORS["bound"]}" stroke-width="1.5">'
            "<title>this step raised its own batch's loss</title></path>"
        )
    x0, _, _, y1 = frame.plot
    legend = [
        ("#111827", "smoothed loss"),
        ("#94a3b8", "loss of each batch"),
        (COLORS["bound"], "ticks: the step raised its own batch's loss"),
    ]
    for i, (color, text) in enumerate(legend):
        frame.overlay.append(
            f'<text class="guide-label" x="{coord(x0 + 6)}" y="{coord(y1 - 8 - 13 * (len(legend) - 1 - i))}" '
            f'style="fill:{color}">{escape(text)}</text>'
        )
    row = 0
    bound, name = result.curvature.bound
    if math.isfinite(bound):
        _vertical(frame, float(xs(bound)), f"{name} {bound:.2g}", COLORS["bound"], row)
        row += 1
    for key in ORDER:
        value = result.suggestions.get(key, math.nan)
        if math.isfinite(value):
            _vertical(frame, float(xs(value)), f"{LABELS[key]} {value:.2g}", COLORS[key], row)
            row += 1
    svg = frame.svg("learning-rate range test", 'xmlns="http://www.w3.org/2000/svg"')
    head = svg.index(">") + 1
    return svg[:head] + f"<style>{chart_css()}</style>" + svg[head:]
