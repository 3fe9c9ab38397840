"""Prompt sources: the Prompt record, JSONL and `datasets` files, the seeded generator, the IFBench held-out set."""

import json
import logging
import shutil
from collections import Counter

import pytest

from ampo.config import EvalConfig, PromptsConfig
from ampo.prompts import (
    Prompt,
    eval_prompts,
    generated_prompt,
    generated_prompts,
    generator_space,
    heldout_prompts,
    ifbench_test_path,
    ifbench_test_prompts,
    read_datasets,
    read_jsonl,
    training_prompts,
)
from ampo.prompts.catalog import CONFLICTS, CONSTRAINTS, EXTRA_CONFLICTS, IFEVAL_CONFLICTS, TASKS, TOPICS
from ampo.prompts.generator import _permute


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"prompt_id": f"p{i}", "prompt": f"Say {i}.", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{}]} for i in range(5)]


# --- Prompt ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "-a", "a/b", "a b", "a'b", 'a"b', "é", "x" * 129, "run/1/p/0"])
def test_prompt_id_must_be_safe_in_row_ids(bad):
    with pytest.raises(ValueError, match="must match"):
        Prompt(bad, "hi")


@pytest.mark.parametrize("good", ["a", "0", "gen-0-12", "ifbench-293", "A.b:c_d-e", "x" * 128])
def test_prompt_id_accepts_letters_digits_and_separators(good):
    assert Prompt(good, "hi").prompt_id == good


def test_prompt_rejects_empty_text_and_mismatched_kwargs_naming_the_prompt():
    with pytest.raises(ValueError, match="'p7' has no prompt text"):
        Prompt("p7", "   \n")
    with pytest.raises(ValueError, match="'p8' has 2 instruction ids but 1 kwargs"):
        Prompt("p8", "hi", ["punctuation:no_comma", "startend:quotation"], [{}])


def test_from_dict_maps_key_drops_none_kwargs_and_fills_missing_kwargs():
    p = Prompt.from_dict({"key": 12, "prompt": "x", "instruction_id_list": ["a:b"],
                          "kwargs": [{"num_words": 5, "relation": None}]}, id_prefix="ifeval-")
    assert (p.prompt_id, p.kwargs) == ("ifeval-12", [{"num_words": 5}])
    q = Prompt.from_dict({"prompt_id": "q", "prompt": "x", "instruction_id_list": ["a:b", "c:d"]})
    assert q.kwargs == [{}, {}]
    assert Prompt.from_dict(q.to_dict()) == q


# --- JSONL and datasets files ---------------------------------------------------------------------------------------

