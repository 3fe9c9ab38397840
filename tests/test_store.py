"""The LanceDB store: idempotent upserts, partial updates, pools vs a naive grouping, stages, tags, champion, filters."""

import json
import random

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from ampo.schema import candidate_id
from ampo.store import INDEX_MIN_ROWS, Store, StoreConflictError, round_tag
from ampo.store import filters as F
from ampo.store.tables import scan, upsert

DIM = 4


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def rows_for(run, round, sizes, *, seed=0, vectors=True):
    """One row per (prompt, sample) for pools of the given sizes; rewards and vectors random but seeded."""
    rng = np.random.default_rng(seed)
    rows = []
    for prompt_id, n in sizes.items():
        for k in range(n):
            row = {"id": candidate_id(run, round, prompt_id, k), "run": run, "round": round, "prompt_id": prompt_id,
                   "sample": k, "prompt": f"prompt {prompt_id}", "response": f"response {prompt_id} {k}",
                   "n_tokens": 10 + k, "finish_reason": "stop", "seed": 7, "policy": "init",
                   "reward": float(rng.standard_normal())}  # fmt: skip
            if vectors:
                row["vector"] = unit(rng.standard_normal(DIM))
            rows.append(row)
    return rows


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "store"), dim=DIM)


def test_upsert_twice_is_idempotent(store):
    rows = rows_for("run-a", 0, {"p1": 3, "p2": 2})
    v1 = store.upsert_candidates(rows)
    ids1 = sorted(store.read_rows("run-a", 0, ["id"])["id"].to_pylist())
    v2 = store.upsert_candidates(rows)
    assert store.count("run-a", 0) == 5 and store.candidates.count_rows() == 5
    assert sorted(store.read_rows("run-a", 0, ["id"])["id"].to_pylist()) == ids1
    assert v2 == v1 + 1  # one merge_insert, one commit


def test_upsert_replaces_a_changed_row(store):
    rows = rows_for("r", 0, {"p": 2})
    store.upsert_candidates(rows)
    rows[1]["response"] = "new text"
    store.upsert_candidates(rows[1:])
    assert store.read_rows("r", 0, ["response"])["response"].to_pylist() == ["response p 0", "new text"]


def test_partial_update_leaves_other_columns_alone(store):
    store.upsert_candidates(rows_for("r", 0, {"p": 3, "q": 2}))
    before = store.read_rows("r", 0)
    ids = ["r/0/p/1", "r/0/q/0"]
    store.update_candidates(ids, reward=[5.0, -5.0], reward_parts=['{"a": 5.0}', '{"a": -5.0}'])
    after = store.read_rows("r", 0)
    assert after["id"].to_pylist() == before["id"].to_pylist()  # same rows, same (prompt, sample) order
    for name in before.column_names:
        if name not in ("reward", "reward_parts"):
            assert after[name].to_pylist() == before[name].to_pylist(), name
    got = dict(zip(after["id"].to_pylist(), after["reward"].to_pylist(), strict=True))
    want = dict(zip(before["id"].to_pylist(), before["reward"].to_pylist(), strict=True)) | {
        ids[0]: 5.0,
        ids[1]: -5.0,
    }
    assert got == want


def test_update_vectors_from_a_2d_array(store):
    store.upsert_candidates(rows_for("r", 0, {"p": 3}, vectors=False))
    assert store.count("r", 0) == 3 and store.read_rows("r", 0, ["id"], embedded=True).num_rows == 0
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    store.update_candidates(["r/0/p/0", "r/0/p/1", "r/0/p/2"], vector=vectors)
    got = np.array(store.read_rows("r", 0, ["vector"])["vector"].to_pylist(), np.float32)
    assert np.array_equal(got, vectors)


@pytest.mark.parametrize(
    ("ids", "columns", "match"),
    [
        (["r/0/p/0"], {"sample": [3]}, "non-key columns"),  # keys never change
        (["r/0/p/0"], {}, "non-key columns"),
        (["r/0/p/0", "r/0/p/0"], {"reward": [1.0, 2.0]}, "repeats"),
        (["r/0/p/0"], {"role": ["winner"]}, "role 'winner'"),
        (["r/0/p/0"], {"vector": np.full((1, DIM), np.nan)}, "non-finite"),
        (["r/0/p/0"], {"vector": np.ones((1, DIM + 1))}, r"shape \(n, 4\), got \(1, 5\)"),
        (["r/0/p/0"], {"n_tokens": [1.5]}, "cannot be stored as int64"),
        (["r/0/p/0"], {"colour": ["red"]}, "unknown column"),
        (["r/0/p/0", "r/0/p/9"], {"reward": [1.0, 2.0]}, "1 of 2 ids are not candidates"),
    ],
)
def test_bad_updates_raise(store, ids, columns, match):
    store.upsert_candidates(rows_for("r", 0, {"p": 2}))
    with pytest.raises(ValueError, match=match):
        store.update_candidates(ids, **columns)


