"""λ_max side by side: stepaudit's sharpness probe vs PyHessian, plus HVP and tracking costs.

One process, per workload (digits MLP, CNN with BatchNorm, tiny transformer LM; ``stepaudit.workloads``),
at the weights reached after a few SGD steps, on one training batch:

1. λ_max by stepaudit's ``sharpness`` probe from a cold start (default settings: Lanczos until the
   residual ‖Hv − λv‖ ≤ 1e-3·λ; and the opt-in ``stop="eigenvalue"``) and by PyHessian
   (``hessian(model, criterion, data=...)`` then ``.eigenvalues(top_n=1)``, its defaults: power
   iteration, maxIter=100, tol=1e-3 on the change of the estimate; and with tol=1e-4). Wall time (operator construction included) and relative error against a tightly
   converged float64 reference (Lanczos to residual ≤ 1e-9·λ). PyHessian silently switches the model
   to eval mode, so on the CNN it measures the eval-mode Hessian (running BatchNorm statistics), not
   the one of the training step: its error is given against both references.
2. One HVP (the method stepaudit picked) in units of one plain training step (zero_grad, forward,
   backward, SGD step), interleaved medians.
3. Tracking cost: plain training vs Audit(every=10) vs Audit(every=10, probes={"sharpness": 10}),
   rotating order, medians; the sharpness increment relative to plain training.

    bench/.venv-anchors/bin/python bench/sharpness.py [--workloads mlp cnn lm] [--reps 5] [--threads 1]
                                                      [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from stepaudit import Audit  # noqa: E402
from stepaudit.linalg import lanczos, make_hvp, second_order_kernels  # noqa: E402
from stepaudit.probes import curvature, register  # noqa: E402
from stepaudit.workloads import WORKLOADS  # noqa: E402

LAST: dict = {}


@register("_bench_sharpness")
def _bench_probe(ctx):
    """The real sharpness probe from a cold start, timed; keeps the operator for the HVP timing."""
    curvature.state(ctx).vectors.pop("sharpness:batch", None)
    curvature.state(ctx).vectors.pop("sharpness:reference", None)
    start = time.perf_counter()
    fields = curvature.sharpness_probe(ctx)
    LAST.update(fields, seconds=time.perf_counter() - start, operator=curvature.hessian(ctx))
    return {}


def split(name: str, batch):
    """(inputs, targets, criterion) in PyHessian's calling convention, for the workload's loss."""
    if name == "lm":
        return (
            batch[:, :-1],
            batch[:, 1:],
            lambda out, t: F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1)),
        )
    return batch[0], batch[1], F.cross_entropy


def reference(model, loss_fn, batch, train: bool) -> tuple[float, float]:
    """Tightly converged λ_max in float64 (train- or eval-mode Hessian) and its relative residual."""
    twin = copy.deepcopy(model).double().train(train)
    names = [n for n, _ in twin.named_parameters()]
    buffers = dict(twin.named_buffers())
    data = (
        tuple(t.double() if t.is_floating_point() else t for t in batch) if isinstance(batch, (tuple, list)) else batch
    )

    def loss(params):
        return loss_fn(_Wrap(twin, {**dict(zip(names, params)), **{k: b.clone() for k, b in buffers.items()}}), data)

    params = tuple(p.detach() for p in twin.parameters())
    hvp = make_hvp(loss, params, method="reverse")
    result = lanczos(hvp, hvp.dim, iterations=150, tol=1e-9, generator=torch.Generator().manual_seed(1))
    return result.eigenvalue, result.residual / abs(result.eigenvalue)


class _Wrap(torch.nn.Module):
    """Calls ``module`` with substituted parameters/buffers, so a ``loss_fn(model, batch)`` can be reused."""

    def __init__(self, module, state):
        super().__init__()
        self.module, self.state = module, state

    def forward(self, *args):
        return functional_call(self.module, self.state, args)


def pyhessian_works(model, name, batch) -> str | None:
    """None if PyHessian runs as shipped; else its error (fused attention has no double-backward),
    after which it is run on the math SDPA backend, the workaround stepaudit applies itself."""
    try:
        pyhessian_run(model, name, batch, seed=0, max_iter=2)
        return None
    except RuntimeError as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"


def pyhessian_run(model, name, batch, seed: int, tol: float = 1e-3, max_iter: int = 100) -> dict:
    """PyHessian's top eigenvalue on a copy of the model (it leaves create_graph grads behind);
    defaults as shipped: ``eigenvalues(maxIter=100, tol=1e-3, top_n=1)``."""
    import pyhessian

    hessian_module = sys.modules["pyhessian.hessian"]
    calls = {"n": 0}
    original = hessian_module.hessian_vector_product

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    hessian_module.hessian_vector_product = counted
    try:
        inputs, targets, criterion = split(name, batch)
        victim = copy.deepcopy(model)
        torch.manual_seed(seed)
        start = time.perf_counter()
        values, _ = pyhessian.hessian(victim, criterion, data=(inputs, targets), cuda=False).eigenvalues(
            maxIter=max_iter, tol=tol, top_n=1
        )
        seconds = time.perf_counter() - start
    finally:
        hessian_module.hessian_vector_product = original
    return {"value": float(values[0]), "seconds": seconds, "hvps": calls["n"]}


def side_by_side(model, loss_fn, name, batch, reps: int, has_modes: bool) -> tuple[dict, object, str | None]:
    """Interleaved repetitions: stepaudit's probe from a cold start (default stop="residual", and the
    opt-in stop="eigenvalue"; same weights every step via SGD lr=0), PyHessian's default run, and
    PyHessian with tol=1e-4 (what it needs to get near 1e-3 error). On models whose train and eval
    modes differ, also stepaudit's default on the eval-mode Hessian of the batch (``sharpness_on=batch``),
    the operator PyHessian computes: like against like."""
    failure = pyhessian_works(model, name, batch)
    kernels = second_order_kernels if failure else contextlib.nullcontext
    arms = {"stepaudit": [], "stepaudit_eigenvalue_stop": [], "pyhessian": [], "pyhessian_tol1e-4": []}
    configs = [("stepaudit", "residual", "batch"), ("stepaudit_eigenvalue_stop", "eigenvalue", "batch")]
    if has_modes:
        arms["stepaudit_eval_hessian"] = []
        configs.append(("stepaudit_eval_hessian", "residual", batch))
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        audits = {}
        for arm, stop, on in configs:
            victim = copy.deepcopy(model)
            for module in victim.modules():  # the audited (train-mode) steps must not move the running
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):  # statistics the eval-mode
                    module.momentum = 0.0  # Hessian uses: the reference was computed with these
            audit = stack.enter_context(
                Audit(
                    victim,
                    torch.optim.SGD(victim.parameters(), lr=0.0),
                    loss_fn,
                    run=Path(tmp) / arm,
                    probes={"_bench_sharpness": 1},
                )
            )
            curvature.configure(audit, stop=stop, sharpness_on=on)
            LAST.clear()
            audit.step(batch)  # the first audited step also measures which HVP method is faster
            audits[arm] = audit
            if arm == "stepaudit":
                first = dict(LAST)
        for rep in range(reps):
            for arm, audit in audits.items():
                LAST.clear()
                audit.step(batch)
                arms[arm].append(
                    {
                        "value": LAST["sharpness"],
                        "seconds": LAST["seconds"],
                        "hvps": LAST["sharpness_hvps"],
                        "residual": LAST["sharpness_residual"],
                    }
                )
            with kernels():
                arms["pyhessian"].append(pyhessian_run(model, name, batch, seed=rep))
                arms["pyhessian_tol1e-4"].append(pyhessian_run(model, name, batch, seed=rep, tol=1e-4))
    arms["first"] = first
    return arms, first["operator"], failure


def train_step_seconds(model, loss_fn, batch) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    start = time.perf_counter()
    opt.zero_grad()
    loss_fn(model, batch).backward()
    opt.step()
    return time.perf_counter() - start


def hvp_cost(model, loss_fn, batch, operator, reps: int = 15) -> float:
    """Median HVP seconds / median training-step seconds, interleaved."""
    twin = copy.deepcopy(model)
    v = torch.randn(operator.dim, generator=torch.Generator().manual_seed(3))
    hvp_s, step_s = [], []
    for _ in range(2):
        operator(v), train_step_seconds(twin, loss_fn, batch)
    for _ in range(reps):
        start = time.perf_counter()
        operator(v)
        hvp_s.append(time.perf_counter() - start)
        step_s.append(train_step_seconds(twin, loss_fn, batch))
    return statistics.median(hvp_s) / statistics.median(step_s)


def tracking_cost(model, loss_fn, batches, steps: int, repeats: int) -> dict:
    """Seconds for ``steps`` SGD steps: plain, Audit(every=10), Audit(every=10) + sharpness every 10."""
    arms = {"plain": None, "audit": {}, "sharpness": {"sharpness": 10}}
    times = {arm: [] for arm in arms}
    hvps: list[int] = []
    for rep in range(repeats):
        order = list(arms)[rep % 3 :] + list(arms)[: rep % 3]
        for arm in order:
            m = copy.deepcopy(model)
            opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
            with tempfile.TemporaryDirectory() as tmp:
                audit = (
                    None
                    if arms[arm] is None
                    else Audit(m, opt, loss_fn, run=Path(tmp) / "r", every=10, probes=arms[arm])
                )
                start = time.perf_counter()
                for batch in batches[:steps]:
                    if audit is None:
                        opt.zero_grad()
                        loss_fn(m, batch).backward()
                        opt.step()
                    else:
                        audit.step(batch)
                times[arm].append(time.perf_counter() - start)
                if audit is not None:
                    audit.close()
                    if arm == "sharpness":
                        hvps += [r["sharpness_hvps"] for r in audit.records[1:] if "sharpness_hvps" in r]
    med = {arm: statistics.median(t) for arm, t in times.items()}
    tracked = len(range(0, steps, 10))
    return {
        "steps": steps,
        "seconds": med,
        "audit_overhead": med["audit"] / med["plain"] - 1,
        "sharpness_increment": (med["sharpness"] - med["audit"]) / med["plain"],
        "total_overhead": med["sharpness"] / med["plain"] - 1,
        "per_tracked_step_in_train_steps": (med["sharpness"] - med["audit"]) / tracked / (med["plain"] / steps),
        "warm_hvps_median": statistics.median(hvps) if hvps else None,
    }


def bench(name: str, reps: int, warmup: int, track_steps: int, track_repeats: int) -> dict:
    workload = WORKLOADS[name]()
    model, loss_fn = workload.model, workload.loss_fn
    stream = workload.batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(warmup):  # move off the initialisation
        opt.zero_grad()
        loss_fn(model, next(stream)).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    batch = next(stream)
    inputs, targets, criterion = split(name, batch)
    assert torch.allclose(criterion(model(inputs), targets), loss_fn(model, batch))
    has_modes = any(isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Dropout)) for m in model.modules())
    ref_train, ref_train_res = reference(model, loss_fn, batch, train=True)
    ref_eval, ref_eval_res = reference(model, loss_fn, batch, train=False) if has_modes else (ref_train, ref_train_res)
    arms, operator, failure = side_by_side(model, loss_fn, name, batch, reps, has_modes)
    model.train()
    rel = lambda value, ref: abs(value - ref) / abs(ref)  # noqa: E731
    batches = [next(stream) for _ in range(track_steps)]

    def summary(runs, ref):
        return {
            "seconds": statistics.median(r["seconds"] for r in runs),
            "hvps": statistics.median(r["hvps"] for r in runs),
            "rel_error_max": max(rel(r["value"], ref) for r in runs),
            "rel_error_vs_train_hessian_max": max(rel(r["value"], ref_train) for r in runs),
        }

    return {
        "workload": workload.description,
        "n_params": sum(p.numel() for p in model.parameters()),
        "reference_train": ref_train,
        "reference_eval": ref_eval,
        "reference_rel_residual": max(ref_train_res, ref_eval_res),
        "stepaudit": {
            "method": arms["first"]["hvp_method"],
            "first_seconds": arms["first"]["seconds"],
            **summary(arms["stepaudit"], ref_train),
        },
        "stepaudit_eigenvalue_stop": summary(arms["stepaudit_eigenvalue_stop"], ref_train),
        "stepaudit_eval_hessian": summary(arms["stepaudit_eval_hessian"], ref_eval) if has_modes else None,
        # PyHessian switches the model to eval mode: its own target is the eval-mode Hessian.
        "pyhessian": {"out_of_the_box": failure or "ok", **summary(arms["pyhessian"], ref_eval)},
        "pyhessian_tol1e-4": summary(arms["pyhessian_tol1e-4"], ref_eval),
        "hvp_in_train_steps": hvp_cost(model, loss_fn, batch, operator),
        "tracking": tracking_cost(model, loss_fn, batches, track_steps, track_repeats),
    }


def markdown(results: dict) -> str:
    cell = lambda a: f"{a['seconds'] * 1e3:.0f} ms, {a['hvps']:.0f}, {a['rel_error_max']:.1e}"  # noqa: E731
    lines = [
        '| workload | params | λ_max (train-mode H) | stepaudit (default) | stepaudit, stop="eigenvalue" | '
        "stepaudit (default), eval-mode H | PyHessian default | PyHessian tol=1e-4 |",
        "|---|---:|---:|---|---|---|---|---|",
    ]
    for name, r in results.items():
        p = r["pyhessian"]
        note = " ¹" if p["out_of_the_box"] != "ok" else ""
        lines.append(
            f"| {name} | {r['n_params']:,} | {r['reference_train']:.4g} | {cell(r['stepaudit'])} | "
            f"{cell(r['stepaudit_eigenvalue_stop'])} | "
            f"{cell(r['stepaudit_eval_hessian']) if r.get('stepaudit_eval_hessian') else '— (same H)'} | "
            f"{cell(p)} (train H: {p['rel_error_vs_train_hessian_max']:.1e}){note} | "
            f"{cell(r['pyhessian_tol1e-4'])} |"
        )
    lines.append(
        "\nEach cell: median wall time (operator construction included), median HVPs, largest relative "
        "error over the repetitions. stepaudit's error is against the train-mode Hessian of the step "
        "(the eval-mode column: against the eval-mode one); PyHessian's against the eval-mode Hessian it "
        "computes (it calls model.eval()), and in brackets against the train-mode one."
    )
    if any(r["pyhessian"]["out_of_the_box"] != "ok" for r in results.values()):
        failure = next(
            r["pyhessian"]["out_of_the_box"] for r in results.values() if r["pyhessian"]["out_of_the_box"] != "ok"
        )
        lines.append(f"\n¹ PyHessian as shipped fails ({failure}); timed with the math SDPA backend forced.")
    lines += [
        "",
        "| workload | HVP method | one HVP (training steps) | warm HVPs per tracked step | one tracked step "
        "(training steps) | sharpness every 10 steps: added to plain training | (Audit every 10 alone) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        t = r["tracking"]
        lines.append(
            f"| {name} | {r['stepaudit']['method']} | {r['hvp_in_train_steps']:.2f} | {t['warm_hvps_median']} | "
            f"{t['per_tracked_step_in_train_steps']:.1f} | +{t['sharpness_increment']:.0%} | "
            f"+{t['audit_overhead']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn", "lm"], choices=sorted(WORKLOADS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=20, help="SGD steps before measuring (off the init)")
    parser.add_argument("--track-steps", type=int, default=200)
    parser.add_argument("--track-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {}
    for name in args.workloads:
        results[name] = bench(name, args.reps, args.warmup, args.track_steps, args.track_repeats)
        print(json.dumps({name: results[name]}, indent=1, default=float), flush=True)
    print()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}")
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
