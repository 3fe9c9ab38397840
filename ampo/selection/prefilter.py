"""Prompt prefilters applied before the selector: pools without reward spread, and alignment potential.

Both take pools padded to the largest one: rewards / logps (P, Nmax), pool i is the first lengths[i] entries
(the padding is never read), and return a boolean mask (P,) of the pools to keep.
"""

from __future__ import annotations

import numpy as np

from ampo.selection.potential import alignment_potential, pair_margins, pool_mask, top_fraction


def reward_spread(rewards, lengths) -> np.ndarray:
    """max - min reward of each pool. (P, Nmax), (P,) -> (P,); 0 for a pool whose rewards are all equal."""
    r = np.asarray(rewards, dtype=np.float64)
    mask = pool_mask(r.shape, lengths)
    return np.where(mask, r, -np.inf).max(axis=1) - np.where(mask, r, np.inf).min(axis=1)


def informative(rewards, lengths, min_spread: float) -> np.ndarray:
    """Pools to keep: reward spread >= min_spread (a spread equal to it is kept; min_spread=0 keeps all)."""
    if not min_spread >= 0:
        raise ValueError(f"min_spread={min_spread!r} must be a number >= 0")
    return reward_spread(rewards, lengths) >= min_spread


def potential_scores(rewards, logps, lengths, *, logp_weight: float = 1.0) -> np.ndarray:
    """M_AP of each pool's best-vs-worst pair, z-scored over the P pools given (spec 4.1). -> (P,)"""
    m = pair_margins(rewards, logps, lengths)
    return alignment_potential(m["rm_margin"], m["logp_margin_abs"], logp_weight=logp_weight)


def potential_mask(rewards, logps, lengths, *, fraction: float, logp_weight: float = 1.0) -> np.ndarray:
    """Pools to keep: the int(fraction * P) highest M_AP (top_fraction: ties at the cut keep higher indices)."""
    scores = potential_scores(rewards, logps, lengths, logp_weight=logp_weight)
    keep = np.zeros(len(scores), dtype=bool)
    keep[top_fraction(scores, fraction)] = True
    return keep