def test_bad_upserts_raise(store):
    rows = rows_for("r", 0, {"p": 2})
    with pytest.raises(ValueError, match="must be run/round/prompt_id/sample"):
        store.upsert_candidates([dict(rows[0], id="r/0/p/5")])
    with pytest.raises(ValueError, match="repeats"):
        store.upsert_candidates([rows[0], rows[0]])
    with pytest.raises(ValueError, match="required column 'response'"):
        store.upsert_candidates([{k: v for k, v in rows[0].items() if k != "response"}])
    with pytest.raises(ValueError, match="prompt_id 'a b'"):
        store.upsert_candidates([dict(rows[0], prompt_id="a b", id="r/0/a b/0")])
    assert store.candidates.count_rows() == 0  # nothing half-written


def naive_pools(rows):
    """Reference: group row dicts per prompt in Python, sort by sample, skip unusable rows."""
    groups = {}
    for r in rows:
        if r["dropped_reason"] is None and r["reward"] is not None and np.isfinite(r["reward"]):
            groups.setdefault(r["prompt_id"], []).append(r)
    out = {}
    for prompt_id in sorted(groups):
        g = sorted(groups[prompt_id], key=lambda r: r["sample"])
        out[prompt_id] = (
            [r["id"] for r in g],
            np.array([r["reward"] for r in g]),
            np.array([r["vector"] for r in g]),
        )
    return out


def test_read_pools_equals_naive_grouping(store):
    sizes = {"p3": 3, "p1": 1, "p10": 8, "p2": 5, "a": 2}  # varying N; "p10" sorts before "p2"
    rows = rows_for("run-a", 1, sizes, seed=1)
    random.Random(0).shuffle(rows)
    for start in range(0, len(rows), 6):  # several commits, shuffled order
        store.upsert_candidates(rows[start : start + 6])
    store.upsert_candidates(rows_for("run-a", 0, {"p1": 4}) + rows_for("run-b", 1, {"p1": 4}))  # other rounds
    pools = store.read_pools("run-a", 1)
    want = naive_pools(store.read_rows("run-a", 1).to_pylist())
    assert pools.prompt_ids == ["a", "p1", "p10", "p2", "p3"] == list(want)
    assert pools.offsets.tolist() == [0, 2, 3, 11, 16, 19]  # cumulative sizes 2, 1, 8, 5, 3
    for i, prompt_id in enumerate(pools.prompt_ids):
        ids, rewards, vectors = pools.pool(i)
        assert ids.tolist() == want[prompt_id][0]
        assert np.array_equal(rewards, want[prompt_id][1])
        assert np.array_equal(vectors, want[prompt_id][2].astype(np.float32))
        assert pools.samples[pools.offsets[i] : pools.offsets[i + 1]].tolist() == list(
            range(sizes[prompt_id])
        )
    assert pools.vectors.dtype == np.float32 and pools.vectors.shape == (19, DIM) and pools.n_excluded == 0


def test_padded_pools_equal_naive_padding(store):
    store.upsert_candidates(rows_for("r", 0, {"a": 3, "b": 1, "c": 2}, seed=2))
    pools = store.read_pools("r", 0)
    padded = pools.padded()
    assert padded.rewards.shape == (3, 3) and padded.vectors.shape == (3, 3, DIM)
    assert padded.lengths.tolist() == [3, 1, 2]
    assert padded.mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    for i in range(3):
        _, rewards, vectors = pools.pool(i)
        n = len(rewards)
        assert np.array_equal(padded.rewards[i, :n], rewards) and np.isnan(padded.rewards[i, n:]).all()
        assert np.array_equal(padded.vectors[i, :n], vectors) and not padded.vectors[i, n:].any()
    assert pools.to_ids(2, np.array([1, 0])).tolist() == ["r/0/c/1", "r/0/c/0"]
    with pytest.raises(ValueError, match="out of range"):
        pools.to_ids(1, [1])


def test_dropped_unscored_and_nan_rows_are_excluded_and_counted(store):
    store.upsert_candidates(rows_for("r", 0, {"p": 6, "q": 2}))
    store.update_candidates(
        ["r/0/p/0", "r/0/q/1"], dropped_reason=["nonfinite_reward"] * 2, reward=[None, None]
    )
    store.update_candidates(["r/0/p/3"], reward=[None])  # not scored
    store.update_candidates(["r/0/p/4"], reward=[float("nan")])  # non-finite but not marked
    pools = store.read_pools("r", 0)
    assert pools.n_excluded == 4  # 2 dropped + 1 unscored + 1 NaN
    assert pools.ids.tolist() == ["r/0/p/1", "r/0/p/2", "r/0/p/5", "r/0/q/0"]
    assert pools.offsets.tolist() == [0, 3, 4]
    assert store.count("r", 0) == 8  # nothing was lost


