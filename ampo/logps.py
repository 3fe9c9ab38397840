"""Sequence log-probabilities of responses: chat-template tokenisation, per-token log-softmax, group forwards.

Conventions follow spec 1.1 (SimPO / TRL): prompt tokens are labelled -100, labels are shifted against the logits
(labels[:, 1:] vs logits[:, :-1]), a sequence's log-prob is the sum over its response tokens and its
length-normalised log-prob that sum divided by the number of response tokens.
"""

import inspect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

IGNORE_INDEX = -100
ResponseSpan = Literal["generation", "assistant_turn"]
ForwardMode = Literal["auto", "padded", "packed", "prefix_shared"]
PREFIX_SHARED_MAX_COST = 0.75  # "auto" shares prefixes when that processes at most this share of packed's tokens


# ----------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class Example:
    """One tokenised (prompt, response): input_ids = prompt + response, labels = -100 on the prompt."""

    input_ids: list[int]
    labels: list[int]
    n_prompt: int  # prompt tokens, all labelled -100
    n_truncated: int = 0  # prompt and response tokens cut to fit max_length

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.n_prompt]

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.n_prompt :]


def _messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return system + [{"role": "user", "content": prompt}]


def _generation_texts(tokenizer, prompt: str, response: str, system_prompt: str | None) -> tuple[str, str]:
    """Prompt = template(prompt, add_generation_prompt=True); response = template(prompt + response) minus it.

    The response is exactly what a sampler continuing the templated prompt generates (content + end marker).
    """
    messages = _messages(prompt, system_prompt)
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt_text):
        raise ValueError("the chat template of prompt+response does not start with the template of the prompt "
                         "with add_generation_prompt=True; use response_span='assistant_turn' for this template")
    return prompt_text, full[len(prompt_text) :]


def _assistant_turn_texts(tokenizer, prompt: str, response: str, system_prompt: str | None) -> tuple[str, str]:
    """SimPO's split (run_simpo.py, task 'simpo'): prompt = template(prompt) without a generation prompt,
    response = template(assistant turn alone) with a leading BOS stripped, so header tokens count as response."""
    prompt_text = tokenizer.apply_chat_template(_messages(prompt, system_prompt), tokenize=False)
    turn = tokenizer.apply_chat_template([{"role": "assistant", "content": response}], tokenize=False)
    bos = tokenizer.bos_token
    return prompt_text, turn[len(bos) :] if bos and turn.startswith(bos) else turn


RESPONSE_SPANS: dict[str, Callable[..., tuple[str, str]]] = {
    "generation": _generation_texts,
    "assistant_turn": _assistant_turn_texts,
}


def _tokenize_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids with BOS prepended when the tokenizer has one and the template did not emit it (SimPO)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] + ids if bos is not None and (not ids or ids[0] != bos) else ids


def _tokenize_response(tokenizer, text: str) -> list[int]:
    """Response ids ending in EOS: whitespace the template writes after the last EOS is dropped (a sampler stops
    at EOS), and EOS is appended when missing (SimPO)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos in ids:
        last = len(ids) - 1 - ids[::-1].index(eos)
        if not tokenizer.decode(ids[last + 1 :]).strip():
            ids = ids[: last + 1]
    return ids if ids and ids[-1] == eos else ids + [eos]


def build_group(tokenizer, prompt: str, responses: Sequence[str], *, max_length: int, max_prompt_length: int,
                system_prompt: str | None = None, response_span: ResponseSpan = "generation") -> list[Example]:
    """Tokenise one prompt with each of its responses; all share the same prompt ids (so prefix sharing holds).

    Truncation as SimPO's `tokenize_row`, with the group's longest response in the role of the longer of the
    pair: if prompt + longest > max_length the prompt keeps its last max_prompt_length tokens, and if still too
    long every response keeps its first max_length - max_prompt_length tokens.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length; got {max_prompt_length}, {max_length}")
    if response_span not in RESPONSE_SPANS:
        raise ValueError(f"unknown response_span {response_span!r}; choose from {sorted(RESPONSE_SPANS)}")
    if not responses:
        raise ValueError("build_group needs at least one response")
    split = RESPONSE_SPANS[response_span]
    texts = [split(tokenizer, prompt, response, system_prompt) for response in responses]
    prompt_ids = _tokenize_prompt(tokenizer, texts[0][0])
    response_ids = [_tokenize_response(tokenizer, response_text) for _, response_text in texts]
    longest = max(len(ids) for ids in response_ids)
    kept_prompt = prompt_ids[-max_prompt_length:] if len(prompt_ids) + longest > max_length else prompt_ids
    if len(kept_prompt) + longest > max_length:
        response_ids_kept = [ids[: max_length - max_prompt_length] for ids in response_ids]
    else:
        response_ids_kept = response_ids
    cut_prompt = len(prompt_ids) - len(kept_prompt)
    return [
        Example(input_ids=kept_prompt + kept, labels=[IGNORE_INDEX] * len(kept_prompt) + kept,
                n_prompt=len(kept_prompt), n_truncated=cut_prompt + len(full) - len(kept))
        for full, kept in zip(response_ids, response_ids_kept)
    ]


