"""``ray start --head`` by hand, ``ray job submit`` of ``python -m specmesh.cluster.submit``, ``ray job
status``/``logs``, then the head is stopped: the way a user runs SpecMesh on a cluster.

The head runs in a session of its own, in its own temp dir, on free ports, so that it neither meets
another Ray on this machine nor outlives the test: it is stopped by its own pid (``ray start --block``
takes its processes down on SIGTERM) and whatever of its session is left is killed by pid. ``ray stop``
is not used: it stops every Ray on the machine.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
RESOURCES = {"specmesh_device": 1, "specmesh_edge1": 1, "specmesh_edge2": 1}
HEAD_START_S = 120.0
JOB_S = 420
STOP_S = 30.0
LOG_COLUMNS = 250  # the job's console width: the summary table is logged whole, not cut to 80
# Not uploaded with the working dir (.gitignore'd paths are skipped too, .venv among them).
EXCLUDES = [".venv", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis"]
PORT_OPTIONS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
                "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
                "--node-manager-port", "--object-manager-port")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(sid: int) -> list[int]:
    """Processes of the session ``sid`` (the head's: every Ray process it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid and int(entry.name) != os.getpid():
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def _stop(head: subprocess.Popen) -> list[int]:
    """Stops the head and everything of its session; returns the pids that had to be killed."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=STOP_S)
    deadline = time.monotonic() + STOP_S
    while _alive(_session_pids(head.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _alive(_session_pids(head.pid))
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _wait_for_dashboard(head: subprocess.Popen, url: str, log: Path) -> str | None:
    """None once the dashboard answers HTTP (401 without a token counts); else why it did not."""
    deadline = time.monotonic() + HEAD_START_S
    while time.monotonic() < deadline:
        if head.poll() is not None:
            return f"`ray start --head` exited with {head.returncode}: {log.read_text()[-2000:]}"
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=5)
            return None
        except urllib.error.HTTPError:
            return None
        except OSError:
            time.sleep(1)
    return f"the dashboard did not answer on {url} within {HEAD_START_S:g} s: {log.read_text()[-2000:]}"


@pytest.fixture
def head(ray_auth_env, model_cache, tmp_path):
    """A Ray head started with ``ray start --head --block`` in a session of its own.

    Yields the job server's URL and the environment that the client commands must use: the venv's
    bin first on PATH (the job's ``python`` is the venv's: a job's driver inherits the environment of
    the ``ray start`` that started its node) and the session's ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``.
    """
    env = {**ray_auth_env, "PATH": f"{VENV_BIN}{os.pathsep}{ray_auth_env.get('PATH', '')}",
           "SPECMESH_CACHE": model_cache, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
           "COLUMNS": str(LOG_COLUMNS)}
    ports = dict(zip(PORT_OPTIONS, _free_ports(len(PORT_OPTIONS))))
    temp_dir = tempfile.mkdtemp(prefix="smray-")  # short: Ray's socket paths must fit in 107 bytes
    log = tmp_path / "head.log"
    command = [RAY, "start", "--head", "--block", f"--temp-dir={temp_dir}", "--dashboard-host=127.0.0.1",
               "--num-cpus=2", f"--resources={json.dumps(RESOURCES)}", "--disable-usage-stats",
               *(f"{opt}={port}" for opt, port in ports.items())]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{ports['--dashboard-port']}"
        why = _wait_for_dashboard(proc, url, log)
        if why is not None:
            pytest.fail(f"the Ray dashboard / job server did not start: {why}")
        yield url, env
    finally:
        left = _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not _alive(_session_pids(proc.pid)), "Ray processes outlived the test"
        assert not left, f"processes {left} had to be killed after the head stopped"


def _ray(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_runs_specmesh_on_a_head_started_by_hand(head):
    url, env = head
    job_id = f"specmesh-test-{uuid.uuid4().hex[:8]}"
    submit = _ray(["job", "submit", "--address", url, "--submission-id", job_id, "--working-dir", str(REPO),
                   "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
                   "python", "-m", "specmesh.cluster.submit", "--topology", "cluster/examples/tiny.toml",
                   "--prompt-ids", "1,2,3,4", "--max-new-tokens", "16", "--dtype", "float32"],
                  env, JOB_S)
    status = _ray(["job", "status", "--address", url, job_id], env, 60)
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, (
        f"status: {status.stdout}{status.stderr}\nsubmit: {submit.stdout[-4000:]}{submit.stderr[-4000:]}")
    assert submit.returncode == 0
    logs = _ray(["job", "logs", "--address", url, job_id], env, 60).stdout
    assert "backend=cluster" in logs and "workers ready" in logs, logs
    # The closing summary table, with the run's row.
    assert "SpecMesh vs target-only (cluster, 2 stages" in logs, logs
    lines = logs.splitlines()
    header = next(line for line in lines if line.startswith("┃ variant"))
    row = next(line for line in lines if line.startswith("│ specmesh "))
    table = dict(zip([c.strip() for c in header.split("┃")[1:-1]], [c.strip() for c in row.split("│")[1:-1]]))
    assert table["tokens"] == "16" and float(table["tok/s"]) > 0, table
