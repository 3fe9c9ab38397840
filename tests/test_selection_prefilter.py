"""Prefilters before the selector: pools without reward spread, alignment potential; in the select stage,
counted in the stage counts, the report and the audit."""

import numpy as np
import pytest

from ampo import report
from ampo.audit import runs_overview
from ampo.config import RunConfig
from ampo.schema import candidate_id
from ampo.selection import pair_margins
from ampo.selection.prefilter import (
    informative,
    potential_mask,
    potential_scores,
    reward_spread,
)
from ampo.stages import data
from ampo.stages.context import RoundContext, open_store

NAN = np.nan


def test_reward_spread_by_hand_ignores_the_padding():
    rewards = np.array([[0.5, 0.5, 0.5], [0.0, 1.0, NAN], [2.0, -1.0, 0.5]])
    np.testing.assert_array_equal(reward_spread(rewards, [3, 2, 3]), [0.0, 1.0, 3.0])  # 1 - 0; 2 - (-1)
    np.testing.assert_array_equal(reward_spread(rewards, [3, 1, 2]), [0.0, 0.0, 3.0])  # a pool of 1: spread 0


def test_informative_threshold_uniform_spread_and_exactly_at_it():
    # spreads 0 (uniform), 0.25 (exactly at the threshold: kept), 0.125 (below: skipped), 1; all exact binary
    rewards = np.array([[0.5, 0.5, 0.5], [0.25, 0.5, 0.5], [0.375, 0.5, 0.5], [0.0, 1.0, 0.5]])
    lengths = [3, 3, 3, 3]
    assert informative(rewards, lengths, 0.25).tolist() == [False, True, False, True]
    assert informative(rewards, lengths, 1e-6).tolist() == [False, True, True, True]  # the default: uniform only
    assert informative(rewards, lengths, 0.0).tolist() == [True, True, True, True]  # 0 keeps every pool
    with pytest.raises(ValueError, match=r"min_spread=-1 must be a number >= 0"):
        informative(rewards, lengths, -1)


def test_pair_margins_of_padded_pools_equal_each_pool_alone():
    rng = np.random.default_rng(0)
    rewards, logps = np.round(rng.standard_normal((20, 7)), 1), rng.standard_normal((20, 7))  # rounded: ties
    full = pair_margins(rewards, logps, np.full(20, 7))
    for key, value in pair_margins(rewards, logps).items():
        np.testing.assert_array_equal(full[key], value)
    lengths = rng.integers(2, 8, 20)
    padded_r, padded_l = rewards.copy(), logps.copy()
    padded_r[np.arange(7) >= lengths[:, None]] = NAN  # padding is never read
    varying = pair_margins(padded_r, padded_l, lengths)
    for p, n in enumerate(lengths):
        one = pair_margins(rewards[p : p + 1, :n], logps[p : p + 1, :n])
        assert {key: value[p] for key, value in varying.items()} == {key: value[0] for key, value in one.items()}


def test_potential_mask_by_hand():
    # pairs (chosen = argmax, rejected = argmin of the others): rm = [1, .5, 1, .5], |logp margin| = [0, 2, 1, 0]
    # z(rm) = [1, -1, 1, -1] (mean .75, std .25); z(lp): mean .75, std sqrt(2.75 / 4) = .8292
    #   -> [-.9045, 1.5076, .3015, -.9045]
    # M_AP (w=1) = [1.9045, -2.5076, .6985, -.0955]: the top half (K = int(.5 * 4) = 2) is pools 0 and 2
    # M_AP (w=2) = [2.8090, -4.0151, .3970, .8090]: pools 0 and 3
    rewards = np.array([[0.0, 1.0, 0.5], [0.0, 0.5, 0.2], [1.0, 0.0, 0.2], [0.1, 0.6, NAN]])
    logps = np.array([[-1.0, -1.0, -2.0], [-1.0, -3.0, -2.0], [-2.0, -1.0, -1.0], [-1.5, -1.5, NAN]])
    lengths = [3, 3, 3, 2]
    np.testing.assert_allclose(potential_scores(rewards, logps, lengths), [1.9045, -2.5076, 0.6985, -0.0955],
                               atol=1e-4)  # fmt: skip
    assert potential_mask(rewards, logps, lengths, fraction=0.5).tolist() == [True, False, True, False]
    assert potential_mask(rewards, logps, lengths, fraction=0.5, logp_weight=2.0).tolist() == [
        True, False, False, True
    ]  # fmt: skip
    assert potential_mask(rewards, logps, lengths, fraction=1.0).all()
    spoiled = logps.copy()
    spoiled[1, 1] = NAN
    with pytest.raises(ValueError, match=r"pool 1: rewards and logps must be finite; reward 0.5, logp nan at 1"):
        potential_mask(rewards, spoiled, lengths, fraction=0.5)


