"""Per-prompt selectors: hand-computed selections, spec section 6 properties, and bad input."""

import numpy as np
import pytest

from ampo.selection import SELECTORS, Selection, count_skipped, pairwise_distances, select, selector_options
from ampo.selection.baselines import ALL_EQUAL
from ampo.selection.pool import STREAM_KMEANS, STREAM_RANDOM, seeded_uniforms

R5 = np.array([0.1, 0.9, 0.5, 0.9, -1.0])  # two tied maxima at 1 and 3
E5 = np.arange(10.0).reshape(5, 2)


def islands(seed=0, per_island=3, centres=((0, 0), (10, 0)), spread=0.3):
    """Points around well-separated 2-D centres; island j holds indices j*m ... (j+1)*m - 1 (m: per_island)"""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.array(c) + spread * rng.standard_normal((per_island, 2)) for c in centres])


# ------------------------------------------------------------------------------------------------------------
# hand-computed selections


def test_bottomk_by_hand():
    # top = argmax with ties to the lowest index: r[1] = r[3] = .9 -> 1.
    # candidates 0, 2, 3, 4 by (reward, index): 4 (-1), 0 (.1), 2 (.5), 3 (.9) -> the two lowest are {4, 0}
    s = select("bottomk", R5, E5, k=2)
    assert s == Selection("bottomk", chosen=[1], rejected=[0, 4])


def test_bottomk_ties_keep_lower_index_and_never_reject_the_positive():
    # all equal: top = 0; candidates 1..4 tie, the lowest indices win -> [1, 2]
    assert select("bottomk", np.zeros(5), E5, k=2).rejected == [1, 2]
    assert select("bottomk", np.zeros(5), E5, k=2).chosen == [0]
    # k = N - 1 takes every candidate
    assert select("bottomk", R5, E5, k=4).rejected == [0, 2, 3, 4]


def test_extremes_by_hand():
    # best 1 (.9, first of the tie) vs worst 4 (-1); k is ignored
    assert select("extremes", R5, E5, k=7) == Selection("extremes", [1], [4])
    # all equal: chosen 0, rejected the lowest other index, never the chosen one
    assert select("extremes", np.full(3, 2.0), E5[:3], k=1) == Selection("extremes", [0], [1])


def test_mean_split_by_hand():
    # mean([1, 2, 3, 4]) = 2.5: above = {2, 3}, the rest = {0, 1}
    assert select("mean_split", np.array([1.0, 2, 3, 4]), E5[:4], k=1) == Selection(
        "mean_split", [2, 3], [0, 1]
    )
    # mean([1, 2, 3]) = 2: r = 2 is not strictly above the mean -> rejected
    assert select("mean_split", np.array([1.0, 2, 3]), E5[:3], k=1) == Selection("mean_split", [2], [0, 1])


def test_mean_split_all_equal_is_skipped_not_an_error():
    s = select("mean_split", np.full(4, 0.1), E5[:4], k=1)  # 0.1 * 4 / 4 may round above 0.1: still skipped
    assert (s.chosen, s.rejected, s.skipped_reason, s.skipped) == ([], [], ALL_EQUAL, True)
    assert count_skipped([s, select("mean_split", R5, E5, k=1)]) == 1


def test_top_bottom_by_hand():
    # best first by (-r, index): 1, 3, 2, 0, 4 -> top-2 = {1, 3}; bottom-2 of {2, 0, 4} by (r, index): 4, 0
    assert select("top_bottom", R5, E5, k=1) == Selection("top_bottom", [1, 3], [0, 4])
    # ties everywhere: top-2 = the two lowest indices, bottom-2 = the next two
    assert select("top_bottom", np.ones(5), E5, k=1, m=2) == Selection("top_bottom", [0, 1], [2, 3])
    assert select("top_bottom", R5, E5, k=1, m=1) == Selection("top_bottom", [1], [4])


def test_coreset_two_islands_by_hand():
    # index 0: the positive (r=5) between the islands; island A = 1, 2, 3 (r -1, -2, -3), island B = 4, 5, 6
    # (r .5, .4, .6). k=2 on the 6 candidates -> clusters A and B; lowest reward per cluster: 3 (A) and 5 (B).
    # BottomK would take both negatives from A: {2, 3}.
    emb = np.vstack([[5.0, 5.0], islands()])
    r = np.array([5.0, -1, -2, -3, 0.5, 0.4, 0.6])
    s = select("coreset", r, emb, k=2)
    assert (s.chosen, s.rejected) == ([0], [3, 5])
    assert s.clusters == [-1, 0, 0, 0, 1, 1, 1]  # ids by first appearance; the positive is not clustered
    assert select("bottomk", r, emb, k=2).rejected == [2, 3]


