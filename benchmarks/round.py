"""Wall time of one smoke round by stage, and the share spent outside the stages (orchestration and store).

    .venv/bin/python benchmarks/round.py [--config infra/configs/smoke.yaml] [--prompts N] [--set key.path=value ...]
                                         [--arms ...] [--repeats R]

(--prompts N: N prompts a round and N/2 evaluation prompts, the smoke round's model and backend (tiny-llama,
transformers); --set as in `ampo round`.)

Runs an untimed warm-up round first (imports, model builds), then the round once per arm and repeat in the same
process, each on a fresh store; the arms take turns, so that a change in the machine's load reaches them all. Arms
(--arms, comma-separated; default all but flow-plots):
  plain-before  plain `run_stage` calls plus the round report (no Prefect), as before the status copy: every
                stage_status call scans the rounds table, and each stage's records commit before it goes on
  plain         the same now, as the flow calls them: stage_status answers from the records this process read or
                wrote while the rounds table's version shows no other commit, and the records commit in the
                background while the next stage starts (its first write waits for them)
  flow-before   the Prefect flow on the temporary local server (started before timing), as `ampo round` ran it
                before: the status scans above, the config walked by Prefect at every task call (no `quote`), result
                persistence left to Prefect's settings (one more server read a flow run), the temporary-server
                settings built with `temporary_settings` (a validation of all of Prefect's settings), each stage's
                records committed before it goes on, every artifact created by the report task at the round's end,
                one after another (now the tables are published as their stages end, while the next ones run), and
                the client's TLS context built from the whole CA bundle at every flow run (now from one certificate)
  flow          the flow as `ampo round` runs it now (timed from entering `local_flow_settings`)
  flow-plots    the flow with `plots=True` (the report's three plots drawn and published)
For each: wall time, the seconds the stages recorded, and what is left (orchestration, store bookkeeping, the
report); with --repeats, the median of each. Prefect's own cost is the difference of the flow's and the plain arm's
seconds outside the stages, and, in wall time, the difference of their wall times (Prefect's server is a process of
its own, whose work also slows the stages). That cost is then split by synthetic flows timed in the same process: one
with no task (Prefect's fixed cost per flow run), one with as many no-op tasks as the round has (its cost per task),
and ones with as many keyed table artifacts or log lines, each with the CPU time the server's process spent on it.
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
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_EXTRA_LOGGERS": "ampo",
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}.items():
    os.environ.setdefault(key, value)

import contextlib

import numpy as np
import yaml

from ampo import stages
from ampo.config import load_config
from ampo.stages import STAGES, run_stage
from ampo.stages.context import open_store


@contextlib.contextmanager
def status_as_before():
    """Every stage_status call scans the rounds table (no copy of what this process read or wrote)."""
    from ampo.store import Store, stage_records

    saved = Store.stage_status
    Store.stage_status = lambda self, run, round: stage_records.stage_status(self.rounds, run, round)
    try:
        yield
    finally:
        Store.stage_status = saved


@contextlib.contextmanager
def flow_as_before():
    """The flow as it ran before: tasks given the config itself (Prefect walks it looking for futures at every call),
    persistence left to Prefect's settings, and the heartbeat-free settings built by `temporary_settings`."""
    from prefect import task
    from prefect.artifacts import create_markdown_artifact
    from prefect.cache_policies import NO_CACHE
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    import flows.self_play as fsp
    import tasks.stage_tasks as st

    @contextlib.contextmanager
    def local_flow_settings():
        if PREFECT_API_URL.value():
            yield
            return
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield

    def records_now(*args, records_in_background: bool = False, **kwargs):
        return run_isolated(*args, **kwargs)

    @task(name="report", cache_policy=NO_CACHE)
    def report_at_the_end(config, run_id: str, round_: int, plots: bool = False) -> dict:
        """Every artifact of the round created here, one after another."""
        files = stages.write_round_report(config, run_id, round_, plots=plots)
        key = st.artifact_key(run_id, round_)
        artifacts = [(create_markdown_artifact, files["markdown_text"], f"{key}-summary", "round summary"),
                     *st.selection_artifacts(key, {"table": files["selection_table"], "rows": files["selection_rows"]}),
                     *st.evaluation_artifacts(key, files["evaluation"])]  # fmt: skip
        for create, data, key, description in artifacts:
            create(data, key=key, description=description)
        return {k: v for k, v in files.items() if k in ("markdown", "plots")}

    class NoStageTables(st.StageTables):
        def stage_done(self, name, record):
            pass

    saved = dict(st.STAGE_TASKS), fsp.report, fsp.quote, fsp.local_flow_settings, fsp.self_play_round, fsp.StageTables
    run_isolated = stages.run_stage_isolated
    st.STAGE_TASKS.update({k: t.with_options(persist_result=None) for k, t in saved[0].items()})
    fsp.report = report_at_the_end
    fsp.quote = lambda value: value
    fsp.local_flow_settings = local_flow_settings
    fsp.self_play_round = saved[4].with_options(persist_result=None)
    fsp.StageTables = NoStageTables
    stages.run_stage_isolated = records_now
    try:
        with status_as_before():
            yield
    finally:
        st.STAGE_TASKS.update(saved[0])
        fsp.report, fsp.quote, fsp.local_flow_settings, fsp.self_play_round, fsp.StageTables = saved[1:]
        stages.run_stage_isolated = run_isolated


