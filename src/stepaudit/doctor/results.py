"""The end of a passive session: parameter names, loss values, the run-level observations the rules read.

``RunResults`` is mixed into ``PassiveWatcher``; everything here runs at sampled steps, at a flush of the
run store, or once the script has ended.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..maths import numel
from ..meta import optimizer_groups
from .loss_sign import log_likelihood_sources

if TYPE_CHECKING:
    from .passive import WatchedOptimizer


class RunResults:
    """Naming, loss settlement, store flushes and observations of a ``PassiveWatcher``."""

    def _names_stale(self, state: WatchedOptimizer) -> bool:
        return any(n.startswith("param") for n in state.names) and bool(self.roots)

    def _prefixed_roots(self) -> list[tuple[torch.nn.Module, str]]:
        """Root modules with parameters, largest first, each with the prefix its names get."""
        roots = sorted(self.roots.values(), key=lambda m: -sum(numel(p) for p in m.parameters()))
        with_params = [r for r in roots if any(True for _ in r.parameters())]
        return [(r, f"{type(r).__name__}." if len(with_params) > 1 else "") for r in with_params]

    def weight_layers(self) -> list[str]:
        """Names (as in the layer rows) of modules holding a weight matrix/kernel, embeddings excluded."""
        names: list[str] = []
        for root, prefix in self._prefixed_roots():
            for name, module in root.named_modules():
                weight = dict(module.named_parameters(recurse=False)).get("weight")  # ScriptModules too
                if (
                    weight is not None
                    and numel(weight)
                    and weight.dim() >= 2
                    and not isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))
                ):
                    full = prefix + name if name else prefix.rstrip(".") or "(root)"
                    if full not in names:
                        names.append(full)
        return names

    def _name(self, state: WatchedOptimizer) -> None:
        """Parameter names from the model's root modules (the ones called at depth 0)."""
        known: dict[int, str] = {}
        for root, prefix in self._prefixed_roots():
            for name, p in root.named_parameters():
                known.setdefault(id(p), prefix + name)
        state.names = [known.get(id(p), f"param{i}") for i, p in enumerate(state.params)]
        state.modules = [n.rsplit(".", 1)[0] if "." in n else "(root)" for n in state.names]

    def on_load_state(self, module: torch.nn.Module) -> None:
        """``module.load_state_dict`` ran: before the first loss, the weights it filled are not an initialisation."""
        if self.initial_loss is None and not self.step_count:
            self._loaded.append((type(module).__name__, {id(p) for p in module.parameters()}))

    def loaded_weights(self) -> str | None:
        """The class of a module loaded from a state dict before the first loss whose weights an optimizer trains."""
        trained = {id(p) for state in self.optimizers for p in state.params}
        return next((name for name, ids in self._loaded if ids & trained), None)

    def _note_loss_sign(self, loss: Any) -> None:
        """Whether a loss handed to backward is a log-likelihood, ≤ 0 by construction (see ``loss_sign``)."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or loss.grad_fn is None:
            return
        try:
            sources = log_likelihood_sources(loss)
        except Exception:  # an odd graph: the sign stays unknown
            sources = None
        self._loss_signs[0] += 1
        if sources:
            self._loss_signs[1] += 1
            self._loss_signs[2].update(sources)

    def log_likelihood_loss(self) -> dict | None:
        """Every inspected backward loss (at least two) was ≤ 0 by construction: the log-probabilities it sums."""
        checked, nonpositive, sources = self._loss_signs
        return {"checked": checked, "sources": sorted(sources)} if checked >= 2 and nonpositive == checked else None

    # -- results ---------------------------------------------------------------------------------------------
    def _settle_losses(self) -> None:
        """Turn the kept loss tensors into floats (one sync per step, at the end or at a flush)."""
        for record in self.records:
            losses = record.pop("_losses", None)
            if losses is None:
                continue
            values = []
            for loss in losses:
                try:
                    values.append(float(loss))
                except (TypeError, ValueError, RuntimeError):
                    continue
            if values:  # no loss seen at this step's backward passes: unknown, not NaN (absent)
                record["loss_before"] = sum(values)

    def _flush(self) -> None:
        self._settle_losses()
        try:
            self.flush(self.records[self._flushed :])
            self._flushed = len(self.records)
        except Exception as error:  # a store problem never breaks the script
            self.error = f"writing the run store failed: {error}"
            self.flush = None

    def finish(self) -> None:
        """Write what is left to the store (call after ``close``)."""
        if self.flush is not None and len(self.records) > self._flushed:
            self._flush()

    def observations(self) -> dict:
        """Run-level facts the rules read (JSON-friendly), alongside the per-step records."""
        trainable, orphans = self._orphans()
        n, s1, s2 = self.target_moments
        return {
            "mode": "passive",
            "steps": len(self.records) if self.custom_update else self.step_count,
            "optimizer_steps": self.step_count,
            "custom_update": bool(self.custom_update),
            "weights_changed": self.weights_changed() if not self.step_count else None,
            "schedulers": dict(self.schedulers),
            "backward_passes": self.backward_count,
            "optimizers": [self._describe(state) for state in self.optimizers],
            "zero_checks": self.zero_checks,
            "loss_findings": self.loss_findings(),
            "loss_calls": dict(self.loss_calls),
            "summed_losses": sorted(self.summed_losses),
            "target_nan_or_inf": self.target_nan_or_inf,
            "initial_loss": self.initial_loss,
            "loaded_weights": self.loaded_weights(),
            "log_likelihood_loss": self.log_likelihood_loss(),
            "label_counts": {str(k): v for k, v in sorted(self.label_counts.items())},
            "batch_labels": self.batch_labels,
            "batch_label_pool": {str(k): v for k, v in sorted(self.batch_label_pool.items())},
            "target_variance": (s2 / n - (s1 / n) ** 2) if n > 1 else None,
            "batch_size": self.batch_size,
            "trainable_numel": trainable,
            **self._frozen(),
            "orphan_params": orphans,
            "weight_layers": self.weight_layers(),
            **self.recurrent_inputs(self._prefixed_roots() or [(r, "") for r in self.roots.values()]),
            "models": sorted({type(m).__name__ for m in self.roots.values() if any(True for _ in m.parameters())}),
            "elapsed_s": self.elapsed(),
            "capture_errors": {"count": self.capture_errors, "first": self.first_capture_error},
        }

    def _describe(self, state: WatchedOptimizer) -> dict:
        from .passive import sampled  # the schedule lives with the watcher

        names = state.names or [f"param{i}" for i in range(len(state.params))]
        no_grad = [i for i, p in enumerate(state.params) if state.ever_grad[i] is False]  # None: never read
        unread = [i for i, p in enumerate(state.params) if state.ever_grad[i] is None and p.requires_grad]
        return {
            "index": state.index,
            "optimizer": type(state.optimizer).__name__,
            "param_groups": optimizer_groups(state.optimizer),
            "steps": state.local_step,
            "max_lr": state.max_lr,
            "numel": sum(numel(p) for p in state.params),
            "sampled_steps": sum(sampled(s, self.every) for s in range(state.local_step)),
            "frozen": [
                {"name": names[i], "numel": numel(state.params[i])}
                for i, p in enumerate(state.params)
                if not p.requires_grad
            ][:50],
            "no_grad": [
                {"name": names[i], "numel": numel(state.params[i])} for i in no_grad if state.params[i].requires_grad
            ][:50],
            "no_grad_numel": sum(numel(state.params[i]) for i in no_grad if state.params[i].requires_grad),
            "grad_unread_numel": sum(numel(state.params[i]) for i in unread),  # gradients never read: not judged
        }

    def _orphans(self) -> tuple[int, list[dict]]:
        """Trainable tensors that had a gradient but belong to no optimizer (only judged once one stepped).

        Two sources: registered parameters seen with a gradient at a sampled step, and the leaves of the
        first backward passes' autograd graphs, which also finds parameters kept in a plain list or dict
        (not registered) and tensors created inside ``forward``. Leaves shaped like the batch (inputs that
        require a gradient, as in adversarial training) are not parameters and are left out.
        """
        if not self.optimizers:
            return 0, []  # no torch.optim optimizer: nothing to compare with (a custom update is judged apart)
        held = {id(p) for state in self.optimizers for p in state.params}
        names: dict[int, str] = {}
        trainable = 0
        seen: set[int] = set()
        for root, prefix in self._prefixed_roots():
            for name, p in root.named_parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                names[id(p)] = prefix + name
                trainable += numel(p) if p.requires_grad else 0
        orphans = [
            {"name": names.get(key, "?"), "numel": numel(p), "registered": True}
            for key, p in self.grad_params.items()
            if key not in held
        ]
        unregistered = self._unregistered_names()
        for key, leaf in self.graph_leaves.items():
            tensor = leaf["tensor"]
            if key in held or key in seen or key in self.grad_params:
                continue
            if (
                not isinstance(tensor, torch.nn.Parameter)
                and self.batch_size
                and tensor.dim() >= 1
                and tensor.shape[0] == self.batch_size
            ):
                continue  # an input that requires a gradient
            if leaf["walk"] > 1 and key not in unregistered:
                continue  # a tensor re-created in every forward appears anew at each walk: count the first
            name = unregistered.get(key) or (
                f"a tensor of shape {list(tensor.shape)} created during the forward pass (requires_grad, "
                "registered nowhere)"
            )
            orphans.append({"name": name, "numel": numel(tensor), "registered": False})
            trainable += numel(tensor)
        return trainable, orphans

    def _frozen(self) -> dict:
        """Values of the model's parameters with ``requires_grad=False`` (frozen), against all of them."""
        total, frozen, names, seen = 0, 0, [], set()
        for root, prefix in self._prefixed_roots():
            for name, p in root.named_parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                total += numel(p)
                if not p.requires_grad:
                    frozen += numel(p)
                    if len(names) < 3:
                        names.append(prefix + name)
        return {"model_numel": total, "frozen_numel": frozen, "frozen_names": names}

    def _unregistered_names(self) -> dict[int, str]:
        """Parameters of modules kept in a plain list, tuple or dict attribute of a root module (or its
        submodules): ``layers[2].weight``, named so the fix can point at them."""
        found: dict[int, str] = {}
        for root, prefix in self._prefixed_roots() or [(r, "") for r in self.roots.values()]:
            for path, module in root.named_modules():
                for attr, value in vars(module).items():
                    if attr.startswith("_") or not isinstance(value, (list, tuple, dict)):
                        continue
                    items = value.items() if isinstance(value, dict) else enumerate(value)
                    for key, item in items:
                        if isinstance(item, torch.nn.Module):
                            where = f"{prefix}{path + '.' if path else ''}{attr}[{key!r}]"
                            for pname, p in item.named_parameters():
                                found.setdefault(
                                    id(p), f"{where}.{pname} (in a plain {type(value).__name__}, not registered)"
                                )
                        elif isinstance(item, torch.Tensor) and item.requires_grad:
                            found.setdefault(
                                id(item),
                                f"{prefix}{path + '.' if path else ''}{attr}[{key!r}] "
                                f"(a tensor in a plain {type(value).__name__})",
                            )
        return found
