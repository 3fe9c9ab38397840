"""Alignment potential M_AP (Huang et al. 2025, spec 4.1): rank preference pairs by how far the model's
implicit margin is from the reward model's explicit margin, and keep the top fraction.

Follows the official code (Hesse73/Alignment-Potential-Metric @ 123ece7, `get_top_score_idx`): z-scores over
the whole candidate set with ddof=0, |implicit margin| (spec A11), no beta (A12). Margins from different
sources (teacher-forced vs sampling log-probs, A13) must be z-scored separately: never mix them in one call.
"""

from __future__ import annotations

import numpy as np


def zscore(values: np.ndarray) -> np.ndarray:
    """(v - mean) / std with ddof=0, as np.std in the reference. A constant column scores 0 everywhere (its
    rounded std need not be 0: np.full(3, .7).std() = 1.1e-16 would blow rounding up to +-1)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0 or v.max() == v.min():
        return np.zeros_like(v)
    return (v - v.mean()) / v.std()


def alignment_potential(rm_margin, logp_margin_abs, *, logp_weight: float = 1.0) -> np.ndarray:
    """M_AP = z(rm_margin) - w * z(|logp_bar_w - logp_bar_l|) (spec 4.1). (n,), (n,) -> (n,).

    The reference's metric "rm-logp" is w = 1, "rm-xlogp" any w (its CLI default 2.5).

    Invariant to an affine rescaling a*x+b (a > 0) of either margin, because of the z-scores.
    """
    rm = np.asarray(rm_margin, dtype=np.float64)
    lp = np.asarray(logp_margin_abs, dtype=np.float64)
    if rm.ndim != 1 or rm.shape != lp.shape:
        raise ValueError(
            f"rm_margin and logp_margin_abs must both have shape (n,); got {rm.shape} and {lp.shape}"
        )
    if not (np.isfinite(rm).all() and np.isfinite(lp).all()):
        raise ValueError("rm_margin and logp_margin_abs must be finite; found nan or inf")
    if not np.isfinite(logp_weight):
        raise ValueError(f"logp_weight={logp_weight!r} must be finite")
    return zscore(rm) - logp_weight * zscore(lp)


def top_fraction(scores, fraction: float) -> np.ndarray:
    """The int(fraction * n) highest scores, in ascending score order (last is best): exactly
    `np.argsort(scores, kind="stable")[-K:]`, the reference's `np.argsort(scores)[-K:]` made stable as spec A14
    asks. Tied scores sort by index, so at the cut-off the higher indices are kept. (n,) -> (K,) indices.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or not np.isfinite(s).all():
        raise ValueError(f"scores must be finite with shape (n,); got shape {s.shape}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} must lie in [0, 1]")
    keep = int(fraction * len(s))
    return np.argsort(s, kind="stable")[len(s) - keep :]


def pool_mask(shape: tuple[int, int], lengths) -> np.ndarray:
    """(P, Nmax) True on the real responses of each pool (pool i is the first lengths[i] entries of its row)."""
    lengths = np.asarray(lengths)
    if lengths.shape != (shape[0],) or (lengths < 1).any() or (lengths > shape[1]).any():
        raise ValueError(f"lengths must be {shape[0]} ints in [1, {shape[1]}]; got {lengths!r:.80}")
    return np.arange(shape[1]) < lengths[:, None]


def pair_margins(rewards, logps, lengths=None) -> dict[str, np.ndarray]:
    """Best-vs-worst pair of each pool and its two margins (spec 4.2 step 5). (P, N), (P, N) -> (P,) each.

    chosen = argmax reward, rejected = argmin reward among the others; ties to the lowest index (the
    reference's argsort takes the last tied maximum, spec A14). rm_margin = max - min >= 0;
    logp_margin_abs = |logp_c - logp_r| with logps the length-normalised log-probs logp_bar.
    Pools of varying size: rows padded to the largest, `lengths` (P,) the size of each (the padding is never read).
    """
    r = np.asarray(rewards, dtype=np.float64)
    lp = np.asarray(logps, dtype=np.float64)
    if r.ndim != 2 or r.shape != lp.shape or r.shape[1] < 2:
        raise ValueError(
            f"rewards and logps must both have shape (P, N) with N >= 2; got {r.shape} and {lp.shape}"
        )
    mask = np.ones(r.shape, dtype=bool) if lengths is None else pool_mask(r.shape, lengths)
    short = np.flatnonzero(mask.sum(axis=1) < 2)
    if short.size:
        raise ValueError(f"every pool needs at least 2 responses; pool {int(short[0])} has 1")
    bad = ~(np.isfinite(r) & np.isfinite(lp)) & mask
    if bad.any():
        p, i = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"pool {p}: rewards and logps must be finite; reward {r[p, i]}, logp {lp[p, i]} at {i}")
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
