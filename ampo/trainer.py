"""Preference training of a policy on selected response groups: one accelerate loop, given a loss_fn.

    train(policy_path, groups, loss_fn, cfg, output_dir=..., runtime=..., manifest_extra=...) -> TrainResult

The loop, top to bottom: tokenise the groups, drop those the loss cannot learn from, plan every optimizer step
from the seed, load the policy (optionally LoRA, gradient checkpointing), resume from the newest saved state if
there is one, then for each step run its micro-batches (one batched forward per micro-batch, the loss, a scaled
backward), clip, step, schedule, save a resumable state every `save_every` steps, and finally write the policy in
HF layout and its manifest last. `python -m ampo.trainer --spec spec.json` runs the same under `accelerate launch`.

Mean over groups: an optimizer step's loss is the mean of the per-group losses over all the groups of that step,
across micro-batches and processes. Each micro-batch contributes sum(its groups' losses) / (groups in the step);
`accelerator.backward` divides by grad_accum and DDP averages over processes, so the backward pass is given that
value times grad_accum * num_processes. Hence 1 group x accum 4 and 4 groups x accum 1 take the same update.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from ampo import __version__
from ampo.checkpoints import (
    MANIFEST,
    config_hash,
    latest_training_state,
    load_checkpoint_manifest,
    load_training_state,
    read_trainer_state,
    remove_training_states,
    save_policy,
    save_training_state,
    write_manifest,
)
from ampo.config import RuntimeConfig, TrainConfig
from ampo.logps import ForwardMode, GroupLogps, ResponseSpan, group_logps
from ampo.losses import AmpoConfig, GroupBatch, LossConfig, LossParams, LossSpec, chosen_nll, eos_regularizer
from ampo.threads import restore_torch_threads
from ampo.training_data import (
    Batch,
    ForwardOptions,
    Group,
    TokenizedGroup,
    collate,
    count_truncated,
    data_fingerprint,
    load_groups,
    micro_batches,
    plan_steps,
    steps_per_epoch,
    tokenize_groups,
)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- the loss, from config

@dataclass(frozen=True)
class LossFn:
    """A configured loss: a GroupBatch (+ P(EOS), lengths) -> per-group losses (B,).

    What the trainer computes for it is the loss's registry row, `spec` (ampo.losses.LOSSES): reference log-probs
    or not, best-vs-worst pairs or whole groups, summed or length-normalised log-probs; and P(EOS) when the
    config's `eos_lambda` > 0.
    """

    config: LossParams

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def spec(self) -> LossSpec:
        return self.config.spec

    @property
    def params(self) -> dict:
        """The loss function's keyword hyperparameters (beta, ...)."""
        return self.config.loss_params()

    @property
    def needs_eos(self) -> bool:
        return self.config.eos_lambda > 0

    def __call__(self, batch: GroupBatch, eos_probs: Tensor | None = None, lengths: Tensor | None = None) -> Tensor:
        loss = self.spec.from_batch(batch, **self.params)  # (B,)
        if self.needs_eos:
            loss = loss + eos_regularizer(eos_probs, lengths, batch.valid_mask, lam=self.config.eos_lambda)
        if self.config.nll_weight > 0:
            loss = loss + chosen_nll(batch, weight=self.config.nll_weight)
        return loss

    def trainable(self, batch: GroupBatch) -> Tensor:
        """(B,) bool: the groups with a defined loss (e.g. both a chosen and a rejected member)."""
        return self.spec.trainable(batch)

    def describe(self) -> dict:
        return self.config.model_dump()  # name, the loss's hyperparameters and the added terms' weights


def make_loss_fn(loss_cfg: LossParams) -> LossFn:
    """The loss a config names (a member of ampo.losses.LossConfig, e.g. `loss_config("dpo", beta=0.5)`)."""
    if not isinstance(loss_cfg, LossParams):
        raise TypeError(f"expected a loss config (ampo.losses.LossConfig), got {type(loss_cfg).__name__}")
    return LossFn(loss_cfg)


# ----------------------------------------------------------------------------- result


@dataclass
class TrainResult:
    checkpoint_path: Path
    metrics: dict  # run totals: steps, groups, skipped groups, truncated responses, first/last loss, tokens/s
    losses: list[float]  # per optimizer step
    history: list[dict] = field(default_factory=list)  # per-step metrics


