"""The quality benchmark's bookkeeping: round-0 pools shared by every arm, equal compute, resume, the statistics."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_quality", REPO / "benchmarks" / "quality.py")
q = sys.modules["bench_quality"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(q)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    return out, q.run("tiny", out, log=lambda _: None)


def test_round0_pools_are_generated_once_and_shared_by_every_arm(tiny):
    from ampo.stages.context import open_store

    out, _ = tiny
    profile = q.PROFILES["tiny"]
    store = open_store(q.make_config(profile, out, 0, None))
    pool = store.read_rows(q.pool_run_id(0), 0)
    same = ["prompt_id", "sample", "prompt", "response", "reward", "n_tokens", "seed", "vector"]
    assert pool.num_rows == 2 * 4  # 2 prompts x N=4
    for arm in profile.arms:
        run = q.run_id(arm, 0)
        rows = store.read_rows(run, 0)
        assert rows.select(same).to_pylist() == pool.select(same).to_pylist(), arm
        assert set(rows["run"].to_pylist()) == {run} and set(rows["policy"].to_pylist()) == {f"{run}-init"}
        assert all(i.startswith(f"{run}/0/") for i in rows["id"].to_pylist())
        status = store.stage_status(run, 0)
        assert all(status[s]["counts"]["shared_from"] == "pool0-s0" for s in q.SHARED_STAGES)
    assert store.stage_status(q.pool_run_id(0), 0)["generate"]["attempts"] == 1  # generated once
    assert "evaluate" not in store.stage_status(q.pool_run_id(0), 0)


def test_arms_take_equal_compute_and_the_base_is_evaluated_once(tiny):
    from ampo.stages.context import open_store

    out, results = tiny
    cells = results["cells"]
    assert sorted(cells) == ["ampo-coreset/s0/r0", "dpo-best-worst/s0/r0"]
    assert {c["prompts"] for c in cells.values()} == {2}
    steps = {c["steps"] for c in cells.values()}
    assert len(steps) == 1 and steps.pop() >= 1  # the same optimizer steps in every arm
    assert {c["groups"] for c in cells.values()} == {2}  # min_reward_spread 0: every pool trained
    store = open_store(q.make_config(q.PROFILES["tiny"], out, 0, None))
    evaluated = [store.stage_status(q.run_id(a, 0), 0)["evaluate"]["counts"]["champion_cached"] for a in q.PROFILES["tiny"].arms]
    assert evaluated == [0, 1]  # the second arm reuses the base model's answers
    assert results["base"]["prompt_ids"] == cells["ampo-coreset/s0/r0"]["outputs"]["prompt_ids"]


def test_outputs_are_written_and_a_second_run_resumes(tiny):
    out, results = tiny
    assert (out / "quality.png").is_file() and "## heldout: difference to the base model" in (out / "quality.md").read_text()
    summary = json.loads((out / "results.json").read_text())["summary"]
    row = summary["ampo-coreset"]["0"]["heldout"]["mean_reward"]
    assert row["low"] <= row["value"] <= row["high"] and "vs_base" in row and "vs_dpo" in row
    assert "vs_dpo" not in summary["dpo-best-worst"]["0"]["heldout"]["mean_reward"]
    again = q.run("tiny", out, log=lambda line: pytest.fail(f"a finished cell ran again: {line}"))
    assert again["cells"] == results["cells"]


def test_summary_against_hand_computed_differences():
    profile = q.Profile("x", seeds=2, rounds=1, ifbench=0, heldout=4, arms=("a", q.DPO_ARM))
    ids = [f"heldout-{i}" for i in range(4)]
    follow = [[[True, True]], [[False, True]], [[False, False]], [[True, True]]]

    def outputs(rewards):
        return {"prompt_ids": ids, "rewards": rewards, "lengths": [1] * 4, "followed": follow}

    base = outputs([0.0, 0.0, 1.0, 1.0])
    cells = {"a/s0/r0": {"round": 0, "outputs": outputs([1.0, 0.0, 1.0, 1.0])},
             "a/s1/r0": {"round": 0, "outputs": outputs([1.0, 1.0, 1.0, 1.0])},
             f"{q.DPO_ARM}/s0/r0": {"round": 0, "outputs": outputs([0.0, 0.0, 1.0, 1.0])},
             f"{q.DPO_ARM}/s1/r0": {"round": 0, "outputs": outputs([0.0, 0.0, 0.0, 1.0])}}
    s = q.summarize({"cells": cells, "base": base}, profile)
    a = s["a"][0]["heldout"]["mean_reward"]
    # seed means per prompt: arm (1, .5, 1, 1) -> 0.875; base 0.5 -> +0.375; dpo (0, 0, .5, 1) = 0.375 -> +0.5
    assert a["value"] == pytest.approx(0.875) and a["vs_base"]["value"] == pytest.approx(0.375)
    assert a["vs_dpo"]["value"] == pytest.approx(0.5)
    # every resample of arm - base draws from (1, .5, 0, 0): the 95% bounds stay within [0, 1]
    assert 0.0 <= a["vs_base"]["low"] <= 0.375 <= a["vs_base"]["high"] <= 1.0
    # prompt strict: followed is the same for everyone -> 2/4, difference 0 with a zero-width interval
    assert s["a"][0]["heldout"]["prompt_strict"]["vs_base"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert s[q.BASE][-1]["heldout"]["prompt_strict"]["value"] == 0.5


def test_stratified_ifbench_covers_every_category_first():
    from ampo.prompts import ifbench_test_prompts

    cats = {(p.instruction_id_list or ["none"])[0].split(":")[0] for p in ifbench_test_prompts()}
    chosen = q.stratified_ifbench(len(cats))
    assert len(chosen) == len(cats) and {p.instruction_id_list[0].split(":")[0] for p in chosen} == cats
    assert [p.prompt_id for p in q.stratified_ifbench(5)] == [p.prompt_id for p in chosen[:5]]
    with pytest.raises(ValueError, match="subset size 0"):
        q.stratified_ifbench(0)
    assert np.unique([p.prompt_id for p in q.stratified_ifbench(60)]).size == 60


def test_resuming_with_other_settings_is_refused(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"cells": {}, "settings": {"profile": "tiny", "heldout": 99}}))
    with pytest.raises(ValueError, match="made with other settings"):
        q.run("tiny", tmp_path, log=lambda _: None)
    with pytest.raises(ValueError, match=r"unknown arm\(s\) \['nope'\]"):
        q.run("tiny", tmp_path / "x", arms=("nope",))


def test_pools_from_another_folder_are_copied_not_generated_again(tiny, tmp_path):
    from ampo.stages.context import open_store

    source, results = tiny
    out = tmp_path / "pilot"
    again = q.run("tiny", out, {"train.lr": 3e-5}, log=lambda _: None, pools_from=source, arms=("ampo-coreset",))
    store = open_store(q.make_config(q.PROFILES["tiny"], out, 0, None))
    pool = q.pool_run_id(0)
    same = ["prompt_id", "sample", "prompt", "response", "reward", "vector"]
    src = open_store(q.make_config(q.PROFILES["tiny"], source, 0, None)).read_rows(pool, 0)
    assert store.read_rows(pool, 0).select(same).to_pylist() == src.select(same).to_pylist()
    status = store.stage_status(pool, 0)
    assert all(status[s]["counts"]["shared_from"] == f"{source}:{pool}" for s in q.SHARED_STAGES)  # not generated
    arm = store.stage_status(q.run_id("ampo-coreset", 0), 0)
    assert arm["evaluate"]["counts"]["champion_cached"] == 1  # the base model's answers came from the source
    assert again["base"] == results["base"]
    assert again["settings"]["overrides"]["train.lr"] == 3e-5


def test_pools_from_a_folder_with_other_generation_settings_are_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    settings = {"profile": "tiny", "config": "infra/configs/smoke.yaml", "ifbench": 0, "heldout": 2,
                "overrides": {**q.PROFILES["tiny"].overrides, "generation.n": 6}}
    (src / "results.json").write_text(json.dumps({"cells": {}, "settings": settings}))
    with pytest.raises(ValueError, match="other generation/evaluation settings"):
        q.run("tiny", tmp_path / "out", log=lambda _: None, pools_from=src)
    with pytest.raises(ValueError, match="no results.json"):
        q.run("tiny", tmp_path / "out2", log=lambda _: None, pools_from=tmp_path / "nothing")


def test_ampo_bench_quality_passes_its_options_to_the_benchmark(tmp_path, monkeypatch, capsys):
    from cli_runner import cli

    import flows.cli

    module = flows.cli.quality_bench_module()
    seen = {}

    def fake_run(name, out, extra=None, **kwargs):
        seen.update(name=name, out=out, extra=extra, **kwargs)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.md").write_text("# table\n")

    monkeypatch.setattr(module, "run", fake_run)
    status, stdout, _ = cli(monkeypatch, capsys, "bench", "quality", "--profile", "tiny", "--out", tmp_path / "o",
                            "--set", "train.lr=2.0e-5", "--set", "loss.beta=5", "--arms", "ampo-coreset,random-k",
                            "--rounds", "2", "--seeds", "3", "--ifbench", "4", "--heldout", "5",
                            "--pools", tmp_path / "p")  # fmt: skip
    assert status == 0 and "# table" in stdout
    assert seen["name"] == "tiny" and seen["out"] == tmp_path / "o" and seen["pools_from"] == tmp_path / "p"
    assert seen["extra"] == {"train.lr": 2e-5, "loss.beta": 5}
    assert (seen["arms"], seen["rounds"], seen["seeds"], seen["ifbench"], seen["heldout"]) == (
        ("ampo-coreset", "random-k"), 2, 3, 4, 5)
    assert seen["command"].startswith("python benchmarks/quality.py --profile tiny")
    status, stdout, _ = cli(monkeypatch, capsys, "bench", "quality", "--help")
    assert status == 0 and "--pools" in stdout and "--ifbench" in stdout


def test_set_options_apply_on_top_of_each_arm(tmp_path):
    # each arm replaces the loss section ({"name": ...}); a --set of one of its fields must survive that
    profile = q.PROFILES["tiny"]
    profile = q.Profile(**{**profile.__dict__, "overrides": {**profile.overrides, "loss.nll_weight": 0.5}})
    for arm, name in (("ampo-coreset", "ampo"), ("dpo-best-worst", "dpo")):
        cfg = q.make_config(profile, tmp_path, 0, arm)
        assert (cfg.loss.name, cfg.loss.nll_weight) == (name, 0.5)
    assert q.make_config(q.PROFILES["tiny"], tmp_path, 0, "dpo-best-worst").loss.nll_weight == 0.0
