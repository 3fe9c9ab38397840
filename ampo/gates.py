"""Evaluation metrics of a policy on held-out prompts, their paired bootstrap intervals, and the gate decision that
promotes, rejects or reports a candidate as unchanged.

Pure functions of arrays: the evaluation stage generates and scores, then calls `compare`; the promote stage calls
`decide` on what `compare` returned (stored as the evaluate stage's metrics). See docs/gates.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from ampo import stats
from ampo.config import Gates


@dataclass(frozen=True)
class PolicyMetrics:
    """What one policy scored on the evaluation prompts (all means over prompts)."""

    n_prompts: int
    mean_reward: float
    mean_length: float  # generated tokens per response
    instruction_strict: float | None = None  # share of instructions followed (IFEval instruction-level)
    instruction_loose: float | None = None
    prompt_strict: float | None = None  # share of prompts with every instruction followed (prompt-level)
    prompt_loose: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def policy_metrics(
    rewards: np.ndarray, lengths: np.ndarray, followed: list[list[tuple[bool, bool]]] | None = None
) -> PolicyMetrics:
    """Summarise one policy. rewards, lengths: (P,). followed[p] = [(strict, loose) per instruction of prompt p]."""
    rewards, lengths = np.asarray(rewards, float), np.asarray(lengths, float)
    if rewards.shape != lengths.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {rewards.shape} and lengths {lengths.shape} must be the same (P,) shape")
    if len(rewards) == 0:
        raise ValueError("no evaluation prompts: cannot compute metrics on an empty set")
    extra = {}
    with_instructions = [f for f in followed or [] if f]
    if with_instructions:
        flat = np.array([pair for f in with_instructions for pair in f], dtype=bool)  # (I, 2)
        per_prompt = np.array([np.all(np.array(f, dtype=bool), axis=0) for f in with_instructions])  # (P', 2)
        extra = {
            "instruction_strict": float(flat[:, 0].mean()),
            "instruction_loose": float(flat[:, 1].mean()),
            "prompt_strict": float(per_prompt[:, 0].mean()),
            "prompt_loose": float(per_prompt[:, 1].mean()),
        }
    return PolicyMetrics(len(rewards), float(rewards.mean()), float(lengths.mean()), **extra)


def win_rate(candidate: np.ndarray, champion: np.ndarray, *, tol: float = 1e-9) -> float:
    """Head-to-head share of prompts where the candidate's reward beats the champion's; ties count half."""
    return float(win_points(candidate, champion, tol=tol).mean())


def win_points(candidate: np.ndarray, champion: np.ndarray, *, tol: float = 1e-9) -> np.ndarray:
    """(P,) per prompt: 1 where the candidate's reward beats the champion's, 0.5 for a tie, 0 for a loss."""
    candidate, champion = np.asarray(candidate, float), np.asarray(champion, float)
    if candidate.shape != champion.shape or candidate.ndim != 1 or len(candidate) == 0:
        raise ValueError(f"win rate needs two equal non-empty (P,) arrays, got {candidate.shape} and {champion.shape}")
    diff = candidate - champion
    return np.where(diff > tol, 1.0, np.where(np.abs(diff) <= tol, 0.5, 0.0))


# --- per-prompt arrays of the accuracy metrics: each metric is sum(num) / sum(den) over prompts -----------------

ACCURACY = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")


def metric_arrays(
    rewards: np.ndarray, followed: list[list[tuple[bool, bool]]] | None, n: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (num, den), each (P,), such that the metric is num.sum() / den.sum(), as `policy_metrics` computes it:
    mean_reward over every prompt; prompt-level accuracy over the prompts with instructions; instruction-level over
    their instructions. Accuracy metrics are absent when no prompt has instructions."""
    rewards = np.asarray(rewards, float)
    if rewards.shape != (n,):
        raise ValueError(f"rewards {rewards.shape} must be ({n},)")
    out = {"mean_reward": (rewards, np.ones(n))}
    followed = followed if followed is not None else [[] for _ in range(n)]
    if len(followed) != n:
        raise ValueError(f"followed has {len(followed)} prompts, rewards {n}")
    if not any(followed):
        return out
    has = np.array([1.0 if f else 0.0 for f in followed])
    counts = np.array([len(f) for f in followed], float)
    for col, kind in ((0, "strict"), (1, "loose")):
        ok = [np.array([pair[col] for pair in f], dtype=bool) for f in followed]
        out[f"prompt_{kind}"] = (np.array([float(o.all()) if len(o) else 0.0 for o in ok]), has)
        out[f"instruction_{kind}"] = (np.array([float(o.sum()) for o in ok]), counts)
    return out


# --- structured evaluation: what the evaluate stage stores and the promote stage reads ---------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Interval(_Frozen):
    """A point value and its one-sided bounds at the evaluation's confidence c: P(true < lower) <= 1 - c and
    P(true > upper) <= 1 - c, so [lower, upper] is a two-sided interval at level 2c - 1."""

    value: float
    lower: float
    upper: float

    def text(self, fmt: str = ".4f") -> str:
        return f"{self.value:{fmt}} [{self.lower:{fmt}}, {self.upper:{fmt}}]"


