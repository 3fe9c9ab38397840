"""The batched selectors: the selections of `select` for many prompts at once, vectorised over prompts in numpy.

`select_batch` (registry.py) groups prompts by pool size N and processes them in chunks (at most CHUNK
prompts, and few enough that no temporary exceeds FLOATS_PER_STEP float64s, whatever N, d and k), with the
layout helpers below. Each method has one batched function
(rewards (B, N), embeddings (B, N, d) or None, k, seeds (B,)) -> B Selections that equals the per-prompt
function in ampo_methods.py / baselines.py prompt by prompt (tests/test_selection_batched.py checks this).
Ties, seeds and stopping rules are the same; only the rounding of k-means distances differs (Gram form).
"""

from __future__ import annotations

import numpy as np

from ampo.selection.ampo_methods import SWAP_TOL, select_optselect
from ampo.selection.baselines import ALL_EQUAL, ROUNDING
from ampo.selection.batched_kmeans import batch_kmeans, first_appearance, gram_matrix
from ampo.selection.pool import (
    STREAM_RANDOM,
    Selection,
    bottom_order,
    check_embeddings,
    optselect_weights,
    pairwise_distances,
    seeded_uniforms,
    skipped_selection,
    top_index,
)

CHUNK = 512  # prompts per vectorised step at most
FLOATS_PER_STEP = 4_000_000  # bound on one step's largest temporary (32 MB of float64)