def test_coreset_all_points_fallback_when_the_positive_is_alone():
    # cluster_on="all": the positive far away (100, 100) forms its own cluster, so the other cluster (A and B)
    # gives one negative, 3 (r=-3), and the fallback adds the lowest-reward unused candidate, 2 (r=-2).
    emb = np.vstack([[100.0, 100.0], islands()])
    r = np.array([5.0, -1, -2, -3, 0.5, 0.4, 0.6])
    s = select("coreset", r, emb, k=2, cluster_on="all")
    assert s.rejected == [2, 3]
    assert s.clusters == [0, 1, 1, 1, 1, 1, 1]
    assert select("coreset", r, emb, k=2, cluster_on="candidates").rejected == [3, 5]


def test_optselect_1d_by_hand():
    # x = [0, 1, 2, 10, 11], r = [0, 1, 0, 0, 2]: top = 4, candidates 0..3.
    # w = exp(min(r) - r) = [1, e^-1, 1, 1, e^-2] (largest weight 1).
    # Cost(S) = sum_i w_i min_{j in S} |x_i - x_j|:
    #   {1, 3}: 1*1 + 0 + 1*1 + 0 + e^-2*1     = 2 + e^-2 = 2.1353   <- optimum
    #   {0, 3}: 0 + e^-1*1 + 1*2 + 0 + e^-2*1 = 2.5032;  {2, 3}: 1*2 + e^-1*1 + 0 + 0 + e^-2 = 2.5032
    #   {0, 2} (bottom-k init): 0 + e^-1 + 0 + 1*8 + e^-2*9 = 9.586
    # So Opt-Select takes the medium-reward response 1, which covers 0 and 2, instead of bottom-k's {0, 2}.
    x = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])
    r = np.array([0.0, 1.0, 0.0, 0.0, 2.0])
    for solver in ("local_search", "exact"):
        s = select("optselect", r, x, k=2, solver=solver)
        assert (s.chosen, s.rejected) == ([4], [1, 3])
        assert s.cost == pytest.approx(2 + np.exp(-2), rel=1e-12)
        assert s.clusters == [1, 1, 1, 3, 3]
    assert select("bottomk", r, x, k=2).rejected == [0, 2]
    # points="candidates": the positive's distance drops out: cost({1, 3}) = 1 + 1 = 2
    assert select("optselect", r, x, k=2, points="candidates").cost == pytest.approx(2.0)


def test_optselect_never_picks_the_positive():
    # x = [0, 5, 9], r = [0, 5, 0]: top = 1 would be the best medoid (cost 5 + 4 = 9) but is forbidden.
    # w = [1, e^-5, 1]; {0}: 5e^-5 + 9 = 9.0337; {2}: 9 + 4e^-5 = 9.0270 -> {2}
    s = select("optselect", np.array([0.0, 5, 0]), np.array([[0.0], [5], [9]]), k=1)
    assert (s.rejected, s.cost) == ([2], pytest.approx(9 + 4 * np.exp(-5)))


def test_optselect_weight_temperature_changes_the_optimum():
    # x = [0, 1, 3], r = [0, 2, 10], top = 2, k = 1; w = [1, e^(-2/T), e^(-10/T)]
    # cost{0} - cost{1} = (w1 + 3 w2) - (1 + 2 w2) = w1 + w2 - 1:  T=1: .135 + .00005 - 1 < 0 -> {0}
    #                                                               T=100: .980 + .905 - 1 > 0 -> {1}
    r, x = np.array([0.0, 2, 10]), np.array([[0.0], [1], [3]])
    assert select("optselect", r, x, k=1).rejected == [0]
    assert select("optselect", r, x, k=1).cost == pytest.approx(np.exp(-2) + 3 * np.exp(-10))
    assert select("optselect", r, x, k=1, weight_temperature=100.0).rejected == [1]


def test_optselect_large_rewards_do_not_overflow():
    # exp(mean - r) with rewards in the thousands overflows; the scaled weights exp(min - r) do not
    rng = np.random.default_rng(0)
    r, x = rng.uniform(-3000, 3000, 12), rng.standard_normal((12, 4))
    s = select("optselect", r, x, k=3)
    assert np.isfinite(s.cost) and len(s.rejected) == 3
    assert select("optselect", r - 5000.0, x, k=3).rejected == s.rejected  # shift invariance