def test_read_pools_needs_vectors_unless_asked_not_to(store):
    store.upsert_candidates(rows_for("r", 0, {"p": 3}, vectors=False))
    with pytest.raises(ValueError, match="run the embed stage first"):
        store.read_pools("r", 0)
    pools = store.read_pools("r", 0, with_vectors=False)
    assert pools.vectors.shape == (3, 0) and len(pools) == 1


def test_set_selection_replaces_the_previous_selection(store):
    store.upsert_candidates(rows_for("r", 0, {"p": 4, "q": 3}))
    store.set_selection(
        "r", 0, ["r/0/p/0", "r/0/p/1", "r/0/q/2"], ["chosen", "rejected", "chosen"], selector="x"
    )
    store.set_selection(
        "r", 0, ["r/0/p/1", "r/0/p/3"], ["chosen", "rejected"], selector="coreset", clusters=[0, 1]
    )
    rows = store.read_rows(
        "r", 0, ["id", "selected", "role", "selector", "cluster"], selected=True
    ).to_pylist()
    assert rows == [
        {"id": "r/0/p/1", "selected": True, "role": "chosen", "selector": "coreset", "cluster": 0},
        {"id": "r/0/p/3", "selected": True, "role": "rejected", "selector": "coreset", "cluster": 1},
    ]
    cleared = store.read_rows("r", 0, ["role", "selector", "cluster"], selected=False).to_pylist()
    assert all(r == {"role": "", "selector": "", "cluster": None} for r in cleared) and len(cleared) == 5
    pools = store.read_pools("r", 0, selected_only=True)
    assert pools.prompt_ids == ["p"] and pools.ids.tolist() == ["r/0/p/1", "r/0/p/3"]
    with pytest.raises(ValueError, match="must belong to run 'r' round 0"):
        store.set_selection("r", 0, ["r/1/p/0"], ["chosen"], selector="x")


def test_stage_bookkeeping(store):
    assert store.stage_status("r", 0) == {} and not store.is_done("r", 0, "generate")
    store.stage_started("r", 0, "generate")
    assert store.stage_status("r", 0)["generate"]["status"] == "running" and not store.is_done(
        "r", 0, "generate"
    )
    version = store.upsert_candidates(rows_for("r", 0, {"p": 2}))
    record = store.stage_done("r", 0, "generate", {"rows": 2}, 1.5, metrics={"gen/tokens": 21.0})
    assert store.is_done("r", 0, "generate") and not store.is_done("r", 1, "generate")
    assert record["store_version"] == version  # the version holding the stage's data
    assert (
        record["counts"] == {"rows": 2}
        and record["metrics"] == {"gen/tokens": 21.0}
        and record["seconds"] == 1.5
    )
    assert record["attempts"] == 1 and record["started_at"] <= record["finished_at"]
    store.stage_started("r", 0, "score")
    store.stage_failed("r", 0, "score", "reward model out of memory")
    store.stage_started("r", 0, "score")  # the retry
    status = store.stage_status("r", 0)
    assert list(status) == ["generate", "score"]
    assert status["score"]["status"] == "running" and status["score"]["attempts"] == 2
    assert status["score"]["message"] == ""
    store.stage_done("r", 0, "promote", {}, 0.1, gate={"passed": False, "win_rate": 0.25})
    assert store.stage_status("r", 0)["promote"]["gate"] == {"passed": False, "win_rate": 0.25}
    assert store.stage_status("r", 0)["promote"]["attempts"] == 1  # done without a start record


def test_stage_records_from_what_the_runner_read_equal_the_stored_ones(store, monkeypatch):
    """run_stage passes its status read to stage_started and stage_started's record to stage_done: the record
    returned without a read back must equal the one stage_status reads, on a first attempt and on a retry that
    keeps the earlier attempt's fields until done replaces them; and the two commits are the only table accesses."""
    from ampo.store import stage_records

    reads = []
    monkeypatch.setattr(stage_records, "scan", lambda *a, **k: reads.append("scan") or scan(*a, **k))
    started = store.stage_started("r", 0, "generate", previous=None)
    assert started["attempts"] == 1 and reads == []
    version = store.upsert_candidates(rows_for("r", 0, {"p": 2}))
    rounds_version = store.rounds.version
    record = store.stage_done("r", 0, "generate", {"rows": np.int64(2)}, 1.5, metrics={"gen/tokens": 21.0},
                              started=started)  # fmt: skip
    assert reads == [] and store.rounds.version == rounds_version + 1  # one commit, no read
    assert record == store.stage_status("r", 0)["generate"]
    assert record["store_version"] == version and record["counts"] == {"rows": 2} and record["attempts"] == 1
    previous = store.stage_status("r", 0)["generate"]
    reads.clear()
    again = store.stage_started("r", 0, "generate", previous=previous)  # a forced re-run: attempt 2
    assert again["attempts"] == 2 and reads == []
    assert store.stage_status("r", 0)["generate"]["counts"] == {"rows": 2}  # kept while running
    record = store.stage_done("r", 0, "generate", {}, 0.25, gate={"passed": True}, started=again)
    assert record == store.stage_status("r", 0)["generate"]
    assert (record["attempts"], record["counts"], record["gate"], record["seconds"]) == (2, {}, {"passed": True}, 0.25)


