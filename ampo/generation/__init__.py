"""Sampling N responses per prompt: one protocol, two backends (vLLM, transformers), chosen by `cfg.backend`.

    with make_generator(model_path, cfg.generation, cfg.runtime) as gen:
        samples = gen.generate(prompts, n=cfg.generation.n, seeds=[derive_seed(run, r, pid) for pid in ids])
        # samples[i][j]: the j-th response to prompts[i]

Prompts are user-message texts; the backend renders them with the tokenizer's chat template (plus
`cfg.system_prompt` when set) and the generation prompt. Both backends tokenize the same way, count tokens the same
way (generated tokens up to and including EOS) and report the same log-prob (raw model distribution, see `Sample`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

from ampo.config import GenerationConfig, RuntimeConfig
from ampo.models import resolve_device  # noqa: F401 - the backends' device, defined once in ampo.models

FinishReason = Literal["stop", "length"]
Progress = Callable[[int], None]  # called with the number of prompts done so far


@dataclass(frozen=True)
class Sample:
    """One generated response.

    n_tokens: generated tokens including the EOS token when the response stopped on it.
    finish_reason: "stop" (EOS) or "length" (max_new_tokens reached without EOS).
    logp_mean: mean over the n_tokens of log pi(token | prefix) under the raw model distribution (temperature 1,
        no top-p), i.e. length-normalised sequence log-prob; not the tempered/truncated sampling distribution.
    """

    text: str
    n_tokens: int
    finish_reason: FinishReason
    logp_mean: float | None


class Generator(Protocol):
    """Samples `n` responses for each prompt; `seeds[i]` seeds prompt i. Use as a context manager to free it."""

    def generate(
        self, prompts: list[str], *, n: int, seeds: list[int], progress: Progress | None = None
    ) -> list[list[Sample]]: ...

    def close(self) -> None: ...

    def swap_weights(self, model_path: str) -> bool:
        """Generate with the weights of `model_path` from now on, in place, when this generator can (the vLLM one,
        for a checkpoint that differs from its model only in weights); False, changing nothing, otherwise."""
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def derive_seed(run: str, round: int, prompt_id: str, base: int = 0) -> int:
    """A stable 31-bit seed for (run, round, prompt_id): blake2b, identical across processes and machines."""
    key = "\x1f".join([str(base), run, str(round), prompt_id]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") & 0x7FFFFFFF


def check_request(prompts: list[str], n: int, seeds: list[int]) -> None:
    """Raise ValueError for n < 1, a seed count that differs from the prompt count, or an empty prompt."""
    if n < 1:
        raise ValueError(f"n={n}: responses per prompt must be >= 1")
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt {i} is empty ({prompt!r}); every prompt needs text")


def render_prompt(tokenizer, prompt: str, system_prompt: str | None) -> list[int]:
    """Token ids of the chat-templated prompt with the assistant turn opened (no extra BOS: the template has it)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompts_over_context(model_path: str, prompts: list[str], cfg: GenerationConfig,
                         runtime: RuntimeConfig) -> tuple[int | None, dict[int, int]]:  # fmt: skip
    """(context, {i: token count}) of the prompts whose chat-templated tokens plus cfg.max_new_tokens exceed the context
    (vLLM: cfg.max_model_len when set; else the model config's max_position_embeddings; no limit without either).
    Loads the tokenizer and the config only, so it runs before any model is loaded or any sampling starts."""
    from transformers import AutoConfig, AutoTokenizer

    from ampo.models import quiet_loading

    trust = runtime.trust_remote_code
    with quiet_loading():
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust)
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust)
    context = (cfg.max_model_len if cfg.backend == "vllm" else None) or getattr(config, "max_position_embeddings", None)
    if context is None:
        return None, {}
    lengths = {i: len(render_prompt(tokenizer, p, cfg.system_prompt)) for i, p in enumerate(prompts)}
    return context, {i: n for i, n in lengths.items() if n + cfg.max_new_tokens > context}


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype for "auto": float32 on CPU (bf16 is ~4x slower on AVX2 CPUs), bfloat16 on GPU."""
    if dtype != "auto":
        return dtype
    return "float32" if device == "cpu" else "bfloat16"


def _make_vllm(model_path: str, cfg: GenerationConfig, runtime: RuntimeConfig) -> Generator:
    from ampo.generation.vllm_backend import VLLMGenerator

    return VLLMGenerator(model_path, cfg, runtime, max_model_len=cfg.max_model_len)


def _make_transformers(model_path: str, cfg: GenerationConfig, runtime: RuntimeConfig) -> Generator:
    from ampo.generation.hf import HFGenerator

    return HFGenerator(model_path, cfg, runtime)


# Keys equal GenerationConfig.backend's Literal values; backends import lazily (vllm is optional and slow to import).
BACKENDS: dict[str, Callable[[str, GenerationConfig, RuntimeConfig], Generator]] = {
    "vllm": _make_vllm,
    "transformers": _make_transformers,
}
assert set(BACKENDS) == set(get_args(GenerationConfig.model_fields["backend"].annotation)), (
    "BACKENDS != config"
)


def make_generator(model_path: str, cfg: GenerationConfig, runtime: RuntimeConfig) -> Generator:
    """The `cfg.backend` generator for the model folder (or hub name) `model_path`."""
    try:
        make = BACKENDS[cfg.backend]
    except KeyError:
        raise ValueError(
            f"unknown generation backend {cfg.backend!r}; choose from {sorted(BACKENDS)}"
        ) from None
    return make(model_path, cfg, runtime)
