"""One thin Prefect task per round stage: call one ampo function, return a small reference (counts, ids)."""

from __future__ import annotations

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
    )
    def run(config: RunConfig, run_id: str, round_: int) -> dict:
        from ampo.progress import terminal_progress

        progress = terminal_progress()  # bars on long stages when the flow runs from a terminal
        try:
            record = stages.run_stage_isolated(name, config, run_id, round_, progress=progress)
        finally:
            if progress is not None:
                progress.close()
        if record["skipped"]:
            get_run_logger().info("%s r%d: skipped, finished before in %.1fs %s", name, round_, record["seconds"],
                                  record["counts"])  # fmt: skip
        else:
            get_run_logger().info("%s r%d: %s in %.1fs %s", name, round_, record["status"], record["seconds"],
                                  record["counts"])  # fmt: skip
        return record

    run.__doc__ = f"Round stage `{name}`: see ampo.stages.{name}."
    return run


STAGE_TASKS = {name: _stage_task(name) for name in stages.STAGES}
generate, score, embed, select, reflogps, train, evaluate, promote = (STAGE_TASKS[n] for n in stages.STAGES)


@task(name="report", cache_policy=NO_CACHE)
def report(config: RunConfig, run_id: str, round_: int) -> dict:
    """Write the round's report files and publish them as Prefect artifacts; return the file paths."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    files = stages.write_round_report(config, run_id, round_)
    key = f"{run_id}-r{round_}".lower().replace("_", "-").replace(".", "-")
    create_markdown_artifact(files["markdown_text"], key=f"{key}-summary", description="round summary")
    create_table_artifact(files["selection_table"], key=f"{key}-selection", description="selection statistics")
    images = "\n".join(f"![{p.rsplit('/', 1)[-1]}]({p})" for p in files["plots"])
    create_markdown_artifact(f"Plots written to disk:\n\n{images}\n", key=f"{key}-plots", description="round plots")
    return {k: v for k, v in files.items() if k != "markdown_text"}
