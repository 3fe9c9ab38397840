"""Rewards: verifiable checkers (strict/loose, unsupported and unknown ids), python callables, the classifier RM on a
tiny random Llama built here, and the weighted composition with its non-finite handling."""

import math
import sys
import typing

import numpy as np
import pytest

from ampo.config import RewardComponent, RewardConfig, RuntimeConfig
from ampo.prompts import Prompt, generated_prompts, ifbench_test_prompts
from ampo.prompts.catalog import CONSTRAINTS
from ampo.rewards import REWARDS, RewardStack
from ampo.rewards.verifiable import (
    NLTK_NEEDS,
    VerifiableReward,
    build_checkers,
    check_instructions,
    following_metrics,
    instruction_registry,
    supported_instructions,
    unsupported_instructions,
)

LOWER_NO_COMMA = Prompt("a", "Describe the weather.", ["change_case:english_lowercase", "punctuation:no_comma"],
                        [{}, {}])
RESPONSES = [
    "Hello, World. The weather today is sunny, warm and bright.",  # capitals and commas: 0 of 2 followed
    "the weather today is sunny, warm and bright in the whole city.",  # lowercase, a comma: 1 of 2
    "the weather today is sunny and warm and bright in the whole city.",  # both: 2 of 2
]
QUOTED = Prompt("q", "Quote it.", ["startend:quotation"], [{}])
MARKDOWN_FIRST_LINE = '**Answer**\n"the sea is calm tonight"'  # strict: starts with '*'; loose drops line 1


def stack(*components, on_nonfinite="error"):
    return RewardStack(RewardConfig(components=list(components), on_nonfinite=on_nonfinite), RuntimeConfig())


# --- registry -------------------------------------------------------------------------------------------------------

def test_registry_keys_equal_the_config_kinds():
    kinds = typing.get_args(RewardComponent.model_fields["kind"].annotation)
    assert sorted(REWARDS) == sorted(kinds)


# --- verifiable -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["strict", "loose"])
def test_fraction_of_instructions_followed(mode):
    scores = VerifiableReward(mode)([LOWER_NO_COMMA] * 3, RESPONSES)
    np.testing.assert_array_equal(scores, [0.0, 0.5, 1.0])  # 0/2, 1/2, 2/2
    assert scores.dtype == np.float64


def test_loose_forgives_a_markdown_first_line_strict_does_not():
    assert check_instructions(QUOTED, MARKDOWN_FIRST_LINE) == [("startend:quotation", False, True)]
    assert VerifiableReward("strict")([QUOTED], [MARKDOWN_FIRST_LINE])[0] == 0.0
    assert VerifiableReward("loose")([QUOTED], [MARKDOWN_FIRST_LINE])[0] == 1.0


def test_following_metrics_worked_by_hand():
    # response 1 -> lowercase (T, T), no_comma (F, F); response 2 -> quotation (strict F, loose T)
    metrics = following_metrics([LOWER_NO_COMMA, QUOTED], [RESPONSES[1], MARKDOWN_FIRST_LINE])
    assert metrics == pytest.approx({
        "following/prompt_strict": 0.0,  # mean([F, F])
        "following/prompt_loose": 0.5,  # mean([F, T])
        "following/instruction_strict": 1 / 3,  # mean([T, F, F])
        "following/instruction_loose": 2 / 3,  # mean([T, F, T])
    })


def test_thinking_block_and_empty_response_follow_the_library():
    assert check_instructions(QUOTED, '<think>plan</think>"quoted"') == [("startend:quotation", True, True)]
    assert check_instructions(QUOTED, "   ") == [("startend:quotation", False, False)]


def test_unknown_instruction_is_an_error_naming_id_and_prompt():
    p = Prompt("u1", "x", ["keywords:made_up"], [{}])
    with pytest.raises(ValueError, match="unknown instruction 'keywords:made_up' of prompt 'u1'"):
        VerifiableReward("loose")([p], ["text"])


@pytest.mark.skipif("length_constraints:number_sentences" not in unsupported_instructions(),
                    reason="NLTK punkt_tab is installed here")
