"""The `checkpoints` table: typed upsert and reads, and the one-commit champion swap.

Promotion logic lives in ampo.gates and ampo.stages.promote; this module only keeps the invariant that a run
has at most one champion: status "champion" is written only by `set_champion`, whose single merge_insert promotes
the new checkpoint and retires the old champion in the same commit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from lancedb.table import Table

from ampo.config import validate_run_id
from ampo.schema import CHECKPOINT_STATUSES, Checkpoint, check_choice, utcnow
from ampo.store import filters
from ampo.store.rows import to_table
from ampo.store.tables import scan, upsert


def upsert_checkpoint(table: Table, record: Mapping) -> int:
    """Insert or update one checkpoint (given columns only when it exists); returns the table version.

    `metrics` may be a dict (stored as JSON). Status "champion" is refused here: use set_champion.
    """
    record = dict(record)
    filters.check_id(record.get("id"))
    if "run" in record:
        validate_run_id(record["run"])
    if record.get("status") == "champion":
        raise ValueError(f"checkpoint {record['id']!r}: status 'champion' is set only by set_champion")
    if "status" in record:
        check_choice(record["status"], CHECKPOINT_STATUSES, "checkpoint status")
    if isinstance(record.get("metrics"), dict):
        record["metrics"] = json.dumps(record["metrics"], sort_keys=True)
    existing = get_checkpoint(table, record["id"])
    if existing is not None and existing["status"] == "champion" and record.get("status", "champion") != "champion":
        raise ValueError(f"checkpoint {record['id']!r} is the champion of run {existing['run']!r}; its status "
                         f"changes only through set_champion (promote or `ampo rollback` to another checkpoint)")
    exists = existing is not None
    return upsert(table, to_table([record], Checkpoint, partial=exists), insert=not exists).version


def get_checkpoint(table: Table, checkpoint_id: str) -> dict | None:
    """One checkpoint's row (metrics decoded), or None."""
    rows = scan(table, filters.id_is(checkpoint_id)).to_pylist()
    return _decoded(rows[0]) if rows else None


def list_checkpoints(table: Table, run: str | None = None) -> list[dict]:
    """All checkpoints (of one run), oldest round first."""
    rows = scan(table, filters.run_is(run) if run is not None else "").to_pylist()
    return [_decoded(r) for r in sorted(rows, key=lambda r: (r["run"], r["round"], r["created_at"]))]


def champion(table: Table, run: str) -> dict | None:
    """The run's champion checkpoint, or None before the first promotion."""
    rows = scan(table, filters.all_of(filters.run_is(run), "status = 'champion'")).to_pylist()
    if len(rows) > 1:
        raise RuntimeError(
            f"run {run!r} has {len(rows)} champions {[r['id'] for r in rows]}: concurrent promotion?"
        )
    return _decoded(rows[0]) if rows else None


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()  # set_champion(expected=ANY): swap whatever the current champion is

# Each row of a swap is updated only if its stored status is still the one the swap was built from: the new
# champion is not the champion yet, the one it retires still is. Evaluated by the merge itself, in its commit.
_SWAP_GUARD = ("(source.status = 'champion' AND target.status <> 'champion') OR "
               "(source.status = 'retired' AND target.status = 'champion')")


def set_champion(table: Table, run: str, checkpoint_id: str, *, expected: str | None | _Any = ANY) -> int:
    """Promote `checkpoint_id` and retire the run's current champion in ONE merge_insert (one commit).

    `expected` is the champion the caller compared the candidate with (a checkpoint id, or None for "no champion
    yet"): if the run's champion is another one now, the swap is refused (ValueError) and nothing is written. The
    merge itself re-checks each row's status (`_SWAP_GUARD`), so a champion changed between the read and the
    commit updates fewer rows: that swap is undone and refused too. Writers of the champion hold the run lock
    (ampo.runlock), which makes that second case a guard, not a path.

    Returns the table version. The checkpoint must exist and belong to `run`; promoting the current champion
    again writes nothing (a re-run promote stage is harmless).
    """
    target = get_checkpoint(table, checkpoint_id)
    if target is None or target["run"] != validate_run_id(run):
        raise ValueError(f"checkpoint {checkpoint_id!r} not found in run {run!r}; upsert it first")
    current = champion(table, run)
    if current is not None and current["id"] == checkpoint_id:
        return table.version
    current_id = None if current is None else current["id"]
    if expected is not ANY and expected != current_id:
        raise ValueError(f"refusing to make {checkpoint_id!r} the champion of run {run!r}: it was compared with "
                         f"{expected!r}, but the champion is now {current_id!r}. Roll back to {expected!r} "
                         f"(`ampo rollback --to {expected}`) to promote it, or start a new round")
    rows = [{"id": checkpoint_id, "status": "champion", "promoted_at": utcnow()}]
    if current is not None:
        rows.append({"id": current["id"], "status": "retired", "promoted_at": current["promoted_at"]})
    result = upsert(table, to_table(rows, Checkpoint, partial=True), insert=False, where=_SWAP_GUARD)
    if result.num_updated_rows != len(rows):
        _undo_partial_swap(table, target, run)
        raise ValueError(f"champion swap in run {run!r} updated {result.num_updated_rows} of {len(rows)} rows: "
                         f"the champion changed while {checkpoint_id!r} was being promoted (now "
                         f"{(champion(table, run) or {}).get('id')!r}); nothing was promoted")
    return result.version


def _undo_partial_swap(table: Table, before: dict, run: str) -> None:
    """After a swap whose old champion had changed: put the would-be champion back as it was, if it changed."""
    now = get_checkpoint(table, before["id"])
    if now is not None and now["status"] == "champion" and before["status"] != "champion":
        restore = [{"id": before["id"], "status": before["status"], "promoted_at": before["promoted_at"]}]
        upsert(table, to_table(restore, Checkpoint, partial=True), insert=False, where="target.status = 'champion'")


def _decoded(row: dict) -> dict:
    row["metrics"] = json.loads(row["metrics"])
    return row
