"""The CLI's error promise: one line on stderr naming what is wrong, exit status 2, the traceback behind --debug."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import cli

from ampo.config import load_config
from ampo.models import resolve_policy
from ampo.stages import run_stage

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "infra" / "configs" / "smoke.yaml"


def smoke_config(tmp_path, **overrides):
    base = {"store.uri": str(tmp_path / "store"), "runtime.workdir": str(tmp_path / "work")}
    return load_config(SMOKE, {**base, **overrides})


def write_config(tmp_path, cfg) -> Path:
    path = tmp_path / "cfg.json"
    path.write_text(cfg.model_dump_json())
    return path


def one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line on stderr, got:\n{err}"
    assert err.startswith("error: ")
    return err[len("error: ") : -1]


def test_a_config_error_is_one_line_naming_the_file_the_field_and_the_problem(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: tiny-llama\ngeneration:\n  n: 1\n  temperature: hot\n")
    status, _, err = cli(monkeypatch, capsys, "status", "-c", bad)
    assert status == 2
    assert one_line(err) == (f"{bad}: generation.n: Input should be greater than or equal to 2 (got 1); "
                             "generation.temperature: Input should be a valid number, unable to parse string as a "
                             "number (got 'hot')")
    status, _, err = cli(monkeypatch, capsys, "status", "-c", bad, "--set", "generation={}", "--set", "train.lrr=x")
    assert status == 2 and one_line(err) == f"{bad}: train.lrr: Extra inputs are not permitted (got 'x')"


def test_a_raising_python_reward_is_named_with_its_exception(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AMPO_DEBUG", "0")  # restored after the test: --debug below sets it to 1
    (tmp_path / "ampo_test_boom.py").write_text("def score(prompts, responses):\n    return [1 / 0 for _ in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = smoke_config(tmp_path, **{"prompts.per_round": 1,
                                    "reward.components": [{"kind": "python", "function": "ampo_test_boom:score"}]})
    run_stage("generate", cfg, "boom", 0)
    status, _, err = cli(monkeypatch, capsys, "stage", "score", "-c", write_config(tmp_path, cfg), "-r", "boom",
                         "--round", 0)
    assert status == 2
    assert one_line(err) == "python reward 'ampo_test_boom:score' raised ZeroDivisionError: division by zero"
    status, _, err = cli(monkeypatch, capsys, "--debug", "stage", "score", "-c", write_config(tmp_path, cfg),
                         "-r", "boom", "--round", 0)
    assert status == 2 and "Traceback" in err and "1 / 0" in err  # the user's line, behind --debug
    assert err.rstrip().splitlines()[-1].startswith("error: python reward 'ampo_test_boom:score' raised")


def test_a_prompt_longer_than_the_context_is_skipped_and_counted_before_sampling(tmp_path, monkeypatch, capsys):
    """tiny-llama's context is 2048 tokens; a 1 MB prompt is ~1M of its tokens: skipped before any model loads."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt_id": "short", "prompt": "Say hello."}, {"prompt_id": "huge", "prompt": "x y " * 250_000}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = smoke_config(tmp_path, **{"prompts.source": "jsonl", "prompts.path": str(prompts), "prompts.per_round": 2,
                                    "reward.components": [{"kind": "python", "function": "os:getcwd"}]})
    status, out, err = cli(monkeypatch, capsys, "stage", "generate", "-c", write_config(tmp_path, cfg), "-r", "long",
                           "--round", 0)
    assert status == 0, err
    counts = json.loads(out[out.index("{") :])
    n = cfg.generation.n
    assert counts["prompts"] == 2 and counts["prompts_too_long"] == 1
    assert counts["responses"] == counts["generated_now"] == n  # the short prompt's pool only
    from ampo.stages.context import open_store

    assert set(open_store(cfg).read_rows("long", 0, ["prompt_id"])["prompt_id"].to_pylist()) == {"short"}


def test_a_store_uri_that_is_a_file_is_named(tmp_path, monkeypatch, capsys):
    file = tmp_path / "store.txt"
    file.write_text("not a store")
    config = write_config(tmp_path, smoke_config(tmp_path, **{"store.uri": str(file)}))
    status, _, err = cli(monkeypatch, capsys, "status", "-c", config)
    assert status == 2
    assert one_line(err) == f"store.uri {str(file)!r} is a file; it must be a folder (created when missing)"
    status, _, err = cli(monkeypatch, capsys, "stage", "generate", "-c", config, "-r", "f", "--round", 0)
    assert status == 2 and str(file) in one_line(err)  # the run lock, kept with the store, meets the file first


