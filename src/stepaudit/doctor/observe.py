"""Forward and loss observations of a passive session: dead/saturated units, first-layer input, loss wiring.

``ForwardObserver`` is mixed into ``PassiveWatcher``: the global module forward hooks (sampled steps only)
find the model's root modules and its first parametrised layer; the wrapped activation and loss
functions report what they produced or received. Everything is read under ``no_grad``.

Size (over 400 lines): one mixin whose hooks share a session's observation state; the loss-argument binding and
the loss-sign walk already live in ``loss_args.py`` and ``loss_sign.py``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from .loss_args import argument, loss_arguments, loss_reduction
from .loss_sign import is_probability
from .recurrent import RecurrentObserver

_NORMALIZING = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)
MAX_ACTIVATION_ROWS = 64  # per sampled step
# A unit "never fires on the batch": a healthy unit active on half the examples is silent on all 16 with
# probability 2⁻¹⁶, so smaller batches cannot tell dead units from unlucky ones.
MIN_DEAD_BATCH = 16
MAX_INPUT_ROWS = 256  # first-layer input rows pooled over the early sampled steps
MAX_INPUT_VALUES = 4_000_000  # all pooled rows together (32 MB of float64), whatever the input width


def _compiled_graph(module: torch.nn.Module) -> bool:
    """A graph TorchDynamo or AOTAutograd made (weights lifted to inputs), not a user's traced model."""
    return isinstance(module, torch.fx.GraphModule) and next(module.parameters(), None) is None