def test_random_is_seeded_uniform_and_excludes_the_positive():
    r, emb = np.array([0.0, 3, 1, 2, 0.5, -1]), np.zeros((6, 2))
    picks = [tuple(select("random", r, emb, k=2, seed=s).rejected) for s in range(2000)]
    assert picks[:50] == [
        tuple(select("random", r, emb, k=2, seed=s).rejected) for s in range(50)
    ]  # determinism
    counts = np.bincount(np.concatenate(picks), minlength=6)
    assert counts[1] == 0  # the positive
    # each of the 5 candidates is drawn with p = 2/5: 2000 * .4 = 800, sd = sqrt(2000*.4*.6) = 22; 4.5 sd
    assert np.all(np.abs(counts[[0, 2, 3, 4, 5]] - 800) < 100), counts
    assert len(set(picks)) == 10  # all C(5, 2) pairs occur


# ------------------------------------------------------------------------------------------------------------
# properties (spec section 6)


def test_coreset_is_invariant_to_the_kmeans_seed_on_islands():
    # 3 islands of 5 points, 10 apart, spread .3: A = 0..4 (0 is the positive), B = 5..9, C = 10..14.
    # Lowest reward per island among the candidates: A: 2 (-.2), B: 7 (-3), C: 12 (-.5).
    emb = islands(seed=1, per_island=5, centres=((0, 0), (10, 0), (0, 10)))
    r = np.array([10, 0.3, -0.2, 0.5, 0.1, -1, -2, -3, 0.4, 0.9, -0.1, 0.6, -0.5, 0.8, 0.05])
    results = {tuple(select("coreset", r, emb, k=3, seed=s).rejected) for s in range(20)}
    assert results == {(2, 7, 12)}
    assert select("bottomk", r, emb, k=3).rejected == [5, 6, 7]  # bottom-3 all from island B


@pytest.mark.parametrize(
    "method", ["bottomk", "optselect", "coreset", "random", "extremes", "top_bottom", "mean_split"]
)
def test_deterministic(method):
    rng = np.random.default_rng(3)
    r, emb = rng.standard_normal(9), rng.standard_normal((9, 4))
    assert select(method, r, emb, k=3, seed=5) == select(method, r, emb, k=3, seed=5)


@pytest.mark.parametrize(
    "method", ["bottomk", "optselect", "coreset", "extremes", "top_bottom", "mean_split"]
)
def test_permutation_equivariance(method):
    # permuting the pool permutes the selection: position j of the permuted pool is original index perm[j]
    emb = islands(seed=4, per_island=4, centres=((0, 0), (10, 0), (0, 10)))  # coreset: a unique clustering
    r = np.random.default_rng(5).permutation(12) / 3.0  # distinct rewards
    base = select(method, r, emb, k=3)
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(12)
        s = select(method, r[perm], emb[perm], k=3)
        assert sorted(perm[s.chosen].tolist()) == base.chosen
        assert sorted(perm[s.rejected].tolist()) == base.rejected


def test_pairwise_distances_match_explicit_differences():
    rng = np.random.default_rng(6)
    emb = rng.standard_normal((3, 7, 5))
    dist = pairwise_distances(emb)
    explicit = np.linalg.norm(emb[:, :, None] - emb[:, None], axis=-1)
    np.testing.assert_allclose(dist, explicit, atol=1e-7)
    assert (dist == dist.transpose(0, 2, 1)).all() and (np.diagonal(dist, axis1=1, axis2=2) == 0).all()
    assert (pairwise_distances(emb[1]) == dist[1]).all()  # alone or in a batch: bitwise the same


def test_seeded_uniforms():
    u = seeded_uniforms(np.array([0, 1, 2**63 + 5], dtype=np.uint64), STREAM_RANDOM, 1000)
    assert u.shape == (3, 1000) and (u >= 0).all() and (u < 1).all()
    assert abs(u.mean() - 0.5) < 0.02  # 3000 uniforms: sd of the mean = 0.29 / 55 = 0.005
    assert (seeded_uniforms(np.array([1], dtype=np.uint64), STREAM_RANDOM, 1000)[0] == u[1]).all()
    assert not np.allclose(u[0], u[1])
    assert not np.allclose(seeded_uniforms(np.array([1], np.uint64), STREAM_KMEANS, 1000)[0], u[1])


