"""What every stage of a round is handed: the config, the run and round, the store, the workdir and the policies."""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from ampo.config import RunConfig, object_store_scheme, storage_option_strings
from ampo.object_store import CheckpointPlaces, RemoteCheckpoint, is_remote
from ampo.store import Store, store_exists

Progress = Callable[[str, int, int], None]  # (what, done, total)


def open_store(cfg: RunConfig, *, must_exist: bool = False) -> Store:
    """The store of a config, opened once per process (every read sees the latest commit of any writer).

    A local `store.uri` that is a file is an error; so is a missing store with `must_exist` (commands that only
    read never create a store): a missing folder, or an object-store URI holding no `rounds` table.
    """
    uri, options = cfg.store.uri, _storage_options(cfg)
    if not cfg.store.is_remote:
        path = Path(uri.removeprefix("file://"))
        if path.exists() and not path.is_dir():
            raise ValueError(f"store.uri {uri!r} is a file; it must be a folder (created when missing)")
        missing = must_exist and not path.is_dir()
    else:
        missing = must_exist and not store_exists(uri, storage_options=dict(options) or None)
    if missing:
        raise FileNotFoundError(f"no store at {uri}: nothing has been recorded there (check store.uri)")
    return _store(uri, cfg.embedding.dim, options)


def own_store(cfg: RunConfig) -> Store:
    """A Store object of its own for the config's store (not the one `open_store` shares in the process): for reads on
    another thread while the round's stages write through the shared one. Opening it costs about 10 ms."""
    return _store.__wrapped__(cfg.store.uri, cfg.embedding.dim, _storage_options(cfg))


def _storage_options(cfg: RunConfig) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(storage_option_strings(cfg.store.storage_options).items()))


@lru_cache(maxsize=8)
def _store(uri: str, dim: int, storage_options: tuple[tuple[str, str], ...] = ()) -> Store:
    return Store(uri, dim, storage_options=dict(storage_options) or None)


def checkpoint_places(cfg: RunConfig) -> CheckpointPlaces:
    """Where the run's checkpoints are published and cached (cfg.checkpoints; see ampo.object_store)."""
    ck = cfg.checkpoints
    options = cfg.store.storage_options if ck.storage_options is None else ck.storage_options
    cache = Path(ck.cache) if ck.cache else Path(cfg.runtime.workdir) / "checkpoint-cache"
    remote = ck.uri if ck.uri and object_store_scheme(ck.uri) else None
    return CheckpointPlaces(remote, storage_option_strings(options), cache)


def engine_policy(cfg: RunConfig, policy: dict) -> str | RemoteCheckpoint:
    """What a generate engine is handed for `policy` ({"id", "path"} and, when read from the registry,
    "registered" and "round"): its local path; with runtime.compute: ray and a checkpoint registered on object
    storage, a RemoteCheckpoint, which each Ray actor reads into the cache of its own node
    (runtime.ray_actors.checkpoint_cache, default: this process's cache folder as an absolute path)."""
    registered = str(policy.get("registered", ""))
    if cfg.runtime.compute != "ray" or not is_remote(registered):
        return policy["path"]
    places = checkpoint_places(cfg)
    cache = cfg.runtime.ray_actors.checkpoint_cache
    places = replace(places, cache=(Path(cache) if cache else places.cache).absolute())
    return RemoteCheckpoint(policy["id"], registered, int(policy["round"]), places)


def checkpoint_dir(cfg: RunConfig, run: str, checkpoint_id: str) -> Path:
    """The local folder training writes `checkpoint_id` into: under checkpoints.uri when that is a local folder,
    else under runtime.workdir/checkpoints (also when checkpoints.uri is on object storage: it is uploaded from
    there)."""
    ck = cfg.checkpoints.uri
    root = Path(ck.removeprefix("file://")) if ck and object_store_scheme(ck) is None else (
        Path(cfg.runtime.workdir) / "checkpoints")
    return root / run / checkpoint_id


def run_dir(cfg: RunConfig, run: str) -> Path:
    return Path(cfg.runtime.workdir) / "runs" / run


def round_dir(cfg: RunConfig, run: str, round_: int) -> Path:
    return run_dir(cfg, run) / f"round-{round_}"


def initial_checkpoint_id(run: str) -> str:
    return f"{run}-init"


def candidate_checkpoint_id(run: str, round_: int) -> str:
    return f"{run}-r{round_}"


