"""The evaluate stage: the candidate and the champion answer the held-out prompts, both are scored with the same
rewards, and `ampo.gates.compare` measures the difference with paired-bootstrap intervals (stored as the stage's
metrics, which the promote stage reads)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np

from ampo.gates import Answers, compare
from ampo.stages.context import (
    RoundContext,
    StageResult,
    candidate_checkpoint_id,
    checkpoint_places,
    engine_policy,
    write_json_atomic,
)


def evaluate(ctx: RoundContext) -> StageResult:
    """Generate with the candidate and the champion on the held-out prompts, score both with the same rewards."""
    from ampo.prompts import eval_prompts
    from ampo.rewards import RewardStack
    from ampo.rewards.verifiable import unsupported_instructions

    candidate = _candidate(ctx)
    by_source = eval_prompts(ctx.cfg.eval, ctx.cfg.prompts, unsupported=unsupported_instructions())
    prompts = [p for source in by_source.values() for p in source]
    if not prompts:
        raise ValueError(f"the evaluation sources {ctx.cfg.eval.sources} hold no prompts")
    stack = RewardStack(ctx.cfg.reward, ctx.cfg.runtime)
    policies = {"champion": ctx.start, "candidate": candidate}
    found = {role: _cached_outputs(ctx, policy, prompts) for role, policy in policies.items()}
    with _engines(ctx) as engine:  # both policies answer first; the engine is closed before a reward model scores
        drawn = {role: _samples(ctx, policies[role], prompts, engine) for role in policies if found[role] is None}
    for role, samples in drawn.items():  # each computed once per (checkpoint, its weights, evaluation settings)
        found[role] = _scored(policies[role], prompts, samples, stack)
        write_json_atomic(eval_cache_path(ctx, policies[role], prompts), found[role])  # a promoted candidate: cached
    champion, outputs = found["champion"], found["candidate"]
    write_json_atomic(ctx.dir / "eval-candidate.json", {k: v for k, v in outputs.items() if k != "cached"})
    evaluation = compare(_answers(outputs, prompts), _answers(champion, prompts), ctx.cfg.eval.gates)
    metrics = evaluation.model_dump()  # structured: promote reads it back with Evaluation.model_validate
    counts = {"prompts": len(prompts), **{f"prompts/{s}": len(v) for s, v in by_source.items()},
              "champion_cached": int(champion.get("cached", False))}  # fmt: skip
    return StageResult(counts, metrics)


def _candidate(ctx: RoundContext) -> dict:
    record = ctx.store.get_checkpoint(candidate_checkpoint_id(ctx.run, ctx.round))
    if record is None:
        raise ValueError(f"run {ctx.run!r} round {ctx.round} has no candidate checkpoint; run the train stage first")
    from ampo.checkpoints import resolve_checkpoint

    return {"id": record["id"], "path": resolve_checkpoint(record, checkpoint_places(ctx.cfg)),
            "registered": str(record["path"]), "round": record["round"]}


def _eval_generation(ctx: RoundContext):
    """The generation settings of evaluation: the run's, with one greedy (by default) sample per prompt."""
    ev = ctx.cfg.eval
    return ctx.cfg.generation.model_copy(update={"n": 1, "temperature": ev.temperature,
                                                 "max_new_tokens": ev.max_new_tokens})  # fmt: skip


def _eval_key(ctx: RoundContext, prompts: list) -> str:
    """Everything that decides an evaluation's outputs besides the weights: settings, rewards, prompts, device."""
    payload = {"eval": ctx.cfg.eval.model_dump(mode="json"), "reward": ctx.cfg.reward.model_dump(mode="json"),
               "generation": _eval_generation(ctx).model_dump(mode="json", exclude={"cpu_top_p"}),  # same outputs
               "device": ctx.cfg.runtime.device,
               "prompts": [p.prompt_id for p in prompts]}  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _weights_fingerprint(path: str) -> str:
    """Which weights a checkpoint folder holds now: names, sizes and modification times of its weight files and
    manifest (a folder trained again gets new ones). A hub model name stands for itself."""
    folder = Path(path)
    if not folder.is_dir():
        return hashlib.sha256(path.encode()).hexdigest()[:12]
    files = sorted(f for f in folder.iterdir() if f.suffix == ".safetensors" or f.name == "manifest.json")
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:12]


