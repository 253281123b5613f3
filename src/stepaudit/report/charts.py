"""Small server-side SVG charts: time series, scatter, histogram, heatmap. Inline, no JS library.

Every chart is one ``<svg class="chart">`` with a ``viewBox`` (it scales with the page width),
gridlines, ticked and labelled axes, and a clip path so nothing is drawn outside the plot. Long
series are drawn as min/max envelopes (``downsample.envelope``); dense scatters merge overlapping
dots only. Every string that reaches the SVG goes through ``html.escape``.

Size (over 400 lines): the four chart kinds share one frame (axes, ticks, clip, legend, hover titles).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from html import escape

import numpy as np

from .downsample import envelope, merge_cells
from .scales import Scale, auto_kind, fmt, linthresh, padded, power_label

WIDTH = 760
PLOT_HEIGHT = 230
TOP, BOTTOM, RIGHT = 14, 46, 18
MAX_DOTS = 1500  # up to this many points a point series is drawn dot by dot (with hover titles)


@dataclass
class Series:
    """One line or point set: ``style`` is line, dash or points."""

    name: str
    x: np.ndarray
    y: np.ndarray
    color: str
    style: str = "line"
    width: float = 1.6


@dataclass
class Guide:
    """A reference line at value ``at`` of the value axis, with a label."""

    at: float
    label: str
    color: str = "#6b7280"
    keep_in_view: bool = False  # widen the axis to show it even when the data are far away


@dataclass
class Band:
    """A shaded horizontal band between ``y0`` and ``y1`` (a zone of meaning, e.g. 0 < α < 1)."""

    y0: float
    y1: float
    color: str
    label: str = ""


def coord(value: float) -> str:
    """An SVG coordinate or length, to a tenth of a pixel."""
    return f"{value:.1f}"


def _attr_json(data) -> str:
    """JSON for an HTML attribute: NaN becomes null, then everything is escaped."""
    return escape(json.dumps(data, allow_nan=False, separators=(",", ":")), quote=True)


def _rounded(values: np.ndarray) -> list:
    return [float(f"{v:.4g}") if math.isfinite(v) else None for v in np.asarray(values, dtype=float).tolist()]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index ranges where ``mask`` is True."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def polyline(px: np.ndarray, py: np.ndarray) -> str:
    """SVG path data through the points, lifting the pen over non-finite values."""
    ok = np.isfinite(px) & np.isfinite(py)
    parts = []
    for start, stop in _runs(ok):
        points = [f"{coord(x)},{coord(y)}" for x, y in zip(px[start:stop], py[start:stop])]
        parts.append(f"M{points[0]}h0.01" if len(points) == 1 else f"M{points[0]}L" + " ".join(points[1:]))
    return "".join(parts)


def band_path(px: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> str:
    """Closed SVG path of the area between ``lo`` and ``hi`` (pixel rows), one piece per finite run."""
    ok = np.isfinite(px) & np.isfinite(lo) & np.isfinite(hi)
    parts = []
    for start, stop in _runs(ok):
        xs, top, bottom = px[start:stop], hi[start:stop], lo[start:stop]
        if stop - start == 1:  # a lone bucket: a thin vertical bar
            xs = np.array([xs[0] - 0.5, xs[0] + 0.5])
            top, bottom = np.repeat(top, 2), np.repeat(bottom, 2)
        forward = "L".join(f"{coord(x)},{coord(y)}" for x, y in zip(xs, top))
        backward = "L".join(f"{coord(x)},{coord(y)}" for x, y in zip(xs[::-1], bottom[::-1]))
        parts.append(f"M{forward}L{backward}Z")
    return "".join(parts)


def dots(px: np.ndarray, py: np.ndarray) -> str:
    """Path data drawing a round dot per point (zero-length segments with round caps): 12 bytes a dot."""
    ok = np.isfinite(px) & np.isfinite(py)
    return "".join(f"M{coord(x)},{coord(y)}h0" for x, y in zip(px[ok], py[ok]))


class Frame:
    """The plot area, its scales, gridlines and axes; charts add marks to ``body`` (clipped) and ``overlay``."""

    def __init__(
        self,
        uid: str,
        xs: Scale,
        ys: Scale,
        height: float,
        left: float,
        x_label: str,
        y_label: str,
        plot_bottom: float | None = None,
        width: float = WIDTH,
    ) -> None:
        uid = re.sub(r"[^A-Za-z0-9_-]", "_", uid)  # it becomes an id and a url(#…): never markup
        self.uid, self.xs, self.ys, self.height, self.left, self.width = uid, xs, ys, height, left, width
        self.x_label, self.y_label = x_label, y_label
        self.plot_bottom = height - BOTTOM if plot_bottom is None else plot_bottom
        self.body: list[str] = []
        self.overlay: list[str] = []

    @property
    def plot(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the plot area in pixels."""
        return self.left, TOP, self.width - RIGHT, self.plot_bottom

    def axes(self, y_ticks: bool = True) -> str:
        x0, y0, x1, y1 = self.plot
        out = []
        for value, label in _thin(self.ys.ticks() if y_ticks else [], self.ys, 14.0):
            y = self.ys(value)
            if y0 - 0.5 <= y <= y1 + 0.5:
                out.append(f'<line class="grid" x1="{coord(x0)}" x2="{coord(x1)}" y1="{coord(y)}" y2="{coord(y)}"/>')
                out.append(
                    f'<text class="tick" x="{coord(x0 - 6)}" y="{coord(y + 3.5)}" text-anchor="end">{escape(label)}</text>'
                )
        for value, label in _thin(self.xs.ticks(), self.xs, 48.0):
            x = self.xs(value)
            if x0 - 0.5 <= x <= x1 + 0.5:
                out.append(f'<line class="grid" x1="{coord(x)}" x2="{coord(x)}" y1="{coord(y0)}" y2="{coord(y1)}"/>')
                out.append(
                    f'<text class="tick" x="{coord(x)}" y="{coord(y1 + 15)}" text-anchor="middle">{escape(label)}</text>'
                )
        out.append(
            f'<rect class="frame" x="{coord(x0)}" y="{coord(y0)}" width="{coord(x1 - x0)}" height="{coord(y1 - y0)}"/>'
        )
        out.append(
            f'<text class="label" x="{coord((x0 + x1) / 2)}" y="{coord(y1 + 36)}" text-anchor="middle">{escape(self.x_label)}</text>'
        )
        if self.y_label:
            out.append(
                f'<text class="label" transform="translate(13,{coord((y0 + y1) / 2)}) rotate(-90)" '
                f'text-anchor="middle">{escape(self.y_label)}</text>'
            )
        return "".join(out)

    def svg(self, title: str, attrs: str = "", y_ticks: bool = True) -> str:
        x0, y0, x1, y1 = self.plot
        clip = f"clip-{self.uid}"
        return (
            f'<svg class="chart" viewBox="0 0 {coord(self.width)} {coord(self.height)}" role="img" aria-label="{escape(title)}" {attrs}>'
            f'<defs><clipPath id="{clip}"><rect x="{coord(x0)}" y="{coord(y0 - 1)}" width="{coord(x1 - x0)}" '
            f'height="{coord(y1 - y0 + 2)}"/></clipPath></defs>{self.axes(y_ticks)}'
            f'<g clip-path="url(#{clip})">{"".join(self.body)}</g>{"".join(self.overlay)}</svg>'
        )


