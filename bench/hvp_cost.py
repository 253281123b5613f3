"""Cost of one Hessian-vector product, in units of one plain training step, and of Lanczos λ_max.

A training step is zero_grad + forward + backward + SGD step. Repetitions of the step and of both
HVP methods are interleaved and medians reported. Lanczos cost is the number of operator calls
until λ_max is within 1e-3 relative, from a random start ("cold") or from the top eigenvector at the
previous step ("warm").

    python bench/hvp_cost.py [--reps 15] [--threads 2] [--only mlp cnn lm]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.func import functional_call

from stepaudit.linalg import flatten, lanczos, make_hvp

Batch = tuple[torch.Tensor, torch.Tensor]


def mlp() -> tuple[nn.Module, Batch, Callable]:
    """Digits-like MLP 64-256-256-10, batch 128."""
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return model, (torch.randn(128, 64), torch.randint(0, 10, (128,))), nn.functional.cross_entropy


def cnn() -> tuple[nn.Module, Batch, Callable]:
    """Small CNN with BatchNorm on 1×8×8 inputs, batch 128."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )
    return model, (torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,))), nn.functional.cross_entropy


class TinyLM(nn.Module):
    """Causal transformer LM: 2 layers, d=64, 4 heads, vocab 96, learned positions, dropout 0.1."""

    def __init__(self, vocab: int = 96, d: int = 64, seq: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.embed(tokens) + self.pos, mask=self.mask, is_causal=True)
        return self.head(h)


def lm() -> tuple[nn.Module, Batch, Callable]:
    """Tiny transformer LM, seq 64, batch 16, vocab 96."""
    tokens = torch.randint(0, 96, (16, 65))

    def loss(logits, targets):
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return TinyLM(), (tokens[:, :-1], tokens[:, 1:]), loss


WORKLOADS = {"mlp": mlp, "cnn": cnn, "lm": lm}


def pure_loss(model: nn.Module, batch: Batch, criterion: Callable, seed: int = 0):
    """Loss as a pure function of the parameter tuple: dropout RNG replayed, buffers cloned."""
    names = [n for n, _ in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def loss_of_params(params):
        state = {**dict(zip(names, params)), **{n: b.clone() for n, b in buffers.items()}}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return criterion(functional_call(model, state, (batch[0],)), batch[1])

    return loss_of_params


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_step(model: nn.Module, batch: Batch, criterion: Callable, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    criterion(model(batch[0]), batch[1]).backward()
    opt.step()


def measure(name: str, reps: int) -> dict:
    """Median step time, HVP call times (both methods), reverse setup time and Lanczos calls."""
    torch.manual_seed(0)
    model, batch, criterion = WORKLOADS[name]()
    model.train()
    trainee = copy.deepcopy(model)  # trained separately; HVPs stay at the initial point
    opt = torch.optim.SGD(trainee.parameters(), lr=1e-3)
    params = tuple(p.detach() for p in model.parameters())
    loss = pure_loss(model, batch, criterion)

    hvps, setup, notes = {}, [], ""
    for method in ("forward", "reverse"):
        try:
            hvps[method] = make_hvp(loss, params, method)
            hvps[method](torch.ones(hvps[method].dim))  # warm-up
        except Exception as error:  # noqa: BLE001
            notes = f"forward failed: {type(error).__name__}"
    train_step(trainee, batch, criterion, opt)  # warm-up
    times: dict[str, list[float]] = {"step": [], **{m: [] for m in hvps}}
    v = torch.randn(hvps["reverse"].dim)
    for _ in range(reps):  # interleaved so drift affects all columns alike
        times["step"].append(seconds(lambda: train_step(trainee, batch, criterion, opt)))
        for method, hvp in hvps.items():
            times[method].append(seconds(lambda hvp=hvp: hvp(v)))
        setup.append(seconds(lambda: make_hvp(loss, params, "reverse")))
    med = {k: statistics.median(x) for k, x in times.items()}
    auto = make_hvp(loss, params, "auto")
    return {
        "name": name,
        "dim": hvps["reverse"].dim,
        "step_ms": 1e3 * med["step"],
        "forward": med.get("forward", float("nan")) / med["step"],
        "reverse": med["reverse"] / med["step"],
        "setup": statistics.median(setup) / med["step"],
        "auto": auto.method.split("-")[0],
        "notes": notes or (auto.fallback_reason or ""),
        **lanczos_cost(model, batch, criterion, params),
    }


def calls_to_accuracy(hvp, start, reference: float, seed: int, accuracy: float = 1e-3) -> int:
    """Fewest operator calls (Lanczos steps + the final residual call) reaching ``accuracy`` relative error."""
    for steps in range(1, 61):
        result = lanczos(
            hvp, hvp.dim, iterations=steps, tol=0.0, start=start, generator=torch.Generator().manual_seed(seed)
        )
        if abs(result.eigenvalue - reference) <= accuracy * abs(reference):
            return result.iterations
    return -1


def lanczos_cost(model: nn.Module, batch: Batch, criterion: Callable, params, lr: float = 0.05) -> dict:
    """Calls for 1e-3 relative λ_max: random start vs top eigenvector of the previous step."""
    loss = pure_loss(model, batch, criterion)
    previous = lanczos(
        make_hvp(loss, params, "auto"),
        flatten(params).numel(),
        iterations=60,
        tol=1e-6,
        generator=torch.Generator().manual_seed(1),
    )
    stepped = tuple(p - lr * g for p, g in zip(params, torch.func.grad(loss)(params)))  # one SGD step
    hvp = make_hvp(loss, stepped, "auto")
    reference = lanczos(hvp, hvp.dim, iterations=100, tol=1e-8, generator=torch.Generator().manual_seed(2))
    cold = [calls_to_accuracy(hvp, None, reference.eigenvalue, seed) for seed in (3, 4, 5)]
    warm = calls_to_accuracy(hvp, previous.eigenvector, reference.eigenvalue, 0)
    return {"lambda": reference.eigenvalue, "cold_calls": statistics.median(cold), "warm_calls": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions (medians reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--only", nargs="*", choices=list(WORKLOADS), default=list(WORKLOADS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.reps} reps, float32 CPU")
    header = (
        f"{'workload':<8}{'params':>9}{'step ms':>9}{'fwd HVP':>9}{'rev HVP':>9}{'rev setup':>10}"
        f"{'auto':>9}{'λ_max':>9}{'cold':>6}{'warm':>6}  notes"
    )
    print(header)
    print("-" * len(header))
    for name in args.only:
        r = measure(name, args.reps)
        print(
            f"{r['name']:<8}{r['dim']:>9}{r['step_ms']:>9.2f}{r['forward']:>8.2f}x{r['reverse']:>8.2f}x"
            f"{r['setup']:>9.2f}x{r['auto']:>9}{r['lambda']:>9.3f}"
            f"{r['cold_calls']:>6}{r['warm_calls']:>6}  {r['notes']}"
        )
    print(
        "HVP columns: one call / one training step (zero_grad+forward+backward+SGD). rev setup: building"
        " the retained double-backward graph (paid once per step). cold/warm: Lanczos operator calls (incl. the"
        " residual call) until λ_max is within 1e-3 of a 100-step reference, from a random start (median of 3)"
        " or from the previous step's top eigenvector (one SGD step, lr 0.05, earlier)."
    )


if __name__ == "__main__":
    main()
