"""SELECTORS (method name -> per-prompt function), their options, and `select`, the checked entry point."""

from __future__ import annotations

import inspect
from functools import cache, partial

from ampo.selection.ampo_methods import select_bottomk, select_coreset, select_optselect
from ampo.selection.baselines import select_extremes, select_mean_split, select_random, select_top_bottom
from ampo.selection.pool import (
    Selection,
    check_choice,
    check_embeddings,
    check_k,
    check_positive_float,
    check_positive_int,
    check_rewards,
    check_seeds,
)

SELECTORS = {
    "bottomk": select_bottomk,
    "coreset": select_coreset,
    "optselect": select_optselect,
    "random": select_random,
    "extremes": select_extremes,
    "mean_split": select_mean_split,
    "top_bottom": select_top_bottom,
}
NEEDS_K_NEGATIVES = frozenset({"bottomk", "coreset", "optselect", "random"})  # 1 <= k <= N-1; others ignore k
USES_EMBEDDINGS = frozenset({"coreset", "optselect"})  # the others check the embeddings but never read them

OPTION_CHECKS = {
    "cluster_on": partial(check_choice, allowed=("candidates", "all")),
    "n_init": check_positive_int,
    "max_iter": check_positive_int,
    "points": partial(check_choice, allowed=("all", "candidates")),
    "weight_temperature": check_positive_float,
    "solver": partial(check_choice, allowed=("local_search", "exact")),
    "m": check_positive_int,
}


@cache
def selector_options(method: str) -> dict:
    """The options a method takes, with their defaults: its keyword-only parameters other than seed."""
    params = inspect.signature(SELECTORS[method]).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "seed"}


def check_method(method: str, options: dict) -> None:
    """A known method, known option names, allowed option values; else ValueError naming what is allowed."""
    if method not in SELECTORS:
        raise ValueError(f"unknown selector {method!r}; choose from {sorted(SELECTORS)}")
    allowed = selector_options(method)
    for name, value in options.items():
        if name not in allowed:
            raise ValueError(f"unknown option {name!r} for selector {method!r}; allowed: {sorted(allowed)}")
        OPTION_CHECKS[name](name, value)


def select(method: str, rewards, embeddings, k: int, *, seed: int = 0, **options) -> Selection:
    """Select one prompt's chosen and rejected responses. rewards (N,), embeddings (N, d) -> Selection.

    method: a key of SELECTORS. k: negatives for the AMPO methods and random (1 <= k <= N-1); the other
    methods check k >= 1 and ignore it. seed: an int in [0, 2**64) (coreset's k-means++ and random).
    """
    check_method(method, options)
    r = check_rewards(rewards)
    e = check_embeddings(embeddings, len(r))
    k = check_k(k, len(r) if method in NEEDS_K_NEGATIVES else None)
    seed = int(check_seeds(seed, 1)[0])
    return SELECTORS[method](r, e, k, seed=seed, **options)
