"""Where a stage's engine work runs: in this process (runtime.compute: local) or sharded over a pool of Ray actors
(runtime.compute: ray).

    with engine_pool(cfg.runtime, "generate", model_path, cfg.generation, cfg.runtime) as pool:
        for i, samples in pool.map(shards):  # (index into shards, result) as each shard finishes
            store.upsert_candidates(rows_of(shards[i], samples))  # the stage stays the only writer

An engine is one of ENGINES: a generator (vLLM or transformers), the reward stack, or the embedder, built from
picklable settings. `local` builds it once in this process and runs the shards in order, exactly as the stages did
before Ray existed. `ray` starts `runtime.ray_actors.actors` actors, each building the engine once, hands each actor
the next shard as soon as it is free (at most IN_FLIGHT queued per actor), and yields results in the order they
finish (`ray.wait`), so the stage writes a shard as soon as it is done: a crash keeps every finished shard and the
stage's resume does only the rest. When a shard fails, no new shard starts, the shards already running are still
yielded, and then the first error is raised.

Results do not depend on the sharding: every prompt samples from its own seed, and the stages cut shards on the
local path's batch boundaries (`shard_size`), so an engine sees the same batches either way. Ray is imported only
when compute is ray; with `ray_address` empty a local Ray instance is started once per process (reused by later
stages, shut down at exit; its start may take `ray_start_timeout_s`), otherwise `ray.init(address=...)` joins the
cluster. Actors are killed when the pool closes, so their GPU memory is free for the next stage (training runs on
`accelerate launch`, not on Ray); with `ray_actors.reuse` (CPU actors only) they only release their engine and
serve the next stage of the same driver process, which then skips their start (a process, torch, the imports).

A generate engine is handed its policy as a local path, or, for a checkpoint on object storage, as a
`RemoteCheckpoint` (ampo.stages.context.engine_policy): each actor then downloads it into the checkpoint cache of
its own node (`runtime.ray_actors.checkpoint_cache`), so the nodes of a cluster need no shared volume.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ampo.config import RuntimeConfig
from ampo.engines import ENGINES, EngineHost

__all__ = ["ENGINES", "IN_FLIGHT", "EngineHost", "LazyShards", "LocalPool", "RayPool", "connect_ray", "engine_pool",
           "release_kept_actors", "shard_size", "start_local_ray", "workers"]  # fmt: skip

log = logging.getLogger(__name__)

IN_FLIGHT = 2  # shards queued per actor: the next one is ready when an actor finishes (hides the driver's write)


def workers(runtime: RuntimeConfig) -> int:
    """How many engines a stage's shards are spread over: 1 locally, the Ray actors with compute: ray."""
    return runtime.ray_actors.actors if runtime.compute == "ray" else 1


