"""Baseline selectors for one prompt: random negatives, best vs worst (DPO/SimPO), and the MPO partitions.

The same (rewards (N,), embeddings (N, d), k) signature as the AMPO selectors; none of them reads the
embeddings. Inputs are already checked by `select`. Ties always go to the lower pool index.
"""

from __future__ import annotations

import numpy as np

from ampo.selection.ampo_methods import candidates_of
from ampo.selection.pool import STREAM_RANDOM, Selection, seeded_uniforms, skipped_selection

ALL_EQUAL = "all rewards equal: no response is above the mean"
ROUNDING = "no response lies strictly on each side of the mean reward (rewards differ only by rounding)"


def select_random(rewards, embeddings, k, *, seed=0) -> Selection:
    """Random negatives: the best response, plus k candidates drawn uniformly without replacement.

    The draw ranks the candidates by seeded uniforms (pool.seeded_uniforms) and keeps the k smallest.
    """
    top, candidates = candidates_of(rewards)
    keys = seeded_uniforms(np.array([seed], dtype=np.uint64), STREAM_RANDOM, len(rewards))[0]
    return Selection("random", [top], sorted(sorted(candidates, key=lambda i: (keys[i], i))[:k]))


def select_extremes(rewards, embeddings, k, *, seed=0) -> Selection:
    """Best vs worst, the DPO/SimPO pair: chosen = argmax, rejected = argmin of the rest. Ignores k."""
    top, candidates = candidates_of(rewards)
    return Selection("extremes", [top], [min(candidates, key=lambda i: (rewards[i], i))])


def select_mean_split(rewards, embeddings, k, *, seed=0) -> Selection:
    """MPO partition (spec 2.2): chosen = {r_i > mean(r)}, rejected = {r_i <= mean(r)}. Ignores k.

    A pool whose rewards are all equal has no chosen set: the selection is skipped (empty, skipped_reason).
    """
    if rewards.max() == rewards.min():
        return skipped_selection("mean_split", ALL_EQUAL)
    mean = rewards.mean()
    chosen = [i for i in range(len(rewards)) if rewards[i] > mean]
    rejected = [i for i in range(len(rewards)) if rewards[i] <= mean]
    if not chosen or not rejected:
        return skipped_selection("mean_split", ROUNDING)
    return Selection("mean_split", chosen, rejected)


def select_top_bottom(rewards, embeddings, k, *, seed=0, m) -> Selection:
    """MPO on-policy partition (spec 2.2, REFA 6.1): the m best vs the m worst. Ignores k; needs 2m <= N."""
    n = len(rewards)
    if 2 * m > n:
        raise ValueError(f"top_bottom with m={m} needs a pool of at least 2m = {2 * m} responses; got N={n}")
    best_first = sorted(range(n), key=lambda i: (-rewards[i], i))
    worst = sorted(best_first[m:], key=lambda i: (rewards[i], i))[:m]
    return Selection("top_bottom", sorted(best_first[:m]), sorted(worst))
