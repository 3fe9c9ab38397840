"""The scale path on this machine: each figure is a ratio to the local path measured in the same run.

    .venv/bin/python benchmarks/scale.py --part store                 # 500 prompts x 32 x 384-d, a 64 MB checkpoint
    .venv/bin/python benchmarks/scale.py --part store --prompts 100   # quick

--part store: the LanceDB store on a loopback S3 server (moto's server mode, in this process) against a local
folder: writing one round as generate does (upsert_candidates in 64-prompt batches), updating one column for the
whole round (score), reading the round's pools (select), a filtered neighbour search; and a checkpoint folder
published to s3:// (upload, manifest last) and read back into an empty cache (download), against copying the folder
locally. moto keeps objects in memory and shares this process's CPU, so the ratio is the API's overhead (requests,
signing, LanceDB's object-store I/O path) without a network: a real bucket adds latency per request on top.
Prints a markdown table.
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

os.environ.setdefault("LANCE_LOG", "error")

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
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")  # moto accepts any
    try:
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
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["store"], default="store", help="which measurement to run")
    parser.add_argument("--prompts", type=int, default=500, help="store: prompts in the round")
    parser.add_argument("--n", type=int, default=32, help="store: responses per prompt")
    parser.add_argument("--dim", type=int, default=384, help="store: vector size")
    parser.add_argument("--checkpoint-mb", type=int, default=64, help="store: size of the checkpoint's weights")
    args = parser.parse_args()
    if args.part == "store":
        print_store(bench_store(args.prompts, args.n, args.dim, checkpoint_mb=args.checkpoint_mb))


if __name__ == "__main__":
    main()
