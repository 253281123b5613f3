"""The Probe type: what a probe is, what it may write, what it needs, and what it keeps between steps.

A probe is a ``Probe`` value: its ``name``; ``compute(ctx, options, state) -> dict`` (the fields of this
step); ``fields``, the fields it may write (schema names, or ``Field``s of its own); ``options``, a dataclass
of typed settings with defaults, read from ``Audit(probe_options={key: {...}})`` and checked at construction;
``needs``, what it reads from the ``StepContext``; ``state``, a factory for the object it keeps across steps
(one per audit, reset when the parameters are re-indexed); ``amends``, the fields it may write into the
previous step's record through ``ctx.amend_previous``. The audit checks every returned field against these
declarations (``check_fields``): an unknown, colliding or badly typed field goes to ``probe_errors``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..maths import is_number
from ..schema_fields import Field

# What a probe may read from the step context (``Probe.needs``); documentation, and the audit keeps the
# weights before the step and Δw only for a step on which a due probe needs them.
NEEDS: dict[str, str] = {
    "weights_before": "ctx.before / ctx.flat_before: the weights before the step",
    "gradient": "ctx.grads / ctx.flat_grad: the gradient the optimizer received",
    "update": "ctx.delta_w / ctx.flat_delta_w: Δw",
    "record": "ctx.record: the core fields of this step (loss_before, delta, first_order, …)",
    "batch": "ctx.parts and the re-evaluations: the step's batch with its random state",
    "hessian": "ctx.hvp(): Hessian-vector products at the old weights",
    "optimizer_state": "ctx.optimizer: its state after the step (second moments, momentum)",
    "reference": "the Audit's reference data (Audit(reference=...))",
    "training_pass": "ctx.captures[name]: what the probe's capture saw of the training forward/backward",
}


def _schema():
    """``stepaudit.schema``, imported on first use (``python -m stepaudit.schema`` must not find it imported)."""
    from .. import schema

    return schema


BUFFERS = frozenset({"weights_before", "update"})  # the audit's flat buffers a probe may need after the step


class Options:
    """Base of a probe's options: a dataclass with typed fields and defaults; ``check`` refuses bad values.

    Subclasses are ``@dataclass`` classes. ``parse`` refuses unknown names and values of the wrong type (an
    int is a float; ``Literal[...]`` lists the choices; ``Any`` takes anything), then calls ``check``.
    """

    def check(self) -> None:
        """Refuse a value outside its range with a one-line ``ValueError`` naming the fix (default: none)."""

    def settle(self, audit_options: Mapping[str, Any]) -> Options:
        """These options with what depends on the audit resolved (default: unchanged), checked at construction."""
        return self

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None, probe: str) -> Options:
        """The options from a ``{name: value}`` mapping, defaults for the rest, checked; errors name the fix."""
        raw = dict(raw or {})
        known = [f.name for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")]
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(
                f"unknown {probe} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known)) or '(none)'}"
            )
        hints = typing.get_type_hints(cls) if raw else {}
        for name, value in raw.items():
            problem = _type_problem(hints.get(name, Any), value)
            if problem:
                raise ValueError(f"{probe} option {name} must be {problem}, got {value!r}")
        options = cls(**raw)
        options.check()
        return options


@dataclass
class NoOptions(Options):
    """The options of a probe that has none."""


def _type_problem(hint: Any, value: Any) -> str:
    """What ``value`` should have been for the annotation ``hint`` (empty: it conforms)."""
    if hint is Any:
        return ""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        return "" if value in choices else "one of " + ", ".join(repr(c) for c in choices)
    if origin in (typing.Union, types.UnionType):
        problems = [_type_problem(h, value) for h in typing.get_args(hint)]
        return "" if "" in problems else " or ".join(problems)
    if hint is type(None):
        return "" if value is None else "None"
    if hint is bool:
        return "" if isinstance(value, bool) else "True or False"
    if hint is int:
        return "" if isinstance(value, int) and not isinstance(value, bool) else "an int"
    if hint is float:
        return "" if is_number(value) else "a number"
    if hint is str:
        return "" if isinstance(value, str) else "a str"
    return "" if isinstance(value, origin or hint) else f"a {getattr(hint, '__name__', hint)}"


def _declare(item: str | Field, probe: str) -> Field:
    """A probe's declared field: a schema field by name, or a ``Field`` of its own (never a core field)."""
    if isinstance(item, Field):
        spec = _schema().field(item.name)
        if spec is not None and spec.type != item.type:
            raise ValueError(
                f"probe {probe!r}: field {item.name!r} is a {spec.type} in the schema, not {item.type}; "
                f"declare it by name or rename it"
            )
        spec = spec or item
    else:
        spec = _schema().field(item)
        if spec is None:
            raise ValueError(
                f"probe {probe!r}: {item!r} is not a schema field; declare it as "
                f"Field({item!r}, 'float', unit, meaning, 'probe:{probe}') or as {{{item!r}: 'float'}}"
            )
    if is_core_field(spec.name):
        raise ValueError(f"probe {probe!r}: {spec.name!r} is a core field; a probe cannot write it, rename it")
    return spec


def declare_fields(fields: Collection[str | Field] | Mapping[str, str | Field], probe: str) -> tuple[Field, ...]:
    """Normalise a probe's field declaration: names, ``Field``s, or a ``{name: type or Field}`` mapping."""
    if isinstance(fields, Mapping):
        items = [
            spec if isinstance(spec, Field) else Field(name, spec, "", "", f"probe:{probe}")
            for name, spec in fields.items()
        ]
    else:
        items = list(fields)
    declared = tuple(_declare(item, probe) for item in items)
    names = [f.name for f in declared]
    if len(set(names)) != len(names):
        raise ValueError(f"probe {probe!r} declares a field twice: {', '.join(sorted(names))}")
    return declared


