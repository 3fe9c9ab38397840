"""The promote stage: the gates decide on the evaluate stage's intervals; the candidate becomes the champion in one
commit, or is marked rejected; the round's data is tagged."""

from __future__ import annotations

from ampo.gates import Evaluation, decide
from ampo.stages.context import RoundContext, StageResult, candidate_checkpoint_id, checkpoint_places


def promote(ctx: RoundContext) -> StageResult:
    """Apply the gates to the evaluation; promote the candidate (one commit) or mark it rejected. Tags the round."""
    record = ctx.store.stage_status(ctx.run, ctx.round).get("evaluate")
    if record is None or record["status"] != "done":
        raise ValueError(f"run {ctx.run!r} round {ctx.round}: the evaluate stage has not finished")
    m = record["metrics"]
    if "difference" not in m:
        raise ValueError(f"run {ctx.run!r} round {ctx.round}: the evaluate record predates intervals; run the evaluate"
                         f" stage again (force) to compute them")  # fmt: skip
    decision = decide(ctx.cfg.eval.gates, Evaluation.model_validate(m))
    ckpt_id = candidate_checkpoint_id(ctx.run, ctx.round)
    ctx.store.upsert_checkpoint({"id": ckpt_id, "metrics": {**m, "gate": decision.as_dict()}})
    if decision.passed:
        from ampo.checkpoints import resolve_checkpoint

        # never champion a checkpoint without its manifest (on object storage: an unfinished upload)
        resolve_checkpoint(ctx.store.get_checkpoint(ckpt_id), checkpoint_places(ctx.cfg))
        ctx.store.set_champion(ctx.run, ckpt_id, expected=ctx.start["id"])  # the champion the gate compared with
    elif ctx.store.get_checkpoint(ckpt_id)["status"] != "champion":
        ctx.store.upsert_checkpoint({"id": ckpt_id, "status": "rejected"})
    champion = ctx.store.champion(ctx.run)["id"]
    tag = ctx.store.tag_round(ctx.run, ctx.round)
    return StageResult({"promoted": int(decision.passed), "champion": champion, "tag": tag}, gate=decision.as_dict())
