"""The doctor: named diagnoses ("why isn't my model training?") from step records, most likely root cause first.

``diagnose(run_or_records, meta=None)`` accepts a run folder (active or passive) or a list of records
(``Audit.records``). Each diagnosis is ``{code, severity, confidence, first_step, evidence, fix}``.
``stepaudit doctor script.py`` (see ``cli.py``) produces the records of an unchanged script passively.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .codes import CAUSES, CODES, PRIORITY, RULES
from .diagnosis import SEVERITIES, Diagnosis
from .facts import Facts
from .story import as_consequence, reconcile, strength
from .summary import stored_record

SYMPTOM_DISCOUNT = 0.6  # a finding explained by a cause is less likely to be the thing to fix


def _produces(cause: Diagnosis, effect: Diagnosis) -> bool:
    if cause.code == "loss_wiring" and cause.kind == "init":
        return False  # a large first loss is itself a symptom (of the initialisation or the input scale)
    if effect.kind == "schedule":
        return False  # a schedule that drives the lr to nothing is a fault of its own, whatever else is wrong
    effects = CAUSES.get(cause.code, ())
    return effect.code in effects or f"{effect.code}:{effect.kind}" in effects


def _starts_no_later(cause: Diagnosis, effect: Diagnosis) -> bool:
    if cause.whole_run or effect.whole_run or cause.first_step is None or effect.first_step is None:
        return True
    return cause.first_step <= effect.first_step


def order(found: list[Diagnosis]) -> list[Diagnosis]:
    """Root causes first (by confidence × severity), then each symptom, naming its cause in the evidence."""
    causes: dict[int, Diagnosis] = {}
    for effect in found:
        candidates = [
            c
            for c in found
            if c is not effect and c.severity != "info" and _produces(c, effect) and _starts_no_later(c, effect)
        ]
        # Mutual candidates (a → b and b → a, same start): the one earlier in PRIORITY is the cause.
        candidates = [
            c
            for c in candidates
            if not (_produces(effect, c) and _starts_no_later(effect, c) and _rank(effect) < _rank(c))
        ]
        if candidates:
            causes[id(effect)] = min(
                candidates, key=lambda c: (c.first_step if c.first_step is not None else -1, _rank(c))
            )
    roots = [d for d in found if id(d) not in causes]
    symptoms = [d for d in found if id(d) in causes]
    roots.sort(key=lambda d: -strength(d))
    for symptom in symptoms:
        cause, seen = causes[id(symptom)], {id(symptom)}
        while id(cause) in causes and id(causes[id(cause)]) not in seen:  # follow the chain to its root
            seen.add(id(cause))
            cause = causes[id(cause)]
        symptom.confidence *= SYMPTOM_DISCOUNT
        as_consequence(symptom, cause)
        causes[id(symptom)] = cause
    position = {id(d): i for i, d in enumerate(roots)}
    symptoms.sort(key=lambda d: (position.get(id(causes[id(d)]), len(roots)), -strength(d)))
    return roots + symptoms


def _rank(d: Diagnosis) -> int:
    return PRIORITY.index(d.code) if d.code in PRIORITY else len(PRIORITY)


def healthy(f: Facts, notes: bool = False) -> Diagnosis:
    """Nothing fired: say what was measured, and how sure that is given the run's length."""
    parts = []
    if f.loss_start is not None and f.loss_end is not None:
        parts.append(f"the loss went from {f.loss_start:.4g} to {f.loss_end:.4g} over {f.n_steps} steps")
    if f.update_ratio is not None:
        parts.append(f"median ‖Δw‖/‖w‖ {f.update_ratio:.2g} per step (cs231n: ≈ 1e-3)")
    cos = f.grad_cos_early
    if cos is not None:
        parts.append(f"consecutive-gradient cosine {cos:.2g} early on")
    failed = next((r["capture_error"] for r in f.records if r.get("capture_error")), None)
    if failed and not f.sampled:  # a complex parameter…: say what was not checked rather than pass it over
        parts.append(
            f"the gradient statistics could not be taken ({failed[:80]}): the rules that read them did not run"
        )
    confidence = 0.9 if (f.progress or 0) >= 0.3 else 0.7
    if f.n_steps < 20:
        confidence = 0.4
    return Diagnosis(
        "healthy",
        "info",
        confidence,
        None,
        ("; ".join(parts) or "no problem was measured")
        + ("; only informational notes follow." if notes else "; no rule fired."),
        "nothing to fix",
    )


def diagnose_facts(f: Facts) -> list[dict]:
    """Run every rule on prepared facts; ``healthy`` alone when nothing fires."""
    found = []
    for rule in RULES:
        try:
            diagnosis = rule(f)
        except Exception as error:  # a rule that cannot read odd records must not hide the others
            diagnosis = None
            f.obs.setdefault("rule_errors", {})[rule.__name__] = f"{type(error).__name__}: {error}"
        if diagnosis is not None:
            found.append(diagnosis)
    found = reconcile(found, f)
    if not found:
        return [healthy(f).as_dict()]
    if all(d.severity == "info" for d in found):  # notes, nothing wrong: healthy first, the notes after it
        return [healthy(f, notes=True).as_dict()] + [d.as_dict() for d in order(found)]
    return [d.as_dict() for d in order(found)]


def diagnose(
    run_or_records: str | os.PathLike | Sequence[dict], meta: dict | None = None, observations: dict | None = None
) -> list[dict]:
    """Diagnoses of a run folder or a list of step records (most likely root cause first)."""
    if isinstance(run_or_records, (str, os.PathLike)):
        from ..store import read_run

        stored_meta, steps, layers = read_run(run_or_records)
        by_step: dict = {}
        for row in layers:
            by_step.setdefault(row["step"], []).append({k: v for k, v in row.items() if k != "step"})
        meta = {**stored_meta, **(meta or {})}
        passive = (meta.get("observations") or {}).get("mode") == "passive"
        records = [stored_record({**s, "layers": by_step.get(s["step"], [])}, passive) for s in steps]
    elif isinstance(run_or_records, Sequence):
        records = [dict(r) for r in run_or_records]
    else:
        raise TypeError(
            "diagnose() takes a run folder or a list of step records (e.g. audit.records), "
            f"not {type(run_or_records).__name__}"
        )
    from ..notebook import Diagnoses

    return Diagnoses(diagnose_facts(Facts(records, meta, observations)))


__all__ = ["diagnose", "diagnose_facts", "order", "CODES", "CAUSES", "Diagnosis", "Facts", "SEVERITIES"]
