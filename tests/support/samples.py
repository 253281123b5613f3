"""Sample runs for tests, docs and size checks: short real ones, and synthetic ones of any length.

``trained_run`` audits a few dozen real steps on the digits MLP. Training for 100,000 audited steps
takes hours, but the report only reads records, so ``write_synthetic_run`` writes a run with
realistic shapes (a decaying noisy loss, loss spikes, a few non-finite steps, sparse curvature and
noise probes, per-layer rows) straight into a run store in a few seconds.

    python tests/support/samples.py RUN_DIR [--steps 100000]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

from stepaudit.store import LAYER_FIELDS, RunStore

MODULES = ("embed", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "head")


def synthetic_records(
    steps: int,
    seed: int = 0,
    modules: tuple[str, ...] = MODULES,
    spikes: bool = True,
    sharpness_every: int = 100,
    noise_every: int = 50,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """(numeric columns, verdicts, per-module update ratios) of a plausible run, vectorised."""
    rng = np.random.default_rng(seed)
    step = np.arange(steps, dtype=float)
    lr = np.full(steps, 0.05)
    loss = 2.3 * np.exp(-step / max(steps / 6, 1)) + 0.2 + 0.05 * rng.standard_normal(steps) ** 2
    if spikes and steps > 10:
        for at in rng.choice(steps, size=min(5, steps // 3), replace=False):
            loss[at] *= 8.0  # isolated loss spikes: downsampling must keep them visible
    first_order = -np.abs(0.02 * np.exp(-step / max(steps / 4, 1)) * (1 + 0.5 * rng.standard_normal(steps)))
    delta = first_order * rng.normal(0.9, 0.4, steps)
    loss_after = loss + delta
    grad_norm = 1.0 * np.exp(-step / max(steps / 3, 1)) + 0.05 + 0.02 * rng.random(steps)
    update_norm = lr * grad_norm
    weight_norm = 20.0 + step / max(steps, 1)
    columns = {
        "step": step,
        "lr": lr,
        "batch_size": np.full(steps, 128.0),
        "loss_before": loss,
        "loss_after": loss_after,
        "delta": delta,
        "first_order": first_order,
        "remainder": delta - first_order,
        "rounding_noise": 1e-7 * np.abs(loss),
        "grad_norm": grad_norm,
        "update_norm": update_norm,
        "weight_norm": weight_norm,
        "update_ratio": update_norm / weight_norm,
        "descent_cos": np.full(steps, 1.0),
    }
    c = delta - first_order
    with np.errstate(divide="ignore", invalid="ignore"):
        best = np.where(c > 0, -first_order / (2 * c), np.inf)
        columns["alpha"] = np.where(c > 0, 1.0 / best - 1.0, -1.0)
    columns["best_scale"] = best
    verdicts = np.where(delta < 0, "decrease", "increase").astype(object)
    verdicts[np.abs(delta) <= columns["rounding_noise"]] = "flat"
    if steps > 1000:  # a handful of non-finite steps
        for at in rng.choice(steps, size=3, replace=False):
            columns["loss_after"][at] = math.inf
            columns["delta"][at] = columns["alpha"][at] = math.nan
            verdicts[at] = "nonfinite"
    sharp = np.full(steps, np.nan)
    sharp[::sharpness_every] = 30.0 + 15.0 * (1 - np.exp(-step[::sharpness_every] / max(steps / 5, 1)))
    columns["sharpness"] = sharp
    columns["safe_lr"] = np.where(np.isfinite(sharp), 2.0 / sharp, np.nan)
    noise = np.full(steps, np.nan)
    noise[::noise_every] = 40.0 * (1 + step[::noise_every] / max(steps / 10, 1))
    columns["noise_scale"] = noise
    ratios = {
        name: columns["update_ratio"]
        * 10.0 ** (1.5 * (i / max(len(modules) - 1, 1)) - 0.75)
        * np.exp(0.2 * rng.standard_normal(steps))
        for i, name in enumerate(modules)
    }
    return columns, verdicts, ratios


def _value(v: float):
    return None if math.isnan(v) else v


def write_synthetic_run(
    run: str | os.PathLike,
    steps: int = 100_000,
    seed: int = 0,
    name: str | None = None,
    modules: tuple[str, ...] = MODULES,
    meta: dict | None = None,
    **options,
) -> Path:
    """Write a synthetic run of ``steps`` audited steps into the run folder ``run`` (one transaction)."""
    columns, verdicts, ratios = synthetic_records(steps, seed, modules, **options)
    meta = {
        "model": "SyntheticModel",
        "n_params": 123456,
        "n_trainable": 123456,
        "optimizer": "SGD",
        "param_groups": [{"lr": 0.05, "momentum": 0.0, "weight_decay": 0.0, "n_params": 123456}],
        "versions": {"stepaudit": "synthetic"},
        "seed": seed,
        "every": 1,
        "probes": {"sharpness": 100},
        "steps_seen": steps,
        **(meta or {}),
    }
    store = RunStore(run, meta, name=name)
    names = list(columns)
    first = {k: float(columns[k][0]) for k in names}
    first.update(step=0, verdict=str(verdicts[0]), noise_method="synthetic")
    store.append(first)  # creates the columns
    db = store.db
    db.execute("BEGIN IMMEDIATE")
    marks = ", ".join("?" for _ in range(len(names) + 2))
    quoted = ", ".join(f'"{n}"' for n in names)
    table = np.column_stack([columns[n] for n in names]).tolist()
    db.executemany(
        f'INSERT OR REPLACE INTO steps ({quoted}, "verdict", "noise_method") VALUES ({marks})',
        ([int(row[0]), *map(_value, row[1:]), str(v), "synthetic"] for row, v in zip(table, verdicts)),
    )
    weight = columns["weight_norm"]
    layer_rows = []
    for module, ratio in ratios.items():
        for s, r, w in zip(range(steps), ratio.tolist(), weight.tolist()):
            layer_rows.append((s, "module", module, None, r * w, w, r))
    for s, r, w, g in zip(
        range(steps), columns["update_ratio"].tolist(), weight.tolist(), columns["grad_norm"].tolist()
    ):
        layer_rows.append((s, "group", "0", g, r * w, w, r))
    db.executemany(
        f"INSERT OR REPLACE INTO layers VALUES (?, ?, ?, {', '.join('?' for _ in LAYER_FIELDS)})", layer_rows
    )
    db.execute("COMMIT")
    store.close()
    return Path(run)


OPTIMIZERS = {"sgd": {"lr": 0.05}, "momentum": {"lr": 0.05, "momentum": 0.9}, "adam": {"lr": 1e-3}}


def trained_run(
    run: str | os.PathLike,
    steps: int = 40,
    optimizer: str = "sgd",
    seed: int = 0,
    batch_size: int = 64,
    **audit_options,
) -> list[dict]:
    """Audit ``steps`` real steps of the digits MLP into ``run``; returns the in-memory records."""
    import torch

    from stepaudit.audit import Audit
    from stepaudit.workloads import digits_mlp

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {optimizer!r}")
    with torch.random.fork_rng():
        workload = digits_mlp(batch_size=batch_size, seed=seed)
        kind = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
        audit = Audit(
            workload.model,
            kind(workload.model.parameters(), **OPTIMIZERS[optimizer]),
            workload.loss_fn,
            run=run,
            **audit_options,
        )
        batches = workload.batches()
        try:
            for _ in range(steps):
                audit.step(next(batches))
        finally:
            audit.close()
    return audit.records


def main(argv: list[str] | None = None) -> int:
    """Write a synthetic run folder."""
    parser = argparse.ArgumentParser(prog="python tests/support/samples.py", description=main.__doc__)
    parser.add_argument("run", help="run folder to create")
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    print(write_synthetic_run(args.run, args.steps, name=args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
