"""The group trainer: loss factory, step plan, collation vs a per-sequence forward, training lowers the loss,
resume equivalence, gradient-accumulation equivalence, checkpoints with manifests, LoRA merged on save."""

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ampo.checkpoints import MANIFEST, MissingManifestError, UnsafeStateError, load_checkpoint_manifest
from ampo.config import LoraConfig, RuntimeConfig, TrainConfig
from ampo.logps import sequence_logps
from ampo.losses import AmpoConfig, GroupBatch, loss_config
from ampo.models import build_tiny_llama
from ampo.trainer import (
    TrainSpec,
    launch_command,
    main,
    make_loss_fn,
    to_group_batch,
    train,
)
from ampo.training_data import (
    Group,
    collate,
    epoch_order,
    micro_batches,
    plan_steps,
    save_groups,
    tokenize_groups,
)

CPU = RuntimeConfig(device="cpu")

PROMPTS = ["Write a short poem about the sea.", "Answer in exactly three words.",
           "List two colors, separated by a comma.", "Explain why the sky is blue in one sentence."]
RESPONSES = ["The cat finds a quiet garden.", "A robot paints the answer again!", "the river",
             "My friend builds three red boxes today.", "An old map remembers the night sky?"]


def make_groups() -> list[Group]:
    """4 groups of sizes 3, 2, 4, 3; the first member of each is the single chosen one (AMPO's 1-vs-k)."""
    groups = []
    for i, (prompt, size) in enumerate(zip(PROMPTS, [3, 2, 4, 3])):
        responses = [RESPONSES[(i + j) % len(RESPONSES)] for j in range(size)]
        rewards = [1.0] + [-float(j) for j in range(1, size)]
        groups.append(Group(f"p{i}", prompt, responses, rewards, [True] + [False] * (size - 1)))
    return groups


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("policy") / "tiny", seed=0))


@pytest.fixture(scope="module")
def dropout_policy(policy, tmp_path_factory) -> str:
    """The same model with attention dropout 0.1, so training consumes the RNG (resume must restore it)."""
    path = tmp_path_factory.mktemp("dropout") / "tiny"
    shutil.copytree(policy, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    return str(path)


def tiny_cfg(**overrides) -> TrainConfig:
    base = {"lr": 1e-3, "grad_accum": 1, "groups_per_step": 1, "warmup_ratio": 0.0, "scheduler": "constant",
            "max_length": 64, "max_prompt_length": 32, "seed": 0}
    return TrainConfig(**{**base, **overrides})


# ----------------------------------------------------------------------------- loss factory


def test_make_loss_fn_takes_each_loss_own_defaults():
    # beta is on summed log-ratios for dpo/mpo/infonca (0.1) and on length-normalised log-probs for the
    # reference-free losses (10); InfoNCA's alpha is its reward temperature, 1 unless set
    assert {name: make_loss_fn(loss_config(name)).params for name in ["ampo", "simpo", "dpo", "mpo", "infonca",
                                                                      "refa_infonca"]} == {
        "ampo": {"beta": 10.0, "gamma": 3.0, "alpha": 0.0, "alpha_inside_beta": False},
        "simpo": {"beta": 10.0, "gamma_beta_ratio": 0.3},
        "dpo": {"beta": 0.1},
        "mpo": {"beta": 0.1, "alpha": 0.0, "weight_mode": "abs", "p": 1},
        "infonca": {"beta": 0.1, "alpha": 1.0},
        "refa_infonca": {"beta": 10.0, "alpha": 1.0},
    }
    assert make_loss_fn(loss_config("dpo", beta=0.5)).params == {"beta": 0.5}
    assert make_loss_fn(AmpoConfig()).describe() == {"name": "ampo", "beta": 10.0, "gamma": 3.0, "alpha": 0.0,
                                                     "alpha_inside_beta": False, "eos_lambda": 0.0,
                                                     "nll_weight": 0.0}
    simpo, mpo = make_loss_fn(loss_config("simpo")), make_loss_fn(loss_config("mpo"))
    assert (simpo.spec.logps, simpo.spec.needs_ref, simpo.spec.pairwise) == ("mean", False, True)
    assert (mpo.spec.logps, mpo.spec.needs_ref, mpo.spec.pairwise) == ("sum", True, False)
    with pytest.raises(TypeError, match="expected a loss config"):
        make_loss_fn({"name": "dpo"})


def test_loss_fn_adds_the_eos_regulariser():
    # AMPO with beta=1, gamma=1 on mean log-probs [0, 0], member 0 chosen: L = LSE(0, 0) - LSE(0) = log 2 = 0.6931.
    # EOS term (REFA eq. 7), lambda=0.5, P(EOS) [0.2, 0.4], lengths [3, 5]: target 5, shortfall [2, 0]
    # -> 0.5 * (0.2*2 + 0.4*0) = 0.2. Total 0.8931.
    loss_fn = make_loss_fn(loss_config("ampo", beta=1.0, gamma=1.0, eos_lambda=0.5))
    zeros = torch.zeros(1, 2)
    batch = GroupBatch(zeros, zeros, torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]]),
                       torch.tensor([[True, True]]))
    got = loss_fn(batch, torch.tensor([[0.2, 0.4]]), torch.tensor([[3.0, 5.0]]))
    assert got.tolist() == pytest.approx([math.log(2) + 0.2], abs=1e-6)
    assert make_loss_fn(loss_config("ampo", beta=1.0, gamma=1.0))(batch).tolist() == pytest.approx([math.log(2)])