def test_stage_status_copy_equals_the_table_after_every_write(store, tmp_path, monkeypatch):
    """stage_status answers from the records this process read or wrote while the rounds table has no other commit
    (a version check, no scan): after each kind of write (a new row, a retry over an existing one, a failure, a
    done without a start) it must equal a fresh read; another process's commit is seen at once."""
    from ampo.store import stage_records

    def fresh():
        return stage_records.stage_status(store.rounds, "r", 0)

    reads = []
    monkeypatch.setattr(stage_records, "scan", lambda *a, **k: reads.append("scan") or scan(*a, **k))
    assert store.stage_status("r", 0) == {} and reads == ["scan"]  # the first question reads the table
    steps = [
        lambda: store.stage_started("r", 0, "generate", previous=None),  # a new row: the table's defaults
        lambda: store.stage_done("r", 0, "generate", {"rows": 2}, 1.5, started=store.stage_status("r", 0)["generate"]),
        lambda: store.stage_started("r", 0, "score", previous=None),
        lambda: store.stage_failed("r", 0, "score", "out of memory"),  # over an existing row
        lambda: store.stage_started("r", 0, "score", previous=store.stage_status("r", 0)["score"]),  # attempt 2
        lambda: store.stage_failed("r", 0, "embed", "never started"),  # a new row written by a failure
        lambda: store.stage_done("r", 0, "promote", {}, 0.1, gate={"passed": True}),  # done without a start
    ]
    for step in steps:
        step()
        reads.clear()
        cached = store.stage_status("r", 0)
        assert reads == [], "answered from the copy"  # no scan: the table moved only by this process's commit
        assert cached == fresh()
        assert list(cached) == list(fresh())  # in the same order
    assert store.stage_status("r", 0)["score"]["attempts"] == 2 and store.stage_status("r", 0)["score"]["message"] == ""
    assert store.stage_status("r", 1) == {}  # round 1's first read; then its writes keep round 0's copy valid
    store.stage_started("r", 1, "generate", previous=None)
    reads.clear()
    cached = store.stage_status("r", 0)
    assert reads == [] and cached == fresh()
    assert store.stage_status("r", 1) == stage_records.stage_status(store.rounds, "r", 1)
    cached = store.stage_status("r", 0)
    cached["generate"]["status"] = "edited by a caller"  # callers get copies
    assert store.stage_status("r", 0)["generate"]["status"] == "done"
    other = Store(store.uri, store.dim)  # another process's handle on the same store
    other.stage_done("r", 0, "score", {"scored": 3}, 0.5)
    reads.clear()
    assert store.stage_status("r", 0)["score"]["status"] == "done" and reads == ["scan"]  # its commit is read


def test_background_stage_records_commit_in_order_and_writes_wait_for_them(store, monkeypatch):
    """background=True: stage_started / stage_done return before their commit; stage_status answers with them at once
    (its round) or as read before them (another round); the next write of the Store waits until they are durable, in
    the order given; afterwards the copy equals a fresh read, as after synchronous writes."""
    import threading
    import time

    import ampo.store.store as store_module
    from ampo.store import stage_records

    gate, committed = threading.Event(), []

    def slow_upsert(table, rows, **kwargs):  # the writer thread waits for the gate: the commits are pending
        if threading.current_thread().name.startswith("ampo-stage-records"):
            gate.wait(10)
            committed.append(rows["status"][0].as_py())
        return upsert(table, rows, **kwargs)

    monkeypatch.setattr(store_module, "upsert", slow_upsert)
    assert store.stage_status("r", 0) == {} and store.stage_status("r", 1) == {}
    start = time.perf_counter()
    started = store.stage_started("r", 0, "generate", previous=None, background=True)
    assert store.stage_status("r", 0)["generate"]["status"] == "running"  # with the pending record
    assert store.stage_status("r", 1) == {}  # another round: as read before, no waiting
    done = store.stage_done("r", 0, "generate", {"rows": 2}, 1.5, started=started, background=True)
    assert time.perf_counter() - start < 5 and committed == []  # nothing waited for the gate
    assert store.stage_status("r", 0)["generate"] == done
    assert stage_records.stage_status(store.rounds, "r", 0) == {}  # not durable yet
    threading.Timer(0.2, gate.set).start()
    store.upsert_candidates(rows_for("r", 0, {"p": 1}))  # a write: waits for both, in order
    assert committed == ["running", "done"]
    assert stage_records.stage_status(store.rounds, "r", 0) == store.stage_status("r", 0) == {"generate": done}
    assert done["attempts"] == 1 and done["counts"] == {"rows": 2} and done["store_version"] == store.version - 1