# ----------------------------------------------------------------------------- the loop


def train(policy_path: str, groups: list[Group], loss_fn: LossFn, cfg: TrainConfig, *, output_dir: Path,
          runtime: RuntimeConfig | None = None, manifest_extra: dict | None = None,
          options: ForwardOptions | None = None,
          progress: Callable[[int, int, dict], None] | None = None) -> TrainResult:
    """Train `policy_path` on `groups` with `loss_fn`; the checkpoint is `output_dir` (HF layout + manifest.json).

    Resumes from output_dir/state/ when a previous attempt left a state; returns the finished checkpoint as is
    when output_dir already has its manifest. `progress(step, total_steps, metrics)` is called after each step.
    Reference log-probs the groups carry must come from these same groups (ampo.reflogps): a pairwise loss trains
    on each group's best-vs-worst pair with the tokens the pair had in its group, so the two always agree.
    """
    output_dir, runtime, options = Path(output_dir), runtime or RuntimeConfig(), options or ForwardOptions()
    check_manifest_extra(manifest_extra or {})
    config_id = config_hash({"train": cfg.model_dump(mode="json"), "loss": loss_fn.describe(),
                             "options": options.__dict__})  # fmt: skip
    data_id = data_fingerprint(groups)
    if (output_dir / MANIFEST).is_file():
        check_finished_checkpoint(output_dir, config_id, data_id)
        log.info("%s already has its manifest, from this config and data; not training again", output_dir)
        return result_from_checkpoint(output_dir)
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer, get_scheduler

    accelerator = make_accelerator(cfg, runtime)
    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(policy_path, trust_remote_code=runtime.trust_remote_code)
    tgroups, _ = tokenize_groups(tokenizer, groups, max_length=cfg.max_length,
                                 max_prompt_length=cfg.max_prompt_length, options=options)
    if loss_fn.spec.pairwise:  # DPO/SimPO on AMPO groups: best chosen vs worst rejected, no wasted forward
        tgroups = [t.best_vs_worst() for t in tgroups]  # tokenised in their group, as the reference saw them
    n_truncated = count_truncated(tgroups)
    kept = trainable_groups(tgroups, loss_fn)
    n_proc = accelerator.num_processes
    plan = plan_steps(len(kept), groups_per_step=cfg.groups_per_step, grad_accum=cfg.grad_accum,
                      num_processes=n_proc, epochs=cfg.epochs, seed=cfg.seed)
    per_epoch = steps_per_epoch(len(kept), groups_per_step=cfg.groups_per_step, grad_accum=cfg.grad_accum,
                                num_processes=n_proc)
    model = load_policy(policy_path, cfg, runtime)
    optimizer = make_optimizer(model, cfg)
    scheduler = get_scheduler(SCHEDULERS[cfg.scheduler], optimizer, num_training_steps=len(plan),
                              num_warmup_steps=math.ceil(cfg.warmup_ratio * len(plan)))
    model, optimizer = accelerator.prepare(model, optimizer)
    # the scheduler: stepped by us once per optimizer step (not by accelerate per process), saved with the state
    identity = {"config_hash": config_id, "data_hash": data_id, "num_processes": n_proc}
    start, history = resume(accelerator, output_dir, identity, model=model, optimizer=optimizer, scheduler=scheduler)
    from ampo.models import pad_token_id

    pad_id = pad_token_id(tokenizer)
    step_fn = StepRunner(accelerator, model, optimizer, scheduler, loss_fn, kept, cfg, options, pad_id,
                         tokenizer.eos_token_id)
    restore_torch_threads()  # a vLLM engine run earlier in this process may have changed them
    model.train()
    t_start = time.perf_counter()
    for step in range(start, len(plan)):
        metrics = {"step": step + 1, "epoch": step // per_epoch, **step_fn(plan[step])}
        history.append(metrics)
        log.info("step %d/%d loss %.4f lr %.3g", step + 1, len(plan), metrics["train/loss"], metrics["train/lr"])
        if should_save(step + 1, cfg.save_every, per_epoch, len(plan)):
            save_training_state(accelerator, output_dir, step + 1, model=model, optimizer=optimizer,
                                scheduler=scheduler, trainer_state={**identity, "next_step": step + 1,
                                                                     "epoch": (step + 1) // per_epoch,
                                                                     "history": history})
        if progress is not None:
            progress(step + 1, len(plan), metrics)
    metrics = run_metrics(history, len(tgroups), len(tgroups) - len(kept), n_truncated, time.perf_counter() - t_start)
    save_policy(accelerator, model, tokenizer, output_dir, merge_lora=cfg.lora is not None,
                dtype=parent_dtype(policy_path, runtime))
    manifest = build_manifest(policy_path, loss_fn, cfg, identity, metrics, history, manifest_extra or {})
    if accelerator.is_main_process:
        write_manifest(output_dir, manifest)
        remove_training_states(output_dir)
    accelerator.wait_for_everyone()
    return TrainResult(output_dir, metrics, [h["train/loss"] for h in history], history)


SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
FUSED_ADAMW_DEVICES = frozenset({"cpu", "cuda"})


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model's parameters: the fused kernel (one pass over each parameter; what transformers' Trainer,
    and so TRL, picks by default with torch >= 2.8) when every parameter is a float tensor on a CPU or CUDA
    device, else torch's default implementation. The same update either way, up to float rounding; on CPU the
    default loops over the parameters op by op, which at SmolLM2-135M's size cost more than a small step's
    forward and backward (docs/training.md)."""
    params = list(model.parameters())
    fused = all(p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


class StepRunner:
    """One optimizer step: the step's micro-batches of this process, backward, clip, optimizer and scheduler."""

    def __init__(self, accelerator, model, optimizer, scheduler, loss_fn: LossFn, groups: list[TokenizedGroup],
                 cfg: TrainConfig, options: ForwardOptions, pad_token_id: int, eos_token_id: int | None):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.loss_fn, self.groups, self.cfg, self.options = loss_fn, groups, cfg, options
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id

    def __call__(self, step_groups: list[int]) -> dict:
        acc, cfg, t0 = self.accelerator, self.cfg, time.perf_counter()
        micro = micro_batches(step_groups, groups_per_step=cfg.groups_per_step, num_processes=acc.num_processes,
                              process_index=acc.process_index)
        scale = cfg.grad_accum * acc.num_processes / len(step_groups)  # see the module docstring
        totals = torch.zeros(6, dtype=torch.float64)  # loss, chosen logp, n chosen, rejected logp, n rejected, tokens
        for j, (indices, counts) in enumerate(micro):
            last = j == len(micro) - 1
            acc.sync_gradients = last  # the optimizer steps, and processes reduce gradients, only after the last
            batch = collate([self.groups[i] for i in indices], counts=counts)
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                per_group, logps = self.forward_loss(batch)  # (B,), (B, M)
                acc.backward((per_group * batch.weight).sum() * scale)
            totals += batch_stats(batch, per_group.detach(), logps.detach())
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        totals = acc.reduce(totals.to(acc.device), reduction="sum").cpu()
        seconds = time.perf_counter() - t0
        chosen, rejected = totals[1] / totals[2].clamp(min=1), totals[3] / totals[4].clamp(min=1)
        return {"train/loss": float(totals[0]) / len(step_groups), "train/lr": lr,
                "train/grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                "train/groups": len(step_groups),
                "logps/chosen": float(chosen), "logps/rejected": float(rejected),
                "rewards/margins": float(chosen - rejected), "perf/tokens": int(totals[5]),
                "perf/seconds": seconds, "perf/tokens_per_s": float(totals[5]) / seconds}

    def forward_loss(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Per-group losses (B,) and the policy log-probs the loss used, (B, M)."""
        out: GroupLogps = group_logps(self.model, batch.examples, pad_token_id=self.pad_token_id,
                                      forward_mode=self.options.forward_mode,
                                      eos_token_id=self.eos_token_id if self.loss_fn.needs_eos else None)
        group_batch = to_group_batch(batch, out)
        eos = batch.to_grid(out.eos_probs) if self.loss_fn.needs_eos else None
        per_group = self.loss_fn(group_batch, eos, batch.to_grid(out.n_tokens.float()))
        used = group_batch.policy_logps_sum if self.loss_fn.spec.logps == "sum" else group_batch.policy_logps_mean
        return per_group, used


def to_group_batch(batch: Batch, out: GroupLogps) -> GroupBatch:
    """The loss's (B, M) view of a micro-batch and its forward."""
    device = out.sum.device
    return GroupBatch(policy_logps_sum=batch.to_grid(out.sum), policy_logps_mean=batch.to_grid(out.mean),
                      rewards=batch.rewards.to(device), chosen_mask=batch.chosen_mask.to(device),
                      valid_mask=batch.valid_mask.to(device),
                      ref_logps_sum=None if batch.ref_logps_sum is None else batch.ref_logps_sum.to(device))


def batch_stats(batch: Batch, per_group: Tensor, logps: Tensor) -> Tensor:
    """Sums for the step's metrics over the counted groups: loss, chosen/rejected log-probs and counts, tokens."""
    counted = (batch.weight > 0).to(logps.device)[:, None] & batch.valid_mask.to(logps.device)  # (B, M)
    chosen = counted & batch.chosen_mask.to(logps.device)
    rejected = counted & ~batch.chosen_mask.to(logps.device)
    tokens = batch.n_tokens if bool(batch.weight.sum() > 0) else 0
    return torch.tensor([float((per_group.cpu() * batch.weight).sum()), float(logps[chosen].sum()),
                         float(chosen.sum()), float(logps[rejected].sum()), float(rejected.sum()), float(tokens)],
                        dtype=torch.float64)


def should_save(done: int, save_every: int, per_epoch: int, total: int) -> bool:
    """After `done` optimizer steps: every `save_every` steps (0: never mid-epoch) and at each epoch's end, except
    after the last step. The policy is written right after it, and a state there (model and AdamW moments: three
    times the policy's bytes, 9 s of the demo's 60-s train stage) would be deleted a moment later; a crash while
    the policy is written reruns from the state before (the steps are deterministic: the same weights)."""
    return done < total and ((save_every > 0 and done % save_every == 0) or done % per_epoch == 0)


# ----------------------------------------------------------------------------- setup helpers


def make_accelerator(cfg: TrainConfig, runtime: RuntimeConfig):
    """Accelerator with gradient accumulation; fp32 on CPU, bf16 autocast on GPU when dtype is auto."""
    from accelerate import Accelerator

    from ampo.models import resolve_device

    cpu = resolve_device(runtime.device) == "cpu"
    mixed = {"auto": "no" if cpu else "bf16", "float32": "no", "bfloat16": "bf16"}[cfg.dtype]
    fresh_accelerate_state()
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed)
    configure_deepspeed(accelerator, cfg)
    return accelerator


