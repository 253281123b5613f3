"""Optional probes: ``probe(ctx) -> dict`` functions turned on by name with their own schedule.

``Audit(..., probes={"quadratic": 1, "sharpness": 10})`` runs each named probe on the steps where
``step % every == 0``. A probe reads the shared, lazily computed ``StepContext`` and returns record
fields; it never touches the training loop. New quantities are new probes, registered here.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping

Probe = Callable[["StepContext"], dict]  # noqa: F821 - StepContext lives in stepaudit.context

_REGISTRY: dict[str, Probe] = {}
# Optional companions that watch the training forward/backward of a step on which the probe is due.
_CAPTURES: dict[str, Callable] = {}
# Modules whose import registers probes; imported on first lookup so start-up stays cheap.
_PROBE_MODULES = ("stepaudit.probes.curvature", "stepaudit.probes.data")
_loaded = False


def register(name: str) -> Callable[[Probe], Probe]:
    """Decorator: make ``fn`` available as ``Audit(probes={name: every})``.

    The context's tensors (``ctx.before``, ``ctx.grads``, ``ctx.delta_w`` and their flat forms) are
    the audit's buffers, overwritten at the next audited step: a probe that keeps one must copy it.
    """

    def decorate(fn: Probe) -> Probe:
        _REGISTRY[name] = fn
        return fn

    return decorate


def register_capture(name: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn(model, names, params, options) -> capture | None`` runs before the training
    forward of a step on which probe ``name`` is due. The capture's ``stop()`` is called before the
    optimizer step (after the training backward), and the probe finds it in ``ctx.captures[name]``.
    A capture may only observe: hooks that record tensors, never change a value training computes.
    """

    def decorate(fn: Callable) -> Callable:
        _CAPTURES[name] = fn
        return fn

    return decorate


def capture_for(name: str) -> Callable | None:
    """The training-pass capture registered for probe ``name``, if any."""
    _load_builtin()
    return _CAPTURES.get(name)


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _PROBE_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as error:  # a broken optional probe module must not break training
            if getattr(error, "name", None) == module:
                continue  # not part of this installation
            warnings.warn(f"stepaudit: probes in {module} are unavailable: {error}", stacklevel=3)


def known() -> list[str]:
    """Names of all registered probes, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def builtin() -> list[str]:
    """Names of the probes stepaudit ships (not those a user or a test registered), sorted."""
    _load_builtin()
    return sorted(n for n, fn in _REGISTRY.items() if getattr(fn, "__module__", "").startswith("stepaudit.probes"))


def get(name: str) -> Probe:
    """The probe registered under ``name``."""
    _load_builtin()
    return _REGISTRY[name]


def validate(probes: Mapping[str, int] | None) -> dict[str, int]:
    """Check a ``{name: every}`` mapping; unknown names and bad schedules are refused with the fix."""
    if probes is None or (isinstance(probes, Mapping) and not probes):
        return {}
    if not isinstance(probes, Mapping):
        names = [probes] if isinstance(probes, str) else probes
        if isinstance(names, (list, tuple, set, frozenset)) and names and all(isinstance(n, str) for n in names):
            example = "{" + ", ".join(f"{n!r}: 1" for n in names) + "}"  # the user's own names, every step
        else:
            example = "{'quadratic': 1}"
        raise TypeError(
            f"probes must be a dict {{name: every}} (run the probe every N-th step), e.g. "
            f"probes={example}; got {type(probes).__name__} {probes!r}"
        )
    names = known()
    checked = {}
    for name, every in probes.items():
        if name not in _REGISTRY:
            raise ValueError(f"unknown probe {name!r}; known probes: {', '.join(names) or '(none)'}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"probe {name!r}: every must be a positive int (1 = every step), got {every!r}")
        checked[name] = every
    return checked