class Evaluation(_Frozen):
    """Candidate and champion on the same evaluation prompts, each metric with its paired bootstrap bounds.

    candidate / champion: metric -> Interval of that policy (mean_reward and the accuracies), plus mean_length;
    difference: metric -> Interval of candidate - champion; win_rate and length_ratio: Intervals of the
    head-to-head comparison. unchanged: every evaluation answer of the candidate equals the champion's."""

    n_prompts: int
    confidence: float
    bootstrap_samples: int
    bootstrap_seed: int
    unchanged: bool
    candidate: dict[str, Interval]
    champion: dict[str, Interval]
    difference: dict[str, Interval]
    win_rate: Interval
    length_ratio: Interval
    mean_length: dict[str, float]  # {"candidate": ..., "champion": ...} generated tokens per response


@dataclass(frozen=True)
class Answers:
    """One policy's evaluation outputs, one entry per prompt, prompts in the same order for both policies."""

    responses: list[str]
    rewards: np.ndarray  # (P,)
    lengths: np.ndarray  # (P,) generated tokens
    followed: list[list[tuple[bool, bool]]] | None = None  # per prompt: (strict, loose) per instruction


def compare(candidate: Answers, champion: Answers, gates: Gates) -> Evaluation:
    """Every metric of both policies and of their difference, with one-sided bounds at gates.confidence from one
    paired bootstrap over prompts (the same resamples for every metric, seeded by gates.bootstrap_seed)."""
    n = len(candidate.responses)
    if n == 0 or len(champion.responses) != n:
        raise ValueError(f"compare needs the same non-empty prompts for both, got {n} and {len(champion.responses)}")
    counts = stats.resample_counts(n, gates.bootstrap_samples, gates.bootstrap_seed)  # (B, P)

    def interval(num: np.ndarray, den: np.ndarray) -> Interval:
        with np.errstate(divide="ignore", invalid="ignore"):
            value = float(num.sum() / den.sum())
        lower, upper = stats.one_sided_bounds(stats.ratio_replicates(num, den, counts), gates.confidence)
        return Interval(value=value, lower=lower, upper=upper)

    cand = metric_arrays(candidate.rewards, candidate.followed, n)
    champ = metric_arrays(champion.rewards, champion.followed, n)
    names = [m for m in cand if m in champ]
    c_len, h_len = np.asarray(candidate.lengths, float), np.asarray(champion.lengths, float)
    return Evaluation(
        n_prompts=n, confidence=gates.confidence, bootstrap_samples=gates.bootstrap_samples,
        bootstrap_seed=gates.bootstrap_seed, unchanged=list(candidate.responses) == list(champion.responses),
        candidate={m: interval(*cand[m]) for m in cand},
        champion={m: interval(*champ[m]) for m in champ},
        difference={m: interval(cand[m][0] - champ[m][0], cand[m][1]) for m in names if _same(cand[m][1], champ[m][1])},
        win_rate=interval(win_points(candidate.rewards, champion.rewards), np.ones(n)),
        length_ratio=interval(c_len, h_len),
        mean_length={"candidate": float(c_len.mean()), "champion": float(h_len.mean())},
    )  # fmt: skip


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Paired differences need the same denominators: the same prompts carry the same instructions."""
    return a.shape == b.shape and bool(np.all(a == b))


Decision = Literal["promote", "reject", "unchanged"]


@dataclass(frozen=True)
class GateDecision:
    decision: Decision
    passed: bool  # the candidate becomes the champion (promote, or unchanged with gates.on_unchanged=promote)
    mode: str
    confidence: float
    reasons: list[str] = field(default_factory=list)  # one line per gate, pass or fail, with the numbers
    win_rate: float | None = None
    reward_gain: float | None = None
    length_ratio: float | None = None
    intervals: dict = field(default_factory=dict)  # name -> {value, lower, upper} of the gated comparisons

    def as_dict(self) -> dict:
        return asdict(self)


def decide(gates: Gates, evaluation: Evaluation) -> GateDecision:
    """Apply every gate that is set to the one-sided bounds of `evaluation`.

    superiority: a gate passes when its pessimistic bound clears the threshold (lower > min, upper < max).
    non_inferiority: a gate fails only when its optimistic bound misses the threshold (upper < min, lower > max),
    i.e. the evaluation shows at gates.confidence that the candidate is worse than the threshold allows.
    A candidate whose answers equal the champion's is "unchanged", whatever the gates would say."""
    used = (evaluation.confidence, evaluation.bootstrap_samples, evaluation.bootstrap_seed)
    wanted = (gates.confidence, gates.bootstrap_samples, gates.bootstrap_seed)
    if used != wanted:
        raise ValueError(f"the evaluation's bounds were computed with (confidence, bootstrap_samples, bootstrap_seed)"
                         f" = {used}, the gates ask for {wanted}: run the evaluate stage again (force)")  # fmt: skip
    gain = evaluation.difference["mean_reward"]
    common = {"mode": gates.mode, "confidence": gates.confidence, "win_rate": evaluation.win_rate.value,
                  "reward_gain": gain.value, "length_ratio": evaluation.length_ratio.value,
                  "intervals": {"win_rate": evaluation.win_rate.model_dump(), "reward_gain": gain.model_dump(),
                             "length_ratio": evaluation.length_ratio.model_dump()}}  # fmt: skip
    checks = [
        ("win rate", evaluation.win_rate, gates.min_win_rate, True),
        ("reward gain", gain, gates.min_reward_gain, True),
        ("length ratio", evaluation.length_ratio, gates.max_length_ratio, False),
    ]
    pct = f"{gates.confidence:.0%}"
    reasons, passed = [], True
    for name, iv, threshold, higher_is_better in checks:
        if threshold is None:
            continue
        good, rule = gate_passes(iv, threshold, higher_is_better, gates.mode)
        passed &= good
        reasons.append(f"{name} {iv.text()} (one-sided {pct} bounds), {gates.mode}: {rule} {threshold:g}: "
                       f"{'pass' if good else 'FAIL'}")  # fmt: skip
    if evaluation.unchanged:  # the numbers cannot tell the two apart: the gates are shown, not applied
        keep = gates.on_unchanged == "keep"
        reason = (f"unchanged: the candidate's {evaluation.n_prompts} evaluation answers equal the champion's; "
                  f"{'the champion stays' if keep else 'promoted'} (gates.on_unchanged={gates.on_unchanged})")
        return GateDecision("unchanged", not keep, reasons=[reason, *(f"not applied: {r}" for r in reasons)], **common)
    if not reasons:
        reasons.append("no gate is set: the candidate is promoted unconditionally")
    return GateDecision("promote" if passed else "reject", passed, reasons=reasons, **common)


