"""FlatBuffers: one audit's reusable flat copies of the weights before, the gradient and Δw, and their sums.

Allocated once per audit and overwritten every audited step. On small models an audited step's cost
is per-call overhead and memory traffic, not arithmetic: a kernel launched right after the training
backward costs about three times what it costs in a tight loop (measured: a 3k-parameter ``cat``
78 µs versus 23 µs). So the number of calls is fixed, whatever the number of parameters: two
``cat`` into preallocated buffers before the step; one in-place subtraction, two multi-tensor norms,
one dot product and one host sync after it.

The buffers belong to the step being audited: a probe that keeps one of them beyond its step must
copy it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .records import per_parameter_sums


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_sparse else t


class FlatBuffers:
    """Flat ``before``, ``grad`` and ``delta_w`` vectors of one parameter list, with per-parameter views."""

    def __init__(self, params: Sequence[torch.Tensor], exact: bool = False) -> None:
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError("stepaudit audits parameters on one device; this model spans "
                             + ", ".join(sorted(str(d) for d in devices)))
        self.params = list(params)
        self.exact = exact
        self.sizes = [p.numel() for p in self.params]
        dtype = self.params[0].dtype
        for p in self.params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        self.before, self.grad, self.delta_w = (
            torch.empty(sum(self.sizes), dtype=dtype, device=self.params[0].device) for _ in range(3))
        self.segments = [torch.split(flat, self.sizes) for flat in (self.before, self.grad, self.delta_w)]
        self.before_views, self.grad_views, self.delta_w_views = (
            [segment.view(p.shape) for segment, p in zip(segments, self.params)] for segments in self.segments)
        self._zeros: dict[int, torch.Tensor] = {}
        self._sources: list[torch.Tensor] = []
        self._pointers: list[int] = []

    def _param_flats(self) -> list[torch.Tensor]:
        """Flat views of the live parameters (rebuilt if a parameter's storage was replaced)."""
        pointers = [p.data_ptr() for p in self.params]
        if pointers != self._pointers:
            self._sources = [p.detach().reshape(-1) for p in self.params]
            # a non-contiguous parameter gives a copy, not a view: never cache that
            self._pointers = pointers if all(s.data_ptr() == p.data_ptr() for s, p in zip(self._sources, self.params)) else []
        return self._sources

    @torch.no_grad()
    def take_before(self) -> None:
        """Before the step: copy the live weights into ``before``."""
        torch.cat(self._param_flats(), out=self.before)

    @torch.no_grad()
    def take_grad(self) -> None:
        """Before the step: copy the gradient the optimizer sees into ``grad`` (zeros where ``.grad`` is None)."""
        grads = []
        for i, p in enumerate(self.params):
            if p.grad is None:
                if i not in self._zeros:
                    self._zeros[i] = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                grads.append(self._zeros[i])
            else:
                grads.append(_dense(p.grad).detach().reshape(-1))
        torch.cat(grads, out=self.grad)

    @torch.no_grad()
    def finish(self, keep_before: bool = True) -> tuple[float, list[list[float]]]:
        """After the step: Δw, then (g·Δw, rows [g·Δw or NaN, ‖g‖², ‖Δw‖², ‖w‖²] per parameter), one host sync.

        Working dtype: fused multi-tensor norms and one BLAS dot product (about 1e-7 relative for
        float32; 16-bit types accumulate in float32); only the total g·Δw is computed. ``exact``:
        float64 products and sums per parameter. ``keep_before=False`` (no probe needs the buffers):
        ``before`` is overwritten in place by ``before − after`` = −Δw, which saves a copy and a pass;
        neither ``before`` nor ``delta_w`` holds its meaning afterwards.
        """
        if self.exact:
            self._delta_into_buffer()
            rows = per_parameter_sums(self.before, self.grad, self.delta_w, self.sizes, exact=True)
            return sum(row[0] for row in rows), rows
        before, grads = list(self.segments[0]), list(self.segments[1])
        if keep_before:
            self._delta_into_buffer()
            norms = self._norms(before + grads + list(self.segments[2]))
            delta, sign = self.delta_w, 1.0
        else:
            norms = self._norms(before + grads)
            torch._foreach_sub_(before, self._param_flats())
            norms = [*norms, *self._norms(before)]
            delta, sign = self.before, -1.0  # IEEE subtraction is antisymmetric: an exact negation
        grad = self.grad
        if grad.dtype in (torch.float16, torch.bfloat16):
            grad, delta = grad.float(), delta.float()
        values = torch.stack([torch.dot(grad, delta).to(norms[0].dtype), *norms]).tolist()
        n = len(self.params)
        rows = [[math.nan, values[1 + n + i] ** 2, values[1 + 2 * n + i] ** 2, values[1 + i] ** 2] for i in range(n)]
        return sign * values[0], rows

    def _delta_into_buffer(self) -> None:
        torch.cat(self._param_flats(), out=self.delta_w)
        self.delta_w.sub_(self.before)

    @staticmethod
    def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        low = tensors[0].dtype in (torch.float16, torch.bfloat16)
        return list(torch._foreach_norm(tensors, 2, torch.float32) if low else torch._foreach_norm(tensors))
