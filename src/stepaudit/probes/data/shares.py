"""Per-run shares over the data probes' fields: steps that helped their own batch but hurt the next or the reference."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import median

from ... import noise as noise_stats
from ...maths import is_finite
from .. import register_summary


def _share(rows: list[dict], test: Callable[[dict], bool]) -> float:
    return sum(map(test, rows)) / len(rows) if rows else math.nan


@register_summary
def run_shares(records: Sequence[dict]) -> dict:
    """Per-run shares of steps that helped their own batch but hurt the next batch / the reference,
    the median grad_cos_ref and the pooled B_simple (mean tr Σ / mean ‖G‖², averaged before dividing).

    "Hurt" means the loss rose by more than its rounding bound; "helped own" means verdict decrease.
    """

    def hurt(key: str) -> Callable[[dict], bool]:
        noise_key = {"next_delta": "next_rounding_noise", "ref_delta": "ref_rounding_noise"}[key]
        return lambda r: r[key] > (r.get(noise_key) if is_finite(r.get(noise_key)) else 0.0)

    out: dict = {}
    for key, label in (("next_delta", "next"), ("ref_delta", "ref")):
        rows = [r for r in records if is_finite(r.get(key))]
        out[f"steps_with_{key}"] = len(rows)
        out[f"share_hurt_{label}"] = _share(rows, hurt(key))
        out[f"share_helped_own_hurt_{label}"] = _share(
            rows, lambda r, key=key: r.get("verdict") == "decrease" and hurt(key)(r)
        )
    cosines = [r["grad_cos_ref"] for r in records if is_finite(r.get("grad_cos_ref"))]
    out["median_grad_cos_ref"] = median(cosines) if cosines else math.nan
    noisy = [r for r in records if is_finite(r.get("trace_sigma")) and is_finite(r.get("grad_sq_norm"))]
    if noisy:
        out["noise_scale_pooled"] = noise_stats.noise_scale(
            sum(r["trace_sigma"] for r in noisy) / len(noisy), sum(r["grad_sq_norm"] for r in noisy) / len(noisy)
        )
    else:
        out["noise_scale_pooled"] = math.nan
    return out
