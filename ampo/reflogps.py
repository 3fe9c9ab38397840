"""Reference log-probs: the reference policy's response log-probs, computed once per round and stored with the
selected rows, so the trainer holds one model, not two.

Response tokens only, prompt tokens label-masked (spec 1.1), tokenised exactly as the trainer tokenises them
(`ampo.training_data.tokenize_groups` with the same ForwardOptions), in eval mode under no_grad, in the trainer's
precision: fp32 weights, fp32 on CPU, bf16 autocast on GPU when cfg.dtype is auto.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ampo.config import RuntimeConfig, TrainConfig
from ampo.logps import group_logps
from ampo.training_data import ForwardOptions, Group, collate, tokenize_groups


class ReferenceLogps(NamedTuple):
    """Per response, in input order (groups flattened group-major): (N,) each."""

    sum: np.ndarray  # float64: summed response log-probs
    mean: np.ndarray  # float64: length-normalised
    n_tokens: np.ndarray  # int64: response tokens


def compute_reference_logps(model_path: str, groups_or_pairs: Sequence[Group] | Sequence[tuple[str, str]],
                            cfg: TrainConfig, runtime: RuntimeConfig | None = None, *,
                            options: ForwardOptions | None = None) -> ReferenceLogps:
    """Log-probs of every response under the reference policy at `model_path`. Returns (N,) arrays.

    Input: groups (their responses, in order) or (prompt, response) pairs; consecutive pairs with the same prompt
    share a forward. Batches hold cfg.groups_per_step groups, as the trainer's micro-batches do.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    runtime, options = runtime or RuntimeConfig(), options or ForwardOptions()
    groups = as_groups(groups_or_pairs)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=runtime.trust_remote_code)
    tgroups, _ = tokenize_groups(tokenizer, groups, max_length=cfg.max_length,
                                 max_prompt_length=cfg.max_prompt_length, options=options)
    device, autocast = reference_precision(cfg, runtime)
    from ampo.models import check_safetensors, pad_token_id, require_safetensors

    require_safetensors(model_path)  # never a pickle-based .bin
    check_safetensors(model_path)  # a truncated file: one error naming it
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=runtime.trust_remote_code).to(device).eval()
    pad_id = pad_token_id(tokenizer)
    sums, means, counts = [], [], []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for start in range(0, len(tgroups), cfg.groups_per_step):
            batch = collate(tgroups[start : start + cfg.groups_per_step])
            out = group_logps(model, batch.examples, pad_token_id=pad_id, forward_mode=options.forward_mode)
            sums.append(out.sum.double().cpu())
            means.append(out.mean.double().cpu())
            counts.append(out.n_tokens.cpu())
    return ReferenceLogps(torch.cat(sums).numpy(), torch.cat(means).numpy(), torch.cat(counts).long().numpy())


def reference_precision(cfg: TrainConfig, runtime: RuntimeConfig) -> tuple[torch.device, bool]:
    """(device, bf16 autocast?) exactly as the trainer runs: fp32 weights, bf16 autocast on GPU when cfg.dtype is
    auto or bfloat16 (on CPU only when bfloat16), so reference and policy log-probs agree at step 0."""
    from ampo.models import resolve_device

    cpu = resolve_device(runtime.device) == "cpu"
    autocast = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and not cpu)
    return torch.device("cpu" if cpu else "cuda"), autocast


def as_groups(items: Sequence[Group] | Sequence[tuple[str, str]]) -> list[Group]:
    """Groups as given, or (prompt, response) pairs gathered into groups of consecutive equal prompts."""
    if all(isinstance(item, Group) for item in items):
        return list(items)
    groups: list[tuple[str, list[str]]] = []
    for item in items:
        if not (isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise ValueError(f"expected Group objects or (prompt, response) string pairs, got {item!r:.80}")
        prompt, response = item
        if groups and groups[-1][0] == prompt:
            groups[-1][1].append(response)
        else:
            groups.append((prompt, [response]))
    return [Group(f"pair-{i}", p, rs, [0.0] * len(rs), [False] * len(rs)) for i, (p, rs) in enumerate(groups)]


def with_reference(groups: Sequence[Group], ref: ReferenceLogps) -> list[Group]:
    """The groups with their reference log-probs filled in from `compute_reference_logps(groups)`."""
    total = sum(g.size for g in groups)
    if len(ref.sum) != total:
        raise ValueError(f"{len(ref.sum)} reference log-probs for {total} responses in {len(groups)} groups")
    out, at = [], 0
    for g in groups:
        span = slice(at, at + g.size)
        out.append(dataclasses.replace(g, ref_logp_sum=ref.sum[span].tolist(), ref_logp_mean=ref.mean[span].tolist()))
        at += g.size
    return out
