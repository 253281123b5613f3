"""Do the range test's suggestions train well? Final held-out loss after a fixed budget at each suggested lr.

For each workload and seed: build the model, run ``stepaudit.lr_find`` once (it leaves the model and the
optimizer untouched; for the fastai Learner, fastai's own ``learn.lr_find()`` measured by
``AuditCallback(lr_find=True)``), then train copies of that same initialisation for a fixed number of steps,
same batch order, at each candidate lr: stepaudit's suggestion, fastai's valley (its default) and steep, and
torch-lr-finder's (the lr of steepest descent of its smoothed loss, written here from its documented rule and
computed on the same sweep: the lr at the most negative per-point ``np.gradient`` of its loss history, an exponential
average s ← 0.05·loss + 0.95·s without bias correction, cut after the first point above 5× its best, without
the first 10 and last 5 points). The score is the loss on held-out data after the budget. A run whose loss becomes
non-finite is marked diverged. Prints a markdown table (mean ± standard deviation over seeds, each candidate's lrs).

    OMP_NUM_THREADS=1 .venv/bin/python bench/lr_find.py [--seeds 3] [--workloads mlp-sgd ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from stepaudit import lr_find
from stepaudit.workloads import (
    DigitsCNN,
    TinyLM,
    classification_loss,
    lm_loss,
    load_digits,
    minibatches,
    mlp,
    stdlib_text,
    text_batches,
)

CANDIDATES = ("stepaudit", "valley", "steep", "torch-lr-finder")


def torch_lr_finder(
    lrs: np.ndarray,
    losses: np.ndarray,
    smooth_f: float = 0.05,
    diverge_th: float = 5.0,
    skip_start: int = 10,
    skip_end: int = 5,
) -> float:
    """torch-lr-finder's rule (see the module docstring): the lr at the most negative np.gradient of its EMA loss."""
    smooth, best = [], math.inf
    for loss in losses:
        value = loss if not smooth else smooth_f * loss + (1 - smooth_f) * smooth[-1]
        smooth.append(value)
        best = min(best, value)
        if not math.isfinite(value) or value > diverge_th * best:
            break
    kept = np.asarray(smooth[skip_start : len(smooth) - skip_end], float)
    if len(kept) < 2 or not np.isfinite(kept).all():
        return math.nan
    return float(lrs[skip_start + int(np.argmin(np.gradient(kept)))])


def held_out_loss(model: torch.nn.Module, loss_fn, batch) -> float:
    """The loss on held-out data, in eval mode (train mode is put back)."""
    model.eval()
    with torch.no_grad():
        value = float(loss_fn(model, batch))
    model.train()
    return value


def digits(model_fn: Callable[[], torch.nn.Module]):
    """(build() -> model, batches(seed), held-out loss(model), loss_fn) on digits (the test split: 449 images)."""
    x, y, x_test, y_test = load_digits()
    return (
        model_fn,
        lambda seed: minibatches(x, y, 128, seed),
        lambda m: held_out_loss(m, classification_loss, (x_test, y_test)),
        classification_loss,
    )


def language():
    """The tiny transformer LM on the standard library's text, the last tenth held out."""
    tokens = stdlib_text()
    cut = int(0.9 * len(tokens))
    train, test = tokens[:cut], tokens[cut:]
    windows = torch.stack([test[s : s + 65] for s in range(0, len(test) - 65, 64)])
    return (
        lambda: TinyLM(context=64),
        lambda seed: text_batches(train, 16, 64, seed),
        lambda m: held_out_loss(m, lm_loss, windows),
        lm_loss,
    )


def tabular_data(n: int = 4000, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated tabular data: 10 continuous features, a 5-level category (one-hot), 3 classes from a nonlinear rule."""
    g = torch.Generator().manual_seed(seed)
    cont = torch.randn(n, 10, generator=g)
    cat = torch.randint(0, 5, (n,), generator=g)
    score = torch.stack(
        [
            cont[:, 0] * cont[:, 1] + torch.sin(2 * cont[:, 2]),
            cont[:, 3] ** 2 - 1 + 0.5 * (cat == 1).float() - 0.5 * (cat == 3).float(),
            cont[:, 4] - cont[:, 5] * (cat % 2).float(),
        ],
        1,
    )
    y = (score + 0.5 * torch.randn(n, 3, generator=g)).argmax(1)
    return torch.cat([cont, torch.nn.functional.one_hot(cat, 5).float()], 1), y


def tabular():
    """An MLP with BatchNorm on the generated table; the last 1000 rows held out."""
    x, y = tabular_data()
    build = lambda: torch.nn.Sequential(
        torch.nn.Linear(15, 128),
        torch.nn.BatchNorm1d(128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 64),
        torch.nn.BatchNorm1d(64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 3),
    )
    return (
        build,
        lambda seed: minibatches(x[:3000], y[:3000], 64, seed),
        lambda m: held_out_loss(m, classification_loss, (x[3000:], y[3000:])),
        classification_loss,
    )


class GRUClassifier(torch.nn.Module):
    """A one-layer GRU over the sequence, classified from its last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = torch.nn.GRU(6, 48, batch_first=True)
        self.head = torch.nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x)[0][:, -1])


