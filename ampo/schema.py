"""The store's tables: one pydantic LanceModel per table, pinned field by field by tests/test_schema.py.

candidates   one row per sampled response; written by `generate`, filled in by `score`, `embed`, `select`, `ref`
rounds       one row per (run, round, stage): status, timings, the store version it produced, counts, gate decision
checkpoints  one row per policy checkpoint: path, parent, status (candidate / champion / rejected / retired)

Timestamps are UTC, stored without a zone (timestamp[us]). JSON columns are strings (`json.loads` them); they keep
the schema fixed while reward stacks and metrics change between runs.
"""

from __future__ import annotations

import numbers
import re
from datetime import UTC, datetime
from functools import cache

import pyarrow as pa
import pyarrow.compute as pc
from lancedb.pydantic import LanceModel, Vector
from pydantic import Field

from ampo.config import validate_run_id
from ampo.prompts.prompt import PROMPT_ID_PATTERN  # one pattern for prompts and stored rows

EMBED_DIM = 384  # all-MiniLM-L6-v2, the embedded default
CANDIDATE_KEY = ("run", "round", "prompt_id", "sample")  # a candidate's identity; its id joins them with '/'
STAGE_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
STAGES = (
    "generate",
    "score",
    "embed",
    "select",
    "reflogps",
    "train",
    "evaluate",
    "promote",
)  # a round, in order
ROLES = ("chosen", "rejected", "")
CHECKPOINT_STATUSES = ("candidate", "champion", "rejected", "retired")


def utcnow() -> datetime:
    """Now in UTC, without a zone, as the tables store it."""
    return datetime.now(UTC).replace(tzinfo=None)


def make_candidate_model(dim: int = EMBED_DIM) -> type[LanceModel]:
    """The candidates LanceModel for embeddings of size `dim` (cached: one class per dim)."""
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"embedding dim must be a positive int, got {dim!r}")
    return _candidate_model(dim)


@cache
def _candidate_model(dim: int) -> type[LanceModel]:
    class Candidate(LanceModel):
        """One sampled response: written by `generate`, filled in by `score`, `embed`, `select` and `ref`."""

        id: str  # "{run}/{round}/{prompt_id}/{sample}": the merge key
        run: str
        round: int
        prompt_id: str
        sample: int  # index of the response within its prompt's pool, 0..N-1
        prompt: str
        response: str
        n_tokens: int  # generated tokens
        finish_reason: str  # "stop" | "length" | backend-specific
        gen_logp_mean: float | None = None  # mean sampling log-prob per token (alignment potential)
        seed: int  # derived from (run, round, prompt_id)
        policy: str  # checkpoint id of the policy that sampled it
        reward: float | None = None  # weighted sum of the reward parts; None until scored or when dropped
        reward_parts: str | None = None  # JSON {component column: value}
        vector: Vector(dim) | None = None  # unit-norm sentence embedding; None until embedded
        selected: bool = False
        role: str = ""  # "chosen" | "rejected" | "" (not selected)
        selector: str = ""  # selection method that picked it
        cluster: int | None = None  # coreset cluster of a selected response
        ref_logp_sum: float | None = None  # reference policy's summed response log-prob
        ref_logp_mean: float | None = None
        ref_n_tokens: int | None = None
        lib_versions: str = "{}"  # JSON {package: version} of the generating process
        created_at: datetime = Field(default_factory=utcnow)
        dropped_reason: str | None = (
            None  # set when scoring skipped it (e.g. non-finite reward); kept, not lost
        )
        # The prompt's verifiable instructions, kept with the row so scoring needs nothing but the row. Null in
        # rows of a store written before these columns existed (opening it adds them, empty; see ampo.store.tables)
        instruction_id_list: list[str] | None = None  # IFEval/IFBench instruction ids
        instruction_kwargs: str | None = None  # JSON list, one kwargs dict per instruction id

    Candidate.__name__ = Candidate.__qualname__ = f"Candidate{dim}"
    return Candidate


Candidate = make_candidate_model(EMBED_DIM)


def candidate_schema(dim: int = EMBED_DIM):
    """pyarrow schema of the candidates table for embeddings of size `dim`."""
    return make_candidate_model(dim).to_arrow_schema()


class RoundStage(LanceModel):
    """One stage of one round: written `running` when it starts and `done` (last, after its data) when it ends."""

    id: str  # "{run}/{round}/{stage}": the merge key
    run: str
    round: int
    stage: str
    status: str  # "running" | "done" | "failed"
    attempts: int = 1  # times the stage was started
    started_at: datetime | None = None
    finished_at: datetime | None = None
    seconds: float | None = None
    store_version: int | None = None  # candidates table version when the stage finished
    counts: str = "{}"  # JSON {name: int}: rows written, dropped, selected...
    metrics: str = "{}"  # JSON {group/name: float}
    message: str = ""  # error text of a failed stage
    gate: str | None = None  # JSON gate decision of the promote stage


class Checkpoint(LanceModel):
    """One policy checkpoint; at most one per run has status "champion"."""

    id: str  # the merge key; candidates.policy refers to it
    run: str
    round: int  # round that trained it; -1 for the initial policy
    path: str  # folder in HF layout (safetensors)
    parent: str | None = None  # checkpoint id it was trained from
    status: str  # "candidate" | "champion" | "rejected" | "retired"
    metrics: str = "{}"  # JSON evaluation metrics
    config_hash: str = ""
    data_version: int | None = None  # candidates table version it was trained on
    created_at: datetime = Field(default_factory=utcnow)
    promoted_at: datetime | None = None


def candidate_id(run: str, round: int, prompt_id: str, sample: int) -> str:
    """The candidates merge key "{run}/{round}/{prompt_id}/{sample}" (CANDIDATE_KEY joined by '/'), parts validated."""
    return f"{validate_run_id(run)}/{check_round(round)}/{check_prompt_id(prompt_id)}/{check_int(sample, 'sample')}"


def candidate_ids(table: pa.Table) -> pa.ChunkedArray | pa.Array:
    """`candidate_id` of every row of an Arrow table with the CANDIDATE_KEY columns (not validated: see the store)."""
    parts = [table[c] if table.schema.field(c).type == pa.string() else table[c].cast(pa.string())
             for c in CANDIDATE_KEY]
    return pc.binary_join_element_wise(*parts, "/")


def stage_id(run: str, round: int, stage: str) -> str:
    """The rounds merge key "{run}/{round}/{stage}"."""
    return f"{validate_run_id(run)}/{check_round(round)}/{check_stage(stage)}"


def check_int(value, name: str, minimum: int = 0) -> int:
    """`value` as an int >= minimum; bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_round(round: int) -> int:
    """A round index: an int >= -1 (-1 is the initial policy, before any round)."""
    return check_int(round, "round", minimum=-1)


def check_prompt_id(prompt_id: str) -> str:
    if not isinstance(prompt_id, str) or not re.fullmatch(PROMPT_ID_PATTERN, prompt_id):
        raise ValueError(f"prompt id {prompt_id!r} must match {PROMPT_ID_PATTERN}")
    return prompt_id


def check_stage(stage: str) -> str:
    if not isinstance(stage, str) or not re.fullmatch(STAGE_PATTERN, stage):
        raise ValueError(f"stage {stage!r} must match {STAGE_PATTERN}, e.g. one of {STAGES}")
    return stage


def check_choice(value: str, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name} {value!r} is not allowed; choose from {list(allowed)}")
    return value
