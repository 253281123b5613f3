"""Capture and restore the training state an audit must not disturb: RNG streams, buffers, autocast."""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


def cuda_devices(model: torch.nn.Module) -> list[int]:
    """CUDA device indices holding the model's tensors (their RNG streams must be replayed too)."""
    if not torch.cuda.is_initialized():  # no tensor can live on a GPU before CUDA is initialised
        return []
    devices = {t.device.index or 0 for t in list(model.parameters()) + list(model.buffers()) if t.is_cuda}
    return sorted(devices)


@dataclass
class RngState:
    """The CPU generator state plus the generator state of every CUDA device the model lives on.

    ``host``: also Python's ``random`` and NumPy's legacy global generator, for models that draw
    from them in their forward (layer drop written with ``random.random()``). Reading NumPy's state
    costs ~60 µs, so the audit tracks them only after it has seen a training pass draw from them.
    """

    cpu: torch.Tensor
    cuda: dict[int, torch.Tensor] = field(default_factory=dict)
    host: tuple | None = None

    @classmethod
    def capture(cls, cuda_devices: list[int], host: bool = False) -> RngState:
        """Snapshot the generators now (cheap: a few kB copied)."""
        cuda = {d: torch.cuda.get_rng_state(d) for d in cuda_devices}
        return cls(torch.get_rng_state(), cuda, host_state() if host else None)

    def apply(self) -> None:
        """Set the generators to this snapshot."""
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)
        if self.host is not None:
            python, numpy_state = self.host
            random.setstate(python)
            if numpy_state is not None:
                sys.modules["numpy"].random.set_state(numpy_state)


# How many live audits track Python's and NumPy's generators; while any does, every re-evaluation saves
# and restores them, including those with no state to replay (a reference batch, an un-hooked micro-batch).
_HOST_TRACKERS = [0]


def count_host_tracker(delta: int) -> None:
    """An audit starts (+1) or stops (−1) tracking Python's and NumPy's generators."""
    _HOST_TRACKERS[0] = max(0, _HOST_TRACKERS[0] + delta)


def host_state() -> tuple:
    """(Python ``random`` state, NumPy legacy global state or None when NumPy is not imported)."""
    numpy = sys.modules.get("numpy")
    return random.getstate(), (numpy.random.get_state() if numpy is not None else None)


def same_host_state(a: tuple, b: tuple) -> bool:
    """Whether two ``host_state()`` snapshots are equal (no draw happened in between)."""
    if a[0] != b[0] or (a[1] is None) != (b[1] is None):
        return False
    if a[1] is None:
        return True
    numpy = sys.modules["numpy"]
    return all(numpy.array_equal(x, y) if isinstance(x, numpy.ndarray) else x == y for x, y in zip(a[1], b[1]))


@dataclass(frozen=True)
class AutocastState:
    """Which autocast regions were active at the training forward, so a re-evaluation uses the same."""

    regions: tuple[tuple[str, torch.dtype], ...] = ()

    @classmethod
    def capture(cls) -> AutocastState:
        """Read the autocast state of the CPU and CUDA device types."""
        regions = []
        for device_type in ("cpu", "cuda"):
            try:
                if torch.is_autocast_enabled(device_type):
                    regions.append((device_type, torch.get_autocast_dtype(device_type)))
            except (RuntimeError, TypeError, AttributeError):  # device type unsupported by this build
                continue
        return cls(tuple(regions))

    def entered(self) -> contextlib.AbstractContextManager:
        """Run the block under exactly these autocast regions (and no others)."""
        if not self.regions and not _autocast_active():
            return contextlib.nullcontext()  # the common case, without an ExitStack per evaluation
        return self._entered()

    @contextlib.contextmanager
    def _entered(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                wanted = dict(self.regions).get(device_type)
                try:
                    if wanted is not None:
                        # cache off: inside a region that spans optimizer.step(), autocast's cached low-precision
                        # copies of the weights are the pre-step ones
                        stack.enter_context(torch.autocast(device_type, dtype=wanted, cache_enabled=False))
                    elif torch.is_autocast_enabled(device_type):
                        stack.enter_context(torch.autocast(device_type, enabled=False))
                except (RuntimeError, TypeError, AttributeError):
                    continue
            yield


def _autocast_active() -> bool:
    for device_type in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(device_type):
                return True
        except (RuntimeError, TypeError, AttributeError):
            continue
    return False


@contextlib.contextmanager
def preserved(model: torch.nn.Module, rng: RngState | None, autocast: AutocastState | None) -> Iterator[None]:
    """Run a re-evaluation with the training forward's RNG and autocast, then restore RNG, buffers and modes.

    Everything the block touches that training could observe later is put back: the RNG streams
    (CPU and the model's CUDA devices, as ``torch.random.fork_rng`` does, and Python's ``random``;
    NumPy's while an audit tracks it), buffers such as BatchNorm running statistics (bit for bit), and
    each module's ``training`` flag.
    """
    modules = list(model.modules())
    modes = [m.training for m in modules]
    # (owner, name, tensor): a forward may re-bind a buffer (``self.mean = 0.9 * self.mean + …``)
    # instead of updating it in place; the original object goes back, then its saved values.
    slots = [(m, name, b) for m in modules for name, b in m._buffers.items() if b is not None]
    saved = [b.detach().clone() for _, _, b in slots]
    outside = RngState.capture(
        cuda_devices(model), host=(rng is not None and rng.host is not None) or _HOST_TRACKERS[0] > 0
    )
    # Python's generator always goes back (~20 µs): a model may start drawing from it between two of the
    # audit's checks. NumPy's (~120 µs to save and restore) only while tracked.
    python = random.getstate() if outside.host is None else None
    try:
        if rng is not None:
            rng.apply()  # inside the try: a partial apply (CPU set, a CUDA device failed) is undone too
        with (autocast or AutocastState()).entered():
            yield
    finally:
        if slots:
            for module, name, buffer in slots:
                if module._buffers.get(name) is not buffer:
                    module._buffers[name] = buffer
            with torch.no_grad():
                torch._foreach_copy_([b for _, _, b in slots], saved)
        outside.apply()
        if python is not None:
            random.setstate(python)
        for module, mode in zip(modules, modes):
            if module.training is not mode:  # nn.Module.__setattr__ is slow: only write what changed
                module.training = mode


def without_grad(evaluate: Callable[[], float], flags: dict) -> float:
    """``evaluate()`` under ``torch.no_grad()``; with grad mode on if the loss differentiates inside
    (a gradient penalty calls ``torch.autograd.grad``), which ``flags`` remembers for later calls."""
    if not flags.get("loss_needs_grad"):
        try:
            with torch.no_grad():
                return evaluate()
        except RuntimeError as error:
            if "does not require grad" not in str(error):
                raise
            flags["loss_needs_grad"] = True
    with torch.enable_grad():
        return evaluate()


def map_tensors(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor inside nested tuples, lists and dicts (e.g. to cast a batch)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(x, fn) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn)) for k, v in obj.items())
    return obj


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested tuples, lists and dicts, depth first."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value)
