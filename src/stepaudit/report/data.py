"""A run as the report needs it: numeric columns, layer matrices, summary numbers and the doctor's findings."""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..doctor.summary import LAST_LOSS, is_passive, last_loss, stop_reason
from ..records import summarize
from ..store import read_metrics, read_run
from .scales import fmt

VERDICTS = ("decrease", "increase", "flat", "nonfinite", "error")
NOT_MEASURED = "not measured in passive mode"
# summary fields a passive (doctor) run does not measure: they need the loss after the step on the same batch
PASSIVE_UNMEASURED = ("share_decrease", "share_increase", "share_flat", "median_alpha", "median_delta_over_first_order")
LAST_LOSS_NAME = f"last = {LAST_LOSS}"


@dataclass
class Run:
    """One run read back from its store, with everything the pages draw from it."""

    path: str
    meta: dict
    steps: list[dict]
    layers: list[dict]
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    verdicts: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))
    findings: list[dict] = field(default_factory=list)
    findings_error: str | None = None
    metrics: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # Audit.log: name → (steps, values)

    def _repr_html_(self) -> str:
        """Inline in a notebook: the report's summary cards and main charts."""
        from ..notebook import run_html

        return run_html(self)

    @property
    def passive(self) -> bool:
        """Recorded by ``stepaudit doctor`` (passive capture): no loss after the step, no Δloss, α or verdict."""
        return is_passive(self.meta)

    @property
    def outcome(self) -> str | None:
        """How a doctor run's script failed, in one line (None when it ended normally or for an Audit run)."""
        steps = (self.meta.get("observations") or {}).get("steps")
        return outcome_note(self.meta, steps if isinstance(steps, int) else len(self.steps)) if self.passive else None

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or os.path.basename(os.path.normpath(self.path)) or self.path)

    def has(self, name: str) -> bool:
        """Whether the field was recorded with at least one finite value."""
        column = self.columns.get(name)
        return column is not None and bool(np.isfinite(column).any())

    def xy(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a field, restricted to the steps where it was recorded (finite or ±inf)."""
        values = self.columns[name]
        recorded = ~np.isnan(values)
        return self.columns["step"][recorded], values[recorded]


def load_run(run: str | os.PathLike, diagnose: bool = True) -> Run:
    """Read a run folder and prepare its columns (and the doctor's findings unless ``diagnose=False``)."""
    meta, steps, layers = read_run(run)
    result = Run(
        str(run),
        meta,
        steps,
        layers,
        columns(steps),
        np.array([s.get("verdict") for s in steps], dtype=object),
        metrics=read_metrics(run),
    )
    if diagnose:
        result.findings, result.findings_error = findings(meta, steps, layers)
    return result


def columns(steps: list[dict]) -> dict[str, np.ndarray]:
    """Every numeric field as a float array over the steps (NaN where a step lacks it)."""
    names: dict[str, None] = {}
    for record in steps:  # some fields appear only on some steps (probes with their own schedule)
        names.update(dict.fromkeys(record))
    out = {}
    for name in names:
        values = [s.get(name) for s in steps]
        if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
            out[name] = np.array([math.nan if v is None else float(v) for v in values], dtype=float)
    if "step" not in out:
        out["step"] = np.arange(len(steps), dtype=float)
    return out


def with_layers(steps: list[dict], layers: list[dict]) -> list[dict]:
    """Step records with their ``layers`` lists restored (the shape ``Audit.records`` has)."""
    by_step: dict[int, list[dict]] = defaultdict(list)
    for row in layers:
        by_step[row["step"]].append({k: v for k, v in row.items() if k != "step"})
    return [{**record, "layers": by_step.get(record.get("step"), [])} for record in steps]


def findings(meta: dict, steps: list[dict], layers: list[dict]) -> tuple[list[dict], str | None]:
    """The diagnoses to show, and a note.

    A doctor (passive) run shows the diagnoses the doctor stored when it ran, exactly: the rules saw the
    live records and the run-level observations, and the stored rows hold NaN for every field a step
    did not sample, so diagnosing them again would disagree with what the doctor said. An ``Audit`` run
    gets the diagnoses stored with it plus the doctor's rules on its records.
    """
    stored = [d for d in meta.get("diagnoses") or [] if isinstance(d, dict)]
    if is_passive(meta):
        if "diagnoses" not in meta:
            return [], "this doctor run stored no diagnoses (the doctor did not finish it); run stepaudit doctor again"
        return stored, None
    try:
        from ..doctor import diagnose
    except ImportError:
        return stored, None
    try:
        computed = list(diagnose(with_layers(steps, layers), meta=meta) or [])
    except Exception as error:  # the report must render even when a rule fails
        return stored, f"the doctor failed on this run: {type(error).__name__}: {error}"
    codes = {d.get("code") for d in stored}
    return stored + [d for d in computed if isinstance(d, dict) and d.get("code") not in codes], None


def summary(run: Run) -> dict:
    """Verdict shares, medians and loss trend over the recorded steps (``records.summarize``).

    ``last_loss`` is the doctor's: the median of the last fifth of the losses before any non-finite
    step (``doctor.summary.loss_end``). For a passive run the fields it does not measure are None.
    """
    s = summarize(run.steps, steps_seen=run.meta.get("steps_seen"))
    end = last_loss(run.steps, run.meta)
    s["last_loss"] = end if end is not None else math.nan
    s["passive"] = run.passive
    if run.passive:
        s.update(dict.fromkeys(PASSIVE_UNMEASURED))
    return s


def outcome_note(meta: dict, steps: int) -> str | None:
    """One line on a doctor run's failure, from the outcome it stored (None after a normal end)."""
    status = meta.get("exit_status")
    failure = meta.get("failure") if isinstance(meta.get("failure"), dict) else None
    if not status and not (status is None and meta.get("stopped") == "error"):
        return None
    reason = stop_reason(failure, "the script failed (its traceback is in the run's metadata)")
    if not steps:
        return f"stopped before the first optimizer step: {reason}"
    return f"the script failed after {steps} optimizer steps: {reason}; the findings cover only those steps"


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.10`` after ``layers.9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def layer_matrix(
    layers: list[dict], kind: str, field_name: str, max_columns: int = 160
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(row names, column step edges, mean of log10(value) per row and column span) for a heatmap.

    Averaging in log space is the geometric mean: a cell's colour is the typical order of magnitude
    of the field over the steps it covers.
    """
    per_name: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for row in layers:
        if row.get("kind") == kind:
            value = row.get(field_name)
            if isinstance(value, (int, float)) and value > 0 and math.isfinite(value):
                steps, values = per_name[row["name"]]
                steps.append(row["step"])
                values.append(value)
    names = sorted(per_name, key=natural_key)
    if not names:
        return [], np.array([]), np.zeros((0, 0))
    all_steps = np.unique(np.concatenate([np.asarray(per_name[n][0], float) for n in names]))
    if len(all_steps) <= max_columns:
        edges = np.r_[all_steps - 0.5, all_steps[-1] + 0.5]
    else:
        edges = np.linspace(all_steps[0], all_steps[-1] + 1, max_columns + 1)
    matrix = np.full((len(names), len(edges) - 1), np.nan)
    for r, name in enumerate(names):
        steps, values = (np.asarray(a, float) for a in per_name[name])
        column = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, len(edges) - 2)
        totals = np.bincount(column, weights=np.log10(values), minlength=len(edges) - 1)
        counts = np.bincount(column, minlength=len(edges) - 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            matrix[r] = np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)
    return names, edges, matrix


RESULT_KEYS = (
    "test_accuracy",
    "val_accuracy",
    "accuracy",
    "train_accuracy",
    "val_loss",
    "test_loss",
)  # stored by the run


def stored_result(meta: dict, metrics: dict | None = None) -> str:
    """The run's result: the first one stored in its metadata, e.g. "test accuracy 0.967", else the last value
    of each metric logged with ``Audit.log`` ("val_acc 0.95 at step 900"); "" when none."""
    for key in RESULT_KEYS:
        value = meta.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return f"{key.replace('_', ' ')} {fmt(value)}"
    logged = [(name, steps, values) for name, (steps, values) in (metrics or {}).items() if values][:3]
    return "; ".join(f"{name} {fmt(values[-1])} at step {steps[-1]:,}" for name, steps, values in logged)


def optimizer_label(meta: dict) -> str:
    """The optimizer and its main hyperparameters besides lr, e.g. "SGD (momentum 0.9, nesterov)", "AdamW (betas 0.9/0.999, wd 0.01)"."""
    hyper = hyperparameters(meta)
    parts = []
    if hyper.get("momentum"):
        parts.append(f"momentum {fmt(hyper['momentum'])}" + (", nesterov" if hyper.get("nesterov") else ""))
    if isinstance(hyper.get("betas"), (list, tuple)) and len(hyper["betas"]) == 2:
        parts.append("betas " + "/".join(fmt(b) for b in hyper["betas"]))
    if "alpha" in hyper and not hyper.get("betas"):  # RMSprop's smoothing constant
        parts.append(f"alpha {fmt(hyper['alpha'])}")
    if hyper.get("weight_decay"):
        parts.append(f"wd {fmt(hyper['weight_decay'])}")
    name = str(meta.get("optimizer") or "?")
    return f"{name} ({', '.join(parts)})" if parts else name


def hyperparameters(meta: dict) -> dict[str, Any]:
    """The first parameter group's hyperparameters (lr, momentum, betas, weight decay …)."""
    groups = meta.get("param_groups") or [{}]
    keep = ("lr", "momentum", "betas", "weight_decay", "eps", "nesterov", "dampening", "alpha")
    return {k: groups[0][k] for k in keep if k in groups[0] and groups[0][k] not in (None, False)}
