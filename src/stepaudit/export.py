"""Exporters: TensorBoard (live, as a sink of ``Audit``, or after the fact), CSV and Parquet.

    Audit(model, optimizer, loss_fn, tensorboard="runs/tb")        # live: one scalar per field per step
    stepaudit export RUN --tensorboard DIR | --csv FILE | --parquet FILE [--table steps|layers]

TensorBoard needs the ``tensorboard`` package and Parquet needs ``pyarrow`` (``pip install
'stepaudit[tensorboard]'`` / ``'stepaudit[parquet]'``); CSV needs nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from .schema import ordered, ordered_layers
from .store import RunStoreError, output_file, read_run

LAYER_SCALARS = ("update_ratio", "grad_norm", "update_norm")


def _require_tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch.utils.tensorboard imports the tensorboard package
        raise ImportError(
            "TensorBoard export needs the tensorboard package: pip install 'stepaudit[tensorboard]' "
            "(or pip install tensorboard)"
        ) from error
    return SummaryWriter


def _number(value: Any) -> float | None:
    """A scalar TensorBoard can plot (bools and ints included), or None for strings and lists."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


class TensorBoardSink:
    """Writes each audited step's numeric fields (``step/<field>``) and per-layer ratios (``layers/<field>/<name>``)."""

    def __init__(self, logdir: str | os.PathLike, flush_secs: int = 10) -> None:
        writer = _require_tensorboard()
        self.logdir = Path(logdir)
        self.writer = writer(log_dir=str(self.logdir), flush_secs=flush_secs)

    def __call__(self, record: dict) -> None:
        """Add one record: every numeric field, the verdict as 0/1 indicators, and layer rows."""
        step = int(record.get("step", 0))
        for key, value in record.items():
            number = _number(value)
            if key != "step" and number is not None:
                self.writer.add_scalar(f"step/{key}", number, step)
        verdict = record.get("verdict")
        if isinstance(verdict, str):
            self.writer.add_scalar("verdict/lowered_loss", float(verdict == "decrease"), step)
        for row in record.get("layers") or ():
            for field in LAYER_SCALARS:
                number = _number(row.get(field))
                if number is not None:
                    self.writer.add_scalar(
                        f"layers/{field}/{row.get('kind', 'module')}:{row.get('name')}", number, step
                    )

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def _with_layers(steps: list[dict], layers: list[dict]) -> list[dict]:
    by_step: dict[Any, list[dict]] = {}
    for row in layers:
        by_step.setdefault(row["step"], []).append(row)
    return [{**s, "layers": by_step.get(s.get("step"), [])} for s in steps]


def export_tensorboard(run: str | os.PathLike, logdir: str | os.PathLike) -> Path:
    """Write a recorded run into a TensorBoard log folder."""
    _, steps, layers = read_run(run)
    sink = TensorBoardSink(logdir)
    try:
        for record in _with_layers(steps, layers):
            sink(record)
    finally:
        sink.close()
    return Path(logdir)


def _table(run: str | os.PathLike, table: str) -> tuple[list[str], list[dict]]:
    if table not in ("steps", "layers"):
        raise ValueError(f"table must be 'steps' or 'layers', not {table!r}")
    _, steps, layers = read_run(run)
    rows = steps if table == "steps" else layers
    fields: dict[str, None] = {}
    for row in rows:
        fields.update(dict.fromkeys(row))
    return (ordered(fields) if table == "steps" else ordered_layers(fields)), rows  # schema order, unknown after


def _cell(value: Any) -> Any:
    """CSV/Parquet cell: lists and dicts as JSON text, floats at full precision."""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, float):
        return (
            repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
        )
    return value


def export_csv(run: str | os.PathLike, path: str | os.PathLike, table: str = "steps") -> Path:
    """Write the run's steps (or layers) as CSV: one row per step, a column per field, NaN as ``nan``.

    A folder ``path`` (existing, or written with a trailing slash) gets ``steps.csv`` / ``layers.csv`` inside it.
    """
    fields, rows = _table(run, table)
    path = output_file(path, f"{table}.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        for row in rows:
            writer.writerow(["" if row.get(f) is None else _cell(row.get(f)) for f in fields])
    return path


def export_parquet(run: str | os.PathLike, path: str | os.PathLike, table: str = "steps") -> Path:
    """Write the run's steps (or layers) as Parquet: numbers as float64/int64, text as strings, lists as JSON.

    A folder ``path`` (existing, or written with a trailing slash) gets ``steps.parquet`` / ``layers.parquet`` inside it.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError(
            "Parquet export needs pyarrow: pip install 'stepaudit[parquet]' (or pip install pyarrow)"
        ) from error
    fields, rows = _table(run, table)
    arrays = {}
    for field in fields:
        values = [row.get(field) for row in rows]
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
            arrays[field] = pa.array(values, type=pa.int64())
        elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            arrays[field] = pa.array([math.nan if v is None else float(v) for v in values], type=pa.float64())
        else:
            arrays[field] = pa.array(
                [None if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for v in values],
                type=pa.string(),
            )
    path = output_file(path, f"{table}.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path)
    return path


def main(argv: list[str] | None = None) -> int:
    """Export a run to TensorBoard, CSV or Parquet."""
    from .cli import fail

    parser = argparse.ArgumentParser(prog="stepaudit export", description="Export a recorded run.")
    parser.add_argument("run", help="run folder (the one holding stepaudit.sqlite), or that .sqlite file")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--tensorboard", metavar="DIR", help="TensorBoard log folder to write")
    target.add_argument(
        "--csv",
        metavar="FILE",
        help="CSV file to write; a folder (existing, or ending in /) gets steps.csv or layers.csv inside it",
    )
    target.add_argument(
        "--parquet",
        metavar="FILE",
        help="Parquet file to write; a folder (existing, or ending "
        "in /) gets steps.parquet or layers.parquet inside it",
    )
    parser.add_argument(
        "--table",
        choices=("steps", "layers"),
        default="steps",
        help="for CSV/Parquet: one row per step (default) or per (step, layer)",
    )
    args = parser.parse_args(argv)
    try:
        if args.tensorboard:
            out = export_tensorboard(args.run, args.tensorboard)
        elif args.csv:
            out = export_csv(args.run, args.csv, args.table)
        else:
            out = export_parquet(args.run, args.parquet, args.table)
    except ImportError as error:
        return fail("stepaudit export", error, 2)
    except RunStoreError as error:
        return fail("stepaudit export", error, 1)
    except OSError as error:
        if isinstance(error, FileNotFoundError) and error.filename is None:  # no run there (store.py's message)
            return fail("stepaudit export", error, 2)
        # the output cannot be written there (permissions, a file where a folder must be)
        target = args.tensorboard or args.csv or args.parquet
        return fail(
            "stepaudit export",
            OSError(f"cannot write {target}: {error.strerror or error}; pass a writable file or folder"),
            1,
        )
    print(out)
    return 0
