"""Group losses: hand-computed values, the DPO special case, gradients against the closed form (REFA Lemma 3),
invariances, skipped groups, variable group sizes, dtypes and extreme magnitudes (spec section 6)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from ampo.config import RunConfig, load_config
from ampo.losses import (
    LOSSES,
    AmpoConfig,
    DpoConfig,
    GroupBatch,
    LossParams,
    MpoConfig,
    ampo_loss,
    chosen_nll,
    dpo_loss,
    eos_regularizer,
    group_is_trainable,
    group_loss,
    infonca_loss,
    loss_config,
    mpo_loss,
    simpo_loss,
    trainable_groups,
)

T = torch.tensor
AMPO = {"beta": 10.0, "gamma": 3.0}  # AmpoConfig's defaults (REFA Table 4)


def close(a, b, tol=1e-4):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- hand-computed values


def test_dpo_hand_values():
    # policy - ref margins: chosen [0, .1, -.9], rejected [0, -9.9, -20.9] -> logits [0, 10, 20];
    # beta = 0.1 -> loss = log1p(exp(-[0, 1, 2])) = [0.6931, 0.3133, 0.1269]
    loss = dpo_loss(T([0.0, 0.1, -0.9]), T([0.0, -9.9, -20.9]), T([0.0, 0, 0]), T([0.0, 0, 0]), beta=0.1)
    close(loss, [0.6931, 0.3133, 0.1269])


def test_simpo_hand_value():
    # beta (c - r - gamma/beta) = 10 (-1.0 + 1.2 - 0.3) = -1 -> -log sigmoid(-1) = log(1 + e) = 1.31326
    close(simpo_loss(T([-1.0]), T([-1.2]), beta=10.0, gamma_beta_ratio=0.3), [1.31326])


def test_mpo_hand_values_per_weight_mode():
    # s = policy - ref = [1, 0, -1], beta = 1, Y+ = {0}.
    # none: z = [1, 0, -1]; LSE = log(e + 1 + 1/e) = log(4.08616) = 1.40761; L = 1.40761 - 1 = 0.40761
    # rewards [4, 2, 0]: r_bar = 2, d = [2, 0, -2], alpha = 0.25:
    # signed: z = s + [.5, 0, -.5] = [1.5, 0, -1.5]; L = log(4.48169 + 1 + 0.22313) - 1.5 = 1.74131 - 1.5 = 0.24131
    # abs:    z = s + [.5, 0, .5]  = [1.5, 0, -0.5]; L = log(4.48169 + 1 + 0.60653) - 1.5 = 1.80636 - 1.5 = 0.30636
    # pow 2:  z = s + .25 [4, 0, 4] = [2, 0, 0];     L = log(7.38906 + 1 + 1) - 2 = 2.23954 - 2 = 0.23954
    policy, ref, rewards, chosen = T([[1.0, 0, -1]]), T([[0.0, 0, 0]]), T([[4.0, 2, 0]]), T([[True, False, False]])
    close(mpo_loss(policy, ref, rewards, chosen, beta=1.0), [0.40761])
    close(mpo_loss(policy, ref, rewards, chosen, beta=1.0, alpha=0.25, weight_mode="signed"), [0.24131])
    close(mpo_loss(policy, ref, rewards, chosen, beta=1.0, alpha=0.25, weight_mode="abs"), [0.30636])
    close(mpo_loss(policy, ref, rewards, chosen, beta=1.0, alpha=0.25, weight_mode="pow", p=2), [0.23954])


def test_ampo_hand_value_gamma_3():
    # lp_bar = [-1.0, -1.1, -1.2], beta = 10 -> s = [-10, -11, -12], one positive (index 0):
    # L = log(1 + 3 * (exp(-1) + exp(-2))) = log(1 + 3 * 0.503215) = log(2.509644) = 0.92014
    loss = ampo_loss(T([[-1.0, -1.1, -1.2]]), T([[0.9, 0.1, 0.0]]), T([[True, False, False]]), beta=10.0, gamma=3.0)
    close(loss, [0.92014])
    # gamma = 1 removes the negative-set weight: log(1 + 0.503215) = 0.40761 (the MPO value above, shifted by -11)
    close(ampo_loss(T([[-1.0, -1.1, -1.2]]), T([[0.9, 0.1, 0.0]]), T([[True, False, False]]), beta=10.0, gamma=1.0),
          [0.40761])


def test_ampo_alpha_placement():
    # rewards [1, 0, -1] -> d = [1, 0, -1]; lp = [0, 0, 0]; beta = 2, alpha = 0.5, gamma = 1:
    # main text: s = 2*0 + .5 d = [.5, 0, -.5];  L = log(e^.5 + 1 + e^-.5) - .5 = log(3.25525) - .5 = 0.68024
    # inside:    s = 2 (0 + .5 d) = [1, 0, -1];  L = 0.40761
    args = (T([[0.0, 0, 0]]), T([[1.0, 0, -1]]), T([[True, False, False]]))
    close(ampo_loss(*args, beta=2.0, gamma=1.0, alpha=0.5), [math.log(math.exp(0.5) + 1 + math.exp(-0.5)) - 0.5])
    close(ampo_loss(*args, beta=2.0, gamma=1.0, alpha=0.5, alpha_inside_beta=True), [0.40761])


def test_infonca_hand_value():
    # z = beta (policy - ref) = [1, 0, -1]; target = softmax(r / alpha) with r = [ln 2, 0, 0] -> [.5, .25, .25]
    # L = LSE(z) - sum(target * z) = 1.40761 - (0.5 - 0.25) = 1.15761
    loss = infonca_loss(T([[1.0, 0, -1]]), T([[0.0, 0, 0]]), T([[math.log(2), 0, 0]]), beta=1.0, alpha=1.0)
    close(loss, [1.15761])


def test_refa_infonca_is_reference_free_on_mean_logps():
    # no reference: z = beta * lp_bar = 10 * [0.1, 0, -0.1] = [1, 0, -1], the same z as above -> 1.15761
    loss = infonca_loss(T([[0.1, 0, -0.1]]), None, T([[math.log(2), 0, 0]]), beta=10.0, alpha=1.0)
    close(loss, [1.15761])
    b = GroupBatch(policy_logps_sum=T([[-5.0, -9, -2]]), policy_logps_mean=T([[0.1, 0, -0.1]]),
                   rewards=T([[math.log(2), 0, 0]]), chosen_mask=T([[True, False, False]]),
                   valid_mask=T([[True, True, True]]))  # fmt: skip
    close(group_loss("refa_infonca", b, beta=10.0, alpha=1.0), [1.15761])  # reads the mean log-probs only


def test_eos_regularizer_hand_values():
    # lengths [10, 4, 7] -> target 10, shortfall [0, 6, 3]; lam = .5:
    # group_max: .5 (.1*0 + .2*6 + .3*3) = .5 * 2.1 = 1.05;  none: .5 (.1 + .2 + .3) = 0.3
    # the 4th member is invalid: its length 100 and probability must not count
    probs, lengths = T([[0.1, 0.2, 0.3, 0.9]]), T([[10, 4, 7, 100]])
    valid = T([[True, True, True, False]])
    close(eos_regularizer(probs, lengths, valid, lam=0.5), [1.05])
    close(eos_regularizer(probs, lengths, valid, lam=0.5, target="none"), [0.3])


def test_chosen_nll_hand_values_and_added_by_the_loss_fn():
    # group 0: chosen members 0 (mean logp -1.5) and 2 (-0.5), member 3 chosen but invalid:
    #   .2 * (1.5 + .5) / 2 = 0.2;  group 1: one chosen (-2.0): .2 * 2 = 0.4;  group 2: no chosen member: 0
    b = GroupBatch(policy_logps_sum=torch.zeros(3, 4),
                   policy_logps_mean=T([[-1.5, -3.0, -0.5, -9.0], [-2.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]]),
                   rewards=torch.zeros(3, 4),
                   chosen_mask=T([[True, False, True, True], [True, False, False, False], [False] * 4]),
                   valid_mask=T([[True, True, True, False], [True] * 4, [True] * 4]))  # fmt: skip
    close(chosen_nll(b, weight=0.2), [0.2, 0.4, 0.0])
    # the configured loss adds it: AMPO with nll_weight .2 = AMPO alone + the values above
    from ampo.trainer import make_loss_fn

    pair = GroupBatch(policy_logps_sum=T([[-4.0, -6.0]]), policy_logps_mean=T([[-1.0, -1.5]]), rewards=T([[1.0, 0.0]]),
                      chosen_mask=T([[True, False]]), valid_mask=T([[True, True]]))  # fmt: skip
    plain, with_nll = make_loss_fn(AmpoConfig()), make_loss_fn(AmpoConfig(nll_weight=0.2))
    close(with_nll(pair) - plain(pair), [0.2 * 1.0])
    with pytest.raises(ValidationError, match="nll_weight"):
        AmpoConfig(nll_weight=-1.0)


# ----------------------------------------------------------------------------- partitions (chosen from the data)


def best_member_mask(rewards):
    """One-hot of each row's highest reward (the selectors' AMPO positive); the tests below only need some mask."""
    return torch.nn.functional.one_hot(rewards.argmax(-1), rewards.shape[-1]).bool()


def test_top_bottom_loss_recomputes_mean_on_kept_set():
    # spec A15: with keep as valid_mask the loss equals the loss on the 4 kept members alone
    rewards, policy = T([[0.0, 10, 1, 9, 2]]), T([[-3.0, -1, -4, -2, -5]])
    # top-2 {10, 9} chosen, bottom-2 {0, 1} rejected, the median 2 (index 4) dropped
    chosen, keep = T([[False, True, False, True, False]]), T([[True, True, True, True, False]])
    loss = mpo_loss(policy, torch.zeros_like(policy), rewards, chosen, beta=1.0, alpha=0.5, weight_mode="signed",
                    valid_mask=keep)
    idx = keep[0].nonzero().flatten()
    compact = mpo_loss(policy[:, idx], torch.zeros(1, 4), rewards[:, idx], chosen[:, idx], beta=1.0, alpha=0.5,
                       weight_mode="signed")
    close(loss, compact, tol=1e-6)


# ----------------------------------------------------------------------------- spec section 6 properties


def test_mpo_with_two_members_equals_dpo():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6) * 20 - 100 for _ in range(4))
    policy, ref = torch.stack([pc, pr], 1), torch.stack([rc, rr], 1)  # (6, 2): member 0 chosen
    chosen = T([[True, False]]).expand(6, 2)
    close(mpo_loss(policy, ref, torch.randn(6, 2), chosen, beta=0.1), dpo_loss(pc, pr, rc, rr, beta=0.1), tol=1e-5)


def test_dominant_positives_keep_full_relative_precision():
    # margin 12: DPO = softplus(-12) = log(1 + e^-12) = 6.1442e-6; MPO with K=2 must give the same, not the
    # difference LSE(Y) - LSE(Y+) = (-30 + 6.1e-6) - (-30), which fp32 rounds to 5.72e-6 (a 7% error)
    exact = math.log1p(math.exp(-12.0))
    got = mpo_loss(T([[-30.0, -42.0]]), torch.zeros(1, 2), T([[1.0, 0.0]]), T([[True, False]]), beta=1.0)
    assert abs(got.item() - exact) / exact < 1e-6
    # AMPO, gamma=3, beta=10 on length-normalised log-probs [-1, -2, -3] (member 0 chosen):
    # softplus(log 3 + LSE(-20, -30) - (-10)) = log(1 + 3 (e^-10 + e^-20)) = 1.36200e-4
    exact = math.log1p(3 * (math.exp(-10.0) + math.exp(-20.0)))
    got = ampo_loss(T([[-1.0, -2.0, -3.0]]), T([[3.0, 2.0, 1.0]]), T([[True, False, False]]), **AMPO)
    assert abs(got.item() - exact) / exact < 1e-6


def test_float64_stays_float64_and_passes_gradcheck():
    torch.manual_seed(5)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, dtype=torch.float64)
    chosen = T([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]]).bool()
    valid = T([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    assert ampo_loss(x, r, chosen, **AMPO).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda p: ampo_loss(p, r, chosen, **AMPO, alpha=0.5, valid_mask=valid), (x,))
    assert torch.autograd.gradcheck(
        lambda p: mpo_loss(p, torch.zeros_like(p), r, chosen, beta=0.5, alpha=0.3, weight_mode="signed",
                           valid_mask=valid), (x,))  # fmt: skip
    assert torch.autograd.gradcheck(lambda p: dpo_loss(p[:, 0], p[:, 1], p[:, 2], p[:, 3], beta=0.7), (x,))


def _closed_form_grad(z, pos, valid, log_gamma=0.0):
    """dL/dz = softmax_Y(z + log γ 1[Y-]) - 1[Y+] softmax_{Y+}(z): REFA Lemma 3; γ shifts the negatives' logits."""
    shifted = torch.where(pos, z, z + log_gamma)
    p_all = torch.softmax(torch.where(valid, shifted, -math.inf), -1)
    p_pos = torch.softmax(torch.where(pos, z, -math.inf), -1)
    return p_all - pos.float() * p_pos


