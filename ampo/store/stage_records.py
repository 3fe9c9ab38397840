"""Stage bookkeeping on the `rounds` table: a stage is done only once its completion record is written.

The record is written last, after the stage's data, with the candidates table version at that moment; a crash
before it leaves the stage `running`, and a re-run repeats it (its writes are idempotent upserts).
"""

from __future__ import annotations

import json

from lancedb.table import Table

from ampo.schema import RoundStage, stage_id, utcnow
from ampo.store import filters
from ampo.store.rows import to_table
from ampo.store.tables import scan, upsert

JSON_FIELDS = ("counts", "metrics", "gate")


def stage_started(table: Table, run: str, round: int, stage: str) -> None:
    """Mark (run, round, stage) running; a re-started stage counts one more attempt."""
    key = stage_id(run, round, stage)
    previous = scan(table, filters.id_is(key), ["attempts"])
    attempts = previous["attempts"][0].as_py() + 1 if previous.num_rows else 1
    record = {"id": key, "run": run, "round": round, "stage": stage, "status": "running", "attempts": attempts,
              "started_at": utcnow(), "finished_at": None, "seconds": None, "message": ""}  # fmt: skip
    exists = previous.num_rows > 0
    upsert(table, to_table([record], RoundStage, partial=exists), insert=not exists)


def stage_done(
    table: Table,
    run: str,
    round: int,
    stage: str,
    *,
    counts: dict,
    seconds: float,
    store_version: int | None,
    metrics: dict | None = None,
    gate: dict | None = None,
    message: str = "",
) -> dict:
    """Write the completion record of (run, round, stage); call it after the stage's data is written."""
    record = {
        "id": stage_id(run, round, stage), "run": run, "round": round, "stage": stage, "status": "done",
        "finished_at": utcnow(), "seconds": float(seconds), "store_version": store_version,
        "counts": _dumps(counts, "counts"), "metrics": _dumps(metrics or {}, "metrics"),
        "gate": None if gate is None else _dumps(gate, "gate"), "message": message,
    }  # fmt: skip
    exists = table.count_rows(filters.id_is(record["id"])) > 0
    upsert(table, to_table([record], RoundStage, partial=exists), insert=not exists)
    return stage_status(table, run, round)[stage]


def stage_failed(table: Table, run: str, round: int, stage: str, message: str) -> None:
    """Mark (run, round, stage) failed with the error text; a later run retries it."""
    record = {"id": stage_id(run, round, stage), "run": run, "round": round, "stage": stage, "status": "failed",
              "finished_at": utcnow(), "message": str(message)[:10_000]}  # fmt: skip
    exists = table.count_rows(filters.id_is(record["id"])) > 0
    upsert(table, to_table([record], RoundStage, partial=exists), insert=not exists)


def stage_status(table: Table, run: str, round: int) -> dict[str, dict]:
    """stage -> its record (JSON fields decoded) for every stage of (run, round) seen so far."""
    rows = _decoded(scan(table, filters.round_is(run, round)).to_pylist())
    return {row["stage"]: row for row in sorted(rows, key=lambda r: r["started_at"] or r["finished_at"])}


def stage_records(table: Table, run: str | None = None) -> list[dict]:
    """Every stage record (JSON fields decoded) of `run`, or of all runs when None, sorted by (run, round)."""
    rows = _decoded(scan(table, filters.run_is(run) if run is not None else "").to_pylist())
    return sorted(rows, key=lambda r: (r["run"], r["round"]))


def _decoded(rows: list[dict]) -> list[dict]:
    for row in rows:
        for name in JSON_FIELDS:
            row[name] = None if row[name] is None else json.loads(row[name])
    return rows


def is_done(table: Table, run: str, round: int, stage: str) -> bool:
    where = filters.all_of(filters.id_is(stage_id(run, round, stage)), "status = 'done'")
    return table.count_rows(where) > 0


def _dumps(value: dict, name: str) -> str:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
    return json.dumps(value, sort_keys=True, default=_plain)


def _plain(value):
    """numpy scalars and arrays -> Python numbers and lists, for json.dumps."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} {value!r} as JSON")
