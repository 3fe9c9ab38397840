"""Round reports: statistics by hand, the projection's properties, plots written as real PNG files."""

from pathlib import Path

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


def test_excerpt_is_one_line_and_cut_with_an_ellipsis():
    assert report.excerpt("a\n\n b\tc\x00d", 80) == "a b cd"  # whitespace runs -> one space, control chars dropped
    assert report.excerpt("x" * 10, 10) == "x" * 10
    assert report.excerpt("abcd efgh", 6) == "abcd\u2026"  # 5 characters kept, trailing space stripped, then "…"
    assert report.excerpt("<img src=x onerror=alert(1)> | pipe", 80) == "<img src=x onerror=alert(1)> | pipe"


def test_selection_rows_by_hand():
    # prompt a: rows 0-3, rewards .9 (chosen) .1 (rejected) .5 (rejected) .3 (unselected); prompt b: no group
    offsets = np.array([0, 4, 6])
    ids = np.array(["a"] * 4 + ["b"] * 2, dtype=object)
    prompts = np.array(["Say\nhi"] * 4 + ["other"] * 2, dtype=object)
    responses = np.array(["best", "worst", "middle", "unused", "u", "v"], dtype=object)
    rewards = np.array([0.9, 0.1, 0.5, 0.3, 0.2, 0.2])
    roles = np.array(["chosen", "rejected", "rejected", "", "", ""], dtype=object)
    (row,) = report.selection_rows(offsets, ids, prompts, responses, rewards, roles)
    assert row == {"prompt_id": "a", "prompt": "Say hi", "pool": 4, "pool_reward_range": "0.1 .. 0.9",
                   "chosen_reward": 0.9, "chosen": "best",
                   "rejected_rewards": "0.5, 0.1",  # best first
                   "worst_rejected": "worst"}


class ListLogger:
    def __init__(self):
        self.lines = []

    def info(self, fmt, *args):
        self.lines.append(fmt % args)


def test_log_progress_lines_per_tenth_throttled_and_the_last():
    from ampo.progress import LogProgress

    now = [0.0]
    log = ListLogger()
    progress = LogProgress(log, every=0.1, min_interval_s=5.0, clock=lambda: now[0])
    for done in range(101):  # one unit per second: 0..100 of 100
        now[0] = float(done)
        progress("train", done, 100)
    progress("train", 100, 100)  # repeated end: not logged again
    # first call at 0; then a new tenth at 10, 20, ... (each >= 5 s after the last line); the end once
    assert log.lines == [f"train: {d}/100 ({d}%)" for d in range(0, 101, 10)]
    log.lines.clear()
    now[0] = 0.0
    fast = LogProgress(log, every=0.1, min_interval_s=5.0, clock=lambda: now[0])
    for done in range(101):  # all at once: only the first and the last line
        fast("generate", done, 100)
    assert log.lines == ["generate: 0/100 (0%)", "generate: 100/100 (100%)"]


def test_plots_artifact_embeds_each_png_as_a_data_uri(tmp_path):
    """Failed before: the artifact linked the PNGs by disk path, which the Prefect UI cannot load."""
    import base64
    import re

    from tasks.stage_tasks import plots_markdown

    rng = np.random.default_rng(2)
    paths = [str(report.plot_reward_distribution(rng.normal(size=30), rng.normal(size=6), tmp_path / "rewards.png")),
             str(report.plot_rounds([{"round": 0, "champion_reward": 0.1, "candidate_reward": 0.2, "win_rate": 0.5}],
                                    tmp_path / "rounds.png"))]
    md = plots_markdown(paths)
    images = re.findall(r"!\[(\w+)\]\(([^)]*)\)", md)
    assert [name for name, _ in images] == ["rewards", "rounds"]
    for (_, target), path in zip(images, paths):
        assert target.startswith("data:image/png;base64,")
        assert base64.b64decode(target.removeprefix("data:image/png;base64,")) == Path(path).read_bytes()


