"""AMPO selectors for one prompt (spec 3.3): the positive is the best response; the k negatives are the
bottom-k by reward, the lowest-reward member of each k-means cluster (Coreset), or the weighted k-medoids
(Opt-Select).

Written to be read: loops over clusters and swaps as in the spec's pseudocode. They are the reference that the
vectorised path (batched.py, batched_kmeans.py) is tested against. Inputs are already checked by `select`:
rewards (N,) finite float64, embeddings (N, d), 1 <= k <= N - 1.
"""

from __future__ import annotations

import numpy as np

from ampo.selection.pool import (
    STREAM_KMEANS,
    Selection,
    optselect_weights,
    pairwise_distances,
    seeded_uniforms,
)

SWAP_TOL = 1e-12  # a swap must lower the cost by this relative amount: stops on rounding-level "improvements"
# k-means: squared distances within TIE_TOL * (largest squared norm) count as equal, so exact ties (duplicate
# responses) break the same way under any rounding: here and in the Gram form of batched_kmeans.py
TIE_TOL = 1e-9


def candidates_of(rewards: np.ndarray) -> tuple[int, list[int]]:
    """The positive (argmax, ties to the lowest index) and the candidate negatives C, ascending (spec 3.2)."""
    top = int(np.argmax(rewards))
    return top, [i for i in range(len(rewards)) if i != top]


def bottomk_indices(rewards: np.ndarray, k: int) -> list[int]:
    """The k lowest-reward candidates by (reward, index), ascending."""
    _, candidates = candidates_of(rewards)
    return sorted(sorted(candidates, key=lambda i: (rewards[i], i))[:k])


def select_bottomk(rewards, embeddings, k, *, seed=0) -> Selection:
    """AMPO-BottomK (spec 3.3.1): the k lowest rewards, ties to the lower index. rewards (N,) only."""
    top, _ = candidates_of(rewards)
    return Selection("bottomk", [top], bottomk_indices(rewards, k))


# ------------------------------------------------------------------------------------------------------------
# Coreset