def _thin(ticks: list[tuple[float, str]], scale: Scale, gap: float) -> list[tuple[float, str]]:
    """Drop tick labels closer than ``gap`` pixels to one kept already (zero first, then the largest)."""
    kept: list[tuple[float, str]] = []
    for value, label in sorted(ticks, key=lambda t: (t[0] != 0, -abs(t[0]))):
        if all(abs(scale(value) - scale(v)) >= gap for v, _ in kept):
            kept.append((value, label))
    return sorted(kept)


def _finite(*arrays: np.ndarray) -> np.ndarray:
    joined = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays]) if arrays else np.array([])
    return joined[np.isfinite(joined)]


def time_chart(
    uid: str,
    title: str,
    series: list[Series],
    *,
    y_label: str,
    x_label: str = "step",
    y_kind: str = "auto",
    y_domain: tuple[float, float] | None = None,
    guides: tuple[Guide, ...] = (),
    bands: tuple[Band, ...] = (),
    buckets: int | None = None,
    x_domain: tuple[float, float] | None = None,
) -> tuple[str, list[str]]:
    """Series against the step (one bucket per pixel column when long); returns (svg, notes)."""
    series = [s for s in series if len(s.x)]
    left = 64
    plot_width = WIDTH - RIGHT - left
    buckets = buckets or int(plot_width)
    envs = [envelope(s.x, s.y, buckets if s.style != "points" or len(s.x) > MAX_DOTS else len(s.x) + 1) for s in series]
    values = _finite(*[e.lo for e in envs], *[e.hi for e in envs])
    if y_kind == "auto":
        y_kind = auto_kind(values)
    if y_kind == "log":
        values = values[values > 0]
    if y_domain is None:
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        for g in guides:  # keep a guide in view when it is near the data (or asked to)
            near = (lo / 10 <= g.at <= hi * 10) if y_kind == "log" else (lo - (hi - lo) <= g.at <= hi + (hi - lo))
            if math.isfinite(g.at) and (near or g.keep_in_view) and (y_kind != "log" or g.at > 0):
                lo, hi = min(lo, g.at), max(hi, g.at)
        y_domain = padded(lo, hi, y_kind) if y_kind != "log" or values.size else (0.1, 10.0)
    xs_all = _finite(*[s.x for s in series])
    if x_domain is None:
        x_domain = (float(xs_all.min()), float(xs_all.max())) if xs_all.size else (0.0, 1.0)
        if x_domain[1] <= x_domain[0]:
            x_domain = (x_domain[0] - 1, x_domain[1] + 1)
    height = PLOT_HEIGHT + TOP + BOTTOM
    xs = Scale("linear", *x_domain, left, WIDTH - RIGHT)
    ys = Scale(y_kind, *y_domain, height - BOTTOM, TOP)
    frame = Frame(uid, xs, ys, height, left, x_label, y_label)
    x0, y0, x1, y1 = frame.plot
    for b in bands:
        top, bottom = ys(min(max(b.y1, ys.lo), ys.hi)), ys(min(max(b.y0, ys.lo), ys.hi))
        if math.isfinite(top) and math.isfinite(bottom) and bottom > top:
            frame.body.append(
                f'<rect x="{coord(x0)}" y="{coord(top)}" width="{coord(x1 - x0)}" height="{coord(bottom - top)}" '
                f'fill="{b.color}" opacity="0.5"><title>{escape(b.label)}</title></rect>'
            )
    for g in guides:
        y = ys(g.at)
        if math.isfinite(y) and y0 <= y <= y1:
            frame.body.append(
                f'<line class="guide" x1="{coord(x0)}" x2="{coord(x1)}" y1="{coord(y)}" y2="{coord(y)}" stroke="{g.color}"/>'
            )
            frame.overlay.append(
                f'<text class="guide-label" x="{coord(x1 - 4)}" y="{coord(y - 4)}" text-anchor="end" fill="{g.color}">{escape(g.label)}</text>'
            )
    notes, tips, reduced = [], [], 0
    for s, env in zip(series, envs):
        px = xs(env.x)
        dash = ' stroke-dasharray="6 4"' if s.style == "dash" else ""
        if not env.exact:
            frame.body.append(
                f'<path d="{band_path(px, ys(env.lo), ys(env.hi))}" fill="{s.color}" opacity="0.22" stroke="none"/>'
            )
            frame.body.append(
                f'<path d="{polyline(px, ys(env.mid))}" fill="none" stroke="{s.color}" stroke-width="1.2"{dash}/>'
            )
            reduced = max(reduced, len(s.x))
        elif s.style == "points":
            py = ys(np.clip(env.mid, *sorted((ys.lo, ys.hi)))) if y_kind != "log" else ys(env.mid)
            inside = ys.contains(env.mid)
            if len(env.x) > 1 and np.median(np.diff(env.x)) > 1:  # a probe with its own schedule: join its points
                frame.body.append(
                    f'<path d="{polyline(px[inside], py[inside])}" fill="none" stroke="{s.color}" '
                    'stroke-width="1" opacity="0.45"/>'
                )
            frame.body.append(
                f'<path d="{dots(px[inside], py[inside])}" stroke="{s.color}" stroke-width="4.5" stroke-linecap="round" fill="none"/>'
            )
            outside = np.isfinite(env.mid) & ~inside
            if outside.any():
                marks = "".join(
                    f"M{coord(x)},{coord(y - 5 if y < (y0 + y1) / 2 else y)}v5"
                    for x, y in zip(px[outside], py[outside])
                )
                frame.body.append(f'<path d="{marks}" stroke="{s.color}" stroke-width="2.5" fill="none"/>')
                count = int(outside.sum())
                notes.append(
                    f"{s.name}: {count} value{'s' if count > 1 else ''} beyond the axis, drawn as ticks at its edge"
                )
        else:
            frame.body.append(
                f'<path d="{polyline(px, ys(env.mid))}" fill="none" stroke="{s.color}" stroke-width="{s.width}"{dash}/>'
            )
        tips.append(
            {
                "n": s.name,
                "c": s.color,
                "x": _rounded(env.x),
                "y": _rounded(env.mid),
                "lo": None if env.exact else _rounded(env.lo),
                "hi": None if env.exact else _rounded(env.hi),
            }
        )
    if reduced:
        notes.insert(
            0,
            f"{reduced:,} steps drawn as one bucket per pixel column: the shaded band spans each bucket's "
            "minimum to maximum (spikes stay visible), the line is its mean",
        )
    frame.overlay.append(f'<line class="cursor" x1="0" x2="0" y1="{coord(y0)}" y2="{coord(y1)}"/>')
    attrs = (
        f'data-x="{coord(x_domain[0])},{coord(x_domain[1])},{coord(x0)},{coord(x1)}" '
        f'data-xname="{escape(x_label)}" data-tip="{_attr_json(tips)}"'
    )
    return frame.svg(title, attrs), notes


