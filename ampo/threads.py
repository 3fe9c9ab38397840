"""CPU threads for torch work: every usable core by default, and undoing what vLLM's CPU engine changes.

What vLLM 0.32's CPU engine does to the process that runs it in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0):
1. Its worker replaces `torch.set_num_threads` with a function that only logs "CPU backend doesn't allow to use
   `torch.set_num_threads` after the thread binding, skip it." The replacement stays after the engine shuts down,
   so every later `torch.set_num_threads` in the process (a trainer's, a benchmark's) silently does nothing.
2. After loading weights it calls `torch.set_num_threads(1)` ("Reducing Torch threads from N to 1 for serving")
   unless OMP_NUM_THREADS is set in the environment. In-process that call reaches the replacement of 1. and is
   skipped, so the engine keeps the thread count its thread had; with the multiprocessing engine (or a vLLM that
   orders the two steps the other way) it does drop to one thread.

`engine_threads` sets the count the engine computes with (all usable cores unless the user set OMP_NUM_THREADS)
and sets OMP_NUM_THREADS while the engine starts, so vLLM leaves that count alone; `restore_torch_threads` puts the
real `torch.set_num_threads` back and the thread count the process had before the first engine started. The
transformers generator, the embedder and the trainer call it before they compute, so a stage that follows a
generation stage in the same process computes with the cores it had.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_state: dict[str, int] = {}  # "threads": the process's thread count before its first vLLM engine


def usable_cpus() -> int:
    """CPUs this process may run on: its scheduling affinity, capped by a cgroup v2 CPU quota when one is set."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota(Path("/sys/fs/cgroup/cpu.max"))
    return max(1, min(count, quota) if quota is not None else count)


def _cgroup_cpu_quota(path: Path) -> int | None:
    """Whole CPUs allowed by a cgroup v2 `cpu.max` file ("max 100000" or "150000 100000"); None when unlimited."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(quota) // int(period))


def default_threads() -> int:
    """The thread count torch work should use: OMP_NUM_THREADS when the user set it, else every usable CPU."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0 and not os.environ.get("VLLM_OMP_NUM_THREADS_SET_BY_VLLM"):
        return int(env)
    return usable_cpus()


def remember_torch_threads() -> int:
    """Before an engine starts: record the process's thread count (the first time only, for
    `restore_torch_threads`), and return the current one, with the real `torch.set_num_threads` back in place."""
    import torch

    _state.setdefault("threads", torch.get_num_threads())
    _put_back_set_num_threads()
    return torch.get_num_threads()


def _put_back_set_num_threads() -> bool:
    """The real `torch.set_num_threads` back in place; True if vLLM's replacement was there."""
    import torch

    if torch.set_num_threads is torch._C.set_num_threads:
        return False
    log.debug("restoring torch.set_num_threads, replaced by %r", torch.set_num_threads)
    torch.set_num_threads = torch._C.set_num_threads
    return True


def restore_torch_threads(threads: int | None = None) -> int:
    """Undo a vLLM engine's changes in this process: the real `torch.set_num_threads` back and `threads` set; without
    `threads`, the count recorded before the first engine started, if vLLM's replacement was still in place and the
    count is now lower. Without an engine run (or once restored) and without `threads`, nothing changes. Returns the
    thread count now in force."""
    import torch

    patched = _put_back_set_num_threads()
    before = _state.get("threads")
    if threads is not None:
        torch.set_num_threads(threads)
    elif patched and isinstance(before, int) and torch.get_num_threads() < before:
        torch.set_num_threads(before)
    return torch.get_num_threads()


@contextlib.contextmanager
def engine_threads(threads: int | None = None) -> Iterator[int]:
    """Around a vLLM engine's start: torch computes with `threads` (default: `default_threads()`), and
    OMP_NUM_THREADS holds the same value while the block runs, which tells vLLM to keep it. Yields the count."""
    import torch

    remember_torch_threads()
    count = threads or default_threads()
    torch.set_num_threads(count)
    log.info("vLLM CPU engine: %d torch threads", count)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(count)
    try:
        yield count
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
