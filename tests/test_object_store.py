"""The store and the checkpoints on a real S3 API on loopback (moto's server mode, started once for the module):
LanceDB's create, merge_insert, tags and vector search there; checkpoints uploaded manifest-last and read through
the cache; the object-store settings refusing clear-text credentials."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from loopback_s3 import TEST_CREDENTIALS, loopback_s3

from ampo.checkpoints import MissingManifestError, resolve_checkpoint
from ampo.config import RunConfig, credential_env, load_config
from ampo.object_store import CheckpointPlaces, fingerprint, remote_objects
from ampo.store import Store

DIM = 4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3():
    with loopback_s3() as server:
        yield server


def rows(run, round_, n, seed=0):
    from ampo.schema import candidate_id

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [{"id": candidate_id(run, round_, "p", k), "run": run, "round": round_, "prompt_id": "p", "sample": k,
             "prompt": "q", "response": f"answer {k}", "n_tokens": 3, "finish_reason": "stop", "seed": 1,
             "policy": "init", "reward": float(k), "vector": vectors[k]} for k in range(n)]  # fmt: skip


def test_lancedb_store_on_loopback_s3(s3):
    store = Store(s3.uri("lance/store"), dim=DIM, storage_options=s3.options)
    data = rows("r", 0, 5)
    store.upsert_candidates(data)
    store.upsert_candidates(data)  # merge_insert: the same rows twice leave one copy of each
    assert store.count("r", 0) == 5
    store.update_candidates(["r/0/p/1"], reward=[-3.0])  # a partial update changes one column of one row
    assert store.read_rows("r", 0, ["reward"])["reward"].to_pylist() == [0.0, -3.0, 2.0, 3.0, 4.0]
    tag = store.tag_round("r", 0)
    store.upsert_candidates(rows("r", 1, 2))
    assert store.checkout_round("r", 0).count("r", 1) == 0 and store.count("r", 1) == 2  # the tag pins round 0
    nearest = store.neighbours(data[3]["vector"], k=1, run="r", round=0)
    assert nearest["id"].to_pylist() == ["r/0/p/3"]  # a row is its own nearest neighbour (distance 0)
    again = Store(s3.uri("lance/store"), dim=DIM, storage_options=s3.options)  # another connection sees it all
    assert again.count("r", 0) == 5 and tag in again.candidates.tags.list()
    assert store.optimize(index_min_rows=1) == ["id", "run", "round"]  # compaction and indexes on S3
    assert store.read_rows("r", 0, ["reward"])["reward"].to_pylist() == [0.0, -3.0, 2.0, 3.0, 4.0]
    assert store.checkout_round("r", 0).count("r", 0) == 5  # the tagged version survives optimize
    assert any(k.startswith("lance/store/candidates.lance/") for k in s3.keys("lance/store"))


def test_read_only_commands_create_no_store_on_s3(s3):
    from ampo.stages.context import open_store

    cfg = RunConfig.model_validate({"policy": "tiny-llama", "store": {"uri": s3.uri("nothing/here"),
                                                                      "storage_options": s3.options}})  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"no store at s3://ampo-test/nothing/here: nothing has been recorded"):
        open_store(cfg, must_exist=True)
    assert s3.keys("nothing/here") == []  # nothing was created by looking
    open_store(cfg)  # a writer creates it
    open_store(cfg, must_exist=True)
    assert any(k.startswith("nothing/here/rounds.lance/") for k in s3.keys("nothing/here"))


def test_clear_text_credentials_are_refused_unless_allowed():
    base = {"policy": "tiny-llama", "store": {"uri": "s3://b/p", "storage_options": {"endpoint": "http://h:1"}}}
    RunConfig.model_validate(base)  # endpoint, region, allow_http: fine
    for key in ("aws_secret_access_key", "aws_access_key_id", "azure_storage_sas_token", "google_service_account_key"):
        bad = {**base, "store": {**base["store"], "storage_options": {key: "x"}}}
        with pytest.raises(ValueError, match=rf"storage_options \['{key}'\] hold credentials in clear text"):
            RunConfig.model_validate(bad)
        RunConfig.model_validate({**bad, "store": {**bad["store"], "allow_plaintext_credentials": True}})
    with pytest.raises(ValueError, match=r"unsupported URI scheme 'http'.*'s3://', 's3\+ddb://', 'gs://', 'az://'"):
        RunConfig.model_validate({**base, "store": {"uri": "http://h/p"}})
    with pytest.raises(ValueError, match="checkpoints go to a local folder or s3://"):
        RunConfig.model_validate({**base, "checkpoints": {"uri": "gs://b/c"}})
    assert credential_env({"aws_access_key_id": "a", "AWS_SECRET_ACCESS_KEY": "b"}) == {
        "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    with pytest.raises(ValueError, match=r"credentials \['password'\]: each name must start with"):
        credential_env({"password": "x"})


def test_yaml_error_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("policy: tiny-llama\nstore:\n  uri: s3://b/p\n  storage_options:\n    secret_access_key: x\n")
    with pytest.raises(ValueError, match=rf"{path}: store: storage_options \['secret_access_key'\] hold credentials"):
        load_config(path)


def fake_checkpoint(folder, checkpoint_id, weights: bytes, data_hash="d1"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text("{}")
    (folder / "state").mkdir(exist_ok=True)
    (folder / "state" / "left.json").write_text("{}")  # a resumable state: never uploaded
    (folder / "manifest.json").write_text(json.dumps({"id": checkpoint_id, "config_hash": "c1",
                                                      "data_hash": data_hash}))  # fmt: skip
    return folder


def test_checkpoint_upload_is_visible_only_once_its_manifest_is_there(s3, tmp_path, monkeypatch):
    places = CheckpointPlaces(s3.uri("ckpt"), s3.options, tmp_path / "cache")
    local = fake_checkpoint(tmp_path / "work" / "run-r0", "run-r0", b"w" * 1000)
    import boto3.s3.transfer

    real_upload = boto3.s3.transfer.S3Transfer.upload_file
    calls = []

    def dies_on_the_second_file(self, filename, bucket, key, *args, **kwargs):
        calls.append(key)
        if len(calls) == 2:
            raise ConnectionResetError("killed mid-upload")
        return real_upload(self, filename, bucket, key, *args, **kwargs)

    monkeypatch.setattr(boto3.s3.transfer.S3Transfer, "upload_file", dies_on_the_second_file)
    with pytest.raises(ConnectionResetError):
        places.publish(local, "run", "run-r0")
    uri = s3.uri("ckpt/run/run-r0")
    assert s3.keys("ckpt/run/run-r0") == ["ckpt/run/run-r0/config.json"]  # one file, no manifest
    record = {"id": "run-r0", "round": 0, "path": uri}
    with pytest.raises(MissingManifestError, match="checkpoint 'run-r0': .* has no manifest.json: its upload is unf"):
        resolve_checkpoint(record, places)  # promotion and every reader refuse it
    with pytest.raises(ValueError, match="needs the run config's checkpoints settings"):
        resolve_checkpoint(record)

    monkeypatch.setattr(boto3.s3.transfer.S3Transfer, "upload_file", real_upload)
    assert places.publish(local, "run", "run-r0") == uri  # the retry uploads it all, the manifest last
    assert s3.keys("ckpt/run/run-r0") == [f"ckpt/run/run-r0/{n}" for n in ("config.json", "manifest.json",
                                                                           "model.safetensors")]  # fmt: skip
    cached = resolve_checkpoint(record, places)  # the publisher's cache was seeded: nothing to download
    fp = fingerprint(remote_objects(places.client(), uri))
    assert cached == str(tmp_path / "cache" / f"run-r0-{fp}")
    assert (tmp_path / "cache" / f"run-r0-{fp}" / "model.safetensors").read_bytes() == b"w" * 1000

    # another machine (an empty cache) downloads it once, then reads the cached copy
    elsewhere = CheckpointPlaces(s3.uri("ckpt"), s3.options, tmp_path / "cache2")
    got = resolve_checkpoint(record, elsewhere)
    assert sorted(p.name for p in (tmp_path / "cache2" / f"run-r0-{fp}").iterdir()) == [
        "config.json", "manifest.json", "model.safetensors"]
    monkeypatch.setattr(boto3.s3.transfer.S3Transfer, "download_file",
                        lambda *a, **k: pytest.fail("downloaded again"))  # fmt: skip
    assert resolve_checkpoint(record, elsewhere) == got

    # the same checkpoint published again is not uploaded again; another one under its id is refused
    monkeypatch.setattr(boto3.s3.transfer.S3Transfer, "upload_file", lambda *a, **k: pytest.fail("uploaded again"))
    assert places.publish(local, "run", "run-r0") == uri
    other = fake_checkpoint(tmp_path / "other" / "run-r0", "run-r0", b"v" * 1000, data_hash="d2")
    with pytest.raises(ValueError, match="already holds checkpoint .*'data_hash': 'd1'.* not this one"):
        places.publish(other, "run", "run-r0")


def test_checkpoint_folders_and_places_follow_checkpoints_uri(tmp_path):
    from ampo.stages.context import checkpoint_dir, checkpoint_places

    base = {"policy": "tiny-llama", "runtime": {"workdir": str(tmp_path / "w")}}
    default = RunConfig.model_validate(base)  # today's behaviour: under the workdir, nothing remote
    assert checkpoint_dir(default, "r", "r-r0") == tmp_path / "w" / "checkpoints" / "r" / "r-r0"
    assert checkpoint_places(default) == CheckpointPlaces(None, {}, tmp_path / "w" / "checkpoint-cache")
    shared = RunConfig.model_validate({**base, "checkpoints": {"uri": str(tmp_path / "shared")}})  # a shared volume
    assert checkpoint_dir(shared, "r", "r-r0") == tmp_path / "shared" / "r" / "r-r0"
    assert checkpoint_places(shared).uri is None
    remote = RunConfig.model_validate({**base, "checkpoints": {"uri": "s3://b/c"}, "store": {
        "uri": "s3://b/s", "storage_options": {"region": "eu-west-1", "allow_http": True}}})  # fmt: skip
    assert checkpoint_dir(remote, "r", "r-r0") == tmp_path / "w" / "checkpoints" / "r" / "r-r0"  # written locally
    assert checkpoint_places(remote) == CheckpointPlaces("s3://b/c", {"region": "eu-west-1", "allow_http": "true"},
                                                         tmp_path / "w" / "checkpoint-cache")  # the store's options


def test_local_checkpoints_stay_where_they_were_written(tmp_path):
    places = CheckpointPlaces(None, {}, tmp_path / "cache")
    local = fake_checkpoint(tmp_path / "run-r0", "run-r0", b"w")
    assert places.publish(local, "run", "run-r0") == str(local.resolve())
    assert resolve_checkpoint({"id": "run-r0", "round": 0, "path": str(local)}, places) == str(local)
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- a round on S3, under a Prefect server

KILLED_RUN = """
import json, pathlib, sys
from ampo.config import RunConfig
from ampo.stages import STAGES, run_stage
cfg = RunConfig.model_validate(json.loads(pathlib.Path(sys.argv[1]).read_text()))
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


