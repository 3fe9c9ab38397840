"""What every selector shares: the Selection record, pool checks, distances, Opt-Select weights, uniforms."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Selection:
    """One prompt's selection: pool indices of the chosen and the rejected responses, each ascending."""

    method: str
    chosen: list[int]
    rejected: list[int]
    clusters: list[int] | None = (
        None  # coreset: cluster id per pool member (-1: not clustered); optselect: medoid
    )
    cost: float | None = None  # optselect: weighted k-medoids cost, weights scaled so the largest is 1
    skipped_reason: str | None = (
        None  # set when the pool yields no preference group (chosen and rejected empty)
    )

    @property
    def skipped(self) -> bool:
        return self.skipped_reason is not None


def skipped_selection(method: str, reason: str) -> Selection:
    """A selection that yields no group; the trainer must not use it."""
    return Selection(method, [], [], skipped_reason=reason)


def count_skipped(selections: list[Selection]) -> int:
    """How many prompts yielded no group (e.g. mean_split on a pool whose rewards are all equal)."""
    return sum(s.skipped_reason is not None for s in selections)


# ------------------------------------------------------------------------------------------------------------
# checks: a bad pool is a ValueError that names the bad value and what is allowed


def check_k(k, n: int | None = None, *, where: str = "") -> int:
    """k must be an int >= 1; with n given (AMPO methods, random), also k <= n - 1 (one is the positive)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k={k!r} must be an int >= 1")  # noqa: TRY004 - bad input is a ValueError here
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    if n is not None and k > n - 1:
        raise ValueError(f"k={k} negatives need a pool of at least k + 1 = {k + 1} responses; {where}N={n}")
    return int(k)


def check_rewards(rewards, *, where: str = "") -> np.ndarray:
    """rewards (N,) finite floats, N >= 2. Returns float64 (N,)."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"{where}rewards must have shape (N,); got {r.shape}")
    if len(r) == 0:
        raise ValueError(f"{where}empty pool: rewards has no entries")
    if len(r) < 2:
        raise ValueError(f"{where}a pool needs at least 2 responses; got N={len(r)}")
    if not np.isfinite(r).all():
        i = int(np.flatnonzero(~np.isfinite(r))[0])
        raise ValueError(f"{where}rewards must be finite; rewards[{i}]={r[i]}")
    return r


def check_embeddings(embeddings, n: int, *, where: str = "") -> np.ndarray:
    """embeddings (N, d), finite, matching the N rewards (checked for every method, used by some)."""
    e = np.asarray(embeddings)
    if e.ndim != 2 or e.shape[0] != n:
        raise ValueError(
            f"{where}embeddings must have shape (N, d) = ({n}, d) to match the rewards; got {e.shape}"
        )
    if not np.isfinite(e).all():
        i, j = (int(v) for v in np.argwhere(~np.isfinite(e))[0])
        raise ValueError(f"{where}embeddings must be finite; embeddings[{i}, {j}]={e[i, j]}")
    return e


def check_seeds(seed, n_prompts: int) -> np.ndarray:
    """One int seed for every prompt, or one per prompt. Returns uint64 (B,)."""
    s = np.asarray(seed)
    if s.ndim == 0:
        s = np.full(n_prompts, s)
    if s.shape != (n_prompts,) or s.dtype.kind not in "iu":
        raise ValueError(
            f"seed must be an int or {n_prompts} ints, one per prompt; got {np.asarray(seed)!r:.80}"
        )
    if (s < 0).any() or (s > np.iinfo(np.uint64).max).any():
        raise ValueError(f"seeds must lie in [0, 2**64); got {s.min()}..{s.max()}")
    return s.astype(np.uint64)


# ------------------------------------------------------------------------------------------------------------
# numerics shared by the per-prompt and the batched paths


def top_index(rewards: np.ndarray) -> np.ndarray:
    """The positive: argmax reward, ties to the lowest index (spec 3.2). (..., N) -> (...,)."""
    return np.argmax(rewards, axis=-1)


def bottom_order(rewards: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Pool indices by (reward, index) ascending, the positive moved last. (B, N), (B,) -> (B, N)."""
    keyed = rewards.copy()
    keyed[np.arange(len(rewards)), top] = np.inf
    return np.argsort(keyed, axis=-1, kind="stable")


def pairwise_distances(embeddings: np.ndarray) -> np.ndarray:
    """Euclidean distances ||e_i - e_j||_2, float64, exactly symmetric. (..., N, d) -> (..., N, N).

    Gram form sqrt(|a|^2 + |b|^2 - 2 a.b): a 2-D input goes through the same stacked matmul as a batch, so a
    prompt's distances are bitwise the same alone or inside a batch.
    """
    e = np.asarray(embeddings, dtype=np.float64)
    single = e.ndim == 2
    e = e[None] if single else e
    gram = e @ e.transpose(0, 2, 1)  # (B, N, N)
    gram = 0.5 * (gram + gram.transpose(0, 2, 1))
    sq = np.einsum("bii->bi", gram)  # (B, N)
    d2 = np.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * gram, 0.0)
    dist = np.sqrt(d2)
    idx = np.arange(dist.shape[-1])
    dist[:, idx, idx] = 0.0
    return dist[0] if single else dist


def optselect_weights(rewards: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Opt-Select weights w_i = exp((r_bar - r_i) / T), rescaled so the largest is 1. (..., N) -> (..., N).

    exp((r_min - r_i) / T) = exp((r_bar - r_i) / T) / exp((r_bar - r_min) / T): a global rescaling, which
    leaves the k-medoids argmin unchanged (spec 3.3.3) and cannot overflow. So r_bar (spec A4) drops out.
    """
    return np.exp((rewards.min(axis=-1, keepdims=True) - rewards) / temperature)


_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64 increment
_STREAM = np.uint64(0xD1B54A32D192ED03)
STREAM_KMEANS, STREAM_RANDOM = 1, 2


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014), wrapping uint64 arithmetic."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def seeded_uniforms(seeds: np.ndarray, stream: int, count: int) -> np.ndarray:
    """`count` uniforms in [0, 1) per seed from a counter-based hash. seeds (B,) uint64 -> (B, count) float64.

    A hash of (seed, stream, counter) instead of one np.random.Generator per prompt: it vectorises over
    prompts, and building 10,000 Generators would cost more than the selection itself.
    """
    seeds = np.asarray(seeds, dtype=np.uint64)
    key = _mix64(seeds + np.uint64(stream * int(_STREAM) % 2**64))  # (B,)
    counters = np.arange(1, count + 1, dtype=np.uint64) * _GAMMA  # (count,)
    bits = _mix64(key[:, None] + counters[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
