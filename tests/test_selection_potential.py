"""Alignment potential M_AP (spec 4.1, 4.4): values by hand, the official selection rule, invariances."""

import numpy as np
import pytest

from ampo.selection import alignment_potential, pair_margins, top_fraction, zscore


def test_alignment_potential_by_hand():
    # z([1, 2, 3]): mean 2, std sqrt(2/3) = .8165 -> [-1.2247, 0, 1.2247]
    # z([0, 0, 3]): mean 1, std sqrt((1 + 1 + 4) / 3) = sqrt(2) -> [-.7071, -.7071, 1.4142]
    rm, lp = np.array([1.0, 2, 3]), np.array([0.0, 0, 3])
    np.testing.assert_allclose(alignment_potential(rm, lp), [-0.5176, 0.7071, -0.1895], atol=1e-4)
    # w = 2: [-1.2247 + 1.4142, 0 + 1.4142, 1.2247 - 2.8284]
    np.testing.assert_allclose(
        alignment_potential(rm, lp, logp_weight=2.0), [0.1895, 1.4142, -1.6037], atol=1e-4
    )


def test_constant_column_scores_zero():
    assert (zscore(np.full(4, 3.0)) == 0).all()
    rm = np.array([1.0, 2, 3])
    np.testing.assert_allclose(alignment_potential(rm, np.full(3, 0.7)), zscore(rm))


def test_matches_the_official_selection_rule():
    # metric_selection.py get_top_score_idx("rm-logp"): z = (v - mean) / np.std(v); argsort(score)[-K:]
    rng = np.random.default_rng(0)
    rm, lp = rng.gamma(2.0, size=200), np.abs(rng.standard_normal(200))
    score = (rm - rm.mean()) / rm.std() - (lp - lp.mean()) / lp.std()
    np.testing.assert_allclose(alignment_potential(rm, lp), score, rtol=1e-12)
    assert (top_fraction(alignment_potential(rm, lp), 0.4) == np.argsort(score)[-80:]).all()


def test_selection_invariant_to_affine_rescaling_of_rm_margin():
    rng = np.random.default_rng(1)
    rm, lp = rng.gamma(2.0, size=100), np.abs(rng.standard_normal(100))
    base = top_fraction(alignment_potential(rm, lp, logp_weight=2.5), 0.25)
    for a, b in [(10.0, 0.0), (0.01, -3.0), (7.0, 100.0)]:
        np.testing.assert_allclose(
            alignment_potential(a * rm + b, lp, logp_weight=2.5),
            alignment_potential(rm, lp, logp_weight=2.5),
            atol=1e-10,
        )
        assert (top_fraction(alignment_potential(a * rm + b, lp, logp_weight=2.5), 0.25) == base).all()


def test_top_fraction_order_and_ties():
    # int(.5 * 4) = 2 kept; ascending score order, last is best
    assert top_fraction(np.array([0.1, 0.9, 0.5, 0.3]), 0.5).tolist() == [2, 1]
    # tie at the boundary: the stable ascending sort of [3, 1, 3, 3] is indices [1, 0, 2, 3] (the tied 3s by
    # index), and its last two are kept: [2, 3]
    assert top_fraction(np.array([3.0, 1, 3, 3]), 0.5).tolist() == [2, 3]
    # [1, 2, 2, 2, 0, 2], half: stable ascending order [4, 0, 1, 2, 3, 5] -> last three [2, 3, 5]
    assert top_fraction(np.array([1.0, 2, 2, 2, 0, 2]), 0.5).tolist() == [2, 3, 5]
    assert top_fraction(np.array([3.0, 1, 3, 3]), 0.0).tolist() == []
    assert top_fraction(np.arange(7.0), 0.3).tolist() == [5, 6]  # int(2.1) = 2


def test_pair_margins_by_hand():
    # row 0: best 1 (3), worst 0 (1): rm 3 - 1 = 2, |logp -2 - (-1)| = 1
    # row 1: tied best 0 and 1 (5) -> 0; worst 2 (0): rm 5, |-1 - (-2)| = 1
    # row 2: all equal -> chosen 0, rejected 1 (never the chosen one), rm 0
    out = pair_margins([[1.0, 3, 2], [5, 5, 0], [2, 2, 2]], [[-1.0, -2, -0.5], [-1, -3, -2], [-1, -1.5, -2]])
    assert out["chosen"].tolist() == [1, 0, 0] and out["rejected"].tolist() == [0, 2, 1]
    np.testing.assert_allclose(out["rm_margin"], [2, 5, 0])
    np.testing.assert_allclose(out["logp_margin_abs"], [1, 1, 0.5])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: alignment_potential([1.0, np.nan], [0.0, 1]), "must be finite"),
        (lambda: alignment_potential([1.0, 2], [0.0]), r"must both have shape \(n,\)"),
        (lambda: top_fraction([1.0, 2], 1.5), r"fraction=1.5 must lie in \[0, 1\]"),
        (lambda: top_fraction([1.0, np.inf], 0.5), "scores must be finite"),
        (lambda: pair_margins([[1.0]], [[0.0]]), r"shape \(P, N\) with N >= 2"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