def test_smoke_round_on_s3_killed_resumed_and_one_writer_across_machines(s3, prefect_server, tmp_path):
    """The smoke round with the store and the checkpoints on S3. Machine A's first attempt is killed (SIGKILL)
    while it trains; A's second attempt, a flow run on the Prefect server with its credentials from a Secret block,
    resumes and holds the run in train. Machine B (another lock folder, so the file lock cannot see A) refuses at
    once with wait 0, and with a wait runs the round once A lets go. Then the local resume test's invariants hold on
    S3. Every flow run is in a child process: a flow run in this process would leave Prefect's log and event workers
    pointed at the loopback server after it stops."""
    from ampo.stages.context import open_store

    smoke = REPO / "infra" / "configs" / "smoke.yaml"
    cfg = load_config(smoke, {"store.uri": s3.uri("smoke/store"), "store.storage_options": s3.options,
                              "checkpoints.uri": s3.uri("smoke/checkpoints"), "runtime.workdir": str(tmp_path / "a"),
                              "prompts.per_round": 4, "eval.max_prompts": 4})  # fmt: skip
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
    killed = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path / "cfg.json"), "s"], env=env_a,
                              start_new_session=True)  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", HOLDING_FLOW, str(tmp_path / "cfg-a.json"), "s", str(go),
                               str(entered), str(release), str(tmp_path / "secret.json")],
                              env={k: v for k, v in env_a.items() if k not in TEST_CREDENTIALS},
                              start_new_session=True)  # fmt: skip
    second = None
    store = open_store(cfg)
    try:
        wait_until("train starts", lambda: store.stage_status("s", 0).get("train", {}).get("status") == "running",
                   killed, 300)  # fmt: skip
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
        assert second.wait(400) == 0
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


def test_a_concurrency_limit_with_more_than_one_slot_is_refused(prefect_server):
    from flows.self_play import run_slot

    prefect_server.post("/v2/concurrency_limits/", {"name": "ampo-run-wide", "limit": 2})
    with on_server(prefect_server), pytest.raises(ValueError, match=(
            r"limit 'ampo-run-wide' exists with limit 2 \(active: True\); one writer per run needs an active limit "
            r"of 1: `prefect gcl update ampo-run-wide --limit 1`")), run_slot("wide"):  # fmt: skip
        pytest.fail("entered with two slots")
