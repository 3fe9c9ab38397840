"""Python reward functions for tests/test_rewards.py, imported by the python component as "rewards_fixture:<name>"."""


def word_count(prompts, responses):
    """Words / 10: "a b c" -> 0.3."""
    return [len(r.split()) / 10 for r in responses]


def nan_when_empty(prompts, responses):
    return [float("nan") if not r.strip() else 1.0 for r in responses]


def wrong_length(prompts, responses):
    return [0.0]


def not_a_number(prompts, responses):
    return ["high" for _ in responses]


NOT_CALLABLE = 3
