"""Derived quantities the doctor's rules share, computed once from step records and run-level observations.

Everything here is a plain measurement with a meaning (a loss level, a ratio of norms, a cosine); the
thresholds that turn measurements into diagnoses live in ``codes/`` (one file per diagnosis) next to their sources.
Records come from the active audit (own-batch ``delta``, ``alpha``, probes) or from passive capture
(``grad_cos_prev``, activation shares, input scale); a missing field makes a quantity ``None``.

Size (over 400 lines): one class of lazily computed measurements that every diagnosis file reads;
splitting it would scatter the caching, the one thing it exists for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import cached_property
from statistics import mean, median
from typing import Any

from ..maths import finite
from . import summary


def med(values: Iterable[Any]) -> float | None:
    """Median of the finite values, or None."""
    kept = finite(values)
    return median(kept) if kept else None


def rolling_median(values: Sequence[float], width: int) -> list[float]:
    """Median of each window of ``width`` consecutive values (one batch's outlier cannot look like a trend)."""
    width = max(1, min(width, len(values)))
    return [median(values[i : i + width]) for i in range(len(values) - width + 1)]


def entropy(counts: dict) -> float | None:
    """Entropy (nats) of the empirical label distribution: the loss of always predicting the label prior."""
    total = sum(float(c) for c in counts.values())
    if total <= 0:
        return None
    return -sum(float(c) / total * math.log(float(c) / total) for c in counts.values() if float(c) > 0)


class Facts:
    """The run as the rules see it: losses, windows, sampled step statistics, passive observations."""

    def __init__(self, records: Sequence[dict], meta: dict | None = None, observations: dict | None = None) -> None:
        self.records = sorted((r for r in records if isinstance(r.get("step"), (int, float))), key=lambda r: r["step"])
        self.meta = dict(meta or {})
        self.obs = dict(observations if observations is not None else self.meta.get("observations") or {})
        self.passive = self.obs.get("mode") == "passive"

    # -- counts ------------------------------------------------------------------------------------------
    @cached_property
    def n_steps(self) -> int:
        """Optimizer steps seen (passive: all of them; active: last audited step + 1)."""
        if "steps" in self.obs:
            return int(self.obs["steps"])
        return int(self.records[-1]["step"]) + 1 if self.records else 0

    @cached_property
    def batch_size(self) -> int | None:
        """Examples per step, as the records or the observations report it."""
        size = self.obs.get("batch_size") or med(r.get("batch_size") for r in self.records)
        return int(size) if size else None

    # -- non-finite ----------------------------------------------------------------------------------------
    @cached_property
    def first_nonfinite(self) -> dict | None:
        """The first step where the loss, the gradient, the update or the weights stopped being finite."""
        for r in self.records:
            loss = r.get("loss_before")
            what = None
            if isinstance(loss, (int, float)) and not math.isfinite(loss):
                what = "loss"
            elif r.get("verdict") == "nonfinite" or r.get("grad_nonfinite"):
                what = "gradient"
            elif any(isinstance(r.get(k), float) and not math.isfinite(r[k]) for k in ("update_norm", "weight_norm")):
                what = "update"
            elif r.get("weights_nonfinite") or r.get("input_nonfinite"):
                what = "input" if r.get("input_nonfinite") else "weights"
            if what:
                return {"step": int(r["step"]), "what": what, "loss": loss}
        return None

    @cached_property
    def healthy_records(self) -> list[dict]:
        """Records before anything went non-finite (statistics after NaN weights mean nothing)."""
        stop = self.first_nonfinite["step"] if self.first_nonfinite else math.inf
        return [r for r in self.records if r["step"] < stop]

    # -- the loss curve ------------------------------------------------------------------------------------
    @cached_property
    def losses(self) -> list[tuple[int, float]]:
        """(step, loss at backward / loss_before) of every finite loss before the first non-finite step."""
        return [
            (int(r["step"]), float(r["loss_before"]))
            for r in self.healthy_records
            if isinstance(r.get("loss_before"), (int, float)) and math.isfinite(r["loss_before"])
        ]

    @cached_property
    def smoothing(self) -> int:
        """Window of the rolling median: about 64 examples' worth of batches, 5 to 25 steps."""
        return summary.smoothing(self.batch_size)

    @cached_property
    def loss_init(self) -> float | None:
        """Loss at the first step (at initialisation)."""
        return self.losses[0][1] if self.losses else None

    @cached_property
    def loss_start(self) -> float | None:
        """The starting level: the loss at initialisation when a batch holds ≥ 16 examples, else the median of
        the first ``smoothing`` steps (one example's loss is too noisy to compare with)."""
        if not self.losses:
            return None
        if (self.batch_size or 0) >= 16 and self.losses[0][0] == 0:
            return self.losses[0][1]
        return median(v for _, v in self.losses[: self.smoothing])

    @cached_property
    def loss_end(self) -> float | None:
        """Median loss of the last fifth of the run (at least ``smoothing`` steps): the one "last loss"."""
        return summary.loss_end([v for _, v in self.losses], self.batch_size)

    @cached_property
    def progress(self) -> float | None:
        """Share of the starting loss removed by the end of the run: (start − end)/|start|."""
        if self.loss_start is None or self.loss_end is None or self.loss_start == 0:
            return None
        return (self.loss_start - self.loss_end) / abs(self.loss_start)

    @cached_property
    def stuck_at_prior(self) -> bool:
        """The loss ended at ≥ 90% of the input-blind predictor's loss (label entropy / target variance).

        Judged against the prior, not against the start: a huge first loss (an N(0, 1) initialisation)
        that falls to the prior looks like progress but is a model that predicts nothing.
        """
        found = self.label_entropy
        return bool(found and self.loss_end is not None and found[0] > 0 and self.loss_end >= 0.9 * found[0])

    @cached_property
    def learning_well(self) -> bool:
        """The loss at least halved, ended below the prior, and nothing went non-finite."""
        return (
            self.progress is not None
            and self.progress >= 0.5
            and not self.stuck_at_prior
            and self.first_nonfinite is None
            and self.loss_form is None
        )

    @cached_property
    def lr_collapse(self) -> dict | None:
        """The learning rate falling below 1/1000 of its peak before the last fifth of the run, and staying
        below 1/100 of it from then on (warm restarts, SGDR, dip to ~0 and come back: no collapse).

        Returns the peak and final lr, the step where it first fell below peak/1000, and the scheduler
        classes whose ``step()`` ran with their call counts (a per-epoch schedule stepped per batch).
        """
        lrs = [
            (int(r["step"]), float(r["lr"]))
            for r in self.records
            if isinstance(r.get("lr"), (int, float)) and math.isfinite(r["lr"]) and r.get("optimizer", 0) in (0, None)
        ]
        if len(lrs) < 10:
            return None
        peak = max(v for _, v in lrs)
        if peak <= 0:
            return None
        end_step = lrs[-1][0]
        fell = next((s for s, v in lrs if v < 1e-3 * peak and s > lrs[0][0]), None)
        if fell is None or fell > 0.8 * end_step or lrs[-1][1] >= 1e-3 * peak:
            return None
        if any(v >= 1e-2 * peak for s, v in lrs if s > fell):
            return None  # the schedule restarted after the dip
        return {"peak": peak, "final": lrs[-1][1], "step": fell, "schedulers": dict(self.obs.get("schedulers") or {})}

    @cached_property
    def loss_form(self) -> dict | None:
        """A loss curve no well-formed objective produces: constant from the start, or unbounded below.

        - constant: the first ≥ 10 losses identical (to 1e-12 relative); a model that is learning, or even
          one seeing different batches, changes its loss. Stuck at exactly 0 is the common form (the log of
          a probability that is already 1, a loss multiplied by a mask of zeros).
        - unbounded below: negative at the end and ≥ 10× its starting magnitude below 0 (and ≤ −10: a Gaussian
          NLL that starts near 0 and falls to −1.5 as its variance shrinks is bounded), still falling over the
          last three fifths: a likelihood maximised instead of minimised (a lost minus sign), or a loss whose
          minimum is −∞ (NLL on raw scores).
        """
        values = [v for _, v in self.losses]
        if len(values) >= 10:
            head = values[: max(10, len(values) // 2)]
            scale = max(abs(head[0]), 1e-30)
            if all(abs(v - head[0]) <= 1e-12 * scale or v == head[0] for v in head):
                return {"kind": "constant_loss", "value": head[0], "steps": len(head)}
        if len(values) >= 25 and self.loss_end is not None and self.loss_start is not None:
            # still falling: the medians of the last three fifths each lower than the one before by ≥ 10%
            # of its size (a loss with a finite negative minimum, e.g. a Gaussian NLL, levels off instead)
            fifth = len(values) // 5
            m = [median(values[i * fifth : (i + 1) * fifth]) for i in range(2, 5)]
            falling = all(b < a - 0.1 * abs(a) for a, b in zip(m, m[1:]))
            if self.loss_end < 0 and -self.loss_end >= 10 * max(abs(self.loss_start), 1.0) and falling:
                return {
                    "kind": "unbounded_below",
                    "start": self.loss_start,
                    "end": self.loss_end,
                    "lowest": min(values),
                }
        return None

    @cached_property
    def peak(self) -> tuple[float, int] | None:
        """Highest rolling-median loss and the step where the rolling median first exceeded 1.5× the start."""
        values = [v for _, v in self.losses]
        if len(values) < 2 or self.loss_init is None:
            return None
        width = min(self.smoothing, max(1, len(values) // 3))
        smooth = rolling_median(values, width)
        top = max(smooth)
        bar = 1.5 * abs(self.loss_start)
        window = next((i for i, v in enumerate(smooth) if v > bar), None)
        if window is None:
            return top, None
        # the onset: the first step inside that window whose own loss is above the bar
        first = next(self.losses[j][0] for j in range(window, window + width) if self.losses[j][1] > bar)
        return top, first

    @cached_property
    def label_entropy(self) -> tuple[float, str] | None:
        """Loss of the best input-blind predictor: label entropy (classification) or target variance (MSE)."""
        if self.obs.get("summed_losses"):
            return None  # reduction='sum': the loss grows with the batch, not comparable with a per-example prior
        counts = self.obs.get("label_counts") or {}
        if counts and len(counts) >= 2:
            value = entropy(counts)
            return (value, f"entropy of the labels ({len(counts)} classes)") if value else None
        variance = self.obs.get("target_variance")
        if isinstance(variance, (int, float)) and variance > 0 and "mse_loss" in (self.obs.get("loss_calls") or {}):
            return float(variance), "variance of the regression targets"
        return None

    # -- sampled step statistics ---------------------------------------------------------------------------
    @cached_property
    def sampled(self) -> list[dict]:
        """Healthy records with the gradient/update statistics."""
        return [r for r in self.healthy_records if isinstance(r.get("grad_norm"), (int, float))]

    def early(self, records: Sequence[dict]) -> list[dict]:
        """The records in the first third of the run (at least the first 10 steps)."""
        cut = max(10, self.n_steps / 3)
        return [r for r in records if r["step"] < cut]

    @cached_property
    def update_ratio(self) -> float | None:
        """Median ‖Δw‖/‖w‖ over sampled steps (cs231n: about 1e-3 is healthy)."""
        return med(r.get("update_ratio") for r in self.sampled)

    @cached_property
    def update_ratio_early(self) -> float | None:
        """Median ‖Δw‖/‖w‖ of the first five steps or of the first third, whichever is larger."""
        first = med(r.get("update_ratio") for r in self.sampled if r["step"] < 5)
        third = med(r.get("update_ratio") for r in self.early(self.sampled))
        return max((v for v in (first, third) if v is not None), default=None)

    @cached_property
    def param_groups(self) -> list[dict]:
        """Parameter groups with their largest learning rate (passive: the largest seen, since schedules may end at
        0, each with its optimizer's description under ``opt``; active: the groups as the audit began)."""
        groups = [
            {**g, "lr": (o.get("max_lr") or [])[i] if i < len(o.get("max_lr") or []) else g.get("lr"), "opt": o}
            for o in self.obs.get("optimizers") or []
            for i, g in enumerate(o.get("param_groups") or [])
        ]
        return groups or [dict(g) for g in self.meta.get("param_groups") or []]

    @cached_property
    def weight_growth(self) -> tuple[float, float, float] | None:
        """(late ‖w‖ / first ‖w‖, first ‖w‖, late ‖w‖): the median over the last fifth of the sampled steps
        (at least two) against the first sampled step; needs five sampled steps."""
        norms = finite(r.get("weight_norm") for r in self.sampled)
        if len(norms) < 5 or norms[0] <= 0:
            return None
        late = median(norms[-max(2, len(norms) // 5) :])
        return late / norms[0], norms[0], late

    @cached_property
    def gradient_always_zero(self) -> bool:
        """Every sampled step's gradient was exactly 0 (and at least one step was sampled)."""
        return bool(self.sampled) and all((r.get("grad_norm") or 0) == 0 for r in self.sampled)

    @cached_property
    def moved(self) -> bool:
        """Whether any sampled step changed the weights at all."""
        return any(isinstance(r.get("update_norm"), (int, float)) and r["update_norm"] > 0 for r in self.sampled)

    @cached_property
    def predicted_per_step(self) -> float | None:
        """Mean own-batch decrease the first-order term promised per step, −g·Δw (≥ 0 for descent)."""
        values = finite(-r["first_order"] for r in self.sampled if "first_order" in r)
        return mean(values) if values else None

    @cached_property
    def predicted_total(self) -> float | None:
        """−g·Δw summed over the run's finite-loss steps: each sampled value stands for the steps up to the next."""
        rows = [
            (r["step"], -r["first_order"])
            for r in self.sampled
            if isinstance(r.get("first_order"), (int, float)) and math.isfinite(r["first_order"])
        ]
        if not rows or not self.losses:
            return None
        end = self.losses[-1][0] + 1
        total = 0.0
        for (step, value), nxt in zip(rows, [s for s, _ in rows[1:]] + [end]):
            total += value * max(nxt - step, 1)
        return total

    def promised(self, stop: float) -> float | None:
        """−g·Δw summed over the steps before ``stop``: each sampled value stands for the steps up to the next."""
        rows = [
            (r["step"], -r["first_order"])
            for r in self.sampled
            if r["step"] < stop and isinstance(r.get("first_order"), (int, float)) and math.isfinite(r["first_order"])
        ]
        if not rows:
            return None
        ends = [s for s, _ in rows[1:]] + [stop]
        return sum(value * max(nxt - step, 1) for (step, value), nxt in zip(rows, ends))

    @cached_property
    def transfer(self) -> tuple[float, float] | None:
        """(realised decrease on new batches) / (decrease the steps promised on their own batches), first half.

        Each step's batch is new when its loss is measured, so over a stretch of steps
        (start − end) / Σ −g·Δw ≈ ‖G‖²/(‖G‖² + tr Σ/B) = 1/(1 + B_noise/B) for small SGD steps
        [McCandlish et al.]; curvature only lowers it. Measured on the first half of the run, before the
        loss nears its floor. Returns (ratio, promised).
        """
        if len(self.losses) < 10 or self.loss_start is None:
            return None
        half = max(10, self.losses[-1][0] / 2)
        promised = self.promised(half)
        window = [v for s, v in self.losses if s < half]
        tail = window[-max(self.smoothing, len(window) // 5) :]
        if promised is None or promised <= 0 or len(tail) < 3:
            return None
        return (self.loss_start - median(tail)) / promised, promised

    @cached_property
    def grad_cos_half(self) -> float | None:
        """Mean cosine between consecutive gradients over the first half of the run."""
        half = max(10, self.n_steps / 2)
        values = finite(r.get("grad_cos_prev") for r in self.sampled if r["step"] < half)
        return mean(values) if len(values) >= 3 else None

    @cached_property
    def grad_cos_mean(self) -> float | None:
        """Mean cosine between consecutive steps' gradients over the whole run (negative: steps overshoot)."""
        values = finite(r.get("grad_cos_prev") for r in self.sampled)
        return mean(values) if len(values) >= 3 else None

    @cached_property
    def grad_cos_stats(self) -> tuple[float, float, int] | None:
        """(mean, standard error, count) of the consecutive-gradient cosines over the whole run."""
        values = finite(r.get("grad_cos_prev") for r in self.sampled)
        if len(values) < 3:
            return None
        m = mean(values)
        se = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))
        return m, se, len(values)

    @cached_property
    def oscillating(self) -> bool:
        """Consecutive gradients point apart on average, beyond their scatter (mean cos < −2 s.e.).

        With small steps E[g_t·g_t+1] ≈ ‖G‖² − η E[g_tᵀ H g_t] ≥ 0 under any amount of noise; a clearly negative
        mean means the curvature term wins: the steps overshoot along sharp directions.
        """
        stats = self.grad_cos_stats
        return stats is not None and stats[0] < -2 * stats[1] and stats[0] < 0

    @cached_property
    def recovered(self) -> bool:
        """After the middle of the run the smoothed loss never again exceeds its start (a transient spike)."""
        values = [v for _, v in self.losses]
        if len(values) < 4 or self.loss_start is None:
            return False
        width = min(self.smoothing, max(1, len(values) // 4))
        late = rolling_median(values[len(values) // 2 :], width)
        return bool(late) and max(late) < abs(self.loss_start)

    @cached_property
    def grad_cos_early(self) -> float | None:
        """Mean cosine between consecutive steps' gradients over the first third (passive pairs)."""
        values = finite(r.get("grad_cos_prev") for r in self.early(self.sampled))
        return mean(values) if len(values) >= 2 else None

    @cached_property
    def grad_growth(self) -> tuple[float, int] | None:
        """Largest ‖g‖ relative to the first sampled ‖g‖, and the first step where it reached 100×."""
        norms = [(r["step"], r["grad_norm"]) for r in self.sampled if math.isfinite(r["grad_norm"])]
        if len(norms) < 2 or norms[0][1] <= 0:
            return None
        base = norms[0][1]
        first = next((s for s, g in norms if g >= 100 * base), None)
        return max(g for _, g in norms) / base, first

    def layer_rows(self, record: dict) -> list[dict]:
        """Per-module rows of weight layers, input side first (order of the optimizer's parameters)."""
        weight_layers = self.obs.get("weight_layers")
        rows = [
            row
            for row in record.get("layers") or ()
            if row.get("kind") == "module"
            and isinstance(row.get("weight_norm"), (int, float))
            and row["weight_norm"] > 0
            and isinstance(row.get("grad_norm"), (int, float))
            and math.isfinite(row["grad_norm"])
        ]
        if weight_layers:
            rows = [row for row in rows if row["name"] in weight_layers]
        return rows

    @cached_property
    def depth_ratio(self) -> tuple[float, str, str] | None:
        """Median over sampled steps of (‖g‖/‖w‖ of the first weight layer) / (same of the last)."""
        ratios, names = [], None
        for record in self.sampled:
            rows = self.layer_rows(record)
            if len(rows) < 2 or rows[-1]["grad_norm"] <= 0:
                continue
            first, last = rows[0], rows[-1]
            ratios.append((first["grad_norm"] / first["weight_norm"]) / (last["grad_norm"] / last["weight_norm"]))
            names = (first["name"], last["name"])
        value = med(ratios)
        return (value, *names) if value is not None and names else None

    @cached_property
    def relative_grad_init(self) -> float | None:
        """Median of ‖g‖/‖w‖ at the first sampled step over the weight layers before the last one.

        The last layer is left out: an output layer initialised small on purpose (Karpathy: "init well")
        has a large ‖g‖/‖w‖ without anything exploding; growth through depth shows on the earlier layers.
        """
        if not self.sampled:
            return None
        rows = self.layer_rows(self.sampled[0])
        return med(row["grad_norm"] / row["weight_norm"] for row in (rows[:-1] if len(rows) > 1 else rows))

    @cached_property
    def relative_grad_early(self) -> float | None:
        """Median over the first five sampled steps of the per-step median ‖g‖/‖w‖ (weight layers, last left out)."""
        values = []
        for record in self.sampled[:5]:
            rows = self.layer_rows(record)
            values.append(med(row["grad_norm"] / row["weight_norm"] for row in (rows[:-1] if len(rows) > 1 else rows)))
        return med(values)

    @cached_property
    def loss_cliff(self) -> dict | None:
        """A run that was learning (loss below its start) and blew up to NaN within ≤ 10 steps [PM: the
        loss surface of deep and recurrent nets has cliffs; one step onto them explodes the gradient]."""
        found = self.first_nonfinite
        if found is None or found["what"] not in ("loss", "gradient") or len(self.losses) < 20 or not self.loss_start:
            return None
        stop = found["step"]
        calm = [(s, v) for s, v in self.losses if stop - 40 <= s < stop - 10]
        jump = [(s, v) for s, v in self.losses if stop - 10 <= s < stop]
        if len(calm) < 5 or not jump:
            return None
        before = median(v for _, v in calm)
        top = max(v for _, v in jump)
        if before >= self.loss_start or top < 10 * before:
            return None
        return {"before": before, "top": top, "calm": calm[-1][0], "nonfinite": stop}

    @cached_property
    def dead_output(self) -> int | None:
        """First step of a dead output ReLU: ≥ 90% of the output units 0 for the whole batch, at the median
        sampled step and at the last one (units that revive are not dead)."""
        rows = [
            (int(r["step"]), r["dead_output_share"])
            for r in self.healthy_records
            if isinstance(r.get("dead_output_share"), (int, float))
        ]
        if len(rows) < 3 or median(v for _, v in rows) < 0.9 or rows[-1][1] < 0.9:
            return None
        return next(s for s, v in rows if v >= 0.9)

    def share_late(self, key: str) -> tuple[float, int] | None:
        """Median of a per-step share over the last half of its observations, and the first step it was ≥ 0.5."""
        rows = [(r["step"], r[key]) for r in self.healthy_records if isinstance(r.get(key), (int, float))]
        if not rows:
            return None
        late = [v for _, v in rows[len(rows) // 2 :]]
        return median(late), next((s for s, v in rows if v >= 0.5), rows[0][0])

    def first_at(self, key: str, threshold: float) -> int | None:
        """First step where a per-step share reached ``threshold``."""
        return next(
            (
                int(r["step"])
                for r in self.healthy_records
                if isinstance(r.get(key), (int, float)) and r[key] >= threshold
            ),
            None,
        )

    def share_init(self, key: str) -> float | None:
        """A per-step share at step 0: measured in the forward before the first update (the initialisation)."""
        return med(r.get(key) for r in self.healthy_records if r["step"] == 0)

    # -- active-mode own-batch quantities --------------------------------------------------------------------
    @cached_property
    def own_batch(self) -> list[dict]:
        """Healthy records with an own-batch re-evaluation (active audit)."""
        return [
            r for r in self.healthy_records if isinstance(r.get("delta"), (int, float)) and math.isfinite(r["delta"])
        ]
