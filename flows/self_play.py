"""Self-play flows: one round is a plain pass over the stage tasks; a run is a loop over rounds.

Annotations here are the classes themselves (no `from __future__ import annotations`): `flow.serve()` pickles the
flow function by value into each run's process, and Prefect builds the parameter model from its annotations there;
a string annotation such as "RunConfig" cannot be resolved in that process.
"""

import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import cache
from pathlib import Path

from prefect import flow
from prefect.utilities.annotations import quote

from ampo import stages
from ampo.config import RunConfig, RunId, credential_env, validate_run_id
from ampo.runlock import RunLockedError, run_lock
from tasks.stage_tasks import STAGE_TASKS, StageTables, ampo_info_logs, report

RUN_SLOT_LEASE_S = 120.0  # a killed holder's slot frees this long after its last renewal (renewed every 90 s)


@flow(name="self-play-round", log_prints=True, validate_parameters=True, persist_result=False)
def self_play_round(config: RunConfig, run_id: RunId, round: int | None = None, wait_s: float = 0.0,
                    plots: bool = False) -> dict:  # fmt: skip
    """Run (or resume) one round: generate, score, embed, select, reflogps, train, evaluate, promote.

    Finished stages are skipped, so re-running after a crash finishes the rest. `round=None` takes the next one.
    The flow and its tasks persist no results: the store holds every stage's record and output.
    `plots=True` also draws the report's plots and shows them in the round's artifacts (about 0.4 s a round; the
    deployments of infra/prefect.yaml and `ampo serve` ask for them). The round holds the run for its whole length
    (`one_writer`: the file lock, and the run's Prefect concurrency limit when a server is configured), waiting up
    to `wait_s` seconds for another holder.
    """
    validate_run_id(run_id)
    if round is not None:
        stages.check_stage_round(round)
    with one_writer(config, run_id, wait_s), store_credentials(config), ampo_info_logs():
        round_ = stages.next_round(config, run_id) if round is None else round
        stages.check_round_order(config, run_id, round_)  # before any stage: round r needs round r-1 complete
        shared = quote(config)  # each task gets the config as is: Prefect does not walk it looking for futures
        with StageTables(config, run_id, round_) as tables:  # published while the next stages run; waited for here
            for name in stages.STAGES:
                tables.stage_done(name, STAGE_TASKS[name](shared, run_id, round_))
            files = report(shared, run_id, round_, plots)
        stages.mark_reported(config, run_id, round_)  # last: until then the next run resumes this round
        return {"run": run_id, "round": round_, **stages.round_outcome(config, run_id, round_), "report": files}