def shard_size(items: int, workers: int, cap: int, multiple: int = 1) -> int:
    """Items per shard: `cap` for one worker (the local path's unit); with more, an even split rounded up to a
    multiple of `multiple` (the engine's batch size, so its batches are the local path's), at most `cap`."""
    if workers <= 1 or items <= 0:
        return cap
    even = -(-items // workers)
    return max(1, min(cap, -(-even // multiple) * multiple))


class LazyShards(Sequence):
    """`count` shards, shard i built by `build(i)` only when a pool takes it (one chunk's texts in memory at a time
    locally, IN_FLIGHT per actor with Ray)."""

    def __init__(self, count: int, build: Callable[[int], Any]):
        self.count, self.build = count, build

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if not 0 <= i < self.count:
            raise IndexError(i)
        return self.build(i)


class LocalPool:
    """One engine in this process; shards run in order."""

    size = 1

    def __init__(self, engine: Callable[[Any], Any]):
        self.engine = engine

    def map(self, shards: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for i, shard in enumerate(shards):
            yield i, self.engine(shard)


class RayPool:
    """`actors` Ray actors, each holding one engine; `map` hands out shards and yields them as they finish."""

    def __init__(self, kind: str, args: tuple, runtime: RuntimeConfig):
        import ray

        connect_ray(runtime)
        spec = runtime.ray_actors
        have = ray.cluster_resources()
        for name, each in (("CPU", spec.num_cpus), ("GPU", spec.num_gpus)):
            if spec.actors * each > have.get(name, 0):  # an autoscaler may add nodes; otherwise they wait forever
                log.warning("ray: %d %s actors need %g %s, the cluster has %g now; they wait until it has them",
                            spec.actors, kind, spec.actors * each, name, have.get(name, 0))  # fmt: skip
        remote = ray.remote(EngineHost).options(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus)
        self.kind, self.failed = kind, False
        self.kept_as = (ray.get_runtime_context().get_job_id(), spec.num_cpus, spec.num_gpus, spec.actors)
        if not spec.reuse:
            self.kept_as = None
            self.actors = [remote.remote(kind, args) for _ in range(spec.actors)]
        else:  # the actors the last stage of this driver left, else new ones; each loads this stage's engine
            for key in [k for k in _KEPT if k[0] != self.kept_as[0]]:  # handles of an earlier Ray session
                del _KEPT[key]
            self.actors = _KEPT.pop(self.kept_as, None) or [remote.remote() for _ in range(spec.actors)]
            try:
                ray.get([actor.load.remote(kind, args) for actor in self.actors])
            except Exception as err:  # noqa: BLE001 - the engine's own error, named after the stage
                self.failed = True
                self.close()
                raise _unwrap(err, kind) from None
        self.size = len(self.actors)

    def map(self, shards: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        import ray

        todo = list(range(len(shards)))[::-1]  # popped from the end: shard 0 first
        running: dict[Any, tuple[int, Any]] = {}  # object ref -> (shard index, actor)
        error: BaseException | None = None

        def submit(actor) -> None:
            i = todo.pop()
            running[actor.run.remote(shards[i])] = (i, actor)

        for _ in range(IN_FLIGHT):
            for actor in self.actors:
                if todo:
                    submit(actor)
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            i, actor = running.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - keep yielding what is running; raise the first error at the end
                error = error or err
                self.failed = True
                continue
            if todo and error is None:
                submit(actor)
            yield i, result
        if error is not None:
            raise _unwrap(error, self.kind)

    def close(self) -> None:
        """Kill the actors; with ray_actors.reuse, unless a shard failed, release their engines and keep them for
        the next stage of this driver instead."""
        import ray

        if self.kept_as is not None and not self.failed and self.kept_as not in _KEPT:
            try:
                ray.get([actor.unload.remote() for actor in self.actors])  # after the shards still queued
            except Exception:  # noqa: BLE001 - an actor that cannot unload is not kept
                log.warning("ray: the %s actors did not release their engines; killing them", self.kind)
            else:
                _KEPT[self.kept_as] = self.actors
                return
        _kill(self.actors)


_KEPT: dict[tuple, list] = {}  # (Ray job, num_cpus, num_gpus, actors) -> actors kept between stages (reuse)


def release_kept_actors() -> int:
    """Kill the actors that runtime.ray_actors.reuse kept in this process; returns how many. (They also end with
    the driver process.)"""
    actors = [actor for kept in _KEPT.values() for actor in kept]
    _KEPT.clear()
    _kill(actors)
    return len(actors)


def _kill(actors: list) -> None:
    import ray

    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor)


def _unwrap(err: BaseException, kind: str) -> BaseException:
    """The engine's own exception when Ray carries one (a RayTaskError subclasses it), named after the stage."""
    import ray.exceptions

    if isinstance(err, ray.exceptions.RayActorError):
        return RuntimeError(f"a Ray actor of the {kind} engine died: {err}")
    if isinstance(err, ray.exceptions.RayTaskError):
        return err.as_instanceof_cause()
    return err


@contextlib.contextmanager
def engine_pool(runtime: RuntimeConfig, kind: str, *args) -> Iterator[LocalPool | RayPool]:
    """The pool of `kind` engines that `runtime.compute` asks for, closed (engines freed, actors killed) at exit."""
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}; choose from {sorted(ENGINES)}")
    if runtime.compute == "local":
        with ENGINES[kind](*args) as engine:
            yield LocalPool(engine)
        return
    pool = RayPool(kind, args, runtime)
    try:
        yield pool
    finally:
        pool.close()


def connect_ray(runtime: RuntimeConfig) -> None:
    """Join the Ray cluster of `runtime.ray_address`, or start a local instance when it is empty (waiting up to
    `runtime.ray_start_timeout_s` for it); once per process."""
    try:
        import ray
    except ImportError:
        raise ImportError("runtime.compute='ray' needs the ray package: pip install 'ampo[ray]' (requirements.lock "
                          "pins it)") from None  # fmt: skip
    if ray.is_initialized():
        return
    address = runtime.ray_address or None
    log.info("ray: %s", f"joining {address}" if address else "starting a local instance")
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            start_local_ray(runtime.ray_start_timeout_s)
    except RayStartTimeout as err:
        raise RuntimeError(f"starting a local Ray failed: {err}. Raise runtime.ray_start_timeout_s on a busy "
                           "machine, start one by hand (`ray start --head`) and set runtime.ray_address, or use "
                           "runtime.compute: local") from None  # fmt: skip
    except Exception as err:  # ray raises a bare Exception when its node does not start in time
        where = f"joining the Ray cluster at runtime.ray_address={address!r}" if address else "starting a local Ray"
        raise RuntimeError(f"{where} failed: {err}. Start one by hand (`ray start --head`) and set "
                           "runtime.ray_address, or use runtime.compute: local") from err  # fmt: skip


class RayStartTimeout(TimeoutError):
    """The local Ray node did not register within runtime.ray_start_timeout_s."""


def start_local_ray(timeout_s: float, **init_kwargs) -> None:
    """`ray.init()` of a local instance (no dashboard) that waits up to `timeout_s` for its node to come up.

    Ray's local start polls the GCS for its new node (`ray._private.services.get_node`) for a fixed 30 s, which a
    loaded machine exceeds (the raylet registers only after its Python agents started). During this call that
    lookup is replaced by one that retries until `timeout_s` after the start, then raises RayStartTimeout (not a
    RuntimeError, so Ray's own loop lets it through at once). A start that fails that way leaves Ray's processes to
    its reaper, which ends them when this process exits."""
    import ray
    from ray._private import services

    original = services.get_node
    deadline = time.monotonic() + timeout_s

    def get_node_patiently(gcs_address, node_id):
        return await_node(lambda: original(gcs_address, node_id), deadline, timeout_s)

    services.get_node = get_node_patiently
    try:
        ray.init(include_dashboard=False, logging_level=logging.WARNING, **init_kwargs)
    finally:
        services.get_node = original


def await_node(lookup: Callable[[], Any], deadline: float, timeout_s: float, *, clock=time.monotonic,
               sleep=time.sleep, every_s: float = 0.5) -> Any:  # fmt: skip
    """`lookup()` until it stops raising RuntimeError (Ray's "node not registered yet"); RayStartTimeout once
    `clock()` passed `deadline`."""
    while True:
        try:
            return lookup()
        except RuntimeError as err:
            if clock() >= deadline:
                raise RayStartTimeout(f"its node did not come up within runtime.ray_start_timeout_s={timeout_s:g} "
                                      f"s (last answer: {err})") from None  # fmt: skip
        sleep(every_s)
