"""Evaluation metrics, the paired bootstrap and gate decisions against hand-computed values."""

import numpy as np
import pytest

from ampo import stats
from ampo.config import Gates
from ampo.gates import Answers, Evaluation, Interval, compare, decide, gate_summary, policy_metrics, win_rate


def test_win_rate_counts_ties_half():
    # diffs: +0.5 (win), 0 (tie), -1 (loss), +0.1 (win) -> (2 + 0.5) / 4 = 0.625
    assert win_rate(np.array([1.0, 0.5, 0.0, 0.3]), np.array([0.5, 0.5, 1.0, 0.2])) == pytest.approx(0.625)


def test_win_rate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal non-empty"):
        win_rate(np.ones(3), np.ones(2))


def test_policy_metrics_instruction_and_prompt_level():
    # prompt 0: instructions (strict, loose) = (T, T), (F, T); prompt 1: (F, F); prompt 2: none
    followed = [[(True, True), (False, True)], [(False, False)], []]
    m = policy_metrics(np.array([1.0, 0.0, 0.5]), np.array([10, 20, 30]), followed)
    # instruction level over 3 instructions: strict 1/3, loose 2/3
    assert m.instruction_strict == pytest.approx(1 / 3) and m.instruction_loose == pytest.approx(2 / 3)
    # prompt level over the 2 prompts with instructions: strict 0/2; loose: prompt 0 all loose -> 1/2
    assert m.prompt_strict == 0.0 and m.prompt_loose == 0.5
    assert (m.n_prompts, m.mean_reward, m.mean_length) == (3, 0.5, 20.0)


def test_policy_metrics_without_instructions_leaves_accuracy_empty():
    m = policy_metrics(np.array([0.2, 0.4]), np.array([5, 7]))
    assert m.instruction_strict is None and m.mean_reward == pytest.approx(0.3)


# --- the bootstrap ---------------------------------------------------------------------------------------------


def test_exact_bootstrap_of_a_mean_n3():
    # values (0, 0, 1): of the 27 ordered resamples, the number of 1s drawn is Binomial(3, 1/3):
    # P(mean=0) = 8/27, P(1/3) = 12/27, P(2/3) = 6/27, P(1) = 1/27 -> CDF 0.296, 0.741, 0.963, 1
    counts = stats.all_resample_counts(3)
    assert counts.shape == (27, 3) and (counts.sum(1) == 3).all() and len({tuple(c) for c in counts}) == 10
    reps = stats.ratio_replicates(np.array([0.0, 0.0, 1.0]), None, counts)
    assert sorted(np.round(reps * 3).astype(int).tolist()) == [0] * 8 + [1] * 12 + [2] * 6 + [3]
    # c=0.75: lower = q(0.25) -> 0 (CDF(0)=0.296 >= 0.25); upper = q(0.75) -> 2/3 (CDF(1/3)=0.741 < 0.75)
    assert stats.one_sided_bounds(reps, 0.75) == pytest.approx((0.0, 2 / 3))
    # c=0.7: lower = q(0.3) -> 1/3 (CDF(0)=0.296 < 0.3); upper = q(0.7) -> 1/3 (CDF(1/3)=0.741 >= 0.7)
    assert stats.one_sided_bounds(reps, 0.7) == pytest.approx((1 / 3, 1 / 3))


