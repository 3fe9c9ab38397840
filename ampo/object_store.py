"""Checkpoints on object storage: publish a finished local folder to s3://, read one back through a local cache.

    places = CheckpointPlaces("s3://bucket/ckpts", {"endpoint": "http://127.0.0.1:9000"}, Path(".ampo/checkpoint-cache"))
    uri = places.publish(Path(".ampo/checkpoints/run/run-r0"), "run", "run-r0")   # every file, manifest.json last
    folder = places.local_copy("run-r0", uri)     # cache/<id>-<weights fingerprint>/, downloaded once
    RemoteCheckpoint("run-r0", uri, 0, places).local_copy()   # the same, checked; what a Ray actor is handed

A checkpoint on object storage exists once its manifest.json does: `publish` uploads it after every other file, the
stage registers the checkpoint (its `path` is the URI) only after `publish` returned, and `local_copy` refuses a
prefix without its manifest. The cache folder is named by the checkpoint id and a fingerprint of the remote objects
(key, size, ETag), so a checkpoint uploaded again with other weights gets a new cache folder; a folder appears in
the cache by one rename, after all its files were downloaded.

Only S3 and S3-compatible endpoints (MinIO, Ceph, R2, GCS interoperability) are supported, through boto3 (the
`s3` extra). Credentials: boto3's own chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN,
profiles, instance roles), or the same names in `storage_options` when a config allowed them in clear text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ampo.config import storage_option_strings

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # the same name as ampo.checkpoints.MANIFEST (that module imports torch)
SKIPPED_PARTS = ("state",)  # the trainer's resumable states: removed once the manifest is written, never uploaded
# storage option names (LanceDB / object_store spelling) -> boto3 client arguments
_ENDPOINT = ("endpoint", "aws_endpoint", "endpoint_url", "aws_endpoint_url")
_REGION = ("region", "aws_region", "aws_default_region")
_CREDENTIALS = {"aws_access_key_id": ("aws_access_key_id", "access_key_id"),
                "aws_secret_access_key": ("aws_secret_access_key", "secret_access_key"),
                "aws_session_token": ("aws_session_token", "session_token", "token")}


def is_remote(path: str) -> bool:
    return str(path).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix"); the prefix has no leading or trailing '/'."""
    if not is_remote(uri):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket (s3://bucket/prefix)")
    return bucket, prefix.strip("/")


def s3_client(storage_options: dict):
    """A boto3 S3 client for LanceDB-style storage options (endpoint, region, virtual_hosted_style_request; keys
    only if given). Without an endpoint option, $AWS_ENDPOINT (object_store's name) or $AWS_ENDPOINT_URL is used."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ImportError("checkpoints on s3:// need boto3: pip install 'ampo[s3]'") from None
    opts = {k.lower(): v for k, v in storage_option_strings(storage_options).items()}
    pick = lambda names: next((opts[n] for n in names if n in opts), None)
    endpoint = pick(_ENDPOINT) or os.environ.get("AWS_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    virtual = pick(("virtual_hosted_style_request", "aws_virtual_hosted_style_request")) == "true"
    kwargs = {name: value for name, names in _CREDENTIALS.items() if (value := pick(names)) is not None}
    config = Config(s3={"addressing_style": "virtual" if virtual else "path"}, retries={"max_attempts": 5})
    return boto3.client("s3", endpoint_url=endpoint, region_name=pick(_REGION) or os.environ.get("AWS_REGION"),
                        config=config, **kwargs)


def upload_folder(client, local: Path, uri: str) -> int:
    """Upload every file under `local` to `uri` (same relative keys), manifest.json last; returns the bytes sent.
    Skips the resumable training states and temporary files (names starting with '.')."""
    bucket, prefix = split_s3(uri)
    files = sorted(p for p in local.rglob("*") if p.is_file() and not _skipped(p.relative_to(local)))
    files.sort(key=lambda p: p.relative_to(local).as_posix() == MANIFEST)  # stable: the manifest goes last
    if not files or files[-1].relative_to(local).as_posix() != MANIFEST:
        raise FileNotFoundError(f"{local} has no {MANIFEST}: only a finished checkpoint is uploaded")
    sent = 0
    for path in files:
        client.upload_file(str(path), bucket, _key(prefix, path.relative_to(local).as_posix()))
        sent += path.stat().st_size
    return sent


def remote_objects(client, uri: str) -> dict[str, dict]:
    """relative key -> {"size", "etag"} of every object under the prefix `uri`."""
    bucket, prefix = split_s3(uri)
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for obj in page.get("Contents", []):
            found[obj["Key"][len(prefix) + 1:]] = {"size": obj["Size"], "etag": obj["ETag"].strip('"')}
    return found


def read_remote_manifest(client, uri: str) -> dict | None:
    """The manifest of the checkpoint at `uri`, None if it has none (not uploaded, or its upload is unfinished)."""
    bucket, prefix = split_s3(uri)
    try:
        body = client.get_object(Bucket=bucket, Key=_key(prefix, MANIFEST))["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def fingerprint(objects: dict[str, dict]) -> str:
    """12 hex digits naming the remote objects' keys, sizes and ETags: new weights, new fingerprint."""
    listing = sorted((key, o["size"], o["etag"]) for key, o in objects.items())
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class CheckpointPlaces:
    """Where a run's checkpoints are published (`uri`: s3://... or None for the local folder itself) and where
    remote ones are cached locally (`cache`)."""

    uri: str | None
    storage_options: dict = field(default_factory=dict)
    cache: Path = Path(".ampo/checkpoint-cache")

    def client(self):
        return s3_client(self.storage_options)

    def publish(self, local: Path, run: str, checkpoint_id: str) -> str:
        """The path to register for the finished checkpoint folder `local`: the folder itself, or (with an s3://
        `uri`) `uri/run/id` once every file and then the manifest were uploaded. A checkpoint already there with
        this manifest's identity is not uploaded again; one with another identity is an error."""
        local = Path(local).resolve()
        if self.uri is None or not is_remote(self.uri):
            return str(local)
        target = f"{self.uri.rstrip('/')}/{run}/{checkpoint_id}"
        client = self.client()
        mine = json.loads((local / MANIFEST).read_text())
        there = read_remote_manifest(client, target)
        if there is not None:
            if _identity(there) != _identity(mine):
                raise ValueError(f"{target} already holds checkpoint {_identity(there)}, not this one "
                                 f"{_identity(mine)}; publish it under another checkpoint id or remove that prefix")
            log.info("%s is already uploaded (its manifest matches); not uploading again", target)
        else:
            sent = upload_folder(client, local, target)
            log.info("uploaded %s to %s (%.1f MB, manifest last)", checkpoint_id, target, sent / 1e6)
        self._seed_cache(client, local, checkpoint_id, target)
        return target

    def local_copy(self, checkpoint_id: str, path: str) -> str:
        """A local folder holding the checkpoint at `path`: `path` itself when it is local, else its cached copy
        (downloaded first if the cache lacks it). A remote prefix without its manifest raises FileNotFoundError."""
        if not is_remote(path):
            return path
        client = self.client()
        objects = remote_objects(client, path)
        if MANIFEST not in objects:
            from ampo.errors import MissingManifestError

            raise MissingManifestError(f"{path} has no {MANIFEST}: its upload is unfinished (or it was never "
                                       f"uploaded); a checkpoint without its manifest is never used")
        folder = self.cache / f"{checkpoint_id}-{fingerprint(objects)}"
        if not (folder / MANIFEST).is_file():
            self._download(client, path, objects, folder)
        return str(folder)

    def _download(self, client, uri: str, objects: dict[str, dict], folder: Path) -> None:
        bucket, prefix = split_s3(uri)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        for key in sorted(objects, key=lambda k: k == MANIFEST):  # the manifest last here too
            (tmp / key).parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, _key(prefix, key), str(tmp / key))
        _move_in(tmp, folder)
        log.info("downloaded %s into the checkpoint cache %s", uri, folder)

    def _seed_cache(self, client, local: Path, checkpoint_id: str, uri: str) -> None:
        """The freshly uploaded folder's files, hard-linked (else copied) into the cache under the remote
        fingerprint, so that the stages after train read it without downloading it again."""
        objects = remote_objects(client, uri)
        folder = self.cache / f"{checkpoint_id}-{fingerprint(objects)}"
        if (folder / MANIFEST).is_file():
            return
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        for key in sorted(objects, key=lambda k: k == MANIFEST):
            source, dest = local / key, tmp / key
            if not source.is_file() or source.stat().st_size != objects[key]["size"]:
                shutil.rmtree(tmp, ignore_errors=True)
                return  # the remote copy differs from this folder: the first read downloads it instead
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, dest)
            except OSError:
                shutil.copy2(source, dest)
        _move_in(tmp, folder)


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A registered checkpoint on object storage, handed to a Ray actor instead of the driver's local copy: the
    actor reads it through `places.cache`, a folder on its own node (downloaded once per id and fingerprint)."""

    id: str
    uri: str  # s3://... as registered
    round: int
    places: CheckpointPlaces

    def local_copy(self) -> str:
        """The checked local folder (ampo.checkpoints.resolve_checkpoint: manifest present, its id this one's)."""
        from ampo.checkpoints import resolve_checkpoint

        return resolve_checkpoint({"id": self.id, "path": self.uri, "round": self.round}, self.places)


def _move_in(tmp: Path, folder: Path) -> None:
    """Rename the complete `tmp` to `folder`; a concurrent reader that got there first wins, `tmp` is removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:
        if not (folder / MANIFEST).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _identity(manifest: dict) -> dict:
    return {k: manifest.get(k) for k in ("id", "config_hash", "data_hash")}


def _key(prefix: str, relative: str) -> str:
    return f"{prefix}/{relative}" if prefix else relative


def _skipped(relative: Path) -> bool:
    return relative.parts[0] in SKIPPED_PARTS or any(part.startswith(".") for part in relative.parts)