def sequences():
    """Generated sequences (24 × 6), class = argmax over 4 directions of their discounted sum; 1000 held out."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4000, 24, 6, generator=g)
    directions = torch.randn(6, 4, generator=g)
    weights = 0.9 ** torch.arange(23, -1, -1, dtype=torch.float32)
    y = ((x * weights[None, :, None]).sum(1) @ directions).argmax(1)
    return (
        GRUClassifier,
        lambda seed: minibatches(x[:3000], y[:3000], 64, seed),
        lambda m: held_out_loss(m, classification_loss, (x[3000:], y[3000:])),
        classification_loss,
    )


WORKLOADS = {
    # name: (data/model, optimizer(params, lr), training steps)
    "mlp-sgd": (lambda: digits(lambda: mlp((64, 256, 256, 10))), lambda p, lr: torch.optim.SGD(p, lr=lr), 300),
    "mlp-adam": (lambda: digits(lambda: mlp((64, 256, 256, 10))), lambda p, lr: torch.optim.Adam(p, lr=lr), 300),
    "cnn-momentum": (lambda: digits(DigitsCNN), lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), 300),
    "lm-adam": (language, lambda p, lr: torch.optim.Adam(p, lr=lr), 300),
    "tabular-momentum": (tabular, lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), 300),
    "gru-adam": (sequences, lambda p, lr: torch.optim.Adam(p, lr=lr), 300),
    "fastai-tabular": (None, None, 276),  # fastai's tabular_learner, fastai's Adam, fit_one_cycle: fastai_run
}


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn, batches, steps: int, held_out) -> float:
    """Train for ``steps`` steps and return the held-out loss (inf once the training loss is not finite)."""
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, next(batches))
        if not torch.isfinite(loss):
            return math.inf
        loss.backward()
        optimizer.step()
    value = held_out(model)
    return value if math.isfinite(value) else math.inf


def candidates(result) -> dict[str, float]:
    """The four candidate lrs of one sweep."""
    return {
        "stepaudit": result.suggestion,
        "valley": result.suggestions["valley"],
        "steep": result.suggestions["steep"],
        "torch-lr-finder": torch_lr_finder(result.lrs, result.losses),
    }


def run(name: str, seeds: int) -> dict:
    """Every candidate's lr and held-out loss for each seed of one workload."""
    if name == "fastai-tabular":
        return fastai_run(seeds, WORKLOADS[name][2])
    setup, make_optimizer, steps = WORKLOADS[name]
    build, batches, held_out, loss_fn = setup()
    rows = {c: {"lr": [], "loss": []} for c in CANDIDATES}
    for seed in range(seeds):
        torch.manual_seed(seed)
        init = build()
        model = copy.deepcopy(init)
        result = lr_find(model, make_optimizer(model.parameters(), 1e-3), loss_fn, batches(seed + 100))
        for candidate, lr in candidates(result).items():
            model = copy.deepcopy(init)
            torch.manual_seed(seed)
            loss = (
                train(model, make_optimizer(model.parameters(), lr), loss_fn, batches(seed), steps, held_out)
                if math.isfinite(lr) and lr > 0
                else math.nan
            )
            rows[candidate]["lr"].append(lr)
            rows[candidate]["loss"].append(loss)
        rows.setdefault("_reasons", []).append(result.reason)
    return rows


