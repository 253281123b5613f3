"""bench/gpu_check.sh: valid shell, compiling Python, and the CPU fallback end to end in under 60 s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
WRAPPER = ROOT / "bench" / "gpu_check.sh"


def test_the_wrapper_is_valid_bash() -> None:
    """``bash -n`` parses the wrapper."""
    subprocess.run(["bash", "-n", str(WRAPPER)], check=True)


def test_the_script_compiles() -> None:
    """``python -m py_compile`` accepts the script."""
    subprocess.run([sys.executable, "-m", "py_compile", str(SCRIPT)], check=True)


def test_the_cpu_fallback_prints_every_section_and_passes(tmp_path: Path) -> None:
    """``--cpu --quick`` through the wrapper: four titled sections, tables, skips named, JSON last, exit 0."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(
        ["bash", str(WRAPPER), "--cpu", "--quick", "--json", str(tmp_path / "out.json")],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    seconds = time.perf_counter() - started
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert seconds < 60, f"the CPU fallback took {seconds:.0f} s"
    for title in (
        "## 1. Bit-identity",
        "## 2. Host–device synchronisations",
        "## 3. Overhead",
        "## 4. Single-device DDP and FSDP2",
    ):
        assert title in out, title
    assert "| case | compared | records |" in out and "| workload | plain | every=1 | every=16 |" in out
    assert "| wrapper | backend |" in out
    *text, json_line = out.strip().splitlines()
    text = "\n".join(text)
    assert text.count("skipped: no GPU") == 3  # the sync count, and NCCL for DDP and FSDP2
    assert "FAIL" not in out and "Overall: PASS" in text
    last = json.loads(json_line)
    assert last == json.loads((tmp_path / "out.json").read_text())
    assert last["passed"] is True and last["failures"] == [] and last["machine"]["device"] == "cpu"
    sections = last["sections"]
    assert set(sections) == {"identity", "syncs", "overhead", "distributed"}
    assert [r["status"] for r in sections["identity"]["rows"]] == ["PASS"] * len(sections["identity"]["rows"])
    assert len(sections["identity"]["rows"]) == 8
    assert sections["syncs"]["skipped"] == "skipped: no GPU"
    assert all(r["every=1 ratio"] > 0 and r["every=16 ratio"] > 0 for r in sections["overhead"]["rows"])
    gloo = [r for r in sections["distributed"]["rows"] if r["backend"].startswith("gloo")]
    assert [r["status"] for r in gloo] == ["PASS", "PASS"]


def test_a_failing_section_prints_one_fail_line_and_the_exit_status_is_1(tmp_path: Path) -> None:
    """A section that raises: one FAIL line, the other sections still run, exit status 1."""
    code = (
        f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import gpu_check\n"
        "def broken(*args): raise RuntimeError('boom\\nsecond line')\n"
        "gpu_check.RUNNERS['syncs'] = broken\n"
        "sys.exit(gpu_check.main(['--cpu', '--quick', '--sections', 'syncs', 'identity']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "FAIL: syncs: RuntimeError: boom\n" in done.stdout and "second line" not in done.stdout
    assert "## 1. Bit-identity" in done.stdout and "Overall: FAIL (1 check(s) failed)" in done.stdout
    assert json.loads(done.stdout.strip().splitlines()[-1])["passed"] is False