def test_mpo_gradient_matches_closed_form():
    torch.manual_seed(1)
    z = torch.randn(4, 5, requires_grad=True)
    pos = T([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 1, 0, 1, 0], [1, 0, 1, 0, 1]]).bool()
    mpo_loss(z, torch.zeros(4, 5), torch.zeros(4, 5), pos, beta=1.0).sum().backward()
    close(z.grad, _closed_form_grad(z.detach(), pos, torch.ones(4, 5, dtype=torch.bool)), tol=1e-6)
    assert (z.grad[pos] < 0).all() and (z.grad[~pos] > 0).all()  # positives pushed up, negatives down


def test_ampo_gradient_matches_closed_form_with_gamma():
    # L = log(P + γN) - log P: dL/ds_i = γ^{1[i in Y-]} e^{s_i} / (P + γN) - 1[i in Y+] e^{s_i} / P
    torch.manual_seed(2)
    lp = torch.randn(3, 6, requires_grad=True)
    pos = torch.zeros(3, 6, dtype=torch.bool)
    pos[:, 0] = True
    valid = T([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1]]).bool()
    ampo_loss(lp, torch.zeros(3, 6), pos, beta=1.0, gamma=3.0, valid_mask=valid).sum().backward()
    expected = torch.where(valid, _closed_form_grad(lp.detach(), pos, valid, math.log(3.0)), 0.0)
    close(lp.grad, expected, tol=1e-6)