def kmeanspp(points: np.ndarray, k: int, u: np.ndarray, tol: float) -> list[int]:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) with the k uniforms u. points (n, d) -> k indices.

    The first centre is point floor(u0 * n); centre c is drawn with probability D(x)^2 by inverting the
    cumulative sum at u_c * total. D(x)^2 <= tol counts as 0 (a duplicate). If every point already sits on a
    centre (fewer than k distinct points), the lowest unused index is taken.
    """
    n = len(points)

    def sq_dist(j):
        d2 = ((points - points[j]) ** 2).sum(axis=1)
        return np.where(d2 <= tol, 0.0, d2)

    centres = [min(int(u[0] * n), n - 1)]
    d2 = sq_dist(centres[0])
    for c in range(1, k):
        cum = np.cumsum(d2)
        if cum[-1] > 0:
            j = min(int(np.searchsorted(cum, u[c] * cum[-1], side="right")), n - 1)
        else:
            j = next(i for i in range(n) if i not in centres)
        centres.append(j)
        d2 = np.minimum(d2, sq_dist(j))
    return centres


def lloyd(points: np.ndarray, centres: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, float]:
    """Lloyd's iterations until no label changes. points (n, d), centres (k, d) -> labels (n,), inertia.

    A point joins the lowest-index centre within tol of its nearest; an empty cluster keeps its centre.
    """
    centres = centres.copy()
    labels = None
    for _ in range(max_iter):
        d2 = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=-1)  # (n, k)
        new = (d2 <= d2.min(axis=1, keepdims=True) + tol).argmax(axis=1)
        if labels is not None and (new == labels).all():
            break
        labels = new
        for c in range(len(centres)):
            if (labels == c).any():
                centres[c] = points[labels == c].mean(axis=0)
    return labels, float(d2[np.arange(len(points)), labels].sum())


def kmeans(points: np.ndarray, k: int, *, seed: int, n_init: int, max_iter: int) -> np.ndarray:
    """Euclidean k-means: n_init k-means++ starts, lowest inertia wins (first within n * tol). (n, d) -> (n,)

    tol = TIE_TOL * the largest squared norm: the scale below which squared distances count as equal.
    """
    tol = TIE_TOL * (points**2).sum(axis=1).max()
    u = seeded_uniforms(np.array([seed], dtype=np.uint64), STREAM_KMEANS, n_init * k).reshape(n_init, k)
    runs = [lloyd(points, points[kmeanspp(points, k, u[t], tol)], max_iter, tol) for t in range(n_init)]
    inertia = np.array([run[1] for run in runs])
    return runs[int(np.argmax(inertia <= inertia.min() + len(points) * tol))][0]


def first_appearance_ids(labels: list[int]) -> list[int]:
    """Renumber cluster ids by first appearance in pool order: the ids do not depend on k-means internals."""
    ids: dict[int, int] = {}
    return [-1 if label < 0 else ids.setdefault(label, len(ids)) for label in labels]


def select_coreset(rewards, embeddings, k, *, seed=0, cluster_on, n_init, max_iter) -> Selection:
    """AMPO-Coreset (spec 3.3.2): k-means on the embeddings, then the lowest-reward member of every cluster.

    rewards (N,), embeddings (N, d). cluster_on="candidates" clusters the N-1 non-positive responses, which
    always gives k distinct negatives; "all" clusters all N (spec A5), and a cluster holding only the positive
    is replaced by the lowest-reward unused candidate. `clusters`: cluster id per pool member, -1 for the
    positive under "candidates".
    """
    top, candidates = candidates_of(rewards)
    members = candidates if cluster_on == "candidates" else list(range(len(rewards)))
    points = np.asarray(embeddings, dtype=np.float64)[members]
    labels = kmeans(points, k, seed=seed, n_init=n_init, max_iter=max_iter)
    rejected = []
    for c in range(k):
        in_cluster = [i for i, label in zip(members, labels) if label == c and i != top]
        if in_cluster:
            rejected.append(min(in_cluster, key=lambda i: (rewards[i], i)))
    for i in sorted(candidates, key=lambda i: (rewards[i], i)):  # fallback: a cluster held only the positive
        if len(rejected) == k:
            break
        if i not in rejected:
            rejected.append(i)
    clusters = [-1] * len(rewards)
    for i, label in zip(members, labels):
        clusters[i] = int(label)
    return Selection("coreset", [top], sorted(rejected), clusters=first_appearance_ids(clusters))


# ------------------------------------------------------------------------------------------------------------
# Opt-Select


def medoid_cost(dist: np.ndarray, weights: np.ndarray, medoids: list[int]) -> float:
    """Cost(S) = sum_i w_i min_{j in S} A_ij (spec 3.3.3). dist (N, N), weights (N,)."""
    return float((weights * dist[:, medoids].min(axis=1)).sum())


def local_search_medoids(dist, weights, k, top, init) -> list[int]:
    """Best-improvement single-swap local search from `init` (PAM swap; Arya et al. 2004: a 5-approximation).

    Every (medoid a, candidate b) swap is costed; the cheapest is taken, the first in (a, b) ascending order
    on ties, while it lowers the cost by more than SWAP_TOL relative. The positive `top` is never a medoid.
    """
    candidates = [j for j in range(len(weights)) if j != top]
    medoids = sorted(init)
    while True:
        current = medoid_cost(dist, weights, medoids)
        best_cost, best_swap = np.inf, None
        for pos in range(k):
            for b in candidates:
                if b in medoids:
                    continue
                cost = medoid_cost(dist, weights, medoids[:pos] + [b] + medoids[pos + 1 :])
                if cost < best_cost:
                    best_cost, best_swap = cost, (pos, b)
        if best_swap is None or not best_cost < current * (1 - SWAP_TOL):
            return medoids
        pos, b = best_swap
        medoids = sorted(medoids[:pos] + [b] + medoids[pos + 1 :])


def exact_medoids(dist, weights, k, top, init=None) -> list[int]:
    """The optimal medoids from the p-median MIP (spec 3.3.3), solved by HiGHS through scipy.optimize.milp.

    Variables x_j (j a candidate medoid) and z_ij (i assigned to j); min sum w_i A_ij z_ij s.t. sum x = k,
    sum_j z_ij = 1, z_ij <= x_j. Only x is declared integral: for a 0/1 x the best z is the nearest-medoid
    assignment. Ignores `init`. Among several optimal sets HiGHS returns one of its choosing (deterministic).
    """
    import scipy.sparse as sp  # here, not at the top: importing scipy.optimize costs seconds, the MIP is rare
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = len(weights)
    cand = [j for j in range(n) if j != top]
    m = len(cand)
    costs = np.concatenate([np.zeros(m), (weights[:, None] * dist[:, cand]).ravel()])  # x (m), then z (n, m)
    pick_k = sp.hstack([sp.csr_matrix(np.ones((1, m))), sp.csr_matrix((1, n * m))])
    assign = sp.hstack([sp.csr_matrix((n, m)), sp.kron(sp.eye(n), np.ones((1, m)))])
    link = sp.hstack([-sp.kron(np.ones((n, 1)), sp.eye(m)), sp.eye(n * m)])  # z_ij - x_j <= 0
    result = milp(
        costs,
        constraints=[
            LinearConstraint(pick_k, k, k),
            LinearConstraint(assign, 1, 1),
            LinearConstraint(link, -np.inf, 0),
        ],
        integrality=np.concatenate([np.ones(m), np.zeros(n * m)]),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},
    )
    if not result.success:
        raise RuntimeError(f"HiGHS found no optimal medoids: {result.message}")
    return sorted(cand[j] for j in np.flatnonzero(result.x[:m] > 0.5))


MEDOID_SOLVERS = {"local_search": local_search_medoids, "exact": exact_medoids}


def select_optselect(rewards, embeddings, k, *, seed=0, points, weight_temperature, solver) -> Selection:
    """AMPO-Opt-Select (spec 3.3.3): the k medoids S (never the positive) minimising the weighted cost.

    Cost(S) = sum_i w_i min_{j in S} A_ij with A_ij = ||e_i - e_j||_2 and w_i = exp((r_bar - r_i) / T), scaled
    so max w = 1 (same argmin, no overflow). rewards (N,), embeddings (N, d). points="all" sums over all N
    responses, "candidates" over the N-1 without the positive (spec A6). solver="local_search" starts from
    bottom-k; "exact" solves the MIP. `clusters`: the medoid (pool index) nearest to each member; `cost`: the
    objective with the scaled weights.
    """
    top, _ = candidates_of(rewards)
    weights = optselect_weights(rewards, weight_temperature)
    if points == "candidates":
        weights[top] = 0.0  # the positive's distance does not count
    dist = pairwise_distances(embeddings)
    medoids = MEDOID_SOLVERS[solver](dist, weights, k, top, bottomk_indices(rewards, k))
    nearest = [medoids[j] for j in dist[:, medoids].argmin(axis=1)]
    cost = medoid_cost(dist, weights, medoids)
    return Selection("optselect", [top], medoids, clusters=nearest, cost=cost)