def nonfinite_marks(uid_svg: str, steps: np.ndarray, x_domain: tuple[float, float]) -> str:
    """Red ticks along the top of a time chart at the given steps (inserted before ``</svg>``)."""
    if not len(steps):
        return uid_svg
    left, x1 = 64, WIDTH - RIGHT
    xs = Scale("linear", *x_domain, left, x1)
    path = "".join(f"M{coord(x)},{TOP}v7" for x in np.unique(np.round(xs(np.asarray(steps, float)), 1)))
    mark = f'<path d="{path}" stroke="#dc2626" stroke-width="1.5"><title>non-finite loss</title></path>'
    return uid_svg[: -len("</svg>")] + mark + "</svg>"


def scatter(
    uid: str,
    title: str,
    groups: list[Series],
    *,
    x_label: str,
    y_label: str,
    diagonal: bool = True,
    steps: list[np.ndarray] | None = None,
) -> tuple[str, list[str]]:
    """Point groups on shared symlog axes (so y = x is the diagonal); dense clouds merge overlapping dots."""
    values = _finite(*[g.x for g in groups], *[g.y for g in groups])
    lo, hi = (float(values.min()), float(values.max())) if values.size else (-1.0, 1.0)
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero always shows: above it the loss went up
    kind, c = scatter_kind(values)
    if kind == "symlog":
        span = Scale("symlog", lo, hi, 0, 1, c)
        t_lo, t_hi = span.transform(lo), span.transform(hi)
        margin = (t_hi - t_lo) * 0.04 or 1.0
        lo, hi = _symlog_inverse(t_lo - margin, c), _symlog_inverse(t_hi + margin, c)
    else:
        lo, hi = padded(lo, hi)
    left = 70
    height = PLOT_HEIGHT + 90 + TOP + BOTTOM
    xs = Scale(kind, lo, hi, left, WIDTH - RIGHT, c)
    ys = Scale(kind, lo, hi, height - BOTTOM, TOP, c)
    frame = Frame(uid, xs, ys, height, left, x_label, y_label)
    x0, y0, x1, y1 = frame.plot
    frame.body.append(
        f'<line class="zero" x1="{coord(x0)}" x2="{coord(x1)}" y1="{coord(ys(0.0))}" y2="{coord(ys(0.0))}"/>'
    )
    frame.body.append(
        f'<line class="zero" x1="{coord(xs(0.0))}" x2="{coord(xs(0.0))}" y1="{coord(y0)}" y2="{coord(y1)}"/>'
    )
    if diagonal:
        frame.body.append(
            f'<line class="diagonal" x1="{coord(xs(lo))}" y1="{coord(ys(lo))}" x2="{coord(xs(hi))}" y2="{coord(ys(hi))}"/>'
        )
    total = sum(len(g.x) for g in groups)
    notes = []
    for i, g in enumerate(groups):
        px, py = xs(np.asarray(g.x, float)), ys(np.asarray(g.y, float))
        ok = np.isfinite(px) & np.isfinite(py)
        if total <= MAX_DOTS:
            step_ids = steps[i] if steps is not None else np.arange(len(g.x))
            frame.body.append(
                "".join(
                    f'<circle cx="{coord(a)}" cy="{coord(b)}" r="2.6" fill="{g.color}" fill-opacity="0.75">'
                    f"<title>step {int(s)}: g·Δw = {escape(fmt(float(u)))}, Δloss = {escape(fmt(float(v)))}</title></circle>"
                    for a, b, s, u, v in zip(
                        px[ok], py[ok], np.asarray(step_ids)[ok], np.asarray(g.x)[ok], np.asarray(g.y)[ok]
                    )
                )
            )
        else:
            keep, _ = merge_cells(px[ok], py[ok], 2.5)
            frame.body.append(
                f'<path d="{dots(px[ok][keep], py[ok][keep])}" stroke="{g.color}" stroke-opacity="0.7" '
                'stroke-width="3.6" stroke-linecap="round" fill="none"/>'
            )
            if len(keep) < ok.sum():
                notes.append(f"{g.name}: {int(ok.sum()):,} points; overlapping dots merged into {len(keep):,}")
    return frame.svg(title), notes


