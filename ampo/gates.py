"""Evaluation metrics of a policy on held-out prompts, and the gate decision that promotes or rejects a candidate.

Pure functions of arrays: the evaluation stage generates and scores, then calls these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

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


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # one line per gate, pass or fail, with the numbers
    win_rate: float | None = None
    reward_gain: float | None = None
    length_ratio: float | None = None

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
        extra = dict(
            instruction_strict=float(flat[:, 0].mean()),
            instruction_loose=float(flat[:, 1].mean()),
            prompt_strict=float(per_prompt[:, 0].mean()),
            prompt_loose=float(per_prompt[:, 1].mean()),
        )
    return PolicyMetrics(len(rewards), float(rewards.mean()), float(lengths.mean()), **extra)


def win_rate(candidate: np.ndarray, champion: np.ndarray, *, tol: float = 1e-9) -> float:
    """Head-to-head share of prompts where the candidate's reward beats the champion's; ties count half."""
    candidate, champion = np.asarray(candidate, float), np.asarray(champion, float)
    if candidate.shape != champion.shape or candidate.ndim != 1 or len(candidate) == 0:
        raise ValueError(f"win rate needs two equal non-empty (P,) arrays, got {candidate.shape} and {champion.shape}")
    diff = candidate - champion
    wins, ties = (diff > tol).sum(), (np.abs(diff) <= tol).sum()
    return float((wins + 0.5 * ties) / len(diff))


def decide(gates: Gates, candidate: PolicyMetrics, champion: PolicyMetrics, wins: float) -> GateDecision:
    """Apply every gate that is set; the candidate passes only if all of them pass."""
    gain = candidate.mean_reward - champion.mean_reward
    ratio = candidate.mean_length / champion.mean_length if champion.mean_length > 0 else float("inf")
    checks = [
        ("win rate", wins, gates.min_win_rate, lambda v, t: v >= t, ">="),
        ("reward gain", gain, gates.min_reward_gain, lambda v, t: v >= t, ">="),
        ("length ratio", ratio, gates.max_length_ratio, lambda v, t: v <= t, "<="),
    ]
    reasons, passed = [], True
    for name, value, threshold, ok, op in checks:
        if threshold is None:
            continue
        good = bool(ok(value, threshold))
        passed &= good
        reasons.append(f"{name} {value:.4f} {op} {threshold:g}: {'pass' if good else 'FAIL'}")
    if not reasons:
        reasons.append("no gate is set: the candidate is promoted unconditionally")
    return GateDecision(passed, reasons, win_rate=wins, reward_gain=gain, length_ratio=ratio)
