"""Axis scales for the report's SVG charts: linear, log and symmetric-log, with readable ticks."""

from __future__ import annotations

import math

import numpy as np

_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def fmt(value: float, digits: int = 3) -> str:
    """A short label for a number: ``0``, ``0.25``, ``1.5e-4``, ``12,000``, ``nan``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if 1000 <= magnitude < 1e9 and float(value).is_integer():
        return f"{int(value):,}".replace("-", "−")
    if magnitude >= 1e5 or magnitude < 1e-3:
        mantissa, exponent = f"{value:.{max(digits - 1, 0)}e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
        return f"{mantissa}e{int(exponent)}".replace("-", "−")
    return f"{value:.{digits}g}".replace("-", "−")


def power_label(exponent: int) -> str:
    """``10³``-style label for a power of ten."""
    if exponent == 0:
        return "1"
    if exponent == 1:
        return "10"
    return "10" + str(exponent).translate(_SUPERSCRIPT)


def nice_step(span: float, count: int) -> float:
    """A 1/2/5×10^k step giving about ``count`` intervals over ``span`` (d3's tickIncrement rule)."""
    raw = span / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    error = raw / power
    multiple = 10 if error >= math.sqrt(50) else 5 if error >= math.sqrt(10) else 2 if error >= math.sqrt(2) else 1
    return multiple * power


def linear_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    step = nice_step(hi - lo, count)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, value = [], first
    while value <= hi + step * 1e-9:
        ticks.append(0.0 if abs(value) < step * 1e-9 else round(value, 12))
        value += step
    return ticks


class Scale:
    """Maps data values to pixels: ``kind`` is linear, log (positive data) or symlog (signed, many decades).

    symlog: t(v) = sign(v)·log10(1 + |v|/c), linear within ±c and logarithmic beyond (the usual
    symmetric-log axis); ``c`` (``linthresh``) is a power of ten chosen from the data.
    """

    def __init__(self, kind: str, lo: float, hi: float, p0: float, p1: float, linthresh: float = 1.0) -> None:
        if kind not in ("linear", "log", "symlog"):
            raise ValueError(f"scale kind must be linear, log or symlog, not {kind!r}")
        if kind == "log" and not (lo > 0 and hi > 0):
            raise ValueError("a log scale needs a positive domain")
        self.kind, self.lo, self.hi, self.p0, self.p1, self.c = kind, lo, hi, p0, p1, linthresh
        self._t0, self._t1 = self.transform(lo), self.transform(hi)
        if self._t1 == self._t0:
            self._t1 = self._t0 + 1.0

    def transform(self, value):
        """Value in the scale's linear space (log10 for log, the symlog map for symlog)."""
        v = np.asarray(value, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.kind == "log":
                out = np.log10(np.where(v > 0, v, np.nan))
            elif self.kind == "symlog":
                out = np.sign(v) * np.log10(1.0 + np.abs(v) / self.c)
            else:
                out = v
        return out if out.ndim else float(out)

    def __call__(self, value):
        """Pixel position(s) of ``value``."""
        t = self.transform(value)
        return self.p0 + (t - self._t0) * (self.p1 - self.p0) / (self._t1 - self._t0)

    def contains(self, value) -> np.ndarray:
        """Whether values lie inside the domain."""
        v = np.asarray(value, dtype=float)
        return (v >= min(self.lo, self.hi)) & (v <= max(self.lo, self.hi))

    def ticks(self) -> list[tuple[float, str]]:
        """(value, label) pairs for the axis."""
        if self.kind == "linear":
            return [(t, fmt(t)) for t in linear_ticks(self.lo, self.hi)]
        if self.kind == "log":
            return _log_ticks(self.lo, self.hi)
        return _symlog_ticks(self.lo, self.hi, self.c)


def _log_ticks(lo: float, hi: float) -> list[tuple[float, str]]:
    first, last = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
    decades = list(range(first, last + 1))
    if len(decades) <= 4:  # up to about three decades: add 2× and 5× (or 3×) ticks so there are enough labels
        multiples = (1, 2, 5) if len(decades) <= 3 else (1, 3)
        ticks = [(m * 10.0**k, fmt(m * 10.0**k)) for k in decades for m in multiples]
        ticks = [(v, s) for v, s in ticks if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]
        if len(ticks) >= 3:
            return ticks
        return [(v, fmt(v)) for v in linear_ticks(lo, hi, 4) if v > 0]
    stride = math.ceil(len(decades) / 7)
    return [(10.0**k, power_label(k)) for k in decades[::stride] if lo * (1 - 1e-9) <= 10.0**k <= hi * (1 + 1e-9)]


def _symlog_ticks(lo: float, hi: float, c: float) -> list[tuple[float, str]]:
    top = max(abs(lo), abs(hi))
    if top <= 0:
        return [(0.0, "0")]
    k0, k1 = round(math.log10(c)), math.ceil(math.log10(top) - 1e-9)
    powers = list(range(k0, k1 + 1))
    stride = math.ceil(len(powers) / 4) if powers else 1
    powers = powers[::-1][::stride][::-1]
    ticks = [(0.0, "0")]
    for k in powers:
        for sign in (1, -1):
            value = sign * 10.0**k
            if lo <= value <= hi:
                ticks.append((value, ("−" if sign < 0 else "") + power_label(k)))
    return sorted(ticks)


def padded(lo: float, hi: float, kind: str = "linear", pad: float = 0.05) -> tuple[float, float]:
    """The data range widened a little (multiplicatively for log), never empty."""
    if kind == "log":
        if hi <= lo:
            return lo / 2, hi * 2
        ratio = (hi / lo) ** pad
        return lo / ratio, hi * ratio
    if hi <= lo:
        width = abs(lo) * 0.1 or 1.0
        return lo - width, hi + width
    margin = (hi - lo) * pad
    return lo - margin, hi + margin


def linthresh(values: np.ndarray) -> float:
    """Linear zone half-width for symlog: a power of ten near the 10th percentile of the nonzero magnitudes."""
    magnitudes = np.abs(values[np.isfinite(values) & (values != 0)])
    if magnitudes.size == 0:
        return 1.0
    return 10.0 ** math.floor(math.log10(float(np.percentile(magnitudes, 10))))


def auto_kind(values: np.ndarray, decades: float = 1.5) -> str:
    """``log`` when the finite values are all positive and span more than ``decades``, else linear."""
    finite = values[np.isfinite(values)]
    if finite.size and (finite > 0).all() and math.log10(finite.max() / finite.min()) > decades:
        return "log"
    return "linear"