def test_a_background_stage_record_that_fails_is_written_again_or_raised(store, monkeypatch):
    """A failed background commit is retried by settle (and the records after it, which the writer then skips, are
    written in order); a second failure is raised, that record and the ones after it stay pending (stage_status
    answers with them), and the next settle writes them; a background start after a failed commit settles first."""
    import ampo.store.store as store_module
    from ampo.store import stage_records

    failures = []

    def flaky_upsert(table, rows, **kwargs):
        if failures and rows["status"][0].as_py() == failures[0]:
            failures.pop(0)
            raise OSError(f"commit failed ({rows['status'][0].as_py()})")
        return upsert(table, rows, **kwargs)

    monkeypatch.setattr(store_module, "upsert", flaky_upsert)
    store.stage_status("r", 0)
    failures[:] = ["running"]  # the writer's try fails; settle's succeeds; "done" after it is skipped, then written
    started = store.stage_started("r", 0, "generate", previous=None, background=True)
    store.stage_done("r", 0, "generate", {"rows": 2}, 1.5, started=started, background=True)
    store.settle()
    assert failures == [] and stage_records.stage_status(store.rounds, "r", 0)["generate"]["status"] == "done"
    assert store.stage_status("r", 0) == stage_records.stage_status(store.rounds, "r", 0)
    previous = store.stage_status("r", 0).get("score")
    failures[:] = ["running", "running"]  # both tries fail: raised; the done record after it is not written
    started = store.stage_started("r", 0, "score", previous=previous, background=True)
    store.stage_done("r", 0, "score", {}, 0.5, started=started, background=True)
    with pytest.raises(OSError, match="commit failed"):
        store.settle()
    assert "score" not in stage_records.stage_status(store.rounds, "r", 0)  # neither record written
    assert store.stage_status("r", 0)["score"]["status"] == "done"  # still pending, in order
    store.settle()  # a later settle (a retried task) writes both
    assert store.stage_status("r", 0) == stage_records.stage_status(store.rounds, "r", 0)
    assert store.stage_status("r", 0)["score"]["status"] == "done"
    failures[:] = ["running", "running"]  # embed's start fails in the writer; the next stage's start waits for it
    started = store.stage_started("r", 0, "embed", previous=None, background=True)
    store.stage_done("r", 0, "embed", {}, 0.5, started=started, background=True)
    store._pending[0][0].exception()  # the writer has tried "running" (and failed): a failed commit is known
    with pytest.raises(OSError, match="commit failed"):  # raised at the next stage's start, before its work
        store.stage_started("r", 0, "select", previous=None, background=True)
    store.settle()
    assert stage_records.stage_status(store.rounds, "r", 0)["embed"]["status"] == "done"


def test_tag_pins_a_round_and_checkout_reads_it(store):
    store.upsert_candidates(rows_for("run-a", 0, {"p": 3}))
    tag = store.tag_round("run-a", 0)
    assert tag == "run-a-r0" and store.tag_round("run-a", 0) == tag  # idempotent
    store.update_candidates(["run-a/0/p/0"], response=["rewritten"])
    store.upsert_candidates(rows_for("run-a", 1, {"p": 2}))
    view = store.checkout_round("run-a", 0)
    assert view.read_rows("run-a", 0, ["response"])["response"].to_pylist()[0] == "response p 0"
    assert store.read_rows("run-a", 0, ["response"])["response"].to_pylist()[0] == "rewritten"
    assert view.count("run-a", 1) == 0 and store.count("run-a", 1) == 2
    assert view.prompt_pool("run-a", 0, "p").num_rows == 3
    assert not hasattr(view, "update_candidates")
    with pytest.raises(ValueError, match="cannot be modified"):  # LanceDB itself refuses writes to a checkout
        view.table.add(store.read_rows("run-a", 1))
    with pytest.raises(ValueError, match="has no tag 'run-a-r5'"):
        store.checkout_round("run-a", 5)


def test_round_tag_names_fit_the_tag_charset(store):
    assert round_tag("exp.1_b", 12) == "exp.1_b-r12"
    odd = round_tag("a..b", 0)  # lance tags may not contain '..'
    assert ".." not in odd and odd != round_tag("a__b", 0) and odd.endswith("-r0")
    store.upsert_candidates(rows_for("a..b", 0, {"p": 1}))
    assert store.tag_round("a..b", 0) == odd and store.checkout_round("a..b", 0).count("a..b", 0) == 1