# ----------------------------------------------------------------------------- plan and collation


def test_plan_is_seeded_and_covers_each_epoch():
    plan = plan_steps(5, groups_per_step=2, grad_accum=1, num_processes=1, epochs=2, seed=3)
    assert [len(s) for s in plan] == [2, 2, 1, 2, 2, 1]  # steps never straddle epochs
    for epoch in (plan[:3], plan[3:]):
        assert sorted(i for step in epoch for i in step) == list(range(5))
    assert plan == plan_steps(5, groups_per_step=2, grad_accum=1, num_processes=1, epochs=2, seed=3)
    assert epoch_order(5, seed=3, epoch=0) != epoch_order(5, seed=3, epoch=1)


def test_micro_batches_split_a_step_across_processes():
    # step [5, 3, 1, 0, 2], 2 groups per micro-batch, 2 processes: span 4.
    # micro 0: process 0 takes [5, 3], process 1 [1, 0]; micro 1: process 0 [2], process 1 nothing -> filler.
    step = [5, 3, 1, 0, 2]
    assert micro_batches(step, groups_per_step=2, num_processes=2, process_index=0) == [([5, 3], True), ([2], True)]
    assert micro_batches(step, groups_per_step=2, num_processes=2, process_index=1) == [([1, 0], True), ([5], False)]


