"""Checkpoints of a training run: rotating resumable states, the final HF-layout model, and its manifest.

Layout of a trainer's output folder (the folder is the checkpoint):
    config.json, model.safetensors, tokenizer files   the trained policy (transformers and vLLM load it)
    manifest.json                                     written last: a folder without it is never used
    state/step-{n}/                                   accelerate state + trainer_state.json, the last 2 kept,
                                                      removed once the manifest is written
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

MANIFEST = "manifest.json"
STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class MissingManifestError(FileNotFoundError):
    """A checkpoint folder without its manifest: unfinished or foreign, never used."""


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary name in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def config_hash(payload: dict) -> str:
    """First 12 hex digits of the sha256 of a JSON payload (sorted keys)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- resumable training state


def save_training_state(accelerator, output_dir: Path, step: int, trainer_state: dict, *, keep: int = 2) -> Path:
    """accelerate state (model, optimizer, registered scheduler, RNG of every process) + trainer_state.json
    into output_dir/state/step-{step}: written under a temporary name, renamed, older states pruned to `keep`."""
    root = Path(output_dir) / STATE_DIR
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / TRAINER_STATE, trainer_state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _state_dirs(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _state_dirs(root: Path) -> list[Path]:
    """Complete state folders under root, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / TRAINER_STATE).is_file()]


def latest_training_state(output_dir: Path) -> Path | None:
    """The newest complete state folder of a run, or None."""
    dirs = _state_dirs(Path(output_dir) / STATE_DIR)
    return dirs[-1] if dirs else None


def read_trainer_state(state_dir: Path) -> dict:
    return json.loads((Path(state_dir) / TRAINER_STATE).read_text())


def remove_training_states(output_dir: Path) -> None:
    shutil.rmtree(Path(output_dir) / STATE_DIR, ignore_errors=True)


# ----------------------------------------------------------------------------- final checkpoint


def save_policy(accelerator, model, tokenizer, directory: Path, *, merge_lora: bool, dtype: torch.dtype) -> None:
    """The trained policy in HF layout (safetensors), loadable by transformers and vLLM without peft.

    A LoRA adapter is merged into the base weights first. Floating-point weights are cast to `dtype` (the
    parent checkpoint's dtype), so training in fp32 master weights does not double the checkpoint's size.
    """
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if merge_lora:
        unwrapped = unwrapped.merge_and_unload()
        state_dict = unwrapped.state_dict()
    else:
        state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        cast: dict[tuple, torch.Tensor] = {}  # by storage, so tied weights stay one tensor and are saved once
        state_dict = {k: cast.setdefault((v.data_ptr(), v.shape, v.stride()), v.to(dtype)) if v.is_floating_point() else v
                      for k, v in state_dict.items()}
        unwrapped.config.use_cache = True
        unwrapped.save_pretrained(directory, state_dict=state_dict, safe_serialization=True,
                                  save_function=accelerator.save)
        _set_config_dtype(directory, dtype)
        tokenizer.save_pretrained(directory)
    accelerator.wait_for_everyone()


def _set_config_dtype(directory: Path, dtype: torch.dtype) -> None:
    """Record the saved weights' dtype in config.json (transformers 5 writes `dtype`)."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_manifest(directory: Path, manifest: dict) -> Path:
    """manifest.json, atomically: the last file a checkpoint gets."""
    path = Path(directory) / MANIFEST
    write_json_atomic(path, manifest)
    return path


def resolve_checkpoint(record: Mapping) -> str:
    """The path of a registered checkpoint ({"id", "path", "round"}, a `checkpoints` row), checked before anything
    reads it: every trained checkpoint (round >= 0) must be a folder with its manifest, and the manifest's id, when
    it names one, must be this checkpoint's. The run's initial policy (round -1: a prepared folder or a hub name)
    has no ampo manifest and is returned as registered. Raises MissingManifestError / FileNotFoundError /
    ValueError with the checkpoint named.

    Every stage that loads a checkpoint (generate from the champion, reflogps, train's start, evaluate) and every
    promotion (the promote stage, `ampo promote`, `ampo rollback`) goes through here.
    """
    checkpoint_id, path = record["id"], str(record["path"])
    if record.get("round", 0) < 0:
        return path
    try:
        manifest = load_checkpoint_manifest(path)
    except FileNotFoundError as exc:
        raise type(exc)(f"checkpoint {checkpoint_id!r}: {exc}") from None
    if manifest.get("id") not in (None, checkpoint_id):
        raise ValueError(f"checkpoint {checkpoint_id!r}: {path} holds the manifest of {manifest['id']!r}, not its "
                         f"own; the registry and the folder disagree, so it is not used")
    return path


def load_checkpoint_manifest(path: str | Path) -> dict:
    """The manifest of a checkpoint folder. A folder without its manifest is never used: this raises for it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise MissingManifestError(
            f"{path} has no {MANIFEST}: the checkpoint is unfinished or was not written by ampo's trainer; "
            f"a folder without its manifest is never used")
    return json.loads(manifest.read_text())