# ------------------------------------------------------------------------------------------------------------
# registry and bad input


def test_registry_keys_and_options():
    assert sorted(SELECTORS) == [
        "bottomk",
        "coreset",
        "extremes",
        "mean_split",
        "optselect",
        "random",
        "top_bottom",
    ]
    assert selector_options("optselect") == {
        "points": "all",
        "weight_temperature": 1.0,
        "solver": "local_search",
    }
    assert selector_options("coreset") == {"cluster_on": "candidates", "n_init": 10, "max_iter": 100}
    assert selector_options("top_bottom") == {"m": 2}


def test_unknown_selector():
    with pytest.raises(ValueError, match=r"unknown selector 'foo'; choose from \['bottomk', 'coreset'"):
        select("foo", R5, E5, k=2)


@pytest.mark.parametrize(
    "method, options, message",
    [
        (
            "optselect",
            {"solver": "foo"},
            r"solver='foo' is not allowed; choose from \['local_search', 'exact'\]",
        ),
        (
            "optselect",
            {"points": "some"},
            r"points='some' is not allowed; choose from \['all', 'candidates'\]",
        ),
        ("optselect", {"weight_temperature": 0.0}, r"weight_temperature=0.0 must be a finite number > 0"),
        (
            "coreset",
            {"cluster_on": "x"},
            r"cluster_on='x' is not allowed; choose from \['candidates', 'all'\]",
        ),
        ("coreset", {"n_init": 0}, r"n_init=0 must be an int >= 1"),
        (
            "coreset",
            {"solver": "exact"},
            r"unknown option 'solver' for selector 'coreset'; allowed: \['cluster_on'",
        ),
        ("bottomk", {"m": 2}, r"unknown option 'm' for selector 'bottomk'; allowed: \[\]"),
        ("top_bottom", {"m": 0}, r"m=0 must be an int >= 1"),
        ("top_bottom", {"m": 3}, r"m=3 needs a pool of at least 2m = 6 responses; got N=5"),
    ],
)
def test_bad_options(method, options, message):
    with pytest.raises(ValueError, match=message):
        select(method, R5, E5, k=2, **options)


@pytest.mark.parametrize(
    "rewards, embeddings, k, message",
    [
        (R5, E5, 5, r"k=5 negatives need a pool of at least k \+ 1 = 6 responses; N=5"),
        (R5, E5, 0, r"k=0 must be >= 1"),
        (R5, E5, 1.5, r"k=1.5 must be an int >= 1"),
        (np.array([0.1, np.nan, 0.3, 0, 1]), E5, 2, r"rewards must be finite; rewards\[1\]=nan"),
        (np.array([0.1, 0, np.inf, 0, 1]), E5, 2, r"rewards must be finite; rewards\[2\]=inf"),
        (R5, E5[:4], 2, r"embeddings must have shape \(N, d\) = \(5, d\) to match the rewards; got \(4, 2\)"),
        (R5, E5.ravel(), 2, r"embeddings must have shape \(N, d\)"),
        (R5[None], E5, 2, r"rewards must have shape \(N,\); got \(1, 5\)"),
        (np.array([]), np.zeros((0, 2)), 1, r"empty pool"),
        (np.array([1.0]), np.zeros((1, 2)), 1, r"a pool needs at least 2 responses; got N=1"),
    ],
)
@pytest.mark.parametrize("method", ["bottomk", "coreset", "optselect", "random"])
def test_bad_pools(method, rewards, embeddings, k, message):
    with pytest.raises(ValueError, match=message):
        select(method, rewards, embeddings, k)


@pytest.mark.parametrize("method", sorted(SELECTORS))
def test_non_finite_embeddings_are_rejected_by_every_method(method):
    emb = E5.copy()
    emb[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"embeddings must be finite; embeddings\[3, 1\]=nan"):
        select(method, R5, emb, k=2)


def test_bad_seed():
    with pytest.raises(ValueError, match=r"seeds must lie in \[0, 2\*\*64\)"):
        select("random", R5, E5, k=2, seed=-1)


def test_k_is_checked_but_ignored_by_the_baselines():
    assert select("extremes", R5, E5, k=10).rejected == [4]
    with pytest.raises(ValueError, match=r"k=0 must be >= 1"):
        select("mean_split", R5, E5, k=0)
