"""fastai's ``learn.lr_find()`` measured by stepaudit: an in-memory audit of its steps, read as an ``LRFindResult``.

``AuditCallback(lr_find=True)`` opens a ``SweepAudit`` when fastai's ``LRFinder`` starts a fit. Each step of fastai's
own sweep (its lrs, its batches, its optimizer) is audited through the public step API: the same batch is evaluated
again after the step (same dropout masks, buffers put back), giving the own-batch change, g·Δw and α; at the first
step λ_max of the Hessian with the optimizer's safe lr, and the preconditioned sharpness where the optimizer has a
second moment (fastai's ``Adam`` and ``RMSProp`` read under torch's names), taken after the sweep's first tenth of
steps as ``stepaudit.lr_find`` does for a fresh optimizer (after one step the second moment is one gradient squared,
and a parameter that got no gradient has P = ε: its bound would be meaningless). Nothing is written to disk; the audit
leaves training as fastai leaves it (fastai's ``LRFinder`` then reloads the weights it saved before the sweep).
Afterwards ``result`` is built by ``LRFindResult.build``: the rows, suggestions and summary of ``stepaudit.lr_find``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .audit import Audit
from .lrfind import adaptive, metrics
from .lrfind_result import Curvature, LRFindResult
from .lrfind_suggest import smooth_step, steady_gain
from .maths import flat_copy
from .optimizers import reader_for

ONCE = 10**9  # a probe period no sweep reaches: the probe runs at step 0 only


class SweepAudit:
    """The audit of one fastai lr_find sweep and, after ``finish()``, its ``LRFindResult`` (``result``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        num_it: int,
        precision: str | None = None,
    ) -> None:
        self.num_it = int(num_it)
        reader = reader_for(optimizer)
        reader.sync()
        self.momentum = steady_gain(reader.reads)
        self.reader, self.preconditioned = reader, adaptive(reader.reads)
        self.metrics: dict[int, tuple[float, float]] = {}  # step -> (gᵀP⁻¹g, ΔwᵀPΔw): ``lrfind.metrics``
        self.optimizer_name = reader.name
        self.precond_step = max(1, self.num_it // 10)
        self.audit = Audit(
            model,
            optimizer,
            loss_fn,
            run=None,
            precision=precision,
            probes={"sharpness": ONCE, "precond_sharpness": self.precond_step},
        )
        self.result: LRFindResult | None = None
        self.weights = self._flat_weights()  # the weights before the next step (fastai's sweep moves only by steps)

    def seen(self, record: dict | None) -> None:
        """After each audited step: gᵀP⁻¹g of its gradient (still in .grad); the preconditioned sharpness once."""
        weights, self.weights = self.weights, self._flat_weights()
        if record is not None:
            self.reader.sync()
            params = self.audit.params
            grad = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad.detach()).reshape(-1) for p in params])
            self.metrics[int(record.get("step", -1))] = metrics(self.reader.reads, params, grad, self.weights - weights)
        if record is not None and record.get("step", 0) >= self.precond_step:
            self.audit.probes["precond_sharpness"] = ONCE

    def finish(self) -> LRFindResult | None:
        """Build ``result`` from the audited steps (None when fastai's sweep took no step)."""
        records = [r for r in self.audit.records if r.get("verdict") not in (None, "error")]
        if not records:
            return None
        rows, average = [], 0.0
        for i, r in enumerate(records):
            average, smooth = smooth_step(average, float(r["loss_before"]), 0.98, i)
            rows.append(
                {
                    "lr": float(r["lr"]),
                    "loss": float(r["loss_before"]),
                    "smooth_loss": smooth,
                    "grad_sq": float(r["grad_norm"]) ** 2,
                    **dict(
                        zip(("grad_metric", "step_metric"), self.metrics.get(int(r.get("step", -1)), (math.nan,) * 2))
                    ),
                    "loss_after": float(r["loss_after"]),
                    "delta": float(r["delta"]),
                    "first_order": float(r["first_order"]),
                    "alpha": float(r.get("alpha", math.nan)),
                    "verdict": r["verdict"],
                }
            )
        lrs = np.array([row["lr"] for row in rows])
        ratio = lrs[1] / lrs[0] if len(lrs) > 1 else 1.0
        grid = lrs[0] * ratio ** np.arange(max(self.num_it, len(lrs)))  # fastai's: start·(end/start)^(i/num_it)
        grid[: len(lrs)] = lrs
        stopped = (
            "end of the grid"
            if len(rows) >= self.num_it
            else "the loss was not finite"
            if not math.isfinite(rows[-1]["loss"])
            else "fastai's stop: the smoothed loss exceeded 4× its minimum"
        )
        later = [r for r in records if r.get("step", 0) >= self.precond_step]
        self.result = LRFindResult.build(
            rows,
            grid,
            stopped,
            self._curvature(records[0], later[0] if later else None),
            optimizer_name=self.optimizer_name,
            momentum=self.momentum,
            preconditioned=self.preconditioned,
        )
        return self.result

    def _flat_weights(self) -> torch.Tensor:
        """The audited parameters, flattened into one detached copy."""
        return flat_copy(self.audit.params)

    def _curvature(self, first: dict, later: dict | None) -> Curvature:
        """λ_max and the safe lr at the sweep's first step, the preconditioned bound after its first tenth."""
        info = Curvature(
            sharpness=float(first.get("sharpness", math.nan)),
            residual=float(first.get("sharpness_residual", math.nan)),
            safe_lr=float(first.get("safe_lr", math.nan)),
            safe_rule=str(first.get("safe_lr_rule", "not measured")),
        )
        at = later or {}
        value, bound = float(at.get("precond_sharpness", math.nan)), float(at.get("precond_bound", math.nan))
        if math.isfinite(value) and value > 0 and math.isfinite(bound):
            info.precond = (value, bound * float(at["lr"]) / value, str(at.get("precond_rule", "")))
            lr = float(at["lr"])
            info.precond_where = f"after fastai's first {self.precond_step} steps (lr ≤ {lr:.3g}), its batch"
        else:
            info.precond_where = str(
                at.get("precond_sharpness_note", first.get("precond_sharpness_note", "not measured"))
            )
        return info

    def point(self) -> tuple[float, float]:
        """(stepaudit's lr, the smoothed loss there): where fastai's plot marks the suggestion."""
        result = self.result
        lr = result.suggestion
        y = float(np.interp(math.log(lr), np.log(result.lrs), result.smooth_losses)) if math.isfinite(lr) else math.nan
        return lr, y