def configure_deepspeed(accelerator, cfg: TrainConfig) -> None:
    """Fill in what DeepSpeed needs before `prepare`, which sees no dataloader here. No-op without DeepSpeed.

    - train_micro_batch_size_per_gpu: groups per micro-batch (accelerate refuses "auto" without a dataloader).
    - gradient_accumulation_steps: grad_accum, as the Accelerator has it. The loss is divided by it once in
      either case (by accelerator.backward without DeepSpeed, by the engine's backward with it), which is what
      StepRunner's scale assumes; the boundary itself is StepRunner's sync_gradients, handed to the engine.
    - gradient_clipping: max_grad_norm; DeepSpeed clips inside its step, accelerate's clip_grad_norm_ only
      reads the norm back.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    plugin.deepspeed_config.update({
        "train_micro_batch_size_per_gpu": cfg.groups_per_step, "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "train_batch_size": cfg.groups_per_step * cfg.grad_accum * accelerator.num_processes,
    })


def fresh_accelerate_state() -> None:
    """accelerate keeps process-global state that refuses a second precision in the same process. In a single,
    non-launched process (tests, in-process stages) each train() starts it afresh; a launched distributed run is
    one train() per process and is left alone."""
    from accelerate.state import AcceleratorState, GradientState

    if os.environ.get("WORLD_SIZE", "1") == "1":
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def load_policy(policy_path: str, cfg: TrainConfig, runtime: RuntimeConfig):
    """The policy in fp32 master weights, with gradient checkpointing and a LoRA adapter when configured."""
    from transformers import AutoModelForCausalLM

    from ampo.models import check_safetensors, require_safetensors

    check_safetensors(policy_path)  # a truncated file: one error naming it
    require_safetensors(policy_path)  # never a pickle-based .bin
    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=runtime.trust_remote_code)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora is not None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        model = get_peft_model(model, PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                     lora_dropout=cfg.lora.dropout,
                                                     target_modules=list(cfg.lora.target_modules),
                                                     task_type="CAUSAL_LM"))
    return model


def parent_dtype(policy_path: str, runtime: RuntimeConfig) -> torch.dtype:
    """The dtype the parent checkpoint declares (config.json); fp32 when it declares none."""
    from transformers import AutoConfig

    dtype = AutoConfig.from_pretrained(policy_path, trust_remote_code=runtime.trust_remote_code).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def trainable_groups(tgroups: list[TokenizedGroup], loss_fn: LossFn) -> list[TokenizedGroup]:
    """The groups the loss learns from, in order; the others (e.g. no chosen or no rejected member) are dropped
    here, so they are out of every mean, and counted by the caller. Reference log-probs are checked."""
    if not tgroups:
        raise ValueError("no groups to train on")
    batch = collate(tgroups)
    zeros = torch.zeros_like(batch.rewards)
    flags = loss_fn.trainable(GroupBatch(zeros, zeros, batch.rewards, batch.chosen_mask, batch.valid_mask))
    kept = [t for t, ok in zip(tgroups, flags.tolist()) if ok]
    missing = [t.group.prompt_id for t in kept if t.group.ref_logp_sum is None]
    if loss_fn.spec.needs_ref and missing:
        raise ValueError(f"loss {loss_fn.name!r} needs reference log-probs, but groups {missing[:5]} have none; "
                         f"run ampo.reflogps.compute_reference_logps first")
    if not kept:
        raise ValueError(f"none of the {len(tgroups)} groups is trainable by loss {loss_fn.name!r} "
                         f"(each needs a chosen and a rejected member)")
    return kept


def resume(accelerator, output_dir: Path, identity: dict, *, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Load the newest saved state of this run, if any (safetensors and JSON only; a pickle-based file is refused).
    Returns (steps already done, their metrics)."""
    state_dir = latest_training_state(output_dir)
    if state_dir is None:
        return 0, []
    state = read_trainer_state(state_dir)
    differs = identity_differences(state, identity)
    if differs:
        raise ValueError(f"{state_dir} was saved by a different run (saved, now): {differs}; "
                         f"use a new output_dir or delete {state_dir.parent}")
    load_training_state(accelerator, state_dir, model=model, optimizer=optimizer, scheduler=scheduler)
    log.info("resumed from %s after %d steps", state_dir, state["next_step"])
    return state["next_step"], state["history"]