def scatter_kind(values: np.ndarray) -> tuple[str, float]:
    """symlog (and its linear half-width) when the magnitudes span more than two decades, else linear."""
    magnitudes = np.abs(values[np.isfinite(values) & (values != 0)])
    if magnitudes.size and np.percentile(magnitudes, 99) > 100 * np.percentile(magnitudes, 1):
        return "symlog", linthresh(values)
    return "linear", 1.0


def _symlog_inverse(t: float, c: float) -> float:
    return math.copysign(c * (10.0 ** abs(t) - 1.0), t)


def histogram(
    uid: str,
    title: str,
    values: np.ndarray,
    edges: np.ndarray,
    *,
    color: str,
    x_label: str,
    guides: tuple[Guide, ...] = (),
    y_label: str = "steps",
) -> str:
    """Bars of counts of ``values`` in ``edges`` (values beyond the last edge counted in the last bar)."""
    finite = values[np.isfinite(values)]
    clipped = np.clip(finite, edges[0], edges[-1])
    counts, _ = np.histogram(clipped, bins=edges)
    left = 64
    height = PLOT_HEIGHT + TOP + BOTTOM
    xs = Scale("linear", float(edges[0]), float(edges[-1]), left, WIDTH - RIGHT)
    ys = Scale("linear", 0.0, float(max(counts.max(initial=0), 1)) * 1.08, height - BOTTOM, TOP)
    frame = Frame(uid, xs, ys, height, left, x_label, y_label)
    _, y0, _, y1 = frame.plot
    for a, b, n in zip(edges[:-1], edges[1:], counts):
        if n:
            top = ys(float(n))
            frame.body.append(
                f'<rect x="{coord(xs(a) + 0.5)}" y="{coord(top)}" width="{coord(max(xs(b) - xs(a) - 1, 0.5))}" '
                f'height="{coord(y1 - top)}" fill="{color}"><title>{escape(fmt(float(a)))} to '
                f"{escape(fmt(float(b)))}: {int(n)} steps</title></rect>"
            )
    for g in guides:
        x = xs(g.at)
        frame.body.append(
            f'<line class="guide" x1="{coord(x)}" x2="{coord(x)}" y1="{coord(y0)}" y2="{coord(y1)}" stroke="{g.color}"/>'
        )
        frame.overlay.append(
            f'<text class="guide-label" x="{coord(x + 4)}" y="{coord(y0 + 12)}" fill="{g.color}">{escape(g.label)}</text>'
        )
    return frame.svg(title)


