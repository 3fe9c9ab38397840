"""`Store`: the connection to a run's LanceDB folder (or object-store URI) and every write the pipeline makes."""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import timedelta

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import Bitmap, BTree

from ampo.config import RUN_ID_PATTERN, validate_run_id
from ampo.schema import (
    CANDIDATE_KEY,
    EMBED_DIM,
    PROMPT_ID_PATTERN,
    ROLES,
    Checkpoint,
    RoundStage,
    candidate_ids,
    check_choice,
    check_round,
    make_candidate_model,
)
from ampo.store import checkpoint_records, filters, stage_records
from ampo.store.candidates import CandidatesView
from ampo.store.rows import Rows, to_table
from ampo.store.tables import open_table, scan, upsert

log = logging.getLogger(__name__)

INDEX_MIN_ROWS = (
    100_000  # below this a scan beats an index (and index builds cost seconds); see docs/store.md
)
KEY_COLUMNS = ("id", *CANDIDATE_KEY)  # fixed once a candidate is written
NO_PRUNING = timedelta(days=36_500)  # optimize() never deletes versions: tagged rounds must stay readable


def _on_latest(read):
    """A CandidatesView read, offered by Store on the latest version of the candidates table."""

    @functools.wraps(read)
    def on_latest(self, *args, **kwargs):
        return read(self.latest, *args, **kwargs)

    return on_latest


