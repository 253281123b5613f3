"""Record assembly: one audited step's record from what was captured, the global objective, the probes' fields.

``Assembly.core`` writes the core fields (norms, losses, verdict; ``records.py``, ``probes/step.py``),
``Assembly.globalize`` turns the own-batch fields into the global objective's under several processes
(one collective, on every rank every audited step), ``Assembly.run_probes`` runs the due probes and checks
their fields against their declarations (``probes/base.py``), through the one fault policy (``faults.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from . import probes as probe_registry
from .arguments import batch_size
from .context import StepContext, group_lr
from .distributed import collective_device, global_objective
from .faults import contained, raises_at_once, refused
from .flat import FlatBuffers
from .losses import LossEvaluator
from .noise_ranks import CAPTURE, noise_fields, rank_values
from .probes.base import BUFFERS
from .probes.step import step_fields
from .records import layer_rows
from .writing import RecordWriter


class Assembly:
    """Builds an audit's records; holds what does not change between steps (probe schedule, ranks, strictness)."""

    def __init__(
        self,
        probes: Mapping[str, int],
        collective: set[str],
        strict: bool,
        sharded: bool,
        rank: int,
        world_size: int,
        writer: RecordWriter,
    ) -> None:
        self.probes, self.collective, self.strict = probes, collective, strict
        self.sharded, self.rank, self.world_size, self.writer = sharded, rank, world_size, writer

    def due(self, step: int) -> list[str]:
        """The probes due at ``step``."""
        return [name for name, every in self.probes.items() if step % every == 0]

    def core(
        self,
        ctx: StepContext,
        flat: FlatBuffers,
        losses: LossEvaluator,
        layout: tuple[Sequence[str], Sequence[str], Sequence[int]],
        batches: list,
        loss_before: float | None,
    ) -> dict:
        """The core fields of the step in ``ctx`` (Δw's sums, the loss after, the verdict), then its due probes'."""
        index = ctx.step
        keep = probe_registry.needing(self.due(index), BUFFERS)  # a due probe reads w or Δw after the step
        first_order, sums = flat.finish(keep_before=keep)
        if keep:
            ctx.flat_delta_w, ctx.delta_w = flat.delta_w, flat.delta_w_views
        else:  # the buffers were reused for Δw; nothing after this point reads them
            ctx.flat_before = ctx.before = None
        record = {"step": index, "lr": ctx.lr(), "batch_size": batch_size(batches)}
        for i, group in enumerate(ctx.optimizer.param_groups[1:6], start=1):  # the report charts up to six groups
            record[f"lr_group_{i}"] = group_lr(group)
        layers, totals = layer_rows(*layout, sums, first_order=first_order)
        record.update(totals)
        loss_after, noise, record["noise_method"] = losses.after(ctx, loss_before)
        record.update(
            step_fields(loss_before, loss_after, totals["first_order"], noise, moved=totals["update_norm"] > 0)
        )
        if not math.isfinite(totals["first_order"]) and record["verdict"] != "nonfinite":
            record["verdict"] = "nonfinite"  # finite losses but NaN/Inf in the gradient or the update
        record["layers"] = layers
        ctx.record = record
        ctx.core_fields = frozenset(record)  # what the audit wrote: no probe may overwrite it
        self.run_probes(ctx, record, index)
        return record

    def globalize(self, record: dict, captures: dict, flat: FlatBuffers | None) -> None:
        """Make the own-batch fields describe the global objective (mean of the ranks' losses); keep ours as local_*."""
        if flat is not None and not flat.reduced:
            flat.stand_in()  # this rank failed before its shards' sums were all-reduced: join that collective
        failed = record.get("verdict") == "error"
        local_sq, global_sq = rank_values(captures, record)
        step = global_objective(
            record.get("loss_before"),
            record.get("loss_after"),
            record.get("rounding_noise"),
            failed,
            collective_device(),
            record.get("batch_size"),
            local_sq,
            global_sq,
        )
        record.update({f"local_{k}": record.get(k) for k in ("loss_before", "loss_after", "delta", "verdict")})
        record.update(world_size=self.world_size, rank=self.rank, global_batch=step.global_batch)
        if CAPTURE in captures:
            record.update(
                local_grad_norm=math.sqrt(local_sq) if local_sq >= 0 else math.nan,
                **noise_fields(step, self.world_size),
            )
        if step.failures:
            if not failed:
                record.update(verdict="error", error=f"the audit failed on {step.failures} of {self.world_size} ranks")
            return
        moved = record.get("update_norm", 0) > 0
        record.update(step_fields(step.loss_before, step.loss_after, record["first_order"], step.noise, moved=moved))
        if not math.isfinite(record["first_order"]) and record["verdict"] != "nonfinite":
            record["verdict"] = "nonfinite"

    def run_probes(self, ctx: StepContext, record: dict, index: int, collective: bool = False) -> None:
        """The due probes; ``collective``: only those with collectives of their own (after ``globalize``)."""
        for name, every in self.probes.items():
            if index % every or (name in self.collective) != collective:
                continue
            if self.sharded:  # the same on every rank: no probe issues a collective that a peer would not
                record.setdefault("probe_errors", {})[name] = (
                    "not measured: probes need whole parameters and FSDP2 shards them (DistributedDataParallel runs them)"
                )
                continue
            if self.world_size > 1 and not collective:
                record["probe_scope"] = "rank"  # this rank's batch, on the module DDP wraps: no collective
            # strict: a probe with collectives of its own runs after the step's all-reduce, where a failure raised
            # on one rank would leave its peers inside the probe's collectives: recorded instead
            strict = raises_at_once(self.strict, self.world_size) if collective else self.strict
            self._run_probe(probe_registry.get(name), ctx, record, index, strict)

    def _run_probe(self, probe: Any, ctx: StepContext, record: dict, index: int, strict: bool) -> None:
        """One probe: its fields checked against its declaration; what it may not write goes to ``probe_errors``."""
        name = probe.name

        def keep(problem: Exception | str) -> None:
            text = problem if isinstance(problem, str) else f"{type(problem).__name__}: {problem}"
            record.setdefault("probe_errors", {})[name] = text

        ctx.amendments = {}
        with contained(strict, f"probe {name!r} failed at step {index}", keep) as fault:
            fields = probe(ctx)
        if fault.error is not None:
            return
        accepted, problems = probe.check_fields(fields, ctx.core_fields)
        amended, refusals = probe.check_amendments(ctx.amendments)
        record.update(accepted)
        if problems or refusals:  # the contract the probe declared: the step is stored without those fields
            message = "; ".join(problems + [f"previous record: {p}" for p in refusals])
            refused(strict, f"probe {name!r} at step {index}", message, keep)
        if amended:
            self.writer.amend_previous(index - 1, amended)
