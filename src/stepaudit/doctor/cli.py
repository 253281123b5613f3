"""``stepaudit doctor [--json] [--max-steps N] [--time-limit S] [--run DIR] script.py [args…]``.

Runs the unchanged script in-process under passive capture, writes the run store, and prints the
diagnoses: a readable report, or with ``--json`` one JSON object on stdout (the script's own output
then goes to stderr): ``{"diagnoses": [...], "steps": N, "script": ..., "stopped": ...}``.
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepaudit doctor",
        description="Run an unchanged training script, watch every optimizer step, and say why it (doesn't) train.")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (script output → stderr)")
    parser.add_argument("--max-steps", type=int, default=300, metavar="N",
                        help="stop after N optimizer steps (default 300; 0 = no limit)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S", help="stop after S seconds")
    parser.add_argument("--run", default=None, metavar="DIR",
                        help="run folder for the store (default ./stepaudit-runs/doctor-<timestamp>)")
    parser.add_argument("--no-store", action="store_true", help="do not write a run folder")
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

            self.store = RunStore(self.run, self.meta(), name=self.run.name)
        return self.store

    def __call__(self, records: list[dict]) -> None:
        store = self.open()
        if store is not None:
            for record in records:
                store.append(record)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``stepaudit doctor``; returns the exit status (0 once a diagnosis is printed)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    script = Path(args.script)
    if not script.is_file():
        print(f"stepaudit doctor: no such script: {args.script}", file=sys.stderr)
        return 2
    if args.max_steps < 0 or (args.time_limit is not None and args.time_limit <= 0):
        print("stepaudit doctor: --max-steps must be ≥ 0 and --time-limit > 0", file=sys.stderr)
        return 2
    run = None
    if not args.no_store:
        from ..store import new_run_dir

        run = Path(args.run) if args.run else new_run_dir(name="doctor-" + time.strftime("%Y%m%d-%H%M%S"))
    options = {"max_steps": args.max_steps or None, "time_limit": args.time_limit}
    sink = _Store(run, args.script, list(args.args), options)
    watcher = PassiveWatcher(max_steps=args.max_steps or None, time_limit=args.time_limit,
                             flush=sink if run is not None else None)
    sink.watcher = watcher
    outcome = run_script(script, list(args.args), watcher, quiet_stdout=args.json)
    watcher.finish()
    observations = watcher.observations()
    facts = Facts(watcher.records, sink.meta(), observations)
    diagnoses = diagnose_facts(facts)
    result = {"diagnoses": diagnoses, "steps": watcher.step_count, "script": args.script, "stopped": outcome.stopped}
    _save(sink, observations, outcome, diagnoses)
    if outcome.error:
        print(f"stepaudit doctor: the script failed:\n{outcome.error}", file=sys.stderr)
    if args.json:
        print(json.dumps(_jsonable(result)))
    else:
        print(render(result, outcome.error, str(run) if run else None, facts))
    sys.stdout.flush()
    return 0


def _save(sink: _Store, observations: dict, outcome, diagnoses: list[dict]) -> None:
    try:
        store = sink.open()
        if store is None:
            return
        store.update_meta(observations=_jsonable(observations), stopped=outcome.stopped, error=outcome.error,
                          diagnoses=_jsonable(diagnoses))
        store.close()
    except Exception as error:  # the diagnosis is still printed
        print(f"stepaudit doctor: could not write the run store: {error}", file=sys.stderr)


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