def stage_seconds(cfg, run: str) -> dict[str, float]:
    status = open_store(cfg).stage_status(run, 0)
    return {name: float(status[name]["seconds"]) for name in STAGES}


def plain(cfg, plots: bool = False, background: bool = True) -> float:
    from ampo.stages import write_round_report

    start = time.perf_counter()
    for name in STAGES:
        run_stage(name, cfg, "bench", 0, records_in_background=background)
    write_round_report(cfg, "bench", 0, plots=plots)
    return time.perf_counter() - start


def with_prefect(cfg, plots: bool = False) -> float:
    from prefect import flow

    import flows.self_play as fsp

    @flow
    def warm_up() -> int:
        return 1

    warm_up()  # starts the temporary server outside the timed region
    settle()
    start = time.perf_counter()
    with fsp.local_flow_settings():  # as `ampo round` runs it
        fsp.self_play_round(cfg, "bench", 0, plots=plots)
    return time.perf_counter() - start


def before(runner, patch):
    def run(cfg):
        with patch():
            return runner(cfg)

    return run


SETTLE_S = 5.0


def settle() -> None:
    """Wait for the temporary server to finish persisting the previous flow run's events. A flow run created
    while it does gets a 503 ("database is locked" from the server's SQLite) and Prefect's client retries it
    after about 2 s: a cost of back-to-back flow runs on the temporary server, not of a round."""
    time.sleep(SETTLE_S)


def prefect_fixed_costs(tasks: int, repeats: int = 3) -> dict[str, tuple[float, float]]:
    """Prefect's costs on the temporary server, each as (wall seconds in the flow's process, CPU seconds of the server's
    process), the minimum of `repeats`: an empty flow run, and one more no-op task run, keyed table artifact and log
    line in a flow (`tasks` of each). The server's CPU is read from its process's counters over the flow and the 2 s
    after it (its event services finish the run's writes then), less what it spent idle over 2 s just before."""
    import psutil
    from prefect import flow, get_run_logger, task
    from prefect.artifacts import create_table_artifact
    from prefect.cache_policies import NO_CACHE

    from flows.self_play import local_flow_settings

    @task(cache_policy=NO_CACHE, persist_result=False)
    def nothing(i: int) -> int:
        return i

    @flow(persist_result=False)
    def empty() -> int:
        return 0

    @flow(persist_result=False)
    def with_tasks() -> int:
        return sum(nothing(i) for i in range(tasks))

    @flow(persist_result=False)
    def with_artifacts() -> None:
        for i in range(tasks):
            create_table_artifact([{"statistic": f"s{j}", "value": j / 3} for j in range(12)], key=f"bench-table-{i}")

    @flow(persist_result=False)
    def with_logs() -> None:
        for i in range(tasks):
            get_run_logger().info("line %d: %s", i, {"prompts": 6, "responses": 36})

    server = [p for p in psutil.Process().children(recursive=True) if "uvicorn" in " ".join(p.cmdline())]
    after_s = 2.0

    def server_cpu() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in server)

    def best(fn) -> tuple[float, float]:
        walls, cpus = [], []
        for _ in range(repeats):
            settle()
            idle = server_cpu()
            time.sleep(after_s)
            idle = server_cpu() - idle
            cpu, start = server_cpu(), time.perf_counter()
            fn()
            walls.append(time.perf_counter() - start)
            time.sleep(after_s)
            cpus.append(server_cpu() - cpu - idle)
        return min(walls), max(0.0, min(cpus))

    with local_flow_settings():
        costs = {"flow run": best(empty)}
        base_wall, base_cpu = costs["flow run"]
        for name, fn in (("task run", with_tasks), ("keyed table artifact", with_artifacts), ("log line", with_logs)):
            wall, cpu = best(fn)
            costs[name] = ((wall - base_wall) / tasks, (cpu - base_cpu) / tasks)
        return costs


