"""Rewards: one protocol, a registry of component kinds, and their weighted composition.

A reward function maps (prompts (n,), responses (n,)) -> scores (n,) float64, response i paired with prompt i.
REWARDS maps each `RewardComponent.kind` to a factory (component, runtime) -> RewardFn; `RewardStack` builds one per
component and returns total = sum_c weight_c * part_c together with every part. A non-finite part is an error naming
the prompt and the component, or with on_nonfinite="drop" marks the response dropped (total NaN), with a reason and a
count: never a silent 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ampo.config import RewardComponent, RewardConfig, RuntimeConfig
from ampo.prompts import Prompt
from ampo.rewards.classifier import make_classifier_reward
from ampo.rewards.python import make_python_reward
from ampo.rewards.verifiable import make_verifiable_reward


class RewardFn(Protocol):
    last_counts: dict[str, int]  # counts from the latest call, e.g. {"truncated": 2}

    def validate(self, prompts: list[Prompt]) -> None:
        """Raise ValueError for a prompt this reward cannot score (before any scoring)."""

    def __call__(self, prompts: list[Prompt], responses: list[str]) -> np.ndarray:
        """(n,) float64 scores, response i paired with prompt i."""


REWARDS: dict[str, Callable[[RewardComponent, RuntimeConfig], RewardFn]] = {
    "verifiable": make_verifiable_reward,
    "classifier": make_classifier_reward,
    "python": make_python_reward,
}


@dataclass
class ScoreResult:
    total: np.ndarray  # (n,) sum_c weight_c * part_c; NaN where dropped
    parts: dict[str, np.ndarray]  # component column -> (n,) raw part
    dropped: np.ndarray  # (n,) bool
    reasons: list[str | None]  # (n,) why a response was dropped, else None
    counts: dict[str, int]  # "responses", "dropped", "{column}/nonfinite", "{column}/{component's own counts}"


class RewardStack:
    """The configured components, built once (a classifier loads its model here), scored together."""

    def __init__(self, cfg: RewardConfig, runtime: RuntimeConfig | None = None):
        for c in cfg.components:
            if not math.isfinite(c.weight):
                raise ValueError(f"reward component {c.column!r} has weight {c.weight}; weights must be finite")
        self.cfg = cfg
        runtime = runtime or RuntimeConfig()
        self.fns: dict[str, RewardFn] = {c.column: REWARDS[c.kind](c, runtime) for c in cfg.components}

    def validate(self, prompts: list[Prompt]) -> None:
        """Raise ValueError for a prompt some component cannot score, naming the prompt."""
        if all(c.kind == "verifiable" for c in self.cfg.components):
            bare = [p.prompt_id for p in prompts if not p.instruction_id_list]
            if bare:
                raise ValueError(f"prompts {bare[:5]} carry no instructions, so a verifiable-only reward stack cannot "
                                 "score them; give them instructions or add a classifier or python component")
        for fn in self.fns.values():
            fn.validate(prompts)

    def score(self, prompts: list[Prompt], responses: list[str]) -> ScoreResult:
        """Score response i against prompt i with every component. Returns ScoreResult of (n,) arrays."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; pair each response with its prompt")
        self.validate(prompts)
        n = len(responses)
        parts, counts = {}, {"responses": n}
        for column, fn in self.fns.items():
            part = np.asarray(fn(prompts, responses), dtype=np.float64)
            assert part.shape == (n,), f"reward {column!r} returned shape {part.shape}, expected ({n},)"
            parts[column] = part
            counts.update({f"{column}/{k}": v for k, v in fn.last_counts.items()})
        dropped, reasons = self._nonfinite(prompts, parts, counts)
        total = sum(c.weight * parts[c.column] for c in self.cfg.components)  # (n,)
        total = np.where(dropped, np.nan, total)
        counts["dropped"] = int(dropped.sum())
        return ScoreResult(total, parts, dropped, reasons, counts)

    def _nonfinite(self, prompts, parts, counts) -> tuple[np.ndarray, list[str | None]]:
        """Drop mask and reasons for non-finite parts; raises instead when cfg.on_nonfinite == "error"."""
        n = len(prompts)
        dropped, reasons = np.zeros(n, dtype=bool), [None] * n
        for column, part in parts.items():
            bad = np.flatnonzero(~np.isfinite(part))
            counts[f"{column}/nonfinite"] = len(bad)
            if len(bad) and self.cfg.on_nonfinite == "error":
                i = bad[0]
                raise ValueError(f"reward component {column!r} gave {part[i]} for response {i} of prompt "
                                 f"{prompts[i].prompt_id!r} ({len(bad)} non-finite in all); set "
                                 "reward.on_nonfinite='drop' to drop such responses instead")
            for i in bad:
                dropped[i] = True
                reason = f"{column}: non-finite score {part[i]}"
                reasons[i] = reason if reasons[i] is None else f"{reasons[i]}; {reason}"
        return dropped, reasons
