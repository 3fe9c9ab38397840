"""Embeddings: the real bundled all-MiniLM-L6-v2 (offline), and the embed stage against a store."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from ampo.config import EmbeddingConfig
from ampo.embedding import Embedder, SentenceTransformerEmbedder, embed_round, embedding_texts, resolve_model
from ampo.schema import candidate_id
from ampo.store import Store

TEXTS = [
    "The cat sat on the mat.",
    "A cat is sitting on a mat.",
    "Quarterly revenue grew by five percent compared with last year.",
    "ok",
    "Write a haiku about the sea, using exactly three lines and no rhyme, then explain each line in one sentence.",
]


@pytest.fixture(scope="module")
def minilm():
    return SentenceTransformerEmbedder(EmbeddingConfig())


def test_shape_dtype_and_unit_norm(minilm):
    vectors = minilm.embed(TEXTS)
    assert vectors.shape == (5, 384) and vectors.dtype == np.float32 and minilm.dim == 384
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(np.ones(5), abs=1e-5)


def test_similar_texts_are_closer_than_unrelated_ones(minilm):
    cat, cat2, revenue = minilm.embed(TEXTS[:3])
    assert float(cat @ cat2) > float(cat @ revenue) + 0.3  # paraphrase vs unrelated: cosine of unit vectors


def test_deterministic_across_calls(minilm):
    assert np.array_equal(minilm.embed(TEXTS), minilm.embed(TEXTS))


def sharing(minilm, batch_size, progress=None):
    """An embedder with another batch size reusing the loaded model (loading costs seconds on this machine)."""
    embedder = SentenceTransformerEmbedder(EmbeddingConfig(batch_size=batch_size), progress=progress)
    embedder._model = minilm.model
    return embedder


def test_batch_size_does_not_change_vectors(minilm):
    one = sharing(minilm, batch_size=1).embed(TEXTS)
    many = sharing(minilm, batch_size=64).embed(TEXTS)
    assert np.abs(one - many).max() < 1e-5  # padding to the longest text in a batch is masked out


def test_empty_input_and_bad_input(minilm):
    assert minilm.embed([]).shape == (0, 384)
    with pytest.raises(ValueError, match="item 1 is NoneType"):
        minilm.embed(["fine", None])


def test_loads_lazily_and_once():
    embedder = SentenceTransformerEmbedder(EmbeddingConfig())
    assert embedder._model is None  # constructing loads nothing
    embedder.embed(["a"])
    model = embedder._model
    embedder.embed(["b"])
    assert embedder._model is model and isinstance(embedder, Embedder)


def test_progress_is_reported_per_batch(minilm):
    seen = []
    sharing(minilm, 2, progress=lambda done, total: seen.append((done, total))).embed(TEXTS)
    assert seen == [(2, 5), (4, 5), (5, 5)]  # 5 texts in batches of 2


def test_model_names_resolve():
    bundled = Path(resolve_model("all-MiniLM-L6-v2"))
    assert (bundled / "modules.json").is_file()
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == str(bundled)
    assert resolve_model("/models/my-embedder") == "/models/my-embedder"


def test_embedding_texts():
    assert embedding_texts(["q1", "q2"], ["a1", "a2"]) == ["a1", "a2"]
    assert embedding_texts(["q1"], ["a1"], "prompt_response") == ["q1\n\na1"]
    with pytest.raises(ValueError, match="unknown embedding text mode 'both'"):
        embedding_texts(["q"], ["a"], "both")


class HashEmbedder:
    """A 4-d embedder whose vector is a pure function of the text (sha256 bytes), counting what it embeds."""

    dim = 4

    def __init__(self):
        self.seen = []

    def embed(self, texts):
        self.seen += list(texts)
        out = np.array([list(hashlib.sha256(t.encode()).digest()[:4]) for t in texts], np.float32) + 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def unembedded_rows(n):
    return [
        {"id": candidate_id("r", 0, "p", k), "run": "r", "round": 0, "prompt_id": "p", "sample": k,
         "prompt": "question", "response": f"answer {k}", "n_tokens": 2, "finish_reason": "stop", "seed": 1,
         "policy": "init"}
        for k in range(n)
    ]  # fmt: skip


def test_embed_round_writes_vectors_and_resumes(tmp_path):
    store = Store(str(tmp_path / "s"), dim=4)
    store.upsert_candidates(unembedded_rows(5))
    embedder = HashEmbedder()
    assert embed_round(store, "r", 0, embedder, chunk_rows=2) == {"embedded": 5, "already_embedded": 0}
    got = np.array(store.read_rows("r", 0, ["vector"])["vector"].to_pylist(), np.float32)
    assert np.array_equal(got, embedder.embed([f"answer {k}" for k in range(5)]))
    embedder.seen.clear()
    store.update_candidates(["r/0/p/3"], vector=[None])  # as if the crash lost one chunk
    assert embed_round(store, "r", 0, embedder) == {"embedded": 1, "already_embedded": 4}
    assert embedder.seen == ["answer 3"]  # only the missing row was embedded again
    assert embed_round(store, "r", 0, embedder, text="prompt_response") == {
        "embedded": 0,
        "already_embedded": 5,
    }


def test_embed_round_checks_the_dim(tmp_path):
    store = Store(str(tmp_path / "s"), dim=8)
    with pytest.raises(ValueError, match="embedder dim 4 != store dim 8"):
        embed_round(store, "r", 0, HashEmbedder())
