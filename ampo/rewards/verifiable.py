"""Verifiable instruction following as a reward: IFEval and IFBench checkers from the `if-verifiable` package.

A prompt carries instruction ids and their kwargs; a response's score is the fraction of those instructions it
follows, strict (the response as is) or loose (IFEval's loose: any of the response variants with the first line,
the last line or both removed, with or without '*', passes). Checkers that need NLTK data which is not installed
are unsupported: a prompt carrying one is an error, never a silent 0. Unknown ids are an error too.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import numpy as np

from ampo.config import RewardComponent, RuntimeConfig
from ampo.prompts import Prompt

log = logging.getLogger(__name__)

# Checkers that call NLTK tokenizers, taggers or corpora (read from if_verifiable's source), and the data they need.
NLTK_NEEDS: dict[str, tuple[str, ...]] = {
    "length_constraints:number_sentences": ("tokenizers/punkt_tab/english/",),  # count_sentences: punkt
    "change_case:capital_word_frequency": ("tokenizers/punkt_tab/english/",),  # word_tokenize
    "ratio:stop_words": ("corpora/stopwords",),  # stopwords.words("english")
    "words:start_verb": ("tokenizers/punkt_tab/english/", "taggers/averaged_perceptron_tagger_eng/"),  # pos_tag
    "words:words_position": ("tokenizers/punkt_tab/english/",),  # word_tokenize
    "words:keywords_specific_position": ("tokenizers/punkt_tab/english/",),  # word_tokenize
    "format:title_case": ("tokenizers/punkt_tab/english/",),  # word_tokenize
}
CHECKER_ERRORS = (IndexError, ZeroDivisionError)  # raised by some checkers on degenerate text: counted as not followed


class InstructionCheck(NamedTuple):
    instruction_id: str
    strict: bool
    loose: bool


@functools.cache
def instruction_registry() -> dict[str, type]:
    """IFEval's and IFBench's checker classes by instruction id (imported on first use; no NLTK downloads)."""
    import langdetect
    import nltk
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT as ifeval

    real_download, nltk.download = nltk.download, _refuse_download  # ifbench downloads NLTK data at import
    try:
        from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT as ifbench
    finally:
        nltk.download = real_download
    if langdetect.DetectorFactory.seed is None:
        langdetect.DetectorFactory.seed = 0  # language checks are random otherwise
    assert not ifeval.keys() & ifbench.keys(), f"ids in both registries: {ifeval.keys() & ifbench.keys()}"
    return {**ifeval, **ifbench}


def _refuse_download(name: str, *args, **kwargs) -> bool:
    log.debug("not downloading NLTK data %r (no downloads at run time)", name)
    return False


@functools.cache
def unsupported_instructions() -> dict[str, str]:
    """{instruction id: why its checker cannot run here}: those whose NLTK data `nltk.data.find` cannot find."""
    import nltk

    def missing(resources: tuple[str, ...]) -> list[str]:
        out = []
        for resource in resources:
            try:
                nltk.data.find(resource)
            except LookupError:
                out.append(resource.split("/")[1])
        return out

    return {iid: f"needs NLTK {' and '.join(gone)} data, which no installed package ships (nltk.data.find finds none)"
            for iid, needs in NLTK_NEEDS.items() if (gone := missing(needs))}


def supported_instructions() -> list[str]:
    """Every instruction id whose checker runs here, sorted."""
    return sorted(instruction_registry().keys() - unsupported_instructions().keys())


def build_checkers(prompt: Prompt) -> list:
    """One built checker per instruction of `prompt`; a clear ValueError for unsupported, unknown or bad kwargs."""
    registry, unsupported = instruction_registry(), unsupported_instructions()
    checkers = []
    for iid, kwargs in zip(prompt.instruction_id_list, prompt.kwargs):
        where = f"instruction {iid!r} of prompt {prompt.prompt_id!r}"
        if iid in unsupported:
            raise ValueError(f"{where} is unsupported here: {unsupported[iid]}")
        if iid not in registry:
            raise ValueError(f"unknown {where}; supported ids are IFEval's and IFBench's, e.g. "
                             "'punctuation:no_comma' or 'count:word_count_range' (see supported_instructions())")
        checker = registry[iid](iid)
        given = {k: v for k, v in kwargs.items() if v is not None}
        try:
            checker.build_description(**given)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: kwargs {given} do not fit its checker, which takes "
                             f"{checker.get_instruction_args_keys()}: {e}") from e
        drawn = sorted(k for k, v in (checker.get_instruction_args() or {}).items() if v is not None and k not in given)
        if drawn:
            raise ValueError(f"{where} lacks kwargs {drawn}; its checker would draw them at random")
        try:  # kwargs can pass build_description and still leave the check broken (e.g. a ratio without its text)
            checker.check_following("A short probe sentence.")
        except (TypeError, AttributeError) as e:
            raise ValueError(f"{where}: kwargs {given} leave its checker unable to check a response "
                             f"({type(e).__name__}: {e})") from e
        except Exception:  # noqa: BLE001, S110 - any other outcome on the probe text says nothing about the kwargs
            pass
        checkers.append(checker)
    return checkers


def follows(checker, response: str) -> tuple[bool, bool]:
    """(strict, loose) for one built checker; `response` has its thinking block removed already."""
    from if_verifiable.common import get_loose_transformations

    def check(text: str) -> bool:
        if not text.strip():
            return False
        try:
            return bool(checker.check_following(text))
        except CHECKER_ERRORS as e:
            log.warning("checker %s failed on a response (%s: %s); counted as not followed",
                        type(checker).__name__, type(e).__name__, e)
            return False

    return check(response), any(check(v) for v in get_loose_transformations(response))


def check_instructions(prompt: Prompt, response: str, checkers: list | None = None) -> list[InstructionCheck]:
    """Per instruction of `prompt`: (id, strict, loose) for `response`. IFEval's instruction-level results."""
    from if_verifiable.common import strip_thinking

    checkers = build_checkers(prompt) if checkers is None else checkers
    response = strip_thinking(response)
    return [InstructionCheck(iid, *follows(c, response)) for iid, c in zip(prompt.instruction_id_list, checkers)]


