"""One thin Prefect task per round stage: call one ampo function, return a small reference (counts, ids)."""

import base64
import contextvars
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ampo import stages
from ampo.config import RunConfig


def is_transient(task, task_run, state) -> bool:
    """Retry only errors that a second attempt can fix (I/O, network, store commit conflicts)."""
    return stages.is_transient(state.result(raise_on_failure=False))


def _stage_task(name: str):
    @task(
        name=name,
        task_run_name=f"{name}-r{{round_}}",
        retries=2,
        retry_delay_seconds=5,
        retry_condition_fn=is_transient,
        cache_policy=NO_CACHE,
        persist_result=False,  # the store is the record; the task returns its stage record for the log only
    )
    def run(config: RunConfig, run_id: str, round_: int) -> dict:
        from ampo.progress import stage_progress

        logger = get_run_logger()
        progress = stage_progress(logger)  # lines in the flow run's log; bars too when run from a terminal
        try:
            with ampo_logs_in_run_log(logger):  # the trainer's step and loss lines, as they come
                record = stages.run_stage_isolated(name, config, run_id, round_, progress=progress,
                                                   records_in_background=True)  # the next stage's writes wait for it
        finally:
            progress.close()
        if record["skipped"]:
            logger.info("%s r%d: skipped, finished before in %.1fs %s", name, round_, record["seconds"],
                        record["counts"])  # fmt: skip
        else:
            logger.info("%s r%d: %s in %.1fs %s", name, round_, record["status"], record["seconds"],
                        record["counts"])  # fmt: skip
        return record

    run.__doc__ = f"Round stage `{name}`: see ampo.stages.{name}."
    return run


STAGE_TASKS = {name: _stage_task(name) for name in stages.STAGES}
generate, score, embed, select, reflogps, train, evaluate, promote = (STAGE_TASKS[n] for n in stages.STAGES)


@task(name="report", cache_policy=NO_CACHE, persist_result=False)
def report(config: RunConfig, run_id: str, round_: int, plots: bool = False) -> dict:
    """Write the round's report files and publish the summary (and with `plots` the plots inline) as Prefect artifacts;
    return the file paths. The round's tables are published when their stages end (StageTables)."""
    from prefect.artifacts import create_markdown_artifact

    files = stages.write_round_report(config, run_id, round_, plots=plots, tables=False)
    key = artifact_key(run_id, round_)
    artifacts = [(create_markdown_artifact, files["markdown_text"], f"{key}-summary", "round summary")]
    if files["plots"]:
        artifacts.append((create_markdown_artifact, plots_markdown(files["plots"]), f"{key}-plots", "round plots"))
    publish_concurrently(artifacts)
    return {k: v for k, v in files.items() if k in ("markdown", "plots")}


def selection_artifacts(key: str, selection: dict) -> list[tuple]:
    """The selection statistics and the selected group per prompt (an empty table when none was selected: each run of
    the round replaces what an earlier attempt published under the key), as table artifacts (function, data, key,
    description) of the round whose artifact key is `key` (selection: stages.selection_report)."""
    from prefect.artifacts import create_table_artifact

    return [(create_table_artifact, selection["table"], f"{key}-selection", "selection statistics"),
            (create_table_artifact, selection["rows"], f"{key}-groups",
             "selected group per prompt: chosen and rejected rewards, excerpts")]  # fmt: skip


def evaluation_artifacts(key: str, metrics: dict) -> list[tuple]:
    """The evaluation metrics (the evaluate stage's record) as a table artifact."""
    from prefect.artifacts import create_table_artifact

    return [(create_table_artifact, metric_rows(metrics), f"{key}-evaluation", "evaluation metrics: champion vs candidate")]


