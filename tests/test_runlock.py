"""The run lock refuses a second holder, names the first, and is released on exit or kill."""

import subprocess
import sys
import time

import pytest

from ampo.runlock import RunLockedError, run_lock


def test_second_holder_is_refused_with_the_holder_named(tmp_path):
    with run_lock(tmp_path, "run-a") as holder:
        with pytest.raises(RunLockedError, match=f"run 'run-a' is in progress elsewhere .*pid {holder['pid']}"):
            with run_lock(tmp_path, "run-a", wait_s=0.2, poll_s=0.05):
                pass
        with run_lock(tmp_path, "run-b"):  # other runs are independent
            pass
    with run_lock(tmp_path, "run-a"):  # released after the block
        pass


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    code = f"from ampo.runlock import run_lock\nwith run_lock({str(tmp_path)!r}, 'r'):\n    print('held', flush=True)\n    import time; time.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError):
            with run_lock(tmp_path, "r"):
                pass
        proc.kill()
        proc.wait(timeout=10)
        start = time.monotonic()
        with run_lock(tmp_path, "r", wait_s=5, poll_s=0.05):
            assert time.monotonic() - start < 5
    finally:
        proc.kill()


def test_bad_run_id_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="run id '../x' must match"):
        with run_lock(tmp_path, "../x"):
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
