"""Edge of stability: full-batch gradient descent sharpens until λ_max ≈ 2/η, then hovers there.

Cohen et al. (ICLR 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of
Stability"): under full-batch GD the Hessian's top eigenvalue first rises (progressive sharpening)
and then settles at the stability threshold 2/η, while the loss keeps falling, non-monotonically.
This reproduces it on a digits subset with a small tanh MLP and the square loss, one audited run
folder per learning rate (sharpness every few steps, warm-started Lanczos), a printed table and
``eos.json`` with the curves.

    stepaudit demo --eos [--lrs 0.25 0.4 0.6] [--steps 1000] [--every 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .audit import Audit
from .store import new_run_dir

SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class EosResult:
    """One learning rate's run: the sharpness curve against 2/η, and what the loss did."""

    lr: float
    threshold: float  # 2/η
    run: str
    steps: list[int] = field(default_factory=list)  # steps where sharpness was measured
    sharpness: list[float] = field(default_factory=list)
    hvps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # loss_before at every step
    increases: int = 0  # audited steps whose verdict was "increase"
    seconds: float = 0.0

    def reached(self, fraction: float = 0.9) -> int | None:
        """First step where sharpness ≥ fraction·2/η (None if never)."""
        return next((s for s, v in zip(self.steps, self.sharpness) if v >= fraction * self.threshold), None)

    def settled(self) -> float:
        """Median sharpness after it first reached 0.9·2/η (over the last half of those points)."""
        start = self.reached()
        if start is None:
            return math.nan
        after = [v for s, v in zip(self.steps, self.sharpness) if s >= start]
        return statistics.median(after[len(after) // 2 :])


def square_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    """½‖f(x) − onehot(y)‖² averaged over examples (the square loss of Cohen et al. 2021)."""
    x, targets = batch
    return 0.5 * (model(x) - targets).pow(2).sum(dim=1).mean()


def digits_subset(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` standardised training digits and their one-hot targets."""
    from .workloads import load_digits

    x, y, _, _ = load_digits(seed=seed)
    return x[:n], F.one_hot(y[:n], 10).to(x.dtype)


def tanh_mlp(width: int, seed: int) -> nn.Module:
    """64-width-width-10 MLP with tanh, deterministically initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))


def run_one(lr: float, data: tuple, *, steps: int, every: int, width: int, seed: int, out: Path) -> EosResult:
    """Full-batch GD at learning rate ``lr``, audited, with sharpness tracked every ``every`` steps."""
    model = tanh_mlp(width, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    run = out / f"lr{lr:g}"
    result = EosResult(lr=lr, threshold=2.0 / lr, run=str(run))
    start = time.perf_counter()
    with Audit(model, optimizer, square_loss, run=run, probes={"sharpness": every}, name=f"eos lr={lr:g}") as audit:
        for _ in range(steps):
            audit.step(data)
            record = audit.last
            result.losses.append(record.get("loss_before", math.nan))
            result.increases += record.get("verdict") == "increase"
            if "sharpness" in record:
                result.steps.append(record["step"])
                result.sharpness.append(record["sharpness"])
                result.hvps.append(record.get("sharpness_hvps", 0))
            if not math.isfinite(result.losses[-1]):
                break  # diverged: nothing more to learn from this learning rate
    result.seconds = time.perf_counter() - start
    return result


def sparkline(values: Sequence[float], threshold: float, width: int = 40) -> str:
    """Sharpness as a bar line on the scale [0, 1.25·2/η]; the ▇ level is 2/η."""
    if not values:
        return ""
    stride = max(1, math.ceil(len(values) / width))
    picked = [max(values[i : i + stride]) for i in range(0, len(values), stride)]
    top = 1.25 * threshold
    return "".join(
        SPARK[min(len(SPARK) - 1, max(0, int(v / top * len(SPARK))))] if math.isfinite(v) else "×" for v in picked
    )


def table(results: Sequence[EosResult]) -> str:
    """The headline: sharpness rises to 2/η and stays there, while the loss keeps falling."""
    head = (
        f"{'lr':>6} {'2/lr':>6} {'λ₀':>6} {'λ_max':>6} {'reach':>6} {'settled':>8} {'/(2/lr)':>8} "
        f"{'loss₀':>7} {'loss_end':>8} {'up':>5} {'HVPs':>5}  sharpness (▇ = 2/lr)"
    )
    rows = [head]
    for r in results:
        reached = r.reached()
        settled = r.settled()
        hvps = statistics.median(r.hvps[1:]) if len(r.hvps) > 1 else math.nan
        rows.append(
            f"{r.lr:>6g} {r.threshold:>6.2f} {r.sharpness[0] if r.sharpness else math.nan:>6.2f} "
            f"{max(r.sharpness, default=math.nan):>6.2f} {reached if reached is not None else '—':>6} "
            f"{settled:>8.2f} {settled / r.threshold:>8.2f} {r.losses[0]:>7.3f} {r.losses[-1]:>8.4f} "
            f"{r.increases:>5} {hvps:>5.0f}  {sparkline(r.sharpness, r.threshold)}"
        )
    return "\n".join(rows)


def experiment(
    lrs: Sequence[float] = (0.25, 0.4, 0.6),
    *,
    steps: int = 1000,
    every: int = 10,
    n: int = 1000,
    width: int = 64,
    seed: int = 0,
    out: str | Path | None = None,
    threads: int | None = 1,
    verbose: bool = True,
) -> tuple[list[EosResult], Path]:
    """Run every learning rate; write run folders and ``eos.json`` under ``out``; return the results."""
    out = Path(out) if out is not None else new_run_dir(name="eos-" + time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        data = digits_subset(n, seed)
        results = []
        for lr in lrs:
            results.append(run_one(lr, data, steps=steps, every=every, width=width, seed=seed, out=out))
            if verbose:
                r = results[-1]
                print(f"  lr={lr:g}: {len(r.losses)} steps in {r.seconds:.1f} s -> {r.run}", flush=True)
    finally:
        torch.set_num_threads(previous_threads)
    config = {
        "lrs": list(lrs),
        "steps": steps,
        "every": every,
        "n": n,
        "width": width,
        "seed": seed,
        "loss": "0.5*||f(x)-onehot(y)||^2, mean over examples",
        "model": f"tanh MLP 64-{width}-{width}-10",
    }
    payload = {
        "config": config,
        "results": [{**asdict(r), "reached": r.reached(), "settled": r.settled()} for r in results],
    }
    (out / "eos.json").write_text(json.dumps(payload, indent=1, default=float))
    return results, out


def main(argv: list[str] | None = None) -> int:
    """``stepaudit demo --eos``: print the edge-of-stability table and where the runs were written."""
    parser = argparse.ArgumentParser(prog="stepaudit demo --eos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--eos", action="store_true", help=argparse.SUPPRESS)  # tolerated if passed through
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=[0.25, 0.4, 0.6], help="learning rates (default 0.25 0.4 0.6)"
    )
    parser.add_argument("--steps", type=int, default=1000, help="full-batch GD steps per learning rate (1000)")
    parser.add_argument("--every", type=int, default=10, help="measure sharpness every N steps (10)")
    parser.add_argument("--n", type=int, default=1000, help="digits in the training subset (1000)")
    parser.add_argument("--width", type=int, default=64, help="hidden width of the tanh MLP (64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: these matrices are small)")
    parser.add_argument(
        "--out", default=None, help="folder for the run folders and eos.json (default: new under --runs)"
    )
    parser.add_argument(
        "--runs",
        default="stepaudit-runs",
        help="where the new folder goes when --out is not given (default ./stepaudit-runs)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the table")
    args = parser.parse_args(argv)
    if min(args.lrs) <= 0 or args.steps < 1 or args.every < 1 or not 10 <= args.n <= 1347 or args.width < 1:
        parser.error("need lrs > 0, steps ≥ 1, every ≥ 1, 10 ≤ n ≤ 1347 (digits in the training split), width ≥ 1")
    print(
        f"Full-batch GD on {args.n} digits, tanh MLP 64-{args.width}-{args.width}-10, square loss; "
        f"λ_max every {args.every} steps (warm-started Lanczos)"
    )
    out = args.out if args.out is not None else new_run_dir(args.runs, "eos-" + time.strftime("%Y%m%d-%H%M%S"))
    results, out = experiment(
        args.lrs,
        steps=args.steps,
        every=args.every,
        n=args.n,
        width=args.width,
        seed=args.seed,
        out=out,
        threads=args.threads,
        verbose=not args.quiet,
    )
    print()
    print(table(results))
    print()
    print(
        "λ₀: sharpness at init; reach: first step with λ ≥ 0.9·2/lr; settled: median λ after that (last half);\n"
        "up: steps whose loss went up (the loss falls non-monotonically at the edge of stability);\n"
        "HVPs: median Hessian-vector products per tracked step (warm start)."
    )
    print(f"runs and eos.json in {out}")
    return 0
