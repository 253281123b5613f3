"""The CUDA path, checked on one GPU: bit-identity, host–device syncs, overhead, single-GPU DDP/FSDP2 on NCCL.

    python bench/gpu_check.py [--cpu] [--quick] [--sections identity syncs overhead distributed] [--json FILE]

Four sections, each printed as one markdown table; a section that raises prints one FAIL line and the
script goes on. The exit status is 1 when any check failed, else 0. The last line of the output is all
results as one JSON object.

1. identity: audited vs plain training from the same seeds (fp32, bf16 autocast, fp16 + GradScaler,
   fused AdamW, BatchNorm + Dropout, a small transformer LM with dropout): ``torch.equal`` on weights,
   buffers, optimizer and scaler state, the per-step losses and the CPU and CUDA RNG states. A second
   plain run is the control: when it differs from the first, the baseline itself is not deterministic
   and the row says INCONCLUSIVE instead of blaming the audit.
2. syncs: ``torch.cuda.set_sync_debug_mode("warn")``; synchronising calls counted per plain,
   audited and unaudited step. Unaudited steps must show 0 (INCONCLUSIVE where the plain loop
   itself synchronises as often). INCONCLUSIVE rows are listed at the end, not counted as failures.
3. overhead: a ResNet-18-like CNN and a GPT-2-small-like LM (random data), plain loop vs the audited
   loop at every=1 and every=16, interleaved repetitions timed between ``torch.cuda.synchronize()``.
4. distributed: DDP and FSDP2 (``fully_shard``) with world_size 1 on NCCL, in a child process; audited
   vs plain bit-identical, no error records, records equal to an unwrapped audited run's.

Without a GPU (or with ``--cpu``) everything runs on the CPU with tiny sizes; the sync count and NCCL
are skipped ("skipped: no GPU") and the distributed section runs on gloo as a stand-in.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from stepaudit import Audit

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: read at its first use
SECTIONS = ("identity", "syncs", "overhead", "distributed")
CHILD_MARKER = "GPU_CHECK_CHILD_RESULT "
SEED = 1234


# -- models -------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and a (projected) shortcut, as in ResNet-18."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv-bn-relu-conv-bn plus the shortcut, then relu."""
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetLike(nn.Module):
    """ResNet-18's layout (stem, four stages of two basic blocks, pooled linear head); ``width`` 64 is ResNet-18."""

    def __init__(self, width: int = 64, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        blocks: list[nn.Module] = []
        cin = width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class GPTLike(nn.Module):
    """A decoder-only LM: token + learned position embeddings, pre-norm causal transformer layers, tied head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, context: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Parameter(torch.randn(context, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, heads, 4 * d, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as in GPT-2
        mask = torch.triu(torch.full((context, context), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits for every position."""
        length = tokens.shape[1]
        hidden = self.embed(tokens) + self.position[:length]
        hidden = self.layers(hidden, mask=self.mask[:length, :length], is_causal=True)
        return self.head(self.norm(hidden))


def mlp(width: int, dropout: float) -> nn.Module:
    """32 → width → width → 10 with GELU and optional Dropout."""
    return nn.Sequential(
        nn.Linear(32, width),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(width, width),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(width, 10),
    )


def bn_dropout_cnn() -> nn.Module:
    """Two conv + BatchNorm2d blocks, Dropout2d and Dropout, on 3×16×16 images."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Dropout2d(0.1),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(32, 10),
    )


def classify(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of (inputs, labels)."""
    inputs, labels = batch
    return F.cross_entropy(model(inputs).float(), labels)


def next_token(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (batch, length + 1) token tensor."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def with_autocast(loss_fn: Callable, device: torch.device, dtype: torch.dtype | None) -> Callable:
    """``loss_fn`` run under autocast to ``dtype`` (unchanged when ``dtype`` is None)."""
    if dtype is None:
        return loss_fn

    def autocast_loss(model: nn.Module, batch: Any) -> torch.Tensor:
        """The loss under autocast."""
        with torch.autocast(device.type, dtype=dtype):
            return loss_fn(model, batch)

    return autocast_loss


def image_batches(
    count: int, size: int, side: int, classes: int, device: torch.device, seed: int = 7
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` random (images, labels) batches drawn from their own generator."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 3, side, side, generator=g).to(device),
            torch.randint(0, classes, (size,), generator=g).to(device),
        )
        for _ in range(count)
    ]


def vector_batches(
    count: int, size: int, device: torch.device, seed: int = 7
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` random (32-feature inputs, labels) batches."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 32, generator=g).to(device), torch.randint(0, 10, (size,), generator=g).to(device))
        for _ in range(count)
    ]


def token_batches(
    count: int, size: int, context: int, vocab: int, device: torch.device, seed: int = 7
) -> list[torch.Tensor]:
    """``count`` random token batches of shape (size, context + 1)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (size, context + 1), generator=g).to(device) for _ in range(count)]


def seed_all(seed: int) -> None:
    """Seed the CPU and every CUDA generator."""
    torch.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def millions(count: int) -> str:
    """A parameter count as ``12.3 M`` or, below 100 000, ``45.6 k``."""
    return f"{count / 1e6:.1f} M" if count >= 100_000 else f"{count / 1e3:.1f} k"


def first_line(error: BaseException) -> str:
    """``Type: first line of the message``, at most 200 characters."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def table(columns: list[str], rows: list[dict]) -> str:
    """A markdown table of ``rows`` (dicts) under ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


@dataclass
class Sizes:
    """Sizes of everything the script trains, chosen from the device and ``--quick``."""

    identity_steps: int
    sync_steps: int
    cnn_width: int
    cnn_side: int
    cnn_batch: int
    cnn_classes: int
    lm_vocab: int
    lm_d: int
    lm_layers: int
    lm_heads: int
    lm_context: int
    lm_batch: int
    overhead_steps: int
    overhead_repeats: int
    distributed_steps: int


def choose_sizes(cpu: bool, quick: bool) -> Sizes:
    """GPU: ResNet-18 at 224², GPT-2 small at context 512; CPU: tiny stand-ins; ``quick``: smaller still."""
    if cpu:
        return Sizes(
            identity_steps=4,
            sync_steps=4,
            cnn_width=4,
            cnn_side=32,
            cnn_batch=4,
            cnn_classes=10,
            lm_vocab=128,
            lm_d=32,
            lm_layers=2,
            lm_heads=2,
            lm_context=16,
            lm_batch=4,
            overhead_steps=16,
            overhead_repeats=3 if quick else 5,
            distributed_steps=3,
        )
    if quick:
        return Sizes(
            identity_steps=4,
            sync_steps=8,
            cnn_width=64,
            cnn_side=128,
            cnn_batch=32,
            cnn_classes=1000,
            lm_vocab=50257,
            lm_d=768,
            lm_layers=12,
            lm_heads=12,
            lm_context=256,
            lm_batch=4,
            overhead_steps=16,
            overhead_repeats=3,
            distributed_steps=4,
        )
    return Sizes(
        identity_steps=6,
        sync_steps=16,
        cnn_width=64,
        cnn_side=224,
        cnn_batch=64,
        cnn_classes=1000,
        lm_vocab=50257,
        lm_d=768,
        lm_layers=12,
        lm_heads=12,
        lm_context=512,
        lm_batch=8,
        overhead_steps=32,
        overhead_repeats=5,
        distributed_steps=6,
    )


# -- 1. bit-identity ------------------------------------------------------------------------------------
@dataclass
class IdentityCase:
    """One configuration audited against its plain twin."""

    name: str
    model: str  # "mlp", "mlp_dropout", "bn_cnn", "lm"
    optimizer: str  # "adamw", "adamw_fused", "sgd_momentum", "sgd_nesterov"
    autocast: torch.dtype | None = None
    scaler: bool = False
    clip: bool = False
    api: str = "watch"  # or "step"
    every: int = 1


IDENTITY_CASES = [
    IdentityCase("fp32 · MLP · AdamW", "mlp", "adamw"),
    IdentityCase("bf16 autocast · MLP + Dropout · AdamW", "mlp_dropout", "adamw", autocast=torch.bfloat16),
    IdentityCase(
        "fp16 autocast + GradScaler · MLP + Dropout · SGD momentum · clipping",
        "mlp_dropout",
        "sgd_momentum",
        autocast=torch.float16,
        scaler=True,
        clip=True,
    ),
    IdentityCase("fused AdamW · fp32 · MLP", "mlp", "adamw_fused"),
    IdentityCase(
        "fused AdamW + fp16 GradScaler · MLP + Dropout",
        "mlp_dropout",
        "adamw_fused",
        autocast=torch.float16,
        scaler=True,
    ),
    IdentityCase("BatchNorm + Dropout CNN · SGD Nesterov · every=2", "bn_cnn", "sgd_nesterov", every=2),
    IdentityCase("BatchNorm + Dropout CNN · AdamW · audit.step", "bn_cnn", "adamw", api="step"),
    IdentityCase("transformer LM + Dropout · bf16 autocast · AdamW", "lm", "adamw", autocast=torch.bfloat16),
]


def identity_setup(case: IdentityCase, device: torch.device, steps: int) -> tuple[nn.Module, Callable, list]:
    """(model on ``device``, loss_fn, batches) for a case, the model built from ``SEED``."""
    seed_all(SEED)
    if case.model.startswith("mlp"):
        model = mlp(64, 0.2 if case.model == "mlp_dropout" else 0.0)
        return model.to(device), classify, vector_batches(steps, 32, device)
    if case.model == "bn_cnn":
        return bn_dropout_cnn().to(device), classify, image_batches(steps, 16, 16, 10, device)
    model = GPTLike(vocab=256, d=64, layers=2, heads=4, context=32, dropout=0.1)
    return model.to(device), next_token, token_batches(steps, 8, 32, 256, device)


def make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    """The optimizer a case names."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True)


def train_case(
    case: IdentityCase, device: torch.device, steps: int, audited: bool, folder: Path
) -> tuple[dict[str, torch.Tensor], Audit | None]:
    """Train one case for ``steps`` steps, audited or not; return everything training leaves behind, and the audit."""
    model, loss_fn, batches = identity_setup(case, device, steps)
    optimizer = make_optimizer(case.optimizer, model.parameters())
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12) if case.scaler else None
    loss_fn = with_autocast(loss_fn, device, case.autocast)
    audit = Audit(model, optimizer, loss_fn, run=folder, every=case.every) if audited else None
    seed_all(SEED + 1)  # the stream dropout draws from during training
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler's skipped steps, deterministic-algorithm notes
        for index, batch in enumerate(batches):
            if case.api == "step":
                if audit is not None:
                    losses.append(audit.step(batch).detach())
                    continue
                optimizer.zero_grad()
                loss = loss_fn(model, batch)
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
                continue
            block = audit.watch(batch) if audit is not None else contextlib.nullcontext()
            with block as handle:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                if handle is not None and index % 2 == 0:
                    handle.loss = loss  # half the steps hand the loss over, half are re-measured
                (scaler.scale(loss) if scaler is not None else loss).backward()
                if case.clip:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
            losses.append(loss.detach())
    if audit is not None:
        audit.close()
    return snapshot(model, optimizer, scaler, losses, device), audit


def snapshot(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, losses: list[torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Weights, buffers, optimizer and scaler state, losses and RNG states as named tensors."""
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"optimizer.{index}.{key}"] = torch.as_tensor(value).clone()
    if scaler is not None:
        for key, value in scaler.state_dict().items():
            out[f"scaler.{key}"] = torch.as_tensor(value)
    out["losses"] = torch.stack([loss.float() for loss in losses])
    out["rng.cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors are not ``torch.equal`` (or present on one side only)."""
    names = sorted(set(a) ^ set(b))
    names += [k for k in a if k in b and not (a[k].shape == b[k].shape and torch.equal(a[k], b[k].to(a[k].device)))]
    return names


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels (cuDNN, cuBLAS, scatter) inside, the previous settings restored afterwards."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def section_identity(device: torch.device, sizes: Sizes, folder: Path) -> dict:
    """Audited vs plain, bit for bit, for every identity case."""
    rows, failures, inconclusive = [], [], []
    with deterministic(device):
        for number, case in enumerate(IDENTITY_CASES):
            row: dict[str, Any] = {"case": case.name}
            try:
                plain, _ = train_case(case, device, sizes.identity_steps, False, folder / f"id{number}-a")
                control, _ = train_case(case, device, sizes.identity_steps, False, folder / f"id{number}-b")
                audited, audit = train_case(case, device, sizes.identity_steps, True, folder / f"id{number}-c")
                assert audit is not None
                errors = [r.get("error", "") for r in audit.records if r.get("verdict") == "error"]
                control_diff, audit_diff = differences(plain, control), differences(plain, audited)
                row.update(
                    compared=len(plain),
                    records=len(audit.records),
                    skipped=audit.skipped_steps,
                    errors=len(errors),
                    control="equal" if not control_diff else f"differs: {', '.join(control_diff[:3])}",
                    audited="equal" if not audit_diff else f"differs: {', '.join(audit_diff[:3])}",
                )
                if control_diff:
                    row["status"] = "INCONCLUSIVE (the plain run is not deterministic)"
                    inconclusive.append(
                        f"identity · {case.name}: two plain runs differ in {', '.join(control_diff[:3])}"
                    )
                elif audit_diff or errors or not audit.records:
                    row["status"] = "FAIL"
                    reason = (
                        f"differs in {', '.join(audit_diff[:3])}"
                        if audit_diff
                        else f"error record: {errors[0]}"
                        if errors
                        else "no record"
                    )
                    failures.append(f"identity · {case.name}: {reason}"[:240])
                else:
                    row["status"] = "PASS"
            except Exception as error:  # noqa: BLE001 — a failed check is reported, the script goes on
                row["status"] = f"FAIL: {first_line(error)}"
                failures.append(f"identity · {case.name}: {first_line(error)}")
            rows.append(row)
    columns = ["case", "compared", "records", "skipped", "errors", "control", "audited", "status"]
    note = (
        f"{sizes.identity_steps} steps per run, seeds equal; `compared`: tensors checked with torch.equal "
        "(weights, buffers, optimizer and GradScaler state, per-step losses, CPU"
        + (" and CUDA" if device.type == "cuda" else "")
        + " RNG state); `control`: a second plain run against "
        "the first; `skipped`: steps GradScaler skipped (inf/NaN gradients)."
    )
    return {"columns": columns, "rows": rows, "failures": failures, "inconclusive": inconclusive, "note": note}


# -- 2. host-device synchronisations --------------------------------------------------------------------
def count_syncs(action: Callable[[], Any]) -> int:
    """How many synchronising CUDA calls ``action`` makes (sync debug mode must be "warn")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def sync_loop(
    case: IdentityCase, device: torch.device, audit_every: int | None, steps: int, folder: Path
) -> list[tuple[bool, int]]:
    """(audited?, syncs) per step of a case's loop; ``audit_every`` None: the plain loop."""
    model, loss_fn, batches = identity_setup(case, device, 4)
    optimizer = make_optimizer(case.optimizer, model.parameters())
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12) if case.scaler else None
    loss_fn = with_autocast(loss_fn, device, case.autocast)
    audit = Audit(model, optimizer, loss_fn, run=folder, every=audit_every) if audit_every else None

    def one_step(batch: Any) -> None:
        """One training step as the case writes it."""
        if audit is not None and case.api == "step":
            audit.step(batch)
            return
        block = audit.watch(batch) if audit is not None else contextlib.nullcontext()
        with block as handle:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            if handle is not None:
                handle.loss = loss
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()

    for batch in batches[:2]:  # warm-up outside the count when plain: lazy CUDA/cuDNN initialisation
        if audit is None:
            one_step(batch)
    counts = []
    for index in range(steps):
        due = audit is not None and audit.due()
        batch = batches[index % len(batches)]
        counts.append((due, count_syncs(lambda batch=batch: one_step(batch))))
    if audit is not None:
        audit.close()
    return counts


SYNC_CASES = [
    IdentityCase("MLP · AdamW · watch", "mlp", "adamw"),
    IdentityCase("BatchNorm + Dropout CNN · SGD Nesterov · audit.step", "bn_cnn", "sgd_nesterov", api="step"),
    IdentityCase(
        "fused AdamW + fp16 GradScaler · watch", "mlp_dropout", "adamw_fused", autocast=torch.float16, scaler=True
    ),
    IdentityCase("transformer LM · bf16 autocast · AdamW · watch", "lm", "adamw", autocast=torch.bfloat16),
]


def section_syncs(device: torch.device, sizes: Sizes, folder: Path) -> dict:
    """Synchronising calls per plain, audited and unaudited step; unaudited must be 0."""
    columns = [
        "loop",
        "plain step",
        "audited step (first)",
        "audited step (later, median)",
        "unaudited step (max)",
        "status",
    ]
    if device.type != "cuda":
        return {"columns": columns, "rows": [], "failures": [], "skipped": "skipped: no GPU"}
    rows, failures, inconclusive = [], [], []
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        canary = count_syncs(lambda: torch.ones(1, device=device).item())
        if canary < 1:
            raise RuntimeError("sync debug mode reported nothing for tensor.item(): the count cannot be trusted")
        every = 4
        for number, case in enumerate(SYNC_CASES):
            row: dict[str, Any] = {"loop": case.name}
            try:
                plain = [n for _, n in sync_loop(case, device, None, sizes.sync_steps, folder / f"s{number}p")]
                steps = sync_loop(case, device, every, every * sizes.sync_steps, folder / f"s{number}a")
                audited = [n for due, n in steps if due]
                unaudited = [n for due, n in steps if not due]
                row.update(
                    {
                        "plain step": f"{max(plain)} (max)",
                        "audited step (first)": audited[0],
                        "audited step (later, median)": statistics.median(audited[1:]) if len(audited) > 1 else "",
                        "unaudited step (max)": max(unaudited),
                    }
                )
                if max(unaudited) == 0:
                    row["status"] = "PASS"
                elif max(unaudited) <= max(plain):
                    row["status"] = f"INCONCLUSIVE (the plain loop itself syncs {max(plain)}×)"
                    inconclusive.append(f"syncs · {case.name}: the plain loop itself syncs {max(plain)}× per step")
                else:
                    row["status"] = "FAIL"
                    failures.append(
                        f"syncs · {case.name}: {max(unaudited)} syncs on an unaudited step (plain loop: {max(plain)})"
                    )
            except Exception as error:  # noqa: BLE001 — a failed check is reported, the script goes on
                row["status"] = f"FAIL: {first_line(error)}"
                failures.append(f"syncs · {case.name}: {first_line(error)}")
            rows.append(row)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    note = (
        f"every={every}, {sizes.sync_steps} audited and {3 * sizes.sync_steps} unaudited steps per loop, "
        f'{sizes.sync_steps} plain steps; counted with torch.cuda.set_sync_debug_mode("warn"). The first '
        "audited step also measures the rounding noise once (a float64 copy of the model)."
    )
    return {"columns": columns, "rows": rows, "failures": failures, "inconclusive": inconclusive, "note": note}


# -- 3. overhead ------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """A model, its loss, its optimizer factory and a cycle of batches."""

    name: str
    model: nn.Module
    loss_fn: Callable
    optimizer: Callable[[Any], torch.optim.Optimizer]
    batches: list


def overhead_workloads(device: torch.device, sizes: Sizes) -> list[Callable[[], Workload]]:
    """Factories of the ResNet-18-like and GPT-2-small-like workloads at ``sizes``."""
    autocast = torch.bfloat16 if device.type == "cuda" else None

    def cnn() -> Workload:
        """ResNet-18-like CNN, SGD momentum, fp32."""
        seed_all(SEED)
        model = ResNetLike(sizes.cnn_width, sizes.cnn_classes).to(device)
        params = sum(p.numel() for p in model.parameters())
        return Workload(
            f"ResNet-18-like CNN ({millions(params)} params), batch {sizes.cnn_batch} × 3×"
            f"{sizes.cnn_side}², fp32, SGD momentum",
            model,
            classify,
            lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
            image_batches(4, sizes.cnn_batch, sizes.cnn_side, sizes.cnn_classes, device),
        )

    def lm() -> Workload:
        """GPT-2-small-like LM, AdamW, bf16 autocast on a GPU."""
        seed_all(SEED)
        model = GPTLike(sizes.lm_vocab, sizes.lm_d, sizes.lm_layers, sizes.lm_heads, sizes.lm_context).to(device)
        params = sum(p.numel() for p in model.parameters())
        precision = "bf16 autocast" if autocast else "fp32"
        return Workload(
            f"GPT-2-small-like LM ({sizes.lm_layers}×d{sizes.lm_d}, {millions(params)} params), "
            f"batch {sizes.lm_batch} × {sizes.lm_context} tokens, {precision}, AdamW",
            model,
            with_autocast(next_token, device, autocast),
            lambda p: torch.optim.AdamW(p, lr=3e-4, weight_decay=0.1),
            token_batches(4, sizes.lm_batch, sizes.lm_context, sizes.lm_vocab, device),
        )

    return [cnn, lm]


def plain_stepper(workload: Workload) -> Callable[[Any], None]:
    """A copy of the model trained by zero_grad, loss, backward, step."""
    model = copy.deepcopy(workload.model)
    optimizer = workload.optimizer(model.parameters())

    def step(batch: Any) -> None:
        """One plain step."""
        optimizer.zero_grad(set_to_none=True)
        workload.loss_fn(model, batch).backward()
        optimizer.step()

    return step


def audited_stepper(workload: Workload, every: int, folder: Path) -> tuple[Callable[[Any], Any], Audit]:
    """A copy of the model trained through ``audit.step`` at ``every``."""
    model = copy.deepcopy(workload.model)
    audit = Audit(model, workload.optimizer(model.parameters()), workload.loss_fn, run=folder, every=every)
    return audit.step, audit


def timed(step: Callable[[Any], Any], batches: list, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` steps, between two device synchronisations."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for index in range(steps):
        step(batches[index % len(batches)])
    synchronize()
    return (time.perf_counter() - start) / steps


def section_overhead(device: torch.device, sizes: Sizes, folder: Path) -> dict:
    """Plain vs audited (every=1, every=16) per workload: median ms per step and median paired ratio."""
    rows, failures = [], []
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"
    for number, factory in enumerate(overhead_workloads(device, sizes)):
        row: dict[str, Any] = {}
        audits: list[Audit] = []
        try:
            workload = factory()
            row["workload"] = workload.name
            arms: dict[str, Callable[[Any], Any]] = {"plain": plain_stepper(workload)}
            for every in (1, 16):
                arms[f"every={every}"], audit = audited_stepper(workload, every, folder / f"o{number}-{every}")
                audits.append(audit)
            times: dict[str, list[float]] = {name: [] for name in arms}
            for step in arms.values():  # warm-up: allocator, cuDNN autotuning, the first audited step
                timed(step, workload.batches, 16, device)
            names = list(arms)
            for repetition in range(sizes.overhead_repeats):
                shift = repetition % len(names)
                for name in names[shift:] + names[:shift]:
                    times[name].append(timed(arms[name], workload.batches, sizes.overhead_steps, device))
            for audit in audits:
                errors = [r.get("error") for r in audit.records if r.get("verdict") == "error"]
                if errors:
                    raise RuntimeError(f"audit every={audit.every} recorded an error: {errors[0]}")
            row["plain"] = f"{1e3 * statistics.median(times['plain']):.2f} ms"
            for name in names[1:]:
                ratios = [a / p for a, p in zip(times[name], times["plain"])]
                row[name] = f"{1e3 * statistics.median(times[name]):.2f} ms · ×{statistics.median(ratios):.3f}"
                row[f"{name} ratio"] = statistics.median(ratios)
            row["status"] = "ok"
            del arms, workload
        except Exception as error:  # noqa: BLE001 — a failed check is reported, the script goes on
            row["status"] = f"FAIL: {first_line(error)}"
            failures.append(f"overhead · {row.get('workload', number)}: {first_line(error)}")
        finally:
            for audit in audits:
                audit.close()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    torch.backends.cudnn.benchmark = saved
    note = (
        f"{sizes.overhead_repeats} interleaved repetitions (rotating order) of {sizes.overhead_steps} steps "
        "per arm after 16 warm-up steps; cells: median ms per step · median of the per-repetition ratio to "
        "the plain loop; each arm trains its own copy of the model on the same 4 cycled batches."
    )
    return {
        "columns": ["workload", "plain", "every=1", "every=16", "status"],
        "rows": rows,
        "failures": failures,
        "note": note,
    }


# -- 4. single-GPU DDP / FSDP2 -------------------------------------------------------------------------
def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor, else the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def wrap(model: nn.Module, how: str, device: torch.device) -> nn.Module:
    """``model`` under DDP, FSDP2 (``fully_shard`` per layer with parameters, then the root), or unchanged."""
    if how == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if how == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(model)
    return model


def distributed_run(how: str, audited: bool, device: torch.device, steps: int, folder: Path) -> dict:
    """One run of a BatchNorm + Dropout MLP under ``how``; final tensors and the records."""
    seed_all(SEED)
    model = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.GELU(), nn.Dropout(0.2), nn.Linear(64, 10))
    model = wrap(model.to(device), how, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    audit = Audit(model, optimizer, classify, run=folder) if audited else None
    seed_all(SEED + 1)
    for batch in vector_batches(steps, 32, device):
        with audit.watch(batch) if audit is not None else contextlib.nullcontext():
            optimizer.zero_grad()
            classify(model, batch).backward()
            optimizer.step()
    records = []
    if audit is not None:
        records = [{k: v for k, v in r.items() if k != "layers"} for r in audit.records]
        audit.close()
    tensors = [full(p.detach()).clone() for p in model.parameters()] + [full(b).clone() for b in model.buffers()]
    for state in optimizer.state.values():
        tensors += [full(v).clone() for v in state.values() if isinstance(v, torch.Tensor)]
    tensors.append(torch.get_rng_state())
    if device.type == "cuda":
        tensors.append(torch.cuda.get_rng_state(device))
    return {"tensors": tensors, "records": records}


def compare_records(wrapped: list[dict], alone: list[dict]) -> tuple[float, list[str]]:
    """(largest relative difference of the global fields to the unwrapped run's, mismatching field notes)."""
    worst, notes = 0.0, []
    for a, b in zip(wrapped, alone):
        for key in ("loss_before", "loss_after", "first_order", "update_norm", "grad_norm"):
            x, y = a.get(key), b.get(key)
            if not isinstance(x, (int, float)) or not isinstance(y, (int, float)):
                notes.append(f"{key} missing")
                continue
            worst = max(worst, abs(x - y) / max(abs(y), 1e-30))
        for key in ("loss_before", "loss_after", "delta", "verdict"):
            local = a.get(f"local_{key}")
            if f"local_{key}" in a and local != a.get(key):
                notes.append(f"local_{key} {local!r} ≠ {key} {a.get(key)!r}")
        if a.get("world_size", 1) != 1:
            notes.append(f"world_size {a.get('world_size')}")
    return worst, notes


def distributed_child(backend: str, steps: int, folder: str) -> dict:
    """In a child process: init a world-size-1 group on ``backend``; DDP and FSDP2 audited vs plain."""
    import datetime

    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        backend, init_method=f"file://{folder}/store", rank=0, world_size=1, timeout=datetime.timedelta(seconds=120)
    )
    rows = []
    try:
        with deterministic(device):
            alone = distributed_run("none", True, device, steps, Path(folder) / "alone")
            for how in ("ddp", "fsdp2"):
                row: dict[str, Any] = {"wrapper": "DDP" if how == "ddp" else "FSDP2 (fully_shard)", "backend": backend}
                try:
                    plain = distributed_run(how, False, device, steps, Path(folder) / f"{how}-plain")
                    audited = distributed_run(how, True, device, steps, Path(folder) / f"{how}-audited")
                    records = audited["records"]
                    errors = [r.get("error", "") for r in records if r.get("verdict") == "error"]
                    same = len(plain["tensors"]) == len(audited["tensors"]) and all(
                        torch.equal(a, b) for a, b in zip(plain["tensors"], audited["tensors"])
                    )
                    worst, notes = compare_records(records, alone["records"])
                    row.update(
                        {
                            "records": len(records),
                            "errors": len(errors),
                            "bit-identical to plain": "yes" if same else "NO",
                            "vs unwrapped run (max rel. diff)": f"{worst:.1e}",
                            "local_* fields": "equal to global"
                            if any("local_loss_before" in r for r in records)
                            else "absent (world_size 1)",
                        }
                    )
                    problems = (
                        ([f"error record: {errors[0]}"] if errors else [])
                        + ([] if same else ["training changed under the audit"])
                        + ([] if len(records) == steps else [f"{len(records)} records for {steps} steps"])
                        + ([] if worst <= 1e-5 else [f"records differ from the unwrapped run by {worst:.1e}"])
                        + notes
                    )
                    row["status"] = "PASS" if not problems else "FAIL: " + "; ".join(problems)[:200]
                except Exception as error:  # noqa: BLE001 — a failed check is reported, the script goes on
                    row["status"] = f"FAIL: {first_line(error)}"
                rows.append(row)
    finally:
        torch.distributed.destroy_process_group()
    return {"rows": rows}


def section_distributed(device: torch.device, sizes: Sizes, folder: Path) -> dict:
    """DDP and FSDP2 at world_size 1, on NCCL with a GPU (gloo stands in on the CPU), in a child process."""
    columns = [
        "wrapper",
        "backend",
        "records",
        "errors",
        "bit-identical to plain",
        "vs unwrapped run (max rel. diff)",
        "local_* fields",
        "status",
    ]
    rows: list[dict] = []
    if device.type != "cuda":
        rows += [{"wrapper": w, "backend": "nccl", "status": "skipped: no GPU"} for w in ("DDP", "FSDP2 (fully_shard)")]
    backend = "nccl" if device.type == "cuda" else "gloo"
    child_folder = folder / "distributed"
    child_folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--distributed-child",
        backend,
        str(sizes.distributed_steps),
        str(child_folder),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    timeout = 300 if device.type == "cuda" else 45
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(CHILD_MARKER)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the {backend} child process exited with {done.returncode}: {tail}"[:240])
    child_rows = json.loads(lines[-1][len(CHILD_MARKER) :])["rows"]
    failures = [
        f"distributed · {r['wrapper']} on {r['backend']}: {r['status']}" for r in child_rows if r["status"] != "PASS"
    ]
    if device.type != "cuda":
        for row in child_rows:
            row["backend"] += " (CPU stand-in)"
    note = (
        f"world_size 1, init_method file://, {sizes.distributed_steps} steps of a BatchNorm + Dropout MLP "
        "with AdamW through audit.watch; `bit-identical`: weights, buffers, optimizer state and RNG state "
        "against the same run without the audit; `vs unwrapped run`: loss_before, loss_after, first_order, "
        "update_norm and grad_norm against an audited run of the model without a wrapper."
    )
    return {"columns": columns, "rows": rows + child_rows, "failures": failures, "note": note}


# -- driver ---------------------------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    """What the check ran on."""
    info = {
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version()
        )
    return info


def json_safe(value: Any) -> Any:
    """``value`` with NaN/Inf as None and anything else not JSON-serialisable as its string."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


TITLES = {
    "identity": "1. Bit-identity: audited vs plain training",
    "syncs": "2. Host–device synchronisations per step",
    "overhead": "3. Overhead: audited loop vs plain loop",
    "distributed": "4. Single-device DDP and FSDP2",
}
RUNNERS = {
    "identity": section_identity,
    "syncs": section_syncs,
    "overhead": section_overhead,
    "distributed": section_distributed,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU with tiny sizes (automatic without CUDA)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions")
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="which sections to run (default: all)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results JSON to FILE")
    parser.add_argument("--distributed-child", nargs=3, metavar=("BACKEND", "STEPS", "FOLDER"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the sections, print their tables, the overall status and the JSON line; 1 if any check failed."""
    args = parse_args(argv)
    if args.distributed_child:
        backend, steps, folder = args.distributed_child
        print(CHILD_MARKER + json.dumps(json_safe(distributed_child(backend, int(steps), folder))), flush=True)
        return 0
    cpu = args.cpu or not torch.cuda.is_available()
    device = torch.device("cpu") if cpu else torch.device("cuda", 0)
    sizes = choose_sizes(cpu, args.quick)
    info = machine(device)
    started = time.perf_counter()
    label = info.get("gpu") or "CPU (" + ("--cpu" if args.cpu else "no GPU found") + ")"
    print(
        f"# stepaudit GPU check · {label} · torch {info['torch']} · CUDA {info['cuda'] or 'none'}"
        f"{' · --quick' if args.quick else ''}\n",
        flush=True,
    )
    results: dict[str, Any] = {"machine": info, "quick": args.quick, "sections": {}}
    failures: list[str] = []
    inconclusive: list[str] = []
    with tempfile.TemporaryDirectory(prefix="stepaudit-gpu-check-") as folder:
        for name in args.sections:
            section_start = time.perf_counter()
            print(f"## {TITLES[name]} ({device.type})\n", flush=True)
            try:
                result = RUNNERS[name](device, sizes, Path(folder))
            except Exception as error:  # noqa: BLE001 — a failed check is reported, the script goes on
                message = f"{name}: {first_line(error)}"
                print(f"FAIL: {message}\n", flush=True)
                if os.environ.get("GPU_CHECK_TRACEBACK"):
                    traceback.print_exc()
                failures.append(message)
                results["sections"][name] = {"failed": message}
                continue
            result["seconds"] = round(time.perf_counter() - section_start, 1)
            if result.get("skipped") and not result["rows"]:
                print(f"{result['skipped']}\n", flush=True)
            else:
                print(table(result["columns"], result["rows"]), flush=True)
                if result.get("note"):
                    print(f"\n{result['note']}", flush=True)
                print(f"\n({result['seconds']} s)\n", flush=True)
            failures += result["failures"]
            inconclusive += result.get("inconclusive", [])
            results["sections"][name] = result
    results.update(
        failures=failures,
        inconclusive=inconclusive,
        passed=not failures,
        seconds=round(time.perf_counter() - started, 1),
    )
    if failures:
        print(f"Overall: FAIL ({len(failures)} check(s) failed)")
        for failure in failures:
            print(f"- {failure}")
    else:
        print("Overall: PASS")
    if inconclusive:
        print(f"Inconclusive (not counted as failures): {len(inconclusive)}")
        for note in inconclusive:
            print(f"- {note}")
    print(f"Total: {results['seconds']} s\n")
    line = json.dumps(json_safe(results), ensure_ascii=False, separators=(",", ":"))
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
