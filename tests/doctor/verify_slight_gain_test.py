"""--verify on a fix that helps, but by less than a fix must: inconclusive, never "refuted ... no better";
under half that margin it stays refuted, and its line says by how much the loss was lower.

After the hunt's f07 (a head swapped after the optimizer was built): adding the missing parameters took the
loss 2.3 → 2.14 against 2.3 unchanged (run-to-run noise 0), 7% of the starting loss, under MARKED (10%)."""

from __future__ import annotations

from stepaudit.doctor.verify import MARKED, RunLoss, _detail, judge


def test_a_fix_better_beyond_the_noise_but_not_markedly_is_inconclusive():
    original = RunLoss(2.3, 2.3, steps=290)
    fixed = RunLoss(2.3, 2.14, steps=290)
    verdict, noise = judge(original, original, fixed)
    assert (verdict, noise) == ("inconclusive", 0.0)
    line = _detail(verdict, "the missing parameters added", original, original, fixed, noise)
    assert "no better" not in line and "better than the original by 7%" in line, line
    assert MARKED / 2 < (2.3 - 2.14) / 2.3 < MARKED


def test_a_barely_better_fix_is_refuted_and_says_how_much_lower():
    original = RunLoss(2.3, 2.29, steps=100)
    fixed = RunLoss(2.3, 2.2, steps=100)  # 4% of the start: below half of MARKED
    verdict, noise = judge(original, original, fixed)
    assert verdict == "refuted"
    line = _detail(verdict, "lr ×0.1", original, original, fixed, noise)
    assert "only 4% of its starting loss lower, under the 10% a fix must remove" in line, line


def test_a_fix_that_changes_nothing_is_still_no_better():
    original = RunLoss(2.3, 2.29, steps=100)
    verdict, noise = judge(original, original, original)
    assert verdict == "refuted"
    assert _detail(verdict, "lr ×0.1", original, original, original, noise).endswith("no better than the original")


def test_a_slight_gain_within_the_noise_is_refuted():
    original, rerun = RunLoss(2.3, 2.3), RunLoss(2.3, 2.25)  # noise 0.022 of the start: 3× is 0.065
    assert judge(original, rerun, RunLoss(2.3, 2.17))[0] == "refuted"  # 0.057 gain: within 3× the noise
