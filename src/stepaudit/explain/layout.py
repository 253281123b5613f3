"""Left-to-right tree layout of the circuit, shared by the terminal drawing and the SVG.

The JSON ``nodes`` form a DAG (one node per variable).  For drawing, the DAG is unfolded into a
tree: a variable used twice is drawn twice, and each of its wires carries that use's share of the
gradient (the shares add up to the variable's gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GATE_SYMBOL = {
    "add": "+",
    "sub": "−",
    "mul": "×",
    "div": "÷",
    "pow": "^",
    "neg": "neg",
    "loss": "loss",
}


@dataclass
class Slot:
    """One drawn node: where it sits and what its outgoing wire carries."""

    node: dict
    kids: list[Slot] = field(default_factory=list)
    wire_grad: float | None = None  # gradient flowing back along the wire that leaves this node
    level: int = 0  # column: 0 for variables, parent level - 1 for constants
    row: int = 0  # in half-slots: leaves are 0, 2, 4, ...; gates sit between their inputs

    @property
    def is_leaf(self) -> bool:
        return not self.kids

    def walk(self) -> list[Slot]:
        """All slots, inputs before the gates that use them."""
        out: list[Slot] = []
        for k in self.kids:
            out.extend(k.walk())
        out.append(self)
        return out


def symbol(node: dict) -> str:
    """The text drawn for a node: variable name, constant, or a gate like (×) or (exp)."""
    if node["op"] in ("var", "const"):
        return node["label"]
    return f"({GATE_SYMBOL.get(node['op'], node['op'])})"


def unfold(nodes: list[dict]) -> Slot:
    """Unfold the DAG into a tree rooted at the last node and assign levels and rows."""

    def make(i: int, grad: float | None) -> Slot:
        n = nodes[i]
        grads = n.get("input_grads") or [None] * len(n["inputs"])
        return Slot(n, [make(k, g) for k, g in zip(n["inputs"], grads)], grad)

    root = make(len(nodes) - 1, nodes[-1]["grad"])
    _levels(root)
    _constants(root)
    leaves = [s for s in root.walk() if s.is_leaf]
    for i, s in enumerate(leaves):
        s.row = 2 * i
    _rows(root)
    return root


def _levels(s: Slot) -> int:
    for k in s.kids:
        _levels(k)
    s.level = 0 if s.is_leaf else 1 + max(k.level for k in s.kids)
    return s.level


def _constants(s: Slot) -> None:
    # a constant is drawn right next to the gate that uses it, not far left with the variables
    for k in s.kids:
        if k.node["op"] == "const":
            k.level = s.level - 1
        _constants(k)


def _rows(s: Slot) -> int:
    if s.kids:
        rows = [_rows(k) for k in s.kids]
        s.row = (rows[0] + rows[-1]) // 2
    return s.row