def test_exact_bootstrap_of_a_ratio_of_sums_n3():
    # instruction-level accuracy: prompts with (followed, instructions) = (1, 1), (0, 2), (2, 2);
    # a resample drawing prompt i c_i times gives (c1 + 2 c3) / (c1 + 2 c2 + 2 c3). Over the 10 count vectors
    # (multiplicity 1 for (3,0,0)-like, 3 for (2,1,0)-like, 6 for (1,1,1)):
    # 0 (x1: 0,3,0), .2 (x3: 1,2,0), 1/3 (x3: 0,2,1), .5 (x3: 2,1,0), .6 (x6: 1,1,1), 2/3 (x3: 0,1,2),
    # 1 (x8: 3,0,0 / 0,0,3 / 2,0,1 / 1,0,2) -> CDF 1, 4, 7, 10, 16, 19, 27 (/27)
    reps = stats.ratio_replicates(np.array([1.0, 0.0, 2.0]), np.array([1.0, 2.0, 2.0]), stats.all_resample_counts(3))
    assert stats.one_sided_bounds(reps, 0.9) == pytest.approx((0.2, 1.0))  # q(.1): 4/27=.148; q(.9): 19/27=.70 < .9
    assert stats.one_sided_bounds(reps, 0.75) == pytest.approx((1 / 3, 1.0))  # q(.25): 7/27=.259
    assert stats.one_sided_bounds(reps, 0.6) == pytest.approx((0.6, 2 / 3))  # q(.4): 16/27=.593; q(.6): 19/27


def test_sampled_bootstrap_matches_the_exact_one_and_is_deterministic():
    values = np.array([0.0, 0.0, 1.0])
    counts = stats.resample_counts(3, 20_000, seed=7)
    assert counts.shape == (20_000, 3) and (counts.sum(1) == 3).all()
    # c=0.8: q(0.2) -> 0 (CDF(0)=0.296), q(0.8) -> 2/3 (CDF(1/3)=0.741 < 0.8 < CDF(2/3)=0.963), far from the jumps
    assert stats.one_sided_bounds(stats.ratio_replicates(values, None, counts), 0.8) == pytest.approx((0.0, 2 / 3))
    np.testing.assert_array_equal(counts, stats.resample_counts(3, 20_000, seed=7))
    assert not np.array_equal(counts, stats.resample_counts(3, 20_000, seed=8))


def test_paired_interval_resamples_the_pairs_together():
    # a - b = (1, 0, 0) on every resample, whatever b is: the interval of the difference is that of (1, 0, 0),
    # narrower than if a and b were resampled independently; point 1/3
    a, b = np.array([5.0, 3.0, 7.0]), np.array([4.0, 3.0, 7.0])
    point, low, high = stats.paired_interval(a, b, level=0.6, samples=20_000, seed=0)
    assert point == pytest.approx(1 / 3) and (low, high) == pytest.approx((0.0, 2 / 3))  # q(.2), q(.8) as above


def test_bootstrap_refuses_bad_arguments():
    with pytest.raises(ValueError, match="n >= 1"):
        stats.resample_counts(0, 10, 0)
    with pytest.raises(ValueError, match=r"confidence must be in \[0.5, 1\), got 1.0"):
        stats.one_sided_bounds(np.zeros(3), 1.0)
    with pytest.raises(ValueError, match="must be"):
        stats.ratio_replicates(np.zeros(3), np.zeros(2), np.ones((4, 3)))


# --- compare: structured metrics with bounds ------------------------------------------------------------------


def _answers(rewards, lengths=None, responses=None, followed=None):
    rewards = np.asarray(rewards, float)
    lengths = np.full(len(rewards), 10.0) if lengths is None else np.asarray(lengths, float)
    responses = [f"r{r}" for r in rewards] if responses is None else responses
    return Answers(responses, rewards, lengths, followed)


