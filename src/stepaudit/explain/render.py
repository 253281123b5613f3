"""The terminal report: circuit drawing, gate rules, the step, the Hessian, the lr set, the verdict."""

from __future__ import annotations

import sys
import textwrap
from typing import IO

from ..cli import rich_console
from .circuit import RULES
from .drawing import GATE, GRAD, VALUE, VAR, Line, draw
from .layout import symbol
from .result import fmt, negligible, objective_name

TITLE, HEAD, DIM, WARN, NOTE = "bold", "bold magenta", "grey50", "bold yellow", "italic"
WIDTH = 96
_SPARK = "▁▂▃▄▅▆▇█"
_ASCII = str.maketrans(
    {
        "─": "-",
        "│": "|",
        "┼": "+",
        "┬": "+",
        "┴": "+",
        "┐": "+",
        "┘": "+",
        "┤": "+",
        "┌": "+",
        "└": "+",
        "├": "+",
        "∂": "d",
        "×": "*",
        "−": "-",
        "÷": "/",
        "·": "*",
        "½": "1/2",
        "²": "^2",
        "‖": "|",
        "ᵀ": "T",
        "Δ": "D",
        "→": "->",
        "←": "<-",
        "≤": "<=",
        "∈": "in",
        "∞": "inf",
        "ᵇ": "^b",
        "⁻": "^-",
        "¹": "1",
        "…": "...",
        "↑": "^",
        "▁": "_",
        "▂": ".",
        "▃": "-",
        "▄": "~",
        "▅": "=",
        "▆": "+",
        "▇": "*",
        "█": "#",
    }
)


def _table(header: list[str], rows: list[list[tuple[str, str]]], indent: int = 3, align: str = "") -> list[Line]:
    """Aligned columns ('l'/'r' per column; default: first left, the rest right), header dim."""
    widths = [max([len(header[i])] + [len(r[i][0]) for r in rows]) for i in range(len(header))]
    align = align or "l" + "r" * (len(header) - 1)
    just = [str.ljust if a == "l" else str.rjust for a in align]
    out: list[Line] = [[(" " * indent + "  ".join(j(h, w) for j, h, w in zip(just, header, widths)), DIM)]]
    for r in rows:
        line: Line = [(" " * indent, "")]
        for i, (text, style) in enumerate(r):
            line += [(just[i](text, widths[i]), style), ("  ", "")]
        out.append(line[:-1])
    return out


