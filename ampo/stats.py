"""Paired percentile bootstrap over prompts: pure functions of arrays, deterministic for a given seed.

Every statistic the gates and the quality benchmark compare is a ratio of sums over prompts,
sum_p num[p] / sum_p den[p]: a mean (den = 1), an instruction-level accuracy (num = instructions followed,
den = instructions), a difference of two policies' means on the same prompts (num = a[p] - b[p]) or a length
ratio (num = candidate lengths, den = champion lengths). A bootstrap resample draws P prompts with replacement,
the same draw for both policies (paired), so each replicate is counts @ num / counts @ den.
"""

from __future__ import annotations

import numpy as np


def resample_counts(n: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n) int: how often each of n prompts is drawn in each resample of n draws with replacement."""
    if n < 1 or samples < 1:
        raise ValueError(f"bootstrap needs n >= 1 prompts and samples >= 1, got n={n}, samples={samples}")
    draws = np.random.default_rng(seed).integers(0, n, size=(samples, n))  # (B, n) prompt indices
    rows = np.arange(samples)[:, None] * n
    return np.bincount((draws + rows).ravel(), minlength=samples * n).reshape(samples, n)


def all_resample_counts(n: int) -> np.ndarray:
    """(n**n, n): every ordered resample of n prompts exactly once, for exact bootstraps of tiny cases."""
    grids = np.stack(np.meshgrid(*[np.arange(n)] * n, indexing="ij"), -1).reshape(-1, n)  # (n**n, n) indices
    return np.stack([np.bincount(g, minlength=n) for g in grids])


def ratio_replicates(num: np.ndarray, den: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
    """(B,) replicates of sum(num)/sum(den) under each resample's counts; den None means a mean (den = 1).
    A replicate whose denominator is 0 is 0/0 -> nan when the numerator is 0 too, else +-inf."""
    num = np.asarray(num, float)
    den = np.ones_like(num) if den is None else np.asarray(den, float)
    if num.shape != den.shape or num.ndim != 1 or counts.ndim != 2 or counts.shape[1] != len(num):
        raise ValueError(f"num {num.shape}, den {den.shape} and counts {counts.shape} must be (P,), (P,), (B, P)")
    with np.errstate(divide="ignore", invalid="ignore"):
        return (counts @ num) / (counts @ den)


def percentile(replicates: np.ndarray, q: float) -> float:
    """The q-quantile of the replicates by the inverted CDF: the smallest value v with share(replicates <= v) >= q.
    That is the plain percentile bootstrap's bound, with no interpolation between replicates. Replicates that are
    nan (a resample with an empty denominator, e.g. no prompt with instructions drawn) are left out; all nan: nan."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    reps = np.asarray(replicates, float)
    reps = reps[~np.isnan(reps)]
    return float(np.quantile(reps, q, method="inverted_cdf")) if len(reps) else float("nan")


def one_sided_bounds(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    """(lower, upper): each a one-sided bound at `confidence` (the 1-c and c percentiles); together they form a
    two-sided interval at level 2c - 1 (0.9 -> an 80% interval, 0.975 -> 95%)."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    return percentile(replicates, 1.0 - confidence), percentile(replicates, confidence)


def paired_interval(
    a: np.ndarray, b: np.ndarray | None = None, *, den: np.ndarray | None = None, level: float = 0.95,
    samples: int, seed: int,
) -> tuple[float, float, float]:
    """(point, low, high): two-sided percentile interval at `level` of sum(a - b)/sum(den) (b None: of sum(a)/sum(den)).
    a, b: per-prompt values of two policies on the same prompts, resampled together."""
    a = np.asarray(a, float)
    num = a if b is None else a - np.asarray(b, float)
    d = np.ones_like(num) if den is None else np.asarray(den, float)
    reps = ratio_replicates(num, d, resample_counts(len(num), samples, seed))
    low, high = one_sided_bounds(reps, (1.0 + level) / 2.0)
    return float(num.sum() / d.sum()), low, high
