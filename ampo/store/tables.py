"""Opening tables, upserting and scanning: the three LanceDB calls every table of the store shares."""

from __future__ import annotations

import logging

import pyarrow as pa
from lancedb.db import DBConnection
from lancedb.pydantic import LanceModel
from lancedb.table import Table

log = logging.getLogger(__name__)


class StoreConflictError(RuntimeError):
    """A commit lost to a concurrent writer after LanceDB's own retries: two writers touched one table."""


def open_table(db: DBConnection, name: str, model: type[LanceModel]) -> Table:
    """Open table `name`, creating it empty with `model`'s schema; a different existing schema is an error.

    One change is applied instead: a table written before `model` gained nullable columns at its end gets those
    columns, all null, in one commit (old rows read them as None; nothing else changes).
    """
    expected = model.to_arrow_schema()
    try:
        table = db.open_table(name)
    except ValueError:  # "Table ... was not found"
        return db.create_table(name, schema=expected, exist_ok=True)  # exist_ok: a concurrent creator wins
    added = _added_columns(table.schema, expected)
    if added:
        log.info("table %s: adding the column(s) %s (null in existing rows)", name, [f.name for f in added])
        try:
            table.add_columns(added)
        except (OSError, RuntimeError, ValueError) as err:  # a concurrent opener added them first
            if _added_columns(table.schema, expected) == added:
                raise
            log.debug("columns of %s added concurrently: %s", name, err)
    _check_schema(name, table.schema, expected)
    return table


def _added_columns(found: pa.Schema, expected: pa.Schema) -> list[pa.Field]:
    """The nullable fields `expected` has after all of `found`'s (same names, in order); [] if it differs otherwise."""
    n = len(found)
    if n >= len(expected) or found.names != expected.names[:n]:
        return []
    rest = list(expected)[n:]
    return rest if all(f.nullable for f in rest) else []


def _check_schema(name: str, found: pa.Schema, expected: pa.Schema) -> None:
    def fields(schema):
        return [(f.name, str(f.type), f.nullable) for f in schema]

    if fields(found) != fields(expected):
        diff = sorted(set(fields(found)) ^ set(fields(expected)))
        raise ValueError(
            f"table {name!r} exists with a different schema (differences: {diff}); "
            f"was it written with another embedding dim or ampo version? Use a new store uri for this run."
        )


def upsert(table: Table, data: pa.Table, *, insert: bool = True, where: str | None = None):
    """One merge_insert on "id": update matched rows (only the columns in `data`), insert new ones if `insert`.

    One call is one commit. LanceDB retries commits that race with another writer (MergeResult.num_attempts);
    a conflict it cannot resolve raises StoreConflictError. `where` (a filter over `source.` and `target.`
    columns, built from checked values only) limits which matched rows are updated, within the same commit.
    """
    builder = table.merge_insert("id").when_matched_update_all(where=where)
    if insert:
        builder = builder.when_not_matched_insert_all()
    try:
        result = builder.execute(
            data, on_bad_vectors="null"
        )  # keeps null vectors null; to_table refused NaNs
    except (OSError, RuntimeError) as err:
        if "conflict" in str(err).lower():
            raise StoreConflictError(
                f"commit to table {table.name!r} conflicted with a concurrent writer: run one writer per table "
                f"per stage ({err})"
            ) from err
        raise
    if result.num_attempts > 1:
        log.info("commit to %s took %d attempts (concurrent writer)", table.name, result.num_attempts)
    return result


def scan(table: Table, where: str, columns: list[str] | None = None) -> pa.Table:
    """Rows matching the filter `where` (built by ampo.store.filters), only `columns`, as Arrow."""
    query = table.search()
    if where:
        query = query.where(where)
    if columns is not None:
        query = query.select(columns)
    return query.limit(None).to_arrow()
