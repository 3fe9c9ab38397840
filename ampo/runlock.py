"""One writer per run: an exclusive lock file, kept with the store, held while a round of that run is in progress.

The lock is keyed to the store and the run id, not to the workdir: two flows of one run on one store conflict
whatever their workdirs. For a local store the lock file is `<store folder>/_locks/<run>.lock` (LanceDB lists
only `*.lance` folders, so the store ignores it). An object-store URI (s3://, gs://, az://, ...) cannot hold an
flock: its lock falls back to `~/.cache/ampo/locks/<sha256 of the uri, 16 hex>/<run>.lock` ($AMPO_CACHE replaces
~/.cache/ampo), which excludes the processes of one machine only; runs spread over several machines need a
Prefect global concurrency limit per run id instead (see docs/deployments.md).

A second holder waits up to `wait_s` seconds, then refuses with a message naming the holder. The lock is an
OS-level `flock`, so it is released when the holder exits or is killed. Within one thread the lock is
re-entrant: the CLI takes it once and the flow it calls runs under that same hold, so one round takes the lock
once; a stage run in a child process inherits it (`held_lock_fd`, INHERITED_ENV) instead of taking it again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ampo.config import validate_run_id


class RunLockedError(RuntimeError):
    """Another process holds the run."""


INHERITED_ENV = "AMPO_INHERITED_RUN_LOCK"  # set for a stage's child process: it shares its parent's lock
LOCKS_DIR = "_locks"  # inside a local store folder
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class _Hold:
    def __init__(self, path: Path, fd: int, holder: dict):
        self.path, self.fd, self.holder, self.thread = path, fd, holder, threading.get_ident()


_HELD: dict[str, _Hold] = {}  # run -> the lock this process holds for it


def lock_path(store_uri: str | Path, run: str) -> Path:
    """Where the lock of `run` on the store at `store_uri` lives (see the module docstring)."""
    validate_run_id(run)
    uri = str(store_uri)
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    elif _URI_SCHEME.match(uri):
        from ampo.models import default_cache_dir

        digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
        return default_cache_dir() / "locks" / digest / f"{run}.lock"
    return Path(uri).expanduser().resolve() / LOCKS_DIR / f"{run}.lock"


def held_lock_fd(run: str) -> int | None:
    """The descriptor of `run`'s lock if this process holds it. A child process given this descriptor shares
    the flock (one open file description), so the run stays locked while the child runs, even if this process
    is killed: a new flow cannot start a stage that an orphaned child is still writing."""
    hold = _HELD.get(run)
    return None if hold is None else hold.fd


@contextmanager
def stage_lock(store_uri: str | Path, run: str):
    """The lock for one stage run by `ampo stage`: inherited from the parent flow that launched it, else taken."""
    if os.environ.get(INHERITED_ENV) == validate_run_id(run):
        yield None
        return
    with run_lock(store_uri, run) as holder:
        yield holder


@contextmanager
def run_lock(store_uri: str | Path, run: str, *, wait_s: float = 0.0, poll_s: float = 0.5):
    """Hold the lock of `run` on the store at `store_uri` for the duration of the block (re-entrant per thread)."""
    path = lock_path(store_uri, run)
    hold = _HELD.get(run)
    if hold is not None and hold.path == path and hold.thread == threading.get_ident():
        yield hold.holder  # this thread holds it already (the CLI around the flow it runs): no second acquisition
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, run, wait_s, poll_s)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        _HELD[run] = _Hold(path, fd, holder)
        yield holder
    finally:
        if (held := _HELD.get(run)) is not None and held.fd == fd:
            del _HELD[run]
        os.close(fd)  # closing the last descriptor of the open file (children may share it) releases the flock


def _acquire(fd: int, path: Path, run: str, wait_s: float, poll_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise RunLockedError(
                    f"run {run!r} is in progress elsewhere (holder: {_holder(path)}; lock {path}); waited "
                    f"{wait_s:g}s. Wait for it to finish, or pass a longer wait (--wait SECONDS)."
                ) from None
            time.sleep(poll_s)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "unknown"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"
