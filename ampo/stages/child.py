"""One stage of one round run in its own process: `python -m ampo.stages.child NAME --config C --run R --round N`.

`run_stage_isolated` starts it for the stages that hold an accelerator (their memory is returned when the process
exits); `ampo stage` runs the same function in the calling process. An error prints one line (the traceback with
AMPO_DEBUG=1) and exits 2, or TRANSIENT_EXIT when a retry can fix it, so the parent flow's retry policy sees it.
"""

from __future__ import annotations

import argparse
import json
import sys

from ampo.config import RunConfig, load_config
from ampo.errors import debug_enabled, error_line
from ampo.progress import terminal_progress
from ampo.runlock import stage_lock
from ampo.stages import TRANSIENT_EXIT, is_transient, run_stage


class TransientExit(SystemExit):
    """Raised (as a SystemExit with TRANSIENT_EXIT) when a stage failed with an error that a retry can fix."""


def run_stage_command(name: str, cfg: RunConfig, run: str, round_: int, *, force: bool = False) -> dict:
    """Run one stage under the run's lock (the parent flow's, when it started this process), with terminal progress;
    a transient failure prints one line and exits with TRANSIENT_EXIT."""
    progress = terminal_progress()
    try:
        with stage_lock(cfg.store.uri, run):
            return run_stage(name, cfg, run, round_, force=force, progress=progress)
    except Exception as exc:
        if is_transient(exc):
            print(f"error (transient): {exc}", file=sys.stderr)
            raise TransientExit(TRANSIENT_EXIT) from exc
        raise
    finally:
        if progress is not None:
            progress.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ampo.stages.child", description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--config", required=True, help="the run config (YAML or JSON) the parent wrote")
    parser.add_argument("--run", required=True)
    parser.add_argument("--round", type=int, required=True, dest="round_", metavar="N")
    args = parser.parse_args(argv)
    store_uri = None
    try:
        cfg = load_config(args.config)
        store_uri = cfg.store.uri
        record = run_stage_command(args.name, cfg, args.run, args.round_)
    except Exception as exc:  # noqa: BLE001 - one line on stderr; the stage's record in the store keeps the message
        if debug_enabled():
            import traceback

            traceback.print_exc()
        print(f"error: {error_line(exc, store_uri)}", file=sys.stderr)
        return 2
    print(f"{args.name} r{args.round_}: done in {record['seconds'] or 0:.1f}s {json.dumps(record['counts'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
