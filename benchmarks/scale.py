"""The scale path on this machine: each figure is a ratio to the local path measured in the same run.

    .venv/bin/python benchmarks/scale.py --part store                 # 500 prompts x 32 x 384-d, a 64 MB checkpoint
    .venv/bin/python benchmarks/scale.py --part store --prompts 100   # quick
    .venv/bin/python benchmarks/scale.py --part generation            # tiny random Llama, transformers, 1 and 2 actors
    .venv/bin/python benchmarks/scale.py --part generation --backend vllm --actors 1,2

--part store: the LanceDB store on a loopback S3 server (moto's server mode, in this process) against a local
folder: writing one round as generate does (upsert_candidates in 64-prompt batches), updating one column for the
whole round (score), reading the round's pools (select), a filtered neighbour search; and a checkpoint folder
published to s3:// (upload, manifest last) and read back into an empty cache (download), against copying the folder
locally. moto keeps objects in memory and shares this process's CPU, so the ratio is the API's overhead (requests,
signing, LanceDB's object-store I/O path) without a network: a real bucket adds latency per request on top.
Prints a markdown table.

--part generation: Generation (`bench_generation`): the generate stage's engine work (ampo.stages.compute.engine_pool, the prompts cut
into GENERATE_BATCH shards with per-prompt seeds) locally and over 1, 2, ... Ray actors (num_cpus=1 each), in one
run, on one local Ray instance. The local path runs twice: with torch's default threads (as ampo runs it) and with
one thread (as an actor with num_cpus=1 computes: Ray sets OMP_NUM_THREADS to it). Each arm opens its pool, runs a
warm-up pass over the first shard per engine (the engines load), then times one pass over all shards; ratios are
tokens/s against both local arms. The responses are compared with the local arm's (they must be identical: same
seeds, same batches). With 2 cores expect no speed-up from 2 actors: the figure shows Ray's overhead (actor
processes, serialisation, one thread per actor).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("LANCE_LOG", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUN = "bench"  # benchmarks/store.py's run id, whose rows make_rows builds


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def _store_ops(store, rows, batch_rows: int) -> dict[str, float]:
    """Seconds for each store operation of a round on `store` (empty at the start)."""
    import numpy as np

    out = {}
    start = time.perf_counter()
    for lo in range(0, rows.num_rows, batch_rows):
        store.upsert_candidates(rows.slice(lo, batch_rows))
    out["write"] = time.perf_counter() - start
    rewards = np.random.default_rng(1).standard_normal(rows.num_rows)
    out["update"], _ = _timed(store.update_candidates, rows["id"], reward=rewards)
    out["read"], _ = _timed(store.read_pools, RUN, 0)
    query = rows["vector"][0].as_py()
    searches = [_timed(store.neighbours, np.asarray(query, np.float32), 10, run=RUN, round=0)[0] for _ in range(5)]
    out["search"] = statistics.median(searches)
    out["count"] = store.count(RUN, 0)
    return out


def _checkpoint_folder(root: Path, megabytes: int) -> Path:
    """A checkpoint-shaped folder: a `megabytes` MB weights file, config.json, manifest.json."""
    import json

    folder = root / "ckpt-src" / "bench-r0"
    folder.mkdir(parents=True)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(os.urandom(megabytes * 2**20))
    (folder / "config.json").write_text("{}")
    (folder / "manifest.json").write_text(json.dumps({"id": "bench-r0", "config_hash": "c", "data_hash": "d"}))
    return folder


def bench_store(prompts: int = 500, n: int = 32, dim: int = 384, batch_prompts: int = 64,
                checkpoint_mb: int = 64) -> dict:
    """The store's and a checkpoint's throughput on a loopback S3 server (moto) against a local folder.

    Returns {"rows", "local": {op: seconds}, "s3": {op: seconds}, "checkpoint": {"local_copy", "upload",
    "download", "megabytes"}}; rows written/read per second and the ratios follow from it."""
    from moto.server import ThreadedMotoServer

    from ampo.object_store import CheckpointPlaces
    from ampo.store import Store
    from benchmarks.store import make_rows  # synthetic rows: ~300-character responses, unit vectors

    rows = make_rows(prompts, n, dim)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    credentials = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}  # moto accepts any
    try:
        with mock.patch.dict(os.environ, credentials):
            host, port = server.get_host_and_port()
            options = {"endpoint": f"http://{host}:{port}", "region": "us-east-1", "allow_http": "true"}
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                places = CheckpointPlaces("s3://ampo-bench/ckpt", options, tmp / "publisher-cache")
                places.client().create_bucket(Bucket="ampo-bench")
                local = _store_ops(Store(str(tmp / "store"), dim=dim), rows, batch_prompts * n)
                s3 = _store_ops(Store("s3://ampo-bench/store", dim=dim, storage_options=options), rows, batch_prompts * n)
                assert local["count"] == s3["count"] == rows.num_rows
                folder = _checkpoint_folder(tmp, checkpoint_mb)
                t_copy, _ = _timed(shutil.copytree, folder, tmp / "copy" / "bench-r0")
                t_up, uri = _timed(places.publish, folder, "bench", "bench-r0")
                reader = CheckpointPlaces(places.uri, options, tmp / "cache")  # an empty cache: another machine
                t_down, _ = _timed(reader.local_copy, "bench-r0", uri)
    finally:
        server.stop()
    return {"rows": rows.num_rows, "local": local, "s3": s3,
            "checkpoint": {"local_copy": t_copy, "upload": t_up, "download": t_down, "megabytes": checkpoint_mb}}


def print_store(result: dict) -> None:
    rows, local, s3, ck = result["rows"], result["local"], result["s3"], result["checkpoint"]
    print(f"\n{rows:,} candidate rows; store on a local folder (baseline) vs on loopback S3 (moto)\n")
    print("| operation | local folder | loopback S3 | S3 / local |\n|---|---|---|---|")
    for op, what in (("write", "write the round (upsert_candidates, 64-prompt batches)"),
                     ("update", "update one column, whole round (score)"), ("read", "read_pools, whole round (select)")):  # fmt: skip
        print(f"| {what} | {local[op]:.2f} s ({rows / local[op]:,.0f} rows/s) | {s3[op]:.2f} s "
              f"({rows / s3[op]:,.0f} rows/s) | {s3[op] / local[op]:.1f}x |")  # fmt: skip
    print(f"| neighbours k=10, filtered to the round (median of 5) | {1e3 * local['search']:.0f} ms | "
          f"{1e3 * s3['search']:.0f} ms | {s3['search'] / local['search']:.1f}x |")  # fmt: skip
    mb = ck["megabytes"]
    print(f"| checkpoint {mb} MB: local copy (baseline) vs upload, manifest last | {ck['local_copy']:.2f} s | "
          f"{ck['upload']:.2f} s ({mb / ck['upload']:.0f} MB/s) | {ck['upload'] / ck['local_copy']:.1f}x |")
    print(f"| checkpoint {mb} MB: local copy (baseline) vs download into the cache | {ck['local_copy']:.2f} s | "
          f"{ck['download']:.2f} s ({mb / ck['download']:.0f} MB/s) | {ck['download'] / ck['local_copy']:.1f}x |")


def _generation_arm(runtime, model: str, cfg, shards: list) -> dict:
    """Open a generate pool, warm every engine on one shard each, then time one pass over `shards`."""
    from ampo.stages.compute import engine_pool

    start = time.perf_counter()
    with engine_pool(runtime, "generate", model, cfg, runtime) as pool:
        for _ in pool.map(shards[: pool.size]):  # loads the engines (Ray: one shard per actor)
            pass
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        results = dict(pool.map(shards))
        gen_s = time.perf_counter() - start
    samples = [results[i] for i in range(len(shards))]
    texts = [s.text for batch in samples for pool_ in batch for s in pool_]
    tokens = sum(s.n_tokens for batch in samples for pool_ in batch for s in pool_)
    return {"load_s": load_s, "gen_s": gen_s, "tokens": tokens, "tok_s": tokens / gen_s, "texts": texts}


def bench_generation(*, model: str = "tiny-llama", backend: str = "transformers", prompts: int = 32, n: int = 4,
                     max_new_tokens: int = 32, actors: tuple[int, ...] = (1, 2)) -> list[dict]:  # fmt: skip
    """Generation throughput locally and with each number of Ray actors in `actors` (rows of a table: arm, engines,
    load_s, gen_s, tokens, tok_s, ratio to local, same texts as local). Starts a local Ray instance with 2 CPUs
    (its start time is the row `ray start`) and shuts it down."""
    import ray
    import torch

    from ampo.config import GenerationConfig, RayActors, RuntimeConfig
    from ampo.generation import derive_seed
    from ampo.models import resolve_policy
    from ampo.stages.compute import start_local_ray
    from ampo.stages.data import GENERATE_BATCH

    path = resolve_policy(model)
    cfg = GenerationConfig(backend=backend, n=n, max_new_tokens=max_new_tokens, batch_size=8)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from generation import PROMPTS  # benchmarks/generation.py's prompts

    texts = [PROMPTS[i % len(PROMPTS)] for i in range(prompts)]
    seeds = [derive_seed("bench", 0, f"p{i}") for i in range(prompts)]
    shards = [(texts[lo : lo + GENERATE_BATCH], seeds[lo : lo + GENERATE_BATCH], n)
              for lo in range(0, prompts, GENERATE_BATCH)]  # fmt: skip
    local = RuntimeConfig(device="cpu")
    threads = torch.get_num_threads()
    rows = [{"arm": f"local, {threads} torch threads", "engines": 1, **_generation_arm(local, path, cfg, shards)}]
    torch.set_num_threads(1)  # as in one actor with num_cpus=1 (Ray sets OMP_NUM_THREADS=1 there)
    try:
        rows.append({"arm": "local, 1 torch thread", "engines": 1, **_generation_arm(local, path, cfg, shards)})
    finally:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    start_local_ray(RuntimeConfig().ray_start_timeout_s, num_cpus=2, log_to_driver=False)  # waits past Ray's 30 s
    rows.append({"arm": "ray start", "engines": 0, "load_s": time.perf_counter() - start})
    try:
        for count in actors:
            runtime = RuntimeConfig(device="cpu", compute="ray", ray_actors=RayActors(actors=count, num_cpus=1))
            rows.append({"arm": f"ray, {count} actor(s)", "engines": count,
                         **_generation_arm(runtime, path, cfg, shards)})  # fmt: skip
    finally:
        ray.shutdown()
    base, one_thread = rows[0], rows[1]
    for row in rows:
        if "tok_s" in row:
            row["ratio"] = row["tok_s"] / base["tok_s"]
            row["ratio_1"] = row["tok_s"] / one_thread["tok_s"]
            row["same_texts"] = row["texts"] == base["texts"]
    return rows


def print_generation(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nmodel={args.model} backend={args.backend} | {args.prompts} prompts x n={args.n} x <= "
          f"{args.max_new_tokens} new tokens | load_avg_1m={os.getloadavg()[0]:.1f} cpus={os.cpu_count()}\n")  # fmt: skip
    print("| arm | load + warm-up s | generate s | tokens | tokens/s | vs local | vs local, 1 thread "
          "| same texts as local |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if "tok_s" not in r:
            print(f"| {r['arm']} | {r['load_s']:.1f} | | | | | | |")
            continue
        print(f"| {r['arm']} | {r['load_s']:.1f} | {r['gen_s']:.2f} | {r['tokens']} | {r['tok_s']:.0f} "
              f"| {r['ratio']:.2f}x | {r['ratio_1']:.2f}x | {'yes' if r['same_texts'] else 'NO'} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", required=True, choices=["store", "generation"], help="which figure to measure")
    parser.add_argument("--prompts", type=int, default=None, help="prompts (store: 500, generation: 32)")
    parser.add_argument("--n", type=int, default=None, help="responses per prompt (store: 32, generation: 4)")
    parser.add_argument("--dim", type=int, default=384, help="store: vector size")
    parser.add_argument("--checkpoint-mb", type=int, default=64, help="store: size of the checkpoint's weights")
    parser.add_argument("--model", default="tiny-llama", help="generation: tiny-llama, smollm2-135m-instruct or a folder")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"], help="generation")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation")
    parser.add_argument("--actors", default="1,2", help="generation: Ray actor counts, comma-separated")
    args = parser.parse_args()
    if args.part == "store":
        print_store(bench_store(args.prompts or 500, args.n or 32, args.dim, checkpoint_mb=args.checkpoint_mb))
    else:
        args.prompts, args.n = args.prompts or 32, args.n or 4
        rows = bench_generation(model=args.model, backend=args.backend, prompts=args.prompts, n=args.n,
                                max_new_tokens=args.max_new_tokens,
                                actors=tuple(int(a) for a in args.actors.split(",")))  # fmt: skip
        print_generation(rows, args)


if __name__ == "__main__":
    main()
