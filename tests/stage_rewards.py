"""Python reward functions for tests/test_stages.py (component function "stage_rewards:<name>")."""


def nan_for_every_other(prompts, responses):
    """1.0 for even positions, NaN for odd ones: half of every 6-response pool is non-finite."""
    return [float("nan") if i % 2 else 1.0 for i in range(len(responses))]


def instruction_count(prompts, responses):
    """The number of instructions each response's prompt carries: shows which prompt a reward was given."""
    return [float(len(p.instruction_id_list)) + 0.5 * sum(len(k) for k in p.kwargs) for p in prompts]


def fails_on_first_prompt(prompts, responses):
    """instruction_count, but an error for any batch holding round 0's first generated prompt (gen-0-0)."""
    if any(p.prompt_id == "gen-0-0" for p in prompts):
        raise ValueError("stage_rewards.fails_on_first_prompt fails on the first prompt (gen-0-0)")
    return instruction_count(prompts, responses)
