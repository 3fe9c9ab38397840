"""Evaluation metrics and gate decisions against hand-computed values."""

import numpy as np
import pytest

from ampo.config import Gates
from ampo.gates import decide, policy_metrics, win_rate


def test_win_rate_counts_ties_half():
    # diffs: +0.5 (win), 0 (tie), -1 (loss), +0.1 (win) -> (2 + 0.5) / 4 = 0.625
    assert win_rate(np.array([1.0, 0.5, 0.0, 0.3]), np.array([0.5, 0.5, 1.0, 0.2])) == pytest.approx(0.625)


def test_win_rate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal non-empty"):
        win_rate(np.ones(3), np.ones(2))


def test_policy_metrics_instruction_and_prompt_level():
    # prompt 0: instructions (strict, loose) = (T, T), (F, T); prompt 1: (F, F); prompt 2: none
    followed = [[(True, True), (False, True)], [(False, False)], []]
    m = policy_metrics(np.array([1.0, 0.0, 0.5]), np.array([10, 20, 30]), followed)
    # instruction level over 3 instructions: strict 1/3, loose 2/3
    assert m.instruction_strict == pytest.approx(1 / 3) and m.instruction_loose == pytest.approx(2 / 3)
    # prompt level over the 2 prompts with instructions: strict 0/2; loose: prompt 0 all loose -> 1/2
    assert m.prompt_strict == 0.0 and m.prompt_loose == 0.5
    assert (m.n_prompts, m.mean_reward, m.mean_length) == (3, 0.5, 20.0)


def test_policy_metrics_without_instructions_leaves_accuracy_empty():
    m = policy_metrics(np.array([0.2, 0.4]), np.array([5, 7]))
    assert m.instruction_strict is None and m.mean_reward == pytest.approx(0.3)


def test_decide_all_gates_pass_and_fail():
    champ = policy_metrics(np.array([0.5, 0.5]), np.array([100, 100]))
    cand = policy_metrics(np.array([0.7, 0.6]), np.array([150, 150]))
    gates = Gates(min_win_rate=0.5, min_reward_gain=0.1, max_length_ratio=1.4)
    d = decide(gates, cand, champ, wins=1.0)
    # gain = 0.65 - 0.5 = 0.15 >= 0.1 passes; ratio = 150/100 = 1.5 > 1.4 fails
    assert not d.passed
    assert d.reward_gain == pytest.approx(0.15) and d.length_ratio == pytest.approx(1.5)
    assert [r.endswith("pass") for r in d.reasons] == [True, True, False]
    assert decide(Gates(min_win_rate=0.5, min_reward_gain=0.1, max_length_ratio=2.0), cand, champ, 1.0).passed


def test_decide_with_no_gates_says_so():
    m = policy_metrics(np.array([0.5]), np.array([1]))
    d = decide(Gates(min_win_rate=None, max_length_ratio=None), m, m, 0.5)
    assert d.passed and "unconditionally" in d.reasons[0]