@flow(name="self-play", log_prints=True, validate_parameters=True, persist_result=False)
def self_play(config: RunConfig, run_id: RunId, rounds: int = 1, wait_s: float = 0.0,
              plots: bool = False) -> list[dict]:  # fmt: skip
    """Run `rounds` more rounds of `run_id`, each starting from the current champion."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return [self_play_round(config, run_id, None, wait_s, plots) for _ in range(rounds)]


@contextmanager
def local_flow_settings() -> Iterator[None]:
    """Settings for calling the flows in this process. With no PREFECT_API_URL they run on Prefect's temporary
    server, which lives and dies with this process, on plain HTTP over loopback:
    - its crash-detection heartbeats have no one to warn, and joining the heartbeat thread (it sleeps in 1-s steps)
      adds up to a second to every flow run: off;
    - no certificate is ever checked, yet Prefect's client builds a verifying TLS context from its CA file for every
      flow run (certifi's bundle or the system's, SSL_CERT_FILE: 140-150 roots, 30-55 ms on this machine): it gets a
      file of one certificate instead (loopback_ca_file), which takes about 1 ms.
    Both stay as configured whenever a real server is configured.

    The settings are copied with those fields changed (no re-validation: `temporary_settings` rebuilds and validates
    the whole settings model, 0.1-0.25 s on a busy 2-core machine)."""
    from prefect.context import SettingsContext
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield
        return
    context = SettingsContext.get()
    settings = context.settings
    update = {"flows": settings.flows.model_copy(update={"heartbeat_frequency": None}),
              "api": settings.api.model_copy(update={"ssl_cert_file": loopback_ca_file()})}  # fmt: skip
    with SettingsContext(profile=context.profile, settings=settings.model_copy(update=update)):
        yield


@cache
def loopback_ca_file() -> str:
    """A PEM file holding one certificate, the first of certifi's bundle, for Prefect's client while it talks to the
    temporary server (local_flow_settings); created once per process (private to its user) and removed at exit."""
    import atexit
    import re
    import tempfile

    import certifi

    first = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n",
                      Path(certifi.where()).read_text(encoding="ascii"), flags=re.DOTALL)  # fmt: skip
    if first is None:
        raise RuntimeError(f"no PEM certificate in certifi's bundle {certifi.where()}")
    fd, path = tempfile.mkstemp(prefix="ampo-loopback-ca-", suffix=".pem")
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(first.group(0))
    atexit.register(Path(path).unlink, missing_ok=True)
    return path


def concurrency_limit_name(run_id: str) -> str:
    """The Prefect global concurrency limit (one slot) that a round of `run_id` holds on a Prefect server."""
    return f"ampo-run-{validate_run_id(run_id)}"


@contextmanager
def one_writer(config: RunConfig, run_id: str, wait_s: float = 0.0) -> Iterator[None]:
    """One writer per run: the run lock (ampo/runlock.py: a file lock, one machine; re-entered, not retaken, under
    `ampo round`), then, when a Prefect server is configured (PREFECT_API_URL), the run's global concurrency limit,
    which excludes flow runs on every machine that talks to that server. Each waits up to what is left of `wait_s`,
    then refuses with RunLockedError. With Prefect's temporary server (no PREFECT_API_URL) only the file lock."""
    start = time.monotonic()
    with run_lock(config.store.uri, run_id, wait_s=wait_s):
        left = max(0.0, wait_s - (time.monotonic() - start))  # the slot waits only what the file lock left over
        with run_slot(run_id, left):
            yield


@contextmanager
def run_slot(run_id: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the one slot of the run's global concurrency limit (created with limit 1 if missing) for the block.

    The slot is a lease renewed in the background; a holder killed without releasing it frees it RUN_SLOT_LEASE_S
    after its last renewal. No-op with the temporary server, whose database only this process sees."""
    from prefect.concurrency._asyncio import (
        AcquireConcurrencySlotTimeoutError,
        ConcurrencySlotAcquisitionError,
    )
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        yield
        return
    name = concurrency_limit_name(run_id)
    _ensure_limit(name)
    with ExitStack() as stack:
        try:
            stack.enter_context(concurrency(
                name, occupy=1, strict=True, lease_duration=RUN_SLOT_LEASE_S, raise_on_lease_renewal_failure=False,
                timeout_seconds=wait_s if wait_s > 0 else None, max_retries=None if wait_s > 0 else 0))
        except (AcquireConcurrencySlotTimeoutError, ConcurrencySlotAcquisitionError):
            raise RunLockedError(
                f"run {run_id!r} is in progress in another flow run (Prefect global concurrency limit {name!r} on "
                f"{PREFECT_API_URL.value()} has no free slot; `prefect gcl inspect {name}` shows it); waited "
                f"{wait_s:g}s. Wait for it to finish, or pass a longer wait (--wait SECONDS)."
            ) from None
        yield


def _ensure_limit(name: str) -> None:
    """Create the global concurrency limit `name` with one slot unless it exists; an existing one must have 1."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # created concurrently by the other flow run
                pass
            return
    if limit.limit != 1 or not limit.active:
        raise ValueError(f"Prefect global concurrency limit {name!r} exists with limit {limit.limit} (active: "
                         f"{limit.active}); one writer per run needs an active limit of 1: "
                         f"`prefect gcl update {name} --limit 1` (or delete it, the round creates it)")


@contextmanager
def store_credentials(config: RunConfig) -> Iterator[None]:
    """With `store.secret`, the named Prefect Secret block's credentials as environment variables for the block
    (AWS_ACCESS_KEY_ID, ...: LanceDB and boto3 read them, stage child processes inherit them); else nothing."""
    if config.store.secret is None:
        yield
        return
    from prefect.blocks.system import Secret

    env = credential_env(Secret.load(config.store.secret).get())
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