def test_collated_forward_equals_a_per_sequence_forward(policy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    tgroups, truncated = tokenize_groups(tokenizer, make_groups()[:2], max_length=64, max_prompt_length=32)
    assert truncated == 0
    batch = collate(tgroups)  # sizes 3 and 2 -> (2, 3) with one padded slot
    assert batch.valid_mask.tolist() == [[True, True, True], [True, True, False]]
    from ampo.logps import group_logps

    with torch.no_grad():
        gb = to_group_batch(batch, group_logps(model, batch.examples, pad_token_id=tokenizer.pad_token_id))
        singles = [sequence_logps(model(input_ids=torch.tensor([e.input_ids])).logits, torch.tensor([e.labels]))
                   for e in batch.examples]
    want_sum = torch.tensor([[s[0].item() for s in singles[:3]], [singles[3][0].item(), singles[4][0].item(), 0.0]])
    want_mean = torch.tensor([[s[1].item() for s in singles[:3]], [singles[3][1].item(), singles[4][1].item(), 0.0]])
    torch.testing.assert_close(gb.policy_logps_sum, want_sum, atol=1e-5, rtol=0)
    torch.testing.assert_close(gb.policy_logps_mean, want_mean, atol=1e-5, rtol=0)
    assert gb.chosen_mask.tolist() == [[True, False, False], [True, False, False]]


# ----------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(policy, tmp_path):
    from transformers import AutoModelForCausalLM

    # every step sees all 4 groups, so each step's loss is the full-data loss at the current weights
    cfg = tiny_cfg(lr=2e-3, groups_per_step=4, epochs=5)
    result = train(policy, make_groups(), make_loss_fn(AmpoConfig()), cfg, output_dir=tmp_path / "ckpt",
                   runtime=CPU, manifest_extra={"id": "demo-r0-abc123", "run": "demo", "round": 0})
    assert len(result.losses) == 5
    assert result.losses[-1] < result.losses[0]
    margins = [h["rewards/margins"] for h in result.history]
    assert margins[-1] > margins[0]
    manifest = load_checkpoint_manifest(result.checkpoint_path)
    assert manifest["id"] == "demo-r0-abc123" and manifest["round"] == 0 and manifest["parent"] == policy
    assert manifest["loss"] == "ampo" and manifest["steps"] == 5 and manifest["losses"] == result.losses
    assert manifest["metrics"]["data/groups"] == 4 and manifest["metrics"]["data/skipped_groups"] == 0
    assert not (result.checkpoint_path / "state").exists()  # resumable states go once the manifest is written
    trained = AutoModelForCausalLM.from_pretrained(result.checkpoint_path)
    parent = AutoModelForCausalLM.from_pretrained(policy)
    assert not torch.equal(trained.model.layers[0].self_attn.q_proj.weight, parent.model.layers[0].self_attn.q_proj.weight)
    again = train(policy, make_groups(), make_loss_fn(AmpoConfig()), cfg, output_dir=tmp_path / "ckpt", runtime=CPU)
    assert again.losses == result.losses  # a finished checkpoint is returned, not retrained
    # ... but only to the same config and data: anything else would silently keep other weights
    with pytest.raises(ValueError, match=r"finished checkpoint of another training config or data.*config_hash"):
        train(policy, make_groups(), make_loss_fn(AmpoConfig()), tiny_cfg(lr=1e-4, groups_per_step=4, epochs=5),
              output_dir=tmp_path / "ckpt", runtime=CPU)
    with pytest.raises(ValueError, match=r"data_hash"):
        train(policy, make_groups()[:3], make_loss_fn(AmpoConfig()), cfg, output_dir=tmp_path / "ckpt", runtime=CPU)


def test_resume_after_a_crash_gives_the_same_losses(dropout_policy, tmp_path):
    groups = make_groups()[:3]
    # 3 groups x 2 epochs = 6 steps; states every 2 steps and at each epoch's end but the last: 2, 3, 4 (newest two
    # kept)
    cfg = tiny_cfg(lr=1e-2, epochs=2, save_every=2)
    loss_fn = make_loss_fn(AmpoConfig())
    full = train(dropout_policy, groups, loss_fn, cfg, output_dir=tmp_path / "full", runtime=CPU)

    def crash_at_5(step, total, metrics):
        if step == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(dropout_policy, groups, loss_fn, cfg, output_dir=tmp_path / "crashed", runtime=CPU, progress=crash_at_5)
    assert sorted(p.name for p in (tmp_path / "crashed" / "state").iterdir()) == ["step-3", "step-4"]
    assert not (tmp_path / "crashed" / MANIFEST).exists()
    # no pickle anywhere: tensors in safetensors, the rest (optimizer groups, scheduler, RNG, step) in JSON
    assert sorted(p.name for p in (tmp_path / "crashed" / "state" / "step-4").iterdir()) == [
        "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng-0.json", "rng-0.safetensors",
        "scheduler.json", "trainer_state.json"]
    seen = []
    resumed = train(dropout_policy, groups, loss_fn, cfg, output_dir=tmp_path / "crashed", runtime=CPU,
                    progress=lambda step, total, m: seen.append(step))
    assert seen == [5, 6]  # only the steps after the last saved state ran again
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    assert len({round(x, 4) for x in full.losses}) > 1
    # the same final weights as the uninterrupted run: model, AdamW moments, LR schedule and dropout RNG restored
    final, interrupted = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "crashed"))
    assert final.keys() == interrupted.keys()
    assert all(torch.equal(final[k], interrupted[k]) for k in final)
    parent = load_file(Path(dropout_policy) / "model.safetensors")
    assert not all(torch.equal(final[k], parent[k]) for k in final)  # training moved them


