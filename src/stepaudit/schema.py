"""The record schema in code: look a field up, type its store column, order export columns, print the docs table.

The fields themselves are listed in ``schema_fields.py``; everything here is derived from that table:

    field("lr_group_3")            # the Field of a record key (numbered families such as lr_group_<n> included)
    sql_type("loss_before", None)  # "REAL": the store's column type, from the schema, not from the first value
    ordered(["zeta", "delta", "step"])  # ["step", "delta", "zeta"]: schema order, unknown fields after
    python -m stepaudit.schema --markdown   # the field reference of docs/audit.md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .schema_fields import FIELDS, LAYER_FIELDS, TYPES, Field

__all__ = [
    "FIELDS",
    "LAYER_FIELDS",
    "TYPES",
    "Field",
    "conforms",
    "field",
    "layer_field",
    "main",
    "markdown",
    "ordered",
    "ordered_layers",
    "sql_type",
]

SQL_TYPES = {"float": "REAL", "int": "INTEGER", "bool": "INTEGER", "str": "TEXT", "json": "TEXT"}
_BY_NAME = {f.name: f for f in FIELDS if f.pattern is None}
_FAMILIES = [f for f in FIELDS if f.pattern is not None]
_LAYERS_BY_NAME = {f.name: f for f in LAYER_FIELDS}
_POSITION = {f.name: i for i, f in enumerate(FIELDS)}
_LAYER_POSITION = {f.name: i for i, f in enumerate(LAYER_FIELDS)}
if len(_BY_NAME) + len(_FAMILIES) != len(FIELDS) or len(_LAYERS_BY_NAME) != len(LAYER_FIELDS):
    raise ImportError("stepaudit.schema_fields lists a field twice")


def field(name: str) -> Field | None:
    """The schema's Field for a record key (a member of a numbered family maps to the family), or None."""
    found = _BY_NAME.get(name)
    if found is not None:
        return found
    return next((f for f in _FAMILIES if f.pattern.match(name)), None)


def layer_field(name: str) -> Field | None:
    """The schema's Field for a column of a per-layer row, or None."""
    return _LAYERS_BY_NAME.get(name)


def sql_type(name: str, value: Any = None) -> str:
    """The store's SQL column type for ``name`` from the schema; an unknown field: TEXT for a str value, else REAL."""
    known = field(name)
    if known is not None:
        return SQL_TYPES[known.type]
    return "TEXT" if isinstance(value, str) else "REAL"


def conforms(spec: Field, value: Any) -> bool:
    """Whether ``value`` has the field's declared type (None, a missing value, always does; an int is a float)."""
    if value is None:
        return True
    if spec.type == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec.type == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if spec.type == "bool":
        return isinstance(value, bool)
    if spec.type == "str":
        return isinstance(value, str)
    return isinstance(value, (list, dict, tuple))


def _rank(name: str, positions: dict[str, int], lookup: Callable[[str], Field | None]) -> tuple[int, int, int]:
    """Sort key: (unknown?, position of the field or family in the schema, member number of a family)."""
    spec = lookup(name)
    if spec is None:
        return (1, 0, 0)  # unknown: after every known field, in the order given (sorted() is stable)
    suffix = name[len(spec.name.split("<n>")[0]) :] if spec.pattern is not None else ""
    return (0, positions[spec.name], int(suffix) if suffix.isdigit() else 0)


def ordered(names: Iterable[str]) -> list[str]:
    """Record keys in schema order (a numbered family by its number), unknown keys after in their given order."""
    return sorted(dict.fromkeys(names), key=lambda n: _rank(n, _POSITION, field))


def ordered_layers(names: Iterable[str]) -> list[str]:
    """Columns of per-layer rows in schema order, unknown ones after in their given order."""
    return sorted(dict.fromkeys(names), key=lambda n: _rank(n, _LAYER_POSITION, layer_field))


def _cell(text: str) -> str:
    """A table cell's text; an empty one shows as a dash."""
    return text.replace("\n", " ") or "—"


def _table(fields: Sequence[Field]) -> list[str]:
    """The Markdown lines of one field table."""
    lines = ["| field | type | unit | written by | meaning |", "|---|---|---|---|---|"]
    for spec in fields:
        cells = (f"`{spec.name}`", spec.type, _cell(spec.unit), _cell(spec.writer), _cell(spec.meaning))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown() -> str:
    """The field reference as Markdown: the step fields, then the columns of a per-layer row."""
    lines = _table(FIELDS)
    lines += ["", 'Each row of `layers` (the store\'s `layers` table, `stepaudit.load(run, table="layers")`):', ""]
    lines += _table(LAYER_FIELDS)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m stepaudit.schema --markdown``: print the field reference table."""
    parser = argparse.ArgumentParser(prog="python -m stepaudit.schema", description="The record schema.")
    parser.add_argument("--markdown", action="store_true", help="print the field reference as Markdown tables")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown())
    else:
        sys.stdout.write("".join(f"{f.name}\t{f.type}\t{f.writer}\n" for f in FIELDS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
