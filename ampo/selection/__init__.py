"""Subset selection per prompt (AMPO spec 3.3, MPO spec 2.2); pair selection by alignment potential (spec 4).

select(method, rewards (N,), embeddings (N, d), k) -> Selection for one prompt; select_batch(...) for many
prompts at once, vectorised, with the same results. Methods: the keys of SELECTORS. See docs/selection.md.
"""

from ampo.selection.batched import BATCH_SELECTORS, select_batch
from ampo.selection.pool import Selection, count_skipped, pairwise_distances
from ampo.selection.potential import alignment_potential, pair_margins, top_fraction, zscore
from ampo.selection.registry import SELECTORS, select, selector_options

__all__ = [
    "BATCH_SELECTORS",
    "SELECTORS",
    "Selection",
    "alignment_potential",
    "count_skipped",
    "pair_margins",
    "pairwise_distances",
    "select",
    "select_batch",
    "selector_options",
    "top_fraction",
    "zscore",
]
