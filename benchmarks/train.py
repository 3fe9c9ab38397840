"""Training throughput: ampo's group trainer against TRL's DPOTrainer, same model, same responses, same run.

    .venv/bin/python benchmarks/train.py                       # random Llama (hidden 256, 4 layers), CPU
    .venv/bin/python benchmarks/train.py --shape smollm2-135m  # SmolLM2-135M's shape, random weights
    .venv/bin/python benchmarks/train.py --prompt-words 150 250 --max-length 1024  # long (few-shot/document) prompts

Trainers, each in its own subprocess (so peak memory is each one's own):
  ampo-padded  ampo.trainer, AMPO loss (reference-free), every prompt's K responses in one group, padded forward
  ampo-packed  the same, packed forward (one row, no padding)
  ampo-prefix  the same, prefix-shared forward (a prompt's KV computed once for its K responses)
  ampo-prefix-before  the same as before issue 12's last changes: AdamW in torch's default implementation (not
               the fused kernel that ampo.trainer.make_optimizer picks, as transformers' Trainer does for TRL), and
               the prompt pass computing the LM head at every prompt position (not only at each prompt's last)
  ampo-pairs   ampo.trainer, DPO loss, best-vs-worst pairs, packed forward, reference log-probs computed before
  trl-pairs    trl.DPOTrainer, DPO sigmoid loss, the same pairs, reference log-probs precomputed
Preference signals: a group of K responses gives K-1 (chosen, rejected) pairs, a pair gives 1; "pairs/s" is that
count over the timed steps per second. Tokens are counted the same way for all: a forward pre-hook on the trained
model adds up the attention mask (non-pad tokens) of every forward run with gradients enabled, i.e. the tokens of
forward+backward, each sequence's prompt and response once (the prefix-shared forward's prompt-only pass is not
counted again: its second pass's mask covers prompt and response). Time runs from
the end of the first (warm-up) optimizer step to the end of the last, as wall time and as the worker's CPU time
(one torch thread by default: on a shared machine CPU time is the steadier figure, and repeats keep each trainer's
best run). bf16 and gradient checkpointing are off on CPU
(TRL's DPOConfig turns both on by default; they made CPU training 10x slower here); on a GPU both trainers use bf16
autocast over fp32 weights. Peak memory: ru_maxrss of each subprocess (and torch.cuda.max_memory_allocated on GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPES = {
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": None},  # vocab: the tokenizer's
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152},
}
TRAINERS = ("ampo-padded", "ampo-packed", "ampo-prefix", "ampo-prefix-before", "ampo-pairs", "trl-pairs")
FORWARD_MODES = {"ampo-padded": "padded", "ampo-packed": "packed", "ampo-prefix": "prefix_shared",
                 "ampo-prefix-before": "prefix_shared", "ampo-pairs": "packed"}


# ----------------------------------------------------------------------------- setup (parent process)


def build_model(path: Path, shape: str, seed: int) -> None:
    """A random Llama of the given shape with ampo's tiny byte-level tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ampo.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(512)
    dims = dict(SHAPES[shape])
    dims["vocab_size"] = dims["vocab_size"] or len(tokenizer)
    config = LlamaConfig(**dims, max_position_embeddings=4096, tie_word_embeddings=False, dtype="float32",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def build_groups(n_prompts: int, k: int, words: tuple[int, int], seed: int,
                 prompt_words: tuple[int, int] = (8, 24)) -> list[dict]:
    """n_prompts groups of k responses of random length (words), rewards random; the best is chosen."""
    from ampo.models import tiny_corpus

    rng = random.Random(seed)
    corpus = " ".join(tiny_corpus()).split()

    def text(lo: int, hi: int) -> str:
        start = rng.randrange(len(corpus))
        return " ".join((corpus * 2)[start : start + rng.randint(lo, hi)])

    groups = []
    for i in range(n_prompts):
        rewards = [round(rng.gauss(0, 1), 4) for _ in range(k)]
        best = max(range(k), key=lambda j: (rewards[j], -j))
        groups.append({"prompt_id": f"p{i}", "prompt": text(*prompt_words), "responses": [text(*words) for _ in range(k)],
                       "rewards": rewards, "chosen": [j == best for j in range(k)]})
    return groups


def best_vs_worst(group: dict) -> dict:
    """The group reduced to its best (chosen) and worst responses."""
    best = group["chosen"].index(True)
    worst = min(range(len(group["rewards"])), key=lambda j: (group["rewards"][j], j))
    pick = [best, worst]
    return {**group, "responses": [group["responses"][j] for j in pick],
            "rewards": [group["rewards"][j] for j in pick], "chosen": [True, False]}


# ----------------------------------------------------------------------------- workers (one subprocess each)


class TokenCounter:
    """Adds up the non-pad tokens of every forward of `model` that runs with gradients enabled."""

    def __init__(self):
        self.tokens = 0
        self.padded = 0  # tokens including padding: what the matmuls actually process

    def attach(self, model) -> None:
        import torch

        def hook(module, args, kwargs):
            prompt_pass = kwargs.get("use_cache") is True and kwargs.get("past_key_values") is None  # prefix-shared
            if torch.is_grad_enabled() and module.training and not prompt_pass:
                mask = kwargs.get("attention_mask")
                ids = kwargs.get("input_ids", args[0] if args else None)
                self.tokens += int(mask.sum()) if mask is not None else ids.numel()
                self.padded += ids.numel()

        model.register_forward_pre_hook(hook, with_kwargs=True)

    def mark(self) -> tuple[float, float, int, int]:
        """(wall time, this process's CPU time, tokens, tokens with padding) at the end of an optimizer step."""
        return time.perf_counter(), time.process_time(), self.tokens, self.padded


def run_ampo(work: Path, trainer: str, args) -> dict:
    import ampo.trainer as trainer_module
    from ampo.config import RuntimeConfig, TrainConfig
    from ampo.losses import loss_config
    from ampo.reflogps import compute_reference_logps, with_reference
    from ampo.training_data import ForwardOptions, Group

    groups = [Group(**g) for g in json.loads((work / "groups.json").read_text())]
    pairs = trainer == "ampo-pairs"
    if pairs:
        groups = [Group(**best_vs_worst(g.__dict__)) for g in groups]
    cfg = TrainConfig(lr=1e-5, groups_per_step=args.batch, grad_accum=1, warmup_ratio=0.0, scheduler="constant",
                      max_length=args.max_length, max_prompt_length=args.max_length // 2, save_every=10**6,
                      forward_mode=FORWARD_MODES[trainer])
    runtime = RuntimeConfig(device="auto")
    if pairs:
        groups = with_reference(groups, compute_reference_logps(str(work / "model"), groups, cfg, runtime))
    counter, marks = TokenCounter(), []
    load_policy = trainer_module.load_policy

    def load_and_count(*a, **kw):
        model = load_policy(*a, **kw)
        counter.attach(model)
        return model

    trainer_module.load_policy = load_and_count  # count the trained model's tokens, as for TRL below
    if trainer.endswith("-before"):  # torch's default AdamW, and logits at every prompt position
        import torch

        import ampo.logps

        trainer_module.make_optimizer = lambda model, c: torch.optim.AdamW(model.parameters(), lr=c.lr,
                                                                           weight_decay=c.weight_decay)
        ampo.logps._accepts_logits_to_keep = lambda model: False
    shutil.rmtree(work / f"out-{trainer}", ignore_errors=True)  # a finished checkpoint would not be retrained
    rss_before = peak_rss_mb()
    result = trainer_module.train(
        str(work / "model"), groups, trainer_module.make_loss_fn(loss_config("dpo" if pairs else "ampo")), cfg,
        output_dir=work / f"out-{trainer}", runtime=runtime, options=ForwardOptions(forward_mode=cfg.forward_mode),
        progress=lambda step, total, m: marks.append(counter.mark()))
    return summarise(marks, rss_before, result.losses, signals_per_step=args.batch * (1 if pairs else args.k - 1))


def run_trl(work: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    groups = [best_vs_worst(g) for g in json.loads((work / "groups.json").read_text())]
    rows = [{"prompt": [{"role": "user", "content": g["prompt"]}],
             "chosen": [{"role": "assistant", "content": g["responses"][0]}],
             "rejected": [{"role": "assistant", "content": g["responses"][1]}]} for g in groups]
    gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    counter, marks = TokenCounter(), []
    counter.attach(model)

    class StepTimer(TrainerCallback):
        def on_step_end(self, *a, **kw):
            marks.append(counter.mark())

    config = DPOConfig(output_dir=str(work / "out-trl"), per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=1e-5,
                       lr_scheduler_type="constant", warmup_steps=0, bf16=gpu, gradient_checkpointing=False,
                       precompute_ref_log_probs=True, max_length=args.max_length, logging_steps=10**6,
                       save_strategy="no", report_to=[], seed=0, use_cpu=not gpu, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[StepTimer()])
    rss_before = peak_rss_mb()
    out = trainer.train()
    return summarise(marks, rss_before, [out.training_loss], signals_per_step=args.batch)


def summarise(marks: list[tuple[float, float, int, int]], rss_before: float, losses: list[float],
              signals_per_step: int) -> dict:
    """Tokens/s from the end of the first (warm-up) step to the end of the last: everything in between counts,
    data collation included, for both trainers alike."""
    import torch

    (wall0, cpu0, tokens0, padded0), (wall1, cpu1, tokens1, padded1) = marks[0], marks[-1]
    seconds, cpu_seconds, tokens, padded = wall1 - wall0, cpu1 - cpu0, tokens1 - tokens0, padded1 - padded0
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"steps": len(marks), "timed_steps": len(marks) - 1, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu_seconds,
            "pairs_per_s": signals_per_step * (len(marks) - 1) / seconds,
            "pairs_per_cpu_s": signals_per_step * (len(marks) - 1) / cpu_seconds,
            "tokens_per_step": tokens / max(len(marks) - 1, 1),
            "non_pad_share": tokens / padded,
            "peak_rss_mb": peak_rss_mb(), "rss_before_train_mb": rss_before, "cuda_peak_mb": cuda_peak,
            "losses": losses[:3]}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    result = run_trl(work, args) if args.worker == "trl-pairs" else run_ampo(work, args.worker, args)
    (work / f"{args.worker}.json").write_text(json.dumps(result))


# ----------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--prompts", type=int, default=24, help="groups (prompts)")
    parser.add_argument("--k", type=int, default=8, help="responses per group (AMPO: 1 best + 7 negatives)")
    parser.add_argument("--batch", type=int, default=2, help="groups (or pairs) per optimizer step")
    parser.add_argument("--words", type=int, nargs=2, default=(40, 160), help="response length range, words")
    parser.add_argument("--prompt-words", type=int, nargs=2, default=(8, 24), help="prompt length range, words")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker; 0 = torch's default")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each trainer; the fastest is reported")
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.prompts // args.batch < 2:
        raise ValueError(f"--prompts {args.prompts} / --batch {args.batch} gives under 2 steps; the first is warm-up")
    with tempfile.TemporaryDirectory(prefix="ampo-bench-train-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        build_model(work / "model", args.shape, args.seed)
        groups = build_groups(args.prompts, args.k, tuple(args.words), args.seed, tuple(args.prompt_words))
        (work / "groups.json").write_text(json.dumps(groups))
        results: dict[str, dict] = {}
        for _ in range(args.repeats):  # interleaved, best of the repeats: a shared machine's load comes and goes
            for name in args.trainers:
                cmd = [sys.executable, __file__, "--worker", name, "--work", str(work), *sys.argv[1:]]
                proc = subprocess.run(cmd, check=False, capture_output=not os.environ.get("VERBOSE"), text=True)
                if proc.returncode != 0:
                    sys.exit(f"{name} failed (exit {proc.returncode}):\n{(proc.stderr or '')[-3000:]}")
                r = json.loads((work / f"{name}.json").read_text())
                if name not in results or r["tokens_per_cpu_s"] > results[name]["tokens_per_cpu_s"]:
                    results[name] = r
        print_table(args, results, time.perf_counter() - t0)


def print_table(args, results: dict, wall: float) -> None:
    import platform

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\nshape={args.shape} prompts={args.prompts} k={args.k} batch={args.batch} words={args.words} "
          f"prompt_words={args.prompt_words} load_avg_1m={os.getloadavg()[0]:.1f} "
          f"max_length={args.max_length} threads={args.threads} repeats={args.repeats} device={device} "
          f"python={platform.python_version()} "
          f"torch={torch.__version__} total {wall:.0f} s\n")
    base = results.get("trl-pairs")
    cuda = any(r["cuda_peak_mb"] is not None for r in results.values())
    head = ("| trainer | timed steps | tokens/step | non-pad share | tokens/s | vs TRL | pairs/s | vs TRL "
            "| tokens/CPU-s | vs TRL | pairs/CPU-s | vs TRL | peak RSS MB |")
    print(head + (" CUDA peak MB |" if cuda else ""))
    print("|" + "---|" * (head.count("|") - 1 + cuda))

    def ratio(r: dict, key: str) -> str:
        return f"{r[key] / base[key]:.2f}x" if base else "-"

    for name, r in results.items():
        row = (f"| {name} | {r['timed_steps']} | {r['tokens_per_step']:.0f} | {r['non_pad_share']:.2f} | "
               f"{r['tokens_per_s']:.0f} | {ratio(r, 'tokens_per_s')} | {r['pairs_per_s']:.2f} | "
               f"{ratio(r, 'pairs_per_s')} | {r['tokens_per_cpu_s']:.0f} | {ratio(r, 'tokens_per_cpu_s')} | "
               f"{r['pairs_per_cpu_s']:.2f} | {ratio(r, 'pairs_per_cpu_s')} | {r['peak_rss_mb']:.0f} |")
        print(row + (f" {r['cuda_peak_mb']:.0f} |" if cuda else ""))


if __name__ == "__main__":
    main()