def median_wall(rounds: list[tuple[float, dict]]) -> float:
    return float(np.median([wall for wall, _ in rounds]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="plain-before,plain,flow-before,flow",
                        help="plain-before, plain, flow-before, flow, flow-plots (see above)")
    parser.add_argument("--config", default=str(REPO / "infra" / "configs" / "smoke.yaml"))
    parser.add_argument("--prompts", type=int, default=None,
                        help="prompts a round (prompts.per_round), and half as many evaluation prompts")
    parser.add_argument("--repeats", type=int, default=1, help="rounds per arm (the arms take turns); medians")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as in `ampo round --set`")
    args = parser.parse_args()
    overrides = {}
    if args.prompts is not None:
        overrides.update({"prompts.per_round": args.prompts, "eval.max_prompts": max(1, args.prompts // 2)})
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected key.path=value")
        overrides[key.strip()] = yaml.safe_load(value)
    with tempfile.TemporaryDirectory() as tmp:  # warm-up, untimed
        plain(load_config(args.config, {**overrides, "store.uri": f"{tmp}/store", "runtime.workdir": f"{tmp}/work"}),
              plots=True)  # matplotlib imported outside the timed rounds
    runners = {"plain-before": before(lambda cfg: plain(cfg, background=False), status_as_before), "plain": plain,
               "flow-before": before(with_prefect, flow_as_before), "flow": with_prefect,
               "flow-plots": lambda cfg: with_prefect(cfg, plots=True)}  # fmt: skip
    labels = args.arms.split(",")
    unknown = sorted(set(labels) - set(runners))
    if unknown:
        parser.error(f"--arms {unknown}: choose from {list(runners)}")
    runs = {label: [] for label in labels}
    for _ in range(args.repeats):
        for label in labels:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = load_config(args.config, {**overrides, "store.uri": f"{tmp}/store",
                                                "runtime.workdir": f"{tmp}/work"})  # fmt: skip
                wall = runners[label](cfg)
                runs[label].append((wall, stage_seconds(cfg, "bench")))
    rows = []
    for label in labels:  # the median round of each arm, by its seconds outside the stages
        ordered = sorted(runs[label], key=lambda r: r[0] - sum(r[1].values()))
        wall, stages = ordered[len(ordered) // 2]
        rows.append((label, wall, stages))
    print(f"| stage | {' | '.join(label for label, _, _ in rows)} |")
    print("|---|" + "---|" * len(rows))
    for name in STAGES:
        print(f"| {name} | " + " | ".join(f"{s[name]:.1f} s" for _, _, s in rows) + " |")
    for label, wall, stages in rows:
        inside = sum(stages.values())
        every = " ".join(f"{w - sum(s.values()):.2f}" for w, s in runs[label])
        print(f"\n{label}: wall {wall:.2f} s, stages {inside:.2f} s, outside the stages {wall - inside:.2f} s "
              f"= {100 * (wall - inside) / wall:.1f}%" + (f" (median of {len(runs[label])}: {every} s)"
                                                           if len(runs[label]) > 1 else ""))  # fmt: skip
        if len(runs[label]) > 1:
            print(f"  wall times: median {median_wall(runs[label]):.2f} s of "
                  + " ".join(f"{w:.2f}" for w, _ in runs[label]))  # fmt: skip
    walls = {label: (wall, wall - sum(stages.values())) for label, wall, stages in rows}
    for now, was in (("plain", "plain-before"), ("flow", "flow-before")):
        if now in walls and was in walls:
            print(f"{now}: outside the stages {walls[now][1]:.2f} s vs {walls[was][1]:.2f} s before = "
                  f"{walls[now][1] / walls[was][1]:.2f}x; median wall time {median_wall(runs[now]):.2f} s vs "
                  f"{median_wall(runs[was]):.2f} s = {median_wall(runs[now]) / median_wall(runs[was]):.2f}x")
    if "plain" in walls and "flow" in walls:  # seconds outside the stages: steadier than wall times on a shared machine
        cost = walls["flow"][1] - walls["plain"][1]
        print(f"Prefect's own cost (flow minus plain, outside the stages): {cost:.2f} s; in median wall time "
              f"{median_wall(runs['flow']) - median_wall(runs['plain']):.2f} s (its server is a process of its own, "
              f"and its threads share this one: both also slow the stages)")
    print(f"load_avg_1m={os.getloadavg()[0]:.1f}")
    if not any(label.startswith("flow") for label in walls):
        return
    tasks = len(STAGES) + 1  # the stages and the report
    costs = prefect_fixed_costs(tasks)
    print("Prefect, measured on synthetic flows (minimum of 3; wall time in the flow, CPU time of the server's process):")
    for name, (wall, cpu) in costs.items():
        print(f"  {'an empty' if name == 'flow run' else 'one more'} {name}: {1000 * wall:.0f} ms wall, "
              f"{1000 * cpu:.0f} ms of the server's CPU")
    (flow_wall, flow_cpu), (task_wall, task_cpu) = costs["flow run"], costs["task run"]
    print(f"  a flow run with {tasks} task runs: {flow_wall + tasks * task_wall:.2f} s wall, "
          f"{flow_cpu + tasks * task_cpu:.2f} s of the server's CPU")


if __name__ == "__main__":
    main()
