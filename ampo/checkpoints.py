"""Checkpoints of a training run: rotating resumable states, the final HF-layout model, and its manifest.

Layout of a trainer's output folder (the folder is the checkpoint):
    config.json, model.safetensors, tokenizer files   the trained policy (transformers and vLLM load it)
    manifest.json                                     written last: a folder without it is never used
    state/step-{n}/                                   resumable state, no pickle (safetensors + JSON) +
                                                      trainer_state.json, the last 2 kept, removed once the
                                                      manifest is written
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from ampo.errors import MissingManifestError  # raised here; callers import it from here

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def write_json_atomic(path: Path, data: dict) -> Path:
    """Write JSON to a temporary name in the same folder (created if missing), fsync, then rename over `path`;
    returns `path`. The one atomic JSON writer (ampo.stages.context re-exports it without importing torch early)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def config_hash(payload: dict) -> str:
    """First 12 hex digits of the sha256 of a JSON payload (sorted keys)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- resumable training state


STATE_MODEL = "model.safetensors"  # the (unwrapped) model's tensors
STATE_OPTIMIZER = "optimizer.safetensors"  # the optimizer's per-parameter tensors ...
STATE_OPTIMIZER_META = "optimizer.json"  # ... and the rest of its state_dict: scalars, param_groups
STATE_SCHEDULER = "scheduler.json"  # the LR scheduler's state_dict (numbers only)
STATE_RNG = "rng-{index}.safetensors"  # one per process: torch CPU and CUDA generator states, numpy's key ...
STATE_RNG_META = "rng-{index}.json"  # ... and python's `random` state, numpy's position and cached gaussian
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")  # formats that unpickle when loaded
UNSUPPORTED_STATE = ("DEEPSPEED", "FSDP", "MEGATRON_LM")  # sharded states: no resumable state is written


class UnsafeStateError(ValueError):
    """A training state folder holding a pickle-based file: never loaded (a pickle can run code)."""


def save_training_state(accelerator, output_dir: Path, step: int, trainer_state: dict, *, model, optimizer,
                        scheduler, keep: int = 2) -> Path | None:
    """The resumable state after `step` optimizer steps into output_dir/state/step-{step}, without pickle: the
    model's and the optimizer's tensors as safetensors, everything else (optimizer param groups and scalars, the
    scheduler, python/numpy RNG, trainer_state.json) as JSON, and each process's RNG in its own pair of files.
    Written under a temporary name, renamed, older states pruned to `keep`.

    Under DeepSpeed, FSDP or Megatron (sharded states whose formats pickle) no state is written and None is
    returned: a crash there restarts that training from its first step."""
    if _unsupported(accelerator):
        log.warning("no resumable training state under %s (its state format pickles); a crash restarts training",
                    accelerator.distributed_type)
        return None
    from safetensors.torch import save_file, save_model

    root = Path(output_dir) / STATE_DIR
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, tmp / STATE_RNG.format(index=accelerator.process_index))
    write_json_atomic(tmp / STATE_RNG_META.format(index=accelerator.process_index), rng_meta)
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(tmp / STATE_MODEL))  # shared (tied) tensors saved once
        tensors, meta = _split_optimizer_state(optimizer.state_dict())
        save_file(tensors, tmp / STATE_OPTIMIZER)
        write_json_atomic(tmp / STATE_OPTIMIZER_META, meta)
        write_json_atomic(tmp / STATE_SCHEDULER, scheduler.state_dict())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / TRAINER_STATE, trainer_state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _state_dirs(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_training_state(accelerator, state_dir: Path, *, model, optimizer, scheduler) -> None:
    """Restore what save_training_state wrote: model, optimizer, scheduler and this process's RNG. A folder holding
    a pickle-based file (e.g. accelerate's custom_checkpoint_0.pkl, optimizer.bin) is refused, never opened."""
    from safetensors.torch import load_file, load_model

    state_dir = Path(state_dir)
    check_no_pickle(state_dir)
    rng = state_dir / STATE_RNG.format(index=accelerator.process_index)
    needed = [state_dir / name for name in (STATE_MODEL, STATE_OPTIMIZER, STATE_OPTIMIZER_META, STATE_SCHEDULER)]
    missing = [p.name for p in [*needed, rng] if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{state_dir} is not a complete training state (missing {missing}); delete "
                                f"{state_dir.parent} to restart this training from its first step")
    load_model(accelerator.unwrap_model(model), str(state_dir / STATE_MODEL), strict=True)
    meta = json.loads((state_dir / STATE_OPTIMIZER_META).read_text())
    optimizer.load_state_dict(_join_optimizer_state(load_file(state_dir / STATE_OPTIMIZER), meta))
    scheduler.load_state_dict(json.loads((state_dir / STATE_SCHEDULER).read_text()))
    rng_meta = json.loads((state_dir / STATE_RNG_META.format(index=accelerator.process_index)).read_text())
    _set_rng_state(load_file(rng), rng_meta)


def check_no_pickle(folder: Path) -> None:
    """Raise UnsafeStateError naming the pickle-based files under `folder` (any depth), before anything is read."""
    found = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if found:
        raise UnsafeStateError(
            f"{folder} holds pickle-based files {found}: ampo never loads pickle (it can run code). If this is a "
            f"state written by an older ampo, delete {Path(folder).parent} to restart this training from its first "
            f"step")


def _unsupported(accelerator) -> bool:
    kind = getattr(accelerator, "distributed_type", None)
    return getattr(kind, "value", str(kind)) in UNSUPPORTED_STATE


def _split_optimizer_state(state_dict: dict) -> tuple[dict, dict]:
    """An optimizer state_dict as (tensors by "param/name", the JSON rest with each tensor replaced by its key)."""
    tensors, state = {}, {}
    for param, entries in state_dict["state"].items():
        state[str(param)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                key = f"{param}/{name}"
                tensors[key] = value.detach().cpu().contiguous()
                state[str(param)][name] = {"tensor": key}
            else:
                state[str(param)][name] = value
    return tensors, {"state": state, "param_groups": state_dict["param_groups"]}


def _join_optimizer_state(tensors: dict, meta: dict) -> dict:
    state = {int(param): {name: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value else value
                          for name, value in entries.items()}
             for param, entries in meta["state"].items()}
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict, dict]:
    import random

    import numpy as np

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy/keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss = random.getstate()
    meta = {"python": [version, list(internal), gauss],
            "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["numpy/keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


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


def resolve_checkpoint(record: Mapping, places=None) -> str:
    """The path of a registered checkpoint ({"id", "path", "round"}, a `checkpoints` row), checked before anything
    reads it: every trained checkpoint (round >= 0) must be a folder with its manifest, and the manifest's id, when
    it names one, must be this checkpoint's. The run's initial policy (round -1: a prepared folder or a hub name)
    has no ampo manifest and is returned as registered. Raises MissingManifestError / FileNotFoundError /
    ValueError with the checkpoint named.

    A checkpoint registered by its s3:// URI is read through `places` (ampo.object_store.CheckpointPlaces, built
    from the run config by ampo.stages.context.checkpoint_places): the path returned is its local cached copy, and
    a prefix without its manifest (an unfinished upload) raises MissingManifestError.

    Every stage that loads a checkpoint (generate from the champion, reflogps, train's start, evaluate) and every
    promotion (the promote stage, `ampo promote`, `ampo rollback`) goes through here.
    """
    checkpoint_id, path = record["id"], str(record["path"])
    if record.get("round", 0) < 0:
        return path
    if path.startswith("s3://"):
        if places is None:
            raise ValueError(f"checkpoint {checkpoint_id!r} is on object storage ({path}); reading it needs the run "
                             f"config's checkpoints settings (ampo.stages.context.checkpoint_places)")
        try:
            path = places.local_copy(checkpoint_id, path)
        except FileNotFoundError as exc:
            raise type(exc)(f"checkpoint {checkpoint_id!r}: {exc}") from None
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
