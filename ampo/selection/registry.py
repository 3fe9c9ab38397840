"""REGISTRY: one row per selection method, the only place a method is described; `select` and `select_batch`.

A row carries the per-prompt reference function, the batched function, whether the method needs k negatives,
whether it reads the embeddings, and its options model (frozen pydantic, unknown names refused). Everything
else derives from the rows: the options `select` / `select_batch` accept and their defaults, the run config's
`selection` union (ampo/config.py), its pool-size check, and the options the select stage passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal, get_args, get_origin

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ampo.selection.ampo_methods import select_bottomk, select_coreset, select_optselect
from ampo.selection.baselines import select_extremes, select_mean_split, select_random, select_top_bottom
from ampo.selection.batched import (
    batch_bottomk,
    batch_coreset,
    batch_extremes,
    batch_mean_split,
    batch_optselect,
    batch_random,
    batch_top_bottom,
    check_finite_embeddings,
    embedding_dim,
    gather,
    pool_sizes,
    rows_per_step,
)
from ampo.selection.pool import Selection, check_embeddings, check_k, check_rewards, check_seeds

# ------------------------------------------------------------------------------------------------------------
# options models


def _number(value):
    """Refuse bools and strings before pydantic's lax coercion would turn True into 1 or "3" into 3."""
    if isinstance(value, (bool, str)):
        raise ValueError("a number is needed")  # noqa: TRY004 - pydantic turns ValueError into its error
    return value


PositiveInt = Annotated[int, BeforeValidator(_number), Field(ge=1)]
PositiveFloat = Annotated[float, BeforeValidator(_number), Field(gt=0, allow_inf_nan=False)]