def test_unsupported_instruction_is_an_error_with_its_reason():
    p = Prompt("s1", "x", ["length_constraints:number_sentences"], [{"num_sentences": 3, "relation": "at least"}])
    with pytest.raises(ValueError, match="instruction 'length_constraints:number_sentences' of prompt 's1' is "
                                         "unsupported here: needs NLTK punkt_tab data, which no installed package"):
        stack(RewardComponent(kind="verifiable")).score([p], ["One. Two. Three."])


UNSUPPORTED_CASES = {  # kwargs and a response that reaches the NLTK call
    "length_constraints:number_sentences": ({"num_sentences": 3, "relation": "at least"}, "One. Two. Three."),
    "change_case:capital_word_frequency": ({"capital_frequency": 2, "capital_relation": "at least"}, "A B c."),
    "ratio:stop_words": ({"percentage": 27.0}, "the cat and the dog"),
    "words:start_verb": ({}, "Run home now."),
    "words:words_position": ({"keyword": "vibrant"}, "a vibrant day, vibrant ."),
    "words:keywords_specific_position": ({"keyword": "giggle", "n": 1, "m": 2}, "A giggle here. Then more."),
    "format:title_case": ({}, "Some Title Case Text"),
}


@pytest.mark.parametrize("iid", sorted(NLTK_NEEDS))
def test_each_unsupported_reason_is_real(iid):
    """The listed checkers do fail here for want of NLTK data (LookupError), so listing them is not a guess."""
    assert sorted(UNSUPPORTED_CASES) == sorted(NLTK_NEEDS)
    if iid not in unsupported_instructions():
        pytest.skip(f"the NLTK data {iid} needs is installed here")
    kwargs, response = UNSUPPORTED_CASES[iid]
    checker = instruction_registry()[iid](iid)
    checker.build_description(**kwargs)
    with pytest.raises(LookupError):
        checker.check_following(response)


def test_kwargs_must_fit_the_checker_and_be_complete():
    def prompt(kwargs):
        return Prompt("k1", "x", ["length_constraints:number_words"], [kwargs])

    with pytest.raises(ValueError, match=r"lacks kwargs \['relation'\]; its checker would draw them at random"):
        build_checkers(prompt({"num_words": 50}))
    with pytest.raises(ValueError, match=r"do not fit its checker, which takes \['num_words', 'relation'\]"):
        build_checkers(prompt({"num_word": 50, "relation": "at least"}))
    with pytest.raises(ValueError, match="do not fit its checker.*more than"):
        build_checkers(prompt({"num_words": 50, "relation": "more than"}))


def test_ifbench_test_prompts_are_supported_or_listed_with_a_reason():
    unsupported = unsupported_instructions()
    supported, left_out = 0, 0
    for p in ifbench_test_prompts():
        blocked = [i for i in p.instruction_id_list if i in unsupported]
        if blocked:
            left_out += 1
            with pytest.raises(ValueError, match=f"{blocked[0]}' of prompt '{p.prompt_id}' is unsupported here"):
                build_checkers(p)
        else:
            assert len(build_checkers(p)) == len(p.instruction_id_list)  # kwargs complete, ids known
            supported += 1
    assert supported + left_out == 294
    if len(unsupported) == len(NLTK_NEEDS):  # no NLTK data here: ratio:stop_words 12, words:start_verb 6,
        assert left_out == 29  # words:keywords_specific_position 4, format:title_case 4, words:words_position 3


def test_generator_uses_only_supported_ids_with_complete_kwargs():
    assert {s.instruction_id for s in CONSTRAINTS} <= set(supported_instructions())
    for p in generated_prompts(5, 0, 300):
        assert len(build_checkers(p)) == len(p.instruction_id_list)


