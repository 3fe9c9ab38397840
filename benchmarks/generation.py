"""Generation throughput: vLLM vs transformers on the same model, prompts and sampling settings, in one run.

    python benchmarks/generation.py                                  # tiny random Llama (builds in ~1 s)
    python benchmarks/generation.py --model smollm2-135m-instruct    # the default policy (converted once, cached)

Arms (--backends): transformers; vllm (ampo's CPU thread settings: every usable core, see ampo.threads);
vllm-1-thread (the engine at one thread, as vLLM's "Reducing Torch threads to 1 for serving" means to set it: the
before-settings arm); vllm-engine-default (the engine's own thread handling in this process, as before ampo's
settings); vllm-sort-top-p (ampo's settings with generation.cpu_top_p=sort: vLLM's own top-p, a sort of the whole
vocabulary every step, the before arm of the candidate top-p; same samples). An untimed vLLM engine starts and closes first (--no-warm-engine: not), so every timed vLLM arm starts
warm; the timed arms run --repeats times in turn and each keeps its best generate time.
Prints a markdown table: load seconds, generation seconds, generated tokens, tokens/s, the ratio to transformers and
to the vllm-1-thread arm, and the threads that computed: torch's thread count inside the engine, the process's CPU
seconds per wall second while generating, and how many OS threads of the process took at least a fifth of the
busiest one's CPU time. Tokens are counted as the backends count them (up to and including EOS), so a backend is not
credited for the padding rows that finished early.

Then (--after-engine, on by default) the same check for what runs after a vLLM engine in the same process: the
transformers generator, the embedder (all-MiniLM-L6-v2) and the trainer (ampo.trainer.train, AMPO loss, tiny
groups), each in two arms: "vLLM's state" (torch at one thread and `torch.set_num_threads` replaced by a no-op, what
the CPU engine leaves when its reduction takes effect, with ampo's restore_torch_threads switched off) and "ampo"
(as ampo runs them: restore_torch_threads puts the real function and the pre-engine thread count back). For each:
torch threads while computing, seconds, work per second and the ratio of the two arms.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
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
        cpu_top_p="sort" if arm == "vllm-sort-top-p" else "candidates",
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
        "texts": [s.text for s in flat],
        "example": flat[0].text,
    }


# ----------------------------------------------------------------------------- after a vLLM engine


@contextlib.contextmanager
def vllm_left_state(threads: int = 1) -> Iterator[None]:
    """The process as a vLLM CPU engine leaves it when its reduction takes effect: torch at `threads`, and
    `torch.set_num_threads` replaced by a function that only logs (as vLLM's CPU worker replaces it), with ampo's
    restore_torch_threads switched off in the modules that call it. Everything is put back on exit."""
    import torch

    import ampo.generation.hf
    import ampo.threads
    import ampo.trainer

    before = torch.get_num_threads()
    modules = (ampo.threads, ampo.generation.hf, ampo.trainer)
    saved = [m.restore_torch_threads for m in modules]

    def no_restore(threads: int | None = None) -> int:
        return torch.get_num_threads()

    def vllm_replacement(n: int) -> None:  # vLLM's: "CPU backend doesn't allow to use torch.set_num_threads ..."
        return None

    torch._C.set_num_threads(threads)
    torch.set_num_threads = vllm_replacement
    for m in modules:
        m.restore_torch_threads = no_restore
    try:
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.restore_torch_threads = fn
        torch.set_num_threads = torch._C.set_num_threads
        torch.set_num_threads(before)


class Clock:
    """Times the compute part of a workload (after its loads): wall s, CPU s and torch's thread count inside."""

    def __enter__(self):
        self.cpu0, self.start = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        self.wall, self.cpu = time.perf_counter() - self.start, time.process_time() - self.cpu0
        self.threads = torch.get_num_threads()


def after_engine_workloads(model: str, args: argparse.Namespace, work: Path) -> dict:
    """name -> (unit, a function that runs the workload once, returning (units, Clock)). Each builds its objects as
    a stage does (a generator, an embedder, a train() call), so that ampo's restore (or its absence) applies as in a
    round; the clock covers the compute after loading."""
    from ampo.config import EmbeddingConfig, TrainConfig
    from ampo.embedding import SentenceTransformerEmbedder
    from ampo.losses import loss_config
    from ampo.trainer import make_loss_fn, train
    from ampo.training_data import Group

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    seeds = [derive_seed("bench", 1, f"p{i}") for i in range(len(prompts))]
    texts = [f"{p} {q}" for p in PROMPTS for q in PROMPTS][: args.embed_texts]
    groups = [Group(f"p{i}", PROMPTS[i % len(PROMPTS)], [PROMPTS[(i + j) % len(PROMPTS)] for j in range(4)],
                    [1.0, 0.0, -1.0, -2.0], [True, False, False, False]) for i in range(args.train_groups)]
    runs = {"n": 0}

    def transformers_generate() -> tuple[int, Clock]:
        cfg = GenerationConfig(backend="transformers", n=max(args.n, 2), temperature=args.temperature,
                               top_p=args.top_p, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        with make_generator(model, cfg, RuntimeConfig(device="cpu")) as gen, Clock() as clock:
            samples = gen.generate(prompts, n=args.n, seeds=seeds)
        return sum(s.n_tokens for row in samples for s in row), clock

    def embed() -> tuple[int, Clock]:
        embedder = SentenceTransformerEmbedder(EmbeddingConfig(batch_size=32), device="cpu")
        assert embedder.model is not None  # loads (and restores threads, in ampo's arm) as the embed stage does
        with Clock() as clock:
            embedder.embed(texts)
        return len(texts), clock

    def trainer() -> tuple[int, Clock]:
        runs["n"] += 1
        with Clock() as clock:  # train() loads inside; its perf/seconds below time the steps alone
            result = train(model, groups, make_loss_fn(loss_config("ampo")),
                           TrainConfig(lr=1e-4, grad_accum=1, max_length=256, max_prompt_length=128),
                           output_dir=work / f"train-{runs['n']}", runtime=RuntimeConfig(device="cpu"))
        clock.wall = result.metrics["perf/seconds"]  # the training loop, without loading and saving
        return int(result.metrics["perf/tokens"]), clock

    return {"transformers generate": ("tokens", transformers_generate), "embedder": ("texts", embed),
            "trainer": ("tokens", trainer)}


def after_engine(model: str, args: argparse.Namespace) -> list[dict]:
    """Each workload in both arms (vLLM's state first, then ampo), --repeats times in turn, best wall time kept."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workloads = after_engine_workloads(model, args, Path(tmp))
        for name, (unit, work) in workloads.items():
            work()  # untimed: imports and caches outside the timed calls
            best: dict[str, tuple] = {}
            for _ in range(args.repeats):
                for arm in ("vLLM's state", "ampo"):
                    with vllm_left_state() if arm == "vLLM's state" else contextlib.nullcontext():
                        units, clock = work()
                    if arm not in best or clock.wall < best[arm][1].wall:
                        best[arm] = (units, clock)
            for arm, (units, clock) in best.items():
                rows.append({"workload": name, "arm": arm, "unit": unit, "threads": clock.threads,
                             "wall": clock.wall, "cpu": clock.cpu, "units": units})
    return rows


def print_after_engine(rows: list[dict]) -> None:
    print("\nAfter a vLLM engine in the same process:\n")
    print("| workload | arm | torch threads | seconds | CPU s per s | work | per second | ampo / vLLM's state |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    base = {r["workload"]: r["units"] / r["wall"] for r in rows if r["arm"] == "vLLM's state"}
    for r in rows:
        rate = r["units"] / r["wall"]
        print(f"| {r['workload']} | {r['arm']} | {r['threads']} | {r['wall']:.2f} | {r['cpu'] / r['wall']:.2f} "
              f"| {r['units']} {r['unit']} | {rate:.0f} | {rate / base[r['workload']]:.2f}x |")


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
    parser.add_argument("--backends", default="transformers,vllm-engine-default,vllm-1-thread,vllm",
                        help="arms: transformers, vllm, vllm-engine-default, vllm-1-thread, vllm-sort-top-p")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each arm, in turn; the best is kept")
    parser.add_argument("--no-warm-engine", dest="warm_engine", action="store_false",
                        help="no untimed vLLM engine before the timed arms")
    parser.add_argument("--no-after-engine", dest="after_engine", action="store_false",
                        help="skip the transformers / embedder / trainer check after a vLLM engine")
    parser.add_argument("--embed-texts", type=int, default=256)
    parser.add_argument("--train-groups", type=int, default=8)
    args = parser.parse_args()

    import torch

    model = resolve_policy(args.model)
    arms = args.backends.split(",")
    if args.warm_engine and any(a.startswith("vllm") for a in arms):
        run_backend("vllm", model, argparse.Namespace(**{**vars(args), "prompts": 1, "n": 2}))
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for arm in arms:
            r = run_backend(arm, model, args)
            if arm not in best or r["gen_s"] < best[arm]["gen_s"]:
                best[arm] = r
    results = [best[a] for a in arms]
    state = (torch.get_num_threads(), torch.set_num_threads is torch._C.set_num_threads)
    base = next((r["tok_s"] for r in results if r["backend"] == "transformers"), results[0]["tok_s"])
    one = next((r["tok_s"] for r in results if r["backend"] == "vllm-1-thread"), None)
    device = resolve_device(args.device)
    print(
        f"\nmodel={args.model} device={device} torch threads after the vLLM arms={state[0]} (real "
        f"torch.set_num_threads: {state[1]}) load_avg_1m={os.getloadavg()[0]:.1f} | {args.prompts} prompts x "
        f"n={args.n} x <= {args.max_new_tokens} new tokens, T={args.temperature}, top_p={args.top_p}, transformers "
        f"batch={args.batch_size} prompts, usable CPUs={usable_cpus()}, best of {args.repeats}\n"
    )
    print(
        "| arm | load s | generate s | tokens | tokens/s | vs transformers | vs vllm-1-thread | torch threads "
        "| CPU s per s | busy OS threads | stopped on EOS |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        vs_one = f"{r['tok_s'] / one:.2f}x" if one else "-"
        print(
            f"| {r['backend']} | {r['load_s']:.1f} | {r['gen_s']:.2f} | {r['tokens']} | {r['tok_s']:.0f} "
            f"| {r['tok_s'] / base:.2f}x | {vs_one} | {r['torch_threads']} | {r['cores_used']:.2f} "
            f"| {r['busy_threads']} | {r['stop']:.0%} |"
        )
    by_arm = {r["backend"]: r for r in results}
    if "vllm" in by_arm and "vllm-sort-top-p" in by_arm:
        same = by_arm["vllm"]["texts"] == by_arm["vllm-sort-top-p"]["texts"]
        print(f"\ntop-p from candidates vs vLLM's sort: {by_arm['vllm']['tok_s'] / by_arm['vllm-sort-top-p']['tok_s']:.2f}x "
              f"tokens/s; identical samples: {same}")
    if args.after_engine and device == "cpu":
        print_after_engine(after_engine(model, args))
        print(f"\nload_avg_1m at the end={os.getloadavg()[0]:.1f}")
    for r in results:
        print(f"\n{r['backend']} sample 0: {r['example'][:200]!r}")


if __name__ == "__main__":
    main()
