"""Scale path: what the Ray compute plane costs or gains on this machine.

    python benchmarks/scale.py --part generation              # tiny random Llama, transformers, 1 and 2 actors
    python benchmarks/scale.py --part generation --backend vllm --actors 1,2

Generation (`bench_generation`): the generate stage's engine work (ampo.stages.compute.engine_pool, the prompts cut
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
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GENERATION_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a ten-year-old.",
    "List three uses of a paperclip.",
    "Give me a short recipe for pancakes.",
    "Why is the sky blue? Answer in two sentences.",
    "Write a limerick about a cat who codes.",
    "Describe a sunset without using the word 'sun'.",
]


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
    from ampo.stages.data import GENERATE_BATCH

    path = resolve_policy(model)
    cfg = GenerationConfig(backend=backend, n=n, max_new_tokens=max_new_tokens, batch_size=8)
    texts = [GENERATION_PROMPTS[i % len(GENERATION_PROMPTS)] for i in range(prompts)]
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
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
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
    parser.add_argument("--part", required=True, choices=["generation"], help="which figure to measure")
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama, smollm2-135m-instruct or a model folder")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--actors", default="1,2", help="Ray actor counts, comma-separated")
    args = parser.parse_args()
    if args.part == "generation":
        rows = bench_generation(model=args.model, backend=args.backend, prompts=args.prompts, n=args.n,
                                max_new_tokens=args.max_new_tokens,
                                actors=tuple(int(a) for a in args.actors.split(",")))  # fmt: skip
        print_generation(rows, args)


if __name__ == "__main__":
    main()