def _pack(items: list[str], sep: str, width: int) -> list[str]:
    """Join ``items`` with ``sep`` into lines of at most ``width`` characters, never splitting one."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + len(sep) + len(item) <= width:
            lines[-1] += sep + item
        else:
            lines[-1:] = [lines[-1] + sep.rstrip()] if lines else []
            lines.append(item)
    return lines


def _section(n: int, title: str, sub: str = "") -> list[Line]:
    return [[], [(f" {n}  {title}", HEAD), (f"   {sub}" if sub else "", DIM)]]


def _wrap(text: str, indent: int = 3, style: str = "") -> list[Line]:
    return [[(" " * indent + ln, style)] for ln in textwrap.wrap(text, WIDTH - indent)]


def render(r: dict) -> list[Line]:
    """All sections of the terminal report as styled lines."""
    f = objective_name(r)
    at = ", ".join(f"{k} = {fmt(v)}" for k, v in r["at"].items())
    obj = "" if r["target"] is None else f"   minimise L = ½(f − {fmt(r['target'])})²"
    out: list[Line] = [
        [(" stepaudit explain  ", TITLE), (f"f = {r['expr']}", VAR), (f"   at {at}   lr = {fmt(r['lr'])}{obj}", "")]
    ]
    out += _section(1, "The circuit", f"forward values above each wire, gradients ∂{f}/∂(wire) below")
    out += [[("", "")]] + [[("   ", "")] + ln for ln in draw(r)]
    out += _gates(r, f)
    out += _step(r, f)
    out += _hessian(r, f)
    out += _lrset(r, f)
    out += _section(6, "Verdict") + _wrap(r["verdict"])
    return out


def _gates(r: dict, f: str) -> list[Line]:
    out = _section(2, "The gates, right to left", "each gate's local rule turns its gradient into its inputs'")
    nodes = r["nodes"]
    for n in reversed(nodes):
        if n["op"] in ("var", "const") or n["grad"] is None:
            continue
        out.append(
            [
                (f"   {symbol(n):>7}  ", GATE),
                (n["text"], ""),
                (f" = {fmt(n['value'])}", VALUE),
                ("   grad ", DIM),
                (fmt(n["grad"]), GRAD),
            ]
        )
        out.append([(" " * 12 + f"{RULES[n['op']][0]}: {RULES[n['op']][1]}", NOTE)])
        parts: Line = [(" " * 12, "")]
        for k, loc, ig in zip(n["inputs"], n["local"], n["input_grads"]):
            if loc is None:
                continue
            parts += [
                (f"{nodes[k]['text']} ← ", ""),
                (fmt(n["grad"]), GRAD),
                (" × ", DIM),
                (fmt(loc), ""),
                (" = ", DIM),
                (fmt(ig), GRAD),
                ("    ", ""),
            ]
        out.append(parts)
    shared = [n for n in nodes if n["op"] == "var" and n["uses"] > 1]
    line: Line = [("   variables  ", DIM)]
    for n in nodes[: len(r["variables"])]:
        line += [(f"∂{f}/∂{n['label']} = ", ""), (fmt(n["grad"]), GRAD), ("   ", "")]
    out.append(line)
    for v in shared:
        shares = [
            g["input_grads"][k]
            for g in nodes
            if g["op"] not in ("var", "const")
            for k, i in enumerate(g["inputs"])
            if i == v["id"] and g["input_grads"][k] is not None
        ]
        out.append(
            [
                (f"   {v['label']} feeds {v['uses']} wires; where wires fan out, gradients add:  ", DIM),
                (f"∂{f}/∂{v['label']} = " + " + ".join(map(fmt, shares)) + f" = {fmt(v['grad'])}", ""),
            ]
        )
    return out


def _step(r: dict, f: str) -> list[Line]:
    s, q = r["step"], r["sequential"]
    out = _section(3, f"One step, lr = {fmt(r['lr'])}", "all at once (the gradient step) versus one weight at a time")
    rows = [
        [
            (n, VAR),
            (fmt(r["at"][n]), ""),
            (fmt(r["grads"][n]), GRAD),
            (fmt(s["new"][n]), ""),
            (fmt(q["new"][n]), ""),
            (fmt(s["grads_after"][n]), GRAD),
        ]
        for n in r["variables"]
    ]
    rows.append(
        [
            (f, VAR),
            (fmt(s["objective_before"]), VALUE),
            ("", ""),
            (fmt(s["objective_after"]), VALUE),
            (fmt(q["objective_after"]), VALUE),
            ("", ""),
        ]
    )
    out += _table(["", "now", f"∂{f}/∂·", "all at once", "one at a time", f"∂{f}/∂· after"], rows)
    out.append([])
    a = s["actual"]
    if a is None:
        out += _wrap(f"the step leaves the domain: {f} is undefined at the new point", style=WARN)
    else:
        ho = "0" if negligible(s["higher_order"], a, s["predicted"]) else fmt(s["higher_order"])
        rows = [
            [(f"change in {f}, all at once", ""), ("", ""), (fmt(a), VALUE), ("", "")],
            [("  first order", ""), ("−lr·‖g‖²", DIM), (fmt(s["predicted"]), ""), ("", "")],
            [
                ("  second order", ""),
                ("½ΔᵀHΔ", DIM),
                (fmt(s["quadratic"]), ""),
                (f"of which interplay between weights {fmt(s['interplay'])}", DIM),
            ],
            [("  higher order", ""), ("", ""), (ho, ""), ("", "")],
        ]
        out += _table(["", "", "", ""], rows, align="llrl")[1:]
    out.append([])
    rows = []
    for i, u in enumerate(q["updates"]):
        was = "" if u["grad_used"] == u["grad_at_start"] else f"(was {fmt(u['grad_at_start'])} at the start)"
        rows.append(
            [
                (f"{i + 1}. update {u['name']}", VAR),
                (fmt(u["grad_used"]), GRAD),
                (was, WARN if u["sign_flipped"] else DIM),
                (fmt(u["new"]), ""),
                (fmt(u["objective"]), VALUE),
            ]
        )
    out += _table(["one at a time", f"∂{f}/∂· now", "", "new value", f"{f} after"], rows, align="lrlrr")
    flips = s["sign_flips"]
    text = ", ".join(f"∂{f}/∂{x['name']}: {fmt(x['before'])} → {fmt(x['after'])}" for x in flips)
    out.append([("   sign flips after the step  ", DIM), (text or "none", WARN if flips else "")])
    return out


def _hessian(r: dict, f: str) -> list[Line]:
    h = r["hessian"]
    names = h["names"]
    out = _section(4, f"Hessian of {f}", "second derivatives; off-diagonal terms are the interplay")
    rows = [
        [(a, VAR)] + [(fmt(v), WARN if i != j and v != 0 else "") for j, v in enumerate(row)]
        for i, (a, row) in enumerate(zip(names, h["matrix"]))
    ]
    out += _table([""] + names, rows)
    pairs = [f"H[{o['pair'][0]},{o['pair'][1]}] = {fmt(o['value'])}" for o in h["off_diagonal"]]
    for i, text in enumerate(_pack(pairs, ", ", WIDTH - 17) or ["none: the weights do not interact"]):
        out.append([("   off-diagonal  " if i == 0 else " " * 17, DIM), (text, "")])
    out.append([("   gᵀHg = ", DIM), (fmt(h["gHg"]), ""), ("    ½ΔᵀHΔ = ", DIM), (fmt(h["quadratic_term"]), "")])
    return out


def _lrset(r: dict, f: str) -> list[Line]:
    d = r["decreasing_lr"]
    out = _section(5, f"Which learning rates lower {f}?", "the step w − lr·g, for every lr > 0")
    if d["method"] == "polynomial":
        how = (
            f"exact: {f}(w − lr·g) is a polynomial of degree {d['degree']} in lr; "
            "the set comes from its real roots, each sign-checked in rational arithmetic"
        )
    elif d["method"] == "numerical":
        how = (
            f"numerical: {f}(w − lr·g) is not a polynomial; lr scanned from {fmt(d['scan']['from'])} "
            f"to {fmt(d['scan']['to'])} on a dense log+linear grid, sign changes refined by bisection"
        )
    else:
        how = d.get("note", "")
    out += _wrap(how, style=DIM)
    ivs = d["intervals"]
    top = "∞" if d["method"] != "numerical" else f"beyond {fmt(d['scan']['to'])}"
    pieces = [f"({fmt(lo)}, {top if hi is None else fmt(hi)})" for lo, hi in ivs[:6]] or ["none"]
    more = d.get("count", len(ivs)) - 6
    for i, text in enumerate(_pack(pieces, " ∪ ", WIDTH - 23)):
        out.append([("   decreasing for lr ∈ " if i == 0 else " " * 23, DIM), (text, VALUE)])
    if more > 0:
        out[-1].append((f" ∪ … ({more} more)", WARN))
    mx = r["max_decreasing_lr"]
    big = (
        (
            f"none: every lr > 0 lowers {f}"
            if d["method"] != "numerical"
            else f"none found: {f} still goes down at lr = {fmt(d['scan']['to'])}"
        )
        if d.get("unbounded")
        else ("none" if mx is None else fmt(mx))
    )
    out.append([("   largest decreasing lr  ", DIM), (big, WARN)])
    qb = r["quadratic_bound_lr"]
    qtext = fmt(qb) if qb is not None else f"none (gᵀHg = {fmt(r['hessian']['gHg'])} ≤ 0)"
    out.append([("   quadratic-model bound 2‖g‖²/(gᵀHg)  ", DIM), (qtext, "")])
    return out + _profile(r, f)


def _profile(r: dict, f: str) -> list[Line]:
    """A sparkline of the objective along -g: green where the step would lower it, red where not."""
    lrs, vals = r["profile"]["lr"], r["profile"]["objective"]
    f0 = r["step"]["objective_before"]
    finite = [v for v in vals if v is not None]
    if f0 is None or len(finite) < 2:
        return []
    lo, hi = min(finite), max(finite)
    label = f"   {f}(w − lr·g)  "
    line: Line = [(label, DIM)]
    for i, v in enumerate(vals):
        k = 0 if v is None or hi == lo else round((v - lo) / (hi - lo) * 7)
        style = DIM if i == 0 else VALUE if v is not None and v < f0 else GRAD
        line.append((" " if v is None else _SPARK[k], style))
    line.append(("   green: lower than at lr = 0, red: not", DIM))
    width, top = len(vals), lrs[-1]
    axis = [" "] * (width + 12)
    mark = f"↑ lr = {fmt(r['lr'])}"
    at = round(r["lr"] / top * (width - 1)) if top > 0 else 0
    axis[at : at + len(mark)] = list(mark)
    end = fmt(top)
    if at + len(mark) < width - len(end):
        axis[width - len(end) : width] = list(end)
    if at >= 2:
        axis[0] = "0"
    return [[], line, [(" " * len(label) + "".join(axis).rstrip(), DIM)]]


def print_lines(lines: list[Line], file: IO[str] | None = None, color: bool | None = None) -> None:
    """Print styled lines with rich when it is installed (colour only on a terminal), else plain."""
    file = file or sys.stdout
    enc = getattr(file, "encoding", None) or "utf-8"
    try:
        "─∂×½ΔᵀHΔ‖∈∞".encode(enc)
        plain_ascii = False
    except (UnicodeEncodeError, LookupError):
        plain_ascii = True
    if plain_ascii:
        lines = [[(t.translate(_ASCII), s) for t, s in ln] for ln in lines]
    try:
        from rich.console import Console  # noqa: F401 - ImportError selects the plain text
        from rich.text import Text
    except ImportError:
        for ln in lines:
            file.write("".join(t for t, _ in ln).rstrip() + "\n")
        return
    console = rich_console(
        file=file,
        highlight=False,
        soft_wrap=True,
        force_terminal=color,
        no_color=color is False,
        emoji=False,
        markup=False,
    )
    for ln in lines:
        text = Text.assemble(*[(t, s or "") for t, s in ln])
        text.rstrip()
        console.print(text)
