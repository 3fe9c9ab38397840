"""Subset selection per prompt (AMPO spec 3.3, MPO spec 2.2); prompt prefilters by reward spread and by
alignment potential (spec 4).

select(method, rewards (N,), embeddings (N, d), k) -> Selection for one prompt; select_batch(...) for many
prompts at once, vectorised, with the same results. Methods: the rows of REGISTRY. See docs/selection.md.
"""

from ampo.selection.pool import Selection, count_skipped, pairwise_distances
from ampo.selection.potential import alignment_potential, pair_margins, top_fraction, zscore
from ampo.selection.registry import (
    BATCH_SELECTORS,
    DEFAULT_METHOD,
    REGISTRY,
    SELECTORS,
    Selector,
    SelectorOptions,
    parse_options,
    select,
    select_batch,
    selector,
    selector_options,
)

__all__ = [
    "BATCH_SELECTORS",
    "DEFAULT_METHOD",
    "REGISTRY",
    "SELECTORS",
    "Selection",
    "Selector",
    "SelectorOptions",
    "alignment_potential",
    "count_skipped",
    "pair_margins",
    "pairwise_distances",
    "parse_options",
    "select",
    "select_batch",
    "selector",
    "selector_options",
    "top_fraction",
    "zscore",
]
