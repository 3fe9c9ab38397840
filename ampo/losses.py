"""Preference losses over batches of response groups: DPO, SimPO, MPO/W-MPO, AMPO (REFA-1-vs-k), InfoNCA.

A batch holds B groups (one prompt each) of up to M responses. Every group loss takes (B, M) tensors plus a
`valid_mask` (B, M) for variable group sizes and returns per-group losses (B,). Entries outside `valid_mask` may
hold anything, even inf or NaN: they are replaced by zeros before any arithmetic, so neither the loss nor any
gradient sees them. A group whose chosen or rejected set is empty has no defined loss (spec 2.2): its loss is 0
with zero gradient, and `group_is_trainable` says which groups those are, so the trainer averages over the rest.
All sums of exponentials are log-sum-exps and a set contrast is one softplus of a difference of them (spec 1.2).
Inputs are computed in fp32 at least: bf16/fp16 are upcast, float64 stays float64 (so gradcheck applies).

A loss is one block here: its frozen config class (`name` Literal and its own hyperparameters with their
defaults), its pure function, an adapter from a `GroupBatch`, and one `LOSSES` row saying what the trainer must
compute for it (a reference or not, pairs or groups, summed or length-normalised log-probs). The run config's
`loss` is `LossConfig`, the discriminated union of the registered configs on `name`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _ImportedOnUse:
    """A module imported on its first attribute access. The run config imports this module for the loss configs,
    and the CLI and the flows read configs without paying torch's import (seconds) for it."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import Tensor
else:
    torch, F = _ImportedOnUse("torch"), _ImportedOnUse("torch.nn.functional")

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


# ----------------------------------------------------------------------------- what a loss is given and configured by


@dataclass(frozen=True)
class GroupBatch:
    """Inputs of a group loss, all (B, M): policy (and optionally reference) log-probs, rewards, masks."""

    policy_logps_sum: Tensor
    policy_logps_mean: Tensor
    rewards: Tensor
    chosen_mask: Tensor
    valid_mask: Tensor
    ref_logps_sum: Tensor | None = None  # read by the losses whose registry row says needs_ref


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


def _has_both_sets(batch: GroupBatch) -> Tensor:
    return group_is_trainable(batch.chosen_mask, batch.valid_mask)


def _has_two_members(batch: GroupBatch) -> Tensor:
    return batch.valid_mask.bool().sum(-1) >= 2


class LossParams(BaseModel):
    """The fields every loss config has; each loss's config adds its name and its own hyperparameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # each loss narrows it to its own Literal: the union's discriminator and the LOSSES key
    eos_lambda: float = Field(0.0, ge=0.0)  # REFA EOS regulariser weight (eq. 7, spec 2.5), added by the trainer; 0 = off
    # weight of the chosen responses' per-token negative log-likelihood added to the loss (RPO, Pang et al. 2024:
    # iterative preference optimisation with an NLL term; TRL's rpo_alpha); 0 = off, the papers' losses exactly
    nll_weight: float = Field(0.0, ge=0.0, allow_inf_nan=False)

    @property
    def spec(self) -> LossSpec:
        """The loss's registry row: what the trainer must compute for it."""
        return LOSSES[self.name]

    def loss_params(self) -> dict:
        """The loss function's keyword hyperparameters: every field but `name` and the added terms' weights."""
        return self.model_dump(exclude={"name", "eos_lambda", "nll_weight"})


# ----------------------------------------------------------------------------- pairwise losses


class DpoConfig(LossParams):
    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0.0)  # on summed log-ratios (spec 4.2)


def dpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             *, beta: float) -> Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7). Inputs: summed sequence log-probs, (B,). Returns (B,)."""
    _check_positive(beta=beta)
    _check_shapes(1, chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
                  ref_rejected_logps=ref_rejected_logps)  # fmt: skip
    logits = (_wide(chosen_logps) - _wide(ref_chosen_logps)) - (_wide(rejected_logps) - _wide(ref_rejected_logps))
    return -F.logsigmoid(beta * logits)


def _dpo_from_batch(batch: GroupBatch, **params) -> Tensor:
    c, r = _pair_indices(batch)
    lp, ref = batch.policy_logps_sum, batch.ref_logps_sum
    return dpo_loss(_take(lp, c), _take(lp, r), _take(ref, c), _take(ref, r), **params)


class SimpoConfig(LossParams):
    name: Literal["simpo"] = "simpo"
    beta: float = Field(10.0, gt=0.0)  # on length-normalised log-probs (SimPO Llama-3-8B-Instruct v2, spec 4.2)
    gamma_beta_ratio: float = 0.3  # γ/β


def simpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, *, beta: float, gamma_beta_ratio: float) -> Tensor:
    """SimPO (Meng et al. 2024, Eq. 6): -log σ(β(c - r) - γ). Inputs: length-normalised log-probs, (B,). Returns (B,).

    γ is given as γ/β (`gamma_beta_ratio`), as in SimPO's configs (spec 4.2).
    """
    _check_positive(beta=beta)
    _check_shapes(1, chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    return -F.logsigmoid(beta * (_wide(chosen_logps) - _wide(rejected_logps) - gamma_beta_ratio))


def _simpo_from_batch(batch: GroupBatch, **params) -> Tensor:
    c, r = _pair_indices(batch)
    return simpo_loss(_take(batch.policy_logps_mean, c), _take(batch.policy_logps_mean, r), **params)


# ----------------------------------------------------------------------------- group losses


DEVIATIONS: dict[str, Callable[[Tensor, int], Tensor]] = {  # d_y of spec 2.3 from d = r - r_bar (A1)
    "none": lambda d, p: torch.zeros_like(d),  # unweighted MPO (REFA §G.3)
    "signed": lambda d, p: d,  # REFA eq. 5
    "abs": lambda d, p: d.abs(),  # W-MPO / SWEPO (ICLR review, SWEPO v1)
    "pow": lambda d, p: d**p,  # REFA App. G.4, p in {1, 2}
}


class MpoConfig(LossParams):
    name: Literal["mpo"] = "mpo"
    beta: float = Field(0.1, gt=0.0)  # on summed log-ratios (spec 2.3)
    alpha: float = 0.0  # deviation weight; 0 = unweighted MPO
    weight_mode: WeightMode = "abs"  # deviation form (spec A1); abs with alpha > 0 is W-MPO
    p: int = Field(1, ge=1, le=2)  # exponent of weight_mode="pow"


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


def _mpo_from_batch(batch: GroupBatch, **params) -> Tensor:
    return mpo_loss(batch.policy_logps_sum, batch.ref_logps_sum, batch.rewards, batch.chosen_mask,
                    valid_mask=batch.valid_mask, **params)


class AmpoConfig(LossParams):
    name: Literal["ampo"] = "ampo"
    beta: float = Field(10.0, gt=0.0)  # REFA Table 4, on-policy Llama-3-8B-Instruct 1-vs-k (spec 3.5)
    gamma: float = Field(3.0, gt=0.0)  # weight of the negative set (REFA eq. 6; spec 3.4)
    alpha: float = 0.0  # reward-deviation weight; 0 = unweighted
    alpha_inside_beta: bool = False  # appendix form β(lp + α·d) (spec A3)


def ampo_loss(policy_logps: Tensor, rewards: Tensor, chosen_mask: Tensor, *, beta: float, gamma: float,
              alpha: float = 0.0, valid_mask: Tensor | None = None, alpha_inside_beta: bool = False) -> Tensor:
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


def _ampo_from_batch(batch: GroupBatch, **params) -> Tensor:
    return ampo_loss(batch.policy_logps_mean, batch.rewards, batch.chosen_mask, valid_mask=batch.valid_mask,
                     **params)


class InfoncaConfig(LossParams):
    name: Literal["infonca"] = "infonca"
    beta: float = Field(0.1, gt=0.0)  # on summed log-ratios
    alpha: float = Field(1.0, gt=0.0)  # reward temperature of the target softmax(r/α)


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


def _infonca_from_batch(batch: GroupBatch, **params) -> Tensor:
    return infonca_loss(batch.policy_logps_sum, batch.ref_logps_sum, batch.rewards, batch.valid_mask, **params)


class RefaInfoncaConfig(LossParams):
    name: Literal["refa_infonca"] = "refa_infonca"
    beta: float = Field(10.0, gt=0.0)  # on length-normalised log-probs, as AMPO (REFA §2.5 tables)
    alpha: float = Field(1.0, gt=0.0)  # reward temperature of the target softmax(r/α) [I]


def _refa_infonca_from_batch(batch: GroupBatch, **params) -> Tensor:
    return infonca_loss(batch.policy_logps_mean, None, batch.rewards, batch.valid_mask, **params)


# ----------------------------------------------------------------------------- REFA EOS regulariser


def chosen_nll(batch: GroupBatch, *, weight: float) -> Tensor:
    """weight * the mean over each group's valid chosen members of their per-token negative log-likelihood,
    -policy_logps_mean (RPO's NLL term on the chosen response; averaged when a group has several). (B,); 0 for a
    group without a valid chosen member."""
    if weight < 0:
        raise ValueError(f"weight={weight!r} must be >= 0")
    chosen = batch.chosen_mask.bool() & _valid(batch.valid_mask, batch.policy_logps_mean)
    nll = _clean(-batch.policy_logps_mean, chosen)  # (B, M), 0 off the chosen members
    return weight * nll.sum(-1) / chosen.sum(-1).clamp(min=1)


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
class LossSpec:
    """A registered loss, one row: its config class, how to call it on a GroupBatch, and what the trainer must
    compute for it. The only place that says whether a loss needs a reference, pairs and which log-probs."""

    config: type[LossParams]  # its frozen config (name Literal + hyperparameters with their defaults)
    from_batch: Callable[..., Tensor]  # (GroupBatch, **config.loss_params()) -> (B,)
    needs_ref: bool  # reads ref_logps_sum: the reflogps stage runs only for these losses
    logps: Literal["sum", "mean"]  # summed or length-normalised sequence log-probs
    pairwise: bool  # trains on each group's best-vs-worst pair: exactly one chosen and one rejected member
    trainable: Callable[[GroupBatch], Tensor] = _has_both_sets  # (B,) bool: groups with a defined loss

    @property
    def name(self) -> str:
        return self.config.model_fields["name"].default


def _registry(*specs: LossSpec) -> dict[str, LossSpec]:
    return {spec.name: spec for spec in specs}


LOSSES: dict[str, LossSpec] = _registry(
    LossSpec(DpoConfig, _dpo_from_batch, needs_ref=True, logps="sum", pairwise=True),
    LossSpec(SimpoConfig, _simpo_from_batch, needs_ref=False, logps="mean", pairwise=True),
    LossSpec(MpoConfig, _mpo_from_batch, needs_ref=True, logps="sum", pairwise=False),
    LossSpec(AmpoConfig, _ampo_from_batch, needs_ref=False, logps="mean", pairwise=False),
    LossSpec(InfoncaConfig, _infonca_from_batch, needs_ref=True, logps="sum", pairwise=False,
             trainable=_has_two_members),
    LossSpec(RefaInfoncaConfig, _refa_infonca_from_batch, needs_ref=False, logps="mean", pairwise=False,
             trainable=_has_two_members),
)

# The run config's `loss`: one of the registered configs, chosen by `name`; a field the chosen loss does not take
# is a validation error naming it (e.g. loss.dpo.gamma).
LossConfig = Annotated[Union[tuple(spec.config for spec in LOSSES.values())], Field(discriminator="name")]  # noqa: UP007
_LOSS_CONFIG = TypeAdapter(LossConfig)


def loss_config(name: str, **fields) -> LossParams:
    """The config of the registered loss `name` with `fields` set, validated as the run config validates it."""
    return _LOSS_CONFIG.validate_python({"name": name, **fields})


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
