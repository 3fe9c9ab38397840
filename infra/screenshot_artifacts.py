"""Screenshots of a smoke round's artifacts in the Prefect UI, taken by a real headless browser.

    .venv/bin/python infra/screenshot_artifacts.py [--out DIR]      # default DIR: ./screens

Starts a Prefect server with its UI on loopback (temporary PREFECT_HOME, a free port), runs one smoke round
(the self-play-round flow with plots=True, infra/configs/smoke.yaml, temporary store) against it, then has
Debian's chromium (`apt-get install chromium`) load the UI pages and save PNGs under DIR: the flow run's page (its graph, with the
artifacts marked, and its logs) and each artifact's own page (summary, selection statistics, selected groups,
evaluation metrics, plots). The server is stopped on exit. About 2-4 minutes on 2 busy cores.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from loopback_prefect import loopback_server


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("no chromium on PATH: apt-get update && apt-get install -y chromium")


def screenshot(browser: str, url: str, out: Path, height: int = 1800, budget_ms: int = 20000) -> Path:
    """One page, after `budget_ms` of the page's virtual time (the UI fetches its data after load)."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size=1800,{height}",
                        f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=180)  # fmt: skip
    print(f"[screens] {out} <- {url}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("screens"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    browser = chromium()
    with loopback_server(ui=True) as server, tempfile.TemporaryDirectory() as work:
        t0 = time.monotonic()
        print(f"[screens] server up on {server.api_url}")
        round_ = (f"from ampo.config import load_config; from flows.self_play import self_play_round; "
                  f"cfg = load_config('infra/configs/smoke.yaml', {{'store.uri': '{work}/store', "
                  f"'runtime.workdir': '{work}/work'}}); self_play_round(cfg, 'screens', 0, plots=True)")
        done = subprocess.run([sys.executable, "-c", round_], cwd=REPO, env=server.env, capture_output=True,
                              text=True, timeout=900, check=False)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"the smoke round failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        print(f"[screens] smoke round done in {time.monotonic() - t0:.0f} s")
        (run,) = [r for r in server.flow_runs() if r["name"] and r["state_type"] == "COMPLETED"
                  and r.get("parent_task_run_id") is None][:1]  # fmt: skip
        ui = server.api_url.removesuffix("/api")
        screenshot(browser, f"{ui}/runs/flow-run/{run['id']}", args.out / "flow-run-logs.png")  # opens on Logs
        artifacts = server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
        for artifact in artifacts:
            name = (artifact.get("key") or artifact["id"]).removeprefix("screens-r0-")
            screenshot(browser, f"{ui}/artifacts/artifact/{artifact['id']}", args.out / f"artifact-{name}.png",
                       height=2600 if name == "plots" else 1800)


if __name__ == "__main__":
    main()
