"""A round's response pools as flat numpy arrays plus offsets: what a selector needs, with no per-row Python."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ampo.store.rows import vectors_to_numpy


@dataclass(frozen=True)
class PaddedPools:
    """Pools padded to the largest pool: rewards (P, Nmax) NaN-padded, vectors (P, Nmax, d) zero-padded."""

    rewards: np.ndarray  # (P, Nmax) float64
    vectors: np.ndarray  # (P, Nmax, d) float32
    lengths: np.ndarray  # (P,) int64: pool i is [:lengths[i]]
    mask: np.ndarray  # (P, Nmax) bool: True on real responses


@dataclass(frozen=True)
class Pools:
    """All usable responses of a round, sorted by (prompt_id, sample); pool i is rows offsets[i]:offsets[i+1]."""

    prompt_ids: list[str]  # (P,) sorted
    offsets: np.ndarray  # (P+1,) int64
    ids: np.ndarray  # (R,) str (object): candidate ids
    samples: np.ndarray  # (R,) int64
    rewards: np.ndarray  # (R,) float64
    vectors: np.ndarray  # (R, d) float32; d = 0 when read without vectors
    n_excluded: int = 0  # rows of the round left out: dropped by scoring, no reward, or a non-finite reward

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def lengths(self) -> np.ndarray:
        """(P,) responses per pool."""
        return np.diff(self.offsets)

    def pool(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids (N,), rewards (N,), vectors (N, d)) of pool i: views, not copies."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.ids[lo:hi], self.rewards[lo:hi], self.vectors[lo:hi]

    def padded(self) -> PaddedPools:
        """(P, Nmax) / (P, Nmax, d) arrays for batched selection, built with one scatter each."""
        lengths = self.lengths
        n_max = int(lengths.max()) if len(lengths) else 0
        row_pool = np.repeat(np.arange(len(self)), lengths)  # (R,) pool of each row
        row_pos = np.arange(len(self.ids)) - self.offsets[row_pool]  # (R,) position within its pool
        rewards = np.full((len(self), n_max), np.nan)
        rewards[row_pool, row_pos] = self.rewards
        vectors = np.zeros((len(self), n_max, self.vectors.shape[1]), np.float32)
        vectors[row_pool, row_pos] = self.vectors
        mask = np.zeros((len(self), n_max), bool)
        mask[row_pool, row_pos] = True
        return PaddedPools(rewards, vectors, lengths, mask)

    def to_ids(self, i: int, local: np.ndarray) -> np.ndarray:
        """Candidate ids of pool i's responses at local indices `local` (what a selector returns)."""
        local = np.asarray(local, np.int64)
        if local.size and (local.min() < 0 or local.max() >= self.lengths[i]):
            raise ValueError(f"indices {local.tolist()} out of range for pool {i} of size {self.lengths[i]}")
        return self.ids[self.offsets[i] + local]


def pools_from_arrow(table: pa.Table, dim: int, n_excluded: int = 0) -> Pools:
    """Pools from columns id, prompt_id, sample, reward (+ vector when dim > 0), in any row order.

    Rows with a null or non-finite reward are left out and added to `n_excluded`.
    """
    finite = pc.fill_null(pc.is_finite(table["reward"]), False)
    kept = table.filter(finite) if pc.sum(finite).as_py() != table.num_rows else table
    n_excluded += table.num_rows - kept.num_rows
    order = pc.sort_indices(kept, sort_keys=[("prompt_id", "ascending"), ("sample", "ascending")])
    prompt_ids = kept["prompt_id"].take(order)
    offsets = prompt_offsets(prompt_ids)  # (P+1,)
    starts = offsets[:-1]  # (P,)
    order_np = order.to_numpy()
    vectors = (
        vectors_to_numpy(kept["vector"], dim)[order_np] if dim else np.zeros((kept.num_rows, 0), np.float32)
    )
    return Pools(
        prompt_ids=prompt_ids.take(pa.array(starts)).to_pylist(),
        offsets=offsets,
        ids=kept["id"].take(order).to_numpy(),
        samples=kept["sample"].take(order).to_numpy(),
        rewards=kept["reward"].take(order).to_numpy().astype(np.float64, copy=False),
        vectors=vectors,
        n_excluded=n_excluded,
    )


def prompt_offsets(sorted_prompt_ids) -> np.ndarray:
    """(P+1,) int64 offsets of the runs of equal prompt ids in rows sorted by prompt id: prompt p's rows are
    offsets[p]:offsets[p+1]. The one place rows are split by prompt; takes an arrow array, a numpy array or a list."""
    keys = sorted_prompt_ids if isinstance(sorted_prompt_ids, pa.Array | pa.ChunkedArray) else pa.array(
        list(sorted_prompt_ids), pa.string())  # fmt: skip
    n = len(keys)
    if n == 0:
        return np.zeros(1, np.int64)
    changed = pc.not_equal(keys[1:], keys[:-1]).to_numpy(zero_copy_only=False)  # (n-1,)
    return np.concatenate([[0], np.flatnonzero(changed) + 1, [n]]).astype(np.int64)


def split_by_prompt(rows: list[dict]) -> list[list[dict]]:
    """Row dicts sorted by prompt id, cut into one list per prompt."""
    offsets = prompt_offsets([r["prompt_id"] for r in rows])
    return [rows[lo:hi] for lo, hi in pairwise(offsets.tolist())]
