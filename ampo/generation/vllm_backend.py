"""vLLM backend: the offline `LLM` engine in this process, one `SamplingParams(seed=...)` per prompt.

Per-request seeds make a prompt's samples independent of its batch neighbours (vLLM gives each seeded request its
own torch.Generator; child j of an n-sample request uses seed + j). On CPU, vLLM rewinds a request's generator with
`Generator.set_offset` whenever it discards a token sampled at the end of a partial (chunked) prefill, which the
CPU generator does not support ("CPU Generator does not use offset"): on CPU the engine therefore runs with
chunked prefill off, so every prefill fits one step. On GPU the default scheduler is kept.

Threads on CPU (see `ampo.threads`): the engine computes with every usable core (or OMP_NUM_THREADS when set), and
closing it gives the process back the real `torch.set_num_threads` and its earlier thread count, which vLLM's CPU
worker would otherwise leave replaced by a no-op for the rest of the process.

Top-p on CPU (`generation.cpu_top_p`): vLLM's CPU sampler sorts the whole vocabulary of every row at every step to
find the nucleus; by default ampo has it take the nucleus from each row's largest tokens instead
(`ampo.generation.top_p`: the same masks, so the same samples; rows it cannot decide go to vLLM's sort).
"""

from __future__ import annotations

import contextlib
import os

from ampo.config import GenerationConfig, RuntimeConfig
from ampo.generation import (
    Generator,
    Progress,
    Sample,
    check_request,
    render_prompt,
    resolve_device,
    resolve_dtype,
    top_p,
)
from ampo.threads import engine_threads, remember_torch_threads, restore_torch_threads

CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process (no __main__ guard needed)
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache
    "VLLM_NO_USAGE_STATS": "1",
}
PROGRESS_CHUNK = 64  # prompts per engine call when a progress callback is given (one call otherwise)


