"""Opt-Select solvers against brute force (spec section 6): the MIP is optimal, local search is within 5x and
usually optimal."""

import itertools

import numpy as np
import pytest

from ampo.selection import select
from ampo.selection.ampo_methods import exact_medoids, local_search_medoids, medoid_cost
from ampo.selection.pool import optselect_weights, pairwise_distances


def random_instance(seed):
    """A small pool: N in [4, 12], k in [1, min(4, N-1)], d in [1, 4], rewards on two scales."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 13))
    k = int(rng.integers(1, min(4, n - 1) + 1))
    rewards = rng.standard_normal(n) * rng.choice([0.3, 3.0])
    return rewards, rng.standard_normal((n, int(rng.integers(1, 5)))), k


def brute_force(rewards, emb, k, points="all"):
    """min Cost(S) over every k-subset of the candidates: the optimum by enumeration."""
    top = int(np.argmax(rewards))
    w, dist = optselect_weights(rewards), pairwise_distances(emb)
    if points == "candidates":
        w[top] = 0.0
    candidates = [j for j in range(len(rewards)) if j != top]
    return min(medoid_cost(dist, w, list(s)) for s in itertools.combinations(candidates, k))


@pytest.mark.parametrize("points", ["all", "candidates"])
def test_mip_cost_equals_brute_force(points):
    for seed in range(30):
        rewards, emb, k = random_instance(seed)
        s = select("optselect", rewards, emb, k, solver="exact", points=points)
        assert s.cost == pytest.approx(brute_force(rewards, emb, k, points), rel=1e-9), seed
        assert len(s.rejected) == k and s.chosen[0] not in s.rejected


def test_local_search_within_5x_and_usually_optimal():
    equal = 0
    for seed in range(50):
        rewards, emb, k = random_instance(100 + seed)
        local = select("optselect", rewards, emb, k).cost
        best = brute_force(rewards, emb, k)
        assert best <= local * (1 + 1e-12) and local <= 5 * best + 1e-12, seed  # Arya et al.: 5-approximation
        equal += local <= best * (1 + 1e-9)
    assert equal >= 40, f"local search optimal on only {equal}/50"  # >= 80%


def test_local_search_reaches_a_single_swap_local_optimum():
    # no single swap of the returned medoids lowers the cost (re-checked by enumeration of all swaps)
    for seed in range(20):
        rewards, emb, k = random_instance(200 + seed)
        top = int(np.argmax(rewards))
        w, dist = optselect_weights(rewards), pairwise_distances(emb)
        first_k = [j for j in range(len(w)) if j != top][:k]  # a poor start, not bottom-k
        medoids = local_search_medoids(dist, w, k, top, init=first_k)
        cost = medoid_cost(dist, w, medoids)
        for a, b in itertools.product(medoids, [j for j in range(len(w)) if j != top and j not in medoids]):
            assert medoid_cost(dist, w, sorted(set(medoids) - {a} | {b})) >= cost * (1 - 1e-12)


def test_exact_medoids_is_independent_of_the_weight_scale():
    rewards, emb, k = random_instance(7)
    top = int(np.argmax(rewards))
    w, dist = optselect_weights(rewards), pairwise_distances(emb)
    assert exact_medoids(dist, w, k, top) == exact_medoids(dist, 1e6 * w, k, top)
