"""One writer per run: an exclusive lock file held while a round of that run is in progress.

A second flow run of the same run id waits up to `wait_s` seconds, then refuses with a message naming the holder.
The lock is an OS-level `flock`, so it is released when the holder exits or is killed; it protects one machine
(or one shared POSIX filesystem). Runs spread over several machines need a Prefect global concurrency limit per
run id instead (see README, scale path).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from ampo.config import validate_run_id


class RunLockedError(RuntimeError):
    """Another process holds the run."""


INHERITED_ENV = "AMPO_INHERITED_RUN_LOCK"  # set for a stage's child process: it shares its parent's lock
_HELD: dict[str, int] = {}  # run -> descriptor of the lock this process holds


def held_lock_fd(run: str) -> int | None:
    """The descriptor of `run`'s lock if this process holds it. A child process given this descriptor shares
    the flock (one open file description), so the run stays locked while the child runs, even if this process
    is killed: a new flow cannot start a stage that an orphaned child is still writing."""
    return _HELD.get(run)


@contextmanager
def stage_lock(workdir: str | Path, run: str):
    """The lock for one stage run by `ampo stage`: inherited from the parent flow that launched it, else taken."""
    if os.environ.get(INHERITED_ENV) == validate_run_id(run):
        yield None
        return
    with run_lock(workdir, run) as holder:
        yield holder


@contextmanager
def run_lock(workdir: str | Path, run: str, *, wait_s: float = 0.0, poll_s: float = 0.5):
    """Hold the lock of `run` for the duration of the block."""
    validate_run_id(run)
    path = Path(workdir) / "locks" / f"{run}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, run, wait_s, poll_s)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        _HELD[run] = fd
        yield holder
    finally:
        _HELD.pop(run, None)
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
                    f"run {run!r} is in progress elsewhere (holder: {_holder(path)}); waited {wait_s:g}s. "
                    "Wait for it to finish, or pass a longer wait."
                ) from None
            time.sleep(poll_s)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "unknown"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"
