"""Downsampling that keeps spikes: min/max envelopes per bucket, and pixel-cell merging for scatters.

A chart is a few hundred pixels wide, so a 100,000-step series is reduced to one bucket per pixel
column; each bucket keeps its minimum, maximum and mean. Drawing the band [min, max] and the mean
line shows every spike a full-resolution plot would show at that width (the M4 idea, Jugel et al.,
VLDB 2014), at a size that does not grow with the run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class Envelope:
    """Per-bucket ``x`` (mean step), ``lo``/``hi`` (min/max of finite y), ``mid`` (mean), ``count``."""

    x: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    mid: np.ndarray
    count: np.ndarray
    exact: bool  # True when every bucket holds at most one point (nothing was reduced)


def envelope(x: np.ndarray, y: np.ndarray, buckets: int) -> Envelope:
    """Min/max/mean of the finite ``y`` in ``buckets`` equal-width bins of ``x`` (x sorted ascending).

    Buckets without a finite value get NaN (a gap in the drawn line). With no more points than
    buckets, the points are returned as they are.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length ({len(x)} vs {len(y)})")
    if len(x) <= buckets:
        return Envelope(x, y, y, y, np.isfinite(y).astype(int), True)
    span = x[-1] - x[0]
    index = (
        np.minimum(((x - x[0]) / span * buckets).astype(np.int64), buckets - 1)
        if span > 0
        else np.zeros(len(x), np.int64)
    )
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
    finite = np.isfinite(y)
    count = np.add.reduceat(finite.astype(np.int64), starts)
    lo = np.minimum.reduceat(np.where(finite, y, np.inf), starts)
    hi = np.maximum.reduceat(np.where(finite, y, -np.inf), starts)
    total = np.add.reduceat(np.where(finite, y, 0.0), starts)
    sizes = np.diff(np.r_[starts, len(x)])
    xs = np.add.reduceat(x, starts) / sizes
    empty = count == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mid = total / count
    lo[empty] = hi[empty] = mid[empty] = np.nan
    return Envelope(xs, lo, hi, mid, count, False)


def merge_cells(px: np.ndarray, py: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of one representative point per occupied ``cell``×``cell`` pixel square, and counts.

    Overlapping dots are merged, never isolated ones: every occupied square keeps a dot, so an
    outlier far from the crowd is always drawn.
    """
    ix = np.floor(np.asarray(px) / cell).astype(np.int64)
    iy = np.floor(np.asarray(py) / cell).astype(np.int64)
    keys = (ix - ix.min(initial=0)) * (int(iy.max(initial=0) - iy.min(initial=0)) + 1) + (iy - iy.min(initial=0))
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    return first, counts


def blocks(x: np.ndarray, y: np.ndarray, window: int, stat: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """``stat`` ("mean" or "median") of the finite y over consecutive blocks of ``window`` points.

    Used to compare runs on a smoothed scale (e.g. the share of steps that lowered the loss).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    window = max(1, int(window))
    if len(x) == 0:
        return np.array([]), np.array([])
    pad = -len(x) % window  # the last, partial block is kept (padded with NaN)
    xs = np.nanmean(np.r_[x, np.full(pad, np.nan)].reshape(-1, window), axis=1)
    ys = np.r_[np.where(np.isfinite(y), y, np.nan), np.full(pad, np.nan)].reshape(-1, window)
    with warnings.catch_warnings():  # all-NaN blocks give NaN, which is what we want
        warnings.simplefilter("ignore", RuntimeWarning)
        values = np.nanmedian(ys, axis=1) if stat == "median" else np.nanmean(ys, axis=1)
    return xs, values
