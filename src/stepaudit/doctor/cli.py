"""``stepaudit doctor [--json] [--max-steps N] [--time-limit S] [--run DIR] [--verify [--verify-steps N]] script.py [args…]``.

Runs the unchanged script in-process under passive capture, writes the run store, and prints the
diagnoses: a readable report, or with ``--json`` one JSON object on stdout (the script's own output
then goes to stderr): ``{"diagnoses": [...], "steps": N, "script": ..., "stopped": ..., "exit_status": N,
"error": null | {"type", "message", "file", "line"}, "run": ...}``.

The exit status is the script's own (an uncaught exception → 1, ``sys.exit(n)`` → n); a stop the doctor
asked for (``--max-steps``, ``--time-limit``) is a normal end (0). A script that failed before its first
optimizer step gets no diagnosis: there was nothing to watch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from . import diagnose_facts
from .facts import Facts
from .passive import PassiveWatcher
from .report import render
from .runner import run_script
from .summary import stop_reason


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepaudit doctor",
        description="Run an unchanged training script, watch every optimizer step, and say why it (doesn't) train.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (script output → stderr)")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=300,
        metavar="N",
        help="stop after N optimizer steps (default 300; 0 = no limit)",
    )
    parser.add_argument("--time-limit", type=float, default=None, metavar="S", help="stop after S seconds")
    parser.add_argument(
        "--run",
        default=None,
        metavar="DIR",
        help="run folder for the store (default ./stepaudit-runs/doctor-<timestamp>)",
    )
    parser.add_argument("--no-store", action="store_true", help="do not write a run folder")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="re-run the script with each top diagnosis's fix applied by hooks and say if it helped",
    )
    parser.add_argument(
        "--verify-steps",
        type=int,
        default=None,
        metavar="N",
        help="optimizer steps of each verification run (default: the original run's)",
    )
    parser.add_argument("script", help="the training script, run as __main__")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    return parser


class _Store:
    """Creates the run store at the first flush (the optimizers and model are known by then)."""

    def __init__(self, run: Path | None, script: str, argv: list[str], options: dict) -> None:
        self.run, self.script, self.argv, self.options = run, script, argv, options
        self.store = None
        self.watcher: PassiveWatcher | None = None
        self.seed = torch.initial_seed()

    def meta(self) -> dict:
        from ..meta import describe

        watcher = self.watcher
        base = {"mode": "passive", "script": self.script, "argv": self.argv, **self.options}
        roots = [r for r, _ in watcher._prefixed_roots()] if watcher else []
        if watcher and watcher.optimizers and roots:
            return {**describe(roots[0], watcher.optimizers[0].optimizer), **base, "seed": self.seed}
        from .. import __version__

        return {**base, "seed": self.seed, "versions": {"stepaudit": __version__, "torch": torch.__version__}}

    def open(self):
        if self.store is None and self.run is not None:
            from ..store import RunStore

            self.store = RunStore(
                self.run,
                self.meta(),
                name=self.run.name,
                keep_hint="give --run a new folder, or leave --run out, to keep them",
            )
        return self.store

    def __call__(self, records: list[dict]) -> None:
        store = self.open()
        if store is not None:
            for record in records:
                store.append(record)


_OWN_OPTIONS = ("--json", "--max-steps", "--time-limit", "--run", "--no-store", "--verify", "--verify-steps")


def _misplaced_option(script_args: list[str]) -> str | None:
    """The first doctor option written after the script name (it goes to the script, as documented)."""
    for arg in script_args:
        if arg == "--":
            return None
        name = arg.split("=", 1)[0]
        if name in _OWN_OPTIONS:
            return name
    return None


def _refusal(args: argparse.Namespace) -> str | None:
    """One line naming what is wrong with the command line and how to fix it, or None."""
    script = Path(args.script)
    if script.is_dir():
        return (
            f"{args.script} is a directory, not a script; pass the training script itself "
            f"(e.g. stepaudit doctor {Path(args.script) / 'train.py'})"
        )
    if not script.is_file():
        return f"no such script: {args.script}"
    if args.max_steps < 0 or (args.time_limit is not None and args.time_limit <= 0):
        return "--max-steps must be ≥ 0 and --time-limit > 0"
    if args.verify_steps is not None and args.verify_steps <= 0:
        return "--verify-steps must be > 0"
    if args.run and not args.no_store and Path(args.run).exists() and not Path(args.run).is_dir():
        return (
            f"--run {args.run} is an existing file; --run takes a folder for the run store "
            "(new or empty, e.g. --run runs/dbg), or use --no-store"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``stepaudit doctor``; returns the script's own exit status (2 for a bad command line)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    refusal = _refusal(args)
    if refusal:
        print(f"stepaudit doctor: {refusal}", file=sys.stderr)
        return 2
    misplaced = _misplaced_option(list(args.args))
    if misplaced:
        print(
            f"stepaudit doctor: {misplaced} after the script name is passed to the script; "
            "put doctor options before it",
            file=sys.stderr,
        )
    script = Path(args.script)
    run = None
    if not args.no_store:
        from ..store import new_run_dir

        run = Path(args.run) if args.run else new_run_dir(name="doctor-" + time.strftime("%Y%m%d-%H%M%S"))
    options = {"max_steps": args.max_steps or None, "time_limit": args.time_limit}
    sink = _Store(run, args.script, list(args.args), options)
    watcher = PassiveWatcher(
        max_steps=args.max_steps or None, time_limit=args.time_limit, flush=sink if run is not None else None
    )
    sink.watcher = watcher
    outcome = run_script(script, list(args.args), watcher, quiet_stdout=args.json)
    watcher.finish()
    observations = watcher.observations()
    facts = Facts(watcher.records, sink.meta(), observations)
    failed = outcome.exit_status != 0
    steps = observations.get("steps", watcher.step_count)  # a hand-written update counts its backward passes
    before_first_step = failed and steps == 0
    # Nothing was watched when the script failed before its first optimizer step: no diagnosis is invented.
    diagnoses = [] if before_first_step else diagnose_facts(facts)
    curves = None
    order_before_verify = None
    if args.verify and diagnoses:
        order_before_verify = [d["code"] for d in diagnoses]  # --json shows it: what verification reordered
        from .verify import from_facts, split_curves, verify

        original = from_facts(
            facts,
            steps,
            None if not failed else (outcome.error or "the script failed"),
            observations.get("elapsed_s") or 0.0,
        )
        # The same steps: a script that ended on its own ends there again; one the doctor stopped stops there.
        limit = args.verify_steps or ((args.max_steps or None) if outcome.stopped == "finished" else steps)
        diagnoses = verify(diagnoses, script, list(args.args), limit, args.time_limit, original, facts=facts)
        curves = split_curves(diagnoses)  # per-step losses of the original and each fixed run: the run store only
    result = {
        "diagnoses": diagnoses,
        "steps": steps,
        "script": args.script,
        "stopped": outcome.stopped,
        "exit_status": outcome.exit_status,
        "error": outcome.failure,
        "run": None,
    }
    if order_before_verify is not None:
        result["order_before_verify"] = order_before_verify
    if outcome.failure is not None:
        result["reason"] = stop_reason(
            outcome.failure, outcome.error or "the script failed"
        )  # for the readable report only
    saved = _save(sink, observations, outcome, diagnoses, curves)
    result["run"] = str(run) if run is not None and saved else None
    if outcome.error:
        heading = "raised after the doctor stopped it (a normal end)" if outcome.after_stop else "failed"
        print(f"stepaudit doctor: the script {heading}:\n{outcome.error}", file=sys.stderr)
    if before_first_step and args.json:  # the readable report says it on stdout
        print(f"stepaudit doctor: stopped before the first optimizer step: {result['reason']}", file=sys.stderr)
    if args.json:
        print(json.dumps(_jsonable({k: v for k, v in result.items() if k != "reason"})))
    else:
        print(render(result, outcome.error, result["run"], facts))
    sys.stdout.flush()
    return outcome.exit_status


def _save(sink: _Store, observations: dict, outcome, diagnoses: list[dict], curves: dict | None = None) -> bool:
    """Write the observations, outcome, diagnoses and verification loss curves into the metadata; False if it failed."""
    try:
        store = sink.open()
        if store is None:
            return False
        store.update_meta(
            observations=_jsonable(observations),
            stopped=outcome.stopped,
            error=outcome.error,
            exit_status=outcome.exit_status,
            failure=_jsonable(outcome.failure),
            diagnoses=_jsonable(diagnoses),
            **({"verification_losses": _jsonable(curves)} if curves else {}),
        )
        store.close()
        return True
    except Exception as error:  # the diagnosis is still printed
        print(f"stepaudit doctor: could not write the run store: {error}", file=sys.stderr)
        return False


def _jsonable(value):
    """NaN/inf become None so the output is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
