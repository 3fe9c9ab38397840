"""Training data: selected response groups, their tokenisation, the seeded step plan and micro-batch collation.

A `Group` is one prompt's selected responses. The trainer tokenises every group once, drops the groups the loss
cannot learn from, plans the optimizer steps from the seed (so a resumed run sees the same order), and collates
each micro-batch into padded (B, M) tensors for the loss plus a flat list of sequences for the forward.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ampo.logps import Example, ForwardMode, ResponseSpan, build_group


@dataclass(frozen=True)
class Group:
    """One prompt's selected responses: K texts with rewards, roles and (optionally) reference log-probs."""

    prompt_id: str
    prompt: str
    responses: list[str]
    rewards: list[float]
    chosen: list[bool]  # role: True = chosen (Y+), False = rejected (Y-)
    ref_logp_sum: list[float] | None = None  # reference log-probs, summed over response tokens (spec 1.1)
    ref_logp_mean: list[float] | None = None  # and length-normalised

    def __post_init__(self):
        k = len(self.responses)
        if k == 0:
            raise ValueError(f"group {self.prompt_id!r} has no responses")
        for name in ("rewards", "chosen", "ref_logp_sum", "ref_logp_mean"):
            values = getattr(self, name)
            if values is not None and len(values) != k:
                raise ValueError(f"group {self.prompt_id!r}: {name} has {len(values)} entries for {k} responses")
        bad = [r for r in self.rewards if not math.isfinite(r)]
        if bad:
            raise ValueError(f"group {self.prompt_id!r}: rewards must be finite, got {bad[:3]}")

    @property
    def size(self) -> int:
        return len(self.responses)

    def best_vs_worst_members(self) -> list[int]:
        """Indices of the pair a pairwise loss (DPO, SimPO) trains on: the highest-reward chosen member and the
        lowest-reward rejected one, ties to the lower index. Every member when the group has two members or lacks
        a role (the loss then finds it untrainable and it is counted as skipped)."""
        chosen = [i for i, c in enumerate(self.chosen) if c]
        rejected = [i for i, c in enumerate(self.chosen) if not c]
        if len(self.responses) == 2 or not chosen or not rejected:
            return list(range(self.size))
        return [max(chosen, key=lambda i: (self.rewards[i], -i)), min(rejected, key=lambda i: (self.rewards[i], i))]

    def best_vs_worst(self) -> Group:
        """The group reduced to `best_vs_worst_members` (itself when that is every member)."""
        keep = self.best_vs_worst_members()
        if len(keep) == self.size:
            return self

        def pick(values):
            return None if values is None else [values[i] for i in keep]

        return Group(self.prompt_id, self.prompt, pick(self.responses), pick(self.rewards), pick(self.chosen),
                     pick(self.ref_logp_sum), pick(self.ref_logp_mean))


@dataclass(frozen=True)
class ForwardOptions:
    """How responses become tokens and log-probs; the reference stage must use the same."""

    system_prompt: str | None = None
    response_span: ResponseSpan = "generation"
    forward_mode: ForwardMode = "auto"  # prefix_shared where it processes fewer tokens than packed, else packed


@dataclass(frozen=True)
class TokenizedGroup:
    group: Group
    examples: list[Example]  # one per response, in the group's order; all share the prompt ids

    @property
    def n_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    def best_vs_worst(self) -> TokenizedGroup:
        """The group's best-vs-worst pair, with the tokens it had in its group: the same tokens reference
        log-probs computed on the group saw (the group's truncation can depend on a member outside the pair)."""
        keep = self.group.best_vs_worst_members()
        if len(keep) == len(self.examples):
            return self
        return TokenizedGroup(self.group.best_vs_worst(), [self.examples[i] for i in keep])


@dataclass
class Batch:
    """One micro-batch of B groups padded to M = the largest group: (B, M) tensors plus the flat sequences."""

    examples: list[Example]  # (N,) group-major: group 0's responses, then group 1's, ...
    index: Tensor  # (B, M) long: position of each member in `examples`; -1 for padding
    valid_mask: Tensor  # (B, M) bool
    chosen_mask: Tensor  # (B, M) bool
    rewards: Tensor  # (B, M) float32, 0 where invalid
    ref_logps_sum: Tensor | None  # (B, M) float32, None when any group lacks reference log-probs
    ref_logps_mean: Tensor | None
    weight: Tensor  # (B,) 1 = counts toward the loss, 0 = a filler group (see micro_batches)

    @property
    def n_tokens(self) -> int:
        """Non-pad tokens the forward processes."""
        return sum(len(e.input_ids) for e in self.examples)

    def to_grid(self, flat: Tensor) -> Tensor:
        """Place per-sequence values (N,) into the (B, M) grid; padding gets 0."""
        gathered = flat[self.index.clamp(min=0).to(flat.device)]
        return torch.where(self.valid_mask.to(flat.device), gathered, torch.zeros((), dtype=flat.dtype,
                                                                                  device=flat.device))


# ----------------------------------------------------------------------------- tokenisation


