"""The learning stages of a round: reference log-probs of the selected responses, then training on the groups."""

from __future__ import annotations

import subprocess

import numpy as np
import pyarrow.compute as pc

from ampo.stages.context import (
    RoundContext,
    candidate_checkpoint_id,
    checkpoint_dir,
    checkpoint_places,
    write_json_atomic,
)
from ampo.store.pools import split_by_prompt

GROUP_COLUMNS = ["id", "prompt_id", "prompt", "response", "reward", "role", "ref_logp_sum", "ref_logp_mean"]


def read_groups(ctx: RoundContext, *, with_reference: bool):
    """The round's selected groups from the store, chosen first then by reward (ids returned in the same order)."""
    from ampo.training_data import Group

    rows = ctx.store.read_rows(ctx.run, ctx.round, GROUP_COLUMNS, selected=True)
    groups, ids = [], []
    for members in split_by_prompt(rows.to_pylist()):  # sorted by (prompt_id, sample)
        prompt_id = members[0]["prompt_id"]
        members.sort(key=lambda r: (r["role"] != "chosen", -(r["reward"] or 0.0), r["id"]))
        ref = with_reference and all(r["ref_logp_sum"] is not None for r in members)
        groups.append(Group(prompt_id=prompt_id, prompt=members[0]["prompt"],
                            responses=[r["response"] for r in members], rewards=[r["reward"] for r in members],
                            chosen=[r["role"] == "chosen" for r in members],
                            ref_logp_sum=[r["ref_logp_sum"] for r in members] if ref else None,
                            ref_logp_mean=[r["ref_logp_mean"] for r in members] if ref else None))  # fmt: skip
        ids.extend(r["id"] for r in members)
    return groups, ids


def forward_options(ctx: RoundContext):
    from ampo.training_data import ForwardOptions

    return ForwardOptions(system_prompt=ctx.cfg.generation.system_prompt, forward_mode=ctx.cfg.train.forward_mode)


def reflogps(ctx: RoundContext) -> dict:
    """Summed and length-normalised log-probs of every selected response under the reference policy.

    Skipped for a loss that takes no reference (its registry row's `needs_ref`): the stage is recorded done with
    nothing computed and `skipped_reason` in its counts, so resume moves on and the audit says why.
    """
    from ampo.reflogps import compute_reference_logps

    loss = ctx.cfg.loss
    rows = ctx.store.read_rows(ctx.run, ctx.round, ["id", "ref_logp_sum"], selected=True)
    if not loss.spec.needs_ref:
        return {"selected": rows.num_rows, "computed": 0,
                "skipped_reason": f"loss {loss.name!r} takes no reference log-probs"}
    missing = pc.sum(pc.is_null(rows["ref_logp_sum"])).as_py() or 0
    counts = {"selected": rows.num_rows, "already_computed": rows.num_rows - missing, "computed": 0}
    if missing == 0:
        return counts
    reference = ctx.start if ctx.cfg.train.reference == "champion" else ctx.initial
    groups, ids = read_groups(ctx, with_reference=False)
    ref = compute_reference_logps(reference["path"], groups, ctx.cfg.train, ctx.cfg.runtime,
                                  options=forward_options(ctx))  # fmt: skip
    ctx.store.update_candidates(ids, ref_logp_sum=ref.sum, ref_logp_mean=ref.mean,
                                ref_n_tokens=ref.n_tokens.astype(np.int64))  # fmt: skip
    counts.update(computed=len(ids), reference=reference["id"])
    return counts


def train(ctx: RoundContext) -> dict:
    """Train the round's starting champion on its selected groups; register the result as a candidate."""
    from ampo.checkpoints import load_checkpoint_manifest
    from ampo.trainer import TrainSpec, launch_command, run_spec
    from ampo.training_data import save_groups

    cfg = ctx.cfg
    groups, _ = read_groups(ctx, with_reference=True)
    if not groups:
        raise ValueError(f"run {ctx.run!r} round {ctx.round} has no selected groups to train on: every pool was "
                         f"skipped at select (see its counts: skipped_no_spread, skipped_low_potential); sample "
                         f"more responses or prompts, or lower selection.min_reward_spread")
    if cfg.loss.spec.needs_ref and any(g.ref_logp_sum is None for g in groups):
        raise ValueError(f"loss {cfg.loss.name!r} needs reference log-probs; run the reflogps stage first (with "
                         f"--force if it ran, and was skipped, under a reference-free loss)")
    ckpt_id = candidate_checkpoint_id(ctx.run, ctx.round)
    out = checkpoint_dir(cfg, ctx.run, ckpt_id)
    existing = ctx.store.get_checkpoint(ckpt_id)
    if existing is not None and existing["status"] in ("champion", "retired"):
        raise ValueError(f"round {ctx.round} of run {ctx.run!r} was already promoted: checkpoint {ckpt_id!r} is "
                         f"{existing['status']}; training it again would replace promoted weights. Start a new "
                         f"round, or `ampo rollback` first and train in a new run")
    spec = TrainSpec(policy_path=ctx.start["path"], output_dir=str(out), loss=cfg.loss, train=cfg.train,
                     runtime=cfg.runtime, manifest_extra={"id": ckpt_id, "parent": ctx.start["id"], "run": ctx.run,
                                                          "round": ctx.round, "data_version": ctx.store.version},
                     system_prompt=cfg.generation.system_prompt, forward_mode=cfg.train.forward_mode)  # fmt: skip
    if cfg.runtime.launcher == "accelerate":  # another process: the groups and the spec travel as files
        groups_path = str(save_groups(ctx.dir / "groups.jsonl", groups))
        spec_path = write_json_atomic(ctx.dir / "train-spec.json",
                                      spec.model_copy(update={"groups_path": groups_path}).model_dump(mode="json"))
        subprocess.run(launch_command(spec_path, cfg.runtime), check=True)
        metrics = load_checkpoint_manifest(out)["metrics"]
    else:  # this process: the groups are handed over in memory, nothing is written to be read back
        metrics = run_spec(spec, progress=lambda step, total, _: ctx.report("train", step, total),
                           groups=groups).metrics
    # published (on object storage: every file uploaded, the manifest last) before it is registered: a checkpoint
    # is visible to promotion only once it is complete where the registry says it is
    path = checkpoint_places(cfg).publish(out, ctx.run, ckpt_id)
    ctx.store.upsert_checkpoint({"id": ckpt_id, "run": ctx.run, "round": ctx.round, "path": path,
                                 "parent": ctx.start["id"], "status": "candidate",
                                 "config_hash": load_checkpoint_manifest(out).get("config_hash", ""),
                                 "data_version": ctx.store.version})  # fmt: skip
    return {"groups": len(groups), "checkpoint": ckpt_id, **_numbers(metrics)}


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