def test_compare_point_values_equal_policy_metrics_and_bounds_bracket_them():
    followed_c = [[(True, True), (False, True)], [(True, True)], [], [(False, False)]]
    followed_h = [[(False, True), (False, True)], [(True, True)], [], [(False, False)]]
    cand = _answers([1.0, 0.5, 0.2, 0.0], [10, 20, 30, 40], followed=followed_c)
    champ = _answers([0.5, 0.5, 0.2, 0.0], [10, 10, 10, 10], followed=followed_h)
    ev = compare(cand, champ, Gates())
    for who, ans in (("candidate", cand), ("champion", champ)):
        m = policy_metrics(ans.rewards, ans.lengths, ans.followed).as_dict()
        for name, iv in getattr(ev, who).items():
            assert iv.value == pytest.approx(m[name]) and iv.lower <= iv.value <= iv.upper, (who, name)
    # instruction strict: candidate 2/4 followed, champion 1/4 -> difference 1/4; prompt strict 1/3 - 1/3 = 0
    assert ev.difference["instruction_strict"].value == pytest.approx(0.25)
    assert ev.difference["prompt_strict"].value == pytest.approx(0.0)
    # win points (1, .5, .5, .5) -> 0.625; the lower bound is 0.5 (a resample without prompt 0: (3/4)^4 = 32%)
    assert ev.win_rate.value == pytest.approx(0.625) and ev.win_rate.lower == pytest.approx(0.5)
    assert ev.length_ratio.value == pytest.approx(100 / 40) and ev.mean_length == {"candidate": 25.0, "champion": 10.0}
    assert not ev.unchanged
    assert Evaluation.model_validate(ev.model_dump()) == ev  # what the store holds reads back the same
    assert compare(cand, champ, Gates()) == ev  # fixed seed: the same bounds every time


def test_compare_refuses_different_prompt_counts():
    with pytest.raises(ValueError, match="same non-empty prompts"):
        compare(_answers([1.0, 0.0]), _answers([1.0]), Gates())


# --- decide: the two modes and unchanged --------------------------------------------------------------------


def _evaluation(win: Interval, gain: Interval, ratio: Interval, unchanged: bool = False, confidence: float = 0.9):
    reward = Interval(value=0.5, lower=0.4, upper=0.6)
    return Evaluation(n_prompts=8, confidence=confidence, bootstrap_samples=2000, bootstrap_seed=0,
                      unchanged=unchanged, candidate={"mean_reward": reward}, champion={"mean_reward": reward},
                      difference={"mean_reward": gain}, win_rate=win, length_ratio=ratio,
                      mean_length={"candidate": 10.0, "champion": 10.0})


IV = lambda v, lo, hi: Interval(value=v, lower=lo, upper=hi)
NEUTRAL = {"gain": IV(0.0, -0.1, 0.1), "ratio": IV(1.0, 0.9, 1.1)}


def test_default_mode_is_non_inferiority_at_90_percent():
    assert (Gates().mode, Gates().confidence, Gates().on_unchanged) == ("non_inferiority", 0.9, "promote")


@pytest.mark.parametrize(
    ("win", "superiority", "non_inferiority"),
    [
        (IV(0.60, 0.52, 0.68), True, True),  # confidently better than 0.5: passes both
        (IV(0.60, 0.45, 0.75), False, True),  # better on the point, not confidently: only non-inferiority
        (IV(0.45, 0.35, 0.55), False, True),  # worse on the point, not confidently: non-inferiority promotes
        (IV(0.40, 0.30, 0.48), False, False),  # confidently worse than 0.5: both reject
        (IV(0.50, 0.50, 0.50), False, True),  # bound exactly at the threshold: superiority needs it strictly above
    ],
)
def test_win_rate_gate_by_mode(win, superiority, non_inferiority):
    ev = _evaluation(win, **NEUTRAL)
    for mode, expected in (("superiority", superiority), ("non_inferiority", non_inferiority)):
        d = decide(Gates(mode=mode, min_win_rate=0.5, max_length_ratio=None), ev)
        assert d.passed is expected and d.decision == ("promote" if expected else "reject"), mode
        assert d.reasons[0].startswith(f"win rate {win.value:.4f} [{win.lower:.4f}, {win.upper:.4f}]")
        assert d.reasons[0].endswith("pass" if expected else "FAIL")


