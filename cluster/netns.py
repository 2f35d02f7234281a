"""Linux network namespaces, the primitives ``specmesh emulate`` is built on: run ``ip``/``tc``, list
namespaces, find and end the processes inside one by pid, check what the machine offers.

Needs root and iproute2 (``ip``, ``tc``). Nothing here touches the root namespace: every command names
the namespace it acts in (``ip -n NS``, ``tc -n NS``). The plan of an emulated cluster is
:mod:`specmesh.cluster.emulate_plan`; the orchestration that runs it is :mod:`specmesh.cluster.emulate`.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Iterable, Mapping, Sequence

CMD_TIMEOUT_S = 10.0  # bound on every ip / tc call
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
KILL_ROUNDS = 5  # processes may fork while dying: end what remains this many times at most
POLL_S = 0.05
TOOLS = ("ip", "tc")  # iproute2


class NetnsError(RuntimeError):
    """A namespace operation failed; the message names the command and what it printed."""


def run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess:
    """Run one ``ip``/``tc`` command (bounded in time); NetnsError naming it when ``check`` and it fails."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"`{' '.join(argv)}` failed: {exc}") from None
    if check and result.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` exited with {result.returncode}: {result.stderr.strip()}")
    return result


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``ip ARGS``."""
    return run(["ip", *args], check=check)


def netns_list() -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    out = ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def missing_requirement() -> str | None:
    """What this machine lacks for network namespaces (root, iproute2), or None when nothing."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, e.g. with sudo)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"`{tool}` not found: install iproute2 (apt-get install iproute2)"
    return None


def unavailable_reason(probe: str) -> str | None:
    """Why namespaces cannot be used here (not root, no iproute2, no permission), or None.

    Args:
        probe: name of a throwaway namespace to create and delete (use the caller's prefix).
    """
    missing = missing_requirement()
    if missing:
        return missing
    try:
        ip("netns", "add", probe)
    except NetnsError as exc:
        return f"cannot create a network namespace: {exc}"
    ip("netns", "del", probe, check=False)
    return None


def has_qdisc(netns: str, kind: str, *args: str) -> bool:
    """Whether the kernel offers qdisc ``kind`` (e.g. ``netem``): tried on ``lo`` of ``netns``, removed."""
    ok = run(["tc", "-n", netns, "qdisc", "add", "dev", "lo", "root", kind, *args], check=False).returncode == 0
    if ok:
        run(["tc", "-n", netns, "qdisc", "del", "dev", "lo", "root"], check=False)
    return ok


def pids(netns: str) -> list[int]:
    """Processes inside ``netns`` (``ip netns pids``); empty when it does not exist."""
    return [int(p) for p in ip("netns", "pids", netns, check=False).stdout.split()]


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not: it is dead, only not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _signal(targets: Iterable[int], sig: int) -> None:
    for pid in targets:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def end_processes(namespaces: Sequence[str], grace_s: float = KILL_GRACE_S) -> list[int]:
    """End every process inside ``namespaces`` by pid: SIGTERM, then SIGKILL after ``grace_s``.

    All namespaces at once, so that a cluster stops in one grace period. Repeats while processes remain
    (one may fork while dying), at most ``KILL_ROUNDS`` times. Returns every pid it signalled.
    """
    signalled: list[int] = []
    for _ in range(KILL_ROUNDS):
        found = [pid for ns in namespaces for pid in pids(ns)]
        if not found:
            break
        signalled += [p for p in found if p not in signalled]
        _signal(found, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(alive(p) for p in found):
            time.sleep(POLL_S)
        _signal([p for p in found if alive(p)], signal.SIGKILL)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(alive(p) for p in found):
            time.sleep(POLL_S)
    return signalled


def delete(netns: str) -> bool:
    """Delete ``netns`` (its interfaces, addresses, routes and qdiscs go with it); False if it was gone."""
    return ip("netns", "del", netns, check=False).returncode == 0


def exec_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed to run inside ``netns``."""
    return ["ip", "netns", "exec", netns, *argv]


def venv_env(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this environment) with the running interpreter's folder first on PATH, plus ``extra``.

    Start ``ray start`` with it: a job's driver inherits the environment of the node's ``ray start``.
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.update(extra or {})
    return env
