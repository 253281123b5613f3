"""Measure ``stepaudit doctor --verify`` on a labelled suite (issue 15's numbers); test tooling, not shipped.

    python tools/verify_eval.py tests/doctor/cases [--workers 2] [--cases c06 c10 ...] [--json] [--no-fixed]

Runs ``stepaudit doctor --json --verify`` on every case and fixed variant (as ``tools/doctor_eval.py`` runs the
plain doctor) and reports: the share of faulty cases whose labelled cause has a counterfactual and is
confirmed; the verdicts on healthy and fixed runs (a confirmed fix there is a false confirmation); top-1
accuracy with verification against the doctor's own order before it (``order_before_verify``); crashes; and
seconds per case.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doctor_eval import HEALTHY, _resolve, doctor_command, load_labels, missing_imports, run_case  # noqa: E402

VERDICTS = ("confirmed", "refuted", "inconclusive")  # anything else ("no automatic check") was not checked


def verify_command(max_steps: int = 300, time_limit: float = 60.0) -> list[str]:
    """The doctor command of ``doctor_eval`` with ``--verify``."""
    return [*doctor_command(max_steps, time_limit), "--verify"]


def score_case(name: str, expected: str, outcome: dict) -> dict:
    """One run's row: codes before and after verification, the verdicts, and whether the label came out on top."""
    report = outcome.get("report") or {}
    diagnoses = [d for d in report.get("diagnoses", []) if isinstance(d, dict)]
    after = [str(d.get("code")) for d in diagnoses]
    before = [str(c) for c in report.get("order_before_verify", after)]
    verdicts = {
        str(d.get("code")): (d.get("verification") or {}).get("verdict")
        for d in diagnoses
        if d.get("verification") is not None
    }
    checked = {c: v for c, v in verdicts.items() if v in VERDICTS}
    label = verdicts.get(expected) if expected != HEALTHY else None
    return {
        "case": name,
        "expected": expected,
        "before": before,
        "after": after,
        "verdicts": verdicts,
        "label_verdict": label,
        "top1_before": bool(before) and before[0] == expected,
        "top1_after": bool(after) and after[0] == expected,
        "false_confirmations": [c for c, v in checked.items() if v == "confirmed"] if expected == HEALTHY else [],
        "seconds": round(outcome["seconds"], 1),
        "error": outcome.get("error"),
    }


def totals(rows: list[dict]) -> dict[str, Any]:
    """The issue's measures over the rows (fixed variants count as healthy runs)."""
    faulty = [r for r in rows if r["expected"] != HEALTHY]
    healthy = [r for r in rows if r["expected"] == HEALTHY]
    checkable = [r for r in faulty if r["label_verdict"] in VERDICTS]
    healthy_checks = [v for r in healthy for v in r["verdicts"].values() if v in VERDICTS]
    return {
        "faulty_cases": len(faulty),
        "label_checked": len(checkable),
        "label_confirmed": sum(r["label_verdict"] == "confirmed" for r in checkable),
        "label_refuted": sum(r["label_verdict"] == "refuted" for r in checkable),
        "label_inconclusive": sum(r["label_verdict"] == "inconclusive" for r in checkable),
        "label_not_in_top3_or_unchecked": len(faulty) - len(checkable),
        "top1_before": sum(r["top1_before"] for r in faulty),
        "top1_after": sum(r["top1_after"] for r in faulty),
        "healthy_runs": len(healthy),
        "healthy_checks": len(healthy_checks),
        "healthy_refuted_or_inconclusive": sum(v in ("refuted", "inconclusive") for v in healthy_checks),
        "false_confirmations": sum(len(r["false_confirmations"]) for r in healthy),
        "crashes": sum(r["error"] is not None for r in rows),
        "seconds_per_faulty_case": round(sum(r["seconds"] for r in faulty) / len(faulty), 1) if faulty else None,
        "seconds_per_healthy_run": round(sum(r["seconds"] for r in healthy) / len(healthy), 1) if healthy else None,
    }


def evaluate(suite: Path, workers: int, timeout: float, cases=None, fixed: bool = True) -> dict[str, Any]:
    """Run every case (and fixed variant) under ``--verify``; rows and totals."""
    suite = Path(suite).resolve()
    labels = load_labels(suite)
    names = list(labels) if not cases else [_resolve(c, labels) for c in cases]
    skipped = {n: m for n in names if (m := missing_imports(suite / n))}
    names = [n for n in names if n not in skipped]
    jobs = [(n, labels[n]["expected"], suite / n) for n in names]
    if fixed:
        jobs += [
            (f"fixed/{n}", HEALTHY, suite / "fixed" / n)
            for n in names
            if labels[n]["expected"] != HEALTHY and (suite / "fixed" / n).is_file()
        ]
    command = verify_command()

    def one(job):
        name, expected, path = job
        row = score_case(name, expected, run_case(path, command, timeout))
        print(f"{name:40s} {row['seconds']:6.1f}s {row['after'][:3]} {row['verdicts']}", file=sys.stderr, flush=True)
        return row

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = list(pool.map(one, jobs))
    return {"rows": rows, "totals": totals(rows), "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    """Command line: run, then print the totals (or everything as JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0, help="hard limit per doctor process, seconds")
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--no-fixed", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = evaluate(args.suite, args.workers, args.timeout, args.cases, not args.no_fixed)
    print(json.dumps(result if args.json else result["totals"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