@pytest.mark.parametrize("weight_mode", ["none", "signed", "abs", "pow"])
def test_mpo_shift_invariance(weight_mode):
    torch.manual_seed(3)
    policy, ref, rewards = torch.randn(3, 4) * 5, torch.randn(3, 4) * 5, torch.randn(3, 4)
    chosen = rewards > rewards.mean(-1, keepdim=True)  # MPO's mean split
    kw = {"beta": 0.5, "alpha": 0.7, "weight_mode": weight_mode, "p": 2}
    base = mpo_loss(policy, ref, rewards, chosen, **kw)
    close(mpo_loss(policy + 123.0, ref, rewards, chosen, **kw), base, tol=1e-5)  # z + const
    close(mpo_loss(policy, ref, rewards - 40.0, chosen, **kw), base, tol=1e-5)  # rewards + const


def test_ampo_and_infonca_shift_invariance():
    torch.manual_seed(4)
    lp, rewards = torch.randn(3, 5) - 2, torch.randn(3, 5)
    chosen = best_member_mask(rewards)
    base = ampo_loss(lp, rewards, chosen, **AMPO, alpha=1.0)
    close(ampo_loss(lp - 7.0, rewards + 3.0, chosen, **AMPO, alpha=1.0), base, tol=1e-4)
    ref = torch.randn(3, 5)
    base = infonca_loss(lp, ref, rewards, beta=2.0, alpha=0.5)
    close(infonca_loss(lp + 9.0, ref, rewards - 2.0, beta=2.0, alpha=0.5), base, tol=1e-5)