# ------------------------------------------------------------------------------------------------------------
# the select stage on a real store

POOLS = {  # prompt id -> rewards of samples 0..3 (all exact in binary)
    "a": [0.5, 0.5, 0.5, 0.5],  # uniform: spread 0
    "b": [0.0, 1.0, 0.5, 0.25],  # spread 1
    "c": [0.25, 0.5, 0.5, 0.5],  # spread 0.25
    "d": [0.375, 0.5, 0.5, 0.5],  # spread 0.125
}
LOGPS = {"a": [-1.0] * 4, "b": [-1.0, -1.0, -2.0, -2.0], "c": [-1.0, -2.0, -2.0, -2.0], "d": [-1.0, -1.5, -1.0, -1.0]}


def stage_context(tmp_path, with_logps=True, **selection) -> RoundContext:
    cfg = RunConfig.model_validate({"policy": "x", "store": {"uri": str(tmp_path / "store")}, "embedding": {"dim": 2},
                                    "generation": {"n": 4}, "selection": {"method": "bottomk", "k": 2, **selection}})  # fmt: skip
    store = open_store(cfg)
    if store.count("r", 0) == 0:
        rows = []
        for pid, rewards in POOLS.items():
            for s, r in enumerate(rewards):
                row = {"id": candidate_id("r", 0, pid, s), "run": "r", "round": 0, "prompt_id": pid, "sample": s,
                       "prompt": f"prompt {pid}", "response": f"response {s}", "n_tokens": 5, "finish_reason": "stop",
                       "seed": 1, "policy": "init", "reward": r, "vector": np.array([s, 1.0], np.float32)}  # fmt: skip
                if with_logps:
                    row["gen_logp_mean"] = LOGPS[pid][s]
                rows.append(row)
        store.upsert_candidates(rows)
    return RoundContext(cfg, "r", 0, store)


def roles_by_prompt(ctx) -> dict:
    rows = ctx.store.read_rows("r", 0, ["prompt_id", "sample", "role"]).to_pylist()
    out = {}
    for row in rows:
        if row["role"]:
            out.setdefault(row["prompt_id"], {}).setdefault(row["role"], []).append(row["sample"])
    return out


def test_select_stage_skips_and_counts_pools_without_spread(tmp_path):
    ctx = stage_context(tmp_path, min_reward_spread=0.25, drop_tied_negatives=False)
    counts = data.select(ctx)
    # a (spread 0) and d (0.125 < 0.25) are skipped; c (spread 0.25 = the threshold) is kept
    assert counts["skipped_no_spread"] == 2 and counts["groups"] == 2 and counts["selected"] == 6
    # bottomk k=2: b: best 1 (r=1), two lowest 0 (0), 3 (.25); c: best 1 (first .5), lowest 0 (.25), then 2 (.5)
    assert roles_by_prompt(ctx) == {"b": {"chosen": [1], "rejected": [0, 3]},
                                    "c": {"chosen": [1], "rejected": [0, 2]}}  # fmt: skip
    # the default threshold (1e-6) skips only the uniform pool; 0 keeps every pool (the earlier picks are replaced)
    assert data.select(stage_context(tmp_path, drop_tied_negatives=False))["skipped_no_spread"] == 1
    assert set(roles_by_prompt(ctx)) == {"b", "c", "d"}
    assert data.select(stage_context(tmp_path, min_reward_spread=0, drop_tied_negatives=False))["skipped_no_spread"] == 0
    assert set(roles_by_prompt(ctx)) == {"a", "b", "c", "d"}
    # everything skipped: no group, nothing selected, no error here (train then says there is nothing to train)
    assert data.select(stage_context(tmp_path, min_reward_spread=2.0))["groups"] == 0
    assert roles_by_prompt(ctx) == {}