class StageTables:
    """The round's tables, published as Prefect artifacts when their stages end, on a thread, while the next stages
    run: the selection statistics and groups after `select` (read through a Store of its own), the evaluation metrics
    after `evaluate` (from its record). The round waits only for their submission; their work runs beside the next
    stages (on a machine without a core to spare it slows them: docs/deployments.md). Each job runs in a copy of the
    flow run's context (its ids and API client), so the artifacts belong to the flow run.

    Leaving the block waits for every job and logs each job's error in the flow run's log; on a clean exit the first
    is then raised (the round is not marked reported, so the next run resumes it and publishes again), while an
    exception already leaving the block is kept."""

    STAGES = ("select", "evaluate")

    def __init__(self, config: RunConfig, run_id: str, round_: int):
        self.config, self.run_id, self.round_ = config, run_id, round_
        self.key = artifact_key(run_id, round_)
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: list = []

    def __enter__(self) -> Self:
        self._pool = ThreadPoolExecutor(max_workers=len(self.STAGES), thread_name_prefix="ampo-artifacts")
        return self

    def stage_done(self, name: str, record: dict) -> None:
        """After stage `name` returned `record` (run or skipped): publish its tables, if it has any."""
        if name == "select":
            self._submit(lambda: selection_artifacts(
                self.key, stages.selection_report(stages.own_store(self.config), self.run_id, self.round_)))
        elif name == "evaluate":
            self._submit(lambda: evaluation_artifacts(self.key, record.get("metrics") or {}))

    def _submit(self, build) -> None:
        self._jobs.append(self._pool.submit(contextvars.copy_context().run, lambda: publish_concurrently(build())))

    def __exit__(self, exc_type, exc, tb) -> None:
        self._pool.shutdown(wait=True)
        errors = [job.exception() for job in self._jobs if job.exception() is not None]
        for error in errors:
            _run_logger().warning("round artifact not published: %s: %s", type(error).__name__, error)
        if errors and exc is None:
            raise errors[0]


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow or task run's logger (its lines reach the run's log in the UI); this module's outside a run."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def publish_concurrently(artifacts: list[tuple]) -> None:
    """Create the artifacts (function, data, key, description) at the same time, each in this thread's context (one
    copy per thread: the run's ids and its API client); one request's latency instead of the sum. The first error
    is raised once all have ended."""
    with ThreadPoolExecutor(max_workers=len(artifacts)) as pool:
        jobs = [pool.submit(contextvars.copy_context().run, create, data, key=key, description=description)
                for create, data, key, description in artifacts]  # fmt: skip
    for job in jobs:
        job.result()


def artifact_key(run_id: str, round_: int) -> str:
    """Artifact keys allow lowercase letters, digits and dashes."""
    return f"{run_id}-r{round_}".lower().replace("_", "-").replace(".", "-")


def plots_markdown(paths: list[str]) -> str:
    """The PNGs inline as data URIs (the UI cannot read the worker's disk), each under its file name and path."""
    parts = []
    for path in map(Path, paths):
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"### {path.stem}\n\n![{path.stem}](data:image/png;base64,{data})\n\n`{path}`\n")
    return "\n".join(parts)


def metric_rows(metrics: dict, prefix: str = "") -> list[dict]:
    """{"champion": {"mean_reward": {"value": 0.4}}} -> [{"metric": "champion.mean_reward.value", "value": 0.4}];
    floats to 4 significant digits; lists are joined with ', '."""
    rows = []
    for name, value in metrics.items():
        if isinstance(value, dict):
            rows += metric_rows(value, f"{prefix}{name}.")
        elif isinstance(value, list | tuple):
            rows.append({"metric": f"{prefix}{name}", "value": ", ".join(map(str, value))})
        elif isinstance(value, float):
            rows.append({"metric": f"{prefix}{name}", "value": float(f"{value:.4g}")})  # 0.2499999... -> 0.25
        else:
            rows.append({"metric": f"{prefix}{name}", "value": value})
    return rows


class _ToRunLog(logging.Handler):
    def __init__(self, run_logger):
        super().__init__(logging.INFO)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.log(record.levelno, "%s", record.getMessage())


@contextmanager
def ampo_logs_in_run_log(run_logger) -> Iterator[None]:
    """ampo's INFO lines (the trainer logs each step's loss) go to this flow run's log while a stage runs.

    Prefect gives the `ampo` logger its API handler when PREFECT_LOGGING_EXTRA_LOGGERS names it, but leaves its
    level at the root's WARNING, so INFO lines were dropped; without that setting a handler here forwards them.
    """
    from prefect.logging.handlers import APILogHandler

    ampo_log = logging.getLogger("ampo")
    forward = None if any(isinstance(h, APILogHandler) for h in ampo_log.handlers) else _ToRunLog(run_logger)
    if forward is not None:
        ampo_log.addHandler(forward)
    try:
        with ampo_info_logs():
            yield
    finally:
        if forward is not None:
            ampo_log.removeHandler(forward)


@contextmanager
def ampo_info_logs() -> Iterator[None]:
    """The `ampo` logger passes INFO lines for the block, when it does not already. (A level change clears the cache
    of every logger in the process, about 2 ms with torch and transformers loaded: the round's flow sets it once for
    all its stages.)"""
    ampo_log = logging.getLogger("ampo")
    if ampo_log.getEffectiveLevel() <= logging.INFO:
        yield
        return
    level = ampo_log.level
    ampo_log.setLevel(logging.INFO)
    try:
        yield
    finally:
        ampo_log.setLevel(level)