# the message lance raised on a store on a read-only tmpfs (remount,ro), and on a full one (size=2M, filled)
LANCE_READ_ONLY = ('lance error: LanceError(IO): Read-only file system (os error 30) at path "{uri}/rounds.lance/data/'
                   '.tmpDI4gdf", /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/lance-io-13.0.0/src/'
                   'object_store.rs:1006:34')
LANCE_FULL = ("lance error: LanceError(IO): Generic LocalFileSystem error: Unable to copy data to file: No space left "
              "on device (os error 28), /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/lance-table-13.0.0/"
              "src/io/commit.rs:1663:50")


@pytest.mark.parametrize("message", [LANCE_READ_ONLY, LANCE_FULL], ids=["read-only", "full"])
def test_a_store_on_a_read_only_or_full_disk_is_one_line_naming_the_store(tmp_path, monkeypatch, capsys, message):
    from ampo.store import Store

    cfg = smoke_config(tmp_path)
    uri = cfg.store.uri

    def fail(*args, **kwargs):
        raise RuntimeError(message.format(uri=uri))

    monkeypatch.setattr(Store, "stage_started", fail)
    status, _, err = cli(monkeypatch, capsys, "stage", "generate", "-c", write_config(tmp_path, cfg), "-r", "d",
                         "--round", 0)
    assert status == 2
    line = one_line(err)
    assert line.startswith(f"store {uri}: cannot write: ") and ".rs:" not in line
    assert ("Read-only file system (os error 30)" if message is LANCE_READ_ONLY else "No space left on device") in line


def test_an_os_error_on_a_file_names_the_file(tmp_path, monkeypatch, capsys):
    import errno

    import ampo.audit

    out = tmp_path / "groups.jsonl"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out) + ".tmp")

    (tmp_path / "store").mkdir()
    monkeypatch.setattr(ampo.audit, "export_groups", full)
    status, _, err = cli(monkeypatch, capsys, "audit", "export", "-c", write_config(tmp_path, smoke_config(tmp_path)),
                         "-r", "x", "--round", 0, "--out", out)
    assert status == 2 and one_line(err) == f"{out}.tmp: No space left on device"


@pytest.fixture
def truncated_policy(tmp_path) -> Path:
    folder = tmp_path / "policy"
    shutil.copytree(resolve_policy("tiny-llama"), folder)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    return folder


def test_truncated_safetensors_are_named(tmp_path, monkeypatch, capsys, truncated_policy):
    cfg = smoke_config(tmp_path, **{"policy": str(truncated_policy), "prompts.per_round": 1})
    status, _, err = cli(monkeypatch, capsys, "stage", "generate", "-c", write_config(tmp_path, cfg), "-r", "t",
                         "--round", 0)
    weights = truncated_policy / "model.safetensors"
    assert status == 2
    assert one_line(err) == (f"{weights}: truncated or corrupt safetensors file ({weights.stat().st_size} bytes "
                             f"where its header describes {2 * weights.stat().st_size})")


def test_ampo_round_failure_is_one_line_without_prefects_traceback(tmp_path, truncated_policy):
    """A failed flow run: Prefect's log lines stay, its tracebacks do not; the last line is the error."""
    cfg = smoke_config(tmp_path, **{"policy": str(truncated_policy), "prompts.per_round": 1})
    cmd = [sys.executable, "-m", "flows.cli", "round", "-c", str(write_config(tmp_path, cfg)), "-r", "t"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.rstrip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    size = (truncated_policy / "model.safetensors").stat().st_size
    assert len(errors) == 1 and lines[errors[0]].endswith(
        f"truncated or corrupt safetensors file ({size} bytes where its header describes {2 * size})")
    assert all("temporary server" in line for line in lines[errors[0] + 1 :])  # Prefect's exit log only


def test_status_of_a_missing_store_says_so_and_creates_nothing(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nowhere"
    config = write_config(tmp_path, smoke_config(tmp_path, **{"store.uri": str(missing)}))
    status, out, err = cli(monkeypatch, capsys, "status", "-c", config)
    assert status == 2 and out == ""
    assert one_line(err) == f"no store at {missing}: nothing has been recorded there (check store.uri)"
    assert not missing.exists()
    for args in (["audit", "groups", "-r", "x", "--round", 0], ["audit", "pool", "-r", "x", "--round", 0,
                                                                 "--prompt", "p"]):
        status, _, err = cli(monkeypatch, capsys, *args[:2], "-c", config, *args[2:])
        assert status == 2 and one_line(err).startswith(f"no store at {missing}:")
    assert not missing.exists()
    missing.mkdir()
    status, out, err = cli(monkeypatch, capsys, "status", "-c", config)
    assert status == 0 and out.splitlines()[:2] == [f"store: {missing}", "no rounds recorded yet"]
