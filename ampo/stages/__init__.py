"""The stages of a self-play round and the runner that makes each one idempotent and resumable.

generate -> score -> embed -> select -> reflogps -> train -> evaluate -> promote

`run_stage` skips a stage whose completion record exists, refuses one whose predecessor has not finished, marks
it running, runs it, and writes the completion record last (ampo.store). `run_stage_isolated` runs the GPU stages
in a child process when the config asks for it, so that the child's exit returns all accelerator memory.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable

from ampo.config import RunConfig, validate_run_id
from ampo.runlock import INHERITED_ENV, held_lock_fd
from ampo.schema import STAGES, check_int
from ampo.stages.context import (
    Progress,
    RoundContext,
    StageResult,
    fix_start,
    open_store,
    own_store,
    round_dir,
    run_dir,
    write_json_atomic,
)
from ampo.stages.data import embed, generate, score, select
from ampo.stages.evaluate import evaluate
from ampo.stages.learn import reflogps, train
from ampo.stages.promote import promote
from ampo.stages.report import is_reported, mark_reported, round_outcome, selection_report, write_round_report
from ampo.store import INDEX_MIN_ROWS, Store

log = logging.getLogger(__name__)

STAGE_FUNCTIONS: dict[str, Callable[[RoundContext], dict | StageResult]] = {
    "generate": generate,
    "score": score,
    "embed": embed,
    "select": select,
    "reflogps": reflogps,
    "train": train,
    "evaluate": evaluate,
    "promote": promote,
}
assert tuple(STAGE_FUNCTIONS) == STAGES, "the stage table and the schema's stage order must agree"
ISOLATED_STAGES = frozenset({"generate", "score", "embed", "reflogps", "train", "evaluate"})  # load models

__all__ = ["STAGES", "STAGE_FUNCTIONS", "StageProcessError", "StageResult", "check_round_order", "is_transient",
           "mark_reported", "next_round", "own_store", "round_dir", "round_outcome", "run_stage", "run_stage_isolated",
           "selection_report", "write_round_report"]  # fmt: skip


def run_stage(name: str, cfg: RunConfig, run: str, round_: int, *, force: bool = False,
              progress: Progress | None = None, records_in_background: bool = False) -> dict:  # fmt: skip
    """Run one stage of (run, round) in this process unless it already finished; returns its stage record.

    records_in_background: the stage's running and done records commit in the background (Store.stage_started): the
    done record may still be committing when this returns, and the store's next write waits for it (the round's
    flow, whose next stage has work to do before it writes). The last stage waits for its record either way."""
    if name not in STAGE_FUNCTIONS:
        raise ValueError(f"unknown stage {name!r}; choose from {list(STAGES)}")
    validate_run_id(run)
    check_stage_round(round_)
    store = open_store(cfg)
    status = store.stage_status(run, round_)
    if not force and status.get(name, {}).get("status") == "done":
        return {**status[name], "skipped": True}
    check_round_order(cfg, run, round_)
    before = STAGES[: STAGES.index(name)]
    missing = [s for s in before if status.get(s, {}).get("status") != "done"]
    if missing:
        raise ValueError(f"stage {name!r} of run {run!r} round {round_} needs {missing} to finish first")
    ctx = RoundContext(cfg, run, round_, store, progress)
    started = store.stage_started(run, round_, name, previous=status.get(name), background=records_in_background)
    start = time.perf_counter()
    try:
        ctx.started_from = fix_start(ctx)  # the round's first step, for real before generate; later stages reread it
        result = STAGE_FUNCTIONS[name](ctx)
    except BaseException as exc:
        try:
            store.stage_failed(run, round_, name, f"{type(exc).__name__}: {exc}")
        except Exception as record_error:  # noqa: BLE001 - the stage's own error is the one to raise (and retry by)
            log.warning("stage %s of run %r round %d: its failure could not be recorded (%s: %s)", name, run, round_,
                        type(record_error).__name__, record_error)  # fmt: skip
        raise
    if not isinstance(result, StageResult):
        result = StageResult(result)
    record = store.stage_done(run, round_, name, result.counts, time.perf_counter() - start,
                              metrics=result.metrics, gate=result.gate, started=started,
                              background=records_in_background)  # fmt: skip
    if name == STAGES[-1]:
        store.settle()  # the round is complete
        optimize_store(store)
    return {**record, "skipped": False}


OPTIMIZE_MIN_ROWS = INDEX_MIN_ROWS  # a store this large is compacted and indexed at the end of each round


def optimize_store(store: Store) -> list[str] | None:
    """End of a round: compact the candidates table and build its id / run / round indexes, once it holds
    OPTIMIZE_MIN_ROWS rows (below that a scan beats an index: docs/store.md); a smaller store is left alone.

    Returns the columns indexed now, or None when skipped. The round is already recorded as done, so a failure here
    is logged and left to the next round's end, which tries again."""
    try:
        created = store.optimize(min_rows=OPTIMIZE_MIN_ROWS, index_min_rows=OPTIMIZE_MIN_ROWS)
    except (OSError, RuntimeError) as err:
        log.warning("store optimize after the round failed (the next round's end retries): %s", err)
        return None
    if created:
        log.info("store: indexed %s", ", ".join(created))
    return created


