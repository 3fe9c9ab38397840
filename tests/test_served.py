"""Deployments against a real Prefect server on loopback: a round served by `ampo serve --cron` gets a run from the
server's scheduler and runs end to end. Bounded in time; the server is stopped in teardown.

The server starts in 20-60 s on 2 busy cores; each test then waits at most a few minutes.
"""

import base64
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from loopback_prefect import REPO, loopback_server, stop_group

SMOKE = REPO / "infra" / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def server():
    with loopback_server() as s:
        yield s


def completed(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["state_type"] == "COMPLETED"]


def failed(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]


def _deployment(server, flow_name: str, name: str) -> dict | None:
    try:
        return server.deployment(flow_name, name)
    except httpx.HTTPStatusError:  # 404 until the served process has registered it
        return None


def test_ampo_serve_cron_round_runs_end_to_end(server, tmp_path):
    """`ampo serve --cron` on the smoke config: the server's scheduler creates a run and the served round completes.
    Failed before: every served run stopped before its first task (`Self_Play_RoundModel is not fully defined;
    define RunConfig`), since the served flow is pickled by value and its annotations were strings. Failed with
    sqlalchemy 2.1.9 too: the scheduler's insert of the runs raised `Can't evaluate bulk DML statement` on every
    loop, so a scheduled deployment never got a run (the run here must be `auto_scheduled`, made by the server)."""
    log = tmp_path / "serve.log"
    env = {**server.env, "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PREFECT_RUNNER_PROCESS_LIMIT": "1"}
    cmd = [str(REPO / ".venv" / "bin" / "ampo"), "serve", "--config", str(SMOKE), "--run", "served",
           "--name", "smoke-served", "--cron", "* * * * *",
           "--set", f"store.uri={tmp_path / 'store'}", "--set", f"runtime.workdir={tmp_path / 'work'}",
           "--set", "prompts.per_round=2", "--set", "eval.max_prompts=2"]  # a small round: the run is the point
    with open(log, "w") as out:
        serving = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deployment = server.wait_for("deployment self-play-round/smoke-served",
                                     lambda: _deployment(server, "self-play-round", "smoke-served"), 120, log=log)
        assert deployment["schedules"][0]["schedule"]["cron"] == "* * * * *"

        def started() -> dict | None:  # the first scheduled run that the served process took
            runs = [r for r in server.flow_runs(deployment["id"]) if r["state_type"] != "SCHEDULED"]
            return min(runs, key=lambda r: r["expected_start_time"]) if runs else None

        first = server.wait_for("a scheduled round taken by the served process", started, 240, log=log)
        # the cron fires every minute and a smoke round takes longer here: pause, so the next one does not start
        # and get refused by the run lock (a correct refusal, but not what this test is about)
        httpx.patch(f"{server.api_url}/deployments/{deployment['id']}", json={"paused": True}, timeout=30)

        def finished() -> dict | None:
            run = server.get(f"/flow_runs/{first['id']}")
            if run["state_type"] in ("FAILED", "CRASHED", "CANCELLED"):
                raise AssertionError(f"the served round ended {run['state_type']}: {run['state']['message']}\n"
                                     f"{log.read_text()[-4000:]}")
            return run if run["state_type"] == "COMPLETED" else None

        run = server.wait_for("the served round to complete", finished, 480, poll_s=3, log=log)
    finally:
        stop_group(serving)
    assert run["auto_scheduled"] is True
    tasks = server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    names = {t["name"]: t["state_type"] for t in tasks}
    for stage in ("generate-r0", "select-r0", "train-r0", "promote-r0"):
        assert names.get(stage) == "COMPLETED", names
    summary = tmp_path / "work" / "runs" / "served" / "round-0" / "report" / "summary.md"
    assert "## Gate decision" in summary.read_text()


def test_served_flow_pickled_by_value_validates_its_config():
    """What flow.serve() does for each run, without a server: the flow is cloudpickled (the function by value,
    since its module attribute is the Flow object) and its parameters are validated in a fresh process."""
    import cloudpickle

    from flows.self_play import self_play_round

    blob = base64.b64encode(cloudpickle.dumps(self_play_round)).decode()
    code = textwrap.dedent(f"""
        import base64, sys, cloudpickle, yaml
        flow = cloudpickle.loads(base64.b64decode(sys.stdin.read()))
        params = flow.validate_parameters({{"config": yaml.safe_load(open({str(SMOKE)!r})), "run_id": "x"}})
        print(type(params["config"]).__name__, params["config"].generation.n)
    """)
    done = subprocess.run([sys.executable, "-c", code], input=blob, text=True, capture_output=True,
                          cwd=Path("/"), timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["RunConfig", "6"]
