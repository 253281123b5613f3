"""Lanczos stopping rules on real tracking runs: how many HVPs each costs and how far off λ_max it lands.

Evidence for the ``sharpness`` probe's default ``stop="residual"`` (stop once ‖Hv − λv‖ ≤ tol·λ) over
the opt-in ``stop="eigenvalue"`` (stop once an estimated eigenvalue error ≤ tol·λ). For each workload
the same training run is audited twice, once per rule, with ``sharpness`` every ``--every`` steps
(the first tracked step starts cold, the rest warm-start from the previous top eigenvector, as in
use). Auditing never changes training, so both runs pass through the same weights; before each
tracked step the weights and batch are kept, and afterwards every tracked Hessian gets a tightly
converged float64 reference (Lanczos to a relative residual ≤ 1e-9), against which each rule's
λ_max is scored.

Workloads: the digits MLP and CNN (``stepaudit.workloads``, SGD with momentum on mini-batches), the
edge-of-stability run of ``stepaudit demo --eos`` (full-batch GD, lr 0.4), and optionally the LM.

    .venv/bin/python bench/stopping.py [--workloads mlp cnn eos] [--steps 200] [--every 10] [--tol 1e-3]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sharpness import reference  # noqa: E402 - the float64 reference λ_max of bench/sharpness.py

from stepaudit import Audit, eos  # noqa: E402
from stepaudit.probes import curvature  # noqa: E402
from stepaudit.workloads import WORKLOADS  # noqa: E402

STOPS = ("residual", "eigenvalue")


def setup(name: str):
    """(model, loss_fn, optimizer factory, batch for step i) for a workload."""
    if name == "eos":
        x, y = eos.digits_subset(1000)
        return eos.tanh_mlp(64, 0), eos.square_loss, lambda p: torch.optim.SGD(p, lr=0.4), lambda i: (x, y)
    workload = WORKLOADS[name]()
    stream = workload.batches()
    cache: list = []

    def batch(i: int):
        while len(cache) <= i:
            cache.append(next(stream))
        return cache[i]

    return workload.model, workload.loss_fn, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), batch


def tracked_run(
    model, loss_fn, make_opt, batch, steps: int, every: int, stop: str, tol: float, keep: list | None
) -> list[dict]:
    """Train ``steps`` steps with sharpness every ``every``; return the tracked records.
    ``keep`` (if given) collects (model copy, batch) before each tracked step."""
    model = copy.deepcopy(model)
    opt = make_opt(model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        audit = Audit(model, opt, loss_fn, run=Path(tmp) / stop, every=every, probes={"sharpness": every})
        curvature.configure(audit, stop=stop, tol=tol)
        for i in range(steps):
            if keep is not None and i % every == 0:
                keep.append((copy.deepcopy(model), batch(i)))
            audit.step(batch(i))
        audit.close()
    return [r for r in audit.records if "sharpness" in r]


def bench(name: str, steps: int, every: int, tol: float) -> dict:
    model, loss_fn, make_opt, batch = setup(name)
    kept: list = []
    runs = {
        stop: tracked_run(model, loss_fn, make_opt, batch, steps, every, stop, tol, kept if stop == STOPS[0] else None)
        for stop in STOPS
    }
    # Same trajectory in both runs (auditing never changes training): same losses before every tracked step.
    assert [r["loss_before"] for r in runs[STOPS[0]]] == [r["loss_before"] for r in runs[STOPS[1]]]
    references = [reference(m, loss_fn, b, train=True)[0] for m, b in kept]
    out = {"tracked": len(references)}
    for stop, records in runs.items():
        errors = [abs(r["sharpness"] - ref) / abs(ref) for r, ref in zip(records, references)]
        hvps = [r["sharpness_hvps"] for r in records]
        out[stop] = {
            "cold_hvps": hvps[0],
            "warm_hvps_median": statistics.median(hvps[1:]) if len(hvps) > 1 else None,
            "hvps_total": sum(hvps),
            "error_max": max(errors),
            "error_median": statistics.median(errors),
            "over_tol": sum(e > tol for e in errors),
        }
    return out


def markdown(results: dict, tol: float) -> str:
    lines = [
        "| workload | tracked steps | stop | HVPs cold / warm (median) / total | relative error: median, max | "
        f"steps with error > {tol:g} |",
        "|---|---:|---|---|---|---:|",
    ]
    for name, r in results.items():
        for stop in STOPS:
            s = r[stop]
            lines.append(
                f"| {name} | {r['tracked']} | {stop} | {s['cold_hvps']} / {s['warm_hvps_median']} / "
                f"{s['hvps_total']} | {s['error_median']:.1e}, {s['error_max']:.1e} | {s['over_tol']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn", "eos"], choices=sorted([*WORKLOADS, "eos"]))
    parser.add_argument("--steps", type=int, default=200, help="training steps (eos: 5× as many)")
    parser.add_argument("--every", type=int, default=10, help="track sharpness every N steps (eos: 5× as many)")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.workloads:
        scale = 5 if name == "eos" else 1  # full-batch GD moves slowly: a longer run, tracked less often
        results[name] = bench(name, args.steps * scale, args.every * scale, args.tol)
        print(name, results[name], flush=True)
    print(
        f"\ntorch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"tol={args.tol:g}"
    )
    print(markdown(results, args.tol))
    return 0


if __name__ == "__main__":
    sys.exit(main())
