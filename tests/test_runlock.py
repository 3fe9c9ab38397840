"""The run lock refuses a second holder, names the first, and is released on exit or kill."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_runner import cli

from ampo.runlock import RunLockedError, lock_path, run_lock

REPO = Path(__file__).resolve().parents[1]


def in_thread(fn):
    """fn() in another thread (the lock is re-entrant only within the thread that holds it); its error raised."""
    errors = []

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def take(store, run, **kwargs):
    def fn():
        with run_lock(store, run, **kwargs):
            pass

    return fn


def test_second_holder_is_refused_with_the_holder_named(tmp_path):
    with run_lock(tmp_path, "run-a") as holder:
        with pytest.raises(RunLockedError, match=f"run 'run-a' is in progress elsewhere .*pid {holder['pid']}"):
            in_thread(take(tmp_path, "run-a", wait_s=0.2, poll_s=0.05))
        in_thread(take(tmp_path, "run-b"))  # other runs are independent
    in_thread(take(tmp_path, "run-a"))  # released after the block


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    code = f"from ampo.runlock import run_lock\nwith run_lock({str(tmp_path)!r}, 'r'):\n    print('held', flush=True)\n    import time; time.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError), run_lock(tmp_path, "r"):
            pass
        proc.kill()
        proc.wait(timeout=10)
        start = time.monotonic()
        with run_lock(tmp_path, "r", wait_s=5, poll_s=0.05):
            assert time.monotonic() - start < 5
    finally:
        proc.kill()


def test_bad_run_id_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="run id '../x' must match"), run_lock(tmp_path, "../x"):
        pass


def test_a_stage_child_keeps_the_run_locked_after_its_parent_lets_go(tmp_path):
    from ampo.runlock import INHERITED_ENV, held_lock_fd, stage_lock

    with run_lock(tmp_path, "r"):
        fd = held_lock_fd("r")
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=(fd,))
    assert held_lock_fd("r") is None
    try:  # the parent is out (as if killed), but the child still writes: a new flow must not start
        with pytest.raises(RunLockedError, match="in progress elsewhere"), run_lock(tmp_path, "r"):
            pass
    finally:
        child.kill()
        child.wait()
    with run_lock(tmp_path, "r"):
        pass
    # `ampo stage` launched by a flow inherits the lock instead of waiting for it
    with run_lock(tmp_path, "r"), pytest.MonkeyPatch.context() as mp:
        mp.setenv(INHERITED_ENV, "r")
        with stage_lock(tmp_path, "r") as holder:
            assert holder is None


def smoke(tmp_path, workdir: str, store: str = "store"):
    from ampo.config import load_config

    return load_config(REPO / "infra" / "configs" / "smoke.yaml",
                       {"store.uri": str(tmp_path / store), "runtime.workdir": str(tmp_path / workdir)})


def hold_in_child(store, run):
    """A process holding `run`'s lock on `store` until killed."""
    code = f"from ampo.runlock import run_lock\nwith run_lock({str(store)!r}, {run!r}):\n    print('held', flush=True)\n" \
           "    import time; time.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_lock_belongs_to_the_store_and_run_not_the_workdir(tmp_path):
    a, b = smoke(tmp_path, "work-a"), smoke(tmp_path, "work-b")  # one store, two workdirs
    assert lock_path(a.store.uri, "r") == lock_path(b.store.uri, "r") == tmp_path / "store" / "_locks" / "r.lock"
    with run_lock(a.store.uri, "r"):
        with pytest.raises(RunLockedError, match="run 'r' is in progress elsewhere"):
            in_thread(take(b.store.uri, "r"))  # the second flow of this run, from another workdir
        in_thread(take(b.store.uri, "other"))  # another run id on the same store is independent
        in_thread(take(smoke(tmp_path, "work-b", store="store2").store.uri, "r"))  # the same id on another store
    # a relative uri and file:// name the same lock as the absolute folder
    assert lock_path(f"file://{tmp_path / 'store'}", "r") == lock_path(tmp_path / "store", "r")