# Diverging colour scale around the guide value: blue = smaller, red = larger (ColorBrewer RdBu-like).
_STOPS = [
    (-1.0, (33, 102, 172)),
    (-0.5, (146, 197, 222)),
    (0.0, (247, 247, 247)),
    (0.5, (244, 165, 130)),
    (1.0, (178, 24, 43)),
]


def diverging(u: float) -> str:
    """Colour of ``u`` in [-1, 1] (clipped) on the blue–white–red scale."""
    if not math.isfinite(u):
        return "#e5e7eb"
    u = min(max(u, -1.0), 1.0)
    for (a, ca), (b, cb) in zip(_STOPS, _STOPS[1:]):
        if u <= b:
            t = (u - a) / (b - a)
            return "#" + "".join(f"{round(p + (q - p) * t):02x}" for p, q in zip(ca, cb))
    return "#b2182b"


def heatmap(
    uid: str,
    title: str,
    rows: list[str],
    x_edges: np.ndarray,
    values: np.ndarray,
    *,
    center: float,
    half_range: float,
    x_label: str,
    value_label,
    colorbar_label: str,
    guide_label: str,
    width: float = 960.0,
) -> str:
    """Rows × time cells coloured by ``values`` (log10) on a diverging scale around ``center``, with a colour bar."""
    longest = max((len(r) for r in rows), default=4)
    left = min(24 + 6.2 * min(longest, 36), 250)
    row_height = min(28.0, max(14.0, 240.0 / max(len(rows), 1)))
    plot_bottom = TOP + row_height * len(rows)
    height = plot_bottom + BOTTOM + 44
    xs = Scale("linear", float(x_edges[0]), float(x_edges[-1]), left, width - RIGHT)
    ys = Scale("linear", 0.0, float(len(rows)), TOP, plot_bottom)
    frame = Frame(uid, xs, ys, height, left, x_label, "", plot_bottom=plot_bottom, width=width)
    cells = []
    for r, name in enumerate(rows):
        y = TOP + r * row_height
        for a, b, v in zip(x_edges[:-1], x_edges[1:], values[r]):
            if math.isfinite(v):
                cells.append(
                    f'<rect x="{coord(xs(a))}" y="{coord(y)}" width="{coord(xs(b) - xs(a) + 0.4)}" height="{coord(row_height - 1)}" '
                    f'fill="{diverging((v - center) / half_range)}"><title>{escape(name)}, steps {int(a):,}–{int(b):,}: '
                    f"{escape(value_label(v))}</title></rect>"
                )
        label = name if len(name) <= 36 else name[:16] + "…" + name[-19:]
        frame.overlay.append(
            f'<text class="tick" x="{coord(left - 6)}" y="{coord(y + row_height * 0.72)}" text-anchor="end">'
            f"<title>{escape(name)}</title>{escape(label)}</text>"
        )
    frame.body.append("".join(cells))
    frame.overlay.append(_colorbar(width, plot_bottom + 52, center, half_range, colorbar_label, guide_label))
    return frame.svg(title, y_ticks=False)


