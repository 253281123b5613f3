"""Score the doctor on a labelled suite of training scripts: ``python tools/doctor_eval.py tests/doctor/cases``.

For every case in ``<suite>/labels.json`` ({file: {expected, fault, fix}}) it runs
``stepaudit doctor --json --max-steps 300 --time-limit 60 <file>`` in a subprocess and reads the JSON,
and does the same for the case's fixed variant ``<suite>/fixed/<file>`` when there is one.
- A faulty case is a hit when its expected code is among the top two diagnoses (top-1 counted too).
- A clean run (a healthy case, or any fixed variant) passes when no diagnosis has severity error or
  warning; a healthy case whose top diagnosis is not ``healthy`` is also a false alarm.
- A contradiction is one output giving opposite advice: one fix says to raise the learning rate and
  another to lower it, or ``healthy`` reported beside an error or a warning. The check reads the
  doctor's words, not its code, so it is independent of how the doctor resolves conflicts.
- A crash is a doctor run that produced no JSON result (the script's own failure is not a crash).
It prints a per-case table, per-code results and the totals. This is test tooling: it lives outside
the installed package. The exit status is 0 whatever the scores (this is a report); 2 when the
harness itself cannot run (no labels, unknown case, or not one doctor run produced a result).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

TOP_K = 2
HEALTHY = "healthy"


def doctor_command(max_steps: int = 300, time_limit: float = 60.0) -> list[str]:
    """The default command prefix: this interpreter's ``stepaudit doctor --json`` with the step and time limits."""
    return [
        sys.executable,
        "-m",
        "stepaudit",
        "doctor",
        "--json",
        "--max-steps",
        str(max_steps),
        "--time-limit",
        f"{time_limit:g}",
    ]


def parse_doctor_output(stdout: str) -> dict:
    """The doctor's JSON object: the whole stdout, else the last line or trailing block that parses with "diagnoses"."""
    text = stdout.strip()
    candidates = [text] + [line for line in reversed(text.splitlines()) if line.lstrip().startswith("{")]
    start = text.rfind("\n{")
    if start >= 0:
        candidates.append(text[start + 1 :])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("diagnoses"), list):
            return value
    raise ValueError("no JSON object with a 'diagnoses' list on stdout")


def run_case(script: Path, command: Sequence[str], timeout: float) -> dict:
    """Run the doctor on one script from an empty temporary folder (its run store lands there and is removed)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # cases run two at a time on small machines; oversubscription costs 10x
    env.setdefault("MKL_NUM_THREADS", "1")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="doctor-eval-") as cwd:
        try:
            done = subprocess.run(
                [*command, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"error": f"doctor did not finish within {timeout:.0f} s", "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    try:
        report = parse_doctor_output(done.stdout)
    except ValueError as error:
        tail = " | ".join((done.stderr or "").strip().splitlines()[-3:])
        return {"error": f"exit {done.returncode}: {error}" + (f"; stderr: {tail}" if tail else ""), "seconds": seconds}
    return {"report": report, "seconds": seconds, "error": None}


RAISE_LR = re.compile(r"\b(raise|increase|larger|higher)\b[^.;]{0,20}\blearning rate|learning rate[^.;]{0,25}\bby 10×")
LOWER_LR = re.compile(r"\b(lower|decrease|reduce|smaller)\b[^.;]{0,20}\b(learning rate|lr)\b")


def contradictions(diagnoses: list[dict]) -> list[str]:
    """Opposite advice inside one output, read from its words: lr up against lr down, healthy beside a problem."""
    found = []
    ups = [d.get("code") for d in diagnoses if RAISE_LR.search(str(d.get("fix", "")).lower())]
    downs = [d.get("code") for d in diagnoses if LOWER_LR.search(str(d.get("fix", "")).lower())]
    if ups and downs:
        found.append(f"raise lr ({ups[0]}) vs lower lr ({downs[0]})")
    codes = [d.get("code") for d in diagnoses]
    problems = [d.get("code") for d in diagnoses if d.get("severity") in ("error", "warning")]
    if HEALTHY in codes and problems:
        found.append(f"healthy beside {problems[0]}")
    return found


def judge(expected: str, report: dict | None) -> dict:
    """Hit / pass / false-alarm / clean verdict of one run from the doctor's report (None when the run failed)."""
    diagnoses = [d for d in (report or {}).get("diagnoses", []) if isinstance(d, dict)]
    codes = [str(d.get("code")) for d in diagnoses]
    top = codes[0] if codes else None
    clean = report is not None and not any(d.get("severity") in ("error", "warning") for d in diagnoses)
    verdict = {"codes": codes, "clean": clean, "contradictions": contradictions(diagnoses)}
    if expected == HEALTHY:
        passed = top == HEALTHY
        return {
            **verdict,
            "hit": passed,
            "top1": passed,
            "false_alarm": report is not None and bool(codes) and not (passed and clean),
        }
    return {**verdict, "hit": expected in codes[:TOP_K], "top1": top == expected, "false_alarm": False}


