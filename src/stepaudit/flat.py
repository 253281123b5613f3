"""FlatBuffers: one audit's reusable flat copies of the weights before, the gradient and Δw, and their sums.

Allocated at an audited step and overwritten by the next one. Between sparse audited steps they are
released when they are large (over ``KEEP_BYTES``), so ``every=16`` holds no copy of a big model through
the steps in between, and kept when small, where allocating them again cost more than the copies
themselves (fresh pages fault on first touch: 286 µs against 62 µs for the MLP's 2×0.3 MB, measured in
place on a loaded machine).

On small models an audited step's cost is per-call overhead and memory traffic, not arithmetic: a kernel
launched right after the training backward costs about three times what it costs in a tight loop (measured:
a 3k-parameter ``cat`` 78 µs versus 23 µs). So the number of calls is fixed, whatever the number of
parameters: two ``cat`` into preallocated buffers before the step; one in-place subtraction, one BLAS dot
product per sum (Σx² as x·x: no square root to undo) and one host sync after it.

The gradient is borrowed rather than copied on steps where no probe reads it (the caller allows it for
torch's own optimizers only: a write through ``.data`` bumps no version counter): once an earlier audited
step has shown that ``step()`` leaves every ``.grad`` untouched, the sums read the live ``.grad`` after
the step, and each tensor's version counter (bumped by in-place writes) checks that it was not changed in
between. A step that did change it is recorded as failed and later steps copy again.

The buffers belong to the step being audited: a probe that keeps one of them beyond its step must
copy it.

Sharded parameters (FSDP2's DTensors): the buffers hold this rank's shards (``to_local()``), and
the sums are completed across ranks with one all-reduce of [g·Δw, ‖·‖² per parameter] — a shard's
sums of squares and dot products add up to the whole parameter's. Every rank calls ``finish`` on
the same audited steps, so the collective is in lockstep.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .maths import dense
from .records import per_parameter_sums


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor (FSDP2 / tensor parallel): each rank holds part of it."""
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a view of its storage), or the tensor itself."""
    return t.to_local() if is_sharded(t) else t


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in float64 (values: dot products and squared norms of shards)."""
    total = values.double()
    torch.distributed.all_reduce(total)
    return total


