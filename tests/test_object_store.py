"""The store and the checkpoints on a real S3 API on loopback (moto's server mode, started once for the module):
LanceDB's create, merge_insert, tags and vector search there; checkpoints uploaded manifest-last and read through
the cache; the object-store settings refusing clear-text credentials. The whole smoke round on S3 (with Ray, killed
and resumed, under a Prefect server) is in tests/test_compute_ray.py, which shares one Ray instance."""

import json
from pathlib import Path

import numpy as np
import pytest
from loopback_s3 import loopback_s3

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

