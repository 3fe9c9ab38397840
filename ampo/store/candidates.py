"""Reads of the candidates table: pools for selection, rows for later stages, and the audit queries."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.table import Table

from ampo.schema import check_int, make_candidate_model
from ampo.store import filters
from ampo.store.pools import Pools, pools_from_arrow, prompt_offsets
from ampo.store.tables import scan

AUDIT_COLUMNS = ["id", "prompt_id", "sample", "response", "n_tokens", "reward", "reward_parts", "selected", "role",
                 "selector", "cluster", "dropped_reason"]  # fmt: skip
NEIGHBOUR_COLUMNS = ["id", "run", "round", "prompt_id", "sample", "response", "reward", "selected", "role"]


class CandidatesView:
    """Read-only queries over one candidates table: its latest version, or a round's tagged version."""

    def __init__(self, table: Table, dim: int):
        self.table = table
        self.dim = dim
        self.columns = make_candidate_model(dim).to_arrow_schema().names

    @property
    def version(self) -> int:
        return self.table.version

    def count(self, run: str, round: int, *, selected: bool | None = None) -> int:
        """Rows of (run, round), all or only the (not) selected ones."""
        where = filters.all_of(
            filters.round_is(run, round), None if selected is None else filters.selected_is(selected)
        )
        return self.table.count_rows(where)

    def read_pools(
        self, run: str, round: int, *, selected_only: bool = False, with_vectors: bool = True
    ) -> Pools:
        """Every prompt's usable responses as flat arrays + offsets, sorted by (prompt_id, sample).

        Rows dropped by scoring or without a finite reward are left out and counted in `Pools.n_excluded`.
        with_vectors=False skips reading the (R, d) vectors (Pools.vectors is then (R, 0)).
        """
        where = filters.all_of(
            filters.round_is(run, round), filters.selected_is(True) if selected_only else None
        )
        columns = ["id", "prompt_id", "sample", "reward"] + (["vector"] if with_vectors else [])
        table = scan(self.table, filters.all_of(where, filters.USABLE), columns)
        n_excluded = self.table.count_rows(where) - table.num_rows
        if with_vectors and table["vector"].null_count:
            raise ValueError(
                f"{table['vector'].null_count} scored rows of run {run!r} round {round} have no vector; "
                f"run the embed stage first (or read_pools(..., with_vectors=False))"
            )
        return pools_from_arrow(table, self.dim if with_vectors else 0, n_excluded)

    def read_rows(
        self,
        run: str,
        round: int,
        columns: Sequence[str] | None = None,
        *,
        selected: bool | None = None,
        embedded: bool | None = None,
    ) -> pa.Table:
        """Rows of (run, round) as Arrow, sorted by (prompt_id, sample); `columns` default to all.

        selected / embedded: only rows that are (not) selected / have (no) vector yet; None: all.
        """
        columns = self._check_columns(columns)
        where = filters.all_of(
            filters.round_is(run, round),
            None if selected is None else filters.selected_is(selected),
            None if embedded is None else (filters.EMBEDDED if embedded else filters.NOT_EMBEDDED),
        )
        keys = [c for c in ("prompt_id", "sample") if c not in columns]
        table = scan(self.table, where, list(columns) + keys)
        table = table.sort_by([("prompt_id", "ascending"), ("sample", "ascending")])
        return table.drop_columns(keys)

    def prompt_pool(self, run: str, round: int, prompt_id: str) -> pa.Table:
        """All responses to one prompt with rewards, roles and clusters, best reward first (unscored last)."""
        where = filters.all_of(filters.round_is(run, round), filters.prompt_is(prompt_id))
        table = scan(self.table, where, AUDIT_COLUMNS)
        return table.sort_by([("reward", "descending"), ("sample", "ascending")])

    def selected_groups(self, run: str, round: int) -> dict[str, pa.Table]:
        """prompt_id -> its selected responses (chosen first, then by reward, best first), prompts sorted."""
        where = filters.all_of(filters.round_is(run, round), filters.selected_is(True))
        table = scan(self.table, where, AUDIT_COLUMNS)
        is_chosen = pc.equal(table["role"], "chosen")
        table = table.append_column("_chosen", is_chosen).sort_by(
            [
                ("prompt_id", "ascending"),
                ("_chosen", "descending"),
                ("reward", "descending"),
                ("sample", "ascending"),
            ]
        )
        table = table.drop_columns(["_chosen"])
        if len(table) == 0:
            return {}
        offsets = prompt_offsets(table["prompt_id"]).tolist()
        return {table["prompt_id"][s].as_py(): table.slice(s, e - s) for s, e in pairwise(offsets)}

    def neighbours(
        self,
        query: np.ndarray | str,
        k: int = 10,
        *,
        run: str | None = None,
        round: int | None = None,
        embed: Callable[[list[str]], np.ndarray] | None = None,
    ) -> pa.Table:
        """The k responses closest to `query` (a (d,) vector, or a text with `embed`) by cosine distance.

        Optionally only within one run, or one (run, round). Returns NEIGHBOUR_COLUMNS + `_distance`, nearest first.
        """
        vector = self._query_vector(query, embed)
        if round is not None and run is None:
            raise ValueError("neighbours(round=...) needs run=... too")
        where = filters.round_is(run, round) if round is not None else (filters.run_is(run) if run else "")
        return self._search(vector, check_int(k, "k", minimum=1), where)

    def neighbours_of_row(self, row_id: str, k: int = 10, *, same_round: bool = True) -> pa.Table:
        """The k responses closest to candidate `row_id` (itself left out), within its round by default."""
        row = scan(self.table, filters.id_is(row_id), ["run", "round", "vector"])
        if row.num_rows == 0:
            raise ValueError(f"no candidate with id {row_id!r}")
        if row["vector"].null_count:
            raise ValueError(f"candidate {row_id!r} has no vector yet; run the embed stage first")
        run, round = row["run"][0].as_py(), row["round"][0].as_py()
        scope = filters.round_is(run, round) if same_round else ""
        where = filters.all_of(scope, f"NOT ({filters.id_is(row_id)})")
        vector = np.asarray(row["vector"][0].as_py(), np.float32)
        return self._search(vector, check_int(k, "k", minimum=1), where)

    def _search(self, vector: np.ndarray, k: int, where: str) -> pa.Table:
        query = self.table.search(vector, vector_column_name="vector").distance_type("cosine")
        if where:
            query = query.where(where, prefilter=True)
        return query.select(NEIGHBOUR_COLUMNS + ["_distance"]).limit(k).to_arrow()

    def _query_vector(self, query: np.ndarray | str, embed) -> np.ndarray:
        if isinstance(query, str):
            if embed is None:
                raise ValueError(
                    "a text query needs embed=<callable list[str] -> (n, d) array>, e.g. Embedder.embed"
                )
            query = embed([query])[0]
        vector = np.asarray(query, np.float32).reshape(-1)
        if vector.shape != (self.dim,) or not np.isfinite(vector).all():
            raise ValueError(f"query vector must be {self.dim} finite floats, got shape {np.shape(query)}")
        return vector

    def _check_columns(self, columns: Sequence[str] | None) -> list[str]:
        if columns is None:
            return list(self.columns)
        unknown = sorted(set(columns) - set(self.columns))
        if unknown:
            raise ValueError(f"unknown candidates column(s) {unknown}; allowed: {self.columns}")
        return list(columns)
