"""The LanceDB store: the only part of ampo that talks to LanceDB.

    store = Store(".ampo/store", dim=384)           # a local folder, or s3://bucket/prefix
    store.upsert_candidates(rows)                    # generate: whole rows, merge_insert on "id"
    store.update_candidates(ids, reward=r)           # score / embed / ref: only the named columns change
    pools = store.read_pools(run, round)             # select: flat arrays + offsets, or pools.padded()
    store.set_selection(run, round, ids, roles, selector="coreset")
    store.stage_done(run, round, "select", counts={...}, seconds=1.2)   # last, after the data
    store.tag_round(run, round); store.checkout_round(run, round).prompt_pool(run, round, prompt_id)

See docs/store.md for the tables, the API and measured throughput.
"""

from ampo.store.candidates import CandidatesView
from ampo.store.pools import PaddedPools, Pools, pools_from_arrow
from ampo.store.store import INDEX_MIN_ROWS, Store, round_tag, store_exists
from ampo.store.tables import StoreConflictError

__all__ = [
    "INDEX_MIN_ROWS",
    "CandidatesView",
    "PaddedPools",
    "Pools",
    "Store",
    "StoreConflictError",
    "pools_from_arrow",
    "round_tag",
    "store_exists",
]
