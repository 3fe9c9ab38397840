"""Round reports: markdown summary, selection statistics and plots, from plain arrays and dicts.

The flows publish these as Prefect artifacts and write the same files under the run's workdir.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ampo.gates import evaluation_markdown, gate_summary

STAGE_ORDER = ("generate", "score", "embed", "select", "reflogps", "train", "evaluate", "promote")


def selection_stats(prompt_offsets: np.ndarray, rewards: np.ndarray, roles: np.ndarray) -> dict[str, float]:
    """Per-round selection statistics. offsets (P+1,), rewards (R,), roles (R,) of '', 'chosen', 'rejected'."""
    lengths = np.diff(prompt_offsets)
    selected = roles != ""
    chosen, rejected = roles == "chosen", roles == "rejected"
    pool_of = np.repeat(np.arange(len(lengths)), lengths)  # (R,) prompt index of each row
    with_group = np.zeros(len(lengths), bool)
    with_group[pool_of[chosen]] = True
    spread = _per_prompt_span(prompt_offsets, rewards)
    return {
        "selection/prompts": float(len(lengths)),
        "selection/prompts_with_group": float(with_group.sum()),
        "selection/responses": float(len(rewards)),
        "selection/selected": float(selected.sum()),
        "selection/pool_reward_mean": _mean(rewards),
        "selection/chosen_reward_mean": _mean(rewards[chosen]),
        "selection/rejected_reward_mean": _mean(rewards[rejected]),
        "selection/pool_reward_span_mean": _mean(spread),
    }


def _per_prompt_span(offsets: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    nonempty = np.diff(offsets) > 0
    starts = offsets[:-1][nonempty]
    if len(starts) == 0:
        return np.zeros(0)
    return np.maximum.reduceat(rewards, starts) - np.minimum.reduceat(rewards, starts)


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def markdown_summary(run: str, round_: int, stages: dict[str, dict], stats: dict[str, float], decision: dict | None) -> str:
    """A short markdown report of one round: stage timings and counts, selection statistics, gate decision."""
    lines = [f"# Run `{run}`, round {round_}", "", "| stage | status | seconds | counts |", "|---|---|---|---|"]
    total = 0.0
    for name in STAGE_ORDER:
        rec = stages.get(name)
        if rec is None:
            lines.append(f"| {name} | not run | | |")
            continue
        seconds = float(rec.get("seconds") or 0.0)
        total += seconds
        counts = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted((rec.get("counts") or {}).items()))
        lines.append(f"| {name} | {rec.get('status', '?')} | {seconds:.1f} | {counts} |")
    lines += [f"| total | | {total:.1f} | |", "", "## Selection", "", "| statistic | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in stats.items()]
    lines += skipped_pool_rows((stages.get("select") or {}).get("counts") or {})
    lines += ["", "## Gate decision", ""]
    if decision is None:
        lines.append("not decided (the round did not reach the promote stage)")
    else:
        lines.append(f"**{gate_summary(decision)}**")
        lines += [f"- {reason}" for reason in decision.get("reasons", [])]
    evaluation = evaluation_markdown((stages.get("evaluate") or {}).get("metrics"))
    if evaluation:
        lines += ["", "## Evaluation", "", *evaluation]
    return "\n".join(lines) + "\n"


SKIPPED_POOLS = {  # select-stage count -> its row in the Selection table
    "skipped_no_spread": "pools skipped: reward spread below selection.min_reward_spread",
    "skipped_low_potential": "pools skipped: below the alignment-potential cut (selection.potential)",
    "dropped_tied_negatives": "negatives dropped: reward tied with the chosen one's (selection.drop_tied_negatives)",
}


def skipped_pool_rows(select_counts: dict) -> list[str]:
    """Selection-table rows for the pools the select stage skipped before selecting, as it counted them."""
    return [f"| {label} | {select_counts[key]} |" for key, label in SKIPPED_POOLS.items() if key in select_counts]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


EXCERPT_CHARS = 80  # characters of a prompt or response shown in the per-prompt selection table


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """One line of at most `limit` characters: whitespace runs (newlines included) become one space, control
    characters are dropped, and a cut text ends with an ellipsis."""
    line = " ".join("".join(c for c in text if c.isprintable() or c.isspace()).split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "\u2026"


def selection_rows(prompt_offsets: np.ndarray, prompt_ids: np.ndarray, prompts: np.ndarray, responses: np.ndarray,
                   rewards: np.ndarray, roles: np.ndarray, limit: int = EXCERPT_CHARS) -> list[dict]:
    """One row per prompt that has a selected group: its pool size and reward range, the chosen response's reward
    and excerpt, the rejected rewards (best first) and the excerpt of the lowest-rewarded rejected one.
    Arrays as in selection_stats, plus prompt_ids, prompts and responses (R,) of str."""
    rows = []
    for p in range(len(prompt_offsets) - 1):
        lo, hi = int(prompt_offsets[p]), int(prompt_offsets[p + 1])
        role = roles[lo:hi]
        chosen = np.flatnonzero(role == "chosen")
        if len(chosen) == 0:
            continue
        c = lo + int(chosen[0])
        rejected = lo + np.flatnonzero(role == "rejected")
        rejected = rejected[np.argsort(-rewards[rejected], kind="stable")]
        rows.append({  # numbers first, then the texts: a table shows the leftmost columns without scrolling
            "prompt_id": str(prompt_ids[lo]),
            "pool": hi - lo,
            "pool_reward_range": f"{rewards[lo:hi].min():.3g} .. {rewards[lo:hi].max():.3g}",
            "chosen_reward": round(float(rewards[c]), 4),
            "rejected_rewards": ", ".join(f"{r:.3g}" for r in rewards[rejected]),
            "prompt": excerpt(str(prompts[lo]), limit),
            "chosen": excerpt(str(responses[c]), limit),
            "worst_rejected": excerpt(str(responses[rejected[-1]]), limit) if len(rejected) else "",
        })
    return rows


def plot_reward_distribution(pool_rewards: np.ndarray, selected_rewards: np.ndarray, path: Path) -> Path:
    """Histogram of the rewards of the whole pool against the selected responses."""
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    both = np.concatenate([pool_rewards, selected_rewards]) if len(pool_rewards) else [0, 1]
    bins = np.histogram_bin_edges(both, 20)
    for values, alpha, name in ((pool_rewards, 0.5, "pool"), (selected_rewards, 0.6, "selected")):
        if len(values):  # stairs: one patch per series, where hist draws one per bin
            ax.stairs(np.histogram(values, bins, density=True)[0], bins, fill=True, alpha=alpha,
                      label=f"{name} ({len(values)})")
    ax.set(xlabel="reward", ylabel="density", title="Reward distribution: pool vs selected")
    ax.legend()
    return _save(fig, path, left=0.1)


def project_2d(vectors: np.ndarray) -> np.ndarray:
    """Principal-component projection to 2-D. (R, d) -> (R, 2); deterministic sign (largest loading positive)."""
    centered = vectors - vectors.mean(axis=0, keepdims=True)
    if len(vectors) < 2:
        return np.zeros((len(vectors), 2))
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    comps = vt[:2]
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])
    out = centered @ (comps * signs[:, None]).T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def plot_embedding_map(vectors: np.ndarray, prompt_idx: np.ndarray, roles: np.ndarray, path: Path) -> Path:
    """2-D map of a few prompts' response embeddings; chosen as stars, rejected as crosses, the rest as dots."""
    xy = project_2d(vectors)
    fig = _figure(6, 5)
    ax = fig.add_subplot()
    for p in np.unique(prompt_idx):
        color = f"C{int(p) % 10}"
        for role, marker, size in (("", "o", 12), ("rejected", "x", 50), ("chosen", "*", 160)):
            m = (prompt_idx == p) & (roles == role)
            ax.scatter(xy[m, 0], xy[m, 1], c=color, marker=marker, s=size, alpha=0.45 if role == "" else 1.0)
    ax.set(title="Response embeddings (PCA): * chosen, x rejected", xlabel="PC1", ylabel="PC2")
    return _save(fig, path, bottom=0.1)