def test_select_stage_drops_negatives_tied_with_the_chosen_reward(tmp_path):
    # bottomk k=2 on the informative pools b, c, d (a is uniform, skipped):
    # b [0, 1, .5, .25]: chosen 1 (r=1), negatives 0 (0) and 3 (.25): both below 1, kept
    # c [.25, .5, .5, .5]: chosen 1 (first .5), negatives 0 (.25) and 2 (.5): 2 ties with .5, dropped
    # d [.375, .5, .5, .5]: chosen 1, negatives 0 (.375) and 2 (.5): 2 dropped
    ctx = stage_context(tmp_path)
    counts = data.select(ctx)
    assert (counts["dropped_tied_negatives"], counts["groups"], counts["selected"]) == (2, 3, 3 + 2 + 2)  # selected: b 1 + 2, c 1 + 1, d 1 + 1
    assert roles_by_prompt(ctx) == {"b": {"chosen": [1], "rejected": [0, 3]}, "c": {"chosen": [1], "rejected": [0]},
                                    "d": {"chosen": [1], "rejected": [0]}}  # fmt: skip
    # k=3 on pool a kept (spread 0 allowed): chosen 0, negatives 1, 2, 3 all tie -> the group is skipped, counted
    counts = data.select(stage_context(tmp_path, min_reward_spread=0, k=3))
    assert counts["skipped_prompts"] == 1 and "a" not in roles_by_prompt(ctx)
    assert counts["dropped_tied_negatives"] == 3 + 0 + 2 + 2  # a: 3; b: none; c: samples 2, 3; d: samples 2, 3
    # off: the spec's groups exactly (ties stay)
    counts = data.select(stage_context(tmp_path, drop_tied_negatives=False))
    assert counts["dropped_tied_negatives"] == 0 and roles_by_prompt(ctx)["c"]["rejected"] == [0, 2]


def test_skipped_pools_reach_the_report_and_the_audit(tmp_path):
    ctx = stage_context(tmp_path, min_reward_spread=0.25)
    counts = data.select(ctx)
    ctx.store.stage_started("r", 0, "select")
    ctx.store.stage_done("r", 0, "select", counts=counts, seconds=0.1)
    stages = ctx.store.stage_status("r", 0)
    markdown = report.markdown_summary("r", 0, stages, {}, None)
    assert "| pools skipped: reward spread below selection.min_reward_spread | 2 |" in markdown
    assert "| pools skipped: below the alignment-potential cut (selection.potential) | 0 |" in markdown
    # kept pools b and c (bottomk k=2): c [.25, .5, .5, .5] drops its second negative (.5 = the chosen reward)
    assert "| negatives dropped: reward tied with the chosen one's (selection.drop_tied_negatives) | 1 |" in markdown
    (row,) = runs_overview(ctx.store)
    assert row["skipped_no_spread"] == 2


def test_potential_prefilter_keeps_the_top_fraction_by_m_ap(tmp_path):
    # informative pools b, c, d (a is uniform). Best-vs-worst pairs: b 1 vs 0: rm 1, |logp margin| |-1 - -1| = 0;
    # c 1 vs 0: rm .25, |-2 - -1| = 1; d 1 vs 0: rm .125, |-1.5 - -1| = .5.
    # z(rm) = [1.402, -.539, -.863], z(lp) = [-1.225, 1.225, 0] -> M_AP = [2.627, -1.764, -.863]: order b, d, c
    ctx = stage_context(tmp_path, potential={"fraction": 0.5})  # K = int(.5 * 3) = 1: b
    counts = data.select(ctx)
    assert (counts["skipped_no_spread"], counts["skipped_low_potential"], counts["groups"]) == (1, 2, 1)
    assert set(roles_by_prompt(ctx)) == {"b"}
    counts = data.select(stage_context(tmp_path, potential={"fraction": 0.7}))  # K = int(2.1) = 2: b and d
    assert counts["skipped_low_potential"] == 1 and set(roles_by_prompt(ctx)) == {"b", "d"}


def test_potential_prefilter_refuses_without_sampling_logps(tmp_path):
    ctx = stage_context(tmp_path, with_logps=False, potential={"fraction": 0.5})
    with pytest.raises(ValueError, match=r"selection.potential needs the sampling log-prob \(gen_logp_mean\) of "
                                         r"every response it ranks; 12 of 12 have none, the first in prompt id 'b'"):  # fmt: skip
        data.select(ctx)
    assert data.select(stage_context(tmp_path, with_logps=False))["groups"] == 3  # without the prefilter: fine