class VLLMGenerator(Generator):
    """vLLM `LLM` over a local HF folder; fp32 and eager on CPU, bf16 on GPU when dtype is "auto"."""

    def __init__(
        self,
        model_path: str,
        cfg: GenerationConfig,
        runtime: RuntimeConfig,
        *,
        max_model_len: int | None = None,
        manage_threads: bool = True,
    ):
        """manage_threads=False leaves the engine's thread count to vLLM (the benchmark's baseline arm)."""
        from ampo.models import check_safetensors, require_safetensors

        require_safetensors(model_path)  # never a pickle-based .bin (vLLM would load one under "auto")
        self.cfg = cfg
        self.device = resolve_device(runtime.device)
        if self.device == "cpu":
            for key, value in CPU_ENV.items():
                os.environ.setdefault(key, value)  # read by vllm at import time
        from vllm import LLM

        self._torch_threads = remember_torch_threads()  # close() restores it (the CPU engine changes it)
        check_safetensors(model_path)  # a truncated file: one error naming it
        manage = manage_threads and self.device == "cpu"
        if self.device == "cpu":
            use_candidate_top_p(cfg.cpu_top_p == "candidates")
        with engine_threads() if manage else contextlib.nullcontext():
            self.llm = LLM(model=model_path, **engine_args(cfg, runtime, self.device, max_model_len))
        self.tokenizer = self.llm.get_tokenizer()
        self.model_path = model_path

    def swap_weights(self, model_path: str) -> bool:
        """Load the weights of `model_path` into this engine in place (vLLM's `reload_weights`), when that folder
        holds the same model as the loaded one but for its weights (ampo.models.differs_only_in_weights: config,
        tokenizer and generation config byte-equal, as a trained checkpoint and its parent are); then drop the prefix
        cache, whose KV the old weights computed. The engine's start (seconds on CPU, more with CUDA graphs) is
        saved; the samples are those of a new engine. Returns False, changing nothing, for any other model."""
        from ampo.models import differs_only_in_weights

        # differs_only_in_weights reads every safetensors header of both folders (a truncated file: an error naming
        # it) and needs the same non-empty set of tensors: the checks the engine's start makes (check_safetensors,
        # require_safetensors) hold for `model_path` when it is True
        if self.llm is None or not differs_only_in_weights(self.model_path, model_path):
            return False
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_path)})
        self.model_path = model_path
        if not self.llm.reset_prefix_cache():  # vLLM refuses while requests run; none do between generate calls
            raise RuntimeError(f"vLLM kept its prefix cache after loading {model_path}: its cached KV blocks are the "
                               "old weights'; close this generator and start a new one")  # fmt: skip
        return True

    def generate(
        self, prompts: list[str], *, n: int, seeds: list[int], progress: Progress | None = None
    ) -> list[list[Sample]]:
        """samples[i][j]: response j to prompts[i]; prompt i's draws come from seeds[i] alone."""
        from vllm import SamplingParams

        check_request(prompts, n, seeds)
        draws = 1 if self.cfg.temperature == 0 else n  # vLLM refuses greedy with n > 1: copy the one answer
        requests = [
            {"prompt_token_ids": render_prompt(self.tokenizer, p, self.cfg.system_prompt)} for p in prompts
        ]
        params = [
            SamplingParams(
                n=draws,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                max_tokens=self.cfg.max_new_tokens,
                logprobs=0,  # the chosen token's log-prob (raw model distribution: logprobs_mode="raw_logprobs")
                seed=seed,
                detokenize=False,  # decoded below with the tokenizer, as the transformers backend does
            )
            for seed in seeds
        ]
        chunk = PROGRESS_CHUNK if progress is not None else max(len(prompts), 1)
        results: list[list[Sample]] = []
        for start in range(0, len(prompts), chunk):
            outputs = self.llm.generate(
                requests[start : start + chunk], params[start : start + chunk], use_tqdm=False
            )
            results += [[to_sample(c, self.tokenizer) for c in out.outputs] * (n // draws) for out in outputs]
            if progress is not None:
                progress(len(results))
        return results

    def close(self) -> None:
        """Shut the engine down and free its memory, so another engine can start in this process."""
        if getattr(self, "llm", None) is None:
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        cleanup_dist_env_and_memory()  # unfreezes vLLM's frozen objects and collects them (0.55 s: no second gc here)
        restore_torch_threads(self._torch_threads)  # later stages here (ref log-probs, training) use all cores


def engine_args(
    cfg: GenerationConfig, runtime: RuntimeConfig, device: str, max_model_len: int | None
) -> dict:
    """Keyword arguments for `vllm.LLM` on `device` (see the module docstring for the CPU scheduler choice)."""
    args = {
        "dtype": resolve_dtype(cfg.dtype, device),
        "seed": 0,  # sampling is seeded per request; this seeds only unseeded requests
        "trust_remote_code": runtime.trust_remote_code,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "enforce_eager": cfg.enforce_eager or device == "cpu",
        "max_model_len": max_model_len,
        "logprobs_mode": "raw_logprobs",
        "load_format": "safetensors",  # never pickle-based weights, for a hub name too
    }
    if device == "cpu":
        args["enable_chunked_prefill"] = False
        if max_model_len is not None:
            args["max_num_batched_tokens"] = max(max_model_len, 2048)
    else:
        args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    return args


def use_candidate_top_p(on: bool) -> None:
    """Route vLLM's CPU top-p step through `ampo.generation.top_p.top_p_mask` (on) or back to vLLM's own sort
    (off). It is a module function of vLLM's sampler, so this holds for every engine in the process from the next
    step on; top-k requests and non-CPU tensors always take vLLM's path."""
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    original = getattr(ops.apply_top_k_top_p_pytorch, "__wrapped__", ops.apply_top_k_top_p_pytorch)
    if not on:
        ops.apply_top_k_top_p_pytorch = original
        return

    def apply_top_k_top_p_pytorch(logits, k, p, allow_cpu_sync: bool = False):
        if k is not None or p is None or logits.device.type != "cpu":
            return original(logits, k, p, allow_cpu_sync)
        return top_p.top_p_mask(logits, p, lambda rows, rows_p: original(rows, None, rows_p, allow_cpu_sync))

    apply_top_k_top_p_pytorch.__wrapped__ = original
    ops.apply_top_k_top_p_pytorch = apply_top_k_top_p_pytorch


def to_sample(completion, tokenizer) -> Sample:
    """A vLLM CompletionOutput as a Sample: token count includes EOS, logp_mean over the generated tokens.

    The text is decoded from all the token ids (vLLM's incremental detokenizer holds back a trailing partial UTF-8
    character, which would make the two backends' texts differ)."""
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(
            f"vLLM finished a request with {completion.finish_reason!r}; expected 'stop' or 'length'"
        )
    tokens = list(completion.token_ids)
    logps = [step[token].logprob for step, token in zip(completion.logprobs or [], tokens)]
    logp_mean = sum(logps) / len(logps) if logps and len(logps) == len(tokens) else None
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return Sample(text, len(tokens), completion.finish_reason, logp_mean)
