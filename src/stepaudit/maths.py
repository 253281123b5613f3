"""Small numeric helpers shared by the audit, the probes, the doctor and the reports: one copy of each.

Tensor helpers never touch the global RNG and never modify their inputs; number helpers take any
Python value and treat bools as flags, not numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor


# -- tensors -----------------------------------------------------------------------------------------------
def dense(t: Tensor) -> Tensor:
    """A sparse tensor (a sparse gradient) as a dense one; a dense tensor as it is."""
    return t.to_dense() if t.is_sparse else t


def numel(p: Tensor) -> int:
    """Values of a parameter; 0 for a lazy module's parameter not yet initialised."""
    return 0 if isinstance(p, torch.nn.parameter.UninitializedTensorMixin) else p.numel()


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector (differentiable; an empty sequence gives an empty vector)."""
    if len(tensors) == 0:
        return torch.zeros(0)
    return torch.cat([t.reshape(-1) for t in tensors])


def flat_copy(tensors: Iterable[Tensor]) -> Tensor:
    """One detached flat copy of the tensors (a single kernel for the whole model)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Split a flat vector into views shaped (and typed) like ``like``; refuses a size mismatch."""
    sizes = [t.numel() for t in like]
    if vector.dim() != 1 or vector.numel() != sum(sizes):
        raise ValueError(f"vector of shape {tuple(vector.shape)} does not match {sum(sizes)} elements")
    chunks = torch.split(vector, sizes)
    return tuple(c.reshape(t.shape).to(dtype=t.dtype, device=t.device) for c, t in zip(chunks, like))


def views(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Per-parameter views into a flat vector, shaped like ``like`` (no copies, no casts, no checks)."""
    return [v.view_as(t) for v, t in zip(torch.split(flat, [t.numel() for t in like]), like)]


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` promoted to at least float32: sums of a 16-bit dtype's products keep only 8-11 bits."""
    return torch.promote_types(dtype, torch.float32)


def dot(a: Tensor, b: Tensor) -> float:
    """Inner product of two tensors over all elements as a Python float, computed in at least float32."""
    dtype = working_dtype(torch.promote_types(a.dtype, b.dtype))
    return float(torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)))


def dot64(a: Tensor, b: Tensor) -> float:
    """Inner product of two flat vectors as a Python float, computed in float64."""
    return float(torch.dot(a.to(torch.float64), b.to(torch.float64)))


def dot_tensor(a: Tensor, b: Tensor) -> Tensor:
    """a·b over all elements in the tensors' dtype, as a float64 scalar tensor (no host sync)."""
    return torch.dot(a.reshape(-1), b.reshape(-1)).double()


def rademacher(dim: int, generator: torch.Generator | None, dtype: torch.dtype | None, device: Any) -> Tensor:
    """Random ±1 vector drawn on the generator's device (CPU without one), then moved and cast."""
    where = generator.device if generator is not None else torch.device("cpu")
    signs = torch.randint(0, 2, (dim,), generator=generator, device=where)
    return (2 * signs - 1).to(dtype=dtype or torch.get_default_dtype(), device=device)


# -- numbers -----------------------------------------------------------------------------------------------
def is_number(value: Any) -> bool:
    """An int or a float, not a bool (NaN and ±inf included)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return is_number(value) and math.isfinite(value)


def finite(values: Iterable[Any]) -> list[float]:
    """The finite numbers among ``values`` as floats (bools, None, strings, NaN and ±inf dropped)."""
    return [float(v) for v in values if is_finite(v)]
