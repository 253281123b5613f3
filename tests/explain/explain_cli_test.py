"""The command line: terminal report, --json, --svg, errors, python -m, and output without rich."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from stepaudit.explain import circuit_svg, explain, main
from stepaudit.explain.cli import parse_at
from stepaudit.explain.render import print_lines, render


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(text: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_default_report(capsys):
    code, out, err = run(capsys)
    assert code == 0 and err == ""
    assert "\x1b[" not in out  # not a terminal: no colour codes
    for piece in [
        "f = (x + y) * z",
        "at x = -2, y = 5, z = -4",
        "lr = 0.1",
        "x───────┐",
        "├─(×)",
        "∂ -4",
        "∂f/∂x = -4",
        "-16.34",
        "-16.644",
        "-4.38",
        "swaps",
        "distributes",
        "H[x,z] = 1",
        "gᵀHg = -48",
        "lr ∈ (0, ∞)",
        "Verdict",
        "lowers f by 4.34",
    ]:
        assert piece in out, piece


def test_json_has_every_field_and_is_strict(capsys):
    code, out, _ = run(capsys, "max(x, y) * z", "--at", "x=-2,y=5", "--at", "z=-4", "--json")
    assert code == 0
    r = strict_json(out)
    for key in [
        "value",
        "grads",
        "nodes",
        "hessian",
        "step",
        "sequential",
        "decreasing_lr",
        "max_decreasing_lr",
        "quadratic_bound_lr",
        "verdict",
    ]:
        assert key in r
    assert r["value"] == -20.0 and r["grads"] == {"x": 0.0, "y": -4.0, "z": 5.0}
    assert {"op", "value", "grad", "inputs"} <= set(r["nodes"][-1])
    assert {"lr", "new", "predicted", "actual"} <= set(r["step"])
    assert r["decreasing_lr"]["method"] == "numerical"
    assert r == explain("max(x, y) * z", at={"x": -2, "y": 5, "z": -4})


def test_json_with_a_step_out_of_the_domain_stays_valid(capsys):
    code, out, _ = run(capsys, "log(x)", "--at", "x=0.5", "--lr", "1", "--json")
    assert code == 0 and strict_json(out)["step"]["actual"] is None


def test_expression_starting_with_minus_and_target(capsys):
    code, out, _ = run(capsys, "-x*y", "--at", "x=1,y=2", "--target", "-3", "--json")
    r = strict_json(out)
    assert code == 0 and r["value"] == -2.0 and r["target"] == -3.0
    assert r["grads"] == {"x": -2.0, "y": -1.0}  # (f - T) * grad f = 1 * (-y, -x)


def test_svg_file(tmp_path, capsys):
    path = tmp_path / "c.svg"
    code, out, err = run(capsys, "--svg", str(path))
    assert code == 0 and "wrote the circuit" in err and "Verdict" in out
    root = ET.fromstring(path.read_text(encoding="utf-8"))
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text") if t.text]
    for piece in ["x", "y", "z", "+", "×", "-12", "-4", "3", "swaps", "f"]:
        assert piece in texts, piece
    greens = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text") if t.get("fill") == "#1a7f37"}
    reds = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text") if t.get("fill") == "#cf222e"}
    assert {"-2", "5", "-4", "3", "-12"} <= greens and {"-4", "3", "1"} <= reds


def test_svg_escapes_text():
    r = explain()
    r["nodes"][0]["label"] = "<script>alert('x')</script>&"
    r["expr"] = "</svg><b>"
    svg = circuit_svg(r)
    assert "<script>" not in svg and "</svg><b>" not in svg
    ET.fromstring(svg)


def test_svg_to_stdout(capsys):
    code, out, _ = run(capsys, "x*x + y", "--at", "x=1,y=2", "--svg", "-")
    assert code == 0 and out.startswith("<svg") and ET.fromstring(out) is not None


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["x.real"], "attribute access is not allowed: 'x.real' (col 1)"),
        (["--lr", "0"], "--lr must be a positive finite number"),
        (["--lr", "abc"], "invalid float value"),
        (["--at", "x=abc"], "'abc' is not a number"),
        (["--at", "x"], "name=value"),
        (["--at", "w=1"], "'w', which is not in the expression"),
        (["x*q"], "no value for 'q'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["x", "y"], "unrecognized arguments: y"),
    ],
)
def test_errors_are_one_line_with_status_2(capsys, argv, fragment):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("explain: ") and err.count("\n") == 1 and fragment in err
    assert "Traceback" not in err


def test_unwritable_svg_path(capsys, tmp_path):
    code, _, err = run(capsys, "--svg", str(tmp_path / "no" / "such" / "dir.svg"))
    assert code == 2 and err.startswith("explain: cannot write")


def test_parse_at():
    assert parse_at(["x=-2, y=5", "z=-4e0"]) == {"x": -2.0, "y": 5.0, "z": -4.0}
    assert parse_at([]) == {}


def test_plain_fallback_matches_rich_when_not_a_terminal(monkeypatch):
    lines = render(explain(target=1.0))
    with_rich = io.StringIO()
    print_lines(lines, with_rich)
    for mod in ("rich", "rich.console", "rich.text"):
        monkeypatch.setitem(sys.modules, mod, None)  # makes "import rich..." raise ImportError
    plain = io.StringIO()
    print_lines(lines, plain)
    assert plain.getvalue() == with_rich.getvalue() and "Verdict" in plain.getvalue()


def test_colour_on_a_terminal():
    buf = io.StringIO()
    print_lines(render(explain()), buf, color=True)
    assert "\x1b[" in buf.getvalue()


def test_ascii_only_terminal():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    print_lines(render(explain()), stream)
    stream.flush()
    text = raw.getvalue().decode("ascii")
    assert "x-------+" in text and "d -4" in text and "1/2" in text


def test_python_dash_m():
    p = subprocess.run(
        [sys.executable, "-m", "stepaudit.explain", "--json"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert strict_json(p.stdout)["grads"] == {"x": -4.0, "y": -4.0, "z": 3.0}
