"""Self-play flows: one round is a plain pass over the stage tasks; a run is a loop over rounds.

Annotations here are the classes themselves (no `from __future__ import annotations`): `flow.serve()` pickles the
flow function by value into each run's process, and Prefect builds the parameter model from its annotations there;
a string annotation such as "RunConfig" cannot be resolved in that process.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import flow

from ampo import stages
from ampo.config import RunConfig, RunId, validate_run_id
from ampo.runlock import run_lock
from tasks.stage_tasks import STAGE_TASKS, report


@flow(name="self-play-round", log_prints=True, validate_parameters=True)
def self_play_round(config: RunConfig, run_id: RunId, round: int | None = None, wait_s: float = 0.0,
                    plots: bool = False) -> dict:  # fmt: skip
    """Run (or resume) one round: generate, score, embed, select, reflogps, train, evaluate, promote.

    Finished stages are skipped, so re-running after a crash finishes the rest. `round=None` takes the next one.
    `plots=True` also draws the report's plots and shows them in the round's artifacts (about 0.4 s a round; the
    deployments of infra/prefect.yaml and `ampo serve` ask for them).
    """
    validate_run_id(run_id)
    if round is not None:
        stages.check_stage_round(round)
    with run_lock(config.store.uri, run_id, wait_s=wait_s):  # re-entered, not retaken, under `ampo round`
        round_ = stages.next_round(config, run_id) if round is None else round
        stages.check_round_order(config, run_id, round_)  # before any stage: round r needs round r-1 complete
        for name in stages.STAGES:
            STAGE_TASKS[name](config, run_id, round_)
        files = report(config, run_id, round_, plots)
        stages.mark_reported(config, run_id, round_)  # last: until then the next run resumes this round
    return {"run": run_id, "round": round_, **stages.round_outcome(config, run_id, round_), "report": files}


@flow(name="self-play", log_prints=True, validate_parameters=True)
def self_play(config: RunConfig, run_id: RunId, rounds: int = 1, wait_s: float = 0.0,
              plots: bool = False) -> list[dict]:  # fmt: skip
    """Run `rounds` more rounds of `run_id`, each starting from the current champion."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return [self_play_round(config, run_id, None, wait_s, plots) for _ in range(rounds)]


@contextmanager
def local_flow_settings() -> Iterator[None]:
    """Settings for calling the flows in this process. With no PREFECT_API_URL they run on Prefect's temporary
    server, which lives and dies with this process: its crash-detection heartbeats have no one to warn, and
    joining the heartbeat thread (it sleeps in 1-s steps) adds up to a second to every flow run. Heartbeats
    stay on whenever a real server is configured."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