def build_example(tokenizer, prompt: str, response: str, *, max_length: int, max_prompt_length: int,
                  system_prompt: str | None = None, response_span: ResponseSpan = "generation") -> Example:
    """Tokenise one (prompt, response) with the tokenizer's chat template; see `build_group`."""
    return build_group(tokenizer, prompt, [response], max_length=max_length, max_prompt_length=max_prompt_length,
                       system_prompt=system_prompt, response_span=response_span)[0]


# ----------------------------------------------------------------------------- log-probs from logits


def _token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] per position, one sequence at a time in fp32. (B, T, V), (B, T) -> (B, T).

    As TRL's `selective_log_softmax`: logit[target] - logsumexp(logits), never a full (B, T, V) log-softmax.
    """
    rows = []
    for row, t in zip(logits, targets):  # (T, V), (T,)
        row = row.float()
        rows.append(row.gather(-1, t[:, None])[:, 0] - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)


def per_token_logps(logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Shifted per-token log-probs and response mask. (B, T, V), (B, T) -> (B, T-1) fp32 (0 off-mask), (B, T-1)."""
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != ignore_index
    logps = _token_logps(logits[:, :-1], torch.where(mask, targets, 0))
    return torch.where(mask, logps, 0.0), mask


def _reduce(per_token: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n_tokens = mask.sum(-1)  # (B,)
    if bool((n_tokens == 0).any()):
        raise ValueError(f"sequences {(n_tokens == 0).nonzero().flatten().tolist()} have no response tokens")
    total = per_token.sum(-1)  # (B,)
    return total, total / n_tokens, n_tokens


def sequence_logps(logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor, Tensor]:
    """Summed and length-normalised response log-probs and response token counts (spec 1.1).

    (B, T, V), (B, T) -> sum (B,), mean (B,), n_tokens (B,). A sequence without response tokens is an error.
    """
    per_token, mask = per_token_logps(logits, labels, ignore_index=ignore_index)
    return _reduce(per_token, mask)


# ----------------------------------------------------------------------------- batched group forwards


class GroupLogps(NamedTuple):
    """Per-sequence results of `group_logps`, each (N,) in the order of the examples."""

    sum: Tensor  # summed response log-probs (fp32)
    mean: Tensor  # length-normalised response log-probs (fp32)
    n_tokens: Tensor  # response tokens
    eos_probs: Tensor | None  # P(EOS) at each response's last position (REFA eq. 7); None without eos_token_id


def _pad_right(rows: Sequence[list[int]], value: int, device) -> tuple[Tensor, Tensor]:
    """Right-pad id lists. Returns ids (N, T) and attention mask (N, T) long."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
        mask[i, : len(r)] = 1
    return ids, mask


def _from_aligned(logits: Tensor, targets: Tensor, mask: Tensor, eos_token_id: int | None) -> GroupLogps:
    """GroupLogps from logits aligned with the tokens they predict. (N, T, V), (N, T), (N, T) bool."""
    per_token = torch.where(mask, _token_logps(logits, torch.where(mask, targets, 0)), 0.0)  # (N, T)
    total, mean, n_tokens = _reduce(per_token, mask)
    eos_probs = None
    if eos_token_id is not None:
        last = mask.shape[1] - 1 - mask.flip(-1).int().argmax(-1)  # (N,) last response position
        last_logits = logits[torch.arange(len(last), device=logits.device), last].float()  # (N, V)
        eos_probs = (last_logits[:, eos_token_id] - torch.logsumexp(last_logits, dim=-1)).exp()
    return GroupLogps(total, mean, n_tokens, eos_probs)


def _padded_forward(model, examples: Sequence[Example], pad_token_id: int, eos_token_id: int | None) -> GroupLogps:
    """All sequences in one right-padded forward."""
    device = next(model.parameters()).device
    ids, attention = _pad_right([e.input_ids for e in examples], pad_token_id, device)  # (N, T)
    labels, _ = _pad_right([e.labels for e in examples], IGNORE_INDEX, device)  # (N, T)
    logits = model(input_ids=ids, attention_mask=attention).logits  # (N, T, V)
    targets = labels[:, 1:]
    return _from_aligned(logits[:, :-1], targets, targets != IGNORE_INDEX, eos_token_id)


def _prompt_groups(examples: Sequence[Example]) -> list[int]:
    """Group index of each example: a run of consecutive examples with equal prompt ids is one group. (N,)."""
    group_of = [0]
    for before, e in itertools.pairwise(examples):
        group_of.append(group_of[-1] + (e.prompt_ids != before.prompt_ids))
    return group_of


def _prefix_shared_forward(model, examples: Sequence[Example], pad_token_id: int,
                           eos_token_id: int | None) -> GroupLogps:
    """Each distinct prompt once (right-padded batch), its KV cache indexed out to its responses, then the
    responses (right-padded batch) at positions continuing their prompt. Differentiable through the cache."""
    device = next(model.parameters()).device
    group_of = _prompt_groups(examples)
    firsts = [examples[group_of.index(g)] for g in range(group_of[-1] + 1)]
    prompts, prompt_attention = _pad_right([e.prompt_ids for e in firsts], pad_token_id, device)  # (G, P)
    index = torch.tensor(group_of, device=device)  # (N,)
    prompt_len = prompt_attention.sum(-1)[index]  # (N,)
    # only the prompts' last positions predict a response token: the LM head runs on those alone (their distinct
    # positions, U <= G), not on every prompt position, forward and backward
    keep = torch.unique(prompt_len - 1)  # (U,) sorted
    kwargs = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    out = model(input_ids=prompts, attention_mask=prompt_attention, use_cache=True, **kwargs)
    cache = out.past_key_values
    cache.batch_select_indices(index)
    responses, response_attention = _pad_right([e.response_ids for e in examples], pad_token_id, device)  # (N, R)
    positions = prompt_len[:, None] + torch.arange(responses.shape[1], device=device)  # (N, R)
    attention = torch.cat([prompt_attention[index], response_attention], dim=1)  # (N, P + R)
    logits = model(input_ids=responses, attention_mask=attention, position_ids=positions,
                   past_key_values=cache, use_cache=True).logits  # (N, R, V)
    last = torch.searchsorted(keep, prompt_len - 1) if kwargs else prompt_len - 1  # (N,) its column in out.logits
    first_logits = out.logits[index, last]  # (N, V) the prompt's last position predicts token 1
    aligned = torch.cat([first_logits[:, None], logits[:, :-1]], dim=1)  # (N, R, V)
    return _from_aligned(aligned, responses, response_attention.bool(), eos_token_id)


PACKED_ATTENTION = "ampo_packed"  # SDPA, and causal SDPA per sequence when called with `ampo_segments`


def _packed_sdpa(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                 scaling: float | None = None, *, ampo_segments: tuple[tuple[int, int], ...] | None = None, **kwargs):
    """transformers' SDPA attention, except with `ampo_segments` (the packed forward): causal attention within each
    (start, stop) segment of the one packed row, one SDPA call per sequence, no L x L mask. query (1, H, L, D),
    key/value (1, H_kv, L, D) -> output (1, L, H, D). The segments travel in the model's keyword arguments, so a
    gradient-checkpointing recompute sees them too."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if ampo_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kwargs.pop("is_causal", None)
    outs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout=dropout,
                                   scaling=scaling, is_causal=True, **kwargs)[0] for a, b in ampo_segments]
    return torch.cat(outs, dim=1), None