def load_labels(suite: Path) -> dict[str, dict]:
    """The suite's labels.json, checked for an ``expected`` code and an existing script per case."""
    path = suite / "labels.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a suite is a folder of scripts with a labels.json")
    labels = json.loads(path.read_text())
    for name, label in labels.items():
        if not isinstance(label, dict) or "expected" not in label:
            raise ValueError(f"labels.json: {name!r} needs {{'expected': code, 'fault': ..., 'fix': ...}}")
        if not (suite / name).is_file():
            raise FileNotFoundError(f"labels.json names {name!r} but {suite / name} does not exist")
    return labels


def missing_imports(script: Path) -> list[str]:
    """Top-level packages the script imports that are not installed here (e.g. fastai), in import order."""
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else ([node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        )
        for name in names:
            top = name.split(".")[0]
            if top not in missing and importlib.util.find_spec(top) is None:
                missing.append(top)
    return missing


def evaluate(
    suite: Path,
    command: Sequence[str] | None = None,
    workers: int = 2,
    timeout: float = 300.0,
    cases: Sequence[str] | None = None,
    fixed: bool = True,
) -> dict[str, Any]:
    """Run the doctor on every case and its fixed variant (``workers`` at a time); cases, fixed, per_code, totals."""
    suite = Path(suite).resolve()
    labels = load_labels(suite)
    names = list(labels) if not cases else [_resolve(c, labels) for c in cases]
    skipped = {name: missing for name in names if (missing := missing_imports(suite / name))}
    names = [name for name in names if name not in skipped]  # a case needing an absent package is not a crash
    command = list(command or doctor_command())
    jobs = [(name, labels[name]["expected"], suite / name) for name in names]
    if fixed:
        jobs += [
            (f"fixed/{name}", HEALTHY, suite / "fixed" / name)
            for name in names
            if labels[name]["expected"] != HEALTHY and (suite / "fixed" / name).is_file()
        ]

    def one(job: tuple[str, str, Path]) -> dict:
        name, expected, path = job
        outcome = run_case(path, command, timeout)
        report = outcome.get("report")
        verdict = judge(expected, report)
        return {
            "case": name,
            "expected": expected,
            **verdict,
            "steps": (report or {}).get("steps"),
            "stopped": (report or {}).get("stopped"),
            "seconds": round(outcome["seconds"], 2),
            "error": outcome["error"],
        }

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, jobs))
    main_runs = [r for r in results if not r["case"].startswith("fixed/")]
    fixed_runs = [r for r in results if r["case"].startswith("fixed/")]
    return {
        "cases": main_runs,
        "fixed": fixed_runs,
        "per_code": per_code(main_runs),
        "totals": totals(main_runs, fixed_runs),
        "skipped": skipped,  # case → packages it imports that are not installed
    }


def per_code(results: list[dict]) -> dict[str, dict]:
    """For each expected code: cases, hits (top two; for healthy: top one), top-1 hits, and run errors."""
    table: dict[str, dict] = {}
    for r in results:
        row = table.setdefault(r["expected"], {"cases": 0, "hits": 0, "top1": 0, "errors": 0})
        row["cases"] += 1
        row["hits"] += bool(r["hit"])
        row["top1"] += bool(r["top1"])
        row["errors"] += r["error"] is not None
    return dict(sorted(table.items()))


def totals(results: list[dict], fixed_runs: Sequence[dict] = ()) -> dict[str, Any]:
    """Accuracy on faulty cases (top two, top one); clean runs, false alarms, contradictions, crashes, seconds."""
    faulty = [r for r in results if r["expected"] != HEALTHY]
    healthy = [r for r in results if r["expected"] == HEALTHY]
    clean_runs = [r for r in [*healthy, *fixed_runs] if r["error"] is None]
    every = [*results, *fixed_runs]
    return {
        "faulty_cases": len(faulty),
        "hits": sum(r["hit"] for r in faulty),
        "accuracy": sum(r["hit"] for r in faulty) / len(faulty) if faulty else None,
        "top1_accuracy": sum(r["top1"] for r in faulty) / len(faulty) if faulty else None,
        "healthy_cases": len(healthy),
        "healthy_passed": sum(r["hit"] for r in healthy),
        "false_alarms": sum(r["false_alarm"] for r in healthy),
        "errors": sum(r["error"] is not None for r in results),
        "clean_runs": len(clean_runs),
        "clean_passed": sum(r["clean"] and (r["case"].startswith("fixed/") or r["hit"]) for r in clean_runs),
        "contradictions": sum(bool(r["contradictions"]) for r in every),
        "crashes": sum(r["error"] is not None for r in every),
        "seconds_per_script": round(sum(r["seconds"] for r in every) / len(every), 2) if every else None,
    }


