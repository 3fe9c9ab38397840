"""The table schemas, pinned field by field: a change here is a store format change and needs a new store."""

import pyarrow as pa
import pytest

from ampo.schema import (
    Candidate,
    Checkpoint,
    RoundStage,
    candidate_id,
    candidate_schema,
    check_prompt_id,
    check_round,
    make_candidate_model,
    stage_id,
)

S, I, F, B, T = pa.string(), pa.int64(), pa.float64(), pa.bool_(), pa.timestamp("us")


def candidate_fields(dim):
    return [
        ("id", S, False), ("run", S, False), ("round", I, False), ("prompt_id", S, False), ("sample", I, False),
        ("prompt", S, False), ("response", S, False), ("n_tokens", I, False), ("finish_reason", S, False),
        ("gen_logp_mean", F, True), ("seed", I, False), ("policy", S, False), ("reward", F, True),
        ("reward_parts", S, True), ("vector", pa.list_(pa.float32(), dim), True), ("selected", B, False),
        ("role", S, False), ("selector", S, False), ("cluster", I, True), ("ref_logp_sum", F, True),
        ("ref_logp_mean", F, True), ("ref_n_tokens", I, True), ("lib_versions", S, False),
        ("created_at", T, False), ("dropped_reason", S, True), ("instruction_id_list", pa.list_(S), True),
        ("instruction_kwargs", S, True),
    ]  # fmt: skip


ROUND_FIELDS = [
    ("id", S, False), ("run", S, False), ("round", I, False), ("stage", S, False), ("status", S, False),
    ("attempts", I, False), ("started_at", T, True), ("finished_at", T, True), ("seconds", F, True),
    ("store_version", I, True), ("counts", S, False), ("metrics", S, False), ("message", S, False),
    ("gate", S, True),
]  # fmt: skip

CHECKPOINT_FIELDS = [
    ("id", S, False), ("run", S, False), ("round", I, False), ("path", S, False), ("parent", S, True),
    ("status", S, False), ("metrics", S, False), ("config_hash", S, False), ("data_version", I, True),
    ("created_at", T, False), ("promoted_at", T, True),
]  # fmt: skip


def as_fields(schema: pa.Schema):
    return [(f.name, f.type, f.nullable) for f in schema]


@pytest.mark.parametrize("dim", [384, 8])
def test_candidate_schema_pinned(dim):
    assert as_fields(candidate_schema(dim)) == candidate_fields(dim)


def test_default_candidate_model_is_384_d():
    assert as_fields(Candidate.to_arrow_schema()) == candidate_fields(384)
    assert make_candidate_model(384) is Candidate  # one class per dim


def test_rounds_and_checkpoints_schemas_pinned():
    assert as_fields(RoundStage.to_arrow_schema()) == ROUND_FIELDS
    assert as_fields(Checkpoint.to_arrow_schema()) == CHECKPOINT_FIELDS


@pytest.mark.parametrize("dim", [0, -3, 2.5, True, "384"])
def test_bad_dim_raises(dim):
    with pytest.raises(ValueError, match="embedding dim"):
        make_candidate_model(dim)


def test_ids():
    assert candidate_id("run-1", 0, "ifeval.17", 31) == "run-1/0/ifeval.17/31"
    assert stage_id("run-1", 2, "embed") == "run-1/2/embed"


@pytest.mark.parametrize(
    "args",
    [
        ("bad run", 0, "p", 0),  # space in run id
        ("r", 0, "a/b", 0),  # '/' would make ids ambiguous
        ("r", 0, "x' OR '1'='1", 0),  # quotes
        ("r", -2, "p", 0),  # round below -1
        ("r", 0, "p", -1),  # negative sample
        ("r", 1.0, "p", 0),  # a float round
        ("r", 0, "p", True),  # a bool sample
    ],
)
def test_bad_id_parts_raise(args):
    with pytest.raises(ValueError):
        candidate_id(*args)


def test_checks_name_the_bad_value():
    with pytest.raises(ValueError, match="'a b'"):
        check_prompt_id("a b")
    with pytest.raises(ValueError, match="'3'"):
        check_round("3")
    with pytest.raises(ValueError, match="stage 'Gen'"):
        stage_id("r", 0, "Gen")


@pytest.mark.parametrize("good", ["a", "ifbench-293", "gen-0-12", "A.b:c_d-e", "h+a=s@h", "x" * 128])
def test_one_prompt_id_pattern_for_prompts_and_rows(good):
    """The prompt source and the store accept the same ids ('+', '=', '@' included: hashes and e-mail-like keys)."""
    from ampo.prompts import PROMPT_ID_PATTERN as prompts_pattern
    from ampo.prompts import Prompt
    from ampo.schema import PROMPT_ID_PATTERN

    assert PROMPT_ID_PATTERN is prompts_pattern
    assert Prompt(good, "hi").prompt_id == check_prompt_id(good) == good
    assert candidate_id("r", 0, good, 1) == f"r/0/{good}/1"


@pytest.mark.parametrize("bad", ["", "-a", "a/b", "a b", "a'b", 'a"b', "a\\b", "é", "x" * 129])
def test_prompt_ids_unsafe_in_row_ids_are_refused_by_both(bad):
    from ampo.prompts import Prompt

    with pytest.raises(ValueError, match="must match"):
        Prompt(bad, "hi")
    with pytest.raises(ValueError, match="must match"):
        check_prompt_id(bad)


def test_candidate_ids_of_a_table_equal_candidate_id_row_by_row():
    from ampo.schema import candidate_ids

    table = pa.table({"run": ["r", "run-2"], "round": [0, 12], "prompt_id": ["p", "ifbench-3"], "sample": [5, 0]})
    assert candidate_ids(table).to_pylist() == [candidate_id("r", 0, "p", 5), candidate_id("run-2", 12, "ifbench-3", 0)]
