"""Optional probes: ``Probe`` values turned on by name with their own schedule.

``Audit(..., probes={"quadratic": 1, "sharpness": 10})`` runs each named probe on the steps where
``step % every == 0``. A probe (``base.Probe``) declares its fields, options, needs and state; it reads the
shared, lazily computed ``StepContext`` and returns record fields; it never touches the training loop. One
family per folder (``curvature/``, ``data/``), one probe per file where they are independent.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from ..schema_fields import Field
from .base import NEEDS, NoOptions, Options, Probe

__all__ = [
    "NEEDS",
    "Field",
    "NoOptions",
    "Options",
    "Probe",
    "builtin",
    "capture_for",
    "check_inputs",
    "get",
    "implied",
    "known",
    "option_keys",
    "register",
    "register_capture",
    "register_summary",
    "settle_options",
    "summarize",
    "validate",
]

_REGISTRY: dict[str, Probe | Callable] = {}
# Captures registered apart from their probe (``register_capture``); a Probe may also carry its own.
_CAPTURES: dict[str, Callable] = {}
# Packages whose import registers probes; imported on first lookup so start-up stays cheap.
_PROBE_MODULES = ("stepaudit.probes.curvature", "stepaudit.probes.data")
_loaded = False
# Per-run summaries over the probes' fields (``register_summary``), merged into ``Audit.summary()``.
_SUMMARIES: list[Callable[[Sequence[dict]], dict]] = []


def register(probe: Probe | str, **declarations: Any) -> Any:
    """Make a probe available as ``Audit(probes={name: every})``.

    ``register(Probe(...))`` registers a ``Probe``; ``@register(name, fields=..., options=..., ...)`` turns
    a function into one: ``fn(ctx) -> dict``, or ``fn(ctx, options, state) -> dict`` (the ``Probe``
    keywords say which options and state it gets). The context's tensors are the audit's buffers,
    overwritten at the next audited step: a probe that keeps one must copy it.
    """
    if isinstance(probe, Probe):
        if declarations:
            raise TypeError("register(Probe(...)) takes no keywords: they belong to the Probe")
        _REGISTRY[probe.name] = probe
        return probe
    name = probe

    def decorate(fn: Callable) -> Probe:
        plain = _takes_context_only(fn)
        compute = _adapt(fn) if plain else fn
        made = Probe(name, compute, **declarations)
        _REGISTRY[name] = made
        return made

    return decorate


def _takes_context_only(fn: Callable) -> bool:
    """Whether ``fn`` is the one-argument form ``fn(ctx) -> dict``."""
    import inspect

    try:
        parameters = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return True
    return len(parameters) == 1


def _adapt(fn: Callable) -> Callable:
    """``fn(ctx)`` as a ``compute(ctx, options, state)`` (same module and docstring, for ``builtin``)."""

    def compute(ctx: Any, options: Any, state: Any) -> dict:
        return fn(ctx)

    compute.__module__, compute.__doc__, compute.__name__ = fn.__module__, fn.__doc__, getattr(fn, "__name__", "probe")
    return compute


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


def register_summary(fn: Callable[[Sequence[dict]], dict]) -> Callable[[Sequence[dict]], dict]:
    """Decorator: ``fn(records) -> dict`` adds per-run values over a probe family's fields to ``Audit.summary()``."""
    _SUMMARIES.append(fn)
    return fn


def summarize(records: Sequence[dict]) -> dict:
    """Every registered per-run summary over ``records``, merged."""
    _load_builtin()
    out: dict = {}
    for fn in _SUMMARIES:
        out.update(fn(records))
    return out


def implied(audit_options: Mapping[str, Any]) -> dict[str, int]:
    """Probes turned on by an Audit argument (``reference=`` turns on ``reference``), with their schedule."""
    _load_builtin()
    turned_on = {}
    for name in sorted(_REGISTRY):
        argument = get(name).turned_on_by
        if argument and audit_options.get(argument) is not None:
            turned_on[name] = audit_options.get(f"{argument}_every", 1)
    return turned_on


def check_inputs(audit_options: Mapping[str, Any]) -> None:
    """Let every probe refuse the Audit inputs it reads (e.g. reference data that cannot be iterated twice)."""
    _load_builtin()
    for name in sorted(_REGISTRY):
        check = get(name).check_inputs
        if check is not None:
            check(audit_options)


def capture_for(name: str) -> Callable | None:
    """The training-pass capture of probe ``name``, if any."""
    _load_builtin()
    if name in _CAPTURES:
        return _CAPTURES[name]
    found = _REGISTRY.get(name)
    return found.capture if isinstance(found, Probe) else None


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
    return sorted(n for n in _REGISTRY if get(n).module.startswith("stepaudit.probes"))


def get(name: str) -> Probe:
    """The probe registered under ``name`` (a bare function registered directly is read as ``fn(ctx)``)."""
    _load_builtin()
    found = _REGISTRY[name]
    if isinstance(found, Probe):
        return found
    return Probe(name, _adapt(found))


def option_keys() -> list[str]:
    """Every key ``probe_options`` may hold: each probe's name and the option keys it reads, sorted."""
    _load_builtin()
    return sorted({*_REGISTRY, *(k for n in _REGISTRY for k in get(n).options_keys)})


def settle_options(audit_options: dict, probe_options: Mapping[str, Any]) -> None:
    """Check ``probe_options`` against the probes' option types (unknown keys and bad values refused with the
    fix) and keep the parsed options in ``audit_options["settings"]``, one per option key."""
    known_keys = option_keys()
    unknown = sorted(set(probe_options) - set(known_keys))
    if unknown:
        raise ValueError(f"probe_options for unknown probe(s) {', '.join(unknown)}; known: {', '.join(known_keys)}")
    for key, value in probe_options.items():
        if not isinstance(value, Mapping):
            raise TypeError(f"probe_options[{key!r}] must be a dict of options, got {type(value).__name__}")
    audit_options["probe_options"] = dict(probe_options)
    settings = audit_options.setdefault("settings", {})
    readers: dict[str, Probe] = {}
    for name in known():
        probe = get(name)
        readers.setdefault(probe.options_keys[0], probe)
    for key, probe in readers.items():
        if any(k in probe_options for k in probe.options_keys):
            settings[key] = probe.read_options(audit_options).settle(audit_options)


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
        reason = get(name).every_step
        if reason and every != 1:
            raise ValueError(f"{name} needs every step (probes={{{name!r}: 1}}): {reason}")
        checked[name] = every
    return checked


def needing(names: Collection[str], needs: Collection[str]) -> bool:
    """Whether any of the probes ``names`` needs one of ``needs``."""
    wanted = set(needs)
    return any(get(n).needs & wanted for n in names)