def fastai_run(seeds: int, steps: int) -> dict:
    """fastai's tabular_learner: lr_find with AuditCallback(lr_find=True), then fit_one_cycle at each candidate lr."""
    import pandas as pd
    from fastai.callback.schedule import steep, valley
    from fastai.tabular.all import Categorify, CategoryBlock, Normalize, TabularDataLoaders, set_seed, tabular_learner

    from stepaudit.integrations.fastai import AuditCallback

    x, y = tabular_data()
    frame = pd.DataFrame(x[:, :10].numpy(), columns=[f"x{i}" for i in range(10)])
    frame["cat"] = x[:, 10:].argmax(1).numpy().astype(str)
    frame["label"] = y.numpy()

    def learner(seed: int, cbs: list) -> object:
        set_seed(seed, reproducible=True)
        dls = TabularDataLoaders.from_df(
            frame,
            y_names="label",
            cat_names=["cat"],
            cont_names=[f"x{i}" for i in range(10)],
            procs=[Categorify, Normalize],
            y_block=CategoryBlock(),
            bs=64,
            valid_idx=list(range(3000, 4000)),
            num_workers=0,
        )
        return tabular_learner(dls, layers=[128, 64], cbs=cbs)

    rows = {c: {"lr": [], "loss": []} for c in CANDIDATES}
    for seed in range(seeds):
        learn = learner(seed, [AuditCallback(lr_find=True)])
        with learn.no_bar(), learn.no_logging():
            found = learn.lr_find(show_plot=False, suggest_funcs=(valley, steep, learn.stepaudit.suggest))
        result = learn.stepaudit.lr_find_result
        lrs = {
            "stepaudit": found.stepaudit,
            "valley": found.valley,
            "steep": found.steep,
            "torch-lr-finder": torch_lr_finder(result.lrs, result.losses),
        }
        for candidate, lr in lrs.items():
            learn = learner(seed, [])
            set_seed(seed, reproducible=True)
            with learn.no_bar(), learn.no_logging():
                learn.fit_one_cycle(steps // len(learn.dls.train), float(lr))
                loss = float(learn.validate()[0])
            rows[candidate]["lr"].append(float(lr))
            rows[candidate]["loss"].append(loss if math.isfinite(loss) else math.inf)
        rows.setdefault("_reasons", []).append(result.reason)
    return rows


def cell(losses: list[float]) -> str:
    """mean ± sd over seeds, or how many diverged."""
    bad = sum(not math.isfinite(v) for v in losses)
    if bad:
        return f"diverged {bad}/{len(losses)}"
    return f"{statistics.mean(losses):.3f} ± {statistics.stdev(losses):.3f}" if len(losses) > 1 else f"{losses[0]:.3f}"


def paired(rows: dict, other: str) -> str:
    """On how many seeds stepaudit's lr gave a lower held-out loss than ``other``'s (same init, same batches)."""
    pairs = list(zip(rows["stepaudit"]["loss"], rows[other]["loss"]))
    wins = sum(a < b for a, b in pairs if not (math.isnan(a) or math.isnan(b)))
    return f"{wins}/{len(pairs)}"


def _mean_sd(losses: list[float]) -> tuple[float, float]:
    finite = [v for v in losses if math.isfinite(v)]
    if len(finite) < len(losses):
        return math.inf, math.inf
    return statistics.mean(losses), statistics.stdev(losses) if len(losses) > 1 else 0.0


def verdict(rows: dict) -> tuple[bool, bool, str]:
    """(within: mean gap to the best other ≤ the larger seed sd, better than valley by mean, the cell's text)."""
    ours, our_sd = _mean_sd(rows["stepaudit"]["loss"])
    best = min(CANDIDATES[1:], key=lambda c: _mean_sd(rows[c]["loss"])[0])
    theirs, their_sd = _mean_sd(rows[best]["loss"])
    gap = ours - theirs
    within = gap <= max(our_sd, their_sd) if math.isfinite(ours) else False
    better = ours < _mean_sd(rows["valley"]["loss"])[0]
    text = (
        f"best other: {best}; gap {gap:+.3f} vs spread {max(our_sd, their_sd):.3f}: "
        f"{'within' if within else 'NOT within'}; {'beats' if better else 'does not beat'} valley"
    )
    return within, better, text


def table(results: dict) -> str:
    """The markdown table: one row per workload, one column per candidate (held-out loss, and its lrs)."""
    head = (
        "| workload | steps | " + " | ".join(CANDIDATES) + " | stepaudit better than valley / steep / "
        "torch-lr-finder (seeds) | issue 17's tests |"
    )
    lines = [head, "|" + "---|" * (len(CANDIDATES) + 4)]
    for name, rows in results.items():
        cells = []
        for c in CANDIDATES:
            lrs = ", ".join(f"{v:.2g}" for v in rows[c]["lr"])
            cells.append(f"{cell(rows[c]['loss'])}<br>lr {lrs}")
        versus = " / ".join(paired(rows, other) for other in CANDIDATES[1:])
        lines.append(f"| {name} | {WORKLOADS[name][2]} | " + " | ".join(cells) + f" | {versus} | {verdict(rows)[2]} |")
    tests = [verdict(rows)[:2] for rows in results.values()]
    lines.append(
        f"\nWithin the seed spread of the best other candidate on {sum(t[0] for t in tests)} of {len(tests)} "
        f"workloads; better than valley on {sum(t[1] for t in tests)} of {len(tests)}. Target (issue 17): "
        f"all within, and better than valley on at least half: "
        f"{'MET' if all(t[0] for t in tests) and 2 * sum(t[1] for t in tests) >= len(tests) else 'NOT met'}."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=[w for w in WORKLOADS if w != "mlp-adam"],
        choices=list(WORKLOADS),
        help="default: issue 17's six (mlp-adam is an extra)",
    )
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    parser.add_argument("--from-json", default=None, help="print the table of a run saved with --json, run nothing")
    args = parser.parse_args()
    if args.from_json:
        print(table(json.loads(Path(args.from_json).read_text())))
        return
    torch.set_num_threads(1)
    started, results = time.perf_counter(), {}
    for name in args.workloads:
        t = time.perf_counter()
        results[name] = run(name, args.seeds)
        print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
        if args.json:  # after each workload: a crash later keeps what was measured
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    print(
        f"\n{args.seeds} seeds, held-out loss after the fixed budget (mean ± sd); "
        f"{time.perf_counter() - started:.0f} s in all, torch {torch.__version__}, 1 thread"
    )
    for name, rows in results.items():
        print(f"- {name}: stepaudit's reasons: " + " / ".join(rows["_reasons"]))


if __name__ == "__main__":
    main()
