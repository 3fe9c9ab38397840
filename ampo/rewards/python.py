"""A user's Python function as a reward: "module:function" taking (prompts, responses), returning one float each."""

from __future__ import annotations

import importlib
import numbers
import os
import sys

import numpy as np

from ampo.config import RewardComponent, RuntimeConfig
from ampo.prompts import Prompt


class RewardFunctionError(RuntimeError):
    """A user's reward function raised; the message names the function and its exception."""


class PythonReward:
    """Calls `function(prompts, responses)`; checks it returns one real number per response. Returns (n,) float64."""

    def __init__(self, spec: str):
        module_name, _, attr = spec.partition(":")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())  # as `python -m` does: the `ampo` script finds ./my_rewards.py too
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"python reward {spec!r}: cannot import module {module_name!r} ({e})") from e
        self.fn = getattr(module, attr, None)
        if not callable(self.fn):
            raise ValueError(f"python reward {spec!r}: module {module_name!r} has no callable {attr!r}")
        self.spec = spec
        self.last_counts: dict[str, int] = {}

    def validate(self, prompts: list[Prompt]) -> None:
        pass

    def __call__(self, prompts: list[Prompt], responses: list[str]) -> np.ndarray:
        try:
            values = list(self.fn(prompts, responses))
        except Exception as exc:  # the user's code: name it and what it raised (the traceback stays chained)
            raise RewardFunctionError(f"python reward {self.spec!r} raised {type(exc).__name__}: {exc}") from exc
        if len(values) != len(responses):
            raise ValueError(f"python reward {self.spec!r} returned {len(values)} values for {len(responses)} responses")
        for i, v in enumerate(values):
            if not isinstance(v, numbers.Real):
                raise ValueError(f"python reward {self.spec!r} returned {v!r} ({type(v).__name__}) for response {i} "
                                 f"of prompt {prompts[i].prompt_id!r}; it must return real numbers")
        return np.asarray(values, dtype=np.float64)


def make_python_reward(component: RewardComponent, runtime: RuntimeConfig) -> PythonReward:
    return PythonReward(component.function)