def test_an_object_store_uri_falls_back_to_a_lock_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("AMPO_CACHE", str(tmp_path / "cache"))
    s3, gs = lock_path("s3://bucket/store", "r"), lock_path("gs://bucket/store", "r")
    assert s3.parent.parent == tmp_path / "cache" / "locks" and s3.name == "r.lock"
    assert s3 != gs and lock_path("s3://bucket/store", "r") == s3  # keyed by the uri, the same every time
    assert not (tmp_path / "s3:").exists()


def test_the_lock_is_taken_once_when_the_cli_holds_it_around_the_flow(tmp_path, monkeypatch):
    from ampo import runlock

    taken = []
    real = runlock._acquire
    monkeypatch.setattr(runlock, "_acquire", lambda *a: (taken.append(a[2]), real(*a)))
    with run_lock(tmp_path, "r") as outer, run_lock(tmp_path, "r") as inner:  # CLI precheck, then the flow
        assert inner is outer and taken == ["r"]
        fd = runlock.held_lock_fd("r")
    assert runlock.held_lock_fd("r") is None and taken == ["r"]
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the flock went with it
    in_thread(take(tmp_path, "r"))


def test_round_refuses_while_another_workdir_holds_the_run(tmp_path, monkeypatch, capsys):
    config = tmp_path / "cfg.json"
    config.write_text(smoke(tmp_path, "work-b").model_dump_json())
    holder = hold_in_child(tmp_path / "store", "r")  # e.g. a flow started with workdir work-a
    try:
        status, _, err = cli(monkeypatch, capsys, "round", "-c", config, "-r", "r")
    finally:
        holder.kill()
        holder.wait()
    assert status == 2
    assert err.startswith(f"error: run 'r' is in progress elsewhere (holder: pid {holder.pid} on ")


def test_rollback_and_promote_take_the_run_lock(tmp_path, monkeypatch, capsys):
    from ampo.checkpoints import write_manifest
    from ampo.store import Store

    cfg = smoke(tmp_path, "work")
    config = tmp_path / "cfg.json"
    config.write_text(cfg.model_dump_json())
    store = Store(cfg.store.uri, cfg.embedding.dim)
    folder = tmp_path / "ckpt-r0"
    folder.mkdir()
    write_manifest(folder, {"id": "r-r0"})
    store.upsert_checkpoint({"id": "r-init", "run": "r", "round": -1, "path": "tiny-llama", "status": "candidate"})
    store.upsert_checkpoint({"id": "r-r0", "run": "r", "round": 0, "path": str(folder), "status": "candidate"})
    store.set_champion("r", "r-r0")
    holder = hold_in_child(cfg.store.uri, "r")  # a round of run r in progress
    try:
        status, _, err = cli(monkeypatch, capsys, "rollback", "-c", config, "-r", "r", "--to", "r-init")
        assert status == 2 and err.startswith("error: rollback refused, the champion is unchanged: run 'r' is in "
                                              f"progress elsewhere (holder: pid {holder.pid} on ")
        assert err.count("\n") == 1
        status, _, err = cli(monkeypatch, capsys, "promote", "-c", config, "-r", "r", "--checkpoint", "r-init",
                             "--wait", "0.3")
        assert status == 2 and "promote refused, the champion is unchanged" in err and "waited 0.3s" in err
        assert store.champion("r")["id"] == "r-r0"
        threading.Timer(1.0, holder.kill).start()  # the round ends while the rollback waits for it
        status, out, _ = cli(monkeypatch, capsys, "rollback", "-c", config, "-r", "r", "--to", "r-init", "--wait", 30)
    finally:
        holder.kill()
        holder.wait()
    assert status == 0 and out.strip() == "run r: rolled back to r-init"
    assert store.champion("r")["id"] == "r-init"
