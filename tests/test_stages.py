"""The round stages on the tiny model, in-process: a whole round, idempotency, ordering, bad input, kill + resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import cli as _cli

from ampo.config import load_config
from ampo.stages import STAGES, next_round, run_stage
from ampo.stages.context import open_store

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "infra" / "configs" / "smoke.yaml"


def smoke_config(tmp_path, **overrides):
    base = {"store.uri": str(tmp_path / "store"), "runtime.workdir": str(tmp_path / "work")}
    return load_config(SMOKE, {**base, **overrides})


@pytest.fixture(scope="module")
def finished_round(tmp_path_factory):
    """Round 0 of run 'r' on the smoke config, every stage run once in this process."""
    tmp = tmp_path_factory.mktemp("round")
    cfg = smoke_config(tmp)
    records = {name: run_stage(name, cfg, "r", 0) for name in STAGES}
    return cfg, records


def test_a_round_fills_the_store_and_the_registry(finished_round):
    cfg, records = finished_round
    store = open_store(cfg)
    n_prompts, n = cfg.prompts.per_round, cfg.generation.n
    assert store.count("r", 0) == n_prompts * n  # 6 prompts x 6 samples
    rows = store.read_rows("r", 0, ["id", "reward", "vector", "role", "ref_logp_sum", "selected", "policy"])
    assert rows["reward"].null_count == 0 and rows["vector"].null_count == 0
    roles = rows["role"].to_pylist()
    # coreset, k=3: one chosen + 3 rejected per prompt
    assert roles.count("chosen") == n_prompts and roles.count("rejected") == 3 * n_prompts
    selected = rows.filter(rows["selected"])
    # AMPO takes no reference: the reflogps stage is recorded skipped and stores none (tests/test_reflogps.py)
    assert selected["ref_logp_sum"].null_count == selected.num_rows
    assert records["reflogps"]["counts"]["skipped_reason"] == "loss 'ampo' takes no reference log-probs"
    assert set(rows["policy"].to_pylist()) == {"r-init"}
    champions = [c for c in store.list_checkpoints("r") if c["status"] == "champion"]
    assert len(champions) == 1
    assert records["promote"]["gate"]["passed"] == (champions[0]["id"] == "r-r0")
    assert "r-r0" in store.candidates.tags.list()
    assert next_round(cfg, "r") == 0  # promoted, but complete only once its report is written
    from ampo.stages import mark_reported

    mark_reported(cfg, "r", 0)
    assert next_round(cfg, "r") == 1
    report = Path(cfg.runtime.workdir) / "runs" / "r" / "round-0"
    assert (report / "start.json").is_file() and (report / "eval-candidate.json").is_file()
    # the in-process train stage hands the groups to the trainer in memory: no groups file, no spec file
    assert not (report / "groups.jsonl").exists() and not (report / "train-spec.json").exists()
    cache = sorted(p.name for p in (Path(cfg.runtime.workdir) / "runs" / "r" / "eval-cache").iterdir())
    assert [name.split("-")[:2] for name in cache] == [["r", "init"], ["r", "r0"]]  # the candidate's too


def test_promotion_gates_crash_and_rollback(tmp_path):
    """A failing gate keeps the old champion; a crash inside promotion leaves the previous champion intact."""
    cfg = smoke_config(tmp_path, **{"prompts.per_round": 2, "eval.max_prompts": 2})
    for name in STAGES[:-1]:
        run_stage(name, cfg, "g", 0)
    store = open_store(cfg)
    assert store.champion("g")["id"] == "g-init"

    strict = smoke_config(tmp_path, **{"prompts.per_round": 2, "eval.max_prompts": 2,
                                       "eval.gates.min_reward_gain": 1e9, "eval.gates.on_unchanged": "keep"})
    record = run_stage("promote", strict, "g", 0)
    assert record["gate"]["passed"] is False  # rejected, or unchanged (the tiny model may answer as before) and kept
    assert record["gate"]["decision"] in ("reject", "unchanged")
    assert any("reward gain" in r and r.endswith("FAIL") for r in record["gate"]["reasons"])
    assert store.champion("g")["id"] == "g-init" and store.get_checkpoint("g-r0")["status"] == "rejected"

    def crash(*args, **kwargs):
        raise RuntimeError("killed while swapping the champion")

    original = type(store).set_champion
    type(store).set_champion = crash
    try:
        with pytest.raises(RuntimeError, match="killed while swapping"):
            run_stage("promote", cfg, "g", 0, force=True)
    finally:
        type(store).set_champion = original
    assert store.champion("g")["id"] == "g-init"
    assert store.stage_status("g", 0)["promote"]["status"] == "failed"
    assert run_stage("promote", cfg, "g", 0)["gate"]["passed"] is True  # min_win_rate 0 in the smoke config
    assert store.champion("g")["id"] == "g-r0"
    statuses = {c["id"]: c["status"] for c in store.list_checkpoints("g")}
    assert statuses == {"g-init": "retired", "g-r0": "champion"}
    with pytest.raises(ValueError, match=r"round 0 of run 'g' was already promoted: checkpoint 'g-r0' is champion"):
        run_stage("train", cfg, "g", 0, force=True)  # retraining would replace the champion's weights
    assert store.champion("g")["id"] == "g-r0"
    store.set_champion("g", "g-init")  # what `ampo rollback --to g-init` does
    assert {c["id"]: c["status"] for c in store.list_checkpoints("g")} == {"g-init": "champion", "g-r0": "retired"}


def test_finished_stages_are_skipped_and_forced_reruns_change_nothing(finished_round):
    cfg, _ = finished_round
    store = open_store(cfg)
    assert run_stage("generate", cfg, "r", 0)["skipped"] is True
    before = store.read_rows("r", 0, ["id", "response", "reward", "role"])
    for name in ("generate", "score", "select"):
        record = run_stage(name, cfg, "r", 0, force=True)
        assert record["skipped"] is False
    after = store.read_rows("r", 0, ["id", "response", "reward", "role"])
    assert after.equals(before)  # same ids, texts, rewards and roles: upserts, not appends
    assert store.stage_status("r", 0)["generate"]["attempts"] == 2


def test_a_stage_refuses_to_run_before_its_predecessors(tmp_path):
    cfg = smoke_config(tmp_path)
    with pytest.raises(ValueError, match=r"stage 'select' of run 'x' round 0 needs \['generate', 'score', 'embed'\]"):
        run_stage("select", cfg, "x", 0)
    with pytest.raises(ValueError, match="unknown stage 'sample'"):
        run_stage("sample", cfg, "x", 0)
    with pytest.raises(ValueError, match="run id 'a b' must match"):
        run_stage("generate", cfg, "a b", 0)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_prompts_fail_before_sampling_with_the_prompt_named(tmp_path):
    empty = _jsonl(tmp_path / "empty.jsonl", [{"prompt_id": "p1", "prompt": "  "}])
    cfg = smoke_config(tmp_path, **{"prompts.source": "jsonl", "prompts.path": empty, "prompts.per_round": 1})
    with pytest.raises(ValueError, match="p1"):
        run_stage("generate", cfg, "bad", 0)
    unknown = _jsonl(tmp_path / "unknown.jsonl", [{"prompt_id": "p2", "prompt": "Write a poem.",
                                                   "instruction_id_list": ["made:up"], "kwargs": [{}]}])
    cfg = smoke_config(tmp_path, **{"prompts.source": "jsonl", "prompts.path": unknown, "prompts.per_round": 1})
    with pytest.raises(ValueError, match="made:up"):
        run_stage("generate", cfg, "bad2", 0)
    assert open_store(cfg).count("bad2", 0) == 0  # nothing sampled for a prompt that cannot be scored
    assert open_store(cfg).stage_status("bad2", 0)["generate"]["status"] == "failed"


def test_a_nan_reward_is_an_error_naming_the_prompt_or_a_counted_drop(tmp_path):
    component = {"kind": "python", "function": "stage_rewards:nan_for_every_other"}
    cfg = smoke_config(tmp_path, **{"reward.components": [component], "prompts.per_round": 2})
    run_stage("generate", cfg, "nan", 0)
    with pytest.raises(ValueError, match="non-finite"):
        run_stage("score", cfg, "nan", 0)
    dropping = smoke_config(tmp_path, **{"reward.components": [component], "prompts.per_round": 2,
                                         "reward.on_nonfinite": "drop"})
    record = run_stage("score", dropping, "nan", 0)
    total = 2 * dropping.generation.n
    assert record["counts"]["dropped"] == total // 2 and record["counts"]["scored"] == total // 2
    rows = open_store(dropping).read_rows("nan", 0, ["reward", "dropped_reason"])
    assert rows["reward"].null_count == total // 2 == rows.num_rows - rows["dropped_reason"].null_count
    run_stage("embed", dropping, "nan", 0)
    # 3 usable responses per prompt but coreset needs k+1 = 4: a clear error naming the pool, not a silent skip
    with pytest.raises(ValueError, match=r"^run 'nan' round 0: k=3 .*; prompt id '[^']+': N=3$"):
        run_stage("select", dropping, "nan", 0)  # the prompt id, not its position in the batch


def test_a_killed_generate_stage_resumes_without_duplicates(tmp_path):
    cfg = smoke_config(tmp_path, **{"prompts.per_round": 40, "generation.batch_size": 4})
    config = tmp_path / "cfg.json"
    config.write_text(cfg.model_dump_json())
    cmd = [sys.executable, "-m", "flows.cli", "stage", "generate", "-c", str(config), "-r", "k", "--round", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    store = open_store(cfg)
    deadline = time.monotonic() + 600  # the first batch; a loaded machine can take minutes to start the child
    while store.count("k", 0) == 0 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    partial = store.count("k", 0)
    assert 0 < partial < 40 * cfg.generation.n, "kill the stage between its first and last batch"
    assert store.stage_status("k", 0)["generate"]["status"] == "running"
    record = run_stage("generate", cfg, "k", 0)
    assert record["counts"]["prompts_already_done"] == partial // cfg.generation.n
    ids = store.read_rows("k", 0, ["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 40 * cfg.generation.n


DIES_WITH_A_PENDING_RECORD = """
import os, sys, threading, time
import ampo.store.store as store_module
from ampo.config import load_config
from ampo.stages import run_stage