def test_length_ratio_and_reward_gain_gates_by_mode():
    win = IV(0.5, 0.4, 0.6)
    # length ratio 1.9 [1.7, 2.1] vs max 2.0: superiority needs upper < 2 (fails); non-inferiority fails only if
    # lower > 2 (passes). 2.3 [2.1, 2.5]: lower 2.1 > 2 -> both fail
    long = _evaluation(win, IV(0.0, -0.1, 0.1), IV(1.9, 1.7, 2.1))
    longer = _evaluation(win, IV(0.0, -0.1, 0.1), IV(2.3, 2.1, 2.5))
    only_length = {"min_win_rate": None, "max_length_ratio": 2.0}
    assert not decide(Gates(mode="superiority", **only_length), long).passed
    assert decide(Gates(mode="non_inferiority", **only_length), long).passed
    assert not decide(Gates(mode="non_inferiority", **only_length), longer).passed
    # reward gain 0.02 [-0.01, 0.05]: min 0 -> superiority fails (lower -0.01), non-inferiority passes;
    # a margin as the threshold: superiority with min -0.02 passes (lower -0.01 > -0.02); gain -0.1 [-0.15, -0.05]
    # fails non-inferiority with min -0.02 (upper -0.05 < -0.02)
    gain = {"min_win_rate": None, "max_length_ratio": None}
    small = _evaluation(win, IV(0.02, -0.01, 0.05), IV(1.0, 1.0, 1.0))
    worse = _evaluation(win, IV(-0.1, -0.15, -0.05), IV(1.0, 1.0, 1.0))
    assert not decide(Gates(mode="superiority", min_reward_gain=0.0, **gain), small).passed
    assert decide(Gates(mode="non_inferiority", min_reward_gain=0.0, **gain), small).passed
    assert decide(Gates(mode="superiority", min_reward_gain=-0.02, **gain), small).passed
    assert not decide(Gates(mode="non_inferiority", min_reward_gain=-0.02, **gain), worse).passed


def test_unchanged_is_its_own_decision():
    cand = _answers([1.0, 0.0, 0.5], responses=["a", "b", "c"])
    champ = _answers([1.0, 0.0, 0.5], responses=["a", "b", "c"])
    ev = compare(cand, champ, Gates())
    assert ev.unchanged and ev.win_rate.value == 0.5 and ev.difference["mean_reward"].value == 0.0
    strict = Gates(mode="superiority", min_reward_gain=0.1)  # would reject on the numbers
    d = decide(strict, ev)
    assert d.decision == "unchanged" and d.passed and "equal the champion's" in d.reasons[0]
    # the gates' numbers are shown but not applied: reward gain 0 [0, 0] misses 0.1 under superiority
    assert d.reasons[1].startswith("not applied: win rate") and d.reasons[2].endswith("FAIL")
    kept = decide(strict.model_copy(update={"on_unchanged": "keep"}), ev)
    assert kept.decision == "unchanged" and not kept.passed and "the champion stays" in kept.reasons[0]
    assert gate_summary(kept.as_dict()).startswith("unchanged, kept champion (win 0.500 [0.500, 0.500]")
    # one different answer with the same reward is a change: the gates decide
    changed = compare(_answers([1.0, 0.0, 0.5], responses=["a", "b", "x"]), champ, Gates())
    assert not changed.unchanged and decide(Gates(), changed).decision == "promote"


def test_decide_refuses_bounds_at_another_confidence():
    ev = _evaluation(IV(0.5, 0.4, 0.6), **NEUTRAL, confidence=0.8)
    with pytest.raises(ValueError, match=r"\(0.8, 2000, 0\), the gates ask for \(0.9, 2000, 0\)"):
        decide(Gates(), ev)


def test_decide_with_no_gates_says_so():
    d = decide(Gates(min_win_rate=None, max_length_ratio=None), _evaluation(IV(0.5, 0.4, 0.6), **NEUTRAL))
    assert d.passed and d.decision == "promote" and "unconditionally" in d.reasons[0]
    assert d.intervals["win_rate"] == {"value": 0.5, "lower": 0.4, "upper": 0.6}
