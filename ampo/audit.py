"""Audit queries over the store: runs and rounds at a glance, and the export of selected groups.

The export follows the released AMPO datasets (spec 3.7): prompt_id, prompt, all_generated_responses,
all_reward_scores, A0..Ak as chat turns [{content, role}] with score_A0..score_Ak; A0 is the chosen response,
the rejected ones follow, best reward first.
"""

from __future__ import annotations

import json
from pathlib import Path

from ampo.gates import gate_summary
from ampo.store import Store
from ampo.store.pools import split_by_prompt


def runs_overview(store: Store) -> list[dict]:
    """One row per (run, round): stages done, the failed or running stage, gate decision, champion of the run, and
    `skipped_no_spread`: pools the select stage skipped for want of reward spread (None before select is done)."""
    out: dict[tuple, dict] = {}
    for r in store.stage_records():  # JSON fields decoded, sorted by (run, round)
        item = out.setdefault((r["run"], r["round"]), {"run": r["run"], "round": r["round"], "done": [],
                                                       "pending": [], "seconds": 0.0, "gate": None,
                                                       "skipped_no_spread": None})  # fmt: skip
        (item["done"] if r["status"] == "done" else item["pending"]).append(f"{r['stage']}" if r["status"] == "done"
                                                                            else f"{r['stage']}:{r['status']}")
        item["seconds"] += r["seconds"] or 0.0
        if r["gate"]:
            item["gate"] = gate_summary(r["gate"])
        if r["stage"] == "select" and r["status"] == "done" and r["counts"]:
            item["skipped_no_spread"] = r["counts"].get("skipped_no_spread")
    for item in out.values():
        champion = store.champion(item["run"])
        item["champion"] = champion["id"] if champion else None
    return list(out.values())


def export_groups(store: Store, run: str, round_: int, path: str | Path) -> int:
    """Write the round's selected groups as JSON lines in the released AMPO layout; returns the number of groups."""
    rows = store.read_rows(run, round_, ["prompt_id", "prompt", "response", "reward", "role"]).to_pylist()
    records = [r for r in (ampo_record(pool) for pool in split_by_prompt(rows)) if r is not None]
    if not records:
        what = "no rows" if not rows else "no selected groups"
        raise ValueError(f"run {run!r} round {round_} has {what}; nothing written to {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    partial.replace(path)  # a reader never sees half a file
    return len(records)


def ampo_record(pool: list[dict]) -> dict | None:
    """One prompt's pool (rows with prompt, response, reward, role) as an AMPO dataset row; None if unselected."""
    chosen = [r for r in pool if r["role"] == "chosen"]
    rejected = sorted((r for r in pool if r["role"] == "rejected"), key=lambda r: -r["reward"])
    if not chosen or not rejected:
        return None
    record = {"prompt_id": pool[0]["prompt_id"], "prompt": pool[0]["prompt"],
              "all_generated_responses": [r["response"] for r in pool],
              "all_reward_scores": [r["reward"] for r in pool]}  # fmt: skip
    for i, r in enumerate(chosen + rejected):
        record[f"A{i}"] = [{"content": r["prompt"], "role": "user"}, {"content": r["response"], "role": "assistant"}]
        record[f"score_A{i}"] = r["reward"]
    return record