# ----------------------------------------------------------------------------- metrics and manifest


def run_metrics(history: list[dict], n_groups: int, n_skipped: int, n_truncated: int, seconds: float) -> dict:
    """Totals of a run; `perf/*` cover the steps run by this process (after a resume: since the resume)."""
    losses = [h["train/loss"] for h in history]
    tokens = sum(h["perf/tokens"] for h in history)
    step_seconds = sum(h["perf/seconds"] for h in history)
    return {"train/steps": len(history), "train/loss_first": losses[0] if losses else None,
            "train/loss_last": losses[-1] if losses else None,
            "rewards/margins_first": history[0]["rewards/margins"] if history else None,
            "rewards/margins_last": history[-1]["rewards/margins"] if history else None,
            "data/groups": n_groups, "data/skipped_groups": n_skipped, "data/truncated_responses": n_truncated,
            "perf/tokens": tokens, "perf/tokens_per_s": tokens / step_seconds if step_seconds else None,
            "perf/seconds": seconds}


CALLER_KEYS = ("id", "run", "round", "parent", "data_version")  # what manifest_extra usually gives
TRAINER_KEYS = ("format", "loss", "loss_params", "config_hash", "data_hash", "steps", "epochs", "train_config",
                "metrics", "losses", "versions", "created_at")  # what only the trainer writes


