"""Prompt prefilters applied before the selector: pools without reward spread, and alignment potential.

Both take pools padded to the largest one: rewards / logps (P, Nmax), pool i is the first lengths[i] entries
(the padding is never read), and return a boolean mask (P,) of the pools to keep.
"""

from __future__ import annotations

import numpy as np

from ampo.selection.potential import alignment_potential, top_fraction


def pool_mask(shape: tuple[int, int], lengths) -> np.ndarray:
    """(P, Nmax) True on the real responses of each pool."""
    lengths = np.asarray(lengths)
    if lengths.shape != (shape[0],) or (lengths < 1).any() or (lengths > shape[1]).any():
        raise ValueError(f"lengths must be {shape[0]} ints in [1, {shape[1]}]; got {lengths!r:.80}")
    return np.arange(shape[1]) < lengths[:, None]


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


def pool_pair_margins(rewards, logps, lengths) -> dict[str, np.ndarray]:
    """`pair_margins` for pools of varying size: the best-vs-worst pair of each pool and its two margins.

    (P, Nmax), (P, Nmax), (P,) -> chosen, rejected (pool indices), rm_margin, logp_margin_abs, each (P,).
    chosen = argmax reward, rejected = argmin of the others, ties to the lowest index, as pair_margins.
    """
    r = np.asarray(rewards, dtype=np.float64)
    lp = np.asarray(logps, dtype=np.float64)
    if r.ndim != 2 or lp.shape != r.shape:
        raise ValueError(f"rewards and logps must both have shape (P, Nmax); got {r.shape} and {lp.shape}")
    mask = pool_mask(r.shape, lengths)
    short = np.flatnonzero(np.asarray(lengths) < 2)
    if short.size:
        raise ValueError(f"every pool needs at least 2 responses; pool {int(short[0])} has 1")
    bad = ~(np.isfinite(r) & np.isfinite(lp)) & mask
    if bad.any():
        p, i = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"pool {p}: rewards and logps must be finite; reward {r[p, i]}, logp {lp[p, i]} at {i}"
        )
    rows = np.arange(len(r))
    chosen = np.where(mask, r, -np.inf).argmax(axis=1)
    others = np.where(mask, r, np.inf)
    others[rows, chosen] = np.inf
    rejected = others.argmin(axis=1)
    return {
        "chosen": chosen,
        "rejected": rejected,
        "rm_margin": r[rows, chosen] - r[rows, rejected],
        "logp_margin_abs": np.abs(lp[rows, chosen] - lp[rows, rejected]),
    }


def potential_scores(rewards, logps, lengths, *, logp_weight: float = 1.0) -> np.ndarray:
    """M_AP of each pool's best-vs-worst pair, z-scored over the P pools given (spec 4.1). -> (P,)"""
    m = pool_pair_margins(rewards, logps, lengths)
    return alignment_potential(m["rm_margin"], m["logp_margin_abs"], logp_weight=logp_weight)


def potential_mask(rewards, logps, lengths, *, fraction: float, logp_weight: float = 1.0) -> np.ndarray:
    """Pools to keep: the int(fraction * P) highest M_AP (top_fraction: ties at the cut keep higher indices)."""
    scores = potential_scores(rewards, logps, lengths, logp_weight=logp_weight)
    keep = np.zeros(len(scores), dtype=bool)
    keep[top_fraction(scores, fraction)] = True
    return keep