def test_states_are_saved_at_intervals_and_epoch_ends_but_not_after_the_last_step():
    from ampo.trainer import should_save

    # 3 steps an epoch, 2 epochs (6 steps), save_every 2: 2 and 4 (interval), 3 (epoch end); 6 is the last step
    assert [d for d in range(1, 7) if should_save(d, 2, 3, 6)] == [2, 3, 4]
    # save_every 0: epoch ends only, 4 steps an epoch, 3 epochs: 4 and 8; not 12
    assert [d for d in range(1, 13) if should_save(d, 0, 4, 12)] == [4, 8]
    assert not should_save(1, 1, 1, 1)  # a one-step run saves no state


def test_resume_never_unpickles_a_planted_file(policy, tmp_path):
    """A pickle planted in a saved state (accelerate's custom_checkpoint_0.pkl ran code on load) is refused before
    anything in the folder is read."""
    loss_fn = make_loss_fn(AmpoConfig())
    marker = tmp_path / "code-ran"

    class Planted:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    def crash_at_3(step, total, metrics):
        if step == 3:
            raise RuntimeError("stop")

    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        train(policy, make_groups(), loss_fn, tiny_cfg(save_every=1), output_dir=out, runtime=CPU,
              progress=crash_at_3)
    (out / "state" / "step-3" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Planted()))
    with pytest.raises(UnsafeStateError, match=r"step-3 holds pickle-based files \['custom_checkpoint_0.pkl'\]: "
                                               r"ampo never loads pickle"):
        train(policy, make_groups(), loss_fn, tiny_cfg(save_every=1), output_dir=out, runtime=CPU)
    assert not marker.exists()


def test_resume_refuses_a_state_from_another_config(policy, tmp_path):
    loss_fn = make_loss_fn(AmpoConfig())

    def crash_at_3(step, total, metrics):
        if step == 3:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        train(policy, make_groups(), loss_fn, tiny_cfg(save_every=1), output_dir=tmp_path, runtime=CPU,
              progress=crash_at_3)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["step-2", "step-3"]  # the last 2 are kept
    with pytest.raises(ValueError, match="different run"):
        train(policy, make_groups(), loss_fn, tiny_cfg(save_every=1, lr=5e-3), output_dir=tmp_path, runtime=CPU)


def test_grad_accumulation_takes_the_same_first_update(policy, tmp_path):
    # 1 group x accum 4 and 4 groups x accum 1: both steps are the mean loss over the same 4 groups.
    from safetensors.torch import load_file

    loss_fn = make_loss_fn(AmpoConfig())
    groups = make_groups()
    a = train(policy, groups, loss_fn, tiny_cfg(grad_accum=4, groups_per_step=1), output_dir=tmp_path / "a", runtime=CPU)
    b = train(policy, groups, loss_fn, tiny_cfg(grad_accum=1, groups_per_step=4), output_dir=tmp_path / "b", runtime=CPU)
    assert len(a.losses) == len(b.losses) == 1
    assert a.losses[0] == pytest.approx(b.losses[0], abs=1e-5)
    grad_a, grad_b = a.history[0]["train/grad_norm"], b.history[0]["train/grad_norm"]
    assert grad_a == pytest.approx(grad_b, rel=1e-5)  # a per-micro-batch mean without rescaling would be 4x off
    wa, wb = load_file(a.checkpoint_path / "model.safetensors"), load_file(b.checkpoint_path / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0)


