"""Wall time of one smoke round by stage, and the share spent outside the stages (orchestration and store).

    .venv/bin/python benchmarks/round.py [--config infra/configs/smoke.yaml] [--set key.path=value ...] [--arms ...]

(--set as in `ampo round`, e.g. --set prompts.per_round=96 --set eval.max_prompts=48 for a larger smoke round.)

Runs an untimed warm-up round first (imports, model builds), then the round once per arm in the same process, each
on a fresh store. Arms (--arms, comma-separated; default all but flow-plots):
  plain-before  plain `run_stage` calls plus the round report (no Prefect), stage records written as before
                (each stage re-reads its record before marking it running, and counts and re-reads it when done)
  plain         the same with the records written now (two commits a stage, no other read of the rounds table)
  flow-before   the Prefect flow on the temporary local server (started before timing), as `ampo round` runs it,
                records as before
  flow          the flow as it runs now
  flow-plots    the flow with `plots=True` (the report's three plots drawn and published)
For each: wall time, the seconds the stages recorded, and what is left (orchestration, store bookkeeping, the
report). Prefect's own cost is the difference of the flow's and the plain arm's seconds outside the stages. That cost is then split by two empty
flows timed in the same process: one with no task (Prefect's fixed cost per flow run) and one with as many no-op
tasks as the round has (its cost per task).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LANCE_LOG": "error",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}.items():
    os.environ.setdefault(key, value)

import contextlib

import yaml

from ampo.config import load_config
from ampo.stages import STAGES, run_stage
from ampo.stages.context import open_store


@contextlib.contextmanager
def records_as_before():
    """Stage records written as before: stage_started reads the stage's record itself, and stage_done counts the
    row and reads the round's records back (the runner's `previous` and `started` dropped)."""
    from ampo.store import Store, stage_records

    saved = Store.stage_started, Store.stage_done

    def stage_started(self, run, round, stage, *, previous=None):
        return stage_records.stage_started(self.rounds, run, round, stage)

    def stage_done(self, run, round, stage, counts, seconds, *, started=None, **extra):
        return saved[1](self, run, round, stage, counts, seconds, **extra)

    Store.stage_started, Store.stage_done = stage_started, stage_done
    try:
        yield
    finally:
        Store.stage_started, Store.stage_done = saved


def stage_seconds(cfg, run: str) -> dict[str, float]:
    status = open_store(cfg).stage_status(run, 0)
    return {name: float(status[name]["seconds"]) for name in STAGES}


def plain(cfg, plots: bool = False) -> float:
    from ampo.stages import write_round_report

    start = time.perf_counter()
    for name in STAGES:
        run_stage(name, cfg, "bench", 0)
    write_round_report(cfg, "bench", 0, plots=plots)
    return time.perf_counter() - start


def before(runner, cfg) -> float:
    with records_as_before():
        return runner(cfg)


def with_prefect(cfg, plots: bool = False) -> float:
    from prefect import flow

    from flows.self_play import local_flow_settings, self_play_round

    @flow
    def warm_up() -> int:
        return 1

    warm_up()  # starts the temporary server outside the timed region
    settle()
    with local_flow_settings():  # as `ampo round` runs it
        start = time.perf_counter()
        self_play_round(cfg, "bench", 0, plots=plots)
        return time.perf_counter() - start


SETTLE_S = 5.0


def settle() -> None:
    """Wait for the temporary server to finish persisting the previous flow run's events. A flow run created
    while it does gets a 503 ("database is locked" from the server's SQLite) and Prefect's client retries it
    after about 2 s: a cost of back-to-back flow runs on the temporary server, not of a round."""
    time.sleep(SETTLE_S)


def prefect_fixed_costs(tasks: int, repeats: int = 3) -> tuple[float, float]:
    """Seconds of an empty flow run, and of one more no-op task in a flow: each the minimum of `repeats`."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    @task(cache_policy=NO_CACHE)
    def nothing(i: int) -> int:
        return i

    @flow
    def empty() -> int:
        return 0

    @flow
    def with_tasks() -> int:
        return sum(nothing(i) for i in range(tasks))

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            settle()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    from flows.self_play import local_flow_settings

    with local_flow_settings():
        empty_s = best(empty)
        return empty_s, (best(with_tasks) - empty_s) / tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="plain-before,plain,flow-before,flow",
                        help="plain-before, plain, flow-before, flow, flow-plots (see above)")
    parser.add_argument("--config", default=str(REPO / "infra" / "configs" / "smoke.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as in `ampo round --set`")
    args = parser.parse_args()
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected key.path=value")
        overrides[key.strip()] = yaml.safe_load(value)
    with tempfile.TemporaryDirectory() as tmp:  # warm-up, untimed
        plain(load_config(args.config, {**overrides, "store.uri": f"{tmp}/store", "runtime.workdir": f"{tmp}/work"}),
              plots=True)  # matplotlib imported outside the timed rounds
    runners = {"plain-before": lambda cfg: before(plain, cfg), "plain": plain,
               "flow-before": lambda cfg: before(with_prefect, cfg), "flow": with_prefect,
               "flow-plots": lambda cfg: with_prefect(cfg, plots=True)}  # fmt: skip
    unknown = sorted(set(args.arms.split(",")) - set(runners))
    if unknown:
        parser.error(f"--arms {unknown}: choose from {list(runners)}")
    rows = []
    for label in args.arms.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(args.config, {**overrides, "store.uri": f"{tmp}/store", "runtime.workdir": f"{tmp}/work"})
            wall = runners[label](cfg)
            stages = stage_seconds(cfg, "bench")
            rows.append((label, wall, stages))
    print(f"| stage | {' | '.join(label for label, _, _ in rows)} |")
    print("|---|" + "---|" * len(rows))
    for name in STAGES:
        print(f"| {name} | " + " | ".join(f"{s[name]:.1f} s" for _, _, s in rows) + " |")
    for label, wall, stages in rows:
        inside = sum(stages.values())
        print(f"\n{label}: wall {wall:.2f} s, stages {inside:.2f} s, outside the stages {wall - inside:.2f} s "
              f"= {100 * (wall - inside) / wall:.1f}%")
    walls = {label: (wall, wall - sum(stages.values())) for label, wall, stages in rows}
    for now, was in (("plain", "plain-before"), ("flow", "flow-before")):
        if now in walls and was in walls:
            print(f"{now}: outside the stages {walls[now][1]:.2f} s vs {walls[was][1]:.2f} s before = "
                  f"{walls[now][1] / walls[was][1]:.2f}x")
    if "plain" in walls and "flow" in walls:  # seconds outside the stages: steadier than wall times on a shared machine
        cost = walls["flow"][1] - walls["plain"][1]
        print(f"Prefect's own cost (flow minus plain, outside the stages): {cost:.2f} s")
    print(f"load_avg_1m={os.getloadavg()[0]:.1f}")
    if not any(label.startswith("flow") for label in walls):
        return
    tasks = len(STAGES) + 1  # the stages and the report
    per_flow, per_task = prefect_fixed_costs(tasks)
    print(f"Prefect, measured on empty flows: {per_flow:.2f} s per flow run + {1000 * per_task:.0f} ms per task "
          f"x {tasks} tasks = {per_flow + tasks * per_task:.2f} s")


if __name__ == "__main__":
    main()
