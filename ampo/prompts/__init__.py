"""Where prompts come from: the training source of each round, and the held-out evaluation sources.

Training: `training_prompts(cfg, round)` dispatches on `cfg.source` through TRAINING_SOURCES. Evaluation:
`eval_prompts(eval_cfg, prompts_cfg, unsupported=...)` through EVAL_SOURCES. The IFBench test set is only ever an
evaluation source: the training path refuses its file (by resolved path or content hash) and any prompt whose text is
one of its prompts. This package knows nothing of the checkers: the caller says which instructions cannot be checked
here (ampo.rewards.verifiable.unsupported_instructions), so prompts never import rewards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from ampo.config import EvalConfig, PromptsConfig
from ampo.prompts.generator import (
    generated_prompt,
    generated_prompts,
    generated_round,
    generator_space,
    heldout_prompts,
)
from ampo.prompts.prompt import PROMPT_ID_PATTERN, Prompt
from ampo.prompts.sources import (
    ifbench_test_path,
    ifbench_test_prompts,
    read_datasets,
    read_jsonl,
    reject_benchmark_file,
    reject_benchmark_prompts,
)

__all__ = [
    "EVAL_SOURCES",
    "PROMPT_ID_PATTERN",
    "TRAINING_SOURCES",
    "Prompt",
    "eval_prompts",
    "generated_prompt",
    "generated_prompts",
    "generator_space",
    "heldout_prompts",
    "ifbench_test_path",
    "ifbench_test_prompts",
    "read_datasets",
    "read_jsonl",
    "round_slice",
    "training_prompts",
]

log = logging.getLogger(__name__)


def training_prompts(cfg: PromptsConfig, round: int) -> list[Prompt]:
    """The `cfg.per_round` training prompts of round `round` (0-based); the same list every time it is asked."""
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round must be an integer >= 0, got {round!r}")
    prompts = TRAINING_SOURCES[cfg.source](cfg, round)
    reject_benchmark_prompts(prompts)
    return prompts


def round_slice(prompts: list[Prompt], round: int, per_round: int, name: str) -> list[Prompt]:
    """Prompts (round * per_round + j) mod n for j < per_round: a file is walked in order and wraps into a new epoch."""
    n = len(prompts)
    if per_round > n:
        raise ValueError(f"prompts.per_round={per_round} exceeds the {n} prompts in {name}; a round cannot hold "
                         "the same prompt twice")
    start = round * per_round
    if (start + per_round - 1) // n > 0:
        log.warning("round %d wraps around %s (%d prompts): now in epoch %d, prompts repeat from earlier rounds",
                    round, name, n, (start + per_round - 1) // n)
    return [prompts[(start + j) % n] for j in range(per_round)]


def _generated(cfg: PromptsConfig, round: int) -> list[Prompt]:
    return generated_round(cfg.seed, round, cfg.per_round, cfg.heldout)


def _jsonl(cfg: PromptsConfig, round: int) -> list[Prompt]:
    reject_benchmark_file(cfg.path)
    return round_slice(read_jsonl(cfg.path), round, cfg.per_round, cfg.path)


def _datasets(cfg: PromptsConfig, round: int) -> list[Prompt]:
    reject_benchmark_file(cfg.path)
    return round_slice(read_datasets(cfg.path), round, cfg.per_round, cfg.path)


TRAINING_SOURCES: dict[str, Callable[[PromptsConfig, int], list[Prompt]]] = {
    "generated": _generated,
    "jsonl": _jsonl,
    "datasets": _datasets,
}


def eval_prompts(cfg: EvalConfig, prompts_cfg: PromptsConfig, *,
                 unsupported: Mapping[str, str] | None = None) -> dict[str, list[Prompt]]:
    """{source: its first `cfg.max_prompts` prompts} for each of `cfg.sources`; never a training slice.

    unsupported: {instruction id: why its checker cannot run here}; IFBench prompts carrying one are left out (and
    counted in the log). None: every instruction is taken as checkable.
    """
    unsupported = dict(unsupported or {})
    return {source: EVAL_SOURCES[source](cfg, prompts_cfg, unsupported)[: cfg.max_prompts]
            for source in cfg.sources}


def _ifbench_eval(cfg: EvalConfig, prompts_cfg: PromptsConfig, unsupported: Mapping[str, str]) -> list[Prompt]:
    """IFBench test prompts whose checkers all run here; the others are logged with their count and left out."""
    prompts = ifbench_test_prompts()
    kept = [p for p in prompts if not unsupported.keys() & set(p.instruction_id_list)]
    if len(kept) < len(prompts):
        log.info("IFBench: %d of %d test prompts left out: they carry instructions whose checkers cannot run here "
                 "(%s)", len(prompts) - len(kept), len(prompts), ", ".join(sorted(unsupported)))
    return kept


def _heldout_eval(cfg: EvalConfig, prompts_cfg: PromptsConfig, unsupported: Mapping[str, str]) -> list[Prompt]:
    if prompts_cfg.heldout == 0:
        raise ValueError("eval source 'heldout' needs prompts.heldout > 0 generated prompts reserved for evaluation")
    return heldout_prompts(prompts_cfg.seed, prompts_cfg.heldout)


def _jsonl_eval(cfg: EvalConfig, prompts_cfg: PromptsConfig, unsupported: Mapping[str, str]) -> list[Prompt]:
    if not cfg.path:
        raise ValueError("eval source 'jsonl' needs eval.path")
    return read_jsonl(cfg.path)


EVAL_SOURCES: dict[str, Callable[[EvalConfig, PromptsConfig, Mapping[str, str]], list[Prompt]]] = {
    "ifbench": _ifbench_eval,
    "heldout": _heldout_eval,
    "jsonl": _jsonl_eval,
}