@pytest.mark.parametrize("name", ["mpo", "ampo"])
def test_skipped_groups_give_zero_loss_and_gradient(name):
    # group 0 has both sets; group 1 has no chosen member; group 2 has no rejected member
    lp = torch.randn(3, 3, requires_grad=True)
    chosen = T([[True, False, False], [False, False, False], [True, True, True]])
    loss = (mpo_loss(lp, torch.zeros(3, 3), torch.zeros(3, 3), chosen, beta=1.0) if name == "mpo"
            else ampo_loss(lp, torch.zeros(3, 3), chosen, **AMPO))
    loss.sum().backward()
    assert group_is_trainable(chosen).tolist() == [True, False, False]
    assert loss[0] > 0 and loss[1:].tolist() == [0.0, 0.0]
    assert lp.grad[0].abs().sum() > 0 and lp.grad[1:].abs().sum() == 0 and torch.isfinite(lp.grad).all()


@pytest.mark.parametrize("name", ["mpo", "ampo", "infonca"])
def test_garbage_invalid_members_change_nothing(name):
    torch.manual_seed(5)
    lp, ref, rewards = torch.randn(2, 3) - 3, torch.randn(2, 3) - 3, torch.randn(2, 3)
    chosen = best_member_mask(rewards)

    def run(lp, ref, rewards, chosen, valid):
        lp = lp.clone().requires_grad_(True)
        fns = {
            "mpo": lambda: mpo_loss(lp, ref, rewards, chosen, beta=2.0, alpha=0.5, weight_mode="abs",
                                    valid_mask=valid),
            "ampo": lambda: ampo_loss(lp, rewards, chosen, **AMPO, alpha=0.5, valid_mask=valid),
            "infonca": lambda: infonca_loss(lp, ref, rewards, valid, beta=2.0),
        }
        loss = fns[name]()
        loss.sum().backward()
        return loss.detach(), lp.grad

    base_loss, base_grad = run(lp, ref, rewards, chosen, None)
    junk = T([[float("nan"), float("inf")], [1e30, -float("inf")]])  # 2 garbage members per group
    pad = lambda x, fill: torch.cat([x, fill], dim=1)
    valid = pad(torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool))
    loss, grad = run(pad(lp, junk), pad(ref, junk), pad(rewards, junk), pad(chosen, T([[True, True]] * 2)), valid)
    close(loss, base_loss, tol=1e-6)
    close(grad[:, :3], base_grad, tol=1e-6)
    assert grad[:, 3:].tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_bf16_inputs_are_computed_in_fp32():
    torch.manual_seed(6)
    lp, rewards = (torch.randn(4, 8) - 1).bfloat16(), torch.randn(4, 8).bfloat16()
    chosen = best_member_mask(rewards)
    out = ampo_loss(lp, rewards, chosen, **AMPO, alpha=1.0)
    assert out.dtype == torch.float32
    close(out, ampo_loss(lp.float(), rewards.float(), chosen, **AMPO, alpha=1.0), tol=1e-6)  # same rounded inputs
    policy, ref = (torch.randn(4, 8) * 30 - 300).bfloat16(), (torch.randn(4, 8) * 30 - 300).bfloat16()
    close(mpo_loss(policy, ref, rewards, chosen, beta=0.1),
          mpo_loss(policy.float(), ref.float(), rewards.float(), chosen, beta=0.1), tol=1e-6)


