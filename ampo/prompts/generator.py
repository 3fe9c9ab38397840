"""The built-in, seeded generator of verifiable instruction prompts: a task about a topic plus 1-3 IFEval constraints.

Index space. Every index i in [0, generator_space()) names one prompt, the same for a given seed on every machine
and in every version that keeps catalog.py unchanged. A seeded Feistel permutation of the indices (so consecutive
indices look unrelated) feeds mixed-radix digits (60 tasks x 80 topics x k in {1, 2, 3} constraints x r < C), with
C = len(CONSTRAINTS) = 21. Within one (task, topic, k), r picks the constraint set (r + h) mod (number of
conflict-free k-subsets), where h is a seeded hash of (task, topic, k): since every k has at least C subsets, distinct
r give distinct sets, so distinct indices give distinct (task, topic, constraint ids) and hence distinct texts. With
k = 1 every instruction id is equally likely. Each set's kwargs variant is a seeded hash of (task, topic, set).
Training rounds take [r * per_round, (r + 1) * per_round); held-out prompts take the END of the space
[space - heldout, space), a disjoint range that training refuses to enter.
"""

from __future__ import annotations

import functools
import itertools

from ampo.prompts.catalog import CONFLICTS, CONSTRAINTS, TASKS, TOPICS
from ampo.prompts.prompt import Prompt

MAX_CONSTRAINTS = 3  # 1 to 3 constraints per prompt, in equal shares
_M64 = (1 << 64) - 1


def generator_space() -> int:
    """How many distinct prompts one seed can produce: tasks x topics x MAX_CONSTRAINTS x len(CONSTRAINTS)."""
    return len(TASKS) * len(TOPICS) * MAX_CONSTRAINTS * len(CONSTRAINTS)


def generated_prompt(seed: int, index: int) -> Prompt:
    """Prompt number `index` of the generator seeded with `seed`; its id is "gen-{seed}-{index}"."""
    space = generator_space()
    if not isinstance(index, int) or not 0 <= index < space:
        raise ValueError(f"generator index {index!r} is outside [0, {space})")
    digits, r = divmod(_permute(index, space, seed), len(CONSTRAINTS))
    digits, k = divmod(digits, MAX_CONSTRAINTS)
    task, topic = divmod(digits, len(TOPICS))
    combos = _combos(k + 1)
    combo = combos[(r + _hash64(seed, task, topic, k)) % len(combos)]
    specs = [CONSTRAINTS[c] for c in combo]
    choice = _hash64(seed, task, topic, *combo)
    kwargs = []
    for spec in specs:  # mixed radix over the variants of each constraint in the set
        choice, v = divmod(choice, len(spec.variants))
        kwargs.append(_copy(spec.variants[v]))
    text = " ".join([TASKS[task].format(topic=TOPICS[topic])] + [sp.render(kw) for sp, kw in zip(specs, kwargs)])
    return Prompt(f"gen-{seed}-{index}", text, [sp.instruction_id for sp in specs], kwargs)


def generated_prompts(seed: int, start: int, count: int) -> list[Prompt]:
    """Prompts number start .. start+count-1 of the generator seeded with `seed`."""
    space = generator_space()
    if not isinstance(start, int) or not isinstance(count, int) or start < 0 or count < 0 or start + count > space:
        raise ValueError(f"generator range start={start!r}, count={count!r} must lie inside [0, {space})")
    return [generated_prompt(seed, i) for i in range(start, start + count)]


def heldout_prompts(seed: int, count: int) -> list[Prompt]:
    """The `count` held-out prompts: the last indices of the space, never handed out for training."""
    return generated_prompts(seed, generator_space() - count, count)


def generated_round(seed: int, round: int, per_round: int, heldout: int) -> list[Prompt]:
    """Round `round`'s training prompts: indices [round * per_round, (round + 1) * per_round)."""
    start, limit = round * per_round, generator_space() - heldout
    if start + per_round > limit:
        raise ValueError(f"round {round} with per_round={per_round} needs generator indices up to "
                         f"{start + per_round}, past the {limit} training prompts before the held-out range")
    return generated_prompts(seed, start, per_round)


@functools.cache
def _combos(k: int) -> tuple[tuple[int, ...], ...]:
    """All conflict-free k-subsets of CONSTRAINTS, as index tuples in catalog order (at least C of them)."""
    ids = [spec.instruction_id for spec in CONSTRAINTS]
    combos = tuple(c for c in itertools.combinations(range(len(CONSTRAINTS)), k)
                   if not any(frozenset((ids[a], ids[b])) in CONFLICTS for a, b in itertools.combinations(c, 2)))
    assert len(combos) >= len(CONSTRAINTS), f"only {len(combos)} conflict-free {k}-subsets; r needs {len(CONSTRAINTS)}"
    return combos


def _permute(i: int, n: int, seed: int) -> int:
    """A seeded bijection of [0, n): a 4-round Feistel network on 2^(2h) >= n values, cycle-walked into [0, n)."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for rnd in range(4):
            left, right = right, left ^ (_hash64(seed, rnd, right) & mask)
        x = (left << half) | right
        if x < n:
            return x


def _hash64(*parts: int) -> int:
    """splitmix64 folded over integer parts (negative ones taken mod 2^64)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _M64
        h ^= h >> 31
    return h


def _copy(kwargs: dict) -> dict:
    return {k: list(v) if isinstance(v, list) else v for k, v in kwargs.items()}