class ForwardObserver(RecurrentObserver):
    """State and callbacks for forward-pass and loss statistics (used by ``PassiveWatcher``)."""

    step_count: int
    every: int

    def _init_observer(self) -> None:
        self.window = True  # statistics of forward passes are gathered (step 0 is sampled)
        self._depth = 0
        self._first_layer_pending = True
        self._param_calls = 0
        self.roots: dict[int, torch.nn.Module] = {}
        self._open_activations: list[dict] = []
        self._activations: list[dict] = []
        self._inputs: dict | None = None
        self._input_pool: list[torch.Tensor] = []  # first-layer inputs of early steps (batch 1 needs several)
        self._input_rows = 0
        self._input_layer: torch.nn.Module | None = None
        self._axis_flags: dict[str, dict] = {}  # softmax over the batch axis, per function
        self._class_targets: Counter = Counter()  # regression targets that look like class indices
        self._class_calls = [0, 0, None]  # calls inspected, calls with one output and integer targets, loss
        self._softmax_checked = 0
        self._loss_checked: Counter = Counter()  # sampled calls inspected, per loss function
        self._loss_flags: dict[str, dict] = {}  # kind of miswiring -> first finding, count, last step
        self.loss_calls: Counter = Counter()
        self.summed_losses: set[str] = set()
        self.target_nan_or_inf = False
        self.label_counts: Counter = Counter()
        self.batch_labels: list[list] = []  # [distinct labels, labels, step, the first 64 classes] of sampled batches
        self.batch_label_pool: Counter = Counter()  # their labels pooled
        self.target_moments = [0.0, 0.0, 0.0]  # n, Σy, Σy² of regression targets
        self.initial_loss: dict | None = None
        self._loss_signs: list = [0, 0, set()]  # backward losses inspected, ≤ 0 by construction, their log-probs
        self._loaded: list[tuple[str, set[int]]] = []  # modules loaded from a state dict before the first loss
        self.batch_size: int | None = None
        self._init_recurrent()

    # -- forward statistics ------------------------------------------------------------------------------
    def _forward_pre(self, module, args):
        if _compiled_graph(module):
            return  # a graph torch.compile made (eager/aot_eager backends run one per call): not the user's
        compiled = getattr(module, "_orig_mod", None)
        if compiled is not None and type(module).__name__ == "OptimizedModule":
            self._compiled_module(compiled)  # torch.compile(model): the model is the root
            return
        if self._depth == 0:
            self._close_activations()
            self.roots.setdefault(id(module), module)
            self._first_layer_pending = True
        self._depth += 1
        if isinstance(module, torch.nn.RNNBase):
            self._note_recurrent(module, args)
        if self._first_layer_pending and module._parameters and any(v is not None for v in module._parameters.values()):
            self._first_layer_pending = False
            if self._input_rows < MAX_INPUT_ROWS and args and isinstance(args[0], torch.Tensor):
                self._pool_input(module, args[0])

    def _compiled_module(self, model: torch.nn.Module) -> None:
        """The first call of a ``torch.compile``d module: note the model and remove the forward hooks.

        TorchDynamo guards the graphs it compiles on the global module hooks: adding or removing them
        later would recompile (each recompilation traces the model again, graph breaks included), and
        while they are registered every call of the compiled module warns that they fire an extra time.
        So they go now, before its first compilation (see ``PassiveWatcher._freeze_module_hooks``).
        """
        self.roots.setdefault(id(model), model)
        self._depth = 0
        self._freeze_module_hooks(remove=True)

    def _freeze_module_hooks(self, remove: bool) -> None:  # PassiveWatcher's
        raise NotImplementedError

    def _pool_input(self, module: torch.nn.Module, x: torch.Tensor) -> None:
        """Keep the first layer's input rows of early steps; their statistics are recomputed as rows arrive."""
        if self._input_layer is not None and module is not self._input_layer:
            return  # one first layer per session (a second model's inputs are not pooled with the first's)
        if not x.is_floating_point() or x.dim() < 2 or x.numel() == 0 or isinstance(module, torch.nn.Embedding):
            return
        if isinstance(module, _NORMALIZING):
            self._inputs = {"layer": type(module).__name__, "normalized": True}
            return
        if self.batch_size is None:
            self.batch_size = int(x.shape[0])
        with torch.no_grad():
            rows = x.detach().flatten(1)
            if rows.shape[1] * MAX_INPUT_ROWS > MAX_INPUT_VALUES:  # large inputs: fewer rows suffice
                rows = rows[: max(1, MAX_INPUT_VALUES // MAX_INPUT_ROWS // max(rows.shape[1], 1))]
            if self._input_pool and rows.shape[1] != self._input_pool[0].shape[1]:
                return
            pooled = sum(t.numel() for t in self._input_pool)
            room = min(MAX_INPUT_ROWS - self._input_rows, (MAX_INPUT_VALUES - pooled) // max(rows.shape[1], 1))
            if room <= 0:
                self._input_rows = MAX_INPUT_ROWS  # full: the values cap binds before the rows cap
                return
            rows = rows[:room].to("cpu", torch.float64)
        self._input_layer = module
        self._input_pool.append(rows)
        self._input_rows += rows.shape[0]
        self._inputs = _input_stats(type(module).__name__, torch.cat(self._input_pool))

    def _forward_post(self, module, args, output):
        if _compiled_graph(module) or type(module).__name__ == "OptimizedModule":
            return
        self._depth = max(0, self._depth - 1)
        if module._parameters and any(v is not None for v in module._parameters.values()):
            self._param_calls += 1

    def on_activation(self, kind: str, output: Any) -> None:
        """Share of dead (ReLU) or saturated (sigmoid/tanh) units of one activation call."""
        if not (self.window and isinstance(output, torch.Tensor) and output.is_floating_point()):
            return
        if output.dim() < 2 or output.shape[0] < 2 or len(self._open_activations) >= MAX_ACTIVATION_ROWS:
            return
        with torch.no_grad():
            if kind == "relu":
                if output.shape[0] < MIN_DEAD_BATCH:
                    return
                alive = output.detach().flatten(1).amax(0) > 0
                units = alive.numel()
                share = 1.0 - int(torch.count_nonzero(alive)) / units
            elif kind == "sigmoid":
                share, units = float(((output < 0.01) | (output > 0.99)).float().mean()), output[0].numel()
            else:
                share, units = float((output.abs() > 0.99).float().mean()), output[0].numel()
        self._open_activations.append(
            {"kind": kind, "share": share, "units": units, "after": self._param_calls, "batch": int(output.shape[0])}
        )

    def _close_activations(self) -> None:
        """An activation is hidden when a parametrised layer ran after it (it feeds the network, not the loss)."""
        for row in self._open_activations:
            row["hidden"] = self._param_calls > row["after"]
            self._activations.append(row)
        self._open_activations = []

    def _summarize_activations(self, record: dict) -> None:
        self._close_activations()
        rows, self._activations = self._activations, []
        output = [r for r in rows if not r["hidden"] and r["kind"] == "relu"]
        if output:  # a ReLU on the model's output: units at 0 for the whole batch predict 0 and pass no gradient
            record["dead_output_share"] = max(r["share"] for r in output)
        for kind, key in (("relu", "dead_relu"), ("saturating", "saturated")):
            chosen = [r for r in rows if r["hidden"] and (r["kind"] == "relu") == (kind == "relu")]
            if not chosen:
                continue
            units = sum(r["units"] for r in chosen)
            record[f"{key}_share"] = sum(r["share"] * r["units"] for r in chosen) / units
            record[f"{key}_max"] = max(r["share"] for r in chosen)
            record[f"{key}_layers"] = len(chosen)

    # -- losses --------------------------------------------------------------------------------------------
    def on_loss(self, name: str, args: tuple, kwargs: dict, output: Any) -> None:
        """What a loss function received: probabilities where it expects logits, shapes that broadcast…"""
        self.loss_calls[name] += 1
        bound = loss_arguments(name, args, kwargs)
        reduction = loss_reduction(bound)
        if reduction != "mean":
            self.summed_losses.add(name)  # 'sum' (or 'none'): the loss is not on a per-example scale
        step = self.step_count
        x, y = bound.get("input"), bound.get("target")
        if self.window and (step < 5 or step % self.every < 2):  # the sampled steps
            self._note_batch_labels(name, x, y, bound)
            self._note_loss_shape(x, y)
        if not self.window or not (step < 5 or step % (5 * self.every) < 2):  # a few windows suffice
            return
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            return
        grad_enabled = torch.is_grad_enabled()
        with torch.no_grad():
            check = _loss_check(name, x.detach(), y, x.grad_fn)
            self._loss_checked[name] += 1
            if check is not None:
                seen = self._loss_flags.setdefault(
                    check["kind"], {**check, "step": self.step_count, "loss": name, "count": 0}
                )
                seen["count"] += 1
                seen["last_step"] = self.step_count
            if isinstance(y, torch.Tensor):
                if y.is_floating_point() and not bool(torch.isfinite(y).all()):
                    self.target_nan_or_inf = True
                self._note_targets(name, x, y, bound)
            if (
                self.initial_loss is None
                and grad_enabled
                and x.requires_grad
                and isinstance(output, torch.Tensor)
                and output.numel() == 1
            ):
                classes = (
                    int(x.shape[1])
                    if name == "cross_entropy" and x.dim() >= 2
                    else (int(x.shape[0]) if name == "cross_entropy" else None)
                )
                self.initial_loss = {
                    "loss": name,
                    "value": float(output),
                    "classes": classes,
                    "step": self.step_count,
                    "reduction": reduction,
                }
            if self.batch_size is None and x.dim() >= 1:
                self.batch_size = int(x.shape[0])

    def on_softmax(self, name: str, args: tuple, kwargs: dict) -> None:
        """A softmax taken over the batch axis of a (batch, classes) tensor normalises across examples."""
        if not self.window or self._softmax_checked >= 64:
            return
        x = argument(args, kwargs, 0, "input")
        dim = argument(args, kwargs, 1, "dim")
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or not isinstance(dim, int) or self.batch_size is None:
            return
        self._softmax_checked += 1
        batch = x.shape[0]
        if dim % x.dim() == 0 and batch == self.batch_size and batch >= 2 and x.shape[-1] >= 2:
            seen = self._axis_flags.setdefault(
                name,
                {
                    "kind": "softmax_over_batch",
                    "function": name,
                    "shape": list(x.shape),
                    "dim": dim,
                    "step": self.step_count,
                    "count": 0,
                },
            )
            seen["count"] += 1

    def class_target_findings(self) -> list[dict]:
        """A regression loss whose targets are class indices: the integers 0…K−1 (3 ≤ K ≤ 20), each about
        equally frequent (within 2× of 1/K: counts and ratings are skewed or start at 1), at every call."""
        inspected, integer, loss = self._class_calls
        counts = self._class_targets
        if not inspected or integer < inspected or not counts:
            return []
        k, total = max(counts) + 1, sum(counts.values())
        if not 3 <= k <= 20 or sorted(counts) != list(range(k)) or total < 8 * k:
            return []
        if any(not 0.5 / k <= c / total <= 2 / k for c in counts.values()):
            return []
        return [
            {
                "kind": "classes_as_regression",
                "loss": loss,
                "top": k - 1,
                "step": 0,
                "count": integer,
                "checked": inspected,
            }
        ]

    def axis_findings(self) -> list[dict]:
        """Softmaxes over the batch axis seen at least twice."""
        return [seen for seen in self._axis_flags.values() if seen["count"] >= 2]

    def _note_targets(self, name: str, x: torch.Tensor, y: torch.Tensor, bound: dict) -> None:
        if name in ("cross_entropy", "nll_loss") and not y.is_floating_point():
            ignore = bound.get("ignore_index", -100)
            values = y.reshape(-1)
            values = values[values != ignore]
            if values.numel():
                counts = torch.bincount(values.clamp_min(0).cpu())
                self.label_counts.update({i: int(c) for i, c in enumerate(counts.tolist()) if c})
        elif name in ("binary_cross_entropy", "binary_cross_entropy_with_logits"):
            positives = float(y.detach().float().sum())
            self.label_counts.update({1: positives, 0: y.numel() - positives})
        elif name in ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss") and y.is_floating_point():
            t = y.detach().double()
            self._class_calls[0] += 1
            single = (x.dim() == 1 or (x.dim() == 2 and x.shape[1] == 1)) and x.shape == t.shape
            if single and t.numel() and bool((t == t.round()).all()) and float(t.min()) >= 0 and float(t.max()) <= 100:
                self._class_calls[1] += 1
                self._class_calls[2] = name
                self._class_targets.update(int(v) for v in t.reshape(-1).tolist())
            self.target_moments[0] += t.numel()
            self.target_moments[1] += float(t.sum())
            self.target_moments[2] += float((t * t).sum())

    def _note_batch_labels(self, name: str, x: Any, y: Any, bound: dict) -> None:
        """Which classes one training batch holds (``data_not_shuffled`` compares them with a shuffled batch's).

        Classification losses with one hard label per example; training calls only (the input requires grad: a
        validation loop over a class-sorted folder is unshuffled on purpose), the first call of a step."""
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.requires_grad and x.dim() >= 1):
            return
        if len(self.batch_labels) >= 400 or (self.batch_labels and self.batch_labels[-1][2] == self.step_count):
            return
        with torch.no_grad():
            if name in ("cross_entropy", "nll_loss") and x.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
                values = y[y != bound.get("ignore_index", -100)]
            elif name in ("binary_cross_entropy", "binary_cross_entropy_with_logits") and y.numel() == x.shape[0]:
                values = y.reshape(-1)
                if not bool(((values == 0) | (values == 1)).all()):
                    return  # soft targets
                values = values.long()
            else:
                return
            if values.numel() < 8 or values.numel() != x.shape[0] or int(values.min()) < 0:
                return
            counts = torch.bincount(values.cpu()).tolist()
        self.batch_label_pool.update({i: c for i, c in enumerate(counts) if c})
        classes = [i for i, c in enumerate(counts) if c]
        self.batch_labels.append([len(classes), int(values.numel()), self.step_count, classes[:64]])

    def loss_findings(self) -> list[dict]:
        """Miswirings seen at (nearly) every inspected call of their loss function, not once by chance."""
        found = []
        for kind, seen in self._loss_flags.items():
            checked = self._loss_checked[seen["loss"]]
            if seen["count"] < 0.9 * checked:
                continue
            if kind == "probabilities_into_bce_with_logits" and (seen["count"] < 3 or seen["last_step"] < 10):
                continue  # logits of an untrained model can all fall in (0, 1); trained ones leave it
            found.append({**seen, "checked": checked})
        return found + self.axis_findings() + self.class_target_findings()


@torch.no_grad()
def _input_stats(layer: str, flat: torch.Tensor) -> dict | None:
    """Scale of the first parametrised layer's input, per feature (LeCun et al. 1998, "Efficient BackProp" §4.3).

    ``flat`` holds the pooled rows (examples × features, float64). Besides the overall RMS: the typical
    offset of a feature relative to its spread (|mean|/std: a sliver of a range far from 0) and how far
    apart the features' spreads are (largest std / median std), both over the features that vary.
    """
    if flat.shape[0] < 1:
        return None
    if not bool(torch.isfinite(flat).all()):
        return {"layer": layer, "nonfinite": True, "rows": int(flat.shape[0])}
    feature_rms = flat.pow(2).mean(0).sqrt()
    stats = {
        "layer": layer,
        "rows": int(flat.shape[0]),
        "rms": float(flat.pow(2).mean().sqrt()),
        "feature_rms_median": float(feature_rms.median()),
        "feature_rms_max": float(feature_rms.max()),
        "mean_abs": float(flat.mean(0).abs().mean()),
    }
    if flat.shape[0] >= 8:
        std = flat.std(0)
        stats["feature_std_median"] = float(std.median())
        varying = std > 1e-6 * float(std.max()) if float(std.max()) > 0 else std > 0
        if int(varying.sum()) >= 1:
            spread, offset = std[varying], (flat.mean(0)[varying].abs() / std[varying])
            stats["feature_offset_median"] = float(offset.median())
            stats["feature_std_max"] = float(spread.max())
            stats["feature_std_ratio"] = float(spread.max() / spread.median())
            if flat.shape[1] <= 100:  # tabular columns (image pixels at the border are legitimately tiny)
                stats["feature_std_min_ratio"] = float(spread.median() / spread.min())
    return stats


ENDS = 0.05  # within this of 0 or 1: a sigmoid output pushed to a decision
ENDS_SHARE = 0.25  # the share of such values that marks graph-less inputs in (0, 1) as probabilities


def _loss_check(name: str, x: torch.Tensor, y: Any, graph: Any = None) -> dict | None:
    """A loss wired to the wrong kind of input, with the measured numbers; ``graph`` is the input's grad_fn."""
    if name in ("cross_entropy", "nll_loss") and x.dim() >= 2 and x.shape[1] >= 2:
        low, high = (float(v) for v in torch.aminmax(x))
        row_sum = x.sum(1) if low >= 0 and high <= 1 else None
        probabilities = row_sum is not None and float((row_sum - 1).abs().max()) < 1e-3
        lse = torch.logsumexp(x.float(), 1) if high <= 0 or name == "nll_loss" else None
        log_probabilities = high <= 0 and lse is not None and float(lse.abs().max()) < 1e-3
        if name == "cross_entropy" and probabilities:
            return {
                "kind": "probabilities_into_cross_entropy",
                "row_sum": float(row_sum.mean()),
                "classes": int(x.shape[1]),
            }
        if name == "cross_entropy" and log_probabilities:
            return {"kind": "log_probabilities_into_cross_entropy", "logsumexp": float(lse.abs().max())}
        if name == "nll_loss" and not log_probabilities:
            return {
                "kind": "scores_into_nll_loss",
                "logsumexp": float(lse.mean()),
                "max": high,
                "probabilities": probabilities,
            }
    if name == "binary_cross_entropy_with_logits" and x.numel() >= 8:
        # Values in (0, 1) alone are no proof: raw logits of a discriminator or a weak classifier can stay there (a
        # DCGAN's D read [0.54, 0.79] for 200 steps). A sigmoid/softmax in the input's autograd graph is. Without a
        # graph (the loss computed under no_grad), the values must also hug the ends as trained probabilities do and
        # logits confined to (0, 1) have no reason to: a quarter of them within ENDS of 0 or 1.
        inside = bool((x > 0).all() and (x < 1).all())
        if graph is not None:
            probabilities = inside and is_probability(graph)
        else:
            probabilities = inside and float(((x < ENDS) | (x > 1 - ENDS)).float().mean()) >= ENDS_SHARE
        if probabilities:
            return {"kind": "probabilities_into_bce_with_logits", "min": float(x.min()), "max": float(x.max())}
    if name in ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss") and isinstance(y, torch.Tensor):
        if tuple(x.shape) != tuple(y.shape):
            return {"kind": "broadcast_shapes", "input_shape": list(x.shape), "target_shape": list(y.shape)}
    return None