def _colorbar(chart_width: float, y: float, center: float, half_range: float, label: str, guide_label: str) -> str:
    """A horizontal colour bar from 10^(center−half_range) to 10^(center+half_range), the centre marked."""
    width, steps = 260.0, 52
    x0 = chart_width - RIGHT - width
    parts = [f'<text class="tick" x="{coord(x0 - 8)}" y="{coord(y + 9)}" text-anchor="end">{escape(label)}</text>']
    for i in range(steps):
        u = -1 + 2 * (i + 0.5) / steps
        parts.append(
            f'<rect x="{coord(x0 + i * width / steps)}" y="{coord(y)}" width="{coord(width / steps + 0.4)}" height="10" fill="{diverging(u)}"/>'
        )
    for k in range(int(math.ceil(center - half_range)), int(math.floor(center + half_range)) + 1):
        x = x0 + (k - center + half_range) / (2 * half_range) * width
        parts.append(
            f'<text class="tick" x="{coord(x)}" y="{coord(y + 22)}" text-anchor="middle">{escape(power_label(k))}</text>'
        )
    xc = x0 + width / 2
    parts.append(
        f'<line x1="{coord(xc)}" x2="{coord(xc)}" y1="{coord(y - 3)}" y2="{coord(y + 13)}" stroke="#111827" stroke-width="1.5"/>'
    )
    parts.append(
        f'<text class="guide-label" x="{coord(xc)}" y="{coord(y - 5)}" text-anchor="middle">{escape(guide_label)}</text>'
    )
    return "".join(parts)
