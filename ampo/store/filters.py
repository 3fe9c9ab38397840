"""Store filters built only from validated values: user text never becomes SQL.

Every value goes through a check (run ids match RUN_ID_PATTERN, prompt ids PROMPT_ID_PATTERN, ints are ints) and
then into a LanceDB `lit(...)` literal, which quotes it; the helpers return SQL strings for `where` / `count_rows`.
Constant fragments such as "reward IS NOT NULL" are written here, never taken from input.
"""

from __future__ import annotations

import re

from lancedb.expr import col, lit

from ampo.config import validate_run_id
from ampo.schema import check_prompt_id, check_round

# Row, stage and checkpoint ids: the characters of run ids and prompt ids plus the "/" that joins them. No quote
# and no backslash: LanceDB's lit() doubles a quote but leaves a backslash before it, which ends the string.
ID_PATTERN = r"^[A-Za-z0-9_.:+=@/-]{1,512}$"


def run_is(run: str) -> str:
    return (col("run") == lit(validate_run_id(run))).to_sql()


def round_is(run: str, round: int) -> str:
    """Rows of one (run, round)."""
    return all_of(run_is(run), (col("round") == lit(check_round(round))).to_sql())


def prompt_is(prompt_id: str) -> str:
    return (col("prompt_id") == lit(check_prompt_id(prompt_id))).to_sql()


def selected_is(selected: bool) -> str:
    if not isinstance(selected, bool):
        raise ValueError(f"selected must be True or False, got {selected!r}")
    return (col("selected") == lit(selected)).to_sql()


def id_is(row_id: str) -> str:
    return (col("id") == lit(check_id(row_id))).to_sql()


def all_of(*parts: str | None) -> str:
    """AND of the given filter strings (each made by this module); None parts are skipped."""
    kept = [p for p in parts if p]
    return " AND ".join(f"({p})" for p in kept)


def check_id(row_id: str) -> str:
    if not isinstance(row_id, str) or not re.fullmatch(ID_PATTERN, row_id):
        raise ValueError(f"id {row_id!r} must be 1-512 characters from A-Z a-z 0-9 _ . : + = @ / -")
    return row_id


USABLE = "dropped_reason IS NULL AND reward IS NOT NULL"  # rows a selector may use
EMBEDDED = "vector IS NOT NULL"
NOT_EMBEDDED = "vector IS NULL"
