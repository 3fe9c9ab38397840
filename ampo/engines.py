"""The engines that run a stage's shards, and the body of a Ray actor that holds one (ampo.stages.compute runs
them in the stage's process or over Ray actors).

This module is what a Ray actor imports: it stays light (the config and the object-store helpers; each engine
imports its models when it is built), so that an actor's start does not pay for the stages, the store or LanceDB.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable
from typing import Any

from ampo.config import EmbeddingConfig, GenerationConfig, RewardConfig, RuntimeConfig
from ampo.object_store import RemoteCheckpoint


@contextlib.contextmanager
def _generate_engine(model: str | RemoteCheckpoint, cfg: GenerationConfig, runtime: RuntimeConfig):
    """payload (prompts, seeds, n) -> samples[i][j], as `Generator.generate`. `model` is a local folder or hub
    name, or a checkpoint on object storage that this engine reads through its own node's cache."""
    from ampo.generation import make_generator

    model_path = model.local_copy() if isinstance(model, RemoteCheckpoint) else model
    with make_generator(model_path, cfg, runtime) as generator:
        yield lambda payload: generator.generate(payload[0], n=payload[2], seeds=payload[1])


@contextlib.contextmanager
def _score_engine(cfg: RewardConfig, runtime: RuntimeConfig):
    """payload (prompts, responses) -> ScoreResult."""
    from ampo.rewards import RewardStack

    stack = RewardStack(cfg, runtime)
    yield lambda payload: stack.score(payload[0], payload[1])


@contextlib.contextmanager
def _embed_engine(cfg: EmbeddingConfig, device: str):
    """payload texts -> (n, dim) float32; an error if the model's size is not embedding.dim (the store's)."""
    from ampo.embedding import SentenceTransformerEmbedder
    from ampo.models import resolve_device

    embedder = SentenceTransformerEmbedder(cfg, device=resolve_device(device))
    if embedder.dim != cfg.dim:
        raise ValueError(f"embedding model {cfg.model!r} gives {embedder.dim}-d vectors but embedding.dim is {cfg.dim}"
                         " (the store's vector size); set embedding.dim to match")  # fmt: skip
    yield embedder.embed


ENGINES: dict[str, Callable[..., contextlib.AbstractContextManager[Callable[[Any], Any]]]] = {
    "generate": _generate_engine,
    "score": _score_engine,
    "embed": _embed_engine,
}


class EngineHost:
    """The body of a Ray actor: holds one engine, ENGINES[kind](*args), built once and run on shard after shard.

    The actor's process ends with `ray.kill`, which frees everything (GPU memory included). With
    runtime.ray_actors.reuse the process lives on instead: `unload` releases the engine at the end of a stage and
    `load` builds the next stage's one, so a stage does not pay for a new process and its imports."""

    def __init__(self, kind: str | None = None, args: tuple = ()):
        self._context = self._engine = None
        if kind is not None:
            self.load(kind, args)

    def load(self, kind: str, args: tuple) -> int:
        """Build the engine ENGINES[kind](*args) in place of the current one; returns this process's id."""
        self.unload()
        context = ENGINES[kind](*args)
        self._engine = context.__enter__()
        self._context = context
        return os.getpid()

    def unload(self) -> None:
        context, self._context, self._engine = self._context, None, None
        if context is not None:
            context.__exit__(None, None, None)
        gc.collect()

    def run(self, payload: Any) -> Any:
        if self._engine is None:
            raise RuntimeError("this actor holds no engine (EngineHost.load was not called)")
        return self._engine(payload)