GENERATED_SEMANTICS = [  # (instruction, kwargs, a response doing what the rendered text says, one that does not)
    ("length_constraints:number_words", {"relation": "less than", "num_words": 60}, "w " * 59, "w " * 60),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 80}, "w " * 80, "w " * 79),
    ("keywords:letter_frequency", {"letter": "q", "let_relation": "less than", "let_frequency": 2},
     "a quiet day", "a quiet queen"),
    ("keywords:letter_frequency", {"letter": "z", "let_relation": "at least", "let_frequency": 3},
     "zany zebra zone", "zany zebra"),
    ("keywords:frequency", {"keyword": "light", "frequency": 2, "relation": "at least"},
     "light and more light", "light only"),
    ("keywords:existence", {"keywords": ["harbor", "lantern"]}, "a lantern by the harbor", "a lantern"),
    ("keywords:forbidden_words", {"forbidden_words": ["very", "really"]}, "it is fine", "it is very fine"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* a\n* b\n* c", "* a\n* b\n* c\n* d"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "a\n***\nb\n***\nc", "a\n***\nb"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "however"},
     "a b\n\nHowever, c\n\nd", "a b\n\nStill c\n\nd"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Body.\n\nP.P.S. more", "Body only."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] at [place]", "[name] only"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", "*one* only"),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nx\nSECTION 2\ny", "SECTION 1\nx"),
    ("detectable_format:title", {}, "<<a day at sea>>\ntext", "a day at sea\ntext"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "a: 1"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?", "Any other questions? Done."),
    ("startend:quotation", {}, '"all of it"', 'all of "it"'),
    ("combination:two_responses", {}, "first\n******\nsecond", "first\n******\nfirst"),
    ("punctuation:no_comma", {}, "no commas here", "one, comma"),
]


@pytest.mark.parametrize(("iid", "kwargs", "good", "bad"), GENERATED_SEMANTICS, ids=[c[0] for c in GENERATED_SEMANTICS])
def test_generated_constraint_text_matches_what_its_checker_checks(iid, kwargs, good, bad):
    spec = next(s for s in CONSTRAINTS if s.instruction_id == iid)
    assert kwargs in spec.variants  # a kwargs choice the generator makes, whose rendered text the pair obeys
    p = Prompt("g", "Task. " + spec.render(kwargs), [iid], [kwargs])
    np.testing.assert_array_equal(VerifiableReward("strict")([p, p], [good, bad]), [1.0, 0.0])


def test_checkers_survive_degenerate_responses():
    unsupported = unsupported_instructions()
    prompts = [p for p in ifbench_test_prompts() if not set(p.instruction_id_list) & unsupported.keys()]
    prompts += generated_prompts(9, 0, 100)
    responses = ["", " ", "'\"'", "***", "\n\n", "a", "\U0001f600", "1. x\n2."]
    for mode in ("strict", "loose"):
        fn = VerifiableReward(mode)
        scores = fn([p for p in prompts for _ in responses], responses * len(prompts))
        assert scores.shape == (len(prompts) * len(responses),)
        assert np.all((scores >= 0.0) & (scores <= 1.0))


# --- python ---------------------------------------------------------------------------------------------------------

def test_python_component_calls_the_function():
    fn = REWARDS["python"](RewardComponent(kind="python", function="rewards_fixture:word_count"), RuntimeConfig())
    np.testing.assert_allclose(fn([LOWER_NO_COMMA] * 3, RESPONSES), [1.0, 1.2, 1.3])  # 10, 12, 13 words / 10


@pytest.mark.parametrize(("function", "message"), [
    ("rewards_fixture:wrong_length", "returned 1 values for 3 responses"),
    ("rewards_fixture:not_a_number", r"returned 'high' \(str\) for response 0 of prompt 'a'"),
])
def test_python_component_checks_what_the_function_returns(function, message):
    fn = REWARDS["python"](RewardComponent(kind="python", function=function), RuntimeConfig())
    with pytest.raises(ValueError, match=message):
        fn([LOWER_NO_COMMA] * 3, RESPONSES)


@pytest.mark.parametrize(("function", "message"), [
    ("no_such_module_here:f", "cannot import module 'no_such_module_here'"),
    ("rewards_fixture:missing", "has no callable 'missing'"),
    ("rewards_fixture:NOT_CALLABLE", "has no callable 'NOT_CALLABLE'"),
])
def test_python_component_errors_on_a_bad_reference(function, message):
    with pytest.raises(ValueError, match=message):
        REWARDS["python"](RewardComponent(kind="python", function=function), RuntimeConfig())


# --- composition ----------------------------------------------------------------------------------------------------

def test_weighted_sum_worked_by_hand():
    result = stack(RewardComponent(kind="verifiable", weight=0.5),
                   RewardComponent(kind="python", function="rewards_fixture:word_count", weight=2.0)
                   ).score([LOWER_NO_COMMA] * 3, RESPONSES)
    np.testing.assert_array_equal(result.parts["verifiable"], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(result.parts["python"], [1.0, 1.2, 1.3])
    # 0.5 * [0, .5, 1] + 2 * [1, 1.2, 1.3] = [0 + 2, .25 + 2.4, .5 + 2.6] = [2.0, 2.65, 3.1]
    np.testing.assert_allclose(result.total, [2.0, 2.65, 3.1])
    assert not result.dropped.any() and result.reasons == [None] * 3
    assert result.counts["dropped"] == 0 and result.counts["responses"] == 3


def test_nonfinite_is_an_error_by_default_naming_prompt_and_component():
    s = stack(RewardComponent(kind="verifiable"),
              RewardComponent(kind="python", function="rewards_fixture:nan_when_empty", name="nonempty"))
    with pytest.raises(ValueError, match="component 'nonempty' gave nan for response 1 of prompt 'a'"):
        s.score([LOWER_NO_COMMA] * 3, [RESPONSES[2], "  ", RESPONSES[1]])


def test_nonfinite_with_drop_marks_counts_and_never_scores_zero():
    s = stack(RewardComponent(kind="verifiable"),
              RewardComponent(kind="python", function="rewards_fixture:nan_when_empty", name="nonempty"),
              on_nonfinite="drop")
    result = s.score([LOWER_NO_COMMA] * 3, [RESPONSES[2], "  ", RESPONSES[1]])
    np.testing.assert_array_equal(result.dropped, [False, True, False])
    assert result.reasons == [None, "nonempty: non-finite score nan", None]
    assert result.counts["dropped"] == 1 and result.counts["nonempty/nonfinite"] == 1
    assert math.isnan(result.total[1])
    np.testing.assert_allclose(result.total[[0, 2]], [1.0 + 1.0, 0.5 + 1.0])  # verifiable + nonempty


def test_uninstructed_prompt_errors_under_a_verifiable_only_stack_and_counts_otherwise():
    bare = Prompt("bare-1", "Say hi.")
    with pytest.raises(ValueError, match=r"prompts \['bare-1'\] carry no instructions"):
        stack(RewardComponent(kind="verifiable")).score([bare], ["hi"])
    result = stack(RewardComponent(kind="verifiable"),
                   RewardComponent(kind="python", function="rewards_fixture:word_count")).score([bare] * 2, ["hi", "a b"])
    np.testing.assert_allclose(result.parts["verifiable"], [0.0, 0.0])  # a per-prompt constant
    np.testing.assert_allclose(result.total, [0.1, 0.2])
    assert result.counts["verifiable/uninstructed"] == 2


def test_stack_checks_pairing_and_weights():
    s = stack(RewardComponent(kind="verifiable"))
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        s.score([LOWER_NO_COMMA] * 2, ["x"])
    with pytest.raises(ValueError, match="weights must be finite"):
        stack(RewardComponent(kind="verifiable", weight=float("inf")))


# --- classifier -----------------------------------------------------------------------------------------------------

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
                 "{% endfor %}")
SPECIALS = ["<s>", "<pad>", "<|end|>", "<|user|>", "<|assistant|>"]
CORPUS = ["the sea is calm tonight", "a lighthouse keeper writes letters", "bees make honey in the spring",
          "volcanoes sleep for centuries", "the train leaves at noon", "write a poem about the moon"] * 20


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_rm(path, num_labels=1, chat_template=True):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = tiny_tokenizer()
    if not chat_template:
        tok.chat_template = None
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         num_labels=num_labels, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    model.score.weight.data.normal_(0, 1.0)  # a visible spread of scores
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def rm_path(tmp_path_factory):
    return save_tiny_rm(tmp_path_factory.mktemp("rm"))


def classifier(path, **kw):
    return REWARDS["classifier"](RewardComponent(kind="classifier", model=path, **kw), RuntimeConfig(device="cpu"))


PROMPTS = [Prompt(f"c{i}", t) for i, t in enumerate(["write a poem about the moon", "the train leaves"])]
PAIRS = [(PROMPTS[i % 2], r) for i, r in enumerate(
    ["the sea is calm", "bees make honey", "a", "volcanoes sleep for centuries and the train leaves at noon",
     "the moon", "letters", "the lighthouse keeper writes letters in the spring", "calm", "noon", "honey"])]


def test_classifier_matches_a_single_forward_pass(rm_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    fn = classifier(rm_path, batch_size=4)
    scores = fn([p for p, _ in PAIRS], [r for _, r in PAIRS])
    tok = AutoTokenizer.from_pretrained(rm_path)
    model = AutoModelForSequenceClassification.from_pretrained(rm_path).eval()
    text = tok.apply_chat_template([{"role": "user", "content": PAIRS[3][0].prompt},
                                    {"role": "assistant", "content": PAIRS[3][1]}], tokenize=False)
    assert text.startswith("<s><|user|>\n") and text.endswith("<|end|>\n")
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits[0, 0].item()
    assert scores[3] == pytest.approx(reference, abs=1e-5)
    assert scores.dtype == np.float64 and np.std(scores) > 1e-3  # responses get different scores


def test_classifier_is_deterministic_and_batch_size_invariant(rm_path):
    prompts, responses = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    one, eight = classifier(rm_path, batch_size=1), classifier(rm_path, batch_size=8)
    s1 = one(prompts, responses)
    np.testing.assert_array_equal(s1, one(prompts, responses))
    np.testing.assert_allclose(eight(prompts, responses), s1, atol=1e-5)


def test_classifier_truncates_to_max_length_and_counts(rm_path):
    fn = classifier(rm_path, max_length=20, batch_size=8)
    long = " ".join(["the lighthouse keeper writes letters"] * 10)
    prompts, responses = [PROMPTS[1]] * 3, ["calm", long, "noon"]
    assert [len(fn.encode(p, r)) <= 20 for p, r in zip(prompts, responses)] == [True, False, True]
    scores = fn(prompts, responses)
    assert fn.last_counts == {"truncated": 1}
    full = classifier(rm_path, max_length=4096)  # the long input, cut to its first 20 tokens by hand, scores the same
    ids = fn.encode(PROMPTS[1], long)[:20]
    assert scores[1] == pytest.approx(full._score([ids])[0], abs=1e-5)
    result = RewardStack(RewardConfig(components=[RewardComponent(kind="classifier", model=rm_path, max_length=20)]),
                         RuntimeConfig(device="cpu")).score(prompts, responses)
    assert result.counts["classifier/truncated"] == 1
    np.testing.assert_allclose(result.total, scores, atol=1e-6)


def test_classifier_needs_one_label_and_a_chat_template(tmp_path):
    with pytest.raises(ValueError, match="num_labels=2; a reward model must output one logit"):
        classifier(save_tiny_rm(tmp_path / "two", num_labels=2))
    with pytest.raises(ValueError, match="has no chat template"):
        classifier(save_tiny_rm(tmp_path / "plain", chat_template=False))


def test_a_python_reward_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    # the `ampo` console script does not put the working directory on sys.path (python -m does): ./myrw.py
    # must load either way
    from ampo.rewards.python import PythonReward

    (tmp_path / "ampo_cwd_reward.py").write_text("def score(prompts, responses):\n    return [1.5] * len(responses)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    reward = PythonReward("ampo_cwd_reward:score")
    assert reward.fn(["p"], ["a", "b"]) == [1.5, 1.5]


def test_kwargs_that_build_but_cannot_check_are_refused_before_scoring():
    from ampo.rewards.verifiable import build_checkers

    # ratio:overlap with a percentage but no reference_text builds, then fails on every response (TypeError)
    prompt = Prompt(prompt_id="p1", prompt="Write.", instruction_id_list=["ratio:overlap"], kwargs=[{"percentage": 50}])
    with pytest.raises(ValueError, match=r"'ratio:overlap' of prompt 'p1': kwargs \{'percentage': 50\} leave its "
                                         r"checker unable to check a response \(TypeError"):
        build_checkers(prompt)