def test_read_jsonl_reads_rows_in_order_and_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    path.write_text(path.read_text() + "\n\n")
    prompts = read_jsonl(path)
    assert [p.prompt_id for p in prompts] == ["p0", "p1", "p2", "p3", "p4"]
    assert prompts[3] == Prompt("p3", "Say 3.", ["punctuation:no_comma"], [{}])


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        read_jsonl(path)
    write_jsonl(path, [ROWS[0], {"prompt_id": "x"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'x' has no prompt text"):
        read_jsonl(path)
    write_jsonl(path, [ROWS[0], ROWS[1], ROWS[0]])
    with pytest.raises(ValueError, match=r"duplicate prompt id 'p0' at .*bad.jsonl:1 and .*bad.jsonl:3"):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")


def test_read_datasets_reads_local_parquet_jsonl_and_saved_folders(tmp_path):
    import datasets

    rows = [  # arrow stores kwargs as one struct: keys missing from a row come back as None and are dropped
        {"prompt_id": "a", "prompt": "Say a.", "instruction_id_list": ["length_constraints:number_words"],
         "kwargs": [{"num_words": 10, "relation": "at least"}]},
        {"prompt_id": "b", "prompt": "Say b.", "instruction_id_list": ["detectable_content:postscript"],
         "kwargs": [{"postscript_marker": "P.S."}]},
    ]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    write_jsonl(tmp_path / "p.jsonl", rows)
    expected = [Prompt.from_dict(r) for r in rows]
    for source in ("p.parquet", "saved", "p.jsonl"):
        assert read_datasets(tmp_path / source) == expected, source


def test_read_datasets_never_takes_a_hub_name(tmp_path):
    with pytest.raises(ValueError, match="'allenai/IFBench_test' is not an existing local path.*never a hub"):
        read_datasets("allenai/IFBench_test")
    (tmp_path / "p.csv").write_text("prompt_id,prompt\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        read_datasets(tmp_path / "p.csv")


# --- the generator --------------------------------------------------------------------------------------------------

def test_catalog_sizes_and_space():
    assert len(TASKS) == len(set(TASKS)) == 60 and all("{topic}" in t for t in TASKS)
    assert len(TOPICS) == len(set(TOPICS)) == 80
    assert len(CONSTRAINTS) == 21
    assert generator_space() == 60 * 80 * 3 * 21 == 302_400


def test_generator_is_deterministic_per_index_and_seed():
    batch = generated_prompts(7, 1000, 20)
    assert batch == [generated_prompt(7, i) for i in range(1000, 1020)]  # index i is the same prompt in any slice
    assert batch == generated_prompts(7, 1000, 20)
    assert batch[0].prompt_id == "gen-7-1000"
    other = generated_prompts(8, 1000, 20)
    assert sum(a.prompt == b.prompt for a, b in zip(batch, other)) <= 1  # another seed, another sequence


def test_first_100k_indices_give_distinct_texts_on_a_5000_sample():
    sample = generated_prompts(0, 0, 2500) + [generated_prompt(0, i) for i in range(2500, 100_000, 39)]
    assert len(sample) == 2500 + len(range(2500, 100_000, 39)) >= 5000
    texts = [p.prompt for p in sample]
    assert len(set(texts)) == len(texts)


def test_permutation_is_a_bijection():
    for n in (1, 2, 7, 1000, 4097):
        assert sorted(_permute(i, n, seed=3) for i in range(n)) == list(range(n))


def test_generated_prompts_have_one_to_three_non_conflicting_constraints_in_even_shares():
    sample = generated_prompts(1, 0, 3000)
    sizes = Counter(len(p.instruction_id_list) for p in sample)
    assert set(sizes) == {1, 2, 3} and all(800 < sizes[k] < 1200 for k in (1, 2, 3))  # ~1000 each
    singles = Counter(p.instruction_id_list[0] for p in sample if len(p.instruction_id_list) == 1)
    assert len(singles) == 21 and max(singles.values()) < 3 * min(singles.values())  # ids equally likely alone
    for p in sample:
        ids = p.instruction_id_list
        assert len(set(ids)) == len(ids)
        assert not any(frozenset((a, b)) in CONFLICTS for a in ids for b in ids if a != b), p


def test_pinned_conflicts_equal_ifevals_registry_restricted_to_the_catalog():
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS

    ids = {spec.instruction_id for spec in CONSTRAINTS}
    theirs = {frozenset((a, b)) for a, bs in INSTRUCTION_CONFLICTS.items() for b in bs
              if a != b and a in ids and b in ids}
    ours = {frozenset((a, b)) for a, bs in IFEVAL_CONFLICTS.items() for b in bs if a != b}
    assert ours == theirs
    assert CONFLICTS == ours | {frozenset(p) for p in EXTRA_CONFLICTS}


@pytest.mark.parametrize("spec", CONSTRAINTS, ids=lambda s: s.instruction_id)
def test_constraint_text_states_every_kwarg(spec):
    texts = [spec.render(kw) for kw in spec.variants]
    assert len(set(texts)) == len(texts)  # each variant reads differently
    for kw, text in zip(spec.variants, texts):
        for key, value in kw.items():
            words = value if isinstance(value, list) else [value]
            if key in ("relation", "let_relation"):
                words = ["at least" if value == "at least" else "fewer than"]
            if key == "language":
                words = [{"fr": "French", "es": "Spanish", "de": "German", "it": "Italian", "pt": "Portuguese"}[value]]
            for w in words:
                assert str(w) in text, (key, w, text)


def test_constraint_texts_worked_by_hand():
    render = {s.instruction_id: s.render for s in CONSTRAINTS}
    assert render["length_constraints:number_words"]({"relation": "at least", "num_words": 80}) == (
        "Answer with at least 80 words.")
    assert render["length_constraints:number_words"]({"relation": "less than", "num_words": 60}) == (
        "Answer with fewer than 60 words.")
    assert render["keywords:letter_frequency"]({"letter": "q", "let_relation": "less than", "let_frequency": 2}) == (
        'The letter "q" must appear fewer than 2 times in your response.')
    assert render["detectable_content:postscript"]({"postscript_marker": "P.P.S"}) == (
        "At the end of your response, add a postscript starting with P.P.S.")


def test_heldout_range_is_the_end_of_the_space_and_training_never_enters_it():
    space = generator_space()
    held = heldout_prompts(0, 5)
    assert [p.prompt_id for p in held] == [f"gen-0-{i}" for i in range(space - 5, space)]
    cfg = PromptsConfig(per_round=5, heldout=5)  # training may use indices [0, 302,395)
    last = training_prompts(cfg, 60_478)  # indices [302,390, 302,395)
    assert [p.prompt_id for p in last] == [f"gen-0-{i}" for i in range(302_390, 302_395)]
    with pytest.raises(ValueError, match="past the 302395 training prompts before the held-out range"):
        training_prompts(cfg, 60_479)  # indices [302,395, 302,400): the held-out ones


def test_generated_rounds_are_consecutive_disjoint_slices():
    cfg = PromptsConfig(per_round=4, seed=3)
    r0, r1 = training_prompts(cfg, 0), training_prompts(cfg, 1)
    assert [p.prompt_id for p in r0 + r1] == [f"gen-3-{i}" for i in range(8)]
    with pytest.raises(ValueError, match="round must be an integer >= 0"):
        training_prompts(cfg, -1)


# --- training sources and held-out guarantees -----------------------------------------------------------------------

def test_jsonl_rounds_walk_the_file_and_wrap_with_a_warning(tmp_path, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)  # 5 prompts
    cfg = PromptsConfig(source="jsonl", path=str(path), per_round=2)
    assert [p.prompt_id for p in training_prompts(cfg, 0)] == ["p0", "p1"]
    assert [p.prompt_id for p in training_prompts(cfg, 1)] == ["p2", "p3"]
    with caplog.at_level(logging.WARNING, logger="ampo.prompts"):
        assert [p.prompt_id for p in training_prompts(cfg, 2)] == ["p4", "p0"]  # indices 4, 5 mod 5
    assert "wraps around" in caplog.text and "epoch 1" in caplog.text
    with pytest.raises(ValueError, match="per_round=6 exceeds the 5 prompts"):
        training_prompts(PromptsConfig(source="jsonl", path=str(path), per_round=6), 0)


def test_ifbench_test_set_is_294_prompts_read_without_importing_the_package():
    import sys

    prompts = ifbench_test_prompts()
    assert len(prompts) == 294 and len({p.prompt_id for p in prompts}) == 294
    assert prompts[0].prompt_id == "ifbench-0" and prompts[0].instruction_id_list == ["count:keywords_multiple"]
    assert "ifbench" not in sys.modules


def test_training_refuses_the_ifbench_file_by_path_symlink_and_copy(tmp_path):
    link, copy = tmp_path / "link.jsonl", tmp_path / "copy.jsonl"
    link.symlink_to(ifbench_test_path())
    shutil.copy(ifbench_test_path(), copy)
    for path in (ifbench_test_path(), link, copy):
        for source in ("jsonl", "datasets"):
            with pytest.raises(ValueError, match="is the IFBench test set.*cannot be a training prompt source"):
                training_prompts(PromptsConfig(source=source, path=str(path)), 0)


def test_training_refuses_ifbench_prompts_inside_another_file(tmp_path):
    leaked = ifbench_test_prompts()[5].to_dict() | {"prompt_id": "mine-5"}
    path = write_jsonl(tmp_path / "mixed.jsonl", ROWS + [leaked])
    with pytest.raises(ValueError, match=r"1 training prompts \(e.g. \['mine-5'\]\) are IFBench test prompts"):
        training_prompts(PromptsConfig(source="jsonl", path=str(path), per_round=6), 0)


def test_eval_prompts_gives_each_source_separately(tmp_path):
    path = write_jsonl(tmp_path / "eval.jsonl", ROWS)
    out = eval_prompts(EvalConfig(sources=["heldout", "jsonl", "ifbench"], path=str(path), max_prompts=3),
                       PromptsConfig(heldout=10))
    assert [p.prompt_id for p in out["heldout"]] == [f"gen-0-{i}" for i in range(302_390, 302_393)]
    assert [p.prompt_id for p in out["jsonl"]] == ["p0", "p1", "p2"]
    assert [p.prompt_id for p in out["ifbench"]] == ["ifbench-0", "ifbench-1", "ifbench-2"]
    with pytest.raises(ValueError, match="needs prompts.heldout > 0"):
        eval_prompts(EvalConfig(sources=["heldout"]), PromptsConfig(heldout=0))
    with pytest.raises(ValueError, match="needs eval.path"):
        eval_prompts(EvalConfig(sources=["jsonl"]), PromptsConfig())


def test_eval_ifbench_keeps_only_prompts_whose_checkers_run_here():
    from ampo.rewards.verifiable import unsupported_instructions

    unsupported = unsupported_instructions()
    kept = eval_prompts(EvalConfig(sources=["ifbench"], max_prompts=1000), PromptsConfig(),
                        unsupported=unsupported)["ifbench"]
    left_out = [p for p in ifbench_test_prompts() if set(p.instruction_id_list) & unsupported.keys()]
    assert len(kept) + len(left_out) == 294
    assert not any(set(p.instruction_id_list) & unsupported.keys() for p in kept)


def test_eval_ifbench_leaves_out_exactly_the_prompts_carrying_a_named_instruction():
    every = ifbench_test_prompts()
    blocked = every[0].instruction_id_list[0]  # the first test prompt's first instruction, said to be uncheckable
    kept = eval_prompts(EvalConfig(sources=["ifbench"], max_prompts=1000), PromptsConfig(),
                        unsupported={blocked: "a reason"})["ifbench"]
    expected = [p.prompt_id for p in every if blocked not in p.instruction_id_list]
    assert [p.prompt_id for p in kept] == expected and every[0].prompt_id not in expected
    assert len(expected) < len(every)