def checkpoint(id, round, status="candidate", parent=None):
    return {"id": id, "run": "r", "round": round, "path": f"/ckpt/{id}", "status": status, "parent": parent,
            "metrics": {"reward": round / 10}, "config_hash": "abc"}  # fmt: skip


def test_exactly_one_champion_after_each_swap(store):
    for i in range(3):
        store.upsert_checkpoint(checkpoint(f"r/c{i}", i - 1, parent=f"r/c{i - 1}" if i else None))
    store.upsert_checkpoint(dict(checkpoint("other/c0", -1), run="other"))
    assert store.champion("r") is None
    for i in range(3):
        version = store.checkpoints.version
        assert store.set_champion("r", f"r/c{i}") == version + 1  # promote + retire: one commit
        statuses = {c["id"]: c["status"] for c in store.list_checkpoints("r")}
        assert list(statuses.values()).count("champion") == 1 and statuses[f"r/c{i}"] == "champion"
        assert all(statuses[f"r/c{j}"] == "retired" for j in range(i))
    assert (
        store.champion("r")["metrics"] == {"reward": 0.1} and store.champion("r")["promoted_at"] is not None
    )
    assert store.set_champion("r", "r/c2") == store.checkpoints.version  # re-promoting writes nothing
    assert store.get_checkpoint("other/c0")["status"] == "candidate"  # other runs untouched


def test_champion_is_only_set_by_set_champion(store):
    with pytest.raises(ValueError, match="only by set_champion"):
        store.upsert_checkpoint(checkpoint("r/c0", -1, status="champion"))
    with pytest.raises(ValueError, match="status 'best'"):
        store.upsert_checkpoint(checkpoint("r/c0", -1, status="best"))
    store.upsert_checkpoint(checkpoint("r/c0", -1))
    with pytest.raises(ValueError, match="not found in run 'r'"):
        store.set_champion("r", "r/c9")
    with pytest.raises(ValueError, match="not found in run 'x'"):
        store.set_champion("x", "r/c0")
    store.upsert_checkpoint(
        {"id": "r/c0", "status": "rejected"}
    )  # a partial update of an existing checkpoint
    assert (
        store.get_checkpoint("r/c0")["status"] == "rejected"
        and store.get_checkpoint("r/c0")["path"] == "/ckpt/r/c0"
    )
    # the champion's status cannot be overwritten by an upsert: the run would be left with no champion
    store.set_champion("r", "r/c0")
    with pytest.raises(ValueError, match=r"'r/c0' is the champion of run 'r'; its status changes only through"):
        store.upsert_checkpoint(checkpoint("r/c0", -1, status="candidate"))
    store.upsert_checkpoint({"id": "r/c0", "metrics": {"reward": 0.5}})  # other columns may change
    assert store.champion("r")["id"] == "r/c0" and store.champion("r")["metrics"] == {"reward": 0.5}


INJECTIONS = ["x' OR '1'='1", "x'OR'1'='1", "p') OR (1=1", "p; DROP TABLE candidates",
              "nope\\')OR(1=1)--"]  # a backslash before the quote: lit() doubles the quote, not the backslash


@pytest.mark.parametrize("text", INJECTIONS)
def test_filter_injection_raises_or_matches_nothing(store, text):
    store.upsert_candidates(rows_for("r", 0, {"p": 2, "q": 1}))
    store.upsert_checkpoint(checkpoint("r/c0", -1))
    for query in (
        lambda: store.prompt_pool("r", 0, text),
        lambda: store.read_rows(text, 0),
        lambda: store.count("r", text),
        lambda: store.neighbours(unit([1, 0, 0, 0]), 3, run=text),
        lambda: store.stage_status(text, 0),
    ):
        with pytest.raises(ValueError):
            query()
    with pytest.raises(ValueError, match="must be 1-512 characters from"):
        store.get_checkpoint(text)  # ids hold no quotes, backslashes, spaces or semicolons
    with pytest.raises(ValueError, match="must be 1-512 characters from"):
        F.id_is(text)


def test_filters_quote_values():
    assert F.id_is("r/0/p-1:a@b/3") == "(id = 'r/0/p-1:a@b/3')"
    assert F.round_is("r", 3) == "((`run` = 'r')) AND ((round = 3))"
    with pytest.raises(ValueError):
        F.selected_is("true")