def eval_cache_path(ctx: RoundContext, policy: dict, prompts: list | None = None) -> Path:
    """Where the evaluation outputs of `policy` ({"id", "path"}) under this round's settings are cached."""
    from ampo.prompts import eval_prompts
    from ampo.stages.context import run_dir

    if prompts is None:
        from ampo.rewards.verifiable import unsupported_instructions

        by_source = eval_prompts(ctx.cfg.eval, ctx.cfg.prompts, unsupported=unsupported_instructions())
        prompts = [p for source in by_source.values() for p in source]  # as evaluate takes them
    name = f"{policy['id']}-{_weights_fingerprint(policy['path'])}-{_eval_key(ctx, prompts)}.json"
    return run_dir(ctx.cfg, ctx.run) / "eval-cache" / name


def _cached_outputs(ctx: RoundContext, policy: dict, prompts: list) -> dict | None:
    """A policy's evaluation outputs as computed before under these settings and weights, or None."""
    path = eval_cache_path(ctx, policy, prompts)
    return {**json.loads(path.read_text()), "cached": True} if path.is_file() else None


@contextmanager
def _engines(ctx: RoundContext) -> Iterator[Callable[[dict], AbstractContextManager]]:
    """engine(policy): a context giving the pool that generates with `policy`.

    Locally, the policies of the stage share one generator: the next one's weights are swapped into it in place
    when its checkpoint differs only in weights (Generator.swap_weights: the candidate and the champion it was
    trained from), which saves the vLLM engine's start; otherwise the generator is closed and another one built.
    With compute: ray, each policy gets its own pool of actors, as every stage's engine does."""
    from ampo.generation import make_generator
    from ampo.stages.compute import LocalPool, engine_pool

    gen, runtime = _eval_generation(ctx), ctx.cfg.runtime
    if runtime.compute != "local":
        yield lambda policy: engine_pool(runtime, "generate", engine_policy(ctx.cfg, policy), gen, runtime)
        return
    held = []  # the generator, once built

    @contextmanager
    def engine(policy: dict) -> Iterator[LocalPool]:
        path = engine_policy(ctx.cfg, policy)
        if held and not held[0].swap_weights(path):
            held.pop().close()
        if not held:
            held.append(make_generator(path, gen, runtime))
        generator = held[0]
        yield LocalPool(lambda payload: generator.generate(payload[0], n=payload[2], seeds=payload[1]))

    try:
        yield engine
    finally:
        if held:
            held.pop().close()


def _samples(ctx: RoundContext, policy: dict, prompts: list, engine) -> list:
    """One response (a Sample) per prompt from `policy`, drawn with the engine `engine(policy)` gives (_engines)."""
    from ampo.generation import derive_seed
    from ampo.stages.compute import shard_size, workers

    seeds = [derive_seed("eval", 0, p.prompt_id) for p in prompts]
    gen, runtime = _eval_generation(ctx), ctx.cfg.runtime
    size = shard_size(len(prompts), workers(runtime), len(prompts), multiple=gen.batch_size)  # locally: one call, as before
    starts = range(0, len(prompts), size)
    shards = [([p.prompt for p in prompts[lo : lo + size]], seeds[lo : lo + size], 1) for lo in starts]
    samples = [None] * len(prompts)
    with engine(policy) as pool:
        for i, pools in pool.map(shards):
            samples[starts[i] : starts[i] + len(pools)] = [pool_[0] for pool_ in pools]
    return samples


def _scored(policy: dict, prompts: list, samples: list, stack) -> dict:
    """The evaluation outputs of `policy`'s samples: each response, its reward, length and per-instruction results."""
    from ampo.rewards.verifiable import check_instructions

    texts = [s.text for s in samples]
    scored = stack.score(prompts, texts)
    if scored.dropped.any():
        raise ValueError(f"{int(scored.dropped.sum())} evaluation responses of {policy['id']} got no finite reward")
    followed = [[(c.strict, c.loose) for c in check_instructions(p, t)] if p.instruction_id_list else []
                for p, t in zip(prompts, texts)]  # fmt: skip
    return {"policy": policy["id"], "prompt_ids": [p.prompt_id for p in prompts], "responses": texts,
            "rewards": scored.total.tolist(), "lengths": [s.n_tokens for s in samples], "followed": followed}


def _answers(outputs: dict, prompts: list) -> Answers:
    if outputs["prompt_ids"] != [p.prompt_id for p in prompts]:
        raise ValueError(f"cached evaluation of {outputs['policy']} is for other prompts; delete it to recompute")
    followed = [[tuple(pair) for pair in f] for f in outputs["followed"]]
    return Answers(list(outputs["responses"]), np.array(outputs["rewards"], float), np.array(outputs["lengths"], float),
                   followed)