def test_large_beta_and_logps_stay_finite():
    # lp_bar = [-500, -500.1, -500.2], beta = 100: s differences [0, -10, -20];
    # L = log(1 + 3 (e^-10 + e^-20)) = 1.36197e-4 (raw exp(-50000) would be 0/0)
    lp = T([[-500.0, -500.1, -500.2]], requires_grad=True)
    loss = ampo_loss(lp, T([[1.0, 0, 0]]), T([[True, False, False]]), beta=100.0, gamma=3.0)
    loss.sum().backward()
    close(loss, [1.36197e-4], tol=2e-3)
    assert torch.isfinite(lp.grad).all()
    # MPO on summed log-probs ~ -500 with beta = 100: z = 100 [-1, -5, 10] = [-100, -500, 1000]
    policy = T([[-500.0, -510, -520]], requires_grad=True)
    loss = mpo_loss(policy, T([[-499.0, -505, -530]]), T([[1.0, 0, 0]]), T([[True, False, False]]), beta=100.0)
    loss.sum().backward()
    # L = LSE(-100, -500, 1000) - (-100) = 1000 + 100 = 1100 (up to e^-1100)
    close(loss, [1100.0], tol=1e-6)
    assert torch.isfinite(policy.grad).all()


# ----------------------------------------------------------------------------- registry and errors


