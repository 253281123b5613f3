"""Min/max envelopes, scatter cell merging and block statistics, against brute-force recomputation."""

import math

import numpy as np
import pytest

from stepaudit.report.downsample import blocks, envelope, merge_cells


def brute_envelope(x, y, buckets):
    """Per-bucket min/max/mean by an explicit loop over equal-width bins of x."""
    lo_x, hi_x = x[0], x[-1]
    out = {}
    for xi, yi in zip(x, y):
        b = min(int((xi - lo_x) / (hi_x - lo_x) * buckets), buckets - 1)
        out.setdefault(b, []).append(yi)
    rows = []
    for b in sorted(out):
        finite = [v for v in out[b] if math.isfinite(v)]
        rows.append((min(finite), max(finite), sum(finite) / len(finite)) if finite else (math.nan,) * 3)
    return rows


def test_envelope_matches_a_loop_and_keeps_every_spike():
    rng = np.random.default_rng(1)
    x = np.arange(100_000, dtype=float)
    y = rng.standard_normal(100_000)
    spikes = [3, 77_777, 99_999]
    y[spikes] = [50.0, 80.0, -60.0]
    env = envelope(x, y, 640)
    assert not env.exact and len(env.x) == 640
    expected = brute_envelope(x, y, 640)
    np.testing.assert_allclose(env.lo, [r[0] for r in expected])
    np.testing.assert_allclose(env.hi, [r[1] for r in expected])
    np.testing.assert_allclose(env.mid, [r[2] for r in expected])
    assert env.hi.max() == 80.0 and env.lo.min() == -60.0
    assert sorted(env.hi)[-2] == 50.0  # the second spike survives too
    assert env.count.sum() == 100_000


def test_envelope_skips_nonfinite_and_marks_empty_buckets():
    x = np.arange(10, dtype=float)
    y = np.array([1, np.nan, np.inf, 2, np.nan, np.nan, 3, -np.inf, 4, 5], dtype=float)
    env = envelope(x, y, 5)  # buckets of two: (1,nan) (inf,2) (nan,nan) (3,-inf) (4,5)
    np.testing.assert_array_equal(env.lo, [1, 2, np.nan, 3, 4])
    np.testing.assert_array_equal(env.hi, [1, 2, np.nan, 3, 5])
    np.testing.assert_array_equal(env.count, [1, 1, 0, 1, 2])


def test_short_series_are_returned_as_they_are():
    x, y = np.arange(5.0), np.array([3.0, 1.0, np.nan, 2.0, 5.0])
    env = envelope(x, y, 10)
    assert env.exact
    np.testing.assert_array_equal(env.mid, y)


def test_envelope_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        envelope(np.arange(3.0), np.arange(4.0), 2)


def test_merge_cells_keeps_one_dot_per_occupied_cell_and_every_outlier():
    rng = np.random.default_rng(0)
    px = np.r_[rng.normal(100, 2, 5000), 700.0]
    py = np.r_[rng.normal(100, 2, 5000), 20.0]
    keep, counts = merge_cells(px, py, 3.0)
    cells = {(math.floor(a / 3.0), math.floor(b / 3.0)) for a, b in zip(px, py)}
    assert len(keep) == len(cells)
    assert {(math.floor(px[i] / 3.0), math.floor(py[i] / 3.0)) for i in keep} == cells
    assert counts.sum() == len(px)
    assert len(px) - 1 in keep  # the lone outlier is drawn


def test_blocks_median_and_mean_with_a_partial_last_block():
    x = np.arange(7, dtype=float)
    y = np.array([1, 5, 3, np.nan, 2, 8, 4], dtype=float)
    xs, med = blocks(x, y, 3, "median")
    np.testing.assert_allclose(xs, [1, 4, 6])
    np.testing.assert_allclose(med, [3, 5, 4])
    _, mean = blocks(x, y, 3, "mean")
    np.testing.assert_allclose(mean, [3, 5, 4])
    assert blocks(np.array([]), np.array([]), 3)[0].size == 0
