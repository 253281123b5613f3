"""Recurrent layers with ``batch_first=False``: the shapes of their inputs, for comparison with the loss's batch.

``RecurrentObserver`` is mixed into ``ForwardObserver``. On sampled steps the global forward pre-hook hands
it every ``nn.RNNBase`` call (LSTM, GRU, RNN); it keeps the shape of unpacked 3-D inputs of training
forwards (grad enabled, module in training mode) of layers built with ``batch_first=False``. The wrapped
loss functions hand it the shapes of what each training loss received. Shapes only: no tensor is read.
"""

from __future__ import annotations

from typing import Any

import torch

MAX_CALLS = 24  # input shapes kept per recurrent layer
MAX_LOSS_SHAPES = 96  # loss input shapes kept over the run


class RecurrentObserver:
    """Input shapes of seq-first recurrent layers and the loss's input shapes, per sampled step."""

    step_count: int

    def _init_recurrent(self) -> None:
        self._recurrent: dict[int, dict] = {}
        self._loss_shapes: list[list] = []

    def _note_recurrent(self, module: torch.nn.Module, args: tuple) -> None:
        """A seq-first recurrent layer's unpacked 3-D input in a training forward: (step, dim 0, dim 1, dim 2)."""
        if getattr(module, "batch_first", True) or not module.training or not torch.is_grad_enabled():
            return
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() != 3:  # PackedSequence, unbatched (T, F) input
            return
        seen = self._recurrent.setdefault(id(module), {"layer": type(module).__name__, "calls": []})
        if len(seen["calls"]) < MAX_CALLS:
            seen["calls"].append([self.step_count, *(int(d) for d in x.shape)])

    def _note_loss_shape(self, x: Any, y: Any) -> None:
        """The shape of a training loss's input (and its target's), at a sampled step."""
        if not isinstance(x, torch.Tensor) or not x.requires_grad or x.dim() < 1 or not self._recurrent:
            return
        if len(self._loss_shapes) < MAX_LOSS_SHAPES:
            target = list(y.shape) if isinstance(y, torch.Tensor) else None
            self._loss_shapes.append([self.step_count, list(x.shape), target])

    def recurrent_inputs(self, roots: list[tuple[torch.nn.Module, str]]) -> dict:
        """What the rule reads: each seq-first recurrent layer's input shapes, and the loss shapes."""
        names: dict[int, str] = {}
        for root, prefix in roots:
            for name, module in root.named_modules():
                names.setdefault(id(module), prefix + name if name else prefix.rstrip(".") or "(root)")
        layers = []
        for key, seen in self._recurrent.items():
            name = names.get(key) or seen["layer"]
            layers.append({"module": name, "layer": seen["layer"], "calls": seen["calls"]})
        shapes = self._loss_shapes
        if len(shapes) >= MAX_LOSS_SHAPES:  # the cap may have cut the last step short: none of it is judged
            shapes = [entry for entry in shapes if entry[0] != shapes[-1][0]]
        return {"recurrent_inputs": layers, "loss_shapes": shapes if layers else []}
