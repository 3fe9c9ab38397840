"""Reference log-probs: equal to a plain per-sequence forward, independent of batching, eval mode, and a DPO
trainer fed them starts at log 2 (policy = reference)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ampo.config import RuntimeConfig, TrainConfig
from ampo.logps import build_example, sequence_logps
from ampo.losses import loss_config
from ampo.models import build_tiny_llama
from ampo.reflogps import as_groups, compute_reference_logps, with_reference
from ampo.trainer import make_loss_fn, train
from ampo.training_data import Group, tokenize_groups

CPU = RuntimeConfig(device="cpu")
CFG = TrainConfig(max_length=64, max_prompt_length=32, groups_per_step=2, grad_accum=1, lr=1e-3, warmup_ratio=0.0)

GROUPS = [
    Group("a", "Write a short poem about the sea.", ["The cat finds a quiet garden.", "the river", "A robot paints."],
          [1.0, 0.0, -1.0], [True, False, False]),
    Group("b", "Answer in exactly three words.", ["My friend builds.", "An old map remembers the night sky?"],
          [0.5, -0.5], [True, False]),
    Group("c", "Do not use any commas in your answer.", ["The teacher answers again!", "a small bird visits"],
          [2.0, 1.0], [True, False]),
]


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("policy") / "tiny", seed=1))


def per_sequence(policy: str, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The naive reference: each (prompt, response) alone through the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt, response in pairs:
            e = build_example(tokenizer, prompt, response, max_length=64, max_prompt_length=32)
            logits = model(input_ids=torch.tensor([e.input_ids])).logits
            out.append([t.item() for t in sequence_logps(logits, torch.tensor([e.labels]))])
    total, mean, n = np.array(out).T
    return total, mean, n


def test_reference_logps_equal_a_per_sequence_forward(policy):
    ref = compute_reference_logps(policy, GROUPS, CFG, CPU)
    pairs = [(g.prompt, r) for g in GROUPS for r in g.responses]
    total, mean, n = per_sequence(policy, pairs)
    np.testing.assert_allclose(ref.sum, total, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ref.mean, mean, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(ref.n_tokens, n.astype(np.int64))
    np.testing.assert_allclose(ref.mean, ref.sum / ref.n_tokens, rtol=1e-6)  # fp32 division
    one_by_one = compute_reference_logps(policy, GROUPS, CFG.model_copy(update={"groups_per_step": 1}), CPU)
    np.testing.assert_allclose(one_by_one.sum, ref.sum, atol=1e-5, rtol=0)  # batching does not change values
    from_pairs = compute_reference_logps(policy, pairs, CFG, CPU)
    np.testing.assert_allclose(from_pairs.sum, ref.sum, atol=1e-5, rtol=0)


def test_reference_logps_run_in_eval_mode(policy, tmp_path):
    # with attention dropout 0.1 a train-mode forward would be random; eval mode equals the dropout-free model
    noisy = tmp_path / "noisy"
    shutil.copytree(policy, noisy)
    config = json.loads((noisy / "config.json").read_text())
    (noisy / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    np.testing.assert_array_equal(compute_reference_logps(str(noisy), GROUPS, CFG, CPU).sum,
                                  compute_reference_logps(policy, GROUPS, CFG, CPU).sum)


def test_pairs_group_by_consecutive_prompt():
    groups = as_groups([("p", "x"), ("p", "y"), ("q", "z"), ("p", "w")])
    assert [(g.prompt, g.responses) for g in groups] == [("p", ["x", "y"]), ("q", ["z"]), ("p", ["w"])]
    with pytest.raises(ValueError, match="pairs"):
        as_groups([("p", "x", "y")])


def test_with_reference_fills_groups_in_order(policy):
    ref = compute_reference_logps(policy, GROUPS, CFG, CPU)
    filled = with_reference(GROUPS, ref)
    assert filled[1].ref_logp_sum == ref.sum[3:5].tolist() and filled[2].ref_logp_mean == ref.mean[5:7].tolist()
    with pytest.raises(ValueError, match="7 responses"):
        with_reference(GROUPS, ref._replace(sum=ref.sum[:6]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dpo_with_its_own_reference_starts_at_log_two(policy, tmp_path, dtype):
    # policy = reference -> every log-ratio is 0 -> DPO loss -log sigmoid(0) = log 2 = 0.693147 for each pair;
    # in bf16 autocast too, since the reference runs in the trainer's precision
    cfg = CFG.model_copy(update={"groups_per_step": 3, "dtype": dtype})
    pairs = [Group(g.prompt_id, g.prompt, g.responses[:2], g.rewards[:2], [True, False]) for g in GROUPS]
    ref = compute_reference_logps(policy, pairs, cfg, CPU)
    result = train(policy, with_reference(pairs, ref), make_loss_fn(loss_config("dpo")), cfg,
                   output_dir=tmp_path / "ckpt", runtime=CPU)
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-5)
    if dtype == "bfloat16":  # bf16 really ran: its log-probs differ from fp32's
        fp32 = compute_reference_logps(policy, pairs, CFG, CPU)
        assert 1e-4 < np.abs(ref.sum - fp32.sum).max() < 0.5


def test_a_pairwise_loss_trains_on_the_tokens_its_reference_saw(policy, tmp_path):
    # A group of 3 whose middle member is long: prompt (43 tokens) + that member > max_length 64, so the group's
    # prompt keeps its last 32 tokens (max_prompt_length) for every member. The best-vs-worst pair alone
    # (43 + 8 tokens) would fit untruncated, so a pair tokenised on its own sees 11 more prompt tokens than the
    # reference computed on the group did. Policy = reference, so the same tokens give DPO -log sigmoid(0) = log 2
    # at step 0. The pair tokenised alone (the trainer before this fix) gave 0.69885 here, 2.61 in the case found
    # on review.
    long = "The old lighthouse keeper counts the waves every night and writes their names in a small blue book."
    group = Group("t", "Write a poem about the sea in four short lines, with a title in capitals.",
                  ["The cat finds a quiet garden.", long, "the river"], [1.0, 0.0, -1.0], [True, False, False])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    in_group, truncated = tokenize_groups(tokenizer, [group], max_length=64, max_prompt_length=32)
    alone, truncated_alone = tokenize_groups(tokenizer, [group.best_vs_worst()], max_length=64, max_prompt_length=32)
    assert truncated == 3 and truncated_alone == 0  # the case this test is about
    assert in_group[0].best_vs_worst().examples == [in_group[0].examples[0], in_group[0].examples[2]]
    assert in_group[0].examples[0].input_ids != alone[0].examples[0].input_ids

    ref = compute_reference_logps(policy, [group], CFG, CPU)
    cfg = CFG.model_copy(update={"groups_per_step": 1})
    result = train(policy, with_reference([group], ref), make_loss_fn(loss_config("dpo")), cfg,
                   output_dir=tmp_path / "ckpt", runtime=CPU)
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert result.metrics["data/truncated_responses"] == 2  # the pair, truncated as in its group


def test_the_reflogps_stage_runs_only_for_losses_that_need_a_reference(tmp_path):
    # smoke config (AMPO, reference-free): the stage is recorded done with its reason and computes nothing, the
    # round trains without reference log-probs, and a resume does not run it again; DPO on the same selection
    # computes a reference log-prob (< 0) for every selected response
    from ampo.config import load_config
    from ampo.stages import run_stage
    from ampo.stages.context import open_store

    smoke = Path(__file__).resolve().parents[1] / "infra" / "configs" / "smoke.yaml"
    where = {"store.uri": str(tmp_path / "store"), "runtime.workdir": str(tmp_path / "work")}
    cfg = load_config(smoke, where)
    assert cfg.loss.name == "ampo"
    for name in ("generate", "score", "embed", "select"):
        selected = run_stage(name, cfg, "r", 0)["counts"].get("selected")
    assert selected > 0
    record = run_stage("reflogps", cfg, "r", 0)
    assert record["status"] == "done" and record["counts"] == {
        "selected": selected, "computed": 0, "skipped_reason": "loss 'ampo' takes no reference log-probs"}
    assert open_store(cfg).stage_status("r", 0)["reflogps"]["counts"]["skipped_reason"].startswith("loss 'ampo'")
    refs = open_store(cfg).read_rows("r", 0, ["ref_logp_sum"], selected=True)["ref_logp_sum"]
    assert refs.null_count == len(refs) == selected
    assert run_stage("reflogps", cfg, "r", 0)["skipped"] is True  # a resume moves on
    trained = run_stage("train", cfg, "r", 0)["counts"]
    assert trained["train/steps"] > 0 and math.isfinite(trained["train/loss_last"])

    dpo = load_config(smoke, {**where, "loss.name": "dpo"})
    record = run_stage("reflogps", dpo, "r", 0, force=True)
    assert record["counts"]["computed"] == selected and "skipped_reason" not in record["counts"]
    refs = open_store(cfg).read_rows("r", 0, ["ref_logp_sum"], selected=True)["ref_logp_sum"].to_pylist()
    assert len(refs) == selected and all(r < 0 for r in refs)
