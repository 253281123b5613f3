"""lr_too_high's bouncing branch: with the weights' norm grown ≥ 10×, a consecutive-gradient cosine within two
standard errors of 0 counts whichever its sign (c78, Adam at lr 0.3, read −0.05 ± 0.09 on one CPU and
+0.01 ± 0.03 on another); a clearly positive cosine, or a near-zero one without the growth, does not."""

from __future__ import annotations

from types import SimpleNamespace

from stepaudit.doctor.codes.lr_too_high import _bouncing


def facts(mean: float, stderr: float, growth: float, oscillating: bool = False) -> SimpleNamespace:
    """The measurements ``_bouncing`` reads, as on c78: large early steps, a loss that fell by 30% only."""
    return SimpleNamespace(
        update_ratio_early=0.42,
        update_ratio=0.0046,
        progress=0.30,
        first_nonfinite=None,
        loss_form=None,
        relative_grad_init=0.019,
        weight_growth=(growth, 13.2, 13.2 * growth),
        grad_cos_mean=mean,
        grad_cos_stats=(mean, stderr, 60),
        oscillating=oscillating,
        loss_start=1.38,
        loss_end=0.96,
    )


def test_a_near_zero_positive_cosine_with_a_grown_norm_is_bouncing():
    said = _bouncing(facts(0.0115, 0.03, 33.6))
    assert said is not None and "nearly orthogonal (mean cosine 0.0115 ± 0.03)" in said, said
    assert "pointed apart" not in said


def test_a_negative_cosine_with_a_grown_norm_still_reads_pointed_apart():
    said = _bouncing(facts(-0.05, 0.09, 34.0))
    assert said is not None and "pointed apart (mean cosine -0.05)" in said, said


def test_a_clearly_positive_cosine_is_not_bouncing():
    # consecutive gradients agree beyond their noise: the steps follow a descent direction
    assert _bouncing(facts(0.13, 0.03, 30.0)) is None


def test_a_near_zero_positive_cosine_without_growth_is_not_bouncing():
    assert _bouncing(facts(0.0115, 0.03, 3.0)) is None
    assert _bouncing(facts(-0.01, 0.07, 3.0)) is None  # not oscillating (within 2 s.e. of 0) and no growth
