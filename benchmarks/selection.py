"""Selection speed: select_batch against the per-prompt reference `select`, and Opt-Select local search vs the MIP.

    .venv/bin/python benchmarks/selection.py [--prompts 10000] [--reference-prompts 500] [--exact-prompts 200]

Pools: N=32 responses, k=7 negatives, d=384 unit-norm embeddings around 6 random centres per prompt (cluster
structure), rewards = a per-centre offset plus noise. Everything is seeded. The per-prompt reference (a Python loop
over `select`, the plain implementation) is timed on --reference-prompts prompts and extrapolated linearly to
--prompts; its selections are also compared with the batched ones on those prompts.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import numpy as np

from ampo.selection import SELECTORS, select, select_batch
from ampo.selection.ampo_methods import MEDOID_SOLVERS, medoid_cost
from ampo.selection.pool import optselect_weights, pairwise_distances


def make_pools(prompts: int, n: int = 32, d: int = 384, islands: int = 6, seed: int = 0):
    """Seeded pools: rewards (P, n) float64, embeddings (P, n, d) float32 unit-norm, clustered."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((prompts, islands, d)).astype(np.float32)
    island = rng.integers(0, islands, (prompts, n))
    emb = np.take_along_axis(centres, island[:, :, None], axis=1)
    emb += 0.6 * rng.standard_normal((prompts, n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    rewards = np.take_along_axis(rng.normal(0, 1, (prompts, islands)), island, axis=1) + rng.normal(
        0, 0.5, (prompts, n)
    )
    return rewards, emb


def timed(fn, repeats: int = 1):
    """fn() with its wall time and this process's CPU time (all threads) in seconds, each the minimum of `repeats`
    runs (other engineers share the cores: the minimum is the least disturbed run)."""
    walls, cpus = [], []
    for _ in range(repeats):
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return out, min(walls), min(cpus)


def optselect_quality(rewards, emb, k: int) -> dict[str, float]:
    """Local-search cost / exact MIP cost on each pool."""
    ratios = []
    for r, e in zip(rewards, emb):
        top = int(np.argmax(r))
        w, dist = optselect_weights(r), pairwise_distances(e)
        local = select("optselect", r, e, k).rejected
        exact = MEDOID_SOLVERS["exact"](dist, w, k, top)
        ratios.append(medoid_cost(dist, w, local) / medoid_cost(dist, w, exact))
    ratios = np.array(ratios)
    return {
        "mean": ratios.mean(),
        "worst": ratios.max(),
        "equal": np.mean(ratios <= 1 + 1e-9),
        "n": len(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--reference-prompts", type=int, default=500)
    parser.add_argument("--exact-prompts", type=int, default=200)
    parser.add_argument("--k", type=int, default=7)
    parser.add_argument(
        "--repeats", type=int, default=3, help="time each path this many times, keep the minimum"
    )
    parser.add_argument("--methods", nargs="*", default=list(SELECTORS))
    args = parser.parse_args()
    rewards, emb = make_pools(args.prompts)
    seeds = np.arange(args.prompts)  # one seed per prompt
    sub = min(args.reference_prompts, args.prompts)
    print(
        f"pools: {args.prompts} prompts, N={rewards.shape[1]}, k={args.k}, d={emb.shape[2]}; "
        f"cpus={os.cpu_count()}, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"reference: a Python loop over select(), timed on {sub} prompts and extrapolated x{args.prompts / sub:g} "
        f"to {args.prompts}; wall = elapsed seconds, cpu = this process's CPU seconds; min of {args.repeats} runs\n"
    )
    print(
        "| method | batched wall (s) | batched cpu (s) | reference wall (s, extrap.) | reference cpu (s, extrap.) "
        "| speed-up wall | speed-up cpu | batched == reference |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods:

        def run_batched(method=method):
            return select_batch(method, rewards, emb, args.k, seed=seeds)

        def run_reference(method=method):
            return [select(method, rewards[i], emb[i], args.k, seed=int(seeds[i])) for i in range(sub)]

        batched, wall_b, cpu_b = timed(run_batched, args.repeats)
        reference, wall_r, cpu_r = timed(run_reference, args.repeats)
        scale = args.prompts / sub
        same = sum(a == b for a, b in zip(batched[:sub], reference))
        print(
            f"| {method} | {wall_b:.3f} | {cpu_b:.3f} | {wall_r * scale:.2f} | {cpu_r * scale:.2f} "
            f"| {wall_r * scale / wall_b:.0f}x | {cpu_r * scale / cpu_b:.0f}x | {same}/{sub} |",
            flush=True,
        )
        del batched, reference
    if "optselect" in args.methods and args.exact_prompts:
        q, t, _ = timed(
            lambda: optselect_quality(rewards[: args.exact_prompts], emb[: args.exact_prompts], args.k)
        )
        print(
            f"\noptselect local search / exact MIP cost on {q['n']} prompts ({t:.1f} s): mean {q['mean']:.6f}, "
            f"worst {q['worst']:.6f}, equal to the optimum on {100 * q['equal']:.1f}%"
        )


if __name__ == "__main__":
    main()