def _batch(chosen):
    torch.manual_seed(7)
    b, m = chosen.shape
    return GroupBatch(policy_logps_sum=torch.randn(b, m) * 10 - 50, policy_logps_mean=torch.randn(b, m) - 1,
                      rewards=torch.randn(b, m), chosen_mask=chosen, valid_mask=torch.ones(b, m, dtype=torch.bool),
                      ref_logps_sum=torch.randn(b, m) * 10 - 50)


def test_registry_entries_and_adapters():
    assert sorted(LOSSES) == ["ampo", "dpo", "infonca", "mpo", "refa_infonca", "simpo"]
    batch = _batch(T([[False, True], [True, False]]))  # chosen is member 1, then member 0
    lp, ref = batch.policy_logps_sum, batch.ref_logps_sum
    expected = dpo_loss(T([lp[0, 1], lp[1, 0]]), T([lp[0, 0], lp[1, 1]]), T([ref[0, 1], ref[1, 0]]),
                        T([ref[0, 0], ref[1, 1]]), beta=0.1)
    close(group_loss("dpo", batch, beta=0.1), expected, tol=1e-6)
    close(group_loss("mpo", batch, beta=0.1), expected, tol=1e-5)
    mean = batch.policy_logps_mean
    close(group_loss("simpo", batch, beta=2.0, gamma_beta_ratio=0.5),
          simpo_loss(T([mean[0, 1], mean[1, 0]]), T([mean[0, 0], mean[1, 1]]), beta=2.0, gamma_beta_ratio=0.5))
    close(group_loss("ampo", batch, **AMPO), ampo_loss(mean, batch.rewards, batch.chosen_mask, **AMPO))


def test_registry_rows_say_what_the_trainer_needs():
    assert {n: (s.needs_ref, s.logps, s.pairwise) for n, s in LOSSES.items()} == {
        "dpo": (True, "sum", True), "simpo": (False, "mean", True), "mpo": (True, "sum", False),
        "ampo": (False, "mean", False), "infonca": (True, "sum", False), "refa_infonca": (False, "mean", False)}
    for name, spec in LOSSES.items():  # each row is keyed by its config's name, and the config finds its row
        assert spec.config().name == name and spec.config().spec is spec


# ----------------------------------------------------------------------------- the run config's `loss`


def test_loss_config_defaults_are_each_loss_own():
    assert {name: loss_config(name).loss_params() for name in LOSSES} == {
        "dpo": {"beta": 0.1},
        "simpo": {"beta": 10.0, "gamma_beta_ratio": 0.3},
        "mpo": {"beta": 0.1, "alpha": 0.0, "weight_mode": "abs", "p": 1},
        "ampo": {"beta": 10.0, "gamma": 3.0, "alpha": 0.0, "alpha_inside_beta": False},
        "infonca": {"beta": 0.1, "alpha": 1.0},
        "refa_infonca": {"beta": 10.0, "alpha": 1.0},
    }
    assert all(loss_config(name).eos_lambda == 0.0 for name in LOSSES)
    assert isinstance(loss_config("dpo", beta=0.5), DpoConfig) and loss_config("dpo", beta=0.5).beta == 0.5
    assert RunConfig(policy="p").loss == AmpoConfig()


@pytest.mark.parametrize(("loss", "message"), [
    ({"name": "dpo", "gamma": 5}, r"loss\.dpo\.gamma\s+Extra inputs are not permitted"),
    ({"name": "simpo", "alpha": 1.0}, r"loss\.simpo\.alpha\s+Extra inputs are not permitted"),
    ({"name": "ampo", "weight_mode": "abs"}, r"loss\.ampo\.weight_mode\s+Extra inputs"),
    ({"name": "orpo"}, r"Input tag 'orpo' found using 'name' does not match any of the expected tags: 'dpo', 'simpo'"),
    ({"beta": 1.0}, r"Unable to extract tag using discriminator 'name'"),
    ({"name": "ampo", "gamma": 0}, r"loss\.ampo\.gamma\s+Input should be greater than 0"),
    ({"name": "infonca", "alpha": 0}, r"loss\.infonca\.alpha\s+Input should be greater than 0"),
    ({"name": "mpo", "p": 3}, r"loss\.mpo\.p\s+Input should be less than or equal to 2"),
])
def test_a_field_the_loss_does_not_take_is_refused_by_name(loss, message):
    with pytest.raises(ValidationError, match=message):
        RunConfig(policy="p", loss=loss)