upsert = store_module.upsert

def slow_done(table, rows, **kwargs):  # the score stage's done record is still committing when the process dies
    writer = threading.current_thread().name.startswith("ampo-stage-records")
    if writer and rows["status"][0].as_py() == "done" and rows["id"][0].as_py().endswith("/score"):
        time.sleep(60)
    return upsert(table, rows, **kwargs)

store_module.upsert = slow_done
cfg = load_config(sys.argv[1], {})
for name in ("generate", "score"):
    run_stage(name, cfg, "k", 0, records_in_background=True)
os._exit(0)  # no atexit, no settle: a kill
"""


def test_a_process_killed_with_a_record_committing_resumes_to_the_same_round(tmp_path):
    """records_in_background: a process that dies while a stage's done record commits leaves that stage `running`
    with its data written; the resume repeats it and the round ends as one run without the kill (the same rows,
    rewards, selection and training data), each stage record done."""
    cfg = smoke_config(tmp_path / "killed")
    config = tmp_path / "cfg.json"
    config.write_text(cfg.model_dump_json())
    subprocess.run([sys.executable, "-c", DIES_WITH_A_PENDING_RECORD, str(config)], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)  # fmt: skip
    store = open_store(cfg)
    status = store.stage_status("k", 0)
    assert (status["generate"]["status"], status["score"]["status"]) == ("done", "running")
    assert store.read_rows("k", 0, ["reward"])["reward"].null_count == 0  # score's data was written
    resumed = {name: run_stage(name, cfg, "k", 0, records_in_background=True) for name in STAGES}
    assert resumed["generate"]["skipped"] and not resumed["score"]["skipped"]
    assert resumed["score"]["attempts"] == 2 and resumed["score"]["counts"]["already_scored"] > 0
    clean = smoke_config(tmp_path / "clean")
    records = {name: run_stage(name, clean, "k", 0) for name in STAGES}
    columns = ["id", "response", "reward", "vector", "selected", "role", "cluster"]
    assert store.read_rows("k", 0, columns).sort_by("id") == open_store(clean).read_rows("k", 0, columns).sort_by("id")
    assert resumed["train"]["metrics"] == records["train"]["metrics"]  # the same steps and losses
    fresh = open_store(cfg).stage_records("k")  # another handle: what is durable
    assert [r["status"] for r in fresh] == ["done"] * len(STAGES)


def test_cli_export_audit_and_bad_input(finished_round, tmp_path, monkeypatch, capsys):
    cfg, _ = finished_round
    config = tmp_path / "cfg.json"
    config.write_text(cfg.model_dump_json())
    out = tmp_path / "groups.jsonl"
    status, stdout, _ = _cli(monkeypatch, capsys, "audit", "export", "-c", config, "-r", "r", "--round", 0, "--out", out)
    assert status == 0 and "wrote 6 groups" in stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6  # 6 prompts, each with a chosen and 3 rejected (coreset, k=3)
    for record in records:
        scores = [record[f"score_A{i}"] for i in range(4)]
        assert "A4" not in record and scores[0] == max(record["all_reward_scores"])  # chosen = the best, first
        assert scores[1:] == sorted(scores[1:], reverse=True)  # then the rejected, best first
        assert record["A0"][0]["role"] == "user" and record["A0"][1]["role"] == "assistant"
    missing = tmp_path / "none.jsonl"
    status, _, err = _cli(monkeypatch, capsys, "audit", "export", "-c", config, "-r", "r", "--round", 7, "--out", missing)
    assert status == 2 and err.strip() == f"error: run 'r' round 7 has no rows; nothing written to {missing}"
    assert not missing.exists()
    status, _, err = _cli(monkeypatch, capsys, "audit", "groups", "-c", config, "-r", "nobody", "--round", 0)
    assert status == 2 and err.strip() == "error: run 'nobody' round 0 has no selected groups"
    # --set reaches every command that reads the config: here an empty store elsewhere
    status, _, err = _cli(monkeypatch, capsys, "status", "-c", config, "--set", f"store.uri={tmp_path / 'empty'}")
    assert status == 2 and err.startswith(f"error: no store at {tmp_path / 'empty'}:")
    status, _, err = _cli(monkeypatch, capsys, "stage", "generate", "-c", config, "-r", "r", "--round", -1)
    assert status == 2 and err.strip() == "error: round must be an int >= 0, got -1"
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: [x\n")
    status, _, err = _cli(monkeypatch, capsys, "status", "-c", bad)
    assert status == 2 and err.startswith(f"error: {bad}: not valid YAML at line 2") and err.count("\n") == 1


@pytest.mark.parametrize("bad", ["a/b", "-x", "a b", "x" * 65, "it's"])
def test_run_ids_are_checked_by_the_runid_type_everywhere(tmp_path, bad):
    """One definition (ampo.config.RunId): the flow parameters, the stage runner and the store helpers all refuse."""
    from prefect.exceptions import ParameterTypeError

    from ampo.store import filters
    from flows.self_play import self_play, self_play_round

    cfg = smoke_config(tmp_path)
    for flow in (self_play_round, self_play):  # Prefect validates the annotation before a run starts
        with pytest.raises(ParameterTypeError, match="run_id"):
            flow.validate_parameters({"config": cfg.model_dump(mode="json"), "run_id": bad})
        assert flow.validate_parameters({"config": cfg.model_dump(mode="json"), "run_id": "ok.run-1"})["run_id"] \
            == "ok.run-1"
    with pytest.raises(ValueError, match="run id .* must match"):
        run_stage("generate", cfg, bad, 0)
    with pytest.raises(ValueError, match="run id .* must match"):
        filters.run_is(bad)


def test_score_reads_each_prompt_from_its_row_not_from_the_config(tmp_path):
    """The rows carry their instruction ids and kwargs: scoring works with the prompt source gone, and rows of an
    older store (no instructions stored) fall back to the config's prompts, counted."""
    rows = [{"prompt_id": "two", "prompt": "Write a haiku.", "instruction_id_list": ["punctuation:no_comma",
             "change_case:english_lowercase"], "kwargs": [{}, {}]},
            {"prompt_id": "one", "prompt": "Write a limerick.", "instruction_id_list": ["keywords:existence"],
             "kwargs": [{"keywords": ["cat"]}]}]  # fmt: skip
    path = tmp_path / "prompts.jsonl"
    overrides = {"prompts.source": "jsonl", "prompts.path": _jsonl(path, rows), "prompts.per_round": 2,
                 "reward.components": [{"kind": "python", "function": "stage_rewards:instruction_count"}]}
    cfg = smoke_config(tmp_path, **overrides)
    run_stage("generate", cfg, "rows", 0)
    store = open_store(cfg)
    stored = store.read_rows("rows", 0, ["prompt_id", "instruction_id_list", "instruction_kwargs"]).to_pylist()
    assert {r["prompt_id"]: (r["instruction_id_list"], json.loads(r["instruction_kwargs"])) for r in stored} == {
        "two": (["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}]),
        "one": (["keywords:existence"], [{"keywords": ["cat"]}])}
    path.unlink()  # the prompt source is gone: score needs only the rows
    record = run_stage("score", cfg, "rows", 0)
    assert "prompts_from_config" not in record["counts"] and record["counts"]["scored"] == 2 * cfg.generation.n
    scored = store.read_rows("rows", 0, ["prompt_id", "reward"]).to_pylist()
    assert {r["prompt_id"]: r["reward"] for r in scored} == {"two": 2.0, "one": 1.5}  # 2 ids; 1 id + 1 kwarg / 2

    # a row written before the store kept instructions: its prompt comes from the config, matched by id
    _jsonl(path, rows)
    old = [r["id"] for r in store.read_rows("rows", 0, ["id", "prompt_id"]).to_pylist() if r["prompt_id"] == "one"]
    store.update_candidates(old, instruction_id_list=[None] * len(old), instruction_kwargs=[None] * len(old),
                            reward=[None] * len(old))
    record = run_stage("score", cfg, "rows", 0, force=True)
    assert record["counts"]["prompts_from_config"] == len(old) == record["counts"]["already_scored"]
    assert record["counts"]["scored"] == 2 * cfg.generation.n  # totals over both attempts
    assert {r["prompt_id"]: r["reward"] for r in store.read_rows("rows", 0, ["prompt_id", "reward"]).to_pylist()} \
        == {"two": 2.0, "one": 1.5}


def test_the_starting_policy_is_fixed_by_an_explicit_step(tmp_path):
    """Reading ctx.start or ctx.initial writes nothing; fix_start (run_stage's first step) records the champion once,
    and the round keeps it after another policy becomes the champion."""
    from ampo.stages.context import RoundContext, fix_start

    cfg = smoke_config(tmp_path)
    store = open_store(cfg)
    ctx = RoundContext(cfg, "s", 0, store)
    with pytest.raises(RuntimeError, match="starting policy is not fixed"):
        _ = ctx.start
    with pytest.raises(ValueError, match="no initial policy 's-init'"):
        _ = ctx.initial
    assert store.list_checkpoints("s") == [] and not (ctx.dir / "start.json").exists()  # reads wrote nothing
    start = fix_start(ctx)
    assert start["id"] == "s-init" and json.loads((ctx.dir / "start.json").read_text()) == {
        "id": "s-init", "path": start["path"]}  # fmt: skip
    assert start["registered"] == start["path"] and start["round"] == -1  # the initial policy: a local folder
    assert store.champion("s")["id"] == "s-init" and ctx.initial == start
    store.upsert_checkpoint({"id": "s-other", "run": "s", "round": -1, "path": start["path"], "status": "candidate"})
    store.set_champion("s", "s-other")
    assert fix_start(RoundContext(cfg, "s", 0, store)) == start  # round 0 keeps the policy it started from
    assert fix_start(RoundContext(cfg, "s", 1, store))["id"] == "s-other"  # the next round starts from the champion


def test_each_stage_checks_its_start_without_reading_a_registry_row_twice(tmp_path, monkeypatch):
    """A round's stages each check their starting checkpoint: its registry row is read once per process and
    checkpoint (its round never changes, rows are never deleted), the manifest every time."""
    from ampo.checkpoints import MissingManifestError, write_json_atomic
    from ampo.stages.context import RoundContext, fix_start

    cfg = smoke_config(tmp_path)
    store = open_store(cfg)
    fix_start(RoundContext(cfg, "c", 0, store))
    folder = tmp_path / "ckpt"
    write_json_atomic(folder / "manifest.json", {"id": "c-r0"})
    store.upsert_checkpoint({"id": "c-r0", "run": "c", "round": 0, "path": str(folder), "status": "candidate"})
    store.set_champion("c", "c-r0")
    reads = []
    real = type(store).get_checkpoint
    monkeypatch.setattr(type(store), "get_checkpoint", lambda self, i: reads.append(i) or real(self, i))
    first = fix_start(RoundContext(cfg, "c", 1, store))  # round 1 starts from c-r0: its row read once
    assert first == {"id": "c-r0", "path": str(folder), "registered": str(folder), "round": 0} and reads == ["c-r0"]
    assert fix_start(RoundContext(cfg, "c", 1, store)) == first and reads == ["c-r0"]  # the next stage: no read
    (folder / "manifest.json").unlink()
    with pytest.raises(MissingManifestError):
        fix_start(RoundContext(cfg, "c", 1, store))  # the manifest is still checked


def test_the_trainer_entry_needs_the_groups_in_memory_or_in_a_file():
    from ampo.trainer import TrainSpec, run_spec

    with pytest.raises(ValueError, match="needs the groups"):
        run_spec(TrainSpec(policy_path="p", output_dir="o"))


def test_a_completed_round_optimizes_a_large_store_and_leaves_a_small_one(finished_round, monkeypatch):
    import ampo.stages as stages_module

    cfg, _ = finished_round
    store = open_store(cfg)
    indexed = {c for index in store.candidates.list_indices() for c in index.columns}
    assert not indexed & {"id", "run", "round"}  # 36 rows: below OPTIMIZE_MIN_ROWS, the round end skipped it
    version = store.version
    assert stages_module.optimize_store(store) is None and store.version == version  # nothing written
    before = store.read_rows("r", 0, ["id", "reward", "role"])
    monkeypatch.setattr(stages_module, "OPTIMIZE_MIN_ROWS", 1)  # as if the store were large
    run_stage("promote", cfg, "r", 0, force=True)  # the last stage: the round completes again
    indexed = {c for index in store.candidates.list_indices() for c in index.columns}
    assert {"id", "run", "round"} <= indexed
    assert store.read_rows("r", 0, ["id", "reward", "role"]).equals(before)  # same rows through the indexes