class Store:
    """The store of one or more runs: tables `candidates`, `rounds`, `checkpoints` under `uri`.

    `uri` is a local folder or an object-store URI (s3://, gs://, az://), passed to lancedb.connect unchanged.
    Every read sees the latest commit of any process (read_consistency_interval=0). One writer per table per stage.

    Its methods are the whole API: no caller reads a table itself. The parts it is made of: `latest`, a
    CandidatesView of the candidates table (the reads below run on it; `checkout_round` gives one at a tag), and the
    `rounds` and `checkpoints` tables, through ampo.store.stage_records and ampo.store.checkpoint_records.
    """

    def __init__(self, uri: str, dim: int = EMBED_DIM, *, storage_options: dict | None = None):
        self.uri = str(uri)
        self.db = lancedb.connect(
            self.uri, read_consistency_interval=timedelta(0), storage_options=storage_options
        )
        self.model = make_candidate_model(dim)
        self.candidates = open_table(self.db, "candidates", self.model)
        self.rounds = open_table(self.db, "rounds", RoundStage)
        self.checkpoints = open_table(self.db, "checkpoints", Checkpoint)
        self.dim = dim
        self.latest = CandidatesView(self.candidates, dim)
        self._stage_status: dict[tuple[str, int], tuple[int, dict]] = {}  # (run, round) -> (rounds version, status)
        self._pending: list[tuple] = []  # stage records committing in the background, in order (see stage_started)
        self._pending_status: dict[tuple[str, int], dict] = {}  # (run, round) -> status with its pending records
        self._pending_from = -1  # the rounds version the status copies had when the first pending record was given
        self._failed_commit = False
        self._writer: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"Store({self.uri!r}, dim={self.dim})"

    # -- candidates: reads of the latest version (see CandidatesView) ------------------------------------------

    @property
    def version(self) -> int:
        """The candidates table's current version."""
        return self.candidates.version

    count = _on_latest(CandidatesView.count)
    read_pools = _on_latest(CandidatesView.read_pools)
    read_rows = _on_latest(CandidatesView.read_rows)
    prompt_pool = _on_latest(CandidatesView.prompt_pool)
    selected_groups = _on_latest(CandidatesView.selected_groups)
    neighbours = _on_latest(CandidatesView.neighbours)
    neighbours_of_row = _on_latest(CandidatesView.neighbours_of_row)

    # -- candidates: writes -----------------------------------------------------------------------------------

    def upsert_candidates(self, rows: Rows) -> int:
        """Insert or replace whole candidate rows (missing columns take their defaults); returns the version.

        Ids must be "{run}/{round}/{prompt_id}/{sample}" of the row's own columns and unique within `rows`.
        Upserting the same rows twice leaves one copy of each.
        """
        self.settle()
        table = to_table(rows, self.model)
        if table.num_rows == 0:
            return self.version
        _check_candidate_keys(table)
        _check_roles(table)
        return upsert(self.candidates, table).version

    def update_candidates(self, ids: Sequence[str] | np.ndarray | pa.Array, **columns) -> int:
        """Set `columns` (each one value per id, e.g. reward=(n,), vector=(n, d)) on existing rows; returns the version.

        Only the named columns change. Ids not in the table raise ValueError (after the known ones were written).
        """
        self.settle()
        protected = sorted(set(columns) & set(KEY_COLUMNS))
        if protected or not columns:
            raise ValueError(
                f"update_candidates sets non-key columns; got {sorted(columns)} (keys: {KEY_COLUMNS})"
            )
        table = to_table({"id": ids, **columns}, self.model, partial=True)
        if table.num_rows == 0:
            return self.version
        _check_unique(table["id"])
        _check_roles(table)
        result = upsert(self.candidates, table, insert=False)
        if result.num_updated_rows != table.num_rows:
            raise ValueError(
                f"{table.num_rows - result.num_updated_rows} of {table.num_rows} ids are not candidates"
            )
        return result.version

    def set_selection(
        self,
        run: str,
        round: int,
        ids: Sequence[str],
        roles: Sequence[str],
        *,
        selector: str,
        clusters: Sequence[int | None] | None = None,
    ) -> int:
        """Make `ids` the round's whole selection in one commit: earlier picks not in `ids` are cleared.

        roles: "chosen" or "rejected" per id. Returns the version. A re-run select stage replaces, never adds.
        """
        prefix = f"{validate_run_id(run)}/{check_round(round)}/"
        ids = pa.array(ids, pa.string())
        if len(ids) and not pc.all(pc.starts_with(ids, prefix)).as_py():
            raise ValueError(f"selected ids must belong to run {run!r} round {round} (start with {prefix!r})")
        previous = scan(
            self.candidates, filters.all_of(filters.round_is(run, round), filters.selected_is(True)), ["id"]
        )
        cleared = pc.filter(previous["id"], pc.invert(pc.is_in(previous["id"], value_set=ids)))
        n, m = len(ids), len(cleared)
        update = {
            "id": pa.concat_arrays([ids, cleared.combine_chunks().cast(pa.string())]),
            "selected": [True] * n + [False] * m,
            "role": list(roles) + [""] * m,
            "selector": [selector] * n + [""] * m,
            "cluster": (list(clusters) if clusters is not None else [None] * n) + [None] * m,
        }
        if any(r not in ("chosen", "rejected") for r in update["role"][:n]):
            raise ValueError(f"roles must be 'chosen' or 'rejected', got {sorted(set(update['role'][:n]))}")
        return self.update_candidates(update.pop("id"), **update)

    # -- stages (the `rounds` table) ---------------------------------------------------------------------------
    #
    # A stage record can commit in the background (background=True, as run_stage asks for when a flow runs the round):
    # the call returns the record at once, and the commits run in order on one thread of this Store. Every other write
    # of the Store, and every read of the rounds table but stage_status of that round, first waits for them (`settle`).
    # So the order of durable writes is the synchronous one (a stage's data, its done record, the next stage's running
    # record, its data), while the commits overlap with work that writes nothing (the next stage loading its models).

    def stage_started(self, run: str, round: int, stage: str, *, previous=stage_records.UNREAD,
                      background: bool = False) -> dict:  # fmt: skip
        """Mark the stage running (one commit); `previous`: its record as read by the caller (None: it has none).
        background: commit in the background (see above) when `previous` is given and this round's status is known."""
        if background and self._failed_before():
            self.settle()  # an earlier stage's record is written again (or its error raised) before this stage works
        if background and previous is not stage_records.UNREAD and self._status_known(run, round):
            record, rows, insert = stage_records.started_rows(run, round, stage, previous)
            self._commit_later(run, round, record, rows, insert)
            return record
        self.settle()
        known = self._known_status(run, round)
        record = stage_records.stage_started(self.rounds, run, round, stage, previous=previous)
        self._wrote(run, round, known, record)
        return record

    def stage_done(self, run: str, round: int, stage: str, counts: dict, seconds: float, *,
                   background: bool = False, **extra) -> dict:  # fmt: skip
        """Completion record of a stage, written last with the candidates version; extra: metrics, gate, message, and
        started (stage_started's record: no read besides the version). background: commit in the background (see
        above) when `started` is given and this round's status is known."""
        fields = dict(counts=counts, seconds=seconds, store_version=self.version, **extra)  # the version: its data
        if background and extra.get("started") is not None and self._status_known(run, round):
            record, rows = stage_records.done_rows(run, round, stage, **fields)
            self._commit_later(run, round, record, rows, False, whole=True)
            return record
        self.settle()
        known = self._known_status(run, round)
        record = stage_records.stage_done(self.rounds, run, round, stage, **fields)
        self._wrote(run, round, known, record, whole=True)
        return record

    def stage_failed(self, run: str, round: int, stage: str, message: str) -> None:
        self.settle()
        known = self._known_status(run, round)
        self._wrote(run, round, known, stage_records.stage_failed(self.rounds, run, round, stage, message))

    def stage_status(self, run: str, round: int) -> dict[str, dict]:
        """stage -> its record for every stage of (run, round) seen so far (stage_records.stage_status).

        The records as this process last read or wrote them, when the `rounds` table's version shows no commit since
        (one version check instead of a scan; any other writer's commit changes the version, and the table is read
        again). While records of this process commit in the background: with them (for their round), or as read
        before them (another round), without waiting."""
        key = (run, round)
        if self._pending:
            if key in self._pending_status:
                return copy.deepcopy(self._pending_status[key])
            known = self._stage_status.get(key)
            if known is not None and known[0] == self._pending_from:  # the pending commits write other rounds
                return copy.deepcopy(known[1])
            self.settle()
        version = self.rounds.version
        known = self._stage_status.get(key)
        if known is None or known[0] != version:
            known = version, stage_records.stage_status(self.rounds, run, round)  # read at `version` or later
            self._stage_status[key] = known
        return copy.deepcopy(known[1])

    def settle(self) -> None:
        """Wait until the stage records committing in the background are written, in order. A record whose commit
        failed (or was not tried after an earlier failure) is written again here; if that fails too, the error is
        raised, and that record and the ones after it stay pending, in order: the next settle tries them again (a
        retried stage task), and stage_status of their round still answers with them."""
        written = 0
        try:
            for job, (run, round), record, rows, insert, whole in self._pending:
                try:
                    version = job.result()
                except Exception as err:  # noqa: BLE001 - written again below; its second failure is raised
                    log.info("stage record %s: the background commit failed (%s); writing it again", record["id"],
                             err)  # fmt: skip
                    version = upsert(self.rounds, rows, insert=insert).version
                self._wrote(run, round, self._known_status(run, round), record, whole=whole, version=version)
                written += 1
        except BaseException:
            wait([job for job, *_ in self._pending])  # the later ones end at once: they are not tried after a failure
            del self._pending[:written]
            self._stage_status.clear()  # read again when asked
            self._failed_commit = False
            raise
        self._pending.clear()
        self._pending_status.clear()
        self._failed_commit = False

    def _failed_before(self) -> bool:
        """Whether a background commit has already failed (its record waits for settle to write it again)."""
        return any(job.done() and job.exception() is not None for job, *_ in self._pending)

    def _status_known(self, run: str, round: int) -> bool:
        """A record can commit later when its round's status is known (read or written by this process), so that the
        status with it is known too; commits pending for another round are waited for first."""
        if any(key != (run, round) for _, key, *_ in self._pending):
            self.settle()
        return (run, round) in self._pending_status or (run, round) in self._stage_status

    def _commit_later(self, run: str, round: int, record: dict, rows: pa.Table, insert: bool, *, whole=False) -> None:
        key = (run, round)
        if not self._pending:
            self._pending_from = self._stage_status[key][0]
        status = self._pending_status[key] if key in self._pending_status else self._stage_status[key][1]
        self._pending_status[key] = stage_records.with_written(status, record, whole=whole)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ampo-stage-records")
        self._pending.append((self._writer.submit(self._commit, rows, insert), key, record, rows, insert, whole))

    def _commit(self, rows: pa.Table, insert: bool) -> int:
        """On the writer thread: one record's commit, in the order submitted; none after a failure (settle retries)."""
        if self._failed_commit:
            raise RuntimeError("not tried: an earlier stage record's commit failed")
        try:
            return upsert(self.rounds, rows, insert=insert).version
        except BaseException:
            self._failed_commit = True
            raise

    def _known_status(self, run: str, round: int) -> tuple[int, dict] | None:
        return self._stage_status.get((run, round))

    def _wrote(self, run: str, round: int, known: tuple[int, dict] | None, written: dict, *, whole=False,
               version: int | None = None) -> None:  # fmt: skip
        """After one commit of this process (`version`: the table's version it made; by default the current one): when
        the table moved by exactly this commit since the copy of (run, round) (no other writer in between), that copy
        takes the record written, and the copies of other rounds read at the same version stay valid (the commit
        wrote one row of this round); else the copy is dropped (the others no longer match the version, so they are
        read again when asked)."""
        version = self.rounds.version if version is None else version
        if known is not None and version == known[0] + 1:
            for key, (seen, status) in list(self._stage_status.items()):
                if seen == known[0]:
                    self._stage_status[key] = version, status
            self._stage_status[(run, round)] = version, stage_records.with_written(known[1], written, whole=whole)
        else:
            self._stage_status.pop((run, round), None)

    def is_done(self, run: str, round: int, stage: str) -> bool:
        self.settle()
        return stage_records.is_done(self.rounds, run, round, stage)

    def stage_records(self, run: str | None = None) -> list[dict]:
        """Every stage record (JSON fields decoded) of one run, or of all runs, sorted by (run, round)."""
        self.settle()
        return stage_records.stage_records(self.rounds, run)

    # -- tags: a round's data, pinned ----------------------------------------------------------------------------

    def tag_round(self, run: str, round: int) -> str:
        """Tag the candidates table's current version as the end of (run, round); returns the tag name."""
        self.settle()
        tag, version = round_tag(run, round), self.version
        existing = self.candidates.tags.list()
        if tag not in existing:
            self.candidates.tags.create(tag, version)
        elif existing[tag]["version"] != version:
            log.warning("moving tag %s from version %s to %s", tag, existing[tag]["version"], version)
            self.candidates.tags.update(tag, version)
        return tag

    def checkout_round(self, run: str, round: int) -> CandidatesView:
        """A read-only view of the candidates table as it was when (run, round) was tagged."""
        tag = round_tag(run, round)
        if tag not in self.candidates.tags.list():
            raise ValueError(
                f"run {run!r} round {round} has no tag {tag!r}; tagged: {sorted(self.candidates.tags.list())}"
            )
        table = self.db.open_table("candidates")
        table.checkout(tag)
        return CandidatesView(table, self.dim)

    # -- checkpoints --------------------------------------------------------------------------------------------

    def upsert_checkpoint(self, record: Mapping) -> int:
        self.settle()
        return checkpoint_records.upsert_checkpoint(self.checkpoints, record)

    def get_checkpoint(self, checkpoint_id: str) -> dict | None:
        return checkpoint_records.get_checkpoint(self.checkpoints, checkpoint_id)

    def list_checkpoints(self, run: str | None = None) -> list[dict]:
        return checkpoint_records.list_checkpoints(self.checkpoints, run)

    def champion(self, run: str) -> dict | None:
        return checkpoint_records.champion(self.checkpoints, run)

    def set_champion(self, run: str, checkpoint_id: str, *, expected=checkpoint_records.ANY) -> int:
        self.settle()
        return checkpoint_records.set_champion(self.checkpoints, run, checkpoint_id, expected=expected)

    # -- maintenance ---------------------------------------------------------------------------------------------

    def optimize(self, *, index_min_rows: int = INDEX_MIN_ROWS, min_rows: int = 0) -> list[str] | None:
        """Compact small files, update indexes, and index id / run / round once the table has index_min_rows.

        Returns the columns indexed by this call; None, having done nothing, when the table has fewer than
        `min_rows` rows (the end of a round passes INDEX_MIN_ROWS: a small store gains nothing worth a commit).
        Never prunes versions (tags keep old rounds readable).
        """
        self.settle()
        rows = self.candidates.count_rows()
        if rows < min_rows:
            return None
        created = []
        if rows >= index_min_rows:
            have = {c for index in self.candidates.list_indices() for c in index.columns}
            for column, config in (("id", BTree()), ("run", Bitmap()), ("round", Bitmap())):
                if column not in have:
                    self.candidates.create_index(column, config=config, replace=False)
                    created.append(column)
        self.candidates.optimize(cleanup_older_than=NO_PRUNING)
        return created


