"""Preference losses over batches of response groups: DPO, SimPO, MPO/W-MPO, AMPO (REFA-1-vs-k), InfoNCA.

A batch holds B groups (one prompt each) of up to M responses. Every group loss takes (B, M) tensors plus a
`valid_mask` (B, M) for variable group sizes and returns per-group losses (B,). Entries outside `valid_mask` may
hold anything, even inf or NaN: they are replaced by zeros before any arithmetic, so neither the loss nor any
gradient sees them. A group whose chosen or rejected set is empty has no defined loss (spec 2.2): its loss is 0
with zero gradient, and `group_is_trainable` says which groups those are, so the trainer averages over the rest.
All sums of exponentials are log-sum-exps and a set contrast is one softplus of a difference of them (spec 1.2).
Inputs are computed in fp32 at least: bf16/fp16 are upcast, float64 stays float64 (so gradcheck applies).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

WeightMode = Literal["none", "signed", "abs", "pow"]


# ----------------------------------------------------------------------------- masking helpers


def _valid(valid_mask: Tensor | None, like: Tensor) -> Tensor:
    """`valid_mask` as a bool (B, M) tensor; all True when None."""
    if valid_mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    if valid_mask.shape != like.shape:
        raise ValueError(f"valid_mask has shape {tuple(valid_mask.shape)}; it must match {tuple(like.shape)}")
    return valid_mask.bool()


def _check_shapes(ndim: int, **tensors: Tensor) -> None:
    """Every tensor has `ndim` dims and the same shape: (B,) pairs or (B, M) groups. No silent broadcasting."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != ndim or any(shape != first for shape in shapes.values()):
        layout = "(B,)" if ndim == 1 else "(B, M)"
        raise ValueError(f"inputs must all have one shape {layout}; got {shapes}")


def _clean(x: Tensor, valid: Tensor) -> Tensor:
    """Copy of x (fp32 at least) with invalid entries set to 0, so garbage never reaches an exp or a gradient."""
    return torch.where(valid, _wide(x), 0.0)


def _wide(x: Tensor) -> Tensor:
    """x in fp32, or in its own dtype when that is wider (float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _masked_logsumexp(z: Tensor, mask: Tensor) -> Tensor:
    """logsumexp over the last dim, of the entries where mask is True. (B, M) -> (B,). -inf if none."""
    return torch.logsumexp(torch.where(mask, z, -math.inf), dim=-1)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the entries where mask is True, keeping the last dim. (B, M) -> (B, 1)."""
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    return torch.where(mask, x, 0.0).sum(-1, keepdim=True) / count


def group_is_trainable(chosen_mask: Tensor, valid_mask: Tensor | None = None) -> Tensor:
    """True for groups with at least one valid chosen and one valid rejected member. (B, M) -> (B,) bool."""
    valid = _valid(valid_mask, chosen_mask)
    chosen = chosen_mask.bool() & valid
    return chosen.any(-1) & (valid & ~chosen).any(-1)


def _set_contrast(z: Tensor, chosen: Tensor, valid: Tensor, log_gamma: float = 0.0) -> Tensor:
    """logaddexp(LSE(z[Y+]), log γ + LSE(z[Y-])) - LSE(z[Y+]) per group; 0 where Y+ or Y- is empty. (B, M) -> (B,).

    With γ = 1 this is LSE(z[Y]) - LSE(z[Y+]) (MPO, REFA eq. 5). It is computed as the equal
    softplus(log γ + LSE(z[Y-]) - LSE(z[Y+])): the written form subtracts two nearly equal numbers when the
    positives dominate (a 7% error at a margin of 12 in fp32), the softplus keeps full relative precision.
    Skipped groups see a harmless all-True mask, so the masked-out branch of the final `where` carries no inf
    and no NaN into the backward pass.
    """
    trainable = chosen.any(-1) & (valid & ~chosen).any(-1)  # (B,)
    keep = trainable[:, None]
    pos = torch.where(keep, chosen, True)  # (B, M)
    neg = torch.where(keep, valid & ~chosen, True)  # (B, M)
    lse_pos = _masked_logsumexp(z, pos)  # (B,)
    lse_neg = _masked_logsumexp(z, neg)  # (B,)
    loss = F.softplus(log_gamma + lse_neg - lse_pos)
    return torch.where(trainable, loss, 0.0)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name}={value!r} must be > 0")


