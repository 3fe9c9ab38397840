"""A real Prefect server on loopback for tests and infra scripts: its own PREFECT_HOME, a free port, bounded start,
stopped with its whole process group on exit. Plus a few reads of its REST API (no Prefect client settings needed
in the calling process)."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PREFECT = REPO / ".venv" / "bin" / "prefect"


@dataclass
class LoopbackServer:
    api_url: str
    home: Path
    env: dict[str, str]  # what a child process needs to talk to this server

    def post(self, path: str, body: dict | None = None) -> list | dict:
        response = httpx.post(f"{self.api_url}{path}", json=body or {}, timeout=30)
        response.raise_for_status()
        return response.json()

    def get(self, path: str) -> list | dict:
        response = httpx.get(f"{self.api_url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def flow_runs(self, deployment_id: str | None = None) -> list[dict]:
        body = {"deployments": {"id": {"any_": [deployment_id]}}} if deployment_id else {}
        return self.post("/flow_runs/filter", body)

    def deployment(self, flow_name: str, name: str) -> dict:
        return self.get(f"/deployments/name/{flow_name}/{name}")

    def wait_for(self, what: str, check, timeout_s: float, poll_s: float = 2.0, log: Path | None = None):
        """Poll `check()` until it returns something truthy; fail with `what` and the tail of `log` after timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = check()
            if found:
                return found
            time.sleep(poll_s)
        tail = log.read_text()[-3000:] if log and log.exists() else ""
        server_log = (self.home / "server.log").read_text().splitlines()
        errors = "\n".join([line for line in server_log if "Error" in line][-5:])  # e.g. the scheduler's
        raise TimeoutError(f"{what}: not within {timeout_s:.0f} s\n{tail}\nserver errors:\n{errors}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_env(home: Path, api_url: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_EXTRA_LOGGERS": "ampo", "LANCE_LOG": "error",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@contextmanager
def loopback_server(start_timeout_s: float = 240, ui: bool = False) -> Iterator[LoopbackServer]:
    """`prefect server start --host 127.0.0.1 --port <free>` with a temporary PREFECT_HOME, up within
    `start_timeout_s`; the server and its children are stopped and the home deleted on exit."""
    home = Path(tempfile.mkdtemp(prefix="ampo-prefect-"))
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = prefect_env(home, api_url)
    if not ui:
        env["PREFECT_UI_ENABLED"] = "false"
    log = home / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if httpx.get(f"{api_url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not come up on {api_url}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield LoopbackServer(api_url=api_url, home=home, env=env)
    finally:
        stop_group(server)
        shutil.rmtree(home, ignore_errors=True)


def stop_group(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM to the process group started with start_new_session=True, SIGKILL after `grace_s`."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
