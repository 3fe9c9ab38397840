"""Store throughput: writing and reading one round of P prompts x N responses x d-dim vectors.

    .venv/bin/python benchmarks/store.py                 # 10,000 x 32 x 384 = 320k rows (a few minutes)
    .venv/bin/python benchmarks/store.py --prompts 500   # quick

Measures, each against a baseline timed in the same run:
- writes: upsert_candidates (merge_insert) in 64-prompt batches, as the generate stage writes, vs one bulk
  `table.add` of the same rows; a re-run of the same batches (all matched, nothing inserted); update_candidates of
  one column for the whole round (the score stage);
- reads: read_pools over the whole round vs `table.to_pandas()` + per-prompt Python grouping (arrays compared equal);
- search: filtered neighbour search (k=10, one round) latency, vs numpy brute force over the round's vectors;
- audit queries (count, prompt_pool, selected_groups, neighbours_of_row, a one-prompt update_candidates, read_rows)
  on the store as written, after `optimize` compaction alone, and after `optimize` with the id/run/round indexes
  (what the end of a round does once the store holds INDEX_MIN_ROWS rows); the first is the baseline.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LANCE_LOG", "error")

import lancedb
import numpy as np
import pyarrow as pa

from ampo.schema import make_candidate_model
from ampo.store import Store
from ampo.store.rows import to_table, vectors_to_arrow

RUN = "bench"


def make_rows(prompts: int, n: int, dim: int, round: int = 0, seed: int = 0) -> pa.Table:
    """P*N synthetic candidate rows: ~300-character responses, unit-norm vectors, a few dropped rows."""
    rng = np.random.default_rng(seed)
    rows = prompts * n
    prompt_ids = np.repeat([f"p{i:06d}" for i in range(prompts)], n)
    samples = np.tile(np.arange(n), prompts)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    words = np.array(["the", "model", "answer", "is", "a", "short", "list", "of", "words", "and", "numbers"])
    text = " ".join(rng.choice(words, 60))  # one text body, varied by a per-row prefix
    reward = rng.standard_normal(rows)
    dropped = rng.random(rows) < 0.002
    columns = {
        "id": [f"{RUN}/{round}/{p}/{s}" for p, s in zip(prompt_ids, samples, strict=True)],
        "run": [RUN] * rows,
        "round": np.full(rows, round),
        "prompt_id": prompt_ids,
        "sample": samples,
        "prompt": [f"prompt {p}: write a short list" for p in prompt_ids],
        "response": [f"{i} {text}" for i in range(rows)],
        "n_tokens": rng.integers(20, 400, rows),
        "finish_reason": ["stop"] * rows,
        "seed": np.full(rows, 1234),
        "policy": ["init"] * rows,
        "reward": np.where(dropped, np.nan, reward),
        "vector": vectors_to_arrow(vectors, dim),
        "dropped_reason": np.where(dropped, "nonfinite_reward", None),
    }
    table = to_table(columns, make_candidate_model(dim))
    reward = pa.array(np.where(dropped, None, reward), pa.float64(), from_pandas=True)
    return table.set_column(table.schema.get_field_index("reward"), "reward", reward)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def naive_pools(table: lancedb.table.Table) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """The baseline: whole table to pandas, then one Python group per prompt."""
    df = table.to_pandas()
    df = df[(df["run"] == RUN) & (df["round"] == 0) & df["dropped_reason"].isna() & df["reward"].notna()]
    prompt_ids, rewards, vectors = [], [], []
    for prompt_id, group in df.groupby("prompt_id", sort=True):
        group = group.sort_values("sample")
        prompt_ids.append(prompt_id)
        rewards.append(group["reward"].to_numpy())
        vectors.append(np.stack(group["vector"].to_list()).astype(np.float32))
    return prompt_ids, rewards, vectors


def bench_writes(root: Path, rows: pa.Table, batch_rows: int, dim: int) -> dict[str, float]:
    bulk_db = lancedb.connect(str(root / "bulk"))
    bulk = bulk_db.create_table("candidates", schema=rows.schema)
    t_bulk, _ = timed(bulk.add, rows)
    store = Store(str(root / "store"), dim=dim)
    batches = [rows.slice(i, batch_rows) for i in range(0, rows.num_rows, batch_rows)]
    t_merge, _ = timed(lambda: [store.upsert_candidates(b) for b in batches])
    assert store.count(RUN, 0) == rows.num_rows, "merge_insert lost or duplicated rows"
    rerun = batches[:8]
    t_rerun, _ = timed(lambda: [store.upsert_candidates(b) for b in rerun])
    assert store.count(RUN, 0) == rows.num_rows, "re-running batches duplicated rows"
    ids = rows["id"]
    t_update, _ = timed(store.update_candidates, ids, n_tokens=np.arange(rows.num_rows))
    return {"bulk": t_bulk, "merge": t_merge, "batches": len(batches), "rerun": t_rerun / len(rerun),
            "update": t_update}  # fmt: skip


def select_some(store: Store, prompts: int, n: int) -> None:
    """A selection like coreset k=3 writes: 1 chosen + 3 rejected per prompt (the first 4 samples)."""
    ids = [f"{RUN}/0/p{i:06d}/{s}" for i in range(prompts) for s in range(min(4, n))]
    roles = ["chosen" if k % min(4, n) == 0 else "rejected" for k in range(len(ids))]
    store.set_selection(RUN, 0, ids, roles, selector="bench")


AUDIT_QUERIES = ("count", "prompt_pool", "selected_groups", "neighbours_of_row", "update one prompt", "read_rows")


def bench_audit(store: Store, prompts: int, n: int, repeats: int = 10) -> dict[str, float]:
    """Seconds per audit query (median of `repeats`, or the single whole-round reads), on the store as it is now."""
    rng = np.random.default_rng(2)
    picks = [f"p{i:06d}" for i in rng.integers(0, prompts, repeats)]
    out = {"count": statistics.median(timed(store.count, RUN, 0)[0] for _ in range(repeats))}
    out["prompt_pool"] = statistics.median(timed(store.prompt_pool, RUN, 0, p)[0] for p in picks)
    t_groups, groups = timed(store.selected_groups, RUN, 0)
    assert len(groups) == prompts, f"selected_groups found {len(groups)} of {prompts} prompts"
    out["selected_groups"] = t_groups
    out["neighbours_of_row"] = statistics.median(timed(store.neighbours_of_row, f"{RUN}/0/{p}/1", 10)[0]
                                                 for p in picks)  # fmt: skip
    updates = [[f"{RUN}/0/{p}/{s}" for s in range(n)] for p in picks]
    out["update one prompt"] = statistics.median(timed(store.update_candidates, ids, n_tokens=np.arange(n))[0]
                                                 for ids in updates)  # fmt: skip
    out["read_rows"] = timed(store.read_rows, RUN, 0, ["id", "reward", "role"])[0]
    return out


def bench_reads(root: Path, dim: int) -> dict[str, float]:
    store = Store(str(root / "store"), dim=dim)
    t_pools, pools = timed(store.read_pools, RUN, 0)
    t_pools2, _ = timed(store.read_pools, RUN, 0)
    t_naive, (prompt_ids, rewards, vectors) = timed(naive_pools, store.candidates)
    assert pools.prompt_ids == prompt_ids, "read_pools prompt order differs from the naive grouping"
    for i in range(0, len(prompt_ids), max(1, len(prompt_ids) // 50)):
        _, r, v = pools.pool(i)
        assert np.array_equal(r, rewards[i]) and np.array_equal(v, vectors[i]), f"pool {i} differs"
    t_padded, _ = timed(pools.padded)
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((20, dim)).astype(np.float32)
    lat = [timed(store.neighbours, q, 10, run=RUN, round=0)[0] for q in queries]
    brute = [timed(_brute_force, pools.vectors, q, 10)[0] for q in queries]
    got = store.neighbours(queries[0], 10, run=RUN, round=0)["id"].to_pylist()
    want = pools.ids[_brute_force(pools.vectors, queries[0], 10)].tolist()
    return {"pools": min(t_pools, t_pools2), "naive": t_naive, "padded": t_padded, "rows": len(pools.ids),
            "excluded": pools.n_excluded, "search_ms": 1e3 * statistics.median(lat),
            "brute_ms": 1e3 * statistics.median(brute), "search_overlap": len(set(got) & set(want))}  # fmt: skip


def _brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    sims = vectors @ (query / np.linalg.norm(query))  # unit-norm rows: cosine similarity
    top = np.argpartition(-sims, k)[:k]
    return top[np.argsort(-sims[top])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--n", type=int, default=32, help="responses per prompt")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument(
        "--batch-prompts", type=int, default=64, help="prompts per upsert, as generate writes"
    )
    parser.add_argument("--dir", default=None, help="store folder (default: a temporary folder)")
    args = parser.parse_args()
    rows = make_rows(args.prompts, args.n, args.dim)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        w = bench_writes(Path(tmp), rows, args.batch_prompts * args.n, args.dim)
        store = Store(str(Path(tmp) / "store"), dim=args.dim)
        select_some(store, args.prompts, args.n)
        audit = {"as written (baseline)": bench_audit(store, args.prompts, args.n)}
        t_compact, _ = timed(store.optimize, index_min_rows=2**62)  # compaction only
        audit["after optimize: compaction only"] = bench_audit(store, args.prompts, args.n)
        t_index, created = timed(store.optimize, index_min_rows=1)  # + the id / run / round indexes
        audit[f"after optimize: indexes on {', '.join(created) or 'none (existed)'}"] = bench_audit(
            store, args.prompts, args.n)
        r = bench_reads(Path(tmp), args.dim)
    n = rows.num_rows
    print(f"\n{args.prompts} prompts x {args.n} responses x {args.dim}-d = {n:,} rows\n")
    print("| measurement | time | rows/s | vs baseline |\n|---|---|---|---|")
    print(f"| bulk `table.add` (baseline) | {w['bulk']:.2f} s | {n / w['bulk']:,.0f} | 1.0x |")
    print(f"| `upsert_candidates`, {w['batches']} batches of {args.batch_prompts} prompts | {w['merge']:.2f} s | "
          f"{n / w['merge']:,.0f} | {w['merge'] / w['bulk']:.1f}x slower |")  # fmt: skip
    per = w["rerun"]
    print(
        f"| re-run of a batch (all rows matched) | {per:.2f} s/batch | {args.batch_prompts * args.n / per:,.0f} | |"
    )
    print(f"| `update_candidates` one column, whole round | {w['update']:.2f} s | {n / w['update']:,.0f} | |")
    print(f"| `optimize()` compaction only | {t_compact:.2f} s | | |")
    print(f"| `optimize()` indexes ({', '.join(created) or 'none'}) | {t_index:.2f} s | | |")
    print(
        f"| naive `to_pandas` + per-prompt grouping (baseline) | {r['naive']:.2f} s | {n / r['naive']:,.0f} | 1.0x |"
    )
    print(f"| `read_pools` whole round | {r['pools']:.2f} s | {n / r['pools']:,.0f} | "
          f"{r['naive'] / r['pools']:.1f}x faster |")  # fmt: skip
    print(f"| `Pools.padded()` | {r['padded']:.2f} s | | |")
    print(f"| numpy brute force k=10 over the round (baseline) | {r['brute_ms']:.1f} ms | | 1.0x |")
    print(f"| `neighbours` k=10, filtered to the round (median of 20) | {r['search_ms']:.1f} ms | | "
          f"{r['search_ms'] / r['brute_ms']:.1f}x |")  # fmt: skip
    print(f"\nread_pools: {r['rows']:,} usable rows, {r['excluded']} excluded (dropped); "
          f"neighbours top-10 agrees with brute force on {r['search_overlap']}/10")  # fmt: skip
    print("\nAudit queries (ms; median of 10 for the per-prompt and per-row queries; ratio to the store as written)\n")
    states = list(audit)
    print("| query | " + " | ".join(states) + " |\n|---|" + "---|" * len(states))
    base = audit[states[0]]
    for query in AUDIT_QUERIES:
        cells = [f"{1e3 * audit[s][query]:.1f}" + ("" if s == states[0] else f" ({base[query] / audit[s][query]:.1f}x)")
                 for s in states]  # fmt: skip
        print(f"| `{query}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