def gate_passes(iv: Interval, threshold: float, higher_is_better: bool, mode: str) -> tuple[bool, str]:
    """(passes, the rule in words) of one gate on one interval."""
    if mode == "superiority":
        if higher_is_better:
            return iv.lower > threshold, "lower bound >"
        return iv.upper < threshold, "upper bound <"
    if mode == "non_inferiority":
        if higher_is_better:
            return iv.upper >= threshold, "upper bound >="
        return iv.lower <= threshold, "lower bound <="
    raise ValueError(f"gates.mode {mode!r} is not one of 'non_inferiority', 'superiority'")


def gate_summary(gate: dict | None) -> str | None:
    """One line for tables: the decision and the win rate / reward gain with their bounds, from a stored decision."""
    if not gate:
        return None
    decision = gate.get("decision") or ("promote" if gate.get("passed") else "reject")  # records before decisions
    word = {"promote": "promoted", "reject": "rejected", "unchanged": "unchanged"}[decision]
    if decision == "unchanged":
        word += ", promoted" if gate.get("passed") else ", kept champion"
    parts = []
    for name, label in (("win_rate", "win"), ("reward_gain", "gain")):
        iv = (gate.get("intervals") or {}).get(name)
        if iv:
            parts.append(f"{label} {Interval(**iv).text('.3f')}")
    return word + (f" ({'; '.join(parts)})" if parts else "")


def evaluation_markdown(metrics: dict | None) -> list[str]:
    """Markdown lines: each metric of both policies and their difference, with the one-sided bounds."""
    if not metrics or "difference" not in metrics:
        return []
    ev = Evaluation.model_validate(metrics)
    lines = [(f"{ev.n_prompts} prompts; [lower, upper] are one-sided {ev.confidence:.0%} bounds of a paired bootstrap "
             f"({ev.bootstrap_samples} resamples, seed {ev.bootstrap_seed})"), "",
             "| metric | champion | candidate | candidate - champion |", "|---|---|---|---|"]  # fmt: skip
    for name, champ in ev.champion.items():
        cand, diff = ev.candidate.get(name), ev.difference.get(name)
        lines.append(f"| {name} | {champ.text()} | {cand.text() if cand else '-'} | {diff.text() if diff else '-'} |")
    lines.append(f"| win rate (ties half) | | | {ev.win_rate.text()} |")
    lines.append(f"| length ratio | {ev.mean_length['champion']:.1f} tokens | {ev.mean_length['candidate']:.1f} tokens"
                 f" | {ev.length_ratio.text()} |")
    return lines


def history_row(round_: int, metrics: dict) -> dict:
    """Rewards and win rate of one evaluated round for plots across rounds, with bounds when the record has them."""
    if "difference" not in metrics:  # records before intervals: flat "candidate/x" keys
        return {"round": round_, "champion_reward": metrics.get("champion/mean_reward"),
                "candidate_reward": metrics.get("candidate/mean_reward"), "win_rate": metrics.get("eval/win_rate")}
    ev = Evaluation.model_validate(metrics)
    return {"round": round_, "champion_reward": ev.champion["mean_reward"].value,
            "candidate_reward": ev.candidate["mean_reward"].value, "win_rate": ev.win_rate.value,
            "win_rate_bounds": [ev.win_rate.lower, ev.win_rate.upper],
            "candidate_reward_bounds": [ev.candidate["mean_reward"].lower, ev.candidate["mean_reward"].upper],
            "reward_gain": ev.difference["mean_reward"].model_dump()}  # fmt: skip
