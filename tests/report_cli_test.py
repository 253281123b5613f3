"""``stepaudit report`` / ``stepaudit compare`` and the terminal summaries (rich and plain)."""
import io
import sys

import numpy as np
import pytest

from stepaudit.cli import main as stepaudit
from stepaudit.report.cli import compare_main, main
from stepaudit.report.data import load_run
from stepaudit.report.samples import write_synthetic_run
from stepaudit.report.terminal import plain_compare, plain_run, print_compare, print_run, sparkline

RICH = ("rich", "rich.box", "rich.console", "rich.panel", "rich.table", "rich.text")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return [write_synthetic_run(root / name, steps=120, seed=seed, name=name) for seed, name in enumerate(("sgd", "adam"))]


def test_report_writes_into_the_run_folder_by_default(runs, capsys):
    assert main([str(runs[0])]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(runs[0] / "report.html") and (runs[0] / "report.html").stat().st_size > 10_000


def test_report_output_path_and_the_top_level_dispatcher(runs, tmp_path, capsys):
    target = tmp_path / "nested" / "r.html"
    assert stepaudit(["report", str(runs[0]), "-o", str(target)]) == 0
    assert target.read_text().startswith("<!DOCTYPE html>")


def test_report_of_a_missing_run_says_what_to_pass(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 2
    assert "no stepaudit run" in capsys.readouterr().err


def test_terminal_summary_reads_the_run(runs, capsys):
    assert main([str(runs[0]), "--terminal"]) == 0
    out = capsys.readouterr().out
    run = load_run(runs[0])
    lowered = np.mean(run.verdicts == "decrease")
    assert "stepaudit · sgd" in out and f"{lowered:.0%}" in out and "120" in out


def test_terminal_alone_writes_no_html(tmp_path, capsys):
    run = write_synthetic_run(tmp_path / "quiet", steps=20)
    assert main([str(run), "--terminal"]) == 0
    assert not (run / "report.html").exists()
    assert main([str(run), "--terminal", "-o", str(tmp_path / "both.html")]) == 0
    assert (tmp_path / "both.html").exists()


def test_plain_fallback_without_rich(runs, monkeypatch):
    for name in RICH:
        monkeypatch.setitem(sys.modules, name, None)
    run = load_run(runs[1])
    buffer = io.StringIO()
    print_run(run, file=buffer)
    assert buffer.getvalue().strip() == plain_run(run)
    buffer = io.StringIO()
    print_compare([load_run(r) for r in runs], file=buffer)
    assert buffer.getvalue().strip() == plain_compare([load_run(r) for r in runs])


def test_compare_prints_a_table_and_writes_the_page(runs, tmp_path, capsys):
    out = tmp_path / "cmp.html"
    assert compare_main([str(r) for r in runs] + ["-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sgd" in printed and "adam" in printed and str(out) in printed
    assert out.read_text().count('<span class="swatch"') == 2


def test_compare_expands_a_folder_of_runs_and_refuses_a_missing_one(runs, tmp_path, capsys):
    assert compare_main([str(runs[0].parent), "--no-html"]) == 0
    table = capsys.readouterr().out
    assert table.index("adam") < table.index("sgd")  # folder order
    assert compare_main([str(tmp_path / "missing")]) == 2
    assert "no stepaudit run" in capsys.readouterr().err


def test_plain_compare_has_one_column_per_run(runs):
    text = plain_compare([load_run(r) for r in runs])
    first = text.splitlines()[0].split()
    assert first == ["run", "sgd", "adam"]
    rows = {line.split("  ")[0].strip(): line for line in text.splitlines()}
    assert rows["steps"].split()[-2:] == ["120", "120"]


def test_sparkline_rises_with_the_values():
    assert sparkline(np.arange(8.0), width=8) == "▁▂▃▄▅▆▇█"
    assert sparkline(np.array([np.nan, np.nan])) == ""
    assert sparkline(np.array([1.0, np.nan, 3.0]), width=8) == "▁ █"
