"""What every stage of a round is handed: the config, the run and round, the store, the workdir and the policies."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

from ampo.config import RunConfig
from ampo.store import Store

Progress = Callable[[str, int, int], None]  # (what, done, total)


def open_store(cfg: RunConfig) -> Store:
    """The store of a config, opened once per process (every read sees the latest commit of any writer)."""
    return _store(cfg.store.uri, cfg.embedding.dim)


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

    @property
    def dir(self) -> Path:
        return round_dir(self.cfg, self.run, self.round)

    def report(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)

    @cached_property
    def start(self) -> dict:
        """The champion this round started from ({"id", "path"}), fixed the first time a stage of it asks.

        Round 0 of a new run registers the configured policy as the run's first champion. The record lives in the
        round's folder, so later stages and re-runs use the same policy even after this round promoted another.
        """
        path = self.dir / "start.json"
        if path.is_file():
            return json.loads(path.read_text())
        champion = self.store.champion(self.run) or register_initial_policy(self.cfg, self.run, self.store)
        start = {"id": champion["id"], "path": champion["path"]}
        write_json_atomic(path, start)
        return start

    @cached_property
    def initial(self) -> dict:
        """The run's initial policy ({"id", "path"})."""
        record = self.store.get_checkpoint(initial_checkpoint_id(self.run))
        if record is None:
            record = register_initial_policy(self.cfg, self.run, self.store)
        return {"id": record["id"], "path": record["path"]}


def register_initial_policy(cfg: RunConfig, run: str, store: Store) -> dict:
    """Record cfg.policy (resolved to a folder or a hub name) as the run's first champion; returns its row."""
    from ampo.models import resolve_policy

    ckpt_id = initial_checkpoint_id(run)
    if store.get_checkpoint(ckpt_id) is None:
        store.upsert_checkpoint({"id": ckpt_id, "run": run, "round": -1, "path": resolve_policy(cfg.policy),
                                 "parent": None, "status": "candidate"})
    if store.champion(run) is None:
        store.set_champion(run, ckpt_id)
    return store.get_checkpoint(ckpt_id)


def write_json_atomic(path: Path, data: dict) -> Path:
    """Write JSON atomically (temporary name, fsync, rename), creating the folder; returns the path."""
    from ampo.checkpoints import write_json_atomic as write

    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, data)
    return path
