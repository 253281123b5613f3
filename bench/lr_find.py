"""Do the range test's suggestions train well? Final held-out loss after a fixed budget at each suggested lr.

For each workload and seed: build the model, run ``stepaudit.lr_find`` once (it leaves the model and the
optimizer untouched), then train copies of that same initialisation for a fixed number of steps, same batch
order, at each candidate lr: stepaudit's suggestion, fastai's valley (its default), steep and minimum/10, and
two references: the first lr at which a step raised its own batch's loss (twice stepaudit's suggestion
unless capped: an ablation of its safety factor) and the hand-picked lr of ``stepaudit demo``. The score is the loss on held-out data after the
budget (the digits test split; for the LM the last tenth of the text). A run whose loss becomes non-finite
is marked diverged. Prints a markdown table (mean ± standard deviation over seeds, and each candidate's lr).

    OMP_NUM_THREADS=1 .venv/bin/python bench/lr_find.py [--seeds 3] [--workloads mlp-sgd cnn-momentum lm-adam mlp-adam]
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

CANDIDATES = ("stepaudit", "valley", "steep", "minimum", "first rise", "hand-picked")


def digits(model_fn: Callable[[], torch.nn.Module]):
    """(build(seed) -> model, batches(seed), held-out loss(model), loss_fn) on digits."""
    x, y, x_test, y_test = load_digits()

    def held_out(model: torch.nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            value = float(classification_loss(model, (x_test, y_test)))
        model.train()
        return value

    return model_fn, lambda seed: minibatches(x, y, 128, seed), held_out, classification_loss


def language():
    """The tiny transformer LM on the standard library's text, the last tenth held out."""
    tokens = stdlib_text()
    cut = int(0.9 * len(tokens))
    train, test = tokens[:cut], tokens[cut:]
    windows = torch.stack([test[s:s + 65] for s in range(0, len(test) - 65, 64)])

    def held_out(model: torch.nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            value = float(lm_loss(model, windows))
        model.train()
        return value

    return lambda: TinyLM(context=64), lambda seed: text_batches(train, 16, 64, seed), held_out, lm_loss


WORKLOADS = {
    # name: (data/model, optimizer(params, lr), hand-picked lr, training steps)
    "mlp-sgd": (lambda: digits(lambda: mlp((64, 256, 256, 10))), lambda p, lr: torch.optim.SGD(p, lr=lr), 0.1, 300),
    "mlp-adam": (lambda: digits(lambda: mlp((64, 256, 256, 10))), lambda p, lr: torch.optim.Adam(p, lr=lr), 3e-3, 300),
    "cnn-momentum": (lambda: digits(DigitsCNN), lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), 0.1, 300),
    "lm-adam": (language, lambda p, lr: torch.optim.Adam(p, lr=lr), 3e-3, 300),
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


def run(name: str, seeds: int) -> dict:
    """Every candidate's lr and held-out loss for each seed of one workload."""
    setup, make_optimizer, hand_lr, steps = WORKLOADS[name]
    build, batches, held_out, loss_fn = setup()
    rows = {c: {"lr": [], "loss": []} for c in CANDIDATES}
    for seed in range(seeds):
        torch.manual_seed(seed)
        init = build()
        model = copy.deepcopy(init)
        result = lr_find(model, make_optimizer(model.parameters(), hand_lr), loss_fn, batches(seed + 100))
        lrs = {**{c: result.suggestions[c] for c in CANDIDATES[:4]}, "first rise": result.lr_rise,
               "hand-picked": hand_lr}
        for candidate, lr in lrs.items():
            model = copy.deepcopy(init)
            torch.manual_seed(seed)
            loss = train(model, make_optimizer(model.parameters(), lr), loss_fn, batches(seed), steps, held_out) \
                if math.isfinite(lr) and lr > 0 else math.nan
            rows[candidate]["lr"].append(lr)
            rows[candidate]["loss"].append(loss)
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


def table(results: dict) -> str:
    """The markdown table: one row per workload, one column per candidate (held-out loss, and its lrs)."""
    head = "| workload | steps | " + " | ".join(CANDIDATES) + " | stepaudit better than valley / steep / minimum |"
    lines = [head, "|" + "---|" * (len(CANDIDATES) + 3)]
    for name, rows in results.items():
        cells = []
        for c in CANDIDATES:
            lrs = ", ".join(f"{v:.2g}" for v in rows[c]["lr"])
            cells.append(f"{cell(rows[c]['loss'])}<br>lr {lrs}")
        versus = " / ".join(paired(rows, other) for other in ("valley", "steep", "minimum"))
        lines.append(f"| {name} | {WORKLOADS[name][3]} | " + " | ".join(cells) + f" | {versus} seeds |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
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
    print(table(results))
    print(f"\n{args.seeds} seeds, held-out loss after the fixed budget (mean ± sd); "
          f"{time.perf_counter() - started:.0f} s in all, torch {torch.__version__}, 1 thread")
    for name, rows in results.items():
        print(f"- {name}: stepaudit's reasons: " + " / ".join(rows["_reasons"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