def test_gradient_checkpointing_takes_the_same_step(policy, tmp_path):
    loss_fn = make_loss_fn(AmpoConfig())
    plain = train(policy, make_groups(), loss_fn, tiny_cfg(groups_per_step=4), output_dir=tmp_path / "a", runtime=CPU)
    ckpt = train(policy, make_groups(), loss_fn, tiny_cfg(groups_per_step=4, gradient_checkpointing=True),
                 output_dir=tmp_path / "b", runtime=CPU)
    assert ckpt.losses[0] == pytest.approx(plain.losses[0], abs=1e-6)
    assert ckpt.history[0]["train/grad_norm"] == pytest.approx(plain.history[0]["train/grad_norm"], rel=1e-5)
    config = json.loads((ckpt.checkpoint_path / "config.json").read_text())
    assert config["use_cache"] is True  # the saved policy generates with a KV cache again


def test_skipped_groups_are_counted_and_left_out(policy, tmp_path):
    no_rejected = Group("p9", PROMPTS[0], RESPONSES[:2], [1.0, 1.0], [True, True])
    result = train(policy, make_groups() + [no_rejected], make_loss_fn(AmpoConfig()), tiny_cfg(groups_per_step=5),
                   output_dir=tmp_path, runtime=CPU)
    assert result.metrics["data/groups"] == 5 and result.metrics["data/skipped_groups"] == 1
    assert result.history[0]["train/groups"] == 4


def test_best_vs_worst_pair_of_a_group():
    # rewards [0.5, 2, 2, -1, -1] with members 0-2 chosen: best chosen 2.0 at 1 and 2 -> 1 (lower index);
    # worst rejected -1 at 3 and 4 -> 3
    g = Group("p", "q", list("abcde"), [0.5, 2.0, 2.0, -1.0, -1.0], [True, True, True, False, False],
              ref_logp_sum=[-1.0, -2, -3, -4, -5], ref_logp_mean=[-0.1, -0.2, -0.3, -0.4, -0.5])
    pair = g.best_vs_worst()
    assert pair.responses == ["b", "d"] and pair.rewards == [2.0, -1.0] and pair.chosen == [True, False]
    assert pair.ref_logp_sum == [-2.0, -4.0] and pair.ref_logp_mean == [-0.2, -0.4]
    only_chosen = Group("p", "q", ["a", "b", "c"], [1.0, 2.0, 3.0], [True, True, True])
    assert only_chosen.best_vs_worst() is only_chosen  # untrainable: left for the loss to skip and count


def test_pairwise_losses_train_on_the_best_vs_worst_of_bigger_groups(policy, tmp_path):
    # groups of 3, 2, 4, 3 (AMPO's 1-vs-k): SimPO trains on one pair per group, 8 sequences in all
    result = train(policy, make_groups(), make_loss_fn(loss_config("simpo")), tiny_cfg(groups_per_step=4),
                   output_dir=tmp_path, runtime=CPU)
    assert result.metrics["data/groups"] == 4 and result.metrics["data/skipped_groups"] == 0
    assert result.history[0]["train/groups"] == 4


def test_a_reference_loss_without_reference_logps_is_refused(policy, tmp_path):
    with pytest.raises(ValueError, match="needs reference log-probs"):
        train(policy, make_groups(), make_loss_fn(loss_config("mpo")), tiny_cfg(), output_dir=tmp_path, runtime=CPU)


# ----------------------------------------------------------------------------- checkpoints and the entry point


