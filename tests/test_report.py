"""Round reports: statistics by hand, the projection's properties, plots written as real PNG files."""

import numpy as np
import pytest

from ampo import report


def test_selection_stats_by_hand():
    # two prompts: rows 0-2 (rewards 1, .5, 0) and rows 3-4 (rewards .2, .2)
    offsets = np.array([0, 3, 5])
    rewards = np.array([1.0, 0.5, 0.0, 0.2, 0.2])
    roles = np.array(["chosen", "", "rejected", "", ""])
    s = report.selection_stats(offsets, rewards, roles)
    assert s["selection/prompts"] == 2 and s["selection/prompts_with_group"] == 1
    assert s["selection/selected"] == 2
    assert s["selection/chosen_reward_mean"] == 1.0 and s["selection/rejected_reward_mean"] == 0.0
    # spans: prompt 0: 1 - 0 = 1; prompt 1: 0 -> mean 0.5
    assert s["selection/pool_reward_span_mean"] == pytest.approx(0.5)
    assert s["selection/pool_reward_mean"] == pytest.approx(1.9 / 5)


def test_project_2d_is_pca_and_deterministic():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2)) * [5.0, 0.5]  # variance mostly along axis 0
    x = np.concatenate([x, np.zeros((40, 3))], axis=1)
    xy = report.project_2d(x)
    assert xy.shape == (40, 2)
    # the first component carries the large-variance axis: |corr(PC1, x0)| ~ 1
    assert abs(np.corrcoef(xy[:, 0], x[:, 0])[0, 1]) > 0.99
    np.testing.assert_allclose(xy, report.project_2d(x))
    np.testing.assert_allclose(report.project_2d(x[:1]), np.zeros((1, 2)))


def test_markdown_summary_lists_stages_and_decision():
    stages = {"generate": {"status": "done", "seconds": 2.0, "counts": {"responses": 8}}}
    md = report.markdown_summary("r1", 0, stages, {"selection/selected": 4.0}, {"passed": False, "reasons": ["x: FAIL"]})
    assert "| generate | done | 2.0 | responses=8 |" in md
    assert "| train | not run | | |" in md
    assert "**rejected**" in md and "- x: FAIL" in md


def test_plots_write_png(tmp_path):
    rng = np.random.default_rng(1)
    paths = [
        report.plot_reward_distribution(rng.normal(size=50), rng.normal(size=8), tmp_path / "a.png"),
        report.plot_embedding_map(
            rng.normal(size=(12, 5)), np.repeat([0, 1], 6), np.array(["chosen", "rejected", ""] * 4), tmp_path / "b.png"
        ),
        report.plot_rounds(
            [{"round": 0, "champion_reward": 0.4, "candidate_reward": 0.5, "win_rate": 0.6}], tmp_path / "c.png"
        ),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
