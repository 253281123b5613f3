"""Reports of audited runs: a self-contained HTML page per run, a comparison page, a terminal summary.

``write_report(run, out=None)`` and ``write_compare(runs, out)`` return the paths they wrote;
``stepaudit report`` / ``stepaudit compare`` are the command-line front ends (``report.cli``).
"""

from __future__ import annotations

from .compare import render_compare, write_compare
from .html import render_report, write_report

__all__ = ["render_compare", "render_report", "write_compare", "write_report"]