# ----------------------------------------------------------------------------- partitions (spec 2.2, A15)


def mean_split_mask(rewards: Tensor, valid_mask: Tensor | None = None) -> Tensor:
    """Chosen set Y+ = {r > mean of the valid rewards}; ties with the mean are rejected. (B, M) -> (B, M) bool.

    MPO's off-policy partition (spec 2.2). Compared in float64 so that equal rewards stay on one side.
    """
    valid = _valid(valid_mask, rewards)
    r = torch.where(valid, rewards.double(), 0.0)  # (B, M)
    return valid & (r > _masked_mean(r, valid))


def top_bottom_masks(rewards: Tensor, valid_mask: Tensor | None = None, m: int = 2) -> tuple[Tensor, Tensor]:
    """The top-m valid members are chosen, the bottom-m rejected, the rest dropped. (B, M) -> chosen, keep (B, M).

    MPO/REFA on-policy partition (spec 2.2, REFA §6.1: top-2 and bottom-2 of 5). Pass `keep` as the loss's
    `valid_mask`, so r_bar is recomputed on the kept set (A15). Ties break by index: a stable ascending sort
    ranks the lower index as the lower reward, as in the spec's `argsort(rewards, stable=True)`.
    """
    valid = _valid(valid_mask, rewards)
    n_valid = valid.sum(-1)  # (B,)
    if m < 1 or bool((n_valid < 2 * m).any()):
        raise ValueError(f"top_bottom_masks needs m >= 1 and at least 2*m valid members per group; "
                         f"got m={m} and group sizes {n_valid.tolist()}")
    key = torch.where(valid, rewards.double(), -math.inf)  # invalid members sort first
    order = torch.sort(key, dim=-1, stable=True).indices  # (B, M) ascending
    positions = torch.arange(key.shape[-1], device=key.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # (B, M) 0 = lowest
    first = (key.shape[-1] - n_valid)[:, None]  # (B, 1) rank of the lowest valid member
    chosen = rank >= key.shape[-1] - m
    rejected = (rank >= first) & (rank < first + m)
    return chosen, chosen | rejected


def best_member_mask(rewards: Tensor, valid_mask: Tensor | None = None) -> Tensor:
    """One-hot of the highest valid reward per group, ties to the lowest index. (B, M) -> (B, M) bool.

    REFA 1-vs-All (eq. 18) and AMPO's single positive (spec 3.1, 3.2).
    """
    valid = _valid(valid_mask, rewards)
    best = torch.where(valid, rewards.double(), -math.inf).argmax(-1)  # argmax returns the first maximum
    return F.one_hot(best, rewards.shape[-1]).bool() & valid


# ----------------------------------------------------------------------------- pairwise losses


def dpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             *, beta: float) -> Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7). Inputs: summed sequence log-probs, (B,). Returns (B,)."""
    _check_positive(beta=beta)
    _check_shapes(1, chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
                  ref_rejected_logps=ref_rejected_logps)  # fmt: skip
    logits = (_wide(chosen_logps) - _wide(ref_chosen_logps)) - (_wide(rejected_logps) - _wide(ref_rejected_logps))
    return -F.logsigmoid(beta * logits)


def simpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, *, beta: float, gamma_beta_ratio: float) -> Tensor:
    """SimPO (Meng et al. 2024, Eq. 6): -log σ(β(c - r) - γ). Inputs: length-normalised log-probs, (B,). Returns (B,).

    γ is given as γ/β (`gamma_beta_ratio`), as in SimPO's configs (spec 4.2).
    """
    _check_positive(beta=beta)
    _check_shapes(1, chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    return -F.logsigmoid(beta * (_wide(chosen_logps) - _wide(rejected_logps) - gamma_beta_ratio))


# ----------------------------------------------------------------------------- group losses


DEVIATIONS: dict[str, Callable[[Tensor, int], Tensor]] = {  # d_y of spec 2.3 from d = r - r_bar (A1)
    "none": lambda d, p: torch.zeros_like(d),  # unweighted MPO (REFA §G.3)
    "signed": lambda d, p: d,  # REFA eq. 5
    "abs": lambda d, p: d.abs(),  # W-MPO / SWEPO (ICLR review, SWEPO v1)
    "pow": lambda d, p: d**p,  # REFA App. G.4, p in {1, 2}
}


def mpo_loss(policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, chosen_mask: Tensor, *, beta: float,
             alpha: float = 0.0, weight_mode: WeightMode = "none", valid_mask: Tensor | None = None,
             p: int = 1) -> Tensor:
    """MPO / W-MPO set contrast (REFA eq. 5, spec 2.3). Inputs (B, M): summed log-probs. Returns (B,).

    z = β(logπ - logπ_ref) + α·d_mode(r - r_bar), r_bar over the valid members; L = LSE(z[Y]) - LSE(z[Y+]).
    `weight_mode` picks d (spec A1): none 0, signed d, abs |d|, pow d**p (REFA App. G.4, p in {1, 2}).
    Skipped groups (empty Y+ or Y-) give 0; see `group_is_trainable`.
    """
    _check_positive(beta=beta)
    _check_shapes(2, policy_logps=policy_logps, ref_logps=ref_logps, rewards=rewards, chosen_mask=chosen_mask)
    if weight_mode not in DEVIATIONS:
        raise ValueError(f"unknown weight_mode {weight_mode!r}; choose from {sorted(DEVIATIONS)}")
    if weight_mode == "pow" and p not in (1, 2):
        raise ValueError(f"p={p!r} for weight_mode='pow'; choose from [1, 2]")
    valid = _valid(valid_mask, policy_logps)
    r = _clean(rewards, valid)  # (B, M)
    d = DEVIATIONS[weight_mode](r - _masked_mean(r, valid), p)  # (B, M)
    z = beta * (_clean(policy_logps, valid) - _clean(ref_logps, valid)) + alpha * d  # (B, M)
    return _set_contrast(z, chosen_mask.bool() & valid, valid)


def ampo_loss(policy_logps: Tensor, rewards: Tensor, chosen_mask: Tensor, *, beta: float = 10.0,
              gamma: float = 3.0, alpha: float = 0.0, valid_mask: Tensor | None = None,
              alpha_inside_beta: bool = False) -> Tensor:
    """AMPO = reference-free REFA-1-vs-k (REFA eq. 6/18, spec 3.4). Inputs (B, M): length-normalised. Returns (B,).

    s = β·lp + α(r - r_bar) (REFA §4.2), or β(lp + α(r - r_bar)) with `alpha_inside_beta` (REFA eq. 22/30, A3);
    r_bar is the mean over the valid (selected) members (A4). L = logaddexp(LSE(s+), log γ + LSE(s-)) - LSE(s+).
    Y+ may hold one member (AMPO, 1-vs-k) or several (REFA-Dynamic). Skipped groups give 0.
    """
    _check_positive(beta=beta, gamma=gamma)
    _check_shapes(2, policy_logps=policy_logps, rewards=rewards, chosen_mask=chosen_mask)
    valid = _valid(valid_mask, policy_logps)
    r = _clean(rewards, valid)  # (B, M)
    d = r - _masked_mean(r, valid)  # (B, M) signed deviation (A1: signed for REFA/AMPO)
    lp = _clean(policy_logps, valid)
    s = beta * (lp + alpha * d) if alpha_inside_beta else beta * lp + alpha * d  # (B, M)
    return _set_contrast(s, chosen_mask.bool() & valid, valid, log_gamma=math.log(gamma))


def infonca_loss(policy_logps: Tensor, ref_logps: Tensor | None, rewards: Tensor, valid_mask: Tensor | None = None,
                 *, beta: float, alpha: float = 1.0) -> Tensor:
    """InfoNCA (Chen et al. 2024, "Noise Contrastive Alignment", §3.2). Inputs (B, M). Returns (B,).

    Cross-entropy from the reward target softmax(r/α) to the model softmax(z) over the valid members:
    L = -Σ_i softmax(r/α)_i · log softmax(z)_i, with z = β(logπ - logπ_ref) on summed log-probs (NCA), or,
    with `ref_logps=None`, the reference-free REFA-InfoNCA score z = β·logp_bar on length-normalised log-probs
    (REFA §2.5 tables; registered as "refa_infonca"). Groups with fewer than 2 valid members give 0.
    """
    _check_positive(beta=beta, alpha=alpha)
    refs = {} if ref_logps is None else {"ref_logps": ref_logps}
    _check_shapes(2, policy_logps=policy_logps, rewards=rewards, **refs)
    valid = _valid(valid_mask, policy_logps)
    trainable = valid.sum(-1) >= 2  # (B,)
    mask = torch.where(trainable[:, None], valid, True)  # (B, M) skipped groups: harmless all-True
    z = beta * _clean(policy_logps, valid)  # (B, M)
    if ref_logps is not None:
        z = z - beta * _clean(ref_logps, valid)
    t = _clean(rewards, valid) / alpha
    log_model = z - _masked_logsumexp(z, mask)[:, None]  # (B, M)
    target = torch.where(mask, t - _masked_logsumexp(t, mask)[:, None], -math.inf).exp()  # (B, M), 0 off-mask
    loss = -(target * torch.where(mask, log_model, 0.0)).sum(-1)
    return torch.where(trainable, loss, 0.0)


# ----------------------------------------------------------------------------- REFA EOS regulariser


def eos_regularizer(eos_probs: Tensor, lengths: Tensor, valid_mask: Tensor | None = None, *, lam: float,
                    target: Literal["group_max", "none"] = "group_max") -> Tensor:
    """REFA length regulariser (eq. 7): λ Σ_y P(EOS at |y|)·max(0, TARGET - |y|). Inputs (B, M). Returns (B,).

    TARGET is the longest valid response of the group ("group_max", eq. 7). target="none" is the plain
    λ Σ_y P(EOS at |y|) of eq. 31. `lengths` are response token counts; `eos_probs` come from `group_logps`.
    """
    if lam < 0:
        raise ValueError(f"lam={lam!r} must be >= 0")
    if target not in ("group_max", "none"):
        raise ValueError(f"unknown target {target!r}; choose from ['group_max', 'none']")
    valid = _valid(valid_mask, eos_probs)
    probs = _clean(eos_probs, valid)  # (B, M)
    if target == "none":
        return lam * probs.sum(-1)
    n = _clean(lengths, valid)  # (B, M)
    shortfall = (n.max(-1, keepdim=True).values - n).clamp(min=0)  # (B, M), lengths >= 0 so 0 is a safe fill
    return lam * (probs * shortfall).sum(-1)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class GroupBatch:
    """Inputs of a group loss, all (B, M): policy (and optionally reference) log-probs, rewards, masks."""

    policy_logps_sum: Tensor
    policy_logps_mean: Tensor
    rewards: Tensor
    chosen_mask: Tensor
    valid_mask: Tensor
    ref_logps_sum: Tensor | None = None  # needed by the reference-based losses (LossSpec.needs_ref)


def _pair_indices(batch: GroupBatch) -> tuple[Tensor, Tensor]:
    """Index of the single chosen and the single rejected valid member of each group. Returns (B,), (B,)."""
    chosen = batch.chosen_mask.bool() & batch.valid_mask.bool()
    rejected = batch.valid_mask.bool() & ~chosen
    n_chosen, n_rejected = chosen.sum(-1), rejected.sum(-1)
    bad = ((n_chosen != 1) | (n_rejected != 1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"pairwise losses need exactly 1 chosen and 1 rejected valid member per group; groups "
                         f"{bad[:5]} have chosen {n_chosen[bad[:5]].tolist()}, rejected {n_rejected[bad[:5]].tolist()}")
    return chosen.float().argmax(-1), rejected.float().argmax(-1)


def _take(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(-1, index[:, None])[:, 0]


def _dpo_from_batch(batch: GroupBatch, **params) -> Tensor:
    c, r = _pair_indices(batch)
    lp, ref = batch.policy_logps_sum, batch.ref_logps_sum
    return dpo_loss(_take(lp, c), _take(lp, r), _take(ref, c), _take(ref, r), **params)


def _simpo_from_batch(batch: GroupBatch, **params) -> Tensor:
    c, r = _pair_indices(batch)
    return simpo_loss(_take(batch.policy_logps_mean, c), _take(batch.policy_logps_mean, r), **params)


def _mpo_from_batch(batch: GroupBatch, **params) -> Tensor:
    return mpo_loss(batch.policy_logps_sum, batch.ref_logps_sum, batch.rewards, batch.chosen_mask,
                    valid_mask=batch.valid_mask, **params)


def _ampo_from_batch(batch: GroupBatch, **params) -> Tensor:
    return ampo_loss(batch.policy_logps_mean, batch.rewards, batch.chosen_mask, valid_mask=batch.valid_mask,
                     **params)


def _infonca_from_batch(batch: GroupBatch, **params) -> Tensor:
    return infonca_loss(batch.policy_logps_sum, batch.ref_logps_sum, batch.rewards, batch.valid_mask, **params)


def _refa_infonca_from_batch(batch: GroupBatch, **params) -> Tensor:
    return infonca_loss(batch.policy_logps_mean, None, batch.rewards, batch.valid_mask, **params)


def _has_both_sets(batch: GroupBatch) -> Tensor:
    return group_is_trainable(batch.chosen_mask, batch.valid_mask)


def _has_two_members(batch: GroupBatch) -> Tensor:
    return batch.valid_mask.bool().sum(-1) >= 2


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: how to call it on a GroupBatch and which log-probs it needs."""

    from_batch: Callable[..., Tensor]  # (GroupBatch, **params) -> (B,)
    needs_ref: bool  # reads ref_logps_sum
    logps: Literal["sum", "mean"]  # summed or length-normalised sequence log-probs
    pairwise: bool  # needs exactly one chosen and one rejected member per group
    trainable: Callable[[GroupBatch], Tensor] = _has_both_sets  # (B,) bool: groups with a defined loss


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(_dpo_from_batch, needs_ref=True, logps="sum", pairwise=True),
    "simpo": LossSpec(_simpo_from_batch, needs_ref=False, logps="mean", pairwise=True),
    "mpo": LossSpec(_mpo_from_batch, needs_ref=True, logps="sum", pairwise=False),
    "ampo": LossSpec(_ampo_from_batch, needs_ref=False, logps="mean", pairwise=False),
    "infonca": LossSpec(_infonca_from_batch, needs_ref=True, logps="sum", pairwise=False,
                        trainable=_has_two_members),
    "refa_infonca": LossSpec(_refa_infonca_from_batch, needs_ref=False, logps="mean", pairwise=False,
                             trainable=_has_two_members),
}


def group_loss(name: str, batch: GroupBatch, **params) -> Tensor:
    """Per-group loss (B,) of the registered loss `name`; `params` are its keyword hyperparameters (beta, ...)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    if LOSSES[name].needs_ref and batch.ref_logps_sum is None:
        raise ValueError(f"loss {name!r} needs reference log-probs: GroupBatch.ref_logps_sum is None")
    return LOSSES[name].from_batch(batch, **params)


def trainable_groups(name: str, batch: GroupBatch) -> Tensor:
    """Which groups (B,) bool the loss `name` learns from; the others have loss 0 and are left out of the mean."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    return LOSSES[name].trainable(batch)
