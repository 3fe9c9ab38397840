"""Selection speed: select_batch vs the per-prompt reference `select`; Opt-Select local search vs the MIP.

    .venv/bin/python benchmarks/selection.py [--prompts 10000] [--reference-prompts 500] [--exact-prompts 200]

Pools: N=32 responses, k=7 negatives, d=384 unit-norm embeddings around 6 random centres per prompt (cluster
structure), rewards = a per-centre offset plus noise, one seed per prompt. Everything is seeded. The
per-prompt reference (a Python loop over `select`, the plain implementation) is timed on --reference-prompts
prompts and extrapolated linearly to --prompts; its selections are compared with the batched ones there.
Wall time depends on what else runs on the machine, so CPU time (this process, all threads) is printed too.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import numpy as np

from ampo.selection import SELECTORS, select, select_batch
from ampo.selection.ampo_methods import exact_medoids, medoid_cost
from ampo.selection.pool import optselect_weights, pairwise_distances


def make_pools(prompts: int, n: int = 32, d: int = 384, islands: int = 6, seed: int = 0):
    """Seeded pools: rewards (P, n) float64, embeddings (P, n, d) float32 unit-norm, clustered."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((prompts, islands, d)).astype(np.float32)
    island = rng.integers(0, islands, (prompts, n))
    emb = np.take_along_axis(centres, island[:, :, None], axis=1)
    emb += 0.6 * rng.standard_normal((prompts, n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    offsets = rng.normal(0, 1, (prompts, islands))
    return np.take_along_axis(offsets, island, axis=1) + rng.normal(0, 0.5, (prompts, n)), emb


def timed(fn, repeats: int = 1):
    """fn() with its wall time and this process's CPU time (all threads) in seconds, each the minimum of
    `repeats` runs (other engineers share the cores: the minimum is the least disturbed run)."""
    walls, cpus = [], []
    for _ in range(repeats):
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return out, min(walls), min(cpus)


def compare(method: str, rewards, emb, k: int, seeds, sub: int, repeats: int) -> str:
    """One markdown row: batched and extrapolated per-prompt times (wall, cpu), speed-ups, agreement."""
    batched, wall_b, cpu_b = timed(lambda: select_batch(method, rewards, emb, k, seed=seeds), repeats)
    reference, wall_r, cpu_r = timed(
        lambda: [select(method, rewards[i], emb[i], k, seed=int(seeds[i])) for i in range(sub)], repeats
    )
    scale = len(rewards) / sub
    same = sum(a == b for a, b in zip(batched[:sub], reference))
    return (
        f"| {method} | {wall_b:.3f} | {cpu_b:.3f} | {wall_r * scale:.2f} | {cpu_r * scale:.2f} "
        f"| {wall_r * scale / wall_b:.0f}x | {cpu_r * scale / cpu_b:.0f}x | {same}/{sub} |"
    )


def optselect_quality(rewards, emb, k: int) -> dict[str, float]:
    """Local-search cost / exact MIP cost, per pool: mean, worst, share equal to the optimum."""
    ratios = []
    for r, e in zip(rewards, emb):
        w, dist = optselect_weights(r), pairwise_distances(e)
        local = select("optselect", r, e, k).rejected
        exact = exact_medoids(dist, w, k, int(np.argmax(r)))
        ratios.append(medoid_cost(dist, w, local) / medoid_cost(dist, w, exact))
    ratios = np.array(ratios)
    equal = np.mean(ratios <= 1 + 1e-9)
    return {"mean": ratios.mean(), "worst": ratios.max(), "equal": equal, "n": ratios.size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--reference-prompts", type=int, default=500)
    parser.add_argument("--exact-prompts", type=int, default=200)
    parser.add_argument("--k", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3, help="time each path this often, keep the minimum")
    parser.add_argument("--methods", nargs="*", default=list(SELECTORS))
    args = parser.parse_args()
    rewards, emb = make_pools(args.prompts)
    seeds = np.arange(args.prompts)
    sub = min(args.reference_prompts, args.prompts)
    print(f"pools: {args.prompts} prompts, N={rewards.shape[1]}, k={args.k}, d={emb.shape[2]}; "
          f"cpus={os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
    print(f"reference: a Python loop over select() on {sub} prompts, extrapolated x{args.prompts / sub:g}; "
          f"seconds are the minimum of {args.repeats} runs\n")
    print("| method | batched wall (s) | batched cpu (s) | reference wall (s, extrap.) "
          "| reference cpu (s, extrap.) | speed-up wall | speed-up cpu | batched == reference |")
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        print(compare(method, rewards, emb, args.k, seeds, sub, args.repeats), flush=True)
    if "optselect" in args.methods and args.exact_prompts:
        n = args.exact_prompts
        q, wall, _ = timed(lambda: optselect_quality(rewards[:n], emb[:n], args.k))
        print(f"\noptselect local search / exact MIP cost on {q['n']} prompts ({wall:.1f} s): "
              f"mean {q['mean']:.6f}, worst {q['worst']:.6f}, optimal on {100 * q['equal']:.1f}% of them")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
