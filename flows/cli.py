"""The `ampo` command line: run rounds, run single stages, inspect and audit runs, manage the champion."""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from ampo.errors import debug_enabled, error_line

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "infra" / "configs" / "demo.yaml"

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="ampo: iterative self-play preference optimization (AMPO selection, group losses, gates).")
audit_app = typer.Typer(no_args_is_help=True, help="Query the store: pools, selected groups, neighbours, export.")
models_app = typer.Typer(no_args_is_help=True, help="Prepare the built-in policies (offline, cached).")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks run from this checkout (benchmarks/*.py).")
app.add_typer(audit_app, name="audit")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="run config YAML (see infra/configs/)")]
RunOpt = Annotated[str, typer.Option("--run", "-r", help="run id: letters, digits, '_', '.', '-'")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config value: key.path=value (YAML)")]


def _config(path: Path, overrides: list[str] | None):
    import yaml

    from ampo.config import load_config

    pairs = {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        pairs[key.strip()] = yaml.safe_load(value)
    cfg = load_config(path, pairs)
    _STORE_URI["uri"] = cfg.store.uri
    return cfg


def _prefect_env() -> None:
    """Defaults that let flows run on Prefect's temporary local server with no setup (the embedded default)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "ampo")
    os.environ.setdefault("LANCE_LOG", "error")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


def _start_temporary_server() -> Callable[[], None]:
    """With no Prefect server configured (no PREFECT_API_URL), start Prefect's temporary server now, from a thread,
    so that its start (a process of its own: imports, database migrations, 5-30 s on 2 busy cores) overlaps the
    imports that follow (the flows, the stages, torch); returns the wait for it, called before the first flow. The
    flow's client then finds it running (Prefect keeps one temporary server per process). With a server
    configured, nothing is started and the wait returns at once."""
    import threading

    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return lambda: None
    failed: list[BaseException] = []

    def start() -> None:
        try:
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().start()
        except Exception as err:  # noqa: BLE001 - raised again in the main thread by the wait
            failed.append(err)

    thread = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    thread.start()

    def ready() -> None:
        thread.join()
        if failed:
            raise failed[0]

    return ready


def _offline_env() -> None:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")


@app.command()
def demo(
    run: RunOpt = "demo",
    config: ConfigOpt = DEMO_CONFIG,
    overrides: SetOpt = None,
) -> None:
    """One full self-play round with SmolLM2-135M-Instruct on CPU, fully offline, under Prefect's embedded server."""
    _offline_env()
    _prefect_env()
    cfg = _config(config, overrides)
    server_ready = _start_temporary_server()
    from flows.self_play import local_flow_settings, self_play_round

    _quiet_prefect_tracebacks()
    server_ready()
    with _precheck(cfg, run), local_flow_settings():
        result = self_play_round(cfg, run)
    _print_round_table(cfg, run, result["round"], config, overrides)


@app.command("round")
def round_(
    config: ConfigOpt, run: RunOpt, round_: Annotated[int | None, typer.Option("--round", help="default: next")] = None,
    wait: Annotated[float, typer.Option(help="seconds to wait for another process holding the run")] = 0.0,
    overrides: SetOpt = None,
) -> None:
    """Run (or resume) one round as a Prefect flow run."""
    _prefect_env()
    cfg = _config(config, overrides)
    server_ready = _start_temporary_server()
    from flows.self_play import local_flow_settings, self_play_round

    _quiet_prefect_tracebacks()
    server_ready()
    with _precheck(cfg, run, round_=round_, wait=wait), local_flow_settings():
        result = self_play_round(cfg, run, round_, wait)
    _print_round_table(cfg, run, result["round"], config, overrides)


@app.command("run")
def run_rounds(
    config: ConfigOpt, run: RunOpt, rounds: Annotated[int, typer.Option(help="rounds to run")] = 1,
    wait: Annotated[float, typer.Option(help="seconds to wait for another process holding the run")] = 0.0,
    overrides: SetOpt = None,
) -> None:
    """Run N more rounds of a run as a Prefect flow run, each from the current champion."""
    _prefect_env()
    cfg = _config(config, overrides)
    server_ready = _start_temporary_server()
    from flows.self_play import local_flow_settings, self_play

    _quiet_prefect_tracebacks()
    server_ready()
    with _precheck(cfg, run, rounds=rounds, wait=wait), local_flow_settings():
        results = self_play(cfg, run, rounds, wait)
    for result in results:
        _print_round_table(cfg, run, result["round"], config, overrides)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="generate, score, embed, select, reflogps, train, evaluate, promote")],
    config: ConfigOpt, run: RunOpt, round_: Annotated[int, typer.Option("--round")],
    force: Annotated[bool, typer.Option(help="run again even if the stage finished")] = False,
    overrides: SetOpt = None,
) -> None:
    """Run one stage of one round in this process (no Prefect), then exit."""
    from ampo.stages.child import run_stage_command

    record = run_stage_command(name, _config(config, overrides), run, round_, force=force)
    state = "already done (skipped)" if record["skipped"] else f"done in {record['seconds']:.1f}s"
    typer.echo(f"{name} r{round_}: {state} {json.dumps(record['counts'])}")


@app.command()
def status(config: ConfigOpt, run: Annotated[str | None, typer.Option("--run", "-r")] = None,
           overrides: SetOpt = None) -> None:
    """Runs, rounds, their stages and each run's champion."""
    from rich.console import Console
    from rich.table import Table

    from ampo.audit import runs_overview
    from ampo.stages.context import open_store

    store = open_store(_config(config, overrides), must_exist=True)
    rows = [r for r in runs_overview(store) if run is None or r["run"] == run]
    typer.echo(f"store: {store.uri}")
    if not rows:
        typer.echo("no rounds recorded yet" + (f" for run {run!r}" if run else ""))
        return
    table = Table("run", "round", "stages done", "not done", "seconds", "gate", "champion")
    for r in rows:
        table.add_row(r["run"], str(r["round"]), str(len(r["done"])), " ".join(r["pending"]) or "-",
                      f"{r['seconds']:.0f}", r["gate"] or "-", r["champion"] or "-")
    Console().print(table)


WaitOpt = Annotated[float, typer.Option(help="seconds to wait for another process holding the run")]


@app.command()
def promote(config: ConfigOpt, run: RunOpt, checkpoint: Annotated[str, typer.Option(help="checkpoint id")],
            wait: WaitOpt = 0.0, overrides: SetOpt = None) -> None:
    """Make a checkpoint the run's champion by hand (bypasses the gates; recorded in the registry)."""
    _set_champion(config, overrides, run, checkpoint, "promote", wait)


@app.command()
def rollback(config: ConfigOpt, run: RunOpt, to: Annotated[str, typer.Option(help="earlier checkpoint id")],
             wait: WaitOpt = 0.0, overrides: SetOpt = None) -> None:
    """Set the run's champion back to an earlier checkpoint; the current one is retired."""
    _set_champion(config, overrides, run, to, "rollback", wait)


def _set_champion(config: Path, overrides: list[str] | None, run: str, checkpoint: str, command: str,
                  wait: float) -> None:
    """Under the run lock (a round in progress is never changed under its feet): check, then swap in one commit."""
    from ampo.checkpoints import resolve_checkpoint
    from ampo.config import validate_run_id
    from ampo.runlock import RunLockedError, run_lock
    from ampo.stages.context import checkpoint_places, open_store

    cfg = _config(config, overrides)
    store = open_store(cfg)
    validate_run_id(run)
    try:
        with run_lock(cfg.store.uri, run, wait_s=wait):
            record = store.get_checkpoint(checkpoint)
            if record is None or record["run"] != run:
                known = [c["id"] for c in store.list_checkpoints(run)]
                raise ValueError(f"checkpoint {checkpoint!r} is not in run {run!r}; known: {known}")
            resolve_checkpoint(record, checkpoint_places(cfg))  # never champion a checkpoint without its manifest
            current = store.champion(run)
            store.set_champion(run, checkpoint, expected=None if current is None else current["id"])
    except RunLockedError as exc:
        raise RunLockedError(f"{command} refused, the champion is unchanged: {exc}") from None
    verb = {"promote": "promoted", "rollback": "rolled back to"}[command]
    typer.echo(f"run {run}: {verb} {checkpoint}")


@app.command()
def serve(
    config: ConfigOpt, run: RunOpt,
    cron: Annotated[str | None, typer.Option(help="schedule, e.g. '0 3 * * *'; none: trigger by hand")] = None,
    name: Annotated[str, typer.Option(help="deployment name")] = "ampo-round",
    overrides: SetOpt = None,
) -> None:
    """Serve the round flow as a deployment on this box (flow.serve); trigger it from the UI or the CLI."""
    _prefect_env()
    cfg = _config(config, overrides)
    from prefect.settings import PREFECT_API_URL

    from ampo.config import validate_run_id
    from flows.self_play import self_play_round

    validate_run_id(run)
    if cron is not None and not PREFECT_API_URL.value():
        raise ValueError("--cron needs a Prefect server: the temporary one runs no schedules. Start one on loopback "
                         "(prefect server start --host 127.0.0.1) and export "
                         "PREFECT_API_URL=http://127.0.0.1:4200/api, then serve again")
    self_play_round.serve(name=name, parameters={"config": cfg.model_dump(mode="json"), "run_id": run, "plots": True},
                          cron=cron)


@audit_app.command("pool")
def audit_pool(config: ConfigOpt, run: RunOpt, round_: Annotated[int, typer.Option("--round")],
               prompt: Annotated[str, typer.Option(help="prompt id")], overrides: SetOpt = None) -> None:
    """One prompt's whole pool: rewards, roles, clusters, best first."""
    from ampo.stages.context import open_store

    table = open_store(_config(config, overrides), must_exist=True).prompt_pool(run, round_, prompt)
    if table.num_rows == 0:
        raise ValueError(f"no responses for prompt {prompt!r} in run {run!r} round {round_}")
    _print_rows(table.to_pylist(), ["sample", "reward", "role", "cluster", "n_tokens", "response"])


@audit_app.command("groups")
def audit_groups(config: ConfigOpt, run: RunOpt, round_: Annotated[int, typer.Option("--round")],
                 limit: Annotated[int, typer.Option(help="prompts to show")] = 5, overrides: SetOpt = None) -> None:
    """The round's selected groups: chosen first, then the rejected by reward."""
    from ampo.stages.context import open_store

    groups = open_store(_config(config, overrides), must_exist=True).selected_groups(run, round_)
    if not groups:
        raise ValueError(f"run {run!r} round {round_} has no selected groups")
    for prompt_id, table in list(groups.items())[:limit]:
        typer.echo(f"\n# {prompt_id}")
        _print_rows(table.to_pylist(), ["sample", "role", "reward", "cluster", "response"])
    typer.echo(f"\n{len(groups)} groups in all")


@audit_app.command("neighbours")
def audit_neighbours(
    config: ConfigOpt, text: Annotated[str | None, typer.Option(help="find responses near this text")] = None,
    row: Annotated[str | None, typer.Option(help="or near this candidate id")] = None,
    k: Annotated[int, typer.Option(help="how many")] = 5,
    overrides: SetOpt = None,
) -> None:
    """Nearest responses (by embedding) to a text or to a stored response."""
    from ampo.stages.context import open_store

    cfg = _config(config, overrides)
    store = open_store(cfg)
    if (text is None) == (row is None):
        raise ValueError("give exactly one of --text or --row")
    if row is not None:
        table = store.neighbours_of_row(row, k)
    else:
        from ampo.embedding import SentenceTransformerEmbedder

        table = store.neighbours(SentenceTransformerEmbedder(cfg.embedding).embed([text])[0], k)
    _print_rows(table.to_pylist(), ["id", "reward", "role", "_distance", "response"])


@audit_app.command("export")
def audit_export(config: ConfigOpt, run: RunOpt, round_: Annotated[int, typer.Option("--round")],
                 out: Annotated[Path, typer.Option(help="output .jsonl")], overrides: SetOpt = None) -> None:
    """Export the round's selected groups as JSONL in the released AMPO dataset layout."""
    from ampo.audit import export_groups
    from ampo.stages.context import open_store

    n = export_groups(open_store(_config(config, overrides), must_exist=True), run, round_, out)
    typer.echo(f"wrote {n} groups to {out}")


@models_app.command("prepare")
def models_prepare(name: Annotated[str, typer.Argument(help="smollm2-135m-instruct or tiny-llama")]) -> None:
    """Build a built-in policy once into the cache (outside the repo) and print its folder."""
    _offline_env()
    from ampo.models import resolve_policy

    if name not in ("smollm2-135m-instruct", "tiny-llama"):
        raise ValueError(f"unknown built-in model {name!r}; choose from ['smollm2-135m-instruct', 'tiny-llama']")
    typer.echo(resolve_policy(name))


QUALITY_BENCH = REPO / "benchmarks" / "quality.py"


def quality_bench_module():
    """benchmarks/quality.py of this checkout, loaded once (the benchmarks are scripts, not an installed package)."""
    import importlib.util

    name = "ampo_benchmarks_quality"
    if name not in sys.modules:
        if not QUALITY_BENCH.is_file():
            raise FileNotFoundError(f"{QUALITY_BENCH} not found: `ampo bench quality` runs from a checkout of the repo")
        spec = importlib.util.spec_from_file_location(name, QUALITY_BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@bench_app.command("quality")
def bench_quality(
    profile: Annotated[str, typer.Option(help="tiny (bookkeeping, seconds), cpu (~90 min, 2 cores) or gpu")] = "cpu",
    out: Annotated[Path | None, typer.Option(help="results folder; default .ampo/bench-quality/<profile>")] = None,
    overrides: SetOpt = None,
    arms: Annotated[str | None, typer.Option(help="comma-separated arms (default: the profile's)")] = None,
    rounds: Annotated[int | None, typer.Option(help="replace the profile's rounds")] = None,
    seeds: Annotated[int | None, typer.Option(help="replace the profile's seeds")] = None,
    ifbench: Annotated[int | None, typer.Option(help="replace the profile's IFBench subset size")] = None,
    heldout: Annotated[int | None, typer.Option(help="replace the profile's held-out prompts")] = None,
    pools: Annotated[Path | None, typer.Option(help="copy round 0's pools and the base evaluation from this folder")] = None,
) -> None:
    """The quality benchmark (benchmarks/quality.py, same options): arms x seeds x rounds at equal compute, held-out
    accuracy and reward with paired bootstrap intervals vs the base model and vs best-vs-worst DPO. Resumes."""
    _offline_env()
    argv = ["--profile", profile]
    for flag, value in (("--out", out), ("--arms", arms), ("--rounds", rounds), ("--seeds", seeds),
                        ("--ifbench", ifbench), ("--heldout", heldout), ("--pools", pools)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    for item in overrides or []:
        argv += ["--set", item]
    quality_bench_module().main(argv)


@app.command()
def version() -> None:
    """Print the ampo version."""
    from ampo import __version__

    typer.echo(__version__)


def _print_rows(rows: list[dict], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for r in rows:
        table.add_row(*(_cell(r.get(c)) for c in columns))
    Console().print(table)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    text = "" if value is None else str(value)
    return text if len(text) <= 80 else text[:77].replace("\n", " ") + "..."


def _eval_cells(metrics: dict) -> list[str]:
    """Champion reward, candidate reward and win rate of an evaluate record, each with its one-sided bounds."""
    if "difference" in metrics:
        from ampo.gates import Interval

        ivs = (metrics["champion"]["mean_reward"], metrics["candidate"]["mean_reward"], metrics["win_rate"])
        return [Interval(**iv).text(".3f") for iv in ivs]
    return [_cell(metrics.get(k)) for k in ("champion/mean_reward", "candidate/mean_reward", "eval/win_rate")]


def _print_round_table(cfg, run: str, round_: int, config_path: Path, overrides: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from ampo.gates import gate_summary
    from ampo.stages.context import open_store

    store = open_store(cfg)
    status = store.stage_status(run, round_)
    counts = lambda s: (status.get(s) or {}).get("counts") or {}
    metrics = (status.get("evaluate") or {}).get("metrics") or {}
    gate = (status.get("promote") or {}).get("gate") or {}
    table = Table("round", "prompts", "responses", "selected", "reward before", "reward after", "win rate", "gate",
                  title=f"run {run}")
    table.add_row(str(round_), str(counts("generate").get("prompts", "-")), str(store.count(run, round_)),
                  str(counts("select").get("selected", "-")), *_eval_cells(metrics), gate_summary(gate) or "-")
    console = Console(width=max(Console().width, 120))  # the table and the commands stay unwrapped in logs
    console.print(table)
    for reason in gate.get("reasons", []):
        console.print(f"  gate: {reason}")
    c = f"--config {config_path} --run {run}" + "".join(f" --set {shlex.quote(o)}" for o in overrides or [])
    console.print("\nAudit this round:")
    for line in (f"ampo status {c}", f"ampo audit groups {c} --round {round_}",
                 f"ampo audit export {c} --round {round_} --out selected-r{round_}.jsonl",
                 f"report: {Path(cfg.runtime.workdir) / 'runs' / run / f'round-{round_}' / 'report' / 'summary.md'}"):
        console.print(f"  {line}")


@contextmanager
def _precheck(cfg, run: str, round_: int | None = None, rounds: int | None = None, wait: float = 0.0):
    """What a flow would refuse, refused before it starts: one line instead of a flow run's failure log. Holds
    the run lock for the block: the flow called inside re-enters it, so a round takes the lock once."""
    from ampo.config import validate_run_id
    from ampo.runlock import run_lock
    from ampo.stages import check_round_order, check_stage_round

    validate_run_id(run)
    if round_ is not None:
        check_stage_round(round_)
    if rounds is not None and rounds < 1:
        raise ValueError(f"--rounds {rounds}: must be >= 1")
    if wait > 0:
        typer.echo(f"waiting up to {wait:g}s for run {run!r} if another process holds it", err=True)
    from flows.self_play import store_credentials

    with store_credentials(cfg), run_lock(cfg.store.uri, run, wait_s=wait) as holder:
        if round_ is not None:
            check_round_order(cfg, run, round_)
        yield holder


def main() -> None:
    """Entry point: an error is one line on stderr and exit status 2; `--debug` (or AMPO_DEBUG=1) adds the traceback."""
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - every error ends as one line; the traceback is behind --debug
        if debug_enabled():
            import traceback

            traceback.print_exc()
        typer.echo(f"error: {error_line(exc, _STORE_URI.get('uri'))}", err=True)
        sys.exit(2)


_STORE_URI: dict[str, str] = {}  # the store of the config this command read, named in errors the store raises
@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="print the full traceback of an error")] = False):
    if debug:
        os.environ["AMPO_DEBUG"] = "1"  # stage child processes print theirs too


def _quiet_prefect_tracebacks() -> None:
    """Prefect's terminal log shows a failed task or flow as its log line only, without the traceback (it still
    goes to the Prefect API, so the UI and the flow-run logs keep it); `--debug` keeps it on the terminal too."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    if debug_enabled():
        return
    for name in (None, "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _NoTraceback):
                handler.setFormatter(_NoTraceback(handler.formatter or logging.Formatter()))


class _NoTraceback:
    """Formats a copy of the record without its exception info; the record itself is left for other handlers."""

    def __init__(self, inner):
        self.inner = inner

    def format(self, record):
        import logging

        if not (record.exc_info or record.exc_text or record.stack_info):
            return self.inner.format(record)
        plain = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
        return self.inner.format(plain)


if __name__ == "__main__":
    main()