def test_metric_rows_flatten_nested_metrics():
    from tasks.stage_tasks import metric_rows

    metrics = {"n_prompts": 6, "win_rate": {"value": 0.5, "lower": 0.24999999999999997}, "bounds": [0.1, 0.2]}
    assert metric_rows(metrics) == [{"metric": "n_prompts", "value": 6}, {"metric": "win_rate.value", "value": 0.5},
                                    {"metric": "win_rate.lower", "value": 0.25},
                                    {"metric": "bounds", "value": "0.1, 0.2"}]


def _stage_tables(monkeypatch, fail: str | None = None):
    """StageTables whose publication, instead of calling Prefect, records the artifact keys, a context variable's value
    as the job saw it, and whether the caller went on before the job ended; the selection comes from a stub store.
    `fail`: the artifact key suffix whose publication raises."""
    import contextvars
    import threading

    import tasks.stage_tasks as st
    from ampo import stages

    seen, where = [], contextvars.ContextVar("where", default="unset")
    started = threading.Event()

    def publish(artifacts):
        off_path = started.wait(5)  # False if stage_done waited for the publication (the round's path)
        keys = [key for _, _, key, _ in artifacts]
        seen.append((keys, where.get(), off_path, [data for _, data, _, _ in artifacts]))
        if fail and any(key.endswith(fail) for key in keys):
            raise OSError(f"server refused {fail}")

    monkeypatch.setattr(st, "publish_concurrently", publish)
    monkeypatch.setattr(stages, "own_store", lambda cfg: "own store")
    monkeypatch.setattr(stages, "selection_report", lambda store, run, round_: {
        "table": [{"statistic": "selection/prompts", "value": 2, "store": store}], "rows": []})
    return st.StageTables("cfg", "Run_1", 3), seen, where, started


def test_stage_tables_publish_after_select_and_evaluate_in_the_flow_context(monkeypatch):
    tables, seen, where, started = _stage_tables(monkeypatch)
    where.set("flow run")
    with tables:
        for name in ("generate", "score", "embed", "select", "reflogps", "train", "evaluate", "promote"):
            metrics = {"win_rate": {"value": 0.5}} if name == "evaluate" else {}
            tables.stage_done(name, {"status": "done", "metrics": metrics})
            started.set()
    # after select: the statistics and the groups (an empty table: none selected, which replaces what an earlier
    # attempt may have published under the key); after evaluate: the metrics
    selection = [{"statistic": "selection/prompts", "value": 2, "store": "own store"}]
    assert sorted(seen) == [(["run-1-r3-evaluation"], "flow run", True, [[{"metric": "win_rate.value", "value": 0.5}]]),
                            (["run-1-r3-selection", "run-1-r3-groups"], "flow run", True, [selection, []])]


def test_stage_tables_of_skipped_stages_publish_their_records(monkeypatch):
    tables, seen, _, started = _stage_tables(monkeypatch)
    started.set()
    with tables:  # a resumed round: evaluate finished in an earlier flow run; its record still holds the metrics
        tables.stage_done("evaluate", {"status": "done", "skipped": True, "metrics": {"n_prompts": 6}})
    assert seen == [(["run-1-r3-evaluation"], "unset", True, [[{"metric": "n_prompts", "value": 6}]])]


def test_a_failed_publication_fails_the_round_only_when_the_round_itself_did_not(monkeypatch, caplog):
    tables, _, _, started = _stage_tables(monkeypatch, fail="selection")
    started.set()
    with pytest.raises(OSError, match="server refused selection"), tables:  # raised when leaving the block
        tables.stage_done("select", {})
    assert caplog.text.count("round artifact not published: OSError: server refused selection") == 1
    tables, _, _, started = _stage_tables(monkeypatch, fail="selection")
    started.set()
    with pytest.raises(RuntimeError, match="train crashed"), tables:  # the round's own error wins; theirs is logged
        tables.stage_done("select", {})
        raise RuntimeError("train crashed")
    assert caplog.text.count("round artifact not published: OSError: server refused selection") == 2