@dataclass
class RoundContext:
    cfg: RunConfig
    run: str
    round: int
    store: Store
    progress: Progress | None = None
    started_from: dict | None = field(default=None, repr=False)  # fix_start's record; run_stage sets it

    @property
    def dir(self) -> Path:
        return round_dir(self.cfg, self.run, self.round)

    @property
    def start(self) -> dict:
        """The champion this round started from ({"id", "path"}), as `fix_start` fixed it before the stage ran."""
        if self.started_from is None:
            raise RuntimeError(f"run {self.run!r} round {self.round}: the starting policy is not fixed; run the stage "
                               f"through ampo.stages.run_stage, which calls fix_start first")
        return self.started_from

    def report(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)

    @property
    def initial(self) -> dict:
        """The run's initial policy ({"id", "path"}), registered by the run's first `fix_start`."""
        record = self.store.get_checkpoint(initial_checkpoint_id(self.run))
        if record is None:
            raise ValueError(f"run {self.run!r} has no initial policy {initial_checkpoint_id(self.run)!r} in the "
                             f"registry; round 0's first stage registers it")
        return self._readable(record)

    def _readable(self, ref: dict) -> dict:
        """{"id", "path"} of a checkpoint that may be read: its registry row (for its round) with the path given."""
        from ampo.checkpoints import resolve_checkpoint

        registered = _REGISTERED.setdefault(self.store, {})  # id -> registry row, of rows read in this process
        if ref["id"] not in registered:
            row = self.store.get_checkpoint(ref["id"])
            if row is None:
                raise ValueError(f"run {self.run!r} round {self.round}: checkpoint {ref['id']!r} is not in the registry")
            registered[ref["id"]] = row
        row = registered[ref["id"]]
        path = resolve_checkpoint({**row, "path": ref["path"]}, checkpoint_places(self.cfg))
        return {"id": ref["id"], "path": path, "registered": str(ref["path"]), "round": row["round"]}


# Store -> {checkpoint id: registry row} of rows already read in this process: every stage of a round checks its
# starting checkpoint, and a row, once written, is never deleted and keeps its id's round and path (ids are made
# from the run and round), so one read per checkpoint and process is enough; the manifest is still checked every
# time.
_REGISTERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fix_start(ctx: RoundContext) -> dict:
    """The round's first step: fix the policy it starts from ({"id", "path"}) and return it.

    The first call (before generate) records the run's current champion (its id and registered path, an s3:// URI for
    a checkpoint on object storage) in the round's folder (start.json); round 0
    of a new run first registers the configured policy as the run's first champion. Later calls, from later stages
    and re-runs, read that record, so the whole round uses the same policy even after it promoted another. Each call
    checks the checkpoint is readable (ampo.checkpoints.resolve_checkpoint: manifest present).
    """
    path = ctx.dir / "start.json"
    if path.is_file():
        return ctx._readable(json.loads(path.read_text()))
    champion = ctx.store.champion(ctx.run) or register_initial_policy(ctx.cfg, ctx.run, ctx.store)
    start = ctx._readable(champion)  # checked (and, from object storage, cached) before it is recorded
    write_json_atomic(path, {"id": champion["id"], "path": champion["path"]})  # as registered: a URI stays a URI
    return start


def register_initial_policy(cfg: RunConfig, run: str, store: Store) -> dict:
    """Record cfg.policy (resolved to a folder or a hub name) as the run's first champion; returns its row."""
    from ampo.models import resolve_policy

    ckpt_id = initial_checkpoint_id(run)
    if store.get_checkpoint(ckpt_id) is None:
        store.upsert_checkpoint({"id": ckpt_id, "run": run, "round": -1, "path": resolve_policy(cfg.policy),
                                 "parent": None, "status": "candidate"})
    if store.champion(run) is None:
        store.set_champion(run, ckpt_id, expected=None)
    return store.get_checkpoint(ckpt_id)


def write_json_atomic(path: Path, data: dict) -> Path:
    """ampo.checkpoints.write_json_atomic (folder created, temporary name, fsync, rename), imported on first use
    so that importing the stages does not import torch."""
    from ampo.checkpoints import write_json_atomic

    return write_json_atomic(path, data)


@dataclass
class StageResult:
    """What a stage reports beyond its counts: the gate decision of the promote stage."""

    counts: dict
    metrics: dict = field(default_factory=dict)
    gate: dict | None = None