def is_core_field(name: str) -> bool:
    """Whether ``name`` is a field only the audit itself writes (core, distributed or passive in the schema)."""
    spec = _schema().field(name)
    return spec is not None and not any(w.startswith("probe:") for w in spec.writer.split(", "))


@dataclass(frozen=True, eq=False)
class Probe:
    """One probe: a name, ``compute(ctx, options, state) -> dict`` and the declarations the audit checks."""

    name: str
    compute: Callable[[Any, Any, Any], dict]
    fields: tuple[Field, ...] | Collection[str | Field] | Mapping[str, str | Field] = ()
    options: type[Options] = NoOptions
    options_keys: tuple[str, ...] = ()  # the probe_options entries it reads, merged in order; () = (name,)
    needs: frozenset[str] = frozenset(NEEDS)
    state: Callable[[], Any] | None = None  # factory of its state across steps (None: stateless)
    state_key: str = ""  # a family sharing one state object names it here; "" = name
    amends: tuple[str, ...] = ()  # fields it may write into the previous step's record (ctx.amend_previous)
    every_step: str = ""  # non-empty: it must run every step, and this says why
    capture: Callable | None = None  # ``fn(model, names, params, audit_options) -> capture | None`` (observe only)
    collective: Callable[[Options], bool] | None = None  # whether, under these options, it issues collectives
    turned_on_by: str = ""  # an Audit argument that, given, schedules it every ``<argument>_every`` steps
    check_inputs: Callable[[Mapping[str, Any]], None] | None = None  # refuses unusable Audit inputs it reads
    doc: str = ""
    _by_name: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Normalise the declarations and refuse inconsistent ones at once."""
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"probe name {self.name!r} must be a word (letters, digits, _)")
        declared = declare_fields(self.fields, self.name)
        object.__setattr__(self, "fields", declared)
        object.__setattr__(self, "options_keys", tuple(self.options_keys) or (self.name,))
        object.__setattr__(self, "needs", frozenset(self.needs))
        object.__setattr__(self, "_by_name", {f.name: f for f in declared})
        unknown = sorted(self.needs - set(NEEDS))
        if unknown:
            raise ValueError(f"probe {self.name!r}: unknown need(s) {', '.join(unknown)}; known: {', '.join(NEEDS)}")
        missing = [n for n in self.amends if n not in self._by_name]
        if missing:
            raise ValueError(f"probe {self.name!r} amends undeclared field(s) {', '.join(missing)}; add them to fields")
        if not (isinstance(self.options, type) and issubclass(self.options, Options)):
            raise TypeError(f"probe {self.name!r}: options must be an Options dataclass, got {self.options!r}")
        if not self.doc:
            object.__setattr__(self, "doc", (getattr(self.compute, "__doc__", None) or "").strip().split("\n")[0])

    @property
    def module(self) -> str:
        """The module that defines the probe's computation (built-in probes live in ``stepaudit.probes``)."""
        return getattr(self.compute, "__module__", "") or ""

    def declared(self, name: str) -> Field | None:
        """The declared field ``name``, or None."""
        return self._by_name.get(name)

    def read_options(self, audit_options: Mapping[str, Any]) -> Options:
        """Its options for an audit: those set by ``configure`` if any, else parsed from ``probe_options``."""
        settled = (audit_options.get("settings") or {}).get(self.options_keys[0])
        if isinstance(settled, self.options):
            return settled
        raw = audit_options.get("probe_options") or {}
        merged = {k: v for key in self.options_keys for k, v in (raw.get(key) or {}).items()}
        return self.options.parse(merged, self.options_keys[0])

    def __call__(self, ctx: Any) -> dict:
        """The probe's fields for the step in ``ctx`` (its options and state taken from the context)."""
        return self.compute(ctx, self.read_options(ctx.options), ctx.state_of(self))

    def check_fields(self, fields: Any, core: Collection[str] = ()) -> tuple[dict, list[str]]:
        """The returned fields the probe may write, and one message per field it may not.

        A field is refused when it is not declared (unknown), belongs to the audit (a core field, or one
        in ``core``: what the audit already wrote this step), or has a value of another type.
        """
        if not isinstance(fields, Mapping):
            return {}, [f"returned {type(fields).__name__}, not a dict of fields"]
        accepted, problems = {}, []
        for name, value in fields.items():
            spec = self._by_name.get(name) if isinstance(name, str) else None
            if not isinstance(name, str):
                problems.append(f"field {name!r} is not a str")
            elif name in core or is_core_field(name):
                problems.append(f"field {name!r} collides with a core field; rename it")
            elif spec is None:
                problems.append(f"unknown field {name!r}: declare it in the probe's fields")
            elif not _schema().conforms(spec, value):
                problems.append(f"field {name!r} must be {spec.type}, got {type(value).__name__} {value!r:.60}")
            else:
                accepted[name] = value
        return accepted, problems

    def check_amendments(self, fields: Mapping[str, Any]) -> tuple[dict, list[str]]:
        """The fields for the previous record the probe may write (its ``amends``), and messages for the rest."""
        accepted, problems = self.check_fields(fields)
        for name in list(accepted):
            if name not in self.amends:
                del accepted[name]
                problems.append(f"field {name!r} may not amend the previous record; list it in amends")
        return accepted, problems
