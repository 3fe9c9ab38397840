"""A sequence-classification reward model (one logit) scoring (prompt, response) chats, e.g. Skywork-Reward.

torch and transformers are imported when a classifier is built, so verifiable-only stacks never load them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ampo.config import RewardComponent, RuntimeConfig
from ampo.prompts import Prompt

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class ClassifierReward:
    """The RM's logit for the chat [user: prompt, assistant: response], rendered with the RM tokenizer's own chat
    template. Returns (n,) float64. Inputs longer than `max_length` tokens keep their first `max_length` tokens and
    are counted in `last_counts["truncated"]`. fp32 on CPU, bf16 on GPU; eval mode, no grad.
    """

    def __init__(self, model: str, batch_size: int, max_length: int, device: torch.device, trust_remote_code: bool):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        if not self.tokenizer.chat_template:
            raise ValueError(f"reward model {model!r}: its tokenizer has no chat template to render (prompt, response)")
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        from ampo.models import check_safetensors, pad_token_id

        check_safetensors(model)  # a truncated file: one error naming it
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {model!r} has num_labels={self.model.config.num_labels}; a reward model "
                             "must output one logit (num_labels=1)")
        self.model.to(device).eval()
        self.pad_id = pad_token_id(self.tokenizer, config_pad_id=self.model.config.pad_token_id)
        if self.pad_id is None:
            raise ValueError(f"reward model {model!r} defines no pad or eos token to pad batches with")
        self.model.config.pad_token_id = self.pad_id  # the head pools the last token that is not padding
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.last_counts: dict[str, int] = {}

    def validate(self, prompts: list[Prompt]) -> None:
        pass

    def encode(self, prompt: Prompt, response: str) -> list[int]:
        """Token ids of the rendered chat, untruncated (the template supplies any BOS)."""
        chat = [{"role": "user", "content": prompt.prompt}, {"role": "assistant", "content": response}]
        text = self.tokenizer.apply_chat_template(chat, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, prompts: list[Prompt], responses: list[str]) -> np.ndarray:
        ids = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        truncated = sum(len(x) > self.max_length for x in ids)
        ids = [x[: self.max_length] for x in ids]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths share a batch: less padding
        scores = np.empty(len(ids), dtype=np.float64)  # (n,)
        for b in range(0, len(order), self.batch_size):
            batch = order[b: b + self.batch_size]
            scores[batch] = self._score([ids[i] for i in batch])
        if truncated:
            log.warning("%d of %d reward-model inputs exceed max_length=%d tokens and were truncated",
                        truncated, len(ids), self.max_length)
        self.last_counts = {"truncated": truncated}
        return scores

    def _score(self, batch: list[list[int]]) -> np.ndarray:
        """Right-padded batch (B, T) -> (B,) logits; right padding leaves every real token's position unchanged."""
        import torch

        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, x in enumerate(batch):
            input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            attention_mask[row, : len(x)] = 1
        with torch.no_grad():
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)).logits
        return logits[:, 0].float().cpu().numpy()  # (B,)


def make_classifier_reward(component: RewardComponent, runtime: RuntimeConfig) -> ClassifierReward:
    import torch

    from ampo.models import resolve_device

    return ClassifierReward(component.model, component.batch_size, component.max_length,
                            torch.device(resolve_device(runtime.device)), runtime.trust_remote_code)
