"""Generation throughput: vLLM vs transformers on the same model, prompts and sampling settings, in one run.

    python benchmarks/generation.py                                  # tiny random Llama (builds in ~1 s)
    python benchmarks/generation.py --model smollm2-135m-instruct    # the default policy (converted once, cached)

Arms (--backends): transformers; vllm (ampo's CPU thread settings: every usable core, see ampo.threads);
vllm-engine-default (the engine's own thread handling, as before those settings); vllm-1-thread (OMP_NUM_THREADS=1).
Prints a markdown table: load seconds, generation seconds, generated tokens, tokens/s, the ratio to transformers,
and the threads that computed: torch's thread count inside the engine, the process's CPU seconds per wall second
while generating, and how many OS threads of the process took at least a fifth of the busiest one's CPU time.
Tokens are counted as the backends count them (up to and including EOS), so a backend is not credited for the
padding rows that finished early.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ampo.config import GenerationConfig, RuntimeConfig
from ampo.generation import derive_seed, make_generator, resolve_device
from ampo.models import resolve_policy
from ampo.threads import usable_cpus

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a ten-year-old.",
    "List three uses of a paperclip.",
    "Give me a short recipe for pancakes.",
    "Why is the sky blue? Answer in two sentences.",
    "Write a limerick about a cat who codes.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "What are the benefits of regular exercise?",
    "Translate 'good morning' into Spanish, French and German.",
    "Describe a sunset without using the word 'sun'.",
    "Write a polite email declining a meeting invitation.",
    "What is the difference between weather and climate?",
    "Suggest a name for a bakery and explain it.",
    "Write two sentences about the ocean, all in lowercase.",
    "Give three tips for learning a new language.",
]


def thread_cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) of each OS thread of this process, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def open_generator(arm: str, model: str, cfg: GenerationConfig, runtime: RuntimeConfig):
    if arm == "vllm-engine-default":
        from ampo.generation.vllm_backend import VLLMGenerator

        return VLLMGenerator(model, cfg, runtime, max_model_len=cfg.max_model_len, manage_threads=False)
    if arm == "vllm-1-thread":
        os.environ["OMP_NUM_THREADS"] = "1"  # ampo's settings honour it
        try:
            return make_generator(model, cfg, runtime)
        finally:
            del os.environ["OMP_NUM_THREADS"]
    return make_generator(model, cfg, runtime)


def run_backend(arm: str, model: str, args: argparse.Namespace) -> dict:
    """Load, warm up on one prompt, then time one generate call over all prompts."""
    import torch

    backend = "transformers" if arm == "transformers" else "vllm"
    cfg = GenerationConfig(
        backend=backend,
        n=max(args.n, 2),
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    seeds = [derive_seed("bench", 0, f"p{i}") for i in range(len(prompts))]
    start = time.perf_counter()
    with open_generator(arm, model, cfg, RuntimeConfig(device=args.device)) as gen:
        load_s = time.perf_counter() - start
        gen.generate(prompts[:1], n=1, seeds=seeds[:1])
        torch_threads = torch.get_num_threads()
        threads0, cpu0, start = thread_cpu_seconds(), time.process_time(), time.perf_counter()
        samples = gen.generate(prompts, n=args.n, seeds=seeds)
        gen_s, cpu_s, threads1 = time.perf_counter() - start, time.process_time() - cpu0, thread_cpu_seconds()
    busy = [threads1[t] - threads0.get(t, 0.0) for t in threads1]
    flat = [s for row in samples for s in row]
    tokens = sum(s.n_tokens for s in flat)
    return {
        "backend": arm,
        "torch_threads": torch_threads,
        "cores_used": cpu_s / gen_s,
        "busy_threads": sum(b >= 0.2 * max(busy) for b in busy) if busy and max(busy) > 0 else 0,
        "load_s": load_s,
        "gen_s": gen_s,
        "tokens": tokens,
        "tok_s": tokens / gen_s,
        "stop": sum(s.finish_reason == "stop" for s in flat) / len(flat),
        "example": flat[0].text,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="tiny-llama", help="tiny-llama, smollm2-135m-instruct or a model folder"
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--batch-size", type=int, default=8, help="transformers: prompts per generate call")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--backends", default="transformers,vllm-engine-default,vllm",
                        help="arms: transformers, vllm, vllm-engine-default, vllm-1-thread")
    args = parser.parse_args()

    import torch

    model = resolve_policy(args.model)
    results = [run_backend(b, model, args) for b in args.backends.split(",")]
    base = next((r["tok_s"] for r in results if r["backend"] == "transformers"), results[0]["tok_s"])
    device = resolve_device(args.device)
    print(
        f"\nmodel={args.model} device={device} torch_threads_at_end={torch.get_num_threads()} "
        f"load_avg_1m={os.getloadavg()[0]:.1f} | {args.prompts} prompts x n={args.n} x <= {args.max_new_tokens} "
        f"new tokens, T={args.temperature}, top_p={args.top_p}, transformers batch={args.batch_size} prompts, "
        f"usable CPUs={usable_cpus()}\n"
    )
    print(
        "| arm | load s | generate s | tokens | tokens/s | vs transformers | torch threads | CPU s per s "
        "| busy OS threads | stopped on EOS |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['backend']} | {r['load_s']:.1f} | {r['gen_s']:.1f} | {r['tokens']} | {r['tok_s']:.0f} "
            f"| {r['tok_s'] / base:.2f}x | {r['torch_threads']} | {r['cores_used']:.2f} | {r['busy_threads']} "
            f"| {r['stop']:.0%} |"
        )
    for r in results:
        print(f"\n{r['backend']} sample 0: {r['example'][:200]!r}")


if __name__ == "__main__":
    main()
