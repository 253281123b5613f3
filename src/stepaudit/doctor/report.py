"""Terminal report of a doctor run: the root cause with its evidence and fix, then the other findings.

Rendered with ``rich`` when it is installed (colours only on a terminal), plain text otherwise.
"""
from __future__ import annotations

import io
import textwrap

from .facts import Facts

_MARK = {"error": "✗", "warning": "!", "info": "·"}
_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _headline(result: dict, facts: Facts | None) -> str:
    line = f"stepaudit doctor: {result['script']} — {result['steps']} optimizer steps, stopped: {result['stopped']}"
    if facts is not None and facts.loss_start is not None and facts.loss_end is not None:
        line += f"; loss {facts.loss_start:.4g} → {facts.loss_end:.4g}"
    return line


def render_plain(result: dict, error: str | None = None, run: str | None = None, facts: Facts | None = None,
                 width: int = 100) -> str:
    """The report as plain text."""
    wrap = lambda text, indent: textwrap.fill(text, width, initial_indent=indent, subsequent_indent=" " * len(indent))  # noqa: E731
    lines = [_headline(result, facts)]
    if error:
        lines += ["", "The script raised (diagnosing what ran before it):", textwrap.indent(error, "  ")]
    diagnoses = result["diagnoses"]
    if diagnoses:
        top = diagnoses[0]
        title = "Healthy" if top["code"] == "healthy" else "Most likely root cause"
        lines += ["", f"{title}: {top['code']}  ({top['severity']}, confidence {top['confidence']:.2f}"
                  + (f", from step {top['first_step']})" if top["first_step"] is not None else ")")]
        lines += [wrap(top["evidence"], "  evidence: "), wrap(top["fix"], "  fix:      ")]
    if len(diagnoses) > 1:
        lines += ["", "Also found:"]
        for d in diagnoses[1:]:
            start = f", step {d['first_step']}" if d["first_step"] is not None else ""
            lines.append(f"  {_MARK[d['severity']]} {d['code']} ({d['severity']}, {d['confidence']:.2f}{start})")
            lines += [wrap(d["evidence"], "      "), wrap("fix: " + d["fix"], "      ")]
    if run:
        lines += ["", f"run store: {run}"]
    return "\n".join(lines)


def render(result: dict, error: str | None = None, run: str | None = None, facts: Facts | None = None) -> str:
    """The report, with rich formatting when available (colours only on a terminal), else plain text."""
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.panel import Panel
    except ImportError:
        return render_plain(result, error, run, facts)
    import sys

    buffer = io.StringIO()
    tty = sys.stdout.isatty()
    console = Console(file=buffer, force_terminal=tty, width=min(110, Console().width) if tty else 100,
                      highlight=False, soft_wrap=False)
    console.print(_headline(result, facts), style="bold", markup=False)
    if error:
        console.print("The script raised (diagnosing what ran before it):", style="red")
        console.print(textwrap.indent(error, "  "), markup=False)
    diagnoses = result["diagnoses"]
    if diagnoses:
        top = diagnoses[0]
        title = "healthy" if top["code"] == "healthy" else f"most likely root cause: [b]{top['code']}[/b]"
        start = f", from step {top['first_step']}" if top["first_step"] is not None else ""
        body = f"[b]evidence[/b]  {escape(top['evidence'])}\n[b]fix[/b]       {escape(top['fix'])}"
        console.print(Panel(body, title=f"{title} ({top['severity']}, confidence {top['confidence']:.2f}{start})",
                            title_align="left", border_style=_STYLE[top["severity"]]))
    if len(diagnoses) > 1:
        console.print("also found:", style="bold")
        for d in diagnoses[1:]:
            start = f", step {d['first_step']}" if d["first_step"] is not None else ""
            console.print(f"  [{_STYLE[d['severity']]}]{_MARK[d['severity']]} {d['code']}[/] "
                          f"({d['severity']}, {d['confidence']:.2f}{start})")
            console.print(textwrap.indent(textwrap.fill(d["evidence"], 94), "      "), markup=False)
            console.print(textwrap.indent(textwrap.fill("fix: " + d["fix"], 94), "      "), style="dim", markup=False)
    if run:
        console.print(f"run store: {run}", style="dim", markup=False)
    return buffer.getvalue().rstrip("\n")
