"""A finished (or partial) round, summarised: markdown, selection statistics and plots, written under its folder."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ampo import report
from ampo.config import RunConfig
from ampo.gates import history_row
from ampo.stages.context import open_store, round_dir, write_json_atomic
from ampo.store import Store
from ampo.store.pools import prompt_offsets

MAP_PROMPTS = 4  # prompts drawn in the 2-D embedding map
REPORTED = "reported.json"  # in the report folder, written after the report's files and artifacts


def mark_reported(cfg: RunConfig, run: str, round_: int) -> None:
    """Record that the round's report is written and published: the last step of a round (see next_round)."""
    from ampo.schema import utcnow

    write_json_atomic(round_dir(cfg, run, round_) / "report" / REPORTED,
                      {"run": run, "round": round_, "reported_at": utcnow().isoformat()})  # fmt: skip


def is_reported(cfg: RunConfig, run: str, round_: int) -> bool:
    return (round_dir(cfg, run, round_) / "report" / REPORTED).is_file()


def write_round_report(cfg: RunConfig, run: str, round_: int, *, plots: bool = True, tables: bool = True) -> dict:
    """Write summary.md and (with `plots`) the PNG plots for (run, round); return their paths, the summary text,
    the selection statistics, one row per selected prompt (report.selection_rows) and the evaluation metrics.
    tables=False: without the statistics and rows (empty lists), whose prompt and response texts are then not read
    (the round's flow publishes them when select ends: selection_report)."""
    store = open_store(cfg)
    out = round_dir(cfg, run, round_) / "report"
    out.mkdir(parents=True, exist_ok=True)
    stages = store.stage_status(run, round_)
    scored = _scored_rows(store, run, round_, vectors=plots, texts=tables)  # the vectors for the embedding map only
    selection = _selection(scored, tables=tables)
    decision = (stages.get("promote") or {}).get("gate")
    markdown = report.markdown_summary(run, round_, stages, selection["stats"], decision)
    (out / "summary.md").write_text(markdown)
    result = {"markdown": str(out / "summary.md"), "markdown_text": markdown,
              "selection_table": selection["table"], "selection_rows": selection["rows"],
              "evaluation": (stages.get("evaluate") or {}).get("metrics") or {}, "plots": []}  # fmt: skip
    if not plots:
        return result
    prompt_ids, rewards, roles = selection["prompt_ids"], selection["rewards"], selection["roles"]
    plots = [report.plot_reward_distribution(rewards, rewards[roles != ""], out / "rewards.png")]
    if len(scored) and scored["vector"].null_count == 0:
        first = np.isin(prompt_ids, np.unique(prompt_ids)[:MAP_PROMPTS])
        vectors = np.stack(scored["vector"].to_numpy(zero_copy_only=False)[first])
        _, prompt_idx = np.unique(prompt_ids[first], return_inverse=True)
        plots.append(report.plot_embedding_map(vectors, prompt_idx, roles[first], out / "embeddings.png"))
    history = rounds_history(cfg, run)
    if history:
        plots.append(report.plot_rounds(history, out / "rounds.png"))
    return {**result, "plots": [str(p) for p in plots]}


def selection_report(store: Store, run: str, round_: int) -> dict:
    """The round's selection as its report shows it, read from `store`: "table", the selection statistics as
    {"statistic", "value"} rows, and "rows", one row per selected prompt (report.selection_rows)."""
    selection = _selection(_scored_rows(store, run, round_, vectors=False, texts=True), tables=True)
    return {"table": selection["table"], "rows": selection["rows"]}


def _scored_rows(store: Store, run: str, round_: int, *, vectors: bool, texts: bool) -> pa.Table:
    columns = ["prompt_id", "reward", "role"] + (["prompt", "response"] if texts else []) + (["vector"] if vectors else [])
    rows = store.read_rows(run, round_, columns)
    return rows.filter(rows["reward"].is_valid())


def _selection(scored: pa.Table, *, tables: bool) -> dict:
    prompt_ids = np.asarray(scored["prompt_id"].to_pylist(), dtype=object)
    rewards = scored["reward"].to_numpy(zero_copy_only=False).astype(float)
    roles = np.asarray(scored["role"].to_pylist(), dtype=object)
    offsets = prompt_offsets(prompt_ids)  # (P+1,)
    stats = report.selection_stats(offsets, rewards, roles)
    table = [{"statistic": k, "value": v} for k, v in stats.items()] if tables else []
    per_prompt = report.selection_rows(offsets, prompt_ids, np.asarray(scored["prompt"].to_pylist(), dtype=object),
                                       np.asarray(scored["response"].to_pylist(), dtype=object), rewards,
                                       roles) if tables else []  # fmt: skip
    return {"stats": stats, "table": table, "rows": per_prompt, "prompt_ids": prompt_ids, "rewards": rewards,
            "roles": roles}


def rounds_history(cfg: RunConfig, run: str) -> list[dict]:
    """Evaluation metrics of every evaluated round of the run, oldest first."""
    store = open_store(cfg)
    history, round_ = [], 0
    while True:
        status = store.stage_status(run, round_)
        if not status:
            return history
        m = (status.get("evaluate") or {}).get("metrics") or {}
        if m:
            history.append(history_row(round_, m))
        round_ += 1


def round_outcome(cfg: RunConfig, run: str, round_: int) -> dict:
    """Champion after the round and the gate decision, for flow results and the CLI."""
    store = open_store(cfg)
    promote = store.stage_status(run, round_).get("promote") or {}
    champion = store.champion(run)
    return {"champion": champion["id"] if champion else None, "gate": promote.get("gate")}
