"""Promotion safety: rounds run in order, a promotion replaces the champion its gate compared with (checked in the
swap's commit), and no checkpoint folder without its manifest is ever read or promoted."""

import shutil
import sys
from pathlib import Path

import pytest

from ampo.checkpoints import MissingManifestError, resolve_checkpoint, write_manifest
from ampo.config import load_config
from ampo.stages import STAGES, run_stage
from ampo.stages.context import open_store
from ampo.store import Store
from ampo.store import checkpoint_records as registry

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "infra" / "configs" / "smoke.yaml"


def smoke_config(tmp_path, **overrides):
    base = {"store.uri": str(tmp_path / "store"), "runtime.workdir": str(tmp_path / "work")}
    return load_config(SMOKE, {**base, **overrides})


def trained_folder(path: Path, checkpoint_id: str) -> str:
    path.mkdir(parents=True)
    write_manifest(path, {"id": checkpoint_id})
    return str(path)


@pytest.fixture
def registry_store(tmp_path):
    """Run 'r': r-init (the initial policy, champion), r-r0 and r-r1 (trained, with manifests)."""
    store = Store(tmp_path / "store")
    store.upsert_checkpoint({"id": "r-init", "run": "r", "round": -1, "path": "tiny-llama", "status": "candidate"})
    for round_ in (0, 1):
        ckpt = f"r-r{round_}"
        store.upsert_checkpoint({"id": ckpt, "run": "r", "round": round_, "status": "candidate",
                                 "path": trained_folder(tmp_path / ckpt, ckpt)})
    store.set_champion("r", "r-init", expected=None)
    return store


def statuses(store):
    return {c["id"]: c["status"] for c in store.list_checkpoints("r")}


def test_a_swap_replaces_only_the_champion_it_was_compared_with(registry_store):
    store = registry_store
    store.set_champion("r", "r-r0", expected="r-init")
    assert statuses(store) == {"r-init": "retired", "r-r0": "champion", "r-r1": "candidate"}
    version = store.checkpoints.version
    # r-r1 was gated against r-init, but r-r0 is the champion now: refused, nothing written
    with pytest.raises(ValueError, match=r"refusing to make 'r-r1' the champion of run 'r': it was compared with "
                                         r"'r-init', but the champion is now 'r-r0'"):
        store.set_champion("r", "r-r1", expected="r-init")
    assert store.checkpoints.version == version
    assert statuses(store) == {"r-init": "retired", "r-r0": "champion", "r-r1": "candidate"}
    with pytest.raises(ValueError, match="the champion is now 'r-r0'"):
        store.set_champion("r", "r-r1", expected=None)  # "no champion yet" is an expectation too
    store.set_champion("r", "r-r1", expected="r-r0")
    assert statuses(store) == {"r-init": "retired", "r-r0": "retired", "r-r1": "champion"}


def test_a_champion_changed_between_the_check_and_the_commit_is_caught_by_the_commit(registry_store, monkeypatch):
    store = registry_store
    stale = store.champion("r")  # r-init, read before ...
    store.set_champion("r", "r-r0", expected="r-init")  # ... another writer promoted r-r0
    monkeypatch.setattr(registry, "champion", lambda table, run: stale)  # the swap's own read is stale too
    with pytest.raises(ValueError, match=r"updated 1 of 2 rows: the champion changed while 'r-r1' was being "
                                         r"promoted"):
        store.set_champion("r", "r-r1", expected="r-init")
    monkeypatch.undo()
    # the merge's guard left r-r0 champion (r-init was no longer champion) and the would-be champion was put back
    assert statuses(store) == {"r-init": "retired", "r-r0": "champion", "r-r1": "candidate"}
    assert store.champion("r")["id"] == "r-r0"


