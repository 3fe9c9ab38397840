"""Python reward functions for tests/test_stages.py (component function "stage_rewards:<name>")."""


def nan_for_every_other(prompts, responses):
    """1.0 for even positions, NaN for odd ones: half of every 6-response pool is non-finite."""
    return [float("nan") if i % 2 else 1.0 for i in range(len(responses))]


def instruction_count(prompts, responses):
    """The number of instructions each response's prompt carries: shows which prompt a reward was given."""
    return [float(len(p.instruction_id_list)) + 0.5 * sum(len(k) for k in p.kwargs) for p in prompts]