def test_loss_config_round_trips_and_the_shipped_yaml_loads(tmp_path):
    cfg = RunConfig(policy="p", loss={"name": "mpo", "alpha": 0.5, "weight_mode": "pow", "p": 2})
    assert isinstance(cfg.loss, MpoConfig) and RunConfig.model_validate_json(cfg.model_dump_json()) == cfg
    for path in sorted(Path(__file__).parents[1].glob("infra/configs/*.yaml")):
        assert isinstance(load_config(path).loss, LossParams), path
    (tmp_path / "dpo.yaml").write_text("policy: p\nloss:\n  name: dpo\n  beta: 0.2\n")
    assert load_config(tmp_path / "dpo.yaml", {"loss.eos_lambda": 0.1}).loss == DpoConfig(beta=0.2, eos_lambda=0.1)
    with pytest.raises((ValidationError, ValueError), match=r"loss\.dpo\.gamma"):
        load_config(tmp_path / "dpo.yaml", {"loss.gamma": 5})
    # a section given whole, then one of its fields: both apply, and the caller's dict is left as it was
    section = {"name": "dpo"}
    assert load_config(tmp_path / "dpo.yaml", {"loss": section, "loss.nll_weight": 0.5}).loss == DpoConfig(
        nll_weight=0.5)
    assert section == {"name": "dpo"}


def test_registry_errors_and_trainable_groups():
    batch = _batch(T([[True, True, False], [False, False, False]]))
    with pytest.raises(ValueError, match="unknown loss 'orpo'; choose from"):
        group_loss("orpo", batch)
    with pytest.raises(ValueError, match="exactly 1 chosen and 1 rejected"):
        group_loss("dpo", batch, beta=0.1)
    no_ref = GroupBatch(batch.policy_logps_sum, batch.policy_logps_mean, batch.rewards, batch.chosen_mask,
                        batch.valid_mask)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        group_loss("mpo", no_ref, beta=0.1)
    assert trainable_groups("ampo", batch).tolist() == [True, False]
    assert trainable_groups("infonca", batch).tolist() == [True, True]


def test_bad_hyperparameters_raise():
    lp, r, c = torch.zeros(1, 2), T([[1.0, 0]]), T([[True, False]])
    with pytest.raises(ValueError, match="gamma=0.0 must be > 0"):
        ampo_loss(lp, r, c, beta=10.0, gamma=0.0)
    with pytest.raises(ValueError, match="beta=-1.0 must be > 0"):
        mpo_loss(lp, lp, r, c, beta=-1.0)
    with pytest.raises(ValueError, match="unknown weight_mode 'sqrt'"):
        mpo_loss(lp, lp, r, c, beta=1.0, weight_mode="sqrt")
    with pytest.raises(ValueError, match="p=3"):
        mpo_loss(lp, lp, r, c, beta=1.0, weight_mode="pow", p=3)
    with pytest.raises(ValueError, match="lam=-1"):
        eos_regularizer(lp, lp, lam=-1.0)


def test_mismatched_shapes_are_refused_not_broadcast():
    lp, r = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"inputs must all have one shape \(B, M\); got .*'chosen_mask': \(3,\)"):
        ampo_loss(lp, r, T([True, False, False]), **AMPO)  # (M,) would broadcast over the batch
    with pytest.raises(ValueError, match=r"valid_mask has shape \(3,\); it must match \(2, 3\)"):
        mpo_loss(lp, lp, r, lp.bool(), beta=0.1, valid_mask=T([True, True, False]))
    with pytest.raises(ValueError, match=r"one shape \(B,\)"):
        dpo_loss(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(1), beta=0.1)
    with pytest.raises(ValueError, match=r"one shape \(B, M\)"):
        infonca_loss(lp, lp[:, :2], r, beta=0.1)


def test_reading_a_run_config_does_not_import_torch():
    # the loss configs live in ampo/losses.py, which imports torch on first use: the CLI and the flows read
    # configs without paying torch's import
    code = ("import sys\nfrom ampo.config import RunConfig\nRunConfig(policy='p', loss={'name': 'dpo'})\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