def test_a_folder_without_its_manifest_is_never_used(policy):
    with pytest.raises(MissingManifestError, match="a folder without its manifest is never used"):
        load_checkpoint_manifest(policy)  # a complete model folder, but not written by the trainer


def test_manifest_extra_cannot_overwrite_trainer_fields(policy, tmp_path):
    with pytest.raises(ValueError, match=r"manifest_extra may not set \['metrics'\]"):
        train(policy, make_groups(), make_loss_fn(AmpoConfig()), tiny_cfg(groups_per_step=4), output_dir=tmp_path,
              runtime=CPU, manifest_extra={"metrics": {}, "id": "x"})
    assert not any(tmp_path.iterdir())  # refused before any training


def test_lora_through_the_entry_point_saves_a_merged_plain_checkpoint(policy, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    spec = TrainSpec(policy_path=policy, groups_path=str(save_groups(tmp_path / "groups.jsonl", make_groups())),
                     output_dir=str(tmp_path / "ckpt"), train=tiny_cfg(lr=1e-2, groups_per_step=2, lora=lora),
                     runtime=CPU, manifest_extra={"id": "lora-r1-0"})
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    assert launch_command(tmp_path / "spec.json", CPU)[1:] == ["-m", "ampo.trainer", "--spec",
                                                              str(tmp_path / "spec.json")]
    main(["--spec", str(tmp_path / "spec.json")])
    ckpt = tmp_path / "ckpt"
    assert not (ckpt / "adapter_config.json").exists() and (ckpt / MANIFEST).is_file()
    weights, parent = load_file(ckpt / "model.safetensors"), load_file(Path(policy) / "model.safetensors")
    assert sorted(weights) == sorted(parent)  # plain Llama names, no lora_A / base_layer
    changed = {name for name in weights if not torch.equal(weights[name], parent[name])}
    assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qv"}
    AutoModelForCausalLM.from_pretrained(ckpt)  # loads without peft


def test_a_bf16_tied_parent_gives_a_bf16_tied_checkpoint(tmp_path):
    # SmolLM2 (the default policy) is bf16 with tied embeddings: train in fp32, save in the parent's dtype, once
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from ampo.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True, dtype="bfloat16",
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "parent")
    tokenizer.save_pretrained(tmp_path / "parent")
    result = train(str(tmp_path / "parent"), make_groups()[:1], make_loss_fn(AmpoConfig()), tiny_cfg(lr=1e-2),
                   output_dir=tmp_path / "ckpt", runtime=CPU)
    weights = load_file(result.checkpoint_path / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16} and "lm_head.weight" not in weights
    trained = AutoModelForCausalLM.from_pretrained(result.checkpoint_path)
    assert trained.dtype == torch.bfloat16 and trained.lm_head.weight is trained.model.embed_tokens.weight


def test_deepspeed_gets_micro_batch_clipping_and_the_same_accumulation():
    from types import SimpleNamespace

    from ampo.trainer import configure_deepspeed

    plugin = SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
                                               "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 3}})
    acc = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=8)
    configure_deepspeed(acc, tiny_cfg(groups_per_step=2, grad_accum=4, max_grad_norm=0.5))
    # 2 groups per micro-batch x accumulation 4 x 8 processes = 64; the engine divides the loss by 4 as
    # accelerator.backward does without DeepSpeed, so StepRunner's scale holds for both
    assert plugin.deepspeed_config == {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.5,
                                       "gradient_accumulation_steps": 4, "train_batch_size": 64,
                                       "zero_optimization": {"stage": 3}}
    configure_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)), tiny_cfg())  # no-op


def test_accelerate_launch_command_names_the_config():
    runtime = RuntimeConfig(launcher="accelerate", accelerate_config="infra/accelerate/fsdp.yaml")
    assert launch_command("s.json", runtime)[1:] == ["-m", "accelerate.commands.launch", "--config_file",
                                                     "infra/accelerate/fsdp.yaml", "-m", "ampo.trainer", "--spec",
                                                     "s.json"]