def test_audit_queries(store):
    axes = np.eye(DIM, dtype=np.float32)
    rows = rows_for("r", 0, {"p": 4, "q": 2}) + rows_for("r", 1, {"p": 1})
    for row, vector, reward in zip(rows, [axes[0], axes[1], axes[2], axes[3], unit([1, 1, 0, 0]), axes[2], axes[0]],
                                   [0.5, 2.0, -1.0, None, 0.0, 1.0, 9.0], strict=True):  # fmt: skip
        row["vector"], row["reward"] = vector, reward
    store.upsert_candidates(rows)
    pool = store.prompt_pool("r", 0, "p")
    assert pool["sample"].to_pylist() == [1, 0, 2, 3] and pool["reward"].to_pylist() == [2.0, 0.5, -1.0, None]
    assert store.prompt_pool("r", 0, "nobody").num_rows == 0
    store.set_selection(
        "r", 0, ["r/0/p/2", "r/0/p/1", "r/0/q/1"], ["rejected", "chosen", "chosen"], selector="x"
    )
    groups = store.selected_groups("r", 0)
    assert list(groups) == ["p", "q"]
    assert groups["p"]["id"].to_pylist() == ["r/0/p/1", "r/0/p/2"]  # chosen first
    near = store.neighbours(axes[0], 2, run="r", round=0)
    assert near["id"].to_pylist() == ["r/0/p/0", "r/0/q/0"]  # distance 0, then 1 - cos(45 deg)
    assert near["_distance"].to_numpy() == pytest.approx([0.0, 1 - np.sqrt(0.5)], abs=1e-6)
    assert store.neighbours(axes[0], 1, run="r")["id"].to_pylist()[0] in ("r/0/p/0", "r/1/p/0")
    assert store.neighbours(axes[0], 1, run="r", round=1)["id"].to_pylist() == ["r/1/p/0"]
    same = store.neighbours_of_row("r/0/p/2", 1)  # axes[2]; q/1 is the same vector
    assert same["id"].to_pylist() == ["r/0/q/1"] and same["_distance"][0].as_py() == pytest.approx(
        0.0, abs=1e-6
    )
    assert "r/0/p/0" not in store.neighbours_of_row("r/0/p/0", 10)["id"].to_pylist()
    text = store.neighbours(
        "any text", 1, run="r", round=0, embed=lambda texts: np.stack([axes[1]] * len(texts))
    )
    assert text["id"].to_pylist() == ["r/0/p/1"]
    with pytest.raises(ValueError, match="needs embed="):
        store.neighbours("any text", 1)
    with pytest.raises(ValueError, match="4 finite floats"):
        store.neighbours(np.ones(3), 1)


def test_existing_store_with_another_dim_raises(tmp_path):
    Store(str(tmp_path / "s"), dim=DIM)
    with pytest.raises(ValueError, match="different schema"):
        Store(str(tmp_path / "s"), dim=8)


def test_a_store_written_before_the_instruction_columns_opens_and_reads_them_as_null(tmp_path):
    """A store from before the rows kept their prompt's instructions gains the two columns, null, on opening."""
    from ampo.schema import make_candidate_model
    from ampo.store.rows import to_table

    new = ["instruction_id_list", "instruction_kwargs"]
    full = make_candidate_model(DIM).to_arrow_schema()
    old_schema = pa.schema([f for f in full if f.name not in new])
    assert list(full.names[-2:]) == new  # added at the end: the only change open_table applies by itself
    old_rows = to_table(rows_for("r", 0, {"p": 2}), make_candidate_model(DIM)).drop_columns(new)
    lancedb.connect(str(tmp_path / "s")).create_table("candidates", old_rows, schema=old_schema)

    store = Store(str(tmp_path / "s"), dim=DIM)
    assert store.candidates.schema.names == full.names
    got = store.read_rows("r", 0, ["id", "response", *new]).to_pylist()
    assert [(r["id"], r["response"]) for r in got] == [("r/0/p/0", "response p 0"), ("r/0/p/1", "response p 1")]
    assert all(r["instruction_id_list"] is None and r["instruction_kwargs"] is None for r in got)
    row = dict(rows_for("r", 0, {"q": 1})[0], instruction_id_list=["punctuation:no_comma"], instruction_kwargs="[{}]")
    store.upsert_candidates([row])
    assert store.read_rows("r", 0, new)["instruction_id_list"].to_pylist() == [None, None, ["punctuation:no_comma"]]
    assert Store(str(tmp_path / "s"), dim=DIM).count("r", 0) == 3  # reopening changes nothing more


def test_stage_records_of_one_run_or_all(store):
    store.stage_done("b", 1, "generate", {"rows": 1}, 0.5)
    store.stage_done("a", 0, "generate", {"rows": 2}, 0.5)
    store.stage_done("a", 0, "promote", {}, 0.1, gate={"passed": True})
    assert [(r["run"], r["round"], r["stage"]) for r in store.stage_records("b")] == [("b", 1, "generate")]
    every = store.stage_records()
    assert [(r["run"], r["round"]) for r in every] == [("a", 0), ("a", 0), ("b", 1)]
    assert {r["stage"]: r["gate"] for r in every if r["run"] == "a"} == {"generate": None, "promote": {"passed": True}}
    assert every[-1]["counts"] == {"rows": 1}  # decoded