def store_exists(uri: str, *, storage_options: dict | None = None) -> bool:
    """Whether a store was written at `uri` (it has the `rounds` table); creates nothing. For read-only commands on
    an object-store URI, where no folder can be checked (opening a Store creates its empty tables)."""
    db = lancedb.connect(str(uri), storage_options=storage_options)
    return "rounds" in db.list_tables().tables


def round_tag(run: str, round: int) -> str:
    """Tag name of (run, round): "{run}-r{round}" in the tag charset (a run id with '..' gets a hash suffix)."""
    run, round = validate_run_id(run), check_round(round)
    if ".." in run:  # tags may not contain '..'; keep names distinct with a hash of the original id
        run = f"{run.replace('.', '_')}-{hashlib.sha1(run.encode()).hexdigest()[:8]}"
    return f"{run}-r{round}"


def _check_candidate_keys(table: pa.Table) -> None:
    """Ids equal `candidate_ids` of their key columns, runs and prompt ids match their patterns, ids are unique."""
    for column, pattern in (("run", RUN_ID_PATTERN), ("prompt_id", PROMPT_ID_PATTERN)):
        bad = pc.invert(pc.match_substring_regex(table[column], pattern))
        if pc.any(bad).as_py():
            raise ValueError(f"{column} {table[column].filter(bad)[0].as_py()!r} must match {pattern}")
    for column in ("round", "sample"):
        if pc.min(table[column]).as_py() < 0:
            raise ValueError(f"{column} must be >= 0, got {pc.min(table[column]).as_py()}")
    expected = candidate_ids(table)
    bad = pc.not_equal(table["id"], expected)
    if pc.any(bad).as_py():
        first = pc.index(bad, True).as_py()
        raise ValueError(
            f"id {table['id'][first].as_py()!r} must be run/round/prompt_id/sample = {expected[first]!r}"
        )
    _check_unique(table["id"])


def _check_unique(ids: pa.ChunkedArray) -> None:
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise ValueError(f"ids must be unique within one write; {dup!r} repeats")


def _check_roles(table: pa.Table) -> None:
    if "role" in table.column_names:
        bad = pc.invert(pc.is_in(table["role"], value_set=pa.array(ROLES)))
        if pc.any(bad).as_py():
            check_choice(table["role"].filter(bad)[0].as_py(), ROLES, "role")