def _use_packed_sdpa(model) -> bool:
    """Switch an SDPA model (unwrapped from DDP/DeepSpeed and PEFT) to `PACKED_ATTENTION` (registered on first use;
    SDPA's mask; plain SDPA without segments, so other forwards of the model are unchanged). False for any other
    attention implementation: transformers then detects the packed row from the restarting position ids itself
    (flash attention: variable-length kernels; eager: a block-diagonal mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if PACKED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(PACKED_ATTENTION, _packed_sdpa)
        AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    config = _unwrap(model).config
    if config._attn_implementation == "sdpa":
        config._attn_implementation = PACKED_ATTENTION  # not saved: config.json never holds it
    return config._attn_implementation == PACKED_ATTENTION


def _unwrap(model):
    """The transformers model inside DDP/DeepSpeed (.module) and PEFT (.get_base_model()) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(_unwrap(model).forward).parameters


def _packed_forward(model, examples: Sequence[Example], pad_token_id: int, eos_token_id: int | None) -> GroupLogps:
    """All sequences concatenated into one row (no padding), positions restarting at 0 per sequence, attention
    within each sequence (`_packed_sdpa`, or transformers' own packed-sequence support); logits only at the positions
    that predict response tokens (`logits_to_keep`, when the model takes it)."""
    device = next(model.parameters()).device
    lengths = [len(e.input_ids) for e in examples]
    starts = list(itertools.accumulate(lengths, initial=0))  # (N + 1,)
    ids = torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.long, device=device)  # (L,)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])  # (L,)
    # aligned: logits at row position t predict token t + 1 of the same sequence; a sequence's first token is a
    # prompt token (-100), so no position predicts across a sequence boundary
    labels = torch.tensor([t for e in examples for t in e.labels], dtype=torch.long, device=device)  # (L,)
    keep = (labels[1:] != IGNORE_INDEX).nonzero().squeeze(1)  # (K,) positions predicting response tokens
    segment = torch.repeat_interleave(torch.arange(len(examples), device=device),
                                      torch.tensor(lengths, device=device))[keep]  # (K,) sequence of each
    kwargs = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    if _use_packed_sdpa(model):  # an all-ones mask: SDPA's mask function then builds no L x L mask
        kwargs |= {"ampo_segments": tuple(itertools.pairwise(starts)), "attention_mask": torch.ones_like(ids[None])}
    logits = model(input_ids=ids[None], position_ids=positions[None], use_cache=False, **kwargs).logits[0]
    if "logits_to_keep" not in kwargs:  # (L, V) -> (K, V)
        logits = logits[keep]
    targets = ids[keep + 1]  # (K,)
    token_logps = _token_logps(logits[None], targets[None])[0]  # (K,)
    n_tokens = torch.zeros(len(examples), dtype=torch.long, device=device).index_add_(0, segment,
                                                                                      torch.ones_like(segment))
    if bool((n_tokens == 0).any()):
        raise ValueError(f"sequences {(n_tokens == 0).nonzero().flatten().tolist()} have no response tokens")
    total = torch.zeros(len(examples), dtype=token_logps.dtype, device=device).index_add_(0, segment, token_logps)
    eos_probs = None
    if eos_token_id is not None:
        last = torch.zeros(len(examples), dtype=torch.long, device=device).scatter_reduce_(
            0, segment, torch.arange(len(keep), device=device), reduce="amax")  # (N,) last kept index per sequence
        last_logits = logits[last].float()  # (N, V)
        eos_probs = (last_logits[:, eos_token_id] - torch.logsumexp(last_logits, dim=-1)).exp()
    return GroupLogps(total, total / n_tokens, n_tokens, eos_probs)