def rows_per_step(floats_per_row: int) -> int:
    """How many prompts one vectorised step takes when each needs `floats_per_row` floats of scratch."""
    return max(1, min(CHUNK, FLOATS_PER_STEP // max(floats_per_row, 1)))


def batch_bottomk(rewards, embeddings, k, *, seeds) -> list[Selection]:
    """select_bottomk for B pools. rewards (B, N)."""
    top = top_index(rewards)
    rejected = np.sort(bottom_order(rewards, top)[:, :k], axis=1)
    return [Selection("bottomk", [t], r) for t, r in zip(top.tolist(), rejected.tolist())]


def batch_random(rewards, embeddings, k, *, seeds) -> list[Selection]:
    """select_random for B pools: the k candidates with the smallest seeded uniforms. rewards (B, N)."""
    top = top_index(rewards)
    rejected = np.sort(
        bottom_order(seeded_uniforms(seeds, STREAM_RANDOM, rewards.shape[1]), top)[:, :k], axis=1
    )
    return [Selection("random", [t], r) for t, r in zip(top.tolist(), rejected.tolist())]


def batch_extremes(rewards, embeddings, k, *, seeds) -> list[Selection]:
    """select_extremes for B pools. rewards (B, N)."""
    top = top_index(rewards)
    others = rewards.copy()
    others[np.arange(len(top)), top] = np.inf
    worst = others.argmin(axis=1)  # first minimum: ties to the lower index
    return [Selection("extremes", [t], [w]) for t, w in zip(top.tolist(), worst.tolist())]


def batch_mean_split(rewards, embeddings, k, *, seeds) -> list[Selection]:
    """select_mean_split for B pools. rewards (B, N)."""
    above = rewards > rewards.mean(axis=1, keepdims=True)  # (B, N)
    n_above = above.sum(axis=1).tolist()
    all_equal = (rewards.max(axis=1) == rewards.min(axis=1)).tolist()
    above_first = np.argsort(~above, axis=1, kind="stable").tolist()  # chosen then rejected, each ascending
    out = []
    for row, n, equal in zip(above_first, n_above, all_equal):
        if equal or n in (0, len(row)):
            out.append(skipped_selection("mean_split", ALL_EQUAL if equal else ROUNDING))
        else:
            out.append(Selection("mean_split", row[:n], row[n:]))
    return out


def batch_top_bottom(rewards, embeddings, k, *, seeds, m) -> list[Selection]:
    """select_top_bottom for B pools. rewards (B, N)."""
    n = rewards.shape[1]
    if 2 * m > n:
        raise ValueError(f"top_bottom with m={m} needs a pool of at least 2m = {2 * m} responses; got N={n}")
    best = np.argsort(-rewards, axis=1, kind="stable")[:, :m]  # (B, m)
    keyed = rewards.copy()
    np.put_along_axis(keyed, best, np.inf, axis=1)
    worst = np.argsort(keyed, axis=1, kind="stable")[:, :m]
    return [
        Selection("top_bottom", c, r)
        for c, r in zip(np.sort(best, axis=1).tolist(), np.sort(worst, axis=1).tolist())
    ]


def coreset_members(top: np.ndarray, n: int, cluster_on: str) -> np.ndarray:
    """Pool indices that k-means clusters, ascending: (B, N-1) without the positive, or (B, N) for "all"."""
    if cluster_on == "candidates":
        j = np.arange(n - 1)
        return j + (j >= top[:, None])
    return np.broadcast_to(np.arange(n), (len(top), n))


def lowest_per_cluster(rewards, members, labels, top, k) -> tuple[np.ndarray, np.ndarray]:
    """The lowest-reward member of each cluster, the positive excluded, ties to the lower index.

    rewards (B, N), members (B, n), labels (B, n) -> pool indices (B, k), whether the cluster had one (B, k).
    """
    member_rewards = np.take_along_axis(rewards, members, axis=1)
    member_rewards = np.where(members == top[:, None], np.inf, member_rewards)
    in_cluster = np.where(labels[:, :, None] == np.arange(k), member_rewards[:, :, None], np.inf)  # (B, n, k)
    lowest = np.take_along_axis(members, in_cluster.argmin(axis=1), axis=1)
    return lowest, np.isfinite(in_cluster.min(axis=1))


def batch_coreset(rewards, embeddings, k, *, seeds, cluster_on, n_init, max_iter):
    """select_coreset for B pools. rewards (B, N), embeddings (B, N, d), seeds (B,)."""
    B, N = rewards.shape
    top = top_index(rewards)
    members = coreset_members(top, N, cluster_on)  # (B, n)
    rows = np.arange(B)[:, None, None]
    gram = gram_matrix(embeddings)[rows, members[:, :, None], members[:, None, :]]  # (B, n, n)
    step = rows_per_step(members.shape[1] * n_init * k)  # Lloyd holds (rows, n, n_init, k) arrays
    labels = np.concatenate([
        batch_kmeans(gram[i : i + step], k, seeds[i : i + step], n_init=n_init, max_iter=max_iter)
        for i in range(0, B, step)
    ])  # (B, n)
    lowest, has_negative = lowest_per_cluster(rewards, members, labels, top, k)
    rejected = np.sort(lowest, axis=1).tolist()
    for b in np.flatnonzero(~has_negative.all(axis=1)):  # a cluster held only the positive (cluster_on="all")
        picked = set(lowest[b, has_negative[b]].tolist())
        bottom = bottom_order(rewards[b : b + 1], top[b : b + 1])[0, : N - 1].tolist()
        rejected[b] = sorted(picked | set([i for i in bottom if i not in picked][: k - len(picked)]))
    clusters = np.full((B, N), -1)
    np.put_along_axis(clusters, members, labels, axis=1)
    clusters = first_appearance(clusters, k).tolist()
    return [Selection("coreset", [t], r, clusters=c) for t, r, c in zip(top.tolist(), rejected, clusters)]


def best_swaps(dist, weights, medoids, top) -> tuple[np.ndarray, np.ndarray]:
    """One best-improvement swap for B pools: every swap of local_search_medoids costed at once.

    dist (B, N, N), weights (B, N), medoids (B, k) ascending, top (B,) -> accepted (B,), new medoids (B, k).
    """
    B, N, _ = dist.shape
    k = medoids.shape[1]
    rows = np.arange(B)
    free = np.ones((B, N), dtype=bool)
    free[rows, top] = False
    np.put_along_axis(free, medoids, False, axis=1)
    M = N - 1 - k  # candidates outside the medoids
    if M == 0:
        return np.zeros(B, dtype=bool), medoids
    incoming = np.nonzero(free)[1].reshape(B, M)  # (B, M) ascending
    to_medoid = np.take_along_axis(dist, np.broadcast_to(medoids[:, None, :], (B, N, k)), axis=2)  # (B, N, k)
    nearest = to_medoid.argmin(axis=2)  # (B, N): position in medoids
    d1 = np.take_along_axis(to_medoid, nearest[:, :, None], axis=2)[:, :, 0]
    np.put_along_axis(to_medoid, nearest[:, :, None], np.inf, axis=2)
    d2 = to_medoid.min(axis=2)  # (B, N): second nearest (inf when k = 1)
    current = (weights * d1).sum(axis=1)  # (B,)
    # without[a, i]: distance from i to the nearest medoid other than medoid a. (B, k, N)
    without = np.where(np.arange(k)[None, :, None] == nearest[:, None, :], d2[:, None, :], d1[:, None, :])
    # trial[a, b, i]: distance from i to its nearest medoid after swapping a for candidate b. (B, k, M, N)
    trial = np.minimum(without[:, :, None, :], dist[rows[:, None], incoming][:, None])
    trial *= weights[:, None, None, :]
    cost = trial.sum(axis=3).reshape(B, k * M)  # summed like medoid_cost: the same floats, bit for bit
    flat = cost.argmin(axis=1)  # first minimum in (a, b) order
    accepted = cost[rows, flat] < current * (1 - SWAP_TOL)
    swapped = medoids.copy()
    swapped[rows, flat // M] = incoming[rows, flat % M]
    return accepted, np.sort(swapped, axis=1)


def batch_local_search(dist, weights, medoids, top) -> np.ndarray:
    """local_search_medoids for B pools: swap until no pool improves. -> medoids (B, k) ascending."""
    medoids = medoids.copy()
    B, N, _ = dist.shape
    step = rows_per_step(medoids.shape[1] * N * N)  # best_swaps holds (rows, k, N, N) swap costs
    active = np.arange(B)
    while active.size:
        still = []
        for part in np.array_split(active, -(-active.size // step)):
            accepted, swapped = best_swaps(dist[part], weights[part], medoids[part], top[part])
            medoids[part[accepted]] = swapped[accepted]
            still.append(part[accepted])
        active = np.concatenate(still)
    return medoids


def batch_optselect(rewards, embeddings, k, *, seeds, points, weight_temperature, solver) -> list[Selection]:
    """select_optselect for B pools. rewards (B, N), embeddings (B, N, d). solver="exact" loops."""
    if solver == "exact":  # the MIP is the reference, not the fast path
        return [
            select_optselect(r, e, k, points=points, weight_temperature=weight_temperature, solver="exact")
            for r, e in zip(rewards, embeddings)
        ]
    B = len(rewards)
    top = top_index(rewards)
    weights = optselect_weights(rewards, weight_temperature)
    if points == "candidates":
        weights[np.arange(B), top] = 0.0
    dist = pairwise_distances(embeddings)  # (B, N, N)
    init = np.sort(bottom_order(rewards, top)[:, :k], axis=1)
    medoids = batch_local_search(dist, weights, init, top)
    to_medoid = np.take_along_axis(dist, np.broadcast_to(medoids[:, None, :], (*dist.shape[:2], k)), axis=2)
    nearest = np.take_along_axis(medoids, to_medoid.argmin(axis=2), axis=1)  # (B, N): pool index of a medoid
    cost = (weights * to_medoid.min(axis=2)).sum(axis=1)
    return [
        Selection("optselect", [t], s, clusters=c, cost=v)
        for t, s, c, v in zip(top.tolist(), medoids.tolist(), nearest.tolist(), cost.tolist())
    ]


# ------------------------------------------------------------------------------------------------------------
# what select_batch (registry.py) needs: input layouts, gathering by N, the finiteness scan


def pool_sizes(rewards, embeddings, lengths, label) -> np.ndarray:
    """Pool size per prompt, after checking the layout: padded arrays (+ lengths) or lists of arrays."""
    if isinstance(rewards, (list, tuple)):
        return list_sizes(rewards, embeddings, lengths, label)
    r, e = np.asarray(rewards), np.asarray(embeddings)
    if r.ndim != 2 or e.ndim != 3 or e.shape[:2] != r.shape:
        raise ValueError(
            f"padded input needs rewards (B, Nmax) and embeddings (B, Nmax, d); got {r.shape}, {e.shape}"
        )
    if lengths is None:
        return np.full(r.shape[0], r.shape[1], dtype=np.int64)
    sizes = np.asarray(lengths)
    ints = sizes.shape == (r.shape[0],) and sizes.dtype.kind in "iu"
    if not (ints and ((sizes >= 0) & (sizes <= r.shape[1])).all()):
        raise ValueError(f"lengths must be {r.shape[0]} ints in [0, {r.shape[1]}]; got {sizes!r:.80}")
    return sizes.astype(np.int64)


def list_sizes(rewards, embeddings, lengths, label) -> np.ndarray:
    """Pool sizes of lists of B arrays (N_i,) and (N_i, d)."""
    if lengths is not None:
        raise ValueError("lengths is only for padded arrays; lists of arrays carry their own sizes")
    if not isinstance(embeddings, (list, tuple)) or len(embeddings) != len(rewards):
        raise ValueError(f"embeddings must be a list of {len(rewards)} arrays (N_i, d), one per reward array")
    for p, (r, e) in enumerate(zip(rewards, embeddings)):
        if np.ndim(r) != 1 or np.ndim(e) != 2 or np.shape(e)[0] != np.shape(r)[0]:
            shapes = f"{np.shape(r)} and {np.shape(e)}"
            raise ValueError(f"{label(p)}: rewards (N,) and embeddings (N, d) expected; got {shapes}")
    return np.array([len(r) for r in rewards], dtype=np.int64)


def embedding_dim(embeddings) -> int:
    """d of (B, Nmax, d) or of a list of (N_i, d) arrays (the first one; stacking checks the rest)."""
    if isinstance(embeddings, (list, tuple)):
        return int(np.shape(embeddings[0])[1]) if len(embeddings) else 0
    return int(np.shape(embeddings)[2])


def gather(values, prompts: np.ndarray, n: int, dtype) -> np.ndarray:
    """The first n entries of the given prompts, stacked: padded array or list of arrays -> (b, n, ...)."""
    if isinstance(values, (list, tuple)):
        return np.stack([np.asarray(values[p], dtype=dtype) for p in prompts])
    return np.asarray(np.asarray(values)[prompts, :n], dtype=dtype)


def all_finite_fast(values: np.ndarray) -> bool:
    """True only if every entry is finite; False may be a false alarm (the caller then scans exactly).

    NaN and inf propagate through a sum, so a finite sum proves every entry finite; an overflow of finite
    entries gives a non-finite sum, a false alarm only. One SIMD sum reads the array about 1.5x faster than
    isfinite(...).all(), which also writes a boolean temporary of the same length."""
    if values.dtype.kind in "iub":
        return True
    if values.dtype.kind not in "fc" or not values.flags.c_contiguous:
        return False  # the exact scan decides, without a flattening copy
    flat = values.reshape(-1)
    step = 1 << 22
    return all(np.isfinite(flat[i : i + step].sum()) for i in range(0, flat.size, step))


def check_finite_embeddings(embeddings, sizes: np.ndarray, label) -> None:
    """Every pool's embeddings are finite (padding ignored), else a ValueError naming the first bad prompt
    (label(p): how errors name prompt p).
    One pass over views of the input: no copies, even for the methods that never read the embeddings."""
    if isinstance(embeddings, (list, tuple)):
        bad = [p for p, e in enumerate(embeddings) if not np.isfinite(e).all()]
    elif all_finite_fast(np.asarray(embeddings)):
        return
    else:  # something is not finite, maybe only padding: find the first prompt whose pool has it
        e, bad = np.asarray(embeddings), []
        step = rows_per_step(e.shape[1] * e.shape[2])
        for start in range(0, len(e), step):
            finite = np.isfinite(e[start : start + step]).all(axis=2)  # (b, Nmax)
            finite |= np.arange(e.shape[1]) >= sizes[start : start + step, None]  # padding
            bad += (start + np.flatnonzero(~finite.all(axis=1))).tolist()
    if bad:
        n = int(sizes[bad[0]])
        check_embeddings(np.asarray(embeddings[bad[0]])[:n], n, where=f"{label(bad[0])}: ")