def test_the_store_is_composed_not_a_view_subclass(store):
    from ampo.store import CandidatesView

    assert not isinstance(store, CandidatesView) and isinstance(store.latest, CandidatesView)
    assert store.latest.table is store.candidates and store.version == store.candidates.version


def test_reopened_store_sees_writes_of_another_handle(tmp_path):
    a, b = Store(str(tmp_path / "s"), dim=DIM), Store(str(tmp_path / "s"), dim=DIM)
    a.upsert_candidates(rows_for("r", 0, {"p": 2}))
    assert b.count("r", 0) == 2 and b.version == a.version


def test_memory_uri(tmp_path):
    store = Store("memory://", dim=DIM)
    store.upsert_candidates(rows_for("r", 0, {"p": 2}))
    assert store.read_pools("r", 0).ids.tolist() == ["r/0/p/0", "r/0/p/1"]


def test_object_store_uri_is_passed_through(monkeypatch):
    seen = {}

    def fake_connect(uri, **kwargs):
        seen["uri"] = uri
        raise ConnectionAbortedError("stop here")

    monkeypatch.setattr(lancedb, "connect", fake_connect)
    with pytest.raises(ConnectionAbortedError):
        Store("s3://bucket/runs/store", dim=DIM)
    assert seen["uri"] == "s3://bucket/runs/store"


def test_optimize_indexes_keep_reads_equal(store):
    assert INDEX_MIN_ROWS == 100_000
    store.upsert_candidates(rows_for("r", 0, {"p": 3, "q": 2}))
    before = store.read_pools("r", 0)
    assert store.optimize() == []  # below the threshold: no index
    assert sorted(store.optimize(index_min_rows=1)) == ["id", "round", "run"]
    after = store.read_pools("r", 0)
    assert after.ids.tolist() == before.ids.tolist() and np.array_equal(after.vectors, before.vectors)
    store.update_candidates(["r/0/p/0"], reward=[3.0])  # merge_insert with the id index in place
    assert store.read_pools("r", 0).rewards[0] == 3.0 and store.count("r", 0) == 5


class FailingTable:
    """A table whose merge_insert fails with `message`, as LanceDB does when a commit loses a race."""

    name = "candidates"

    def __init__(self, message):
        self.message = message

    def merge_insert(self, on):
        return self

    def when_matched_update_all(self, where=None):
        return self

    def when_not_matched_insert_all(self):
        return self

    def execute(self, data, **kwargs):
        raise RuntimeError(self.message)


def test_commit_conflicts_raise_a_clear_error():
    data = pa.table({"id": ["a"]})
    with pytest.raises(StoreConflictError, match="one writer per table per stage"):
        upsert(FailingTable("Retryable commit conflict for version 7"), data)
    with pytest.raises(RuntimeError, match="disk full") as info:
        upsert(FailingTable("disk full"), data)
    assert not isinstance(info.value, StoreConflictError)


def test_reward_parts_round_trip_as_json(store):
    rows = rows_for("r", 0, {"p": 1})
    rows[0]["reward_parts"] = json.dumps({"verifiable": 1.0, "length": -0.5})
    store.upsert_candidates(rows)
    parts = store.read_rows("r", 0, ["reward_parts"])["reward_parts"][0].as_py()
    assert json.loads(parts) == {"verifiable": 1.0, "length": -0.5}


def test_read_rows_rejects_unknown_columns(store):
    with pytest.raises(ValueError, match="unknown candidates column"):
        store.read_rows("r", 0, ["id", "score"])
    assert isinstance(store.read_rows("r", 0, ["id"]), pa.Table)


def test_prompt_offsets_and_split_by_prompt_cut_sorted_rows_into_runs():
    import pyarrow as pa

    from ampo.store.pools import prompt_offsets, split_by_prompt

    ids = ["a", "a", "b", "c", "c", "c"]  # runs of 2, 1, 3 -> offsets 0, 2, 3, 6
    for given in (ids, np.array(ids, dtype=object), pa.chunked_array([ids[:3], ids[3:]])):
        assert prompt_offsets(given).tolist() == [0, 2, 3, 6]
    assert prompt_offsets([]).tolist() == [0]
    rows = [{"prompt_id": p, "i": i} for i, p in enumerate(ids)]
    assert [[r["i"] for r in pool] for pool in split_by_prompt(rows)] == [[0, 1], [2], [3, 4, 5]]
    assert split_by_prompt([]) == []
