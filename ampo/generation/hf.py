"""transformers backend: batched `generate` with left padding and per-prompt seeded sampling.

HF `generate` samples all rows from one global RNG, so a prompt's samples would depend on its batch neighbours.
Here `generate` runs in greedy mode and `SeededSampler`, a logits processor, does the sampling itself: it applies
temperature and top-p (HF's own warpers), draws each prompt's n rows from that prompt's torch.Generator, and
returns scores that leave argmax no choice. A prompt's samples then depend on its seed, not on which prompts share
its batch (up to float rounding from the batch's padded shape; bitwise-equal for the same batches).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers import GenerationConfig as HFGenerationConfig

from ampo.config import GenerationConfig, RuntimeConfig
from ampo.generation import (
    Generator,
    Progress,
    Sample,
    check_request,
    render_prompt,
    resolve_device,
    resolve_dtype,
)
from ampo.models import check_safetensors, pad_token_id, quiet_loading, require_safetensors
from ampo.threads import restore_torch_threads


class SeededSampler(LogitsProcessor):
    """Chooses each row's next token from its prompt's generator; records log pi(token) under the raw logits.

    Rows are prompt-major: rows i*n .. i*n+n-1 belong to prompt i and draw from generators[i].
    temperature == 0: greedy (argmax of the raw logits).
    """

    def __init__(self, seeds: list[int], n: int, temperature: float, top_p: float, device: str):
        self.n = n
        self.generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        warpers = [TemperatureLogitsWarper(temperature)] if temperature > 0 else []
        if temperature > 0 and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.greedy = temperature == 0
        self.step_logps: list[torch.Tensor] = []  # per step: (R,) log-prob of the chosen token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()  # (R, V) raw logits: no other processor runs before this one
        if self.greedy:
            chosen = scores.argmax(dim=-1)  # (R,)
        else:
            probs = torch.softmax(self.warpers(input_ids, scores), dim=-1)  # (R, V)
            chosen = torch.cat(
                [
                    torch.multinomial(probs[i * self.n : (i + 1) * self.n], 1, generator=g).squeeze(1)
                    for i, g in enumerate(self.generators)
                ]
            )  # (R,)
        logps = torch.log_softmax(scores, dim=-1)  # (R, V)
        self.step_logps.append(logps.gather(1, chosen[:, None]).squeeze(1))
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, chosen[:, None], 0.0)  # argmax (greedy generate) picks `chosen`


class HFGenerator(Generator):
    """transformers `generate`, `cfg.batch_size` prompts (x n rows) per call; fp32 on CPU."""

    def __init__(self, model_path: str, cfg: GenerationConfig, runtime: RuntimeConfig):
        self.cfg = cfg
        self.device = resolve_device(runtime.device)
        restore_torch_threads()  # a vLLM engine run earlier in this process may have changed them
        dtype = getattr(torch, resolve_dtype(cfg.dtype, self.device))
        trust = runtime.trust_remote_code
        require_safetensors(model_path)  # never a pickle-based .bin
        check_safetensors(model_path)  # a truncated file: one error naming it
        with quiet_loading():
            self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust)
            model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=dtype, use_safetensors=True, trust_remote_code=trust
            )
        self.model = model.to(self.device).eval()
        self.eos_ids = _eos_ids(model.generation_config.eos_token_id, self.tokenizer.eos_token_id)
        self.pad_id = pad_token_id(self.tokenizer, eos_id=self.eos_ids[0])
        # Only our sampling applies: drop the checkpoint's sampling defaults (temperature, repetition penalty, ...).
        self.model.generation_config = HFGenerationConfig(eos_token_id=self.eos_ids, pad_token_id=self.pad_id)

    def generate(
        self, prompts: list[str], *, n: int, seeds: list[int], progress: Progress | None = None
    ) -> list[list[Sample]]:
        """samples[i][j]: response j to prompts[i]; prompt i's draws come from seeds[i] alone."""
        check_request(prompts, n, seeds)
        draws = 1 if self.cfg.temperature == 0 else n  # greedy: decode once, copy n times
        token_prompts = [render_prompt(self.tokenizer, p, self.cfg.system_prompt) for p in prompts]
        results: list[list[Sample]] = []
        for start in range(0, len(prompts), self.cfg.batch_size):
            stop = start + self.cfg.batch_size
            batch = self._generate_batch(token_prompts[start:stop], draws, seeds[start:stop])
            results += [row * (n // draws) for row in batch]
            if progress is not None:
                progress(len(results))
        return results

    @torch.no_grad()
    def _generate_batch(self, token_prompts: list[list[int]], n: int, seeds: list[int]) -> list[list[Sample]]:
        input_ids, attention_mask = left_pad(token_prompts, self.pad_id, n)  # (P*n, L) prompt-major
        sampler = SeededSampler(seeds, n, self.cfg.temperature, self.cfg.top_p, self.device)
        config = HFGenerationConfig(
            do_sample=False,
            max_new_tokens=self.cfg.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )
        sequences = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=config,
            logits_processor=LogitsProcessorList([sampler]),
        )
        new_tokens = sequences[:, input_ids.shape[1] :].cpu()  # (P*n, T), T <= max_new_tokens
        step_logps = torch.stack(sampler.step_logps, dim=1).cpu()  # (P*n, T)
        samples = [self._to_sample(new_tokens[r], step_logps[r]) for r in range(new_tokens.shape[0])]
        return [samples[i * n : (i + 1) * n] for i in range(len(token_prompts))]

    def _to_sample(self, tokens: torch.Tensor, logps: torch.Tensor) -> Sample:
        """Cut a row (T,) at its first EOS (kept in the count); rows without EOS ran to max_new_tokens."""
        is_eos = torch.isin(tokens, torch.tensor(self.eos_ids))
        stopped = bool(is_eos.any())
        n_tokens = int(is_eos.int().argmax()) + 1 if stopped else len(tokens)
        text = self.tokenizer.decode(tokens[:n_tokens], skip_special_tokens=True)
        return Sample(text, n_tokens, "stop" if stopped else "length", float(logps[:n_tokens].mean()))

    def close(self) -> None:
        """Drop the model; return accelerator memory."""
        self.model = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def left_pad(token_prompts: list[list[int]], pad_id: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt repeated n times (prompt-major), left-padded to the longest: ids and mask, both (P*n, L)."""
    length = max(len(ids) for ids in token_prompts)
    rows = [[pad_id] * (length - len(ids)) + ids for ids in token_prompts for _ in range(n)]
    masks = [[0] * (length - len(ids)) + [1] * len(ids) for ids in token_prompts for _ in range(n)]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)


def _eos_ids(config_eos: int | list[int] | None, tokenizer_eos: int | None) -> list[int]:
    """The checkpoint's EOS ids (int or list) plus the tokenizer's, deduplicated in order."""
    ids = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
    ids += [tokenizer_eos] if tokenizer_eos is not None else []
    if not ids:
        raise ValueError("the model has no EOS token id in its generation config or tokenizer")
    return list(dict.fromkeys(ids))