class FlatBuffers:
    """Flat ``before``, ``grad`` and ``delta_w`` vectors of one parameter list, with per-parameter views.

    ``before`` and ``grad`` are allocated with the object (at the first audited step) and kept while
    audited steps follow one another; between sparse audited steps ``idle()`` drops them (``release()``) when
    they hold more than ``KEEP_BYTES``, so that an audit with ``every=16`` holds no copy of a large model
    through the 15 training steps in between; ``take_before`` allocates them again. ``delta_w`` exists only
    on steps that need it (a probe due, or ``exact``).
    """

    def __init__(self, params: Sequence[torch.Tensor], exact: bool = False) -> None:
        self.sharded = any(is_sharded(p) for p in params)
        self._live = list(params)  # the parameters themselves (DTensors when sharded)
        self.params = [local(p) for p in params]  # what the buffers hold: this rank's shards
        self.exact = exact
        self.reduced = False  # sharded: whether this step's sums were all-reduced yet (see stand_in)
        self.sizes = [p.numel() for p in self.params]
        self._sources: list[torch.Tensor] = []
        self._pointers: list[int] = []
        # The gradient, borrowed instead of copied: each live ``.grad`` (or None) with its version counter.
        self._lent: list[tuple[torch.Tensor | None, int]] | None = None
        self.grad_kept: bool | None = None  # whether this optimizer's step() leaves .grad untouched (seen once)
        self._versions: list[tuple[torch.Tensor | None, int]] | None = None  # noted at the first copy, to learn it
        self._allocate()  # refuses a model on several devices right away

    KEEP_BYTES = 64 << 20  # all buffers together: ~8M float32 parameters at most are kept between sparse steps

    def idle(self) -> None:
        """Between sparse audited steps: release the buffers if they hold more than ``KEEP_BYTES``."""
        held = [b for b in (self.before, self.grad, self.delta_w) if b is not None]
        if sum(b.numel() * b.element_size() for b in held) > self.KEEP_BYTES:
            self.release()

    def release(self) -> None:
        """Drop the buffers (the next ``take_before`` allocates them again)."""
        self.before = self.grad = self.delta_w = None
        self.before_views = self.grad_views = self.delta_w_views = None
        self._sources, self._pointers = [], []  # a non-contiguous parameter's flat copy, old storage after .to()
        self._segments: list[tuple[torch.Tensor, ...]] = []
        self._zeros: dict[int, torch.Tensor] = {}
        self._lent = self._versions = None  # hold no gradient past a step that raised

    def _allocate(self) -> None:
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ValueError(
                "stepaudit audits parameters on one device; this model spans "
                + ", ".join(sorted(str(d) for d in devices))
            )
        device, dtype = devices.pop(), self._dtype()
        self.before, self.grad = (torch.empty(sum(self.sizes), dtype=dtype, device=device) for _ in range(2))
        self._segments = [torch.split(self.before, self.sizes), torch.split(self.grad, self.sizes)]
        self.before_views, self.grad_views = (self._views(segments) for segments in self._segments)
        self.delta_w = self.delta_w_views = None
        self._zeros = {}

    def _dtype(self) -> torch.dtype:
        """The buffers' dtype: all parameters promoted together."""
        dtype = self.params[0].dtype
        for p in self.params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        return dtype

    def _views(self, segments: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [segment.view(p.shape) for segment, p in zip(segments, self.params)]

    def _param_flats(self) -> list[torch.Tensor]:
        """Flat views of the live parameters (rebuilt if a parameter's storage was replaced)."""
        if self.sharded:
            self.params = [local(p) for p in self._live]  # FSDP may swap a shard's storage between steps
        pointers = [p.data_ptr() for p in self.params]
        if pointers != self._pointers:
            if self.before is not None and (
                self.before.device != self.params[0].device or self.before.dtype != self._dtype()
            ):
                self.release()  # model.to(device) or a dtype change: allocate to match in take_before
            self._sources = [p.detach().reshape(-1) for p in self.params]
            # a non-contiguous parameter gives a copy, not a view: never cache that
            self._pointers = (
                pointers if all(s.data_ptr() == p.data_ptr() for s, p in zip(self._sources, self.params)) else []
            )
        return self._sources

    @torch.no_grad()
    def take_before(self) -> None:
        """Before the step: copy the live weights into ``before`` (allocating the buffers if needed)."""
        sources = self._param_flats()
        if self.before is None:
            self._allocate()
        self.reduced = False
        torch.cat(sources, out=self.before)

    @torch.no_grad()
    def take_grad(self) -> None:
        """Before the step: copy the gradient the optimizer sees into ``grad`` (zeros where ``.grad`` is None)."""
        self._lent = None
        grads = []
        for i, (p, live) in enumerate(zip(self.params, self._live)):
            grad = live.grad
            if grad is None:
                if i not in self._zeros:
                    self._zeros[i] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                grads.append(self._zeros[i])
            else:
                grads.append(dense(local(grad)).detach())
        torch._foreach_copy_(self.grad_views, grads)  # into the parameter-shaped views: no reshape per parameter
        if self.grad_kept is None and not self.sharded:
            noted = self._note_grads()  # finish() learns whether step() leaves .grad as it was
            self._versions = noted if any(grad is not None for grad, _ in noted) else None  # no .grad: no evidence

    def borrow_grad(self) -> bool:
        """Before the step: note the live gradients instead of copying them, where that is known to be exact.

        Exact when the optimizer's ``step()`` leaves every ``.grad`` untouched: seen on an earlier audited
        step (``grad_kept``) and checked again after this one through each tensor's version counter, which
        in-place writes bump (not writes through ``.data``: the caller borrows for torch's optimizers only). Only for dense, unsharded, working-precision float32/float64 gradients;
        otherwise (and on the first audited step) returns False and the caller copies (``take_grad``).
        """
        self._lent = None
        if not self.grad_kept or self.sharded or self.exact or self.grad is None or self.grad.dtype not in _BORROWABLE:
            return False
        lent = self._note_grads()
        for (grad, _), p in zip(lent, self.params):
            if grad is not None and (
                grad.layout != torch.strided or grad.dtype != self.grad.dtype or grad.shape != p.shape
            ):
                return False
        self._lent = lent
        return True

    def _note_grads(self) -> list[tuple[torch.Tensor | None, int]]:
        return [(g, g._version) if (g := live.grad) is not None else (None, 0) for live in self._live]

    def _grads_after_step(self, noted: list[tuple[torch.Tensor | None, int]]) -> bool:
        """Whether every ``.grad`` is the tensor noted before the step, with no in-place write since."""
        return all(
            live.grad is grad and (grad is None or grad._version == version)
            for live, (grad, version) in zip(self._live, noted)
        )

    @torch.no_grad()
    def finish(self, keep_before: bool = True) -> tuple[float, list[list[float]]]:
        """After the step: Δw, then (g·Δw, rows [g·Δw or NaN, ‖g‖², ‖Δw‖², ‖w‖²] per parameter), one host sync.

        Working dtype: BLAS dot products (float32 rounding: ~1e-7 relative on small tensors, ~6e-6 measured
        at 4M elements; 16-bit types accumulate in float32; complex: the real part of the Hermitian product);
        only the total g·Δw is computed, except with a borrowed gradient (per parameter). ``exact``:
        float64 products and sums per parameter. ``keep_before=False`` (no probe needs the buffers):
        ``before`` is overwritten in place by ``before − after`` = −Δw, which saves a copy and a pass;
        ``before`` no longer holds its meaning afterwards and ``delta_w`` is not formed.
        """
        if self.exact:
            self._delta_into_buffer()
            rows = per_parameter_sums(self.before, self.grad, self.delta_w, self.sizes, exact=True)
            if self.sharded:
                rows = _all_reduce_sum(torch.tensor(rows, dtype=torch.float64, device=self.grad.device)).tolist()
                self.reduced = True
            return sum(row[0] for row in rows), rows
        if self.grad_kept is None and self._versions is not None:
            self.grad_kept, self._versions = self._grads_after_step(self._versions), None
        if self._lent is not None:
            return self._finish_lent(keep_before)
        squares = _squares(list(self._segments[0]) + list(self._segments[1]))  # ‖w‖², ‖g‖²
        delta, deltas, sign = self._delta_segments(keep_before)
        squares += _squares(deltas)
        grad = self.grad
        if grad.dtype in _LOW_PRECISION:
            grad, delta = grad.float(), delta.float()
        dot = _dot(grad, delta).to(squares[0].dtype)
        if self.sharded:  # shards' squared norms and dot products add up over ranks
            values = _all_reduce_sum(torch.stack([dot, *squares])).tolist()
            self.reduced = True
        else:
            values = _read([dot, *squares])
        n = len(self.params)
        rows = [[math.nan, values[1 + n + i], values[1 + 2 * n + i], values[1 + i]] for i in range(n)]
        return sign * values[0], rows

    def _delta_segments(self, keep_before: bool) -> tuple[torch.Tensor, list[torch.Tensor], float]:
        """Δw after the step, flat and per parameter, and its sign: formed in ``delta_w`` (``keep_before``), or
        ``before`` overwritten in place by before − after = −Δw, sign −1 (IEEE subtraction is antisymmetric:
        an exact negation). Read ‖w‖² from ``before`` first."""
        if keep_before:
            self._delta_into_buffer()
            return self.delta_w, list(torch.split(self.delta_w, self.sizes)), 1.0
        before = list(self._segments[0])
        torch._foreach_sub_(before, self._param_flats())
        return self.before, before, -1.0

    def _finish_lent(self, keep_before: bool) -> tuple[float, list[list[float]]]:
        """``finish`` with the gradient borrowed (``borrow_grad``): per parameter g·Δw, ‖g‖², ‖Δw‖², ‖w‖²."""
        lent, self._lent = self._lent, None
        if not self._grads_after_step(lent):
            self.grad_kept = False  # from now on the gradient is copied before the step
            raise RuntimeError(
                "optimizer.step() wrote to or replaced .grad on this step, so its gradient sums are unknown; "
                "later audited steps copy the gradient first"
            )
        weights = _squares(list(self._segments[0]))
        _, deltas, sign = self._delta_segments(keep_before)
        present = [i for i, (grad, _) in enumerate(lent) if grad is not None]
        grads = [lent[i][0].reshape(-1) for i in present]
        values = _read(
            [
                *weights,
                *_squares(deltas),
                *_squares(grads),
                *(torch.dot(g, deltas[i]) for g, i in zip(grads, present)),
            ]
        )
        n, m = len(self.params), len(present)
        grad_squares, dots = [0.0] * n, [0.0] * n  # a parameter without .grad: a zero gradient
        for k, i in enumerate(present):
            grad_squares[i], dots[i] = values[2 * n + k], sign * values[2 * n + m + k]
        rows = [[dots[i], grad_squares[i], values[n + i], values[i]] for i in range(n)]
        return math.fsum(dots), rows

    def stand_in(self) -> None:
        """Join this step's all-reduce with NaN (this rank failed before ``finish``), so no peer waits forever."""
        n = len(self.params)
        shape = (n, 4) if self.exact else (1 + 3 * n,)
        _all_reduce_sum(torch.full(shape, math.nan, dtype=torch.float64, device=self.params[0].device))
        self.reduced = True

    def _delta_into_buffer(self) -> None:
        if self.delta_w is None:
            self.delta_w = torch.empty_like(self.before)
            self.delta_w_views = self._views(torch.split(self.delta_w, self.sizes))
        torch.cat(self._param_flats(), out=self.delta_w)
        self.delta_w.sub_(self.before)


_LOW_PRECISION = (torch.float16, torch.bfloat16)
_BORROWABLE = (torch.float32, torch.float64)


def _read(scalars: list[torch.Tensor]) -> list[float]:
    """0-dim tensors as floats: one by one on the CPU (no sync to save: that beats stacking), one sync elsewhere."""
    if scalars[0].device.type == "cpu":
        return [scalar.item() for scalar in scalars]
    return torch.stack(scalars).tolist()


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b for 1-D tensors; complex: Re(Σ conj(a)·b), the first-order change for torch's complex gradient."""
    return torch.vdot(a, b).real if a.is_complex() else torch.dot(a, b)


def _squares(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Σ|x|² of each 1-D tensor: one BLAS dot product each (no square root to undo); 16-bit tensors
    accumulate in float32 through one fused multi-tensor norm, squared."""
    if tensors[0].dtype not in _LOW_PRECISION:
        return [_dot(t, t) for t in tensors]
    try:
        norms = torch._foreach_norm(tensors, 2, torch.float32)
    except (TypeError, RuntimeError):  # torch without the dtype argument
        norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]
    return [norm * norm for norm in norms]
