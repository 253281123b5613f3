"""The circuit as a character drawing: values above each wire (green), gradients below (red)."""

from __future__ import annotations

from .layout import Slot, symbol, unfold
from .result import fmt

Segment = tuple[str, str]  # (text, rich style or "")
Line = list[Segment]

# box-drawing character for a junction, by which sides it connects: (left, right, up, down)
_BOX = {
    (1, 1, 0, 0): "─",
    (1, 1, 1, 1): "┼",
    (1, 1, 0, 1): "┬",
    (1, 1, 1, 0): "┴",
    (1, 0, 0, 1): "┐",
    (1, 0, 1, 0): "┘",
    (1, 0, 1, 1): "┤",
    (0, 1, 0, 1): "┌",
    (0, 1, 1, 0): "└",
    (0, 1, 1, 1): "├",
    (0, 0, 1, 1): "│",
    (1, 0, 0, 0): "─",
    (0, 1, 0, 0): "─",
}
WIRE, VALUE, GRAD, GATE, VAR, CONST = "grey50", "green", "red", "bold cyan", "bold", "yellow"


class _Grid:
    def __init__(self, height: int, width: int) -> None:
        self.cells: list[list[Segment]] = [[(" ", "")] * width for _ in range(height)]

    def put(self, row: int, col: int, text: str, style: str = "") -> None:
        for i, ch in enumerate(text):
            self.cells[row][col + i] = (ch, style)

    def lines(self) -> list[Line]:
        out: list[Line] = []
        for row in self.cells:
            line: Line = []
            for ch, st in row:
                if line and line[-1][1] == st:
                    line[-1] = (line[-1][0] + ch, st)
                else:
                    line.append((ch, st))
            if line and not line[-1][0].strip():
                line.pop()
            out.append(line)
        return out


def _wire_labels(s: Slot) -> tuple[str, str]:
    grad = s.wire_grad
    return fmt(s.node["value"]), ("" if grad is None else "∂ " + fmt(grad))


def draw(result: dict) -> list[Line]:
    """Draw the circuit of ``result`` (the explain() object) as styled lines."""
    root = unfold(result["nodes"])
    slots = root.walk()
    labw = max(max(len(t) for t in _wire_labels(s)) for s in slots)
    leafw = max([len(symbol(s.node)) for s in slots if s.level == 0] + [1])
    symw = max(len(symbol(s.node)) for s in slots)
    step = symw + labw + 5

    def x_of(s: Slot) -> int:  # start column of the node's symbol
        if s.level == 0:
            return leafw - len(symbol(s.node))
        return leafw + labw + 5 + (s.level - 1) * step

    out_name = "f" if result["target"] is None else "L"
    height = 2 * max(s.row for s in slots) + 3
    width = x_of(root) + len(symbol(root.node)) + labw + 6
    grid = _Grid(height, width)
    for s in slots:
        row, x = 2 * s.row + 1, x_of(s)
        sym = symbol(s.node)
        style = VAR if s.node["op"] == "var" else CONST if s.node["op"] == "const" else GATE
        grid.put(row, x, sym, style)
        value, grad = _wire_labels(s)
        grid.put(row - 1, x + len(sym) + 1, value, VALUE)
        grid.put(row + 1, x + len(sym) + 1, grad, GRAD)
        if s.kids:
            _connect(grid, s, x, x_of)
    rx = x_of(root) + len(symbol(root.node))
    grid.put(2 * root.row + 1, rx, "─" * (labw + 3), WIRE)
    grid.put(2 * root.row + 1, rx + labw + 4, out_name, VAR)
    return grid.lines()


def _connect(grid: _Grid, s: Slot, x: int, x_of) -> None:  # type: ignore[no-untyped-def]
    """Wires from each input to the junction column just left of the gate, then into the gate."""
    cx, row = x - 2, 2 * s.row + 1
    kid_rows = [2 * k.row + 1 for k in s.kids]
    for k, kr in zip(s.kids, kid_rows):
        start = x_of(k) + len(symbol(k.node))
        grid.put(kr, start, "─" * (cx - start), WIRE)
    top, bottom = min(kid_rows + [row]), max(kid_rows + [row])
    for r in range(top, bottom + 1):
        sides = (int(r in kid_rows), int(r == row), int(r > top), int(r < bottom))
        grid.put(r, cx, _BOX.get(sides, "│"), WIRE)
    grid.put(row, cx + 1, "─", WIRE)