class SelectorOptions(BaseModel):
    """A method's options with their defaults (written here only). No options: this class itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def min_pool_size(self) -> int:
        """The smallest pool these options can select from (before k: see Selector.min_pool)."""
        return 2


class CoresetOptions(SelectorOptions):
    cluster_on: Literal["candidates", "all"] = "candidates"  # spec A5: the N-1 non-positives, or all N
    n_init: PositiveInt = 10  # k-means++ starts
    max_iter: PositiveInt = 100  # Lloyd iterations per start


class OptSelectOptions(SelectorOptions):
    points: Literal["all", "candidates"] = "all"  # spec A6: the cost sums over all N, or without the positive
    weight_temperature: PositiveFloat = 1.0  # spec A7: w = exp((r_bar - r) / T)
    solver: Literal["local_search", "exact"] = "local_search"


class TopBottomOptions(SelectorOptions):
    m: PositiveInt = 2  # the m best vs the m worst

    def min_pool_size(self) -> int:
        return 2 * self.m


# ------------------------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class Selector:
    """One method. reference(rewards (N,), embeddings (N, d), k, *, seed, **options) -> Selection;
    batched(rewards (B, N), embeddings (B, N, d) or None, k, *, seeds (B,), **options) -> B Selections,
    equal to the reference prompt by prompt. Both receive every option (the model's defaults filled in)."""

    reference: Callable[..., Selection]
    batched: Callable[..., list[Selection]]
    options: type[SelectorOptions]
    needs_k_negatives: bool  # 1 <= k <= N-1 negatives; the others check k >= 1 and ignore it
    uses_embeddings: bool  # the others check the embeddings but never read them

    def min_pool(self, k: int, options: SelectorOptions) -> int:
        """The smallest pool size N this method selects from with k and these options."""
        return max(options.min_pool_size(), k + 1 if self.needs_k_negatives else 2)


REGISTRY: dict[str, Selector] = {
    "bottomk": Selector(select_bottomk, batch_bottomk, SelectorOptions, True, False),
    "coreset": Selector(select_coreset, batch_coreset, CoresetOptions, True, True),
    "optselect": Selector(select_optselect, batch_optselect, OptSelectOptions, True, True),
    "random": Selector(select_random, batch_random, SelectorOptions, True, False),
    "extremes": Selector(select_extremes, batch_extremes, SelectorOptions, False, False),
    "mean_split": Selector(select_mean_split, batch_mean_split, SelectorOptions, False, False),
    "top_bottom": Selector(select_top_bottom, batch_top_bottom, TopBottomOptions, False, False),
}
DEFAULT_METHOD = "coreset"  # the run config's selection method when none is given

SELECTORS = {name: row.reference for name, row in REGISTRY.items()}  # name -> per-prompt function
BATCH_SELECTORS = {name: row.batched for name, row in REGISTRY.items()}  # name -> batched function


def selector_options(method: str) -> dict:
    """The options a method takes, with their defaults."""
    return {name: field.default for name, field in selector(method).options.model_fields.items()}


def selector(method: str) -> Selector:
    """The registry row of `method`; ValueError naming the methods if unknown."""
    if method not in REGISTRY:
        raise ValueError(f"unknown selector {method!r}; choose from {sorted(REGISTRY)}")
    return REGISTRY[method]


def parse_options(method: str, options: dict) -> SelectorOptions:
    """The method's options model built from `options`; a ValueError naming the bad option and what is allowed."""
    model = selector(method).options
    try:
        return model(**options)
    except ValidationError as err:
        raise ValueError(option_error(method, model, err)) from None


def option_error(method: str, model: type[SelectorOptions], err: ValidationError) -> str:
    """One line for the first error: an unknown option and the allowed names, or a bad value and its rule."""
    first = err.errors()[0]
    name = first["loc"][0] if first["loc"] else ""
    if first["type"] == "extra_forbidden" or name not in model.model_fields:
        return f"unknown option {name!r} for selector {method!r}; allowed: {sorted(model.model_fields)}"
    return f"{name}={first['input']!r} {option_rule(model, name)}"


def option_rule(model: type[SelectorOptions], name: str) -> str:
    """What option `name` accepts, read from its field: the Literal choices or the number and its bound."""
    field = model.model_fields[name]
    if get_origin(field.annotation) is Literal:
        return f"is not allowed; choose from {list(get_args(field.annotation))}"
    bounds = " and ".join(
        f"{op} {getattr(m, attr)}"
        for m in field.metadata
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
        if getattr(m, attr, None) is not None
    )
    kind = "an int" if field.annotation is int else "a finite number"
    return f"must be {kind} {bounds}".rstrip()


# ------------------------------------------------------------------------------------------------------------
# entry points: checks, then the row's functions


def select(method: str, rewards, embeddings, k: int, *, seed: int = 0, **options) -> Selection:
    """Select one prompt's chosen and rejected responses. rewards (N,), embeddings (N, d) -> Selection.

    method: a key of REGISTRY. k: negatives for the AMPO methods and random (1 <= k <= N-1); the other
    methods check k >= 1 and ignore it. seed: an int in [0, 2**64) (coreset's k-means++ and random).
    """
    row = selector(method)
    opts = parse_options(method, options)
    r = check_rewards(rewards)
    e = check_embeddings(embeddings, len(r))
    k = check_k(k, len(r) if row.needs_k_negatives else None)
    seed = int(check_seeds(seed, 1)[0])
    return row.reference(r, e, k, seed=seed, **opts.model_dump())


def check_chunk(method: str, k: int, need: int, rewards: np.ndarray, prompts: np.ndarray, label) -> None:
    """The reward, k and pool-size checks of `select`, for b pools of one size; errors name the prompt."""
    n = rewards.shape[1]
    bad = np.flatnonzero((~np.isfinite(rewards)).any(axis=1) if n >= 2 else np.ones(len(prompts), bool))
    if bad.size:
        check_rewards(rewards[bad[0]], where=f"{label(prompts[bad[0]])}: ")
    if REGISTRY[method].needs_k_negatives:
        check_k(k, n, where=f"{label(prompts[0])}: ")
    elif n < need:
        raise ValueError(f"{label(prompts[0])}: {method} with these options needs a pool of at least {need} "
                         f"responses; got N={n}")  # fmt: skip


def prompt_labels(prompt_ids, count: int):
    """p -> how errors name prompt p: "prompt id '<id>'" when ids are given, else "prompt <p>"."""
    if prompt_ids is None:
        return lambda p: f"prompt {p}"
    if len(prompt_ids) != count:
        raise ValueError(f"prompt_ids must name each of the {count} prompts; got {len(prompt_ids)} ids")
    return lambda p: f"prompt id {prompt_ids[p]!r}"


def select_batch(
    method: str, rewards, embeddings, k: int, *, seed=0, lengths=None, prompt_ids=None, **options
) -> list[Selection]:
    """`select` for B prompts at once: result i equals select(method, pool i, k, seed=seeds[i], **options).

    rewards (B, Nmax) + embeddings (B, Nmax, d) + lengths (B,) (pool i is the first lengths[i] entries;
    padding is ignored; lengths=None means all Nmax), or lists of B arrays (N_i,) and (N_i, d). seed: one int
    used for every prompt, or B ints, one per prompt. prompt_ids: B names that errors use for the prompts
    (else their positions). optselect with solver="exact" loops over prompts (the MIP is the reference, not
    the fast path).
    """
    row = selector(method)
    opts = parse_options(method, options)
    k = check_k(k)
    need = row.min_pool(k, opts)
    label = prompt_labels(prompt_ids, len(rewards))
    sizes = pool_sizes(rewards, embeddings, lengths, label)
    seeds = check_seeds(seed, len(sizes))
    check_finite_embeddings(embeddings, sizes, label)
    out: list[Selection | None] = [None] * len(sizes)
    dim = embedding_dim(embeddings) if row.uses_embeddings else 0
    for n in np.unique(sizes).tolist():
        same_size = np.flatnonzero(sizes == n)
        step = rows_per_step(n * max(dim, n))  # a chunk's embeddings in float64, or its (n, n) distances
        for start in range(0, len(same_size), step):
            prompts = same_size[start : start + step]
            r = gather(rewards, prompts, n, np.float64)
            e = gather(embeddings, prompts, n, None) if row.uses_embeddings else None
            check_chunk(method, k, need, r, prompts, label)
            selections = row.batched(r, e, k, seeds=seeds[prompts], **opts.model_dump())
            for p, selection in zip(prompts.tolist(), selections):
                out[p] = selection
    return out