def format_report(scored: dict[str, Any]) -> str:
    """The plain-text report: per-case table, per-code table, and the totals."""
    lines = [f"{'case':<34} {'expected':<25} {'top diagnoses':<48} {'steps':>5} {'sec':>5}  verdict"]
    for r in [*scored["cases"], *scored.get("fixed", [])]:
        top = ", ".join(r["codes"][:3]) or "-"
        if r["error"]:
            verdict = f"ERROR {r['error'][:120]}"
        elif r["case"].startswith("fixed/"):
            verdict = "clean" if r["clean"] else "FALSE ALARM"
        elif r["expected"] == HEALTHY:
            verdict = "pass" if r["hit"] and r["clean"] else "FALSE ALARM"
        else:
            verdict = ("hit (top 1)" if r["top1"] else "hit (top 2)") if r["hit"] else "miss"
        if r.get("contradictions"):
            verdict += "; CONTRADICTION: " + "; ".join(r["contradictions"])
        steps = "-" if r["steps"] is None else str(r["steps"])
        lines.append(f"{r['case']:<34} {r['expected']:<25} {top:<48} {steps:>5} {r['seconds']:>5.1f}  {verdict}")
    lines += ["", f"{'expected code':<25} {'cases':>5} {'top-2':>6} {'top-1':>6} {'errors':>6}"]
    for code, row in scored["per_code"].items():
        lines.append(f"{code:<25} {row['cases']:>5} {row['hits']:>6} {row['top1']:>6} {row['errors']:>6}")
    t = scored["totals"]
    lines.append("")
    for name, missing in scored.get("skipped", {}).items():
        lines.append(f"skipped {name}: needs {', '.join(missing)} (not installed)")
    if t["faulty_cases"]:
        lines.append(
            f"accuracy (expected code in the top two): {t['hits']}/{t['faulty_cases']} = {t['accuracy']:.1%}"
            f"   top-1: {t['top1_accuracy']:.1%}"
        )
    if t["healthy_cases"]:
        lines.append(
            f"healthy cases passed: {t['healthy_passed']}/{t['healthy_cases']}   false alarms: {t['false_alarms']}"
        )
    if t.get("clean_runs"):
        lines.append(
            f"clean runs without a warning or error (healthy cases and fixed variants): "
            f"{t['clean_passed']}/{t['clean_runs']} = {t['clean_passed'] / t['clean_runs']:.1%}"
        )
    lines.append(
        f"contradictions: {t.get('contradictions', 0)}   crashes (no result): {t.get('crashes', t['errors'])}"
        f"   seconds per script: {t.get('seconds_per_script')}"
    )
    return "\n".join(lines)


def _resolve(name: str, labels: dict) -> str:
    """A case file name or a unique prefix of one (``c06`` → ``c06_digits_sgd.py``)."""
    matches = [k for k in labels if k == name or k.startswith(name)]
    if len(matches) != 1:
        raise ValueError(f"case {name!r} matches {matches or 'nothing'} in labels.json")
    return matches[0]


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python tools/doctor_eval.py SUITE [--json] [--workers N] [--cases ...] [--no-fixed]``."""
    parser = argparse.ArgumentParser(
        prog="python tools/doctor_eval.py", description="Score the doctor on a labelled suite of training scripts."
    )
    parser.add_argument("suite", type=Path, help="folder with the scripts and labels.json (tests/doctor/cases)")
    parser.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    parser.add_argument("--workers", type=int, default=2, help="doctor runs in parallel (default 2)")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--time-limit", type=float, default=60.0, help="the doctor's own time limit per script")
    parser.add_argument("--timeout", type=float, default=300.0, help="hard limit per doctor process, seconds")
    parser.add_argument("--cases", nargs="*", default=None, help="case names or prefixes (default: all)")
    parser.add_argument("--no-fixed", action="store_true", help="skip the fixed variants (faster)")
    parser.add_argument(
        "--doctor-cmd",
        default=None,
        help="command to run instead of the doctor (the script path is appended), e.g. a stub",
    )
    args = parser.parse_args(argv)
    command = shlex.split(args.doctor_cmd) if args.doctor_cmd else doctor_command(args.max_steps, args.time_limit)
    try:
        scored = evaluate(
            args.suite, command, workers=args.workers, timeout=args.timeout, cases=args.cases, fixed=not args.no_fixed
        )
    except (OSError, ValueError) as error:
        print(f"doctor-eval: {error}", file=sys.stderr)
        return 2
    print(json.dumps(scored, indent=1) if args.json else format_report(scored))
    if scored["cases"] and scored["totals"]["errors"] == len(scored["cases"]):
        print("doctor-eval: no doctor run produced a result; is `stepaudit doctor` installed?", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