def test_resolve_checkpoint_refuses_a_folder_without_its_manifest(tmp_path):
    assert resolve_checkpoint({"id": "r-init", "round": -1, "path": "tiny-llama"}) == "tiny-llama"  # initial policy
    good = trained_folder(tmp_path / "r-r0", "r-r0")
    assert resolve_checkpoint({"id": "r-r0", "round": 0, "path": good}) == good
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes(b"")
    with pytest.raises(MissingManifestError, match=rf"checkpoint 'r-r1': {bare} has no manifest.json: .*never used"):
        resolve_checkpoint({"id": "r-r1", "round": 1, "path": str(bare)})
    with pytest.raises(FileNotFoundError, match=rf"checkpoint 'r-r2': checkpoint folder not found: {tmp_path}/gone"):
        resolve_checkpoint({"id": "r-r2", "round": 2, "path": str(tmp_path / "gone")})
    with pytest.raises(ValueError, match=r"checkpoint 'r-r1': .* holds the manifest of 'r-r0', not its own"):
        resolve_checkpoint({"id": "r-r1", "round": 1, "path": good})


def test_rounds_run_in_order(tmp_path, monkeypatch, capsys):
    cfg = smoke_config(tmp_path)
    with pytest.raises(ValueError, match=r"^run 'o' round 1 cannot start: round 0 is not complete \(its promote stage "
                                         r"has not finished\). Rounds run in order; the next round to run is 0"):
        run_stage("generate", cfg, "o", 1)
    assert open_store(cfg).stage_status("o", 1) == {}  # refused before anything was recorded
    config = tmp_path / "cfg.json"
    config.write_text(cfg.model_dump_json())
    from flows.cli import main

    monkeypatch.setattr(sys, "argv", ["ampo", "round", "-c", str(config), "-r", "o", "--round", "99"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: run 'o' round 99 cannot start: round 98 is not complete")


def test_a_round_never_reads_or_promotes_a_checkpoint_without_its_manifest_and_promotes_over_its_own_champion(
        tmp_path):
    cfg = smoke_config(tmp_path, **{"prompts.per_round": 2, "eval.max_prompts": 2})
    for name in STAGES[: STAGES.index("train") + 1]:
        run_stage(name, cfg, "g", 0)
    store = open_store(cfg)
    candidate = Path(store.get_checkpoint("g-r0")["path"])
    with pytest.raises(ValueError, match=r"run 'g' round 1 cannot start: round 0 is not complete"):
        run_stage("generate", cfg, "g", 1)  # round 0 has not promoted yet

    # a candidate folder that lost its manifest is neither evaluated ...
    shutil.move(candidate / "manifest.json", tmp_path / "manifest.json")
    with pytest.raises(MissingManifestError, match=rf"checkpoint 'g-r0': {candidate} has no manifest.json"):
        run_stage("evaluate", cfg, "g", 0)
    shutil.move(tmp_path / "manifest.json", candidate / "manifest.json")
    run_stage("evaluate", cfg, "g", 0)
    # ... nor promoted
    shutil.move(candidate / "manifest.json", tmp_path / "manifest.json")
    with pytest.raises(MissingManifestError, match="checkpoint 'g-r0'"):
        run_stage("promote", cfg, "g", 0)
    assert store.champion("g")["id"] == "g-init"
    shutil.move(tmp_path / "manifest.json", candidate / "manifest.json")

    # the champion changed after the gate's evaluation (an out-of-band promote): the round does not retire it
    store.upsert_checkpoint({"id": "g-other", "run": "g", "round": -1, "path": "tiny-llama", "status": "candidate"})
    store.set_champion("g", "g-other")
    with pytest.raises(ValueError, match=r"refusing to make 'g-r0' the champion of run 'g': it was compared with "
                                         r"'g-init', but the champion is now 'g-other'"):
        run_stage("promote", cfg, "g", 0)
    assert store.champion("g")["id"] == "g-other" and store.get_checkpoint("g-r0")["status"] == "candidate"
    store.set_champion("g", "g-init")  # `ampo rollback --to g-init`, as the message says
    assert run_stage("promote", cfg, "g", 0)["gate"]["passed"] is True  # min_win_rate 0 in the smoke config
    assert store.champion("g")["id"] == "g-r0"

    # the next round refuses to generate from a champion whose manifest is gone
    (candidate / "manifest.json").unlink()
    with pytest.raises(MissingManifestError, match=rf"checkpoint 'g-r0': {candidate} has no manifest.json"):
        run_stage("generate", cfg, "g", 1)
    assert not (Path(cfg.runtime.workdir) / "runs" / "g" / "round-1" / "start.json").exists()
