"""End to end: two self-play rounds of the tiny model under Prefect (a temporary server), a crashed stage resumed.

One Prefect test harness per session (~15 s); everything else is the real flow, tasks, store and models.
"""

import json
import threading
from pathlib import Path

import pytest

from ampo import stages
from ampo.config import load_config
from ampo.runlock import RunLockedError, run_lock
from ampo.stages.context import open_store
from tasks.stage_tasks import metric_rows

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def artifacts(prefix: str) -> dict:
    """The latest artifact of each key starting with `prefix`, by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_=f"{prefix}%")))
    return {a.key: a for a in sorted(found, key=lambda a: a.created)}


def test_two_rounds_then_crash_and_resume(tmp_path, prefect_harness, monkeypatch):
    from flows.self_play import self_play, self_play_round

    small = {"prompts.per_round": 3, "eval.max_prompts": 2, "generation.max_new_tokens": 12,
             "eval.max_new_tokens": 12}  # four rounds below, each as small as what they check allows
    cfg = load_config(REPO / "infra" / "configs" / "smoke.yaml",
                      {"store.uri": str(tmp_path / "store"), "runtime.workdir": str(tmp_path / "work"), **small})
    results = self_play(cfg, "e2e", rounds=2)
    assert [r["round"] for r in results] == [0, 1]
    store = open_store(cfg)
    n_rows = cfg.prompts.per_round * cfg.generation.n
    for round_ in (0, 1):
        assert store.count("e2e", round_) == n_rows
        roles = store.read_rows("e2e", round_, ["role"])["role"].to_pylist()
        assert roles.count("chosen") == cfg.prompts.per_round
        assert roles.count("rejected") == cfg.prompts.per_round * cfg.selection.k
        assert all(s["status"] == "done" for s in store.stage_status("e2e", round_).values())
        report = Path(results[round_]["report"]["markdown"])
        assert report.is_file() and "## Gate decision" in report.read_text()
    assert {"e2e-r0", "e2e-r1"} <= set(store.candidates.tags.list())
    # each round's artifacts: the summary from the report task, the tables as their stages ended; their content is
    # the store's (the selection read back, the evaluate record's metrics)
    for round_ in (0, 1):
        tables = artifacts(f"e2e-r{round_}-")
        assert sorted(tables) == [f"e2e-r{round_}-{name}" for name in ("evaluation", "groups", "selection", "summary")]
        selection = stages.selection_report(store, "e2e", round_)
        assert json.loads(tables[f"e2e-r{round_}-selection"].data) == json.loads(json.dumps(selection["table"]))
        groups = json.loads(tables[f"e2e-r{round_}-groups"].data)
        assert len(groups) == cfg.prompts.per_round and groups == json.loads(json.dumps(selection["rows"]))
        metrics = store.stage_status("e2e", round_)["evaluate"]["metrics"]
        assert json.loads(tables[f"e2e-r{round_}-evaluation"].data) == json.loads(json.dumps(metric_rows(metrics)))
        assert tables[f"e2e-r{round_}-summary"].data == Path(results[round_]["report"]["markdown"]).read_text()
        # the report with its tables writes the same summary as the flow's report task (tables=False)
        whole = stages.write_round_report(cfg, "e2e", round_, plots=False)
        assert whole["markdown_text"] == tables[f"e2e-r{round_}-summary"].data
        assert (whole["selection_table"], whole["selection_rows"]) == (selection["table"], selection["rows"])
    # round 1 sampled with the champion after round 0
    policy_r1 = set(store.read_rows("e2e", 1, ["policy"])["policy"].to_pylist())
    assert policy_r1 == {results[0]["champion"]}
    statuses = [c["status"] for c in store.list_checkpoints("e2e")]
    assert statuses.count("champion") == 1 and len(statuses) == 3  # init, r0, r1
    # the round prompts never repeat across rounds
    p0 = set(store.read_rows("e2e", 0, ["prompt_id"])["prompt_id"].to_pylist())
    p1 = set(store.read_rows("e2e", 1, ["prompt_id"])["prompt_id"].to_pylist())
    assert p0.isdisjoint(p1)

    # round 2 crashes in `train`; the re-run skips the finished stages and finishes the rest, no duplicate rows
    real_train = stages.STAGE_FUNCTIONS["train"]

    def crash(ctx):
        raise RuntimeError("simulated crash in train")

    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "train", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        self_play_round(cfg, "e2e")
    assert store.stage_status("e2e", 2)["train"]["status"] == "failed"
    assert sorted(artifacts("e2e-r2-")) == ["e2e-r2-groups", "e2e-r2-selection"]  # published before the crash
    assert stages.next_round(cfg, "e2e") == 2
    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "train", real_train)
    result = self_play_round(cfg, "e2e")
    assert result["round"] == 2
    resumed = artifacts("e2e-r2-")  # select was skipped on resume: its tables come again, from the store
    assert sorted(resumed) == ["e2e-r2-evaluation", "e2e-r2-groups", "e2e-r2-selection", "e2e-r2-summary"]
    assert json.loads(resumed["e2e-r2-groups"].data) == json.loads(json.dumps(stages.selection_report(store, "e2e",
                                                                                                      2)["rows"]))
    status = store.stage_status("e2e", 2)
    assert status["generate"]["attempts"] == 1 and status["train"]["attempts"] == 2
    ids = store.read_rows("e2e", 2, ["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == n_rows
    assert [c["status"] for c in store.list_checkpoints("e2e")].count("champion") == 1

    # a second flow run of the same run id refuses with a clear message while the first holds it
    # (held by another thread: the lock is re-entrant within the thread holding it, as `ampo round` relies on)
    held, release = threading.Event(), threading.Event()

    def hold():
        with run_lock(cfg.store.uri, "e2e"):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(30)
    try:
        with pytest.raises(RunLockedError, match="run 'e2e' is in progress elsewhere"):
            self_play_round(cfg, "e2e")
    finally:
        release.set()
        holder.join()


def test_subprocess_isolation_runs_stages_in_child_processes(tmp_path, prefect_harness, monkeypatch):
    """With stage_isolation: subprocess the flow runs the model stages in child processes (`python -m
    ampo.stages.child`, which share the run's lock) and the round completes. The round's data stages run here first,
    in this process, so that two children (train, evaluate) prove it at a third of the cost of six; the stage
    functions of this process raise for those two, so the round can only finish if children ran them."""
    from flows.self_play import self_play_round

    cfg = load_config(REPO / "infra" / "configs" / "smoke.yaml",
                      {"store.uri": str(tmp_path / "store"), "runtime.workdir": str(tmp_path / "work"),
                       "runtime.stage_isolation": "subprocess", "prompts.per_round": 2, "eval.max_prompts": 2,
                       "generation.max_new_tokens": 12, "eval.max_new_tokens": 12})
    for name in ("generate", "score", "embed", "select", "reflogps"):
        stages.run_stage(name, cfg, "iso", 0)

    def not_here(ctx):
        raise AssertionError("an isolated stage ran in the flow's process")

    for name in ("train", "evaluate"):
        monkeypatch.setitem(stages.STAGE_FUNCTIONS, name, not_here)
    result = self_play_round(cfg, "iso", 0)
    assert result["round"] == 0
    saved = json.loads((tmp_path / "work" / "runs" / "iso" / "config.json").read_text())
    assert saved["runtime"]["stage_isolation"] == "subprocess"
    status = open_store(cfg).stage_status("iso", 0)
    assert all(s["status"] == "done" for s in status.values()) and len(status) == len(stages.STAGES)
    assert status["train"]["attempts"] == status["evaluate"]["attempts"] == 1