def check_manifest_extra(extra: dict) -> None:
    clash = sorted(k for k in extra if k in TRAINER_KEYS)
    if clash:
        raise ValueError(f"manifest_extra may not set {clash}: the trainer writes them; "
                         f"callers usually give {list(CALLER_KEYS)}")


def build_manifest(policy_path: str, loss_fn: LossFn, cfg: TrainConfig, identity: dict, metrics: dict,
                   history: list[dict], extra: dict) -> dict:
    """The manifest: what this checkpoint is, where it came from, how it was trained."""
    import accelerate
    import transformers

    manifest = {
        "format": 1, "parent": policy_path, "loss": loss_fn.name, "loss_params": loss_fn.describe(),
        "config_hash": identity["config_hash"], "data_hash": identity["data_hash"],
        "steps": len(history), "epochs": cfg.epochs, "train_config": cfg.model_dump(mode="json"),
        "metrics": metrics, "losses": [h["train/loss"] for h in history],
        "versions": {"ampo": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    check_manifest_extra(extra)
    assert set(manifest) == {*TRAINER_KEYS, "parent"}, "TRAINER_KEYS is out of date"
    return {**{k: None for k in CALLER_KEYS}, **manifest, **extra}


def identity_differences(saved: dict, now: dict) -> dict:
    """key -> (saved, now) for each key of `now` whose saved value differs: what makes a saved state or
    checkpoint belong to another run."""
    return {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}


def check_finished_checkpoint(path: Path, config_id: str, data_id: str) -> None:
    """A finished checkpoint is reused only if it was trained with this config and these groups; otherwise
    reusing it would silently keep other weights, and overwriting it could destroy a promoted model."""
    differs = identity_differences(load_checkpoint_manifest(path), {"config_hash": config_id, "data_hash": data_id})
    if differs:
        raise ValueError(f"{path} is a finished checkpoint of another training config or data (manifest, now): "
                         f"{differs}; train into a new output_dir, or move that folder away first")


def result_from_checkpoint(path: Path) -> TrainResult:
    """The TrainResult of a finished checkpoint, read from its manifest."""
    manifest = load_checkpoint_manifest(path)
    return TrainResult(Path(path), manifest["metrics"], manifest["losses"], [])


# ----------------------------------------------------------------------------- launched entry point


class TrainSpec(BaseModel):
    """Everything `python -m ampo.trainer --spec spec.json` needs; the groups travel in a JSON-lines file (or, in
    this process, straight to `run_spec(spec, groups=...)`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy_path: str
    groups_path: str | None = None  # written by ampo.training_data.save_groups; None: run_spec is handed them
    output_dir: str
    loss: LossConfig = AmpoConfig()
    train: TrainConfig = TrainConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    manifest_extra: dict = {}
    system_prompt: str | None = None
    response_span: ResponseSpan = "generation"
    forward_mode: ForwardMode = "auto"


def run_spec(spec: TrainSpec, progress: Callable[[int, int, dict], None] | None = None, *,
             groups: list[Group] | None = None) -> TrainResult:
    """Train as a spec says, in this process, on `groups` when given, else on the groups file of the spec."""
    if groups is None and spec.groups_path is None:
        raise ValueError("run_spec needs the groups: pass groups=... or a spec with groups_path")
    options = ForwardOptions(spec.system_prompt, spec.response_span, spec.forward_mode)
    groups = load_groups(spec.groups_path) if groups is None else groups
    return train(spec.policy_path, groups, make_loss_fn(spec.loss), spec.train,
                 output_dir=Path(spec.output_dir), runtime=spec.runtime, manifest_extra=dict(spec.manifest_extra),
                 options=options, progress=progress)


def launch_command(spec_path: str | Path, runtime: RuntimeConfig) -> list[str]:
    """The command that trains a spec file: `accelerate launch [--config_file ...] -m ampo.trainer --spec ...`
    when runtime.launcher is accelerate, else plain `python -m ampo.trainer --spec ...`."""
    entry = ["-m", "ampo.trainer", "--spec", str(spec_path)]
    if runtime.launcher == "python":
        return [sys.executable, *entry]
    config = ["--config_file", runtime.accelerate_config] if runtime.accelerate_config else []
    return [sys.executable, "-m", "accelerate.commands.launch", *config, *entry]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ampo.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="JSON file holding a TrainSpec")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    path = Path(args.spec)
    if not path.is_file():
        raise FileNotFoundError(f"spec file not found: {path}")
    result = run_spec(TrainSpec.model_validate_json(path.read_text()))
    print(result.checkpoint_path)


if __name__ == "__main__":
    main()
