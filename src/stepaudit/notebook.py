"""Jupyter: an audit, a loaded run and the doctor's diagnoses render inline, and a live view updates while training.

Everything is self-contained HTML (no server, no extension, nothing fetched). A run renders as the
report's summary cards and main charts inside an ``<iframe srcdoc>``, so the report's stylesheet and
hover script cannot touch the notebook's own page. The live view is one display that a sink on the
audit redraws at most once per ``interval`` seconds (``IPython.display`` display handles).
"""

from __future__ import annotations

import html
import time
from typing import Any


def framed(document: str, height: int = 720) -> str:
    """An HTML document isolated in an iframe (its CSS and script stay inside), for a notebook output."""
    return (
        f'<iframe srcdoc="{html.escape(document, quote=True)}" style="width:100%;height:{height}px;'
        'border:1px solid #e5e7eb;border-radius:8px" sandbox="allow-scripts"></iframe>'
    )


def run_html(run: Any) -> str:
    """``_repr_html_`` of a loaded run: the report's compact page (findings, cards, main charts)."""
    from .report.html import render_report

    return framed(render_report(run, compact=True))


def audit_html(audit: Any) -> str:
    """``_repr_html_`` of an ``Audit``: its run as stored so far (the store commits every record)."""
    from .report.data import load_run

    if not audit.records:
        return f"<p>stepaudit: no audited step yet (run folder <code>{html.escape(str(audit.run))}</code>)</p>"
    return run_html(load_run(audit.run))


def diagnoses_html(diagnoses: list[dict]) -> str:
    """``_repr_html_`` of the doctor's diagnoses: one card each, root cause first."""
    from .report.html import asset, findings_html

    return framed(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><style>{asset('report.css')}</style></head>"
        f"<body><main>{findings_html(list(diagnoses))}</main></body></html>",
        height=140 + 130 * max(len(diagnoses), 1),
    )


class Diagnoses(list):
    """The doctor's diagnoses (a plain list of dicts) that also render as cards in a notebook."""

    def _repr_html_(self) -> str:
        return diagnoses_html(self)


def live_html(audit: Any) -> str:
    """The live view's content: the latest step's numbers and the loss so far (inline SVG, no script)."""
    from .report.charts import Series, time_chart

    records = [r for r in audit.records if isinstance(r.get("loss_before"), float)]
    if not records:
        return "<p>stepaudit: waiting for the first audited step…</p>"
    last = records[-1]
    lowered = sum(r.get("verdict") == "decrease" for r in records) / len(records)
    line = (
        f"step {last['step']:,} · loss {last['loss_before']:.4g} → {last.get('loss_after', float('nan')):.4g} "
        f"on its own batch · {lowered:.0%} of {len(records):,} audited steps lowered their batch's loss"
    )
    import numpy as np

    steps = np.array([r["step"] for r in records], float)
    losses = np.array([r["loss_before"] for r in records], float)
    svg, _ = time_chart(
        "live-loss", "Loss per step", [Series("training loss", steps, losses, "#2563eb")], y_label="loss"
    )
    return (
        f'<div style="font:13px system-ui,sans-serif"><div><b>stepaudit</b> · {html.escape(line)}</div>'
        f'<div style="max-width:720px">{svg}</div></div>'
    )


class LiveView:
    """A notebook output that redraws while training: ``audit.live()`` in the cell that trains."""

    def __init__(self, audit: Any, interval: float = 1.0) -> None:
        from IPython.display import HTML, display

        self.audit, self.interval, self._html = audit, interval, HTML
        self._last = 0.0
        self.handle = display(HTML(live_html(audit)), display_id=True)
        audit.add_sink(self)

    def __call__(self, record: dict) -> None:
        """A sink: called with every committed record; redraws when ``interval`` has passed."""
        now = time.monotonic()
        if now - self._last >= self.interval:
            self.refresh()

    def refresh(self) -> None:
        """Redraw now."""
        self._last = time.monotonic()
        if self.handle is not None:
            self.handle.update(self._html(live_html(self.audit)))

    def close(self) -> None:
        """Draw the final state (``Audit.close()`` calls this on its sinks)."""
        self.refresh()


class NotebookMixin:
    """What ``Audit`` adds for notebooks: ``_repr_html_`` and ``live()``."""

    def _repr_html_(self) -> str:
        return audit_html(self)

    def live(self, interval: float = 1.0) -> LiveView:
        """Show a view of this audit that updates while training (at most every ``interval`` seconds)."""
        return LiveView(self, interval)
