"""Check every label of the doctor suite: each faulty script trains markedly worse than its fixed variant.

    python tests/doctor/cases/verify.py [--cases c01 c06 ...] [--jobs 2] [--json]

Runs each script as a user would (``python script.py``), reads its last ``final_metric <name> <value>``
line, and compares faulty against ``fixed/<same name>``. Healthy cases have no fixed variant; they must
reach the healthy floor of their metric instead. Exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Per metric: whether higher is better, what "markedly better" means, and the floor a healthy run reaches.
# accuracy, r2: at least +0.10 absolute (ten accuracy points, a tenth of the variance explained).
# loss, mse: the fixed value at most half the faulty one.
METRICS = {
    "accuracy": {"higher_is_better": True, "margin": 0.10, "healthy_floor": 0.80},
    "r2": {"higher_is_better": True, "margin": 0.10, "healthy_floor": 0.80},
    "loss": {"higher_is_better": False, "ratio": 0.5, "healthy_ceiling": None},
    "mse": {"higher_is_better": False, "ratio": 0.5, "healthy_ceiling": None},
}
FINAL_METRIC = re.compile(r"^final_metric\s+(\S+)\s+(\S+)\s*$", re.MULTILINE)


def parse_final_metric(stdout: str) -> tuple[str, float] | None:
    """The last ``final_metric <name> <value>`` line of a script's output (nan/inf allowed), or None."""
    found = FINAL_METRIC.findall(stdout)
    if not found:
        return None
    name, value = found[-1]
    try:
        return name, float(value)
    except ValueError:
        return name, math.nan


def markedly_better(metric: str, faulty: float, fixed: float) -> bool:
    """True when ``fixed`` beats ``faulty`` by the metric's margin; a non-finite faulty value counts as worst."""
    spec = METRICS[metric]
    if not math.isfinite(fixed):
        return False
    if not math.isfinite(faulty):
        return True
    if spec["higher_is_better"]:
        return fixed - faulty >= spec["margin"]
    return fixed <= spec["ratio"] * faulty


def healthy_ok(metric: str, value: float) -> bool:
    """True when a healthy case's metric is finite and reaches its metric's healthy floor."""
    spec = METRICS[metric]
    if not math.isfinite(value):
        return False
    if spec["higher_is_better"]:
        return value >= spec["healthy_floor"]
    return spec["healthy_ceiling"] is None or value <= spec["healthy_ceiling"]


def run_script(path: Path, timeout: float = 300.0) -> dict:
    """Run one script in a fresh interpreter (empty working folder); metric, seconds and any error."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # two scripts share two cores; oversubscription costs 10x
    env.setdefault("MKL_NUM_THREADS", "1")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="doctor-case-") as cwd:
        try:
            done = subprocess.run([sys.executable, str(path)], cwd=cwd, env=env, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"metric": None, "value": math.nan, "seconds": time.perf_counter() - start,
                    "error": f"timed out after {timeout:.0f} s"}
    seconds = time.perf_counter() - start
    parsed = parse_final_metric(done.stdout)
    if done.returncode != 0 or parsed is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"metric": None, "value": math.nan, "seconds": seconds,
                "error": f"exit {done.returncode}, no final_metric: " + " | ".join(tail)}
    return {"metric": parsed[0], "value": parsed[1], "seconds": seconds, "error": None}


def load_labels(case_dir: Path = HERE) -> dict[str, dict]:
    """labels.json: case file name → {expected, fault, fix}."""
    return json.loads((case_dir / "labels.json").read_text())


def verify_case(name: str, label: dict, case_dir: Path = HERE) -> dict:
    """Run a case (and its fixed variant unless healthy) and judge its label."""
    faulty = run_script(case_dir / name)
    result = {"case": name, "expected": label["expected"], "metric": faulty["metric"],
              "faulty": faulty["value"], "fixed": None, "seconds": faulty["seconds"], "error": faulty["error"]}
    if faulty["error"]:
        result["ok"] = False
        return result
    if faulty["metric"] not in METRICS:
        result.update(ok=False, error=f"unknown metric {faulty['metric']!r}; known: {sorted(METRICS)}")
        return result
    if label["expected"] == "healthy":
        result["ok"] = healthy_ok(faulty["metric"], faulty["value"])
        return result
    fixed = run_script(case_dir / "fixed" / name)
    result["fixed"] = fixed["value"]
    result["seconds"] += fixed["seconds"]
    if fixed["error"] or fixed["metric"] != faulty["metric"]:
        result.update(ok=False, error=fixed["error"] or f"fixed prints {fixed['metric']!r}, faulty {faulty['metric']!r}")
        return result
    result["ok"] = markedly_better(faulty["metric"], faulty["value"], fixed["value"])
    return result


def verify(names: list[str] | None = None, jobs: int = 2, case_dir: Path = HERE) -> list[dict]:
    """Verify the named cases (default: all in labels.json), ``jobs`` at a time, in label order."""
    labels = load_labels(case_dir)
    names = list(labels) if not names else names
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise SystemExit(f"not in labels.json: {unknown}")
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda n: verify_case(n, labels[n], case_dir), names))


def format_table(results: list[dict]) -> str:
    """A plain-text table: case, label, metric, faulty value, fixed value, verdict."""
    lines = [f"{'case':<28} {'expected':<25} {'metric':<8} {'faulty':>8} {'fixed':>8} {'sec':>5}  verdict"]
    for r in results:
        fixed = "-" if r["fixed"] is None else f"{r['fixed']:.3f}"
        verdict = "ok" if r["ok"] else "FAIL" + (f" ({r['error']})" if r["error"] else "")
        lines.append(f"{r['case']:<28} {r['expected']:<25} {r['metric'] or '-':<8} {r['faulty']:>8.3f} "
                     f"{fixed:>8} {r['seconds']:>5.1f}  {verdict}")
    passed = sum(r["ok"] for r in results)
    lines.append(f"{passed}/{len(results)} labels verified")
    return "\n".join(lines)


def _resolve(names: list[str], labels: dict) -> list[str]:
    """Accept case file names or their prefixes (``c06`` → ``c06_digits_sgd.py``)."""
    out = []
    for n in names:
        match = [k for k in labels if k == n or k.startswith(n)]
        if len(match) != 1:
            raise SystemExit(f"{n!r} matches {match or 'no case'} in labels.json")
        out.append(match[0])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=None, help="case names or prefixes (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    names = _resolve(args.cases, load_labels()) if args.cases else None
    results = verify(names, jobs=args.jobs)
    print(json.dumps(results, indent=1) if args.json else format_table(results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
