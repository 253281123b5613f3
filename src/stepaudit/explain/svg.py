"""The circuit as a self-contained SVG: values in green above each wire, gradients in red below."""

from __future__ import annotations

from html import escape

from .circuit import RULES
from .layout import GATE_SYMBOL, Slot, unfold
from .result import fmt

ROW = 36  # px per half-slot (leaves are two half-slots apart)
CHAR = 7.4  # px per character at the 12 px monospace font
GREEN, RED, WIRE, INK, MUTED = "#1a7f37", "#cf222e", "#57606a", "#1f2328", "#8c959f"
FONT = "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace"


def _t(
    x: float, y: float, text: str, fill: str = INK, size: int = 12, anchor: str = "start", weight: str = "normal"
) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" fill="{fill}" font-size="{size}" text-anchor="{anchor}" '
        f'font-weight="{weight}">{escape(text)}</text>'
    )


def _spans(x: float, y: float, pieces: list[tuple[str, str]], size: int = 11) -> str:
    inner = "".join(f'<tspan fill="{c}">{escape(t)}</tspan>' for t, c in pieces)
    return f'<text x="{x}" y="{y:.1f}" font-size="{size}" xml:space="preserve">{inner}</text>'


def _box(s: Slot) -> tuple[str, float]:
    """The node's label and half-width (gates are circles, variables and constants are boxes)."""
    op = s.node["op"]
    label = s.node["label"] if op in ("var", "const") else GATE_SYMBOL.get(op, op)
    return label, max(14.0, len(label) * CHAR / 2 + 8)


def circuit_svg(result: dict) -> str:
    """Render the explain() object's circuit as an SVG document (a string, all text escaped)."""
    root = unfold(result["nodes"])
    slots = root.walk()
    labw = max(max(len(fmt(s.node["value"])), len(fmt(s.wire_grad)) if s.wire_grad is not None else 0) for s in slots)
    boxw = max(_box(s)[1] for s in slots)
    step = max(130.0, labw * CHAR + 2 * boxw + 44)
    left, top = 24 + boxw, 84

    def pos(s: Slot) -> tuple[float, float]:
        return left + s.level * step, top + s.row * ROW

    parts: list[str] = []
    for s in slots:
        x, y = pos(s)
        label, half = _box(s)
        for k in s.kids:
            kx, ky = pos(k)
            khalf = _box(k)[1]
            jx = x - half - 16
            parts.append(
                f'<polyline points="{kx + khalf:.1f},{ky:.1f} {jx:.1f},{ky:.1f} {jx:.1f},{y:.1f} '
                f'{x - half:.1f},{y:.1f}" fill="none" stroke="{WIRE}" stroke-width="1.5"/>'
            )
            parts.append(_labels(k, kx + khalf + 8, ky))
        parts.append(_node(s, x, y, label, half))
    x, y = pos(root)
    half = _box(root)[1]
    end = x + half + labw * CHAR + 40
    out_name = "f" if result["target"] is None else "L"
    parts.append(
        f'<line x1="{x + half:.1f}" y1="{y:.1f}" x2="{end:.1f}" y2="{y:.1f}" stroke="{WIRE}" '
        f'stroke-width="1.5" marker-end="url(#arrow)"/>'
    )
    parts.append(_labels(root, x + half + 8, y))
    parts.append(_t(end + 8, y + 4, out_name, weight="bold", size=14))
    at = ", ".join(f"{k} = {fmt(v)}" for k, v in result["at"].items())
    expr = result["expr"] if len(result["expr"]) <= 90 else result["expr"][:87] + "..."
    title = f"f = {expr}  ·  at {at}"
    if result["target"] is not None:
        title += f"  ·  minimising L = ½(f − {fmt(result['target'])})²"
    sums = " · ".join(f"∂{out_name}/∂{n} = {fmt(g)}" for n, g in result["grads"].items())
    width = max(end + 40, 32 + 8.2 * len(title), 32 + 6.8 * (len(sums) + 30))
    height = top + max(s.row for s in slots) * ROW + 76
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{FONT}">'
        f"<title>{escape('stepaudit explain: ' + title)}</title>"
        f'<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        f'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{WIRE}"/></marker></defs>'
        f'<rect width="100%" height="100%" fill="#ffffff"/>'
    )
    legend = [
        _t(16, 26, title, weight="bold", size=13),
        _spans(
            16,
            46,
            [
                ("forward value", GREEN),
                (" above each wire, ", MUTED),
                (f"gradient ∂{out_name}/∂(wire)", RED),
                (" below", MUTED),
            ],
        ),
        _spans(16, height - 16, [(sums, MUTED), ("   (a variable's wires add up)", MUTED)]),
    ]
    return head + "".join(legend + parts) + "</svg>\n"


def _labels(s: Slot, x: float, y: float) -> str:
    out = _t(x, y - 6, fmt(s.node["value"]), GREEN)
    if s.wire_grad is not None:
        out += _t(x, y + 16, fmt(s.wire_grad), RED)
    return out


def _node(s: Slot, x: float, y: float, label: str, half: float) -> str:
    op = s.node["op"]
    if op in ("var", "const"):
        fill = "#f6f8fa" if op == "var" else "#fff8c5"
        return (
            f'<rect x="{x - half:.1f}" y="{y - 13:.1f}" width="{2 * half:.1f}" height="26" rx="6" '
            f'fill="{fill}" stroke="{WIRE}"/>' + _t(x, y + 4, label, anchor="middle", weight="bold")
        )
    shape = (
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{half:.1f}" fill="#ddf4ff" stroke="#0969da" stroke-width="1.5"/>'
        if half <= 16
        else f'<rect x="{x - half:.1f}" y="{y - 14:.1f}" width="{2 * half:.1f}" height="28" rx="14" '
        f'fill="#ddf4ff" stroke="#0969da" stroke-width="1.5"/>'
    )
    rule = RULES.get(op, ("", ""))[0]
    return (
        shape
        + _t(x, y + 4, label, "#0969da", 13, "middle", "bold")
        + _t(x, y + half + 14 if half <= 16 else y + 28, rule, MUTED, 10, "middle")
    )