def plot_rounds(metrics: list[dict], path: Path) -> Path:
    """Evaluation metrics across rounds: mean reward of the candidate and the champion, and the win rate."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    fig = _figure(9, 3.5)
    a, b = fig.subplots(1, 2)
    rounds = [m["round"] for m in metrics]
    a.plot(rounds, [m.get("champion_reward") for m in metrics], "o-", label="champion")
    a.plot(rounds, [m.get("candidate_reward") for m in metrics], "s--", label="candidate")
    a.set(xlabel="round", ylabel="mean eval reward", title="Reward by round")
    a.legend()
    b.plot(rounds, [m.get("win_rate") for m in metrics], "o-")
    bounded = [m for m in metrics if m.get("win_rate_bounds")]
    if bounded:  # the one-sided bounds of the gate's bootstrap
        b.fill_between([m["round"] for m in bounded], *zip(*[m["win_rate_bounds"] for m in bounded]), alpha=0.2)
    b.axhline(0.5, color="grey", lw=0.8)
    b.set(xlabel="round", ylabel="win rate vs champion", title="Head-to-head", ylim=(0, 1))
    for axis in (a.xaxis, b.xaxis):  # whole rounds only (one round alone got ticks at -0.045 ... 0.045)
        axis.set_major_locator(MaxNLocator(integer=True) if len(rounds) > 10 else FixedLocator(rounds))
    return _save(fig, path, left=0.08, wspace=0.3)


def _figure(width: float, height: float):
    """A figure of matplotlib's object API: no pyplot, no global figure registry, no GUI backend."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig, path: Path, *, left=0.12, bottom=0.14, wspace=None) -> Path:
    """PNG at 100 dpi. Fixed margins that fit the labels above: tight_layout measured every tick label
    twice and cost more than drawing the figure (about 0.15 s per plot)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.subplots_adjust(left=left, right=0.97, bottom=bottom, top=0.9, wspace=wspace)
    fig.savefig(path, dpi=100)
    return path
