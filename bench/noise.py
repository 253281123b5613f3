"""Cost of the gradient-noise statistics (tr Σ, ‖G‖², B_simple) against BackPACK and Cockpit, side by side.

Every method does one full training step (forward, backward, SGD step) on a digits batch and produces
the same two statistics, tr Σ̂ = (Σ‖g_i‖² − B‖ḡ‖²)/(B−1) and ‖G‖²̂ = ‖ḡ‖² − tr Σ̂/B:

  plain step                 no statistics (the unit of cost)
  stepaudit per-sample       plain step + the noise probe's computation (+ 8-group jackknife standard
                             errors): (training pass) layer identities read off the training backward
                             itself, what Audit(noise) does on a due step, like a BackPACK extension
                             (", no stderr": groups=1, per-example norms only, BatchL2Grad's statistics);
                             (hooks) the same from one extra forward/backward at the old weights;
                             (vmap) chunked vmap(grad), reduced chunk by chunk
  stepaudit micro-batch      plain step + 8 micro-batch gradients (the probe's fallback for BatchNorm in train mode)
  Audit() / Audit(noise)     the whole audited step without / with probes={"noise": 1}
  BackPACK BatchGrad         backward with BatchGrad (all B per-example gradients at once), statistics from them
  BackPACK BatchL2Grad       backward with BatchL2Grad (per-example squared norms only) + .grad
  BackPACK Variance          backward with Variance (per-coordinate variance) + .grad
  Cockpit NormTest           Cockpit's norm test (BatchGrad + a BatchL2 transform), θ² B ‖ḡ‖² = tr Σ̂

Times: median over interleaved repetitions in one process (each method on its own model copy).
Memory: each method again in a fresh subprocess, after the model is built, the data loaded and four
plain training steps taken: the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) and the
number is the peak resident set size (VmHWM) during four steps of the method minus the resident set
size before them. It counts everything torch allocates (tracemalloc would miss torch's C++
allocations); it includes the model copy and graph the method builds. Run it with the anchors venv:

    bash bench/anchors.sh && bench/.venv-anchors/bin/python bench/noise.py [--reps 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch.func import functional_call

from stepaudit.noise import batch_len, estimate, micro_batch_moments, per_sample_moments
from stepaudit.persample import capture, captured_moments, layer_moments, layer_owners
from stepaudit.workloads import digits_cnn, digits_mlp

WORKLOADS = {
    "mlp": ("digits MLP 64-256-256-10, B=128", lambda: digits_mlp(128), "train"),
    "cnn-eval": ("digits CNN, BatchNorm in eval mode, B=128", lambda: digits_cnn(128), "eval"),
    "cnn-train": ("digits CNN, BatchNorm in train mode, B=128", lambda: digits_cnn(128), "train"),
    "mlp-1024": ("digits MLP 64-256-256-10, B=1024", lambda: digits_mlp(1024), "train"),
}
METHODS = [
    "plain step",
    "stepaudit per-sample (training pass)",
    "stepaudit per-sample (training pass, no stderr)",
    "stepaudit per-sample (hooks)",
    "stepaudit per-sample (vmap)",
    "stepaudit micro-batch",
    "Audit()",
    "Audit(noise)",
    "BackPACK BatchGrad",
    "BackPACK BatchL2Grad",
    "BackPACK Variance",
    "Cockpit NormTest",
]


def applicable(workload: str, method: str) -> bool:
    """BatchL2Grad/Variance refuse BatchNorm in train mode; per-example gradients are undefined there."""
    if workload == "cnn-train":
        return not method.startswith("stepaudit per-sample") and method not in (
            "BackPACK BatchL2Grad",
            "BackPACK Variance",
        )
    return method != "stepaudit micro-batch"


def from_norms(size: int, sum_sq: float, mean_sq: float) -> tuple[float, float]:
    """(tr Σ̂, ‖G‖²̂) from Σ‖g_i‖² and ‖ḡ‖² (McCandlish et al. 2018, A.1; unbiased)."""
    trace = (sum_sq - size * mean_sq) / (size - 1)
    return trace, mean_sq - trace / size


class Objective(torch.nn.Module):
    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def make_method(name: str, workload, mode: str, tmp: str) -> Callable[[tuple], tuple[float, float] | None]:
    """A function doing one training step with statistics on a batch; returns (tr Σ̂, ‖G‖²̂) or None."""
    model = copy.deepcopy(workload.model).train(mode == "train")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = workload.loss_fn

    def step(batch, backward=lambda loss: loss.backward()):
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        backward(loss)
        optimizer.step()

    if name == "plain step":
        return lambda batch: step(batch)
    if name.startswith("stepaudit per-sample (training pass"):
        # What the noise probe does on a due step, like a BackPACK extension: observe the training
        # backward (layer inputs, output gradients), reduce to tr Σ̂ and ‖G‖²̂ with jackknife groups.
        named = {"model." + n: p for n, p in model.named_parameters()}
        owners = layer_owners(model, named, "model.")

        def run_training_pass(batch):
            captured, handles = capture(owners)
            optimizer.zero_grad()
            try:
                loss_fn(model, batch).backward()
            finally:
                for handle in handles:
                    handle.remove()
            moments = captured_moments(
                owners,
                captured,
                {k: p.detach() for k, p in named.items()},
                [p.grad for p in named.values()],
                batch_len(batch),
                vectors=False,
                groups=1 if name.endswith("no stderr)") else 8,
            )
            est = estimate(moments, name)
            optimizer.step()
            return est.trace_sigma, est.grad_sq_norm

        return run_training_pass
    if name.startswith("stepaudit"):
        objective = Objective(model, loss_fn)

        def run(batch):
            params = {"model." + n: p.detach() for n, p in model.named_parameters()}
            loss = lambda p, b: functional_call(objective, p, (b,))  # noqa: E731
            with torch.random.fork_rng():
                if name.endswith("(hooks)"):
                    moments = layer_moments(model, loss, params, batch)
                elif name.endswith("(vmap)"):
                    moments = per_sample_moments(loss, params, batch)
                else:
                    moments = micro_batch_moments(loss, params, batch, 8)
            est = estimate(moments, name)
            step(batch)
            return est.trace_sigma, est.grad_sq_norm

        return run
    if name.startswith("Audit"):
        import stepaudit

        probes = {"noise": 1} if name == "Audit(noise)" else None
        audit = stepaudit.Audit(
            model, optimizer, loss_fn, run=f"{tmp}/{name}-{time.time_ns()}", probes=probes, strict=True
        )

        def run(batch):
            audit.step(batch)
            r = audit.last
            return (r["trace_sigma"], r["grad_sq_norm"]) if probes else None

        return run
    from backpack import backpack, extend

    extend(model)
    params = list(model.parameters())
    size = lambda batch: batch[0].shape[0]  # noqa: E731
    grad_sq = lambda: sum(float((p.grad.double() ** 2).sum()) for p in params)  # noqa: E731
    if name.startswith("BackPACK"):
        from backpack.extensions import BatchGrad, BatchL2Grad, Variance

        extension = {
            "BackPACK BatchGrad": BatchGrad,
            "BackPACK BatchL2Grad": BatchL2Grad,
            "BackPACK Variance": Variance,
        }[name]()

        def run(batch):
            b = size(batch)

            def backward(loss):
                with backpack(extension):
                    loss.backward()

            optimizer.zero_grad()
            backward(loss_fn(model, batch))
            mean_sq = grad_sq()
            if name == "BackPACK BatchGrad":  # grad_batch holds g_i / B (the loss is a mean)
                sum_sq = b**2 * sum(float((p.grad_batch.double() ** 2).sum()) for p in params)
            elif name == "BackPACK BatchL2Grad":
                sum_sq = b**2 * sum(float(p.batch_l2.double().sum()) for p in params)
            else:  # variance = (1/B) Σ (g_i/B − ḡ)² per coordinate → tr Σ̂ = B³/(B−1) Σ variance
                trace = b**3 / (b - 1) * sum(float(p.variance.double().sum()) for p in params)
                sum_sq = (b - 1) * trace + b * mean_sq
            for p in params:
                for attribute in ("grad_batch", "batch_l2", "variance"):
                    if hasattr(p, attribute):
                        delattr(p, attribute)
            optimizer.step()
            return from_norms(b, sum_sq, mean_sq)

        return run
    from cockpit import Cockpit, quantities

    norm_test = quantities.NormTest(track_schedule=lambda step: True)
    cockpit = Cockpit(params, quantities=[norm_test])
    counter = [0]
    reduction = torch.nn.functional.cross_entropy

    def run(batch):
        b, global_step = size(batch), counter[0]
        counter[0] += 1
        optimizer.zero_grad()
        outputs = model(batch[0])
        loss = reduction(outputs, batch[1])
        individual = reduction(outputs, batch[1], reduction="none")
        with cockpit(
            global_step, info={"batch_size": b, "individual_losses": individual, "loss": loss, "optimizer": optimizer}
        ):
            loss.backward(create_graph=cockpit.create_graph(global_step))
        mean_sq = grad_sq()
        optimizer.step()
        theta = norm_test.get_output()[global_step]
        trace = theta**2 * b * mean_sq  # θ² = tr Σ̂ / (B ‖ḡ‖²)
        return trace, mean_sq - trace / b

    return run


def fixed_batches(workload, count: int = 8) -> list:
    stream = workload.batches()
    return [next(stream) for _ in range(count)]


def child(workload_name: str, method: str, tmp: str) -> None:
    """Peak-RSS growth of ``method`` over a plain training step, in a process of its own."""
    _, factory, mode = WORKLOADS[workload_name]
    workload = factory()
    data = fixed_batches(workload, 4)
    plain = make_method("plain step", workload, mode, tmp)
    for batch in data:
        plain(batch)
    run = make_method(method, workload, mode, tmp)
    try:  # reset the kernel's peak-RSS mark (Linux ≥ 4.0), so the peak below is this method's alone
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        base, how = _status_kib("VmRSS"), "VmHWM"
    except OSError:
        base, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    for batch in data:
        run(batch)
    peak = _status_kib("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_growth_mib": (peak - base) / 1024, "how": how}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def measure(workload_name: str, reps: int, tmp: str, memory: bool) -> list[dict]:
    title, factory, mode = WORKLOADS[workload_name]
    workload = factory()
    data = fixed_batches(workload)
    methods = [m for m in METHODS if applicable(workload_name, m)]
    runners = {m: make_method(m, workload, mode, tmp) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    values: dict[str, tuple] = {}
    for m in methods:  # warm-up, and the statistics of every method on the same first batch & weights
        values[m] = runners[m](data[0])
    for rep in range(reps):
        for m in methods:
            batch = data[(rep + 1) % len(data)]
            start = time.perf_counter()
            runners[m](batch)
            times[m].append(time.perf_counter() - start)
    unit = statistics.median(times["plain step"])
    reference = values.get("stepaudit per-sample (hooks)") or values.get("stepaudit micro-batch")
    rows = []
    for m in methods:
        row = {
            "workload": workload_name,
            "title": title,
            "method": m,
            "ms": 1e3 * statistics.median(times[m]),
            "ms_min": 1e3 * min(times[m]),
            "x_plain": statistics.median(times[m]) / unit,
            "x_plain_min": min(times[m]) / min(times["plain step"]),
            "trace_sigma": None,
            "grad_sq_norm": None,
        }
        if values[m] is not None:
            row["trace_sigma"], row["grad_sq_norm"] = values[m]
            row["agrees"] = max(abs(a - b) / abs(b) for a, b in zip(values[m], reference))
        if memory:
            out = subprocess.run(
                [sys.executable, __file__, "--child", workload_name, m, "--tmp", tmp],
                capture_output=True,
                text=True,
                check=False,
            )
            try:
                row["peak_rss_growth_mib"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_growth_mib"]
            except (IndexError, ValueError, KeyError):
                row["peak_rss_growth_mib"] = None
                row["memory_error"] = out.stderr.strip().splitlines()[-1:] or ["?"]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| workload | method | ms / step median (min) | × plain step median (min) | peak RSS growth (MiB) "
        "| tr Σ̂ | ‖G‖²̂ | rel. diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mem = r.get("peak_rss_growth_mib")
        stats = (
            ("—", "—", "—")
            if r["trace_sigma"] is None
            else (f"{r['trace_sigma']:.4g}", f"{r['grad_sq_norm']:.4g}", f"{r['agrees']:.1e}")
        )
        lines.append(
            f"| {r['workload']} | {r['method']} | {r['ms']:.1f} ({r['ms_min']:.1f}) | "
            f"{r['x_plain']:.1f} ({r['x_plain_min']:.1f}) | "
            f"{'—' if mem is None else f'{mem:.0f}'} | {stats[0]} | {stats[1]} | {stats[2]} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--tmp", default="/tmp/stepaudit-bench-noise")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # BackPACK's full-backward-hook / BatchNorm notices, vmap fallbacks
    if args.child:
        child(*args.child, args.tmp)
        return
    rows = []
    for name in args.only:
        rows += measure(name, args.reps, args.tmp, memory=not args.no_memory)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.reps} interleaved reps; "
        "rel. diff = max relative difference of (tr Σ̂, ‖G‖²̂) from stepaudit's on the same batch and weights"
    )
    print(table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