def following_metrics(prompts: list[Prompt], responses: list[str]) -> dict[str, float]:
    """IFEval accuracies: prompt-level (all instructions followed) and instruction-level, strict and loose."""
    results = [check_instructions(p, r) for p, r in zip(prompts, responses, strict=True) if p.instruction_id_list]
    if not results:
        raise ValueError("no prompt carries instructions; following accuracy is undefined")
    flat = [c for res in results for c in res]
    return {
        "following/prompt_strict": float(np.mean([all(c.strict for c in res) for res in results])),
        "following/prompt_loose": float(np.mean([all(c.loose for c in res) for res in results])),
        "following/instruction_strict": float(np.mean([c.strict for c in flat])),
        "following/instruction_loose": float(np.mean([c.loose for c in flat])),
    }


class VerifiableReward:
    """Fraction of each prompt's instructions the paired response follows (strict or loose), (n,) in [0, 1].

    A prompt without instructions scores 0.0 for every response (a per-prompt constant, which leaves the ranking
    within its group unchanged) and is counted in `last_counts["uninstructed"]`; RewardStack refuses such prompts
    when every component is verifiable.
    """

    def __init__(self, mode: str):
        self.mode = mode
        self.last_counts: dict[str, int] = {}

    def validate(self, prompts: list[Prompt]) -> None:
        for p in _unique(prompts):
            build_checkers(p)

    def __call__(self, prompts: list[Prompt], responses: list[str]) -> np.ndarray:
        checkers = {id(p): build_checkers(p) for p in _unique(prompts)}  # validates every prompt before scoring
        scores = np.zeros(len(responses), dtype=np.float64)  # (n,)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            if p.instruction_id_list:
                results = check_instructions(p, r, checkers[id(p)])
                scores[i] = np.mean([getattr(c, self.mode) for c in results])
        self.last_counts = {"uninstructed": sum(not p.instruction_id_list for p in prompts)}
        return scores


def make_verifiable_reward(component: RewardComponent, runtime: RuntimeConfig) -> VerifiableReward:
    return VerifiableReward(component.mode)


def _unique(prompts: list[Prompt]) -> list[Prompt]:
    return list({id(p): p for p in prompts}.values())
