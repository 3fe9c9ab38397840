"""What a resumed stage and a resumed round record: stage counts are totals over attempts, and a round is complete
only once its report is written, so a kill between promote and the report resumes the same round."""

from pathlib import Path

import pyarrow.compute as pc
import pytest

from ampo import stages
from ampo.config import load_config
from ampo.stages import STAGES, next_round, run_stage
from ampo.stages.context import open_store

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "infra" / "configs" / "smoke.yaml"


def smoke_config(tmp_path, **overrides):
    base = {"store.uri": str(tmp_path / "store"), "runtime.workdir": str(tmp_path / "work")}
    return load_config(SMOKE, {**base, **overrides})


def test_generate_counts_are_totals_over_a_failed_attempt_and_its_resume(tmp_path, monkeypatch):
    import ampo.generation
    import ampo.stages.data

    cfg = smoke_config(tmp_path, **{"prompts.per_round": 4, "generation.max_new_tokens": 4})
    n = cfg.generation.n
    monkeypatch.setattr(ampo.stages.data, "GENERATE_BATCH", 2)  # 2 batches of 2 prompts; the attempt dies in the 2nd
    real = ampo.generation.make_generator

    class DiesOnSecondBatch:
        def __init__(self, *args):
            self.inner, self.calls = real(*args), 0

        def generate(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("killed mid-stage")
            return self.inner.generate(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()

    monkeypatch.setattr(ampo.generation, "make_generator", DiesOnSecondBatch)
    with pytest.raises(RuntimeError, match="killed mid-stage"):
        run_stage("generate", cfg, "p", 0)
    store = open_store(cfg)
    first = store.read_rows("p", 0, ["finish_reason"])["finish_reason"]
    assert len(first) == 2 * n  # the first batch committed
    monkeypatch.setattr(ampo.generation, "make_generator", real)
    counts = run_stage("generate", cfg, "p", 0)["counts"]
    rows = store.read_rows("p", 0, ["finish_reason"])["finish_reason"]
    by_length = pc.sum(pc.equal(rows, "length")).as_py() or 0
    assert by_length > pc.sum(pc.equal(first, "length")).as_py()  # both attempts stopped some on length
    assert counts["prompts_already_done"] == 2 and counts["generated_now"] == 2 * n  # this attempt
    assert counts["responses"] == len(rows) == 4 * n and counts["finished_by_length"] == by_length  # all attempts


def test_score_counts_are_totals_over_a_failed_attempt_and_its_resume(tmp_path, monkeypatch):
    import ampo.stages.data

    (tmp_path / "ampo_test_flaky.py").write_text(
        "import math\nCALLS = [0]\nFAIL_ON = [2]\n"
        "def score(prompts, responses):\n"
        "    CALLS[0] += 1\n"
        "    if CALLS[0] == FAIL_ON[0]:\n"
        "        raise RuntimeError('killed mid-stage')\n"
        "    return [math.nan if len(r) % 2 else float(len(r)) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = smoke_config(tmp_path, **{"prompts.per_round": 2, "reward.on_nonfinite": "drop",
                                    "reward.components": [{"kind": "python", "function": "ampo_test_flaky:score"}]})
    monkeypatch.setattr(ampo.stages.data, "SCORE_BATCH", 4)  # 12 responses: 3 chunks, the attempt dies in the 2nd
    run_stage("generate", cfg, "s", 0)
    with pytest.raises(Exception, match="killed mid-stage"):
        run_stage("score", cfg, "s", 0)
    counts = run_stage("score", cfg, "s", 0)["counts"]
    rows = open_store(cfg).read_rows("s", 0, ["response", "reward", "dropped_reason"])
    odd = sum(len(r) % 2 for r in rows["response"].to_pylist())  # dropped: the reward is NaN for odd lengths
    assert counts["already_scored"] == 4  # the first attempt's first chunk
    assert counts["dropped"] == odd == rows.num_rows - rows["dropped_reason"].null_count
    assert counts["scored"] == 12 - odd == rows.num_rows - rows["reward"].null_count


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_a_kill_between_promote_and_the_report_resumes_the_round_and_writes_it(tmp_path, prefect_harness):
    from flows.self_play import self_play_round

    cfg = smoke_config(tmp_path, **{"prompts.per_round": 2, "eval.max_prompts": 2})
    for name in STAGES:  # the whole round, then "killed" before the flow's report step
        run_stage(name, cfg, "k", 0)
    report = Path(cfg.runtime.workdir) / "runs" / "k" / "round-0" / "report"
    assert not report.exists()
    assert next_round(cfg, "k") == 0  # not moved on: round 0 has no report yet
    result = self_play_round(cfg, "k")  # the next run resumes round 0: every stage skipped, the report written
    assert result["round"] == 0 and (report / "summary.md").is_file() and (report / stages.report.REPORTED).is_file()
    records = open_store(cfg).stage_status("k", 0)
    assert all(records[s]["attempts"] == 1 for s in STAGES)  # no stage ran twice
    assert next_round(cfg, "k") == 1
