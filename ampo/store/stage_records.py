"""Stage bookkeeping on the `rounds` table: a stage is done only once its completion record is written.

The record is written last, after the stage's data, with the candidates table version at that moment; a crash
before it leaves the stage `running`, and a re-run repeats it (its writes are idempotent upserts).

A stage costs two commits (running, done) and, when the runner passes along what it has read, no other read: the
runner's status read gives `stage_started` the previous record, and `stage_started`'s record gives `stage_done` the
row's existence and the fields it keeps, so `stage_done` returns the finished record without reading it back.
"""

from __future__ import annotations

import json

import pyarrow as pa
from lancedb.table import Table

from ampo.schema import RoundStage, stage_id, utcnow
from ampo.store import filters
from ampo.store.rows import to_table
from ampo.store.tables import scan, upsert

JSON_FIELDS = ("counts", "metrics", "gate")


UNREAD = object()  # stage_started's `previous` when the caller has not read the stage's record


def stage_started(table: Table, run: str, round: int, stage: str, *, previous: dict | None | object = UNREAD) -> dict:
    """Mark (run, round, stage) running; a re-started stage counts one more attempt. Returns the record written.

    previous: the stage's record as the caller read it (an entry of `stage_status`, None when it has none), which
    saves reading it again; by default it is read here."""
    if previous is UNREAD:
        found = scan(table, filters.id_is(stage_id(run, round, stage)), ["attempts"])
        previous = {"attempts": found["attempts"][0].as_py()} if found.num_rows else None
    record, rows, insert = started_rows(run, round, stage, previous)
    upsert(table, rows, insert=insert)
    return record


def started_rows(run: str, round: int, stage: str, previous: dict | None) -> tuple[dict, pa.Table, bool]:
    """The running record of `stage_started` (given the stage's previous record, None when it has none), the rows
    that write it, and whether they insert a new row."""
    exists = previous is not None
    attempts = previous["attempts"] + 1 if exists else 1
    record = {"id": stage_id(run, round, stage), "run": run, "round": round, "stage": stage, "status": "running",
              "attempts": attempts, "started_at": utcnow(), "finished_at": None, "seconds": None,
              "message": ""}  # fmt: skip
    return record, to_table([record], RoundStage, partial=exists), not exists


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
    started: dict | None = None,
) -> dict:
    """Write the completion record of (run, round, stage); call it after the stage's data is written. Returns the
    record as `stage_status` reads it.

    started: the record `stage_started` wrote for this attempt; with it the row is known to exist and the record is
    returned without reading it back (one commit, no read)."""
    fields = {"counts": counts, "seconds": seconds, "store_version": store_version, "metrics": metrics, "gate": gate,
              "message": message}  # fmt: skip
    if started is not None:
        record, rows = done_rows(run, round, stage, started=started, **fields)
        upsert(table, rows, insert=False)
        return record
    record = _done_fields(run, round, stage, **fields)
    exists = table.count_rows(filters.id_is(record["id"])) > 0
    upsert(table, to_table([record], RoundStage, partial=exists), insert=not exists)
    return stage_status(table, run, round)[stage]


def done_rows(run: str, round: int, stage: str, *, started: dict, **fields) -> tuple[dict, pa.Table]:
    """The completion record of `stage_done` over the running record `started` (the row exists), as `stage_status`
    reads it, and the rows that write it (an update); fields: those of `stage_done`."""
    record = _done_fields(run, round, stage, **fields)
    whole = _decoded([{**{f: None for f in RoundStage.model_fields}, **started, **record}])[0]
    return whole, to_table([record], RoundStage, partial=True)


def _done_fields(run: str, round: int, stage: str, *, counts: dict, seconds: float, store_version: int | None,
                 metrics: dict | None = None, gate: dict | None = None, message: str = "") -> dict:  # fmt: skip
    return {
        "id": stage_id(run, round, stage), "run": run, "round": round, "stage": stage, "status": "done",
        "finished_at": utcnow(), "seconds": float(seconds), "store_version": store_version,
        "counts": _dumps(counts, "counts"), "metrics": _dumps(metrics or {}, "metrics"),
        "gate": None if gate is None else _dumps(gate, "gate"), "message": message,
    }  # fmt: skip


def stage_failed(table: Table, run: str, round: int, stage: str, message: str) -> dict:
    """Mark (run, round, stage) failed with the error text; a later run retries it. Returns the fields written."""
    record = {"id": stage_id(run, round, stage), "run": run, "round": round, "stage": stage, "status": "failed",
              "finished_at": utcnow(), "message": str(message)[:10_000]}  # fmt: skip
    exists = table.count_rows(filters.id_is(record["id"])) > 0
    upsert(table, to_table([record], RoundStage, partial=exists), insert=not exists)
    return record


def stage_status(table: Table, run: str, round: int) -> dict[str, dict]:
    """stage -> its record (JSON fields decoded) for every stage of (run, round) seen so far."""
    return _ordered(_decoded(scan(table, filters.round_is(run, round)).to_pylist()))


def _ordered(rows: list[dict]) -> dict[str, dict]:
    return {row["stage"]: row for row in sorted(rows, key=lambda r: r["started_at"] or r["finished_at"])}


def with_written(status: dict[str, dict], written: dict, *, whole: bool = False) -> dict[str, dict]:
    """`status` (as stage_status reads it) after a commit of one record: with `whole`, the stage's whole record as
    stage_status reads it (stage_done's return value); else the fields as stage_started or stage_failed wrote them,
    which go over the stage's previous record, or over the table's defaults when it had none (a new row takes
    RoundStage's defaults for the fields it was not given)."""
    record = written
    if not whole:
        previous = status.get(written["stage"])
        base = previous if previous is not None else _decoded([dict(_DEFAULTS)])[0]
        given = _decoded([{**{f: None for f in JSON_FIELDS}, **written}])[0]  # JSON fields it wrote, decoded
        record = {**base, **{k: given[k] for k in written}}
    return _ordered([*(r for stage, r in status.items() if stage != written["stage"]), record])


_DEFAULTS = {name: (None if info.is_required() else info.default) for name, info in RoundStage.model_fields.items()}


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