def run_stage_isolated(name: str, cfg: RunConfig, run: str, round_: int, *, progress: Progress | None = None,
                       records_in_background: bool = False) -> dict:  # fmt: skip
    """`run_stage`, in a child process (`python -m ampo.stages.child`) when cfg.runtime.stage_isolation is "subprocess"
    (whose records are written before it exits); records_in_background: as in run_stage, for a stage in this process."""
    if cfg.runtime.stage_isolation == "inprocess" or name not in ISOLATED_STAGES:
        return run_stage(name, cfg, run, round_, progress=progress, records_in_background=records_in_background)
    store = open_store(cfg)
    if store.is_done(run, round_, name):
        return {**store.stage_status(run, round_)[name], "skipped": True}
    config_path = write_json_atomic(run_dir(cfg, run) / "config.json", cfg.model_dump(mode="json"))
    cmd = [sys.executable, "-m", "ampo.stages.child", name, "--config", str(config_path), "--run", run,
           "--round", str(round_)]  # fmt: skip
    lock_fd = held_lock_fd(run)  # the child shares the run's lock: it stays locked while the child lives
    env = None if lock_fd is None else {**os.environ, INHERITED_ENV: run}
    proc = subprocess.run(cmd, check=False, pass_fds=() if lock_fd is None else (lock_fd,), env=env)
    if proc.returncode != 0:
        message = store.stage_status(run, round_).get(name, {}).get("message") or "see its log above"
        error = TransientStageError if proc.returncode == TRANSIENT_EXIT else StageProcessError
        raise error(f"stage {name!r} failed in its process (exit {proc.returncode}): {message}")
    return {**store.stage_status(run, round_)[name], "skipped": False}


class StageProcessError(RuntimeError):
    """A stage run in a child process exited with an error."""


class TransientStageError(StageProcessError):
    """The child process failed with an error a retry can fix (it exited with TRANSIENT_EXIT)."""


TRANSIENT_EXIT = 75  # EX_TEMPFAIL: `ampo stage` exits with it when the error is transient (is_transient)


def check_stage_round(round_: int) -> int:
    """A round a stage can run in: an int >= 0 (-1 only names the initial policy in the registry)."""
    return check_int(round_, "round", minimum=0)


def next_round(cfg: RunConfig, run: str) -> int:
    """The round to run now: an unfinished round if there is one, else the one after the last finished round.

    A round is finished once its promote stage is done and its report is written (mark_reported, the flow's last
    step): a kill between the two resumes the same round, whose stages are all skipped, and writes the report."""
    validate_run_id(run)
    store = open_store(cfg)
    rows = [r for r in store.stage_records(run) if r["round"] >= 0]  # a store written before rounds < 0 were refused
    if not rows:
        return 0
    last = max(r["round"] for r in rows)
    promoted = any(r["round"] == last and r["stage"] == "promote" and r["status"] == "done" for r in rows)
    return last + 1 if promoted and is_reported(cfg, run, last) else last


def check_round_order(cfg: RunConfig, run: str, round_: int) -> None:
    """Rounds run in order: a stage of round r > 0 runs only once round r-1 is complete (its promote finished).
    Round r starts from the champion that round r-1 left; starting it earlier would train and gate it against a
    champion that the unfinished round may still replace."""
    if round_ == 0:
        return
    previous = open_store(cfg).stage_status(run, round_ - 1).get("promote") or {}
    if previous.get("status") != "done":
        raise ValueError(f"run {run!r} round {round_} cannot start: round {round_ - 1} is not complete (its promote "
                         f"stage has not finished). Rounds run in order; the next round to run is "
                         f"{next_round(cfg, run)} (`ampo round` without --round runs it)")


TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE}


def is_transient(exc: BaseException | object) -> bool:
    """True for errors a retry can fix: timeouts, dropped connections, store commit conflicts. Never OOM or bugs."""
    from ampo.store import StoreConflictError

    if isinstance(exc, StoreConflictError | TimeoutError | ConnectionError | TransientStageError):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS

