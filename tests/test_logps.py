"""Sequence log-probs: against a naive per-token loop and hand values; chat-template tokenisation (prompt masked
exactly, truncation counted); batched group forwards equal per-sequence forwards; prefix sharing and packing equal
padding."""

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ampo.logps import (
    IGNORE_INDEX,
    Example,
    build_example,
    build_group,
    choose_forward,
    group_logps,
    per_token_logps,
    sequence_logps,
)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SENTENCES = [f"the {a} {b} fox jumps over the {c} dog number {i}." for i, (a, b, c) in enumerate(
    [("quick", "brown", "lazy"), ("slow", "red", "tired"), ("small", "grey", "happy"), ("big", "white", "old")] * 6)]
SENTENCES += ["hello world, how are you today?", "answer the question briefly.", "write a short poem about the sea.",
              "Paris is the capital of France.", "two plus two is four.", "say something kind."]


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE trained on a few dozen sentences; special tokens for BOS, EOS (<|end|>), pad and roles."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(SENTENCES, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|end|>",
                                  pad_token="<|pad|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                         initializer_range=0.3)  # large weights: attention depends visibly on positions
    return LlamaForCausalLM(config).eval()


def _naive_sequence_logps(logits, labels):
    """Per-token loop: sum over t with labels[t] != -100 of log_softmax(logits[t-1])[labels[t]]."""
    sums, counts = [], []
    for b in range(labels.shape[0]):
        total, n = 0.0, 0
        for t in range(1, labels.shape[1]):
            if labels[b, t] != IGNORE_INDEX:
                total += torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]].item()
                n += 1
        sums.append(total)
        counts.append(n)
    return torch.tensor(sums), torch.tensor(counts)


# ----------------------------------------------------------------------------- sequence_logps


def test_uniform_logits_hand_value():
    # V = 4 uniform logits: every response token has log-prob -log 4 = -1.386294;
    # labels [-100, -100, 1, 2, 3]: 3 response tokens -> sum = -3 log 4 = -4.158883, mean = -1.386294
    total, mean, n = sequence_logps(torch.zeros(1, 5, 4), torch.tensor([[-100, -100, 1, 2, 3]]))
    torch.testing.assert_close(total, torch.tensor([-3 * math.log(4)]))
    torch.testing.assert_close(mean, torch.tensor([-math.log(4)]))
    assert n.tolist() == [3]


def test_sequence_logps_matches_naive_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11) * 3
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[1, :2] = IGNORE_INDEX
    labels[1, 5:] = IGNORE_INDEX  # right padding
    labels[2, :6] = IGNORE_INDEX  # a single response token
    total, mean, n = sequence_logps(logits, labels)
    naive_sum, naive_n = _naive_sequence_logps(logits, labels)
    torch.testing.assert_close(total, naive_sum.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, (naive_sum / naive_n).float(), atol=1e-5, rtol=1e-5)
    assert n.tolist() == naive_n.tolist() == [4, 3, 1]
    per_token, mask = per_token_logps(logits, labels)
    assert per_token.shape == (3, 6) and per_token[~mask].abs().sum() == 0


def test_bf16_logits_are_reduced_in_fp32():
    torch.manual_seed(1)
    logits, labels = (torch.randn(2, 6, 9) * 4).bfloat16(), torch.randint(0, 9, (2, 6))
    labels[:, :2] = IGNORE_INDEX
    total, _, _ = sequence_logps(logits, labels)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, sequence_logps(logits.float(), labels)[0])


def test_sequence_without_response_tokens_is_an_error():
    with pytest.raises(ValueError, match=r"sequences \[1\] have no response tokens"):
        sequence_logps(torch.zeros(2, 3, 4), torch.tensor([[-100, 1, 2], [-100, -100, -100]]))


# ----------------------------------------------------------------------------- build_example


def test_build_example_masks_the_prompt_exactly(tokenizer):
    e = build_example(tokenizer, "say something kind.", "two plus two is four.", max_length=128,
                      max_prompt_length=64, system_prompt="answer the question briefly.")
    n_masked = sum(label == IGNORE_INDEX for label in e.labels)
    assert n_masked == e.n_prompt and e.labels[e.n_prompt:] == e.input_ids[e.n_prompt:] and e.n_truncated == 0
    assert tokenizer.decode(e.input_ids[: e.n_prompt]) == (
        "<|bos|><|system|>answer the question briefly.<|end|><|user|>say something kind.<|end|><|assistant|>")
    assert tokenizer.decode(e.response_ids) == "two plus two is four.<|end|>"  # response + end marker (= EOS)


def test_assistant_turn_span_keeps_the_header_in_the_response(tokenizer):
    # SimPO's split (spec 1.1): the prompt has no generation prompt; the assistant header is a response token
    e = build_example(tokenizer, "hello", "hi there", max_length=64, max_prompt_length=32,
                      response_span="assistant_turn")
    assert tokenizer.decode(e.prompt_ids) == "<|bos|><|user|>hello<|end|>"
    assert tokenizer.decode(e.response_ids) == "<|assistant|>hi there<|end|>"


def test_eos_is_appended_and_trailing_whitespace_dropped(tokenizer):
    no_end = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<|bos|>",
                                     eos_token="<|end|>", pad_token="<|pad|>")
    no_end.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    e = build_example(no_end, "hello", "hi there", max_length=64, max_prompt_length=32)
    assert no_end.decode(e.response_ids) == "hi there<|end|>"  # EOS appended (SimPO)
    no_end.chat_template = CHAT_TEMPLATE.replace("<|end|>{% endfor %}", "<|end|>\n{% endfor %}")  # ChatML-like
    e = build_example(no_end, "hello", "hi there", max_length=64, max_prompt_length=32)
    assert no_end.decode(e.response_ids) == "hi there<|end|>"  # the "\n" after EOS is never sampled


def test_generation_span_rejects_inconsistent_templates(tokenizer):
    odd = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<|bos|>",
                                  eos_token="<|end|>", pad_token="<|pad|>")
    odd.chat_template = CHAT_TEMPLATE.replace("<|assistant|>{% endif %}", "<|assistant|>\n{% endif %}")
    with pytest.raises(ValueError, match="response_span='assistant_turn'"):
        build_example(odd, "hello", "hi", max_length=64, max_prompt_length=32)


def test_truncation_prompt_keep_end_then_response(tokenizer):
    prompt, response = "the quick brown fox jumps over the lazy dog number 1.", "Paris is the capital of France."
    full = build_example(tokenizer, prompt, response, max_length=512, max_prompt_length=256)
    n_prompt, n_response = full.n_prompt, len(full.response_ids)
    # prompt cut to its last 8 tokens (keep_end); the response then fits
    e = build_example(tokenizer, prompt, response, max_length=8 + n_response, max_prompt_length=8)
    assert e.prompt_ids == full.prompt_ids[-8:] and e.response_ids == full.response_ids
    assert e.n_truncated == n_prompt - 8
    # still too long: the response keeps its first max_length - max_prompt_length = 3 tokens
    e = build_example(tokenizer, prompt, response, max_length=11, max_prompt_length=8)
    assert e.response_ids == full.response_ids[:3] and len(e.input_ids) == 11
    assert e.n_truncated == (n_prompt - 8) + (n_response - 3)
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        build_example(tokenizer, prompt, response, max_length=8, max_prompt_length=8)


def test_build_group_shares_prompt_ids(tokenizer):
    group = build_group(tokenizer, "the quick brown fox jumps over the lazy dog number 1.",
                        ["hi", "two plus two is four. two plus two is four."], max_length=24, max_prompt_length=12)
    assert group[0].prompt_ids == group[1].prompt_ids and group[0].n_prompt == 12  # the longest response decides
    assert len(group[0].input_ids) <= 24 and len(group[1].input_ids) == 24


# ----------------------------------------------------------------------------- group_logps


@pytest.fixture(scope="module")
def examples(tokenizer):
    kw = {"max_length": 96, "max_prompt_length": 48}
    return (build_group(tokenizer, "hello world, how are you today?", ["the quick brown fox", "fine.",
                        "say something kind. two plus two is four."], **kw)
            + build_group(tokenizer, "write a short poem about the sea.", ["the sea is big", "no"], **kw)
            + build_group(tokenizer, "hi", ["Paris is the capital of France."], system_prompt="be brief.", **kw))


def test_padded_forward_equals_per_sequence_forward(model, tokenizer, examples):
    out = group_logps(model, examples, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    for i, e in enumerate(examples):
        logits = model(input_ids=torch.tensor([e.input_ids])).logits  # (1, T, V), no padding
        total, mean, n = sequence_logps(logits, torch.tensor([e.labels]))
        torch.testing.assert_close(out.sum[i], total[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.mean[i], mean[0], atol=1e-5, rtol=1e-5)
        assert out.n_tokens[i] == n[0] == len(e.response_ids)
        # P(EOS) where the response ends: softmax at the position predicting its last token
        p_eos = torch.softmax(logits[0, len(e.input_ids) - 2], -1)[tokenizer.eos_token_id]
        torch.testing.assert_close(out.eos_probs[i], p_eos, atol=1e-6, rtol=1e-5)


def test_prefix_shared_forward_equals_padded(model, tokenizer, examples):
    kw = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    padded = group_logps(model, examples, **kw)
    shared = group_logps(model, examples, forward_mode="prefix_shared", **kw)
    for a, b in zip(padded, shared):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_prefix_shared_forward_without_logits_to_keep_equals_padded(model, tokenizer, examples, monkeypatch):
    """The prompt pass keeps only the prompts' last positions (logits_to_keep: 3 prompts of 3 lengths here); a model
    without logits_to_keep computes them all and the same positions are read."""
    from ampo import logps

    kw = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    assert len({len(e.prompt_ids) for e in examples}) == 3  # three distinct last positions to map back
    kept = group_logps(model, examples, forward_mode="prefix_shared", **kw)
    monkeypatch.setattr(logps, "_accepts_logits_to_keep", lambda model: False)
    for a, b in zip(group_logps(model, examples, **kw), group_logps(model, examples, forward_mode="prefix_shared", **kw)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(kept, group_logps(model, examples, forward_mode="prefix_shared", **kw)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def _grads(model, tokenizer, examples, mode) -> list:
    """Parameter gradients of the summed mean log-probs under forward `mode`."""
    model.zero_grad()
    group_logps(model, examples, pad_token_id=tokenizer.pad_token_id, forward_mode=mode).mean.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


def test_prefix_shared_gradients_equal_padded(model, tokenizer, examples):
    for a, b in zip(_grads(model, tokenizer, examples, "padded"), _grads(model, tokenizer, examples, "prefix_shared")):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    model.zero_grad()


def test_packed_forward_equals_padded(model, tokenizer, examples):
    """One row, no padding, positions restarting per sequence: the same log-probs as the padded batch (which equals
    per-sequence forwards above), so no attention crosses a sequence boundary."""
    kw = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    padded = group_logps(model, examples, **kw)
    packed = group_logps(model, examples, forward_mode="packed", **kw)
    for a, b in zip(padded, packed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    one = group_logps(model, examples[2:3], forward_mode="packed", **kw)  # a single sequence
    torch.testing.assert_close(one.sum, padded.sum[2:3], atol=1e-5, rtol=1e-5)
    # the model now runs the packed SDPA, which is plain SDPA for the other forwards
    assert model.config._attn_implementation == "ampo_packed"
    for a, b in zip(padded, group_logps(model, examples, **kw)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(padded, group_logps(model, examples, forward_mode="prefix_shared", **kw)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_packed_forward_with_eager_attention_equals_padded(model, tokenizer, examples):
    """Another attention implementation: transformers' own packed-sequence detection (a block-diagonal mask)."""
    kw = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    padded = group_logps(model, examples, **kw)
    before = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        packed = group_logps(model, examples, forward_mode="packed", **kw)
        assert model.config._attn_implementation == "eager"
    finally:
        model.config._attn_implementation = before
    for a, b in zip(padded, packed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packed_forward_without_logits_to_keep_equals_padded(model, tokenizer, examples, monkeypatch):
    """A model whose forward takes no logits_to_keep: the packed forward keeps the response positions itself."""
    from ampo import logps

    monkeypatch.setattr(logps, "_accepts_logits_to_keep", lambda model: False)
    kw = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    for a, b in zip(group_logps(model, examples, **kw), group_logps(model, examples, forward_mode="packed", **kw)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packed_gradients_equal_padded(model, tokenizer, examples):
    for a, b in zip(_grads(model, tokenizer, examples, "padded"), _grads(model, tokenizer, examples, "packed")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_packed_forward_under_gradient_checkpointing(model, tokenizer, examples):
    kw = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    expected = group_logps(model, examples, **kw)
    model.gradient_checkpointing_enable()
    model.train()  # dropout is 0 in the fixture's config
    try:
        out = group_logps(model, examples, forward_mode="packed", **kw)
        out.mean.sum().backward()
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
        model.zero_grad()
    torch.testing.assert_close(out.sum.detach(), expected.sum, atol=1e-5, rtol=1e-5)


def _example(n_prompt: int, n_response: int, prompt_token: int = 5) -> Example:
    return Example(input_ids=[prompt_token] * n_prompt + [7] * n_response,
                   labels=[IGNORE_INDEX] * n_prompt + [7] * n_response, n_prompt=n_prompt)


def test_choose_forward_by_tokens_processed():
    # short prompt: packed processes (2+10) + (2+4) = 18 tokens; prefix-shared 1 prompt x 2 + 2 responses x 10 = 22
    assert choose_forward([_example(2, 10), _example(2, 4)]) == "packed"
    # long prompt: packed (20+4) + (20+6) = 50; prefix-shared 20 + 2 x 6 = 32 <= 0.75 x 50 = 37.5
    long = [_example(20, 4), _example(20, 6)]
    assert choose_forward(long) == "prefix_shared"
    assert choose_forward(long, gradient_checkpointing=True) == "packed"  # no KV cache under checkpointing
    # two groups (prompts differ): packed 50 + (10+4)x2 = 78; shared 2 prompts x 20 + 4 responses x 6 = 64 > 58.5
    assert choose_forward(long + [_example(10, 4, prompt_token=6)] * 2) == "packed"


def test_auto_forward_equals_padded(model, tokenizer, examples):
    kw = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    for a, b in zip(group_logps(model, examples, **kw), group_logps(model, examples, forward_mode="auto", **kw)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_group_logps_bad_mode(model, tokenizer, examples):
    with pytest.raises(ValueError, match="unknown forward_mode 'bogus'; choose from"):
        group_logps(model, examples, pad_token_id=tokenizer.pad_token_id, forward_mode="bogus")


def test_prefix_sharing_refuses_gradient_checkpointing(model, tokenizer, examples):
    model.gradient_checkpointing_enable()
    model.train()
    try:
        with pytest.raises(ValueError, match="gradient checkpointing"):
            group_logps(model, examples, pad_token_id=tokenizer.pad_token_id, forward_mode="prefix_shared")
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