def tokenize_groups(tokenizer, groups: Sequence[Group], *, max_length: int, max_prompt_length: int,
                    options: ForwardOptions = ForwardOptions()) -> tuple[list[TokenizedGroup], int]:
    """Chat-template tokenisation of every group (logps.build_group). Returns the groups and how many responses
    were truncated (prompt or response tokens cut to fit max_length)."""
    out = []
    for g in groups:
        examples = build_group(tokenizer, g.prompt, g.responses, max_length=max_length,
                               max_prompt_length=max_prompt_length, system_prompt=options.system_prompt,
                               response_span=options.response_span)
        out.append(TokenizedGroup(g, examples))
    return out, count_truncated(out)


def count_truncated(tgroups: Sequence[TokenizedGroup]) -> int:
    """Responses whose prompt or response tokens were cut to fit max_length."""
    return sum(e.n_truncated > 0 for t in tgroups for e in t.examples)


def data_fingerprint(groups: Sequence[Group]) -> str:
    """sha256 of the groups' content: a resumed run must see the same data."""
    digest = hashlib.sha256()
    for g in groups:
        digest.update(json.dumps(asdict(g), sort_keys=True).encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- step plan


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) drawn from (seed, epoch) alone, independent of the global RNG."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def plan_steps(n_groups: int, *, groups_per_step: int, grad_accum: int, num_processes: int, epochs: int,
               seed: int) -> list[list[int]]:
    """Group indices of every optimizer step of the run, epoch after epoch.

    A step takes groups_per_step * grad_accum * num_processes groups of the epoch's order; the last step of an
    epoch may take fewer (steps never straddle epochs).
    """
    if n_groups < 1:
        raise ValueError("no trainable groups to train on")
    per_step = groups_per_step * grad_accum * num_processes
    steps = []
    for epoch in range(epochs):
        order = epoch_order(n_groups, seed=seed, epoch=epoch)
        steps += [order[i : i + per_step] for i in range(0, n_groups, per_step)]
    return steps


def steps_per_epoch(n_groups: int, *, groups_per_step: int, grad_accum: int, num_processes: int) -> int:
    return math.ceil(n_groups / (groups_per_step * grad_accum * num_processes))


def micro_batches(step: Sequence[int], *, groups_per_step: int, num_processes: int,
                  process_index: int) -> list[tuple[list[int], bool]]:
    """This process's micro-batches of one step: (group indices, counts). (n_micro,) entries.

    Micro-batch j of process p holds step[(j*P + p)*g : (j*P + p + 1)*g]. Every process runs the same number of
    micro-batches (distributed backward passes must pair up); a process whose slot is empty re-runs the step's
    first group with counts=False, and its loss is multiplied by 0.
    """
    span = groups_per_step * num_processes
    out = []
    for j in range(math.ceil(len(step) / span)):
        start = j * span + process_index * groups_per_step
        chunk = list(step[start : start + groups_per_step])
        out.append((chunk, True) if chunk else ([step[0]], False))
    return out


# ----------------------------------------------------------------------------- collation


def collate(tgroups: Sequence[TokenizedGroup], *, counts: bool = True) -> Batch:
    """Pad B groups to (B, M) with M = the largest group; flatten their sequences group-major."""
    b, m = len(tgroups), max(t.group.size for t in tgroups)
    index = torch.full((b, m), -1, dtype=torch.long)
    chosen = torch.zeros((b, m), dtype=torch.bool)
    rewards = torch.zeros((b, m), dtype=torch.float32)
    has_ref = all(t.group.ref_logp_sum is not None and t.group.ref_logp_mean is not None for t in tgroups)
    ref_sum = torch.zeros((b, m), dtype=torch.float32) if has_ref else None
    ref_mean = torch.zeros((b, m), dtype=torch.float32) if has_ref else None
    examples: list[Example] = []
    for i, t in enumerate(tgroups):
        k = t.group.size
        index[i, :k] = torch.arange(len(examples), len(examples) + k)
        chosen[i, :k] = torch.tensor(t.group.chosen, dtype=torch.bool)
        rewards[i, :k] = torch.tensor(t.group.rewards, dtype=torch.float32)
        if has_ref:
            ref_sum[i, :k] = torch.tensor(t.group.ref_logp_sum, dtype=torch.float32)
            ref_mean[i, :k] = torch.tensor(t.group.ref_logp_mean, dtype=torch.float32)
        examples += t.examples
    weight = torch.full((b,), 1.0 if counts else 0.0)
    return Batch(examples, index, index >= 0, chosen, rewards, ref_sum, ref_mean, weight)


# ----------------------------------------------------------------------------- files


def save_groups(path: str | Path, groups: Sequence[Group]) -> Path:
    """Write groups as JSON lines (one group a line), for a trainer launched in another process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(g)) + "\n" for g in groups))
    return path


def load_groups(path: str | Path) -> list[Group]:
    """Read groups written by `save_groups`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"groups file not found: {path}")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [Group(**json.loads(line)) for line in lines]
