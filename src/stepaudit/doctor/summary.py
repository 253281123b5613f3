"""Run-level numbers the doctor's evidence and the report both show, with one definition each.

The last loss is the **median of the last fifth** of the run's losses (at least ``smoothing`` steps),
taken over the finite losses before the first non-finite step, as ``Facts.loss_end`` measures it for the
rules. The report reads stored rows, where the store keeps NaN as NULL and reads every NULL of a numeric
column back as NaN: ``stored_record`` turns a row back into the record the rules would see (a field the
step never wrote is absent, not NaN), as ``stepaudit.diagnose(run_folder)`` does.

Nothing here imports the rules, so the report can use it without loading them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import median

from ..maths import is_number

LAST_LOSS = "median of the last fifth"  # the name the report and the doctor give the last loss

_ALWAYS = ("loss_before",)
_AUDITED = (
    "loss_after",
    "delta",
    "first_order",
    "remainder",
    "grad_norm",
    "update_norm",
    "weight_norm",
    "update_ratio",
    "descent_cos",
)


def is_passive(meta: dict) -> bool:
    """Whether the run was recorded by ``stepaudit doctor`` (passive capture) rather than an ``Audit``."""
    observations = meta.get("observations") if isinstance(meta.get("observations"), dict) else {}
    return meta.get("mode") == "passive" or observations.get("mode") == "passive"


def stop_reason(failure: dict | None, fallback: str = "the script failed") -> str:
    """A script's failure in one line: ``Type: message (file:line)`` or ``the script exited with status N``."""
    if not failure:
        return fallback
    where = f" ({failure['file']}:{failure['line']})" if failure.get("file") else ""
    if failure.get("type") == "SystemExit":
        status = str(failure.get("message") or "a non-zero status").replace("exit status", "status", 1)
        return f"the script exited with {status}{where}"
    message = f": {failure['message']}" if failure.get("message") else ""
    return f"{failure.get('type')}{message}{where}"


def stored_record(row: dict, passive: bool) -> dict:
    """A stored row as the rules expect it: NaN read back for a field the step never wrote is dropped.

    Only the fields a step always writes keep their NaN (``loss_before``; the norms of audited steps and
    of measured passive steps), where NaN is a measurement. A passive step with no backward pass since the
    last step saw no loss (nor shared one): its missing ``loss_before`` is unknown, not NaN.
    """
    keep = set(_ALWAYS)
    if passive and row.get("backward_passes") == 0:
        keep.discard("loss_before")
    if not passive or row.get("measured") == 1:
        keep.update(_AUDITED)
    return {k: v for k, v in row.items() if k in keep or not (isinstance(v, float) and v != v)}


def _nonfinite(value) -> bool:
    return is_number(value) and not math.isfinite(value)


def first_nonfinite_step(records: Sequence[dict]) -> float:
    """The first step whose loss, gradient, update or weights stopped being finite (``inf`` if none)."""
    for r in sorted((r for r in records if isinstance(r.get("step"), (int, float))), key=lambda r: r["step"]):
        if (
            _nonfinite(r.get("loss_before"))
            or r.get("verdict") == "nonfinite"
            or r.get("grad_nonfinite")
            or any(isinstance(r.get(k), float) and not math.isfinite(r[k]) for k in ("update_norm", "weight_norm"))
            or r.get("weights_nonfinite")
            or r.get("input_nonfinite")
        ):
            return r["step"]
    return math.inf


def healthy_losses(records: Sequence[dict]) -> list[tuple[int, float]]:
    """(step, loss) of every finite loss before the first non-finite step, in step order."""
    stop = first_nonfinite_step(records)
    kept = sorted(
        (r for r in records if isinstance(r.get("step"), (int, float)) and r["step"] < stop), key=lambda r: r["step"]
    )
    return [
        (int(r["step"]), float(r["loss_before"]))
        for r in kept
        if isinstance(r.get("loss_before"), (int, float)) and math.isfinite(r["loss_before"])
    ]


def smoothing(batch_size: int | None) -> int:
    """Window of the rolling median: about 64 examples' worth of batches, 5 to 25 steps."""
    b = batch_size or 16
    return max(5, min(25, math.ceil(64 / max(b, 1))))


def loss_end(losses: Sequence[float], batch_size: int | None) -> float | None:
    """The last loss: median of the last fifth of ``losses`` (at least ``smoothing(batch_size)`` of them)."""
    if len(losses) < 2:
        return None
    width = max(smoothing(batch_size), len(losses) // 5)
    return median(list(losses)[-width:])


def batch_size_of(meta: dict, records: Sequence[dict]) -> int | None:
    """Examples per step: the doctor's observation, else the median recorded ``batch_size``."""
    observations = meta.get("observations") if isinstance(meta.get("observations"), dict) else {}
    sizes = [
        float(r["batch_size"])
        for r in records
        if isinstance(r.get("batch_size"), (int, float)) and math.isfinite(r["batch_size"])
    ]
    size = observations.get("batch_size") or (median(sizes) if sizes else None)
    return int(size) if size else None


def last_loss(rows: Sequence[dict], meta: dict) -> float | None:
    """The run's last loss (median of the last fifth, before any non-finite step) from stored rows."""
    passive = is_passive(meta)
    records = [stored_record(r, passive) for r in rows]
    return loss_end([v for _, v in healthy_losses(records)], batch_size_of(meta, records))
