"""Terminal report of a doctor run: the root cause with its evidence and fix, then the other findings.

A script that failed is shown as a failure: before the first optimizer step there is nothing to
diagnose and the report says so instead; after some steps the failure comes first, then the diagnoses
of the steps seen. Rendered with ``rich`` when it is installed (colours only on a terminal), plain text
otherwise.
"""

from __future__ import annotations

import io
import textwrap

from .facts import Facts
from .summary import LAST_LOSS

_MARK = {"error": "✗", "warning": "!", "info": "·"}
_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _headline(result: dict, facts: Facts | None) -> str:
    line = f"stepaudit doctor: {result['script']} — {result['steps']} optimizer steps, stopped: {result['stopped']}"
    if facts is not None and facts.loss_start is not None and facts.loss_end is not None:
        line += f"\nloss {facts.loss_start:.4g} → {facts.loss_end:.4g} (last: {LAST_LOSS})"
    return line


def _failed(result: dict) -> bool:
    return bool(result.get("exit_status"))


def _failure_lines(result: dict, error: str | None) -> tuple[str, str | None, str | None]:
    """(the failure's title, the traceback to show under it, a closing note) — or ('', None, None)."""
    reason = result.get("reason") or ""
    shown = error if error and not error.startswith("the script exited with status") else None
    if _failed(result) and not result["steps"]:
        return (
            f"stopped before the first optimizer step: {reason}",
            shown,
            f"no diagnosis: no optimizer step ran, so there was nothing to watch (exit status "
            f"{result['exit_status']}, the script's own)",
        )
    if _failed(result):
        steps = result["steps"]
        return (
            f"✗ the script failed after {steps} optimizer step{'s' if steps != 1 else ''}: {reason}",
            shown,
            f"exit status {result['exit_status']} (the script's own): the diagnoses above cover only the "
            f"{steps} step{'s' if steps != 1 else ''} before the failure",
        )
    if error:  # raised while unwinding from the doctor's own stop: a normal end, still shown
        return (f"after the doctor stopped it ({result['stopped']}), the script raised: {reason}", shown, None)
    return "", None, None


def _verified(d: dict) -> str | None:
    """The ``--verify`` line of a diagnosis (``confirmed: with lr ×0.1 the loss fell …``), or None."""
    verification = d.get("verification")
    return verification.get("detail") or verification.get("verdict") if isinstance(verification, dict) else None


def _title(top: dict, failed: bool) -> str:
    if top["code"] == "healthy":
        return "Healthy until the failure" if failed else "Healthy"
    return "Most likely root cause"


def render_plain(
    result: dict, error: str | None = None, run: str | None = None, facts: Facts | None = None, width: int = 100
) -> str:
    """The report as plain text."""
    wrap = lambda text, indent: textwrap.fill(text, width, initial_indent=indent, subsequent_indent=" " * len(indent))  # noqa: E731
    lines = [_headline(result, facts)]
    failure, trace, closing = _failure_lines(result, error)
    if failure:
        lines += ["", failure.upper() if failure.startswith("✗") else failure]
        if trace:
            lines.append(textwrap.indent(trace, "  "))
    diagnoses = result["diagnoses"]
    if diagnoses:
        top = diagnoses[0]
        lines += [
            "",
            f"{_title(top, _failed(result))}: {top['code']}  ({top['severity']}, confidence {top['confidence']:.2f}"
            + (f", from step {top['first_step']})" if top["first_step"] is not None else ")"),
        ]
        lines += [wrap(top["evidence"], "  evidence: "), wrap(top["fix"], "  fix:      ")]
        lines += [wrap(_verified(top), "  verified: ")] if _verified(top) else []
    if len(diagnoses) > 1:
        lines += ["", "Also found:"]
        for d in diagnoses[1:]:
            start = f", step {d['first_step']}" if d["first_step"] is not None else ""
            lines.append(f"  {_MARK[d['severity']]} {d['code']} ({d['severity']}, {d['confidence']:.2f}{start})")
            lines += [wrap(d["evidence"], "      "), wrap("fix: " + d["fix"], "      ")]
            lines += [wrap("verified: " + _verified(d), "      ")] if _verified(d) else []
    if closing:
        lines += ["", closing]
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
    console = Console(
        file=buffer,
        force_terminal=tty,
        width=min(110, Console().width) if tty else 100,
        highlight=False,
        soft_wrap=False,
    )
    console.print(_headline(result, facts), style="bold", markup=False)
    failure, trace, closing = _failure_lines(result, error)
    if failure and _failed(result):
        console.print(failure, style="bold red", markup=False)
        if trace:
            console.print(Panel(escape(trace), border_style="red"))
    elif failure:
        console.print(failure, style="yellow", markup=False)
        if trace:
            console.print(textwrap.indent(trace, "  "), style="dim", markup=False)
    diagnoses = result["diagnoses"]
    if diagnoses:
        top = diagnoses[0]
        title = _title(top, _failed(result)).lower()
        if top["code"] != "healthy":
            title += f": [b]{top['code']}[/b]"
        start = f", from step {top['first_step']}" if top["first_step"] is not None else ""
        body = f"[b]evidence[/b]  {escape(top['evidence'])}\n[b]fix[/b]       {escape(top['fix'])}"
        body += f"\n[b]verified[/b]  {escape(_verified(top))}" if _verified(top) else ""
        console.print(
            Panel(
                body,
                title=f"{title} ({top['severity']}, confidence {top['confidence']:.2f}{start})",
                title_align="left",
                border_style=_STYLE[top["severity"]],
            )
        )
    if len(diagnoses) > 1:
        console.print("also found:", style="bold")
        for d in diagnoses[1:]:
            start = f", step {d['first_step']}" if d["first_step"] is not None else ""
            console.print(
                f"  [{_STYLE[d['severity']]}]{_MARK[d['severity']]} {d['code']}[/] "
                f"({d['severity']}, {d['confidence']:.2f}{start})"
            )
            console.print(textwrap.indent(textwrap.fill(d["evidence"], 94), "      "), markup=False)
            console.print(textwrap.indent(textwrap.fill("fix: " + d["fix"], 94), "      "), style="dim", markup=False)
            if _verified(d):
                console.print(textwrap.indent(textwrap.fill("verified: " + _verified(d), 94), "      "), markup=False)
    if closing:
        console.print(closing, style="bold red", markup=False)
    if run:
        console.print(f"run store: {run}", style="dim", markup=False)
    return buffer.getvalue().rstrip("\n")
