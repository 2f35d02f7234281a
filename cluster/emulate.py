"""``specmesh emulate``: a topology's machines as real hosts on one machine (network namespaces + Ray).

:func:`up` builds what :func:`specmesh.cluster.emulate_plan.make_plan` plans (namespaces, veth pairs to a
bridge, addresses, ``tc`` shaping), starts the Ray head and workers inside their namespaces with the
project's environment first on PATH and one token for Ray's authentication, waits until every node is
alive and writes a state file. :func:`down` ends every process inside the namespaces of a prefix by pid
and deletes them, with or without a state file. The per-host operations (exec, partition, heal, kill,
status) are in :mod:`specmesh.cluster.emulate_ops`. Needs root and iproute2.

Everything lives in namespaces named ``<prefix>...``; the root namespace's interfaces, routes and
addresses are never touched, and the hosts have no route out of the test subnet.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping

from . import netns
from .emulate_plan import (GCS_PORT, PREFIX, RAY_HEAD, RAY_NONE, SUBNET, EmulatePlan, check_prefix, job_topology,
                           make_plan, owned)
from .topology import load_topology

STATE_FILE = "state.json"
JOB_TOPOLOGY_FILE = "topology.toml"  # the topology as emulated, for jobs
TOKEN_FILE = "auth_token"
UP_TIMEOUT_S = 180.0  # head, workers and job server all alive within this
WAIT_SLACK_S = 30.0  # the wait helper's own start and Ray import, beyond its deadline
AUTH_TOKEN, AUTH_DISABLED = "token", "disabled"
LOG_TAIL = 3000  # characters of a failed node's log quoted in the error


class EmulateError(RuntimeError):
    """`specmesh emulate` cannot do what was asked; the message says why and what to do."""


def state_dir(prefix: str = PREFIX) -> Path:
    """Folder of the state file, the auth token, logs and Ray temp dirs of emulation ``prefix``."""
    return Path(tempfile.gettempdir()) / f"{check_prefix(prefix)}emulate"


def load_state(prefix: str = PREFIX) -> dict:
    """The state file of the emulation with ``prefix``; EmulateError when none is up."""
    path = state_dir(prefix) / STATE_FILE
    if not path.is_file():
        raise EmulateError(f"no emulation with prefix {prefix!r} is up (no {path}); "
                           "start one with `specmesh emulate up --topology FILE`")
    return json.loads(path.read_text())


def require_root() -> None:
    """EmulateError naming what is missing (root, iproute2) when namespaces cannot be made here."""
    missing = netns.missing_requirement()
    if missing:
        raise EmulateError(missing)


def node_env(state: Mapping, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every process on the emulated hosts: the venv first on PATH, Ray's auth
    settings of this emulation, ``RAY_ADDRESS`` (drivers) and ``RAY_API_SERVER_ADDRESS`` (``ray job``)."""
    env = netns.venv_env(base=base)
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    env["RAY_AUTH_MODE"] = state["auth"]["mode"]
    if state["auth"]["token_path"]:
        env["RAY_AUTH_TOKEN_PATH"] = state["auth"]["token_path"]
    env.update(RAY_ADDRESS=state["gcs"], RAY_API_SERVER_ADDRESS=state["dashboard"],
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def _check_cores(plan: EmulatePlan) -> None:
    usable = os.sched_getaffinity(0)
    for host in plan.hosts:
        if host.cores is not None and not set(host.cores) <= usable:
            raise EmulateError(f"nodes.{host.name}.cores = {list(host.cores)}: this machine offers cores "
                               f"{sorted(usable)}")


def _latency_note(netem: bool) -> str:
    if netem:
        return "kernel: netem adds each link's latency and tc its bandwidth; the job topology says emulate = 'off'"
    return ("application: this kernel has no netem, so tc shapes the bandwidth only and the link model adds "
            "the latency; the job topology says emulate = 'latency'")


def _wait(argv: list[str], env: dict, procs: dict[str, subprocess.Popen], logs: dict[str, Path],
          timeout_s: float) -> str:
    """Run a wait helper to its end while watching the Ray processes; its stdout, or EmulateError."""
    waiter = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s + WAIT_SLACK_S
    while waiter.poll() is None:
        for name, proc in procs.items():
            if proc.poll() is not None:
                waiter.kill()
                waiter.communicate()
                raise EmulateError(f"Ray on {name} exited with {proc.returncode}; its log "
                                   f"{logs[name]}:\n{logs[name].read_text()[-LOG_TAIL:]}")
        if time.monotonic() > deadline:
            waiter.kill()
        time.sleep(netns.POLL_S * 4)
    out, err = waiter.communicate()
    if waiter.returncode != 0:
        tails = "\n".join(f"--- {n}: {logs[n].read_text()[-LOG_TAIL // 3:]}" for n in procs)
        raise EmulateError(f"the cluster did not come up: {err.strip() or waiter.returncode}\n{tails}")
    return out


def up(topology_path: str | os.PathLike, *, prefix: str = PREFIX, subnet: str = SUBNET, head: str | None = None,
       num_cpus: int | None = None, ray: bool = True, timeout_s: float = UP_TIMEOUT_S,
       env: Mapping[str, str] | None = None) -> dict:
    """Build the emulated cluster of a topology file and start Ray on it; returns the state (also
    written to ``state_dir(prefix)/state.json``). On any failure, everything built is torn down.

    Args:
        topology_path: the topology file.
        prefix: common prefix of every namespace; one emulation per prefix.
        subnet: private IPv4 test subnet of the hosts.
        head: node that runs the Ray head. [default: the driver node, else the device]
        num_cpus: Ray CPUs per node. [default: the node's core count, else 1]
        ray: False builds the network only (no Ray).
        timeout_s: bound on the Ray nodes and the job server coming alive.
        env: environment the nodes inherit (the venv's bin goes first on PATH). [default: this one]
    """
    require_root()
    check_prefix(prefix)
    if not timeout_s > 0:
        raise ValueError(f"timeout_s = {timeout_s!r}: must be > 0 seconds")
    existing = [n for n in netns.netns_list() if owned(n, prefix)]
    if existing:
        raise EmulateError(f"an emulation with prefix {prefix!r} is up ({', '.join(existing)}); run "
                           "`specmesh emulate down` first, or pick another --prefix")
    start = time.monotonic()
    topology = load_topology(topology_path)
    netns.ip("netns", "add", f"{prefix}br")  # to probe the kernel for netem; rebuilt by the plan
    try:
        netem = netns.has_qdisc(f"{prefix}br", "netem", "delay", "1ms")
    finally:
        netns.delete(f"{prefix}br")
    plan = make_plan(topology, subnet=subnet, prefix=prefix, netem=netem, head=head, num_cpus=num_cpus)
    _check_cores(plan)
    folder = state_dir(prefix)
    shutil.rmtree(folder, ignore_errors=True)  # left by a crash: its namespaces are gone (checked above)
    folder.mkdir(parents=True, mode=0o700)
    try:
        for argv in plan.network_commands():
            netns.run(argv)
        (folder / JOB_TOPOLOGY_FILE).write_text(job_topology(topology, plan))
        state = _state(plan, Path(topology_path), folder, env)
        if ray:
            _start_ray(plan, state, env, timeout_s)
        state["up_s"] = round(time.monotonic() - start, 2)
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
    except BaseException:
        down(prefix)
        raise
    return state


def _state(plan: EmulatePlan, path: Path, folder: Path, env: Mapping | None) -> dict:
    base = os.environ if env is None else env
    mode = AUTH_DISABLED if base.get("RAY_AUTH_MODE") == AUTH_DISABLED else AUTH_TOKEN
    token_path = ""
    if mode == AUTH_TOKEN:
        token = folder / TOKEN_FILE
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        token_path = str(token)
    return {
        "prefix": plan.prefix, "subnet": plan.subnet, "topology": str(path.resolve()),
        "job_topology": str(folder / JOB_TOPOLOGY_FILE),
        "bridge_netns": plan.bridge_netns, "head": plan.head, "client": plan.client,
        "gcs": plan.gcs_address, "dashboard": plan.dashboard_url, "netem": plan.netem,
        "latency": _latency_note(plan.netem), "auth": {"mode": mode, "token_path": token_path},
        "ray": False, "hosts": [{
            "name": h.name, "netns": h.netns, "address": h.address, "veth": [h.port, "eth0"], "ray": h.ray,
            "cores": None if h.cores is None else list(h.cores), "num_cpus": h.num_cpus,
            "resources": h.resources, "egress": [vars(s) for s in h.egress], "pid": None,
            "log": str(folder / "logs" / f"{h.name}.log")} for h in plan.hosts],
    }


def _start_ray(plan: EmulatePlan, state: dict, env: Mapping | None, timeout_s: float) -> None:
    """Start the head, then (once it listens) every worker; wait until all are alive."""
    folder = state_dir(plan.prefix)
    (folder / "logs").mkdir()
    child_env = node_env(state, base=env)
    ray_bin = str(Path(sys.executable).parent / "ray")
    procs: dict[str, subprocess.Popen] = {}
    logs = {h["name"]: Path(h["log"]) for h in state["hosts"]}
    by_name = {h["name"]: h for h in state["hosts"]}
    order = sorted((h for h in plan.hosts if h.ray != RAY_NONE), key=lambda h: h.ray != RAY_HEAD)
    for i, host in enumerate(order):
        argv = netns.exec_argv(host.netns, plan.ray_command(host.name, ray_bin, str(folder / f"r{i}")))
        with open(logs[host.name], "wb") as log:
            procs[host.name] = subprocess.Popen(argv, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
        by_name[host.name]["pid"] = procs[host.name].pid
        if host.ray == RAY_HEAD:  # workers give up on a head that is not listening yet
            _wait(netns.exec_argv(plan.host(plan.client).netns, [sys.executable, "-m", _WAIT, "port",
                  plan.head_address, str(GCS_PORT), str(timeout_s)]), child_env, procs, logs, timeout_s)
    addresses = ",".join(h.address for h in order)
    out = _wait(netns.exec_argv(plan.host(plan.head).netns, [sys.executable, "-m", _WAIT, "nodes",
                plan.gcs_address, plan.dashboard_url, addresses, str(timeout_s)]),
                child_env, procs, logs, timeout_s)
    nodes = {n["address"]: n for n in json.loads(out.strip().splitlines()[-1])["nodes"]}
    for h in state["hosts"]:
        if h["address"] in nodes:
            h["node_id"] = nodes[h["address"]]["node_id"]
    state["ray"] = True


_WAIT = "specmesh.cluster.emulate_wait"


def down(prefix: str = PREFIX) -> dict:
    """End every process in the namespaces of ``prefix`` by pid, delete them and the state folder.

    Works from the names alone (no state file needed), so it cleans up after a crash; safe to run
    twice. Returns ``{"namespaces": [...deleted], "pids": [...ended], "down_s": seconds}``.
    """
    require_root()
    check_prefix(prefix)
    start = time.monotonic()
    names = sorted((n for n in netns.netns_list() if owned(n, prefix)), key=lambda n: n == f"{prefix}br")
    ended = netns.end_processes(names)
    for name in names:
        netns.delete(name)
    left = [n for n in netns.netns_list() if owned(n, prefix)]
    if left:
        raise EmulateError(f"namespaces {', '.join(left)} could not be deleted (`ip netns pids` shows "
                           "what still runs there); run `specmesh emulate down` again")
    shutil.rmtree(state_dir(prefix), ignore_errors=True)
    return {"namespaces": names, "pids": ended, "down_s": round(time.monotonic() - start, 2)}