FORWARDS: dict[str, Callable[..., GroupLogps]] = {
    "padded": _padded_forward,
    "packed": _packed_forward,
    "prefix_shared": _prefix_shared_forward,
}


def choose_forward(examples: Sequence[Example], *, gradient_checkpointing: bool = False) -> str:
    """The forward "auto" runs: "prefix_shared" when it processes at most PREFIX_SHARED_MAX_COST of the tokens the
    packed forward processes (the distinct prompts padded to the longest, plus every response padded to the longest:
    long prompts shared by several responses), else "packed"; always "packed" under gradient checkpointing."""
    if gradient_checkpointing:
        return "packed"
    group_of = _prompt_groups(examples)
    firsts = [examples[group_of.index(g)] for g in range(group_of[-1] + 1)]
    packed = sum(len(e.input_ids) for e in examples)
    shared = (len(firsts) * max(e.n_prompt for e in firsts)
              + len(examples) * max(len(e.input_ids) - e.n_prompt for e in examples))
    return "prefix_shared" if shared <= PREFIX_SHARED_MAX_COST * packed else "packed"


def group_logps(model, examples: Sequence[Example], *, pad_token_id: int, forward_mode: ForwardMode = "padded",
                eos_token_id: int | None = None) -> GroupLogps:
    """Response log-probs of many sequences (several groups' responses) in one batched forward. Returns (N,) each.

    "padded": every prompt+response right-padded into one batch (equals a per-sequence forward).
    "packed": every prompt+response concatenated into one row without padding, positions restarting per sequence
    and attention kept within each (equals "padded" up to float rounding); logits only where a response token is
    predicted.
    "prefix_shared": a group's prompt is computed once and its KV cache reused by its K responses; examples of
    one group must be consecutive and share prompt ids (as `build_group` makes them). Differentiable; wrap
    in torch.no_grad() for reference log-probs. With `eos_token_id`, also P(EOS) at each last response position.
    "auto": "prefix_shared" or "packed" for these examples, by the tokens each processes (`choose_forward`).
    """
    if forward_mode not in FORWARDS and forward_mode != "auto":
        raise ValueError(f"unknown forward_mode {forward_mode!r}; choose from {sorted([*FORWARDS, 'auto'])}")
    if not examples:
        raise ValueError("group_logps needs at least one example")
    checkpointing = model.training and getattr(model, "is_gradient_checkpointing", False)
    if forward_mode == "auto":
        forward_mode = choose_forward(examples, gradient_checkpointing=checkpointing)
    if forward_mode == "prefix_shared" and checkpointing:
        raise ValueError("forward_mode='prefix_shared' needs the KV cache, which transformers turns off under "
                         "gradient checkpointing; use forward_mode='padded' or disable gradient checkpointing")
    if any(e.n_prompt < 1 for e in examples):
        raise ValueError("every example needs at least one prompt token (the first response token's context)")
    return FORWARDS[forward_mode](model, examples, pad_token_id, eos_token_id)

