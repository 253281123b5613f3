"""Axis scales and tick labels of the report's charts."""

import math

import numpy as np
import pytest

from stepaudit.report.scales import Scale, auto_kind, fmt, linear_ticks, linthresh, padded


def test_fmt_is_short_and_readable():
    assert fmt(0) == "0"
    assert fmt(0.25) == "0.25"
    assert fmt(100_000.0) == "100,000"
    assert fmt(1.5e-4) == "1.5e−4"
    assert fmt(-2.0) == "−2"
    assert fmt(math.nan) == "nan" and fmt(math.inf) == "∞"


def test_linear_ticks_are_round_and_cover_the_range():
    ticks = linear_ticks(0.13, 2.71)
    assert ticks == [0.5, 1.0, 1.5, 2.0, 2.5]
    assert linear_ticks(0, 100_000) == [0, 20000, 40000, 60000, 80000, 100000]


def test_linear_scale_maps_the_domain_onto_the_pixels():
    s = Scale("linear", 0, 10, 100, 300)
    assert s(0) == 100 and s(10) == 300 and s(2.5) == 150
    flipped = Scale("linear", 0, 10, 250, 50)  # y axes run upwards
    assert flipped(10) == 50


def test_log_scale_ticks_are_powers_of_ten_over_many_decades():
    s = Scale("log", 1e-6, 1.0, 0, 600)
    assert [v for v, _ in s.ticks()] == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert s(1e-3) == pytest.approx(300)
    assert s.ticks()[3][1] == "10⁻³"
    narrow = Scale("log", 0.0012, 0.0019, 0, 100)  # within one decade: fall back to round values
    assert len(narrow.ticks()) >= 2


def test_log_scale_refuses_nonpositive_domains():
    with pytest.raises(ValueError, match="positive"):
        Scale("log", 0, 1, 0, 1)


def test_symlog_is_odd_monotone_and_linear_near_zero():
    s = Scale("symlog", -100, 100, 0, 1, linthresh=0.01)
    v = np.array([-100, -1, -0.01, 0, 0.01, 1, 100])
    t = s.transform(v)
    assert np.all(np.diff(t) > 0)
    np.testing.assert_allclose(t, -t[::-1])
    assert s.transform(1e-5) == pytest.approx(1e-5 / 0.01 / math.log(10), rel=1e-3)  # log10(1+u) ≈ u/ln10
    labels = [label for _, label in s.ticks()]
    assert "0" in labels and "10²" in labels and "−10²" in labels


def test_linthresh_and_auto_kind():
    assert linthresh(np.array([1e-4, 1e-3, 1e-2, 1e-1, 1.0] * 4)) == pytest.approx(1e-4)
    assert auto_kind(np.array([0.01, 1.0, 5.0])) == "log"
    assert auto_kind(np.array([-1.0, 1.0])) == "linear"
    assert padded(1.0, 1.0) == (0.9, 1.1)
