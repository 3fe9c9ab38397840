"""k-means for B small point sets at once: ampo_methods.kmeans, vectorised over prompts and starts.

Works on the Gram matrix G = X X^T (B, n, n). A centre is a weighted mean of the points, c = X^T v, so
||x_i - c||^2 = G_ii - 2 (G v)_i + v^T G v: one Lloyd step costs n*n*k per start instead of n*d*k
(n = 31 << d = 384), and all starts of a prompt share one (n, n) @ (n, T*k) matmul. Same uniforms, same tie
rules, same stopping rule as the per-prompt reference; only rounding differs (Gram form, not differences).
"""

from __future__ import annotations

import numpy as np

from ampo.selection.ampo_methods import TIE_TOL
from ampo.selection.pool import STREAM_KMEANS, seeded_uniforms


def gram_matrix(points: np.ndarray) -> np.ndarray:
    """G = X X^T in float64, exactly symmetric. (B, n, d) -> (B, n, n)."""
    x = np.asarray(points, dtype=np.float64)
    gram = x @ x.transpose(0, 2, 1)
    return 0.5 * (gram + gram.transpose(0, 2, 1))


def sq_distances(gram: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """Squared distances |x_i|^2 + |x_j|^2 - 2 x_i.x_j, those <= tol (B,) set to 0. (B, n, n) -> (B, n, n)."""
    sq = np.einsum("bii->bi", gram)
    d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * gram
    return np.where(d2 <= tol[:, None, None], 0.0, d2)


def batch_kmeanspp(d2: np.ndarray, u: np.ndarray) -> np.ndarray:
    """k-means++ seeding for every (prompt, start). d2 (B, n, n), uniforms (B, T, k) -> centres (B, T, k)."""
    B, T, k = u.shape
    n = d2.shape[-1]
    rows = np.arange(B)[:, None]  # (B, 1): broadcasts over starts
    centres = np.empty((B, T, k), dtype=np.int64)
    centres[..., 0] = np.minimum((u[..., 0] * n).astype(np.int64), n - 1)
    chosen = np.zeros((B, T, n), dtype=bool)
    np.put_along_axis(chosen, centres[..., :1], True, axis=-1)
    mind2 = d2[rows, centres[..., 0]]  # (B, T, n): squared distance to the nearest centre so far
    for c in range(1, k):
        cum = np.cumsum(mind2, axis=-1)
        total = cum[..., -1]
        j = np.minimum((cum <= (u[..., c] * total)[..., None]).sum(-1), n - 1)  # searchsorted(side="right")
        j = np.where(total > 0, j, np.argmax(~chosen, axis=-1))  # all points on centres: lowest unused index
        centres[..., c] = j
        np.put_along_axis(chosen, j[..., None], True, axis=-1)
        mind2 = np.minimum(mind2, d2[rows, j])
    return centres


def mean_weights(labels: np.ndarray, k: int, previous: np.ndarray) -> np.ndarray:
    """-2 v of each cluster's mean, c = X^T v with v = one-hot / count; an empty cluster keeps `previous`.
    labels (a, n, T) -> (a, n, T, k)."""
    onehot = labels[..., None] == np.arange(k)
    counts = onehot.sum(axis=1)  # (a, T, k)
    means = onehot * (-2.0 / np.maximum(counts, 1))[:, None]
    return np.where(counts[:, None] > 0, means, previous) if (counts == 0).any() else means


def batch_lloyd(gram, centres, max_iter: int, tol) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's iterations for every (prompt, start) until no label changes. gram (B, n, n), centres (B, T, k)
    point indices, tol (B,) -> labels (B, T, n), inertia (B, T). A point joins the lowest-index centre within
    tol of its nearest; an empty cluster keeps its centre.

    A converged start recomputes the same centres, so a prompt iterates until all its starts have converged;
    prompts whose starts have all converged leave the working set.
    """
    B, T, k = centres.shape
    n = gram.shape[-1]
    out_labels = np.zeros((B, n, T), dtype=np.int64)
    out_inertia = np.zeros((B, T))
    ids, g, sq = np.arange(B), gram, np.einsum("bii->bi", gram)  # the working set: prompts still moving
    tol = tol[:, None, None, None]
    # w = -2 v with centre c = X^T v; h = G w = -2 x_i.c; cc = v^T G v = |c|^2. Scaling by -2 is exact.
    w = -2.0 * (np.arange(n)[None, :, None, None] == centres[:, None, :, :])  # (B, n, T, k)
    h = -2.0 * np.take_along_axis(g, centres.reshape(B, 1, T * k), axis=2).reshape(B, n, T, k)  # on points
    cc = np.take_along_axis(sq, centres.reshape(B, T * k), axis=1).reshape(B, T, k)
    labels, done = np.zeros((B, n, T), dtype=np.int64), np.zeros((B, T), dtype=bool)
    for it in range(max_iter):
        score = cc[:, None] + h  # (a, n, T, k): |x_i - c|^2 - |x_i|^2
        new = (score <= score.min(axis=-1, keepdims=True) + tol).argmax(axis=-1)  # (a, n, T)
        moving = ~done
        converged = moving & (new == labels).all(axis=1) if it > 0 else np.zeros_like(done)
        inertia = (np.take_along_axis(score, new[..., None], axis=-1)[..., 0] + sq[:, :, None]).sum(axis=1)
        out_labels[ids] = np.where(moving[:, None, :], new, out_labels[ids])
        out_inertia[ids] = np.where(moving, inertia, out_inertia[ids])
        done = done | converged
        keep = ~done.all(axis=1)
        if not keep.any():
            break
        if not keep.all():
            ids, g, sq, w, tol = ids[keep], g[keep], sq[keep], w[keep], tol[keep]
            new, done = new[keep], done[keep]
        labels, w = new, mean_weights(new, k, w)
        h = (g @ w.reshape(len(ids), n, T * k)).reshape(w.shape)
        cc = 0.25 * np.einsum("bntk,bntk->btk", w, h)
    return out_labels.transpose(0, 2, 1), out_inertia


def batch_kmeans(gram: np.ndarray, k: int, seeds: np.ndarray, *, n_init: int, max_iter: int) -> np.ndarray:
    """Euclidean k-means, n_init k-means++ starts, lowest inertia wins (the first within n * tol of it).

    gram (B, n, n) of the points, seeds (B,) -> labels (B, n).
    """
    B, n, _ = gram.shape
    tol = TIE_TOL * np.einsum("bii->bi", gram).max(axis=1)  # (B,)
    u = seeded_uniforms(seeds, STREAM_KMEANS, n_init * k).reshape(B, n_init, k)
    labels, inertia = batch_lloyd(gram, batch_kmeanspp(sq_distances(gram, tol), u), max_iter, tol)
    best = (inertia <= inertia.min(axis=1, keepdims=True) + n * tol[:, None]).argmax(axis=1)
    return labels[np.arange(B), best]


def first_appearance(labels: np.ndarray, k: int) -> np.ndarray:
    """Renumber cluster ids by first appearance along each row; -1 stays -1. (B, N) -> (B, N)."""
    N = labels.shape[1]
    onehot = labels[:, :, None] == np.arange(k)  # (B, N, k)
    first = np.where(onehot.any(axis=1), onehot.argmax(axis=1), N + np.arange(k))  # (B, k), absent ids last
    rank = np.argsort(np.argsort(first, axis=1), axis=1)  # (B, k): new id of each old id
    return np.where(labels >= 0, np.take_along_axis(rank, np.maximum(labels, 0), axis=1), -1)
