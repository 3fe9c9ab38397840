"""What every stage of a round is handed: the config, the run and round, the store, the workdir and the policies."""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ampo.config import RunConfig
from ampo.store import Store

Progress = Callable[[str, int, int], None]  # (what, done, total)


def open_store(cfg: RunConfig, *, must_exist: bool = False) -> Store:
    """The store of a config, opened once per process (every read sees the latest commit of any writer).

    A local `store.uri` that is a file is an error; so is a missing one with `must_exist` (commands that only
    read never create a store). Object-store URIs are not checked here.
    """
    uri = cfg.store.uri
    if "://" not in uri:
        path = Path(uri)
        if path.exists() and not path.is_dir():
            raise ValueError(f"store.uri {uri!r} is a file; it must be a folder (created when missing)")
        if must_exist and not path.is_dir():
            raise FileNotFoundError(f"no store at {uri}: nothing has been recorded there (check store.uri)")
    return _store(uri, cfg.embedding.dim)


@lru_cache(maxsize=8)
def _store(uri: str, dim: int) -> Store:
    return Store(uri, dim)


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

        registered = _REGISTERED.setdefault(self.store, {})  # id -> round, of rows read before in this process
        if ref["id"] not in registered:
            row = self.store.get_checkpoint(ref["id"])
            if row is None:
                raise ValueError(f"run {self.run!r} round {self.round}: checkpoint {ref['id']!r} is not in the registry")
            registered[ref["id"]] = row["round"]
        return {"id": ref["id"], "path": resolve_checkpoint({"id": ref["id"], "round": registered[ref["id"]],
                                                             "path": ref["path"]})}  # fmt: skip


# Store -> {checkpoint id: round} of registry rows already read in this process: every stage of a round checks its
# starting checkpoint, and a row, once written, is never deleted and keeps its id's round (ids are made from the
# run and round), so one read per checkpoint and process is enough; the manifest is still checked every time.
_REGISTERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fix_start(ctx: RoundContext) -> dict:
    """The round's first step: fix the policy it starts from ({"id", "path"}) and return it.

    The first call (before generate) records the run's current champion in the round's folder (start.json); round 0
    of a new run first registers the configured policy as the run's first champion. Later calls, from later stages
    and re-runs, read that record, so the whole round uses the same policy even after it promoted another. Each call
    checks the checkpoint is readable (ampo.checkpoints.resolve_checkpoint: manifest present).
    """
    path = ctx.dir / "start.json"
    if path.is_file():
        return ctx._readable(json.loads(path.read_text()))
    champion = ctx.store.champion(ctx.run) or register_initial_policy(ctx.cfg, ctx.run, ctx.store)
    start = ctx._readable(champion)
    write_json_atomic(path, start)
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
