"""Operations on a running emulation (see :mod:`specmesh.cluster.emulate`): run a command on a host,
partition and heal links, kill a host's processes, report the state of every host.

A partition of one host takes its veth end in the bridge namespace down (it reaches nobody, nobody
reaches it); a partition between two hosts adds a blackhole route to the other's address in each of
their namespaces (the rest of their links stay up). :func:`heal` undoes both kinds.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from . import netns
from .emulate import EmulateError, node_env


def _host(state: Mapping, name: str) -> dict:
    for host in state["hosts"]:
        if host["name"] == name:
            return host
    raise EmulateError(f"node = {name!r}: no such host; hosts: {', '.join(h['name'] for h in state['hosts'])}")


def exec_command(state: Mapping, node: str, argv: Sequence[str],
                 base_env: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``argv`` on host ``node`` (inside its namespace,
    on its cores, with the venv first on PATH, Ray's auth settings, ``RAY_ADDRESS`` and
    ``RAY_API_SERVER_ADDRESS`` set)."""
    if not argv:
        raise EmulateError("exec: give a command after `--`, e.g. `exec client -- ray job list`")
    host = _host(state, node)
    cmd = list(argv)
    if host["cores"]:
        cmd = ["taskset", "-c", ",".join(map(str, host["cores"])), *cmd]
    return netns.exec_argv(host["netns"], cmd), node_env(state, base=base_env)


def run_exec(state: Mapping, node: str, argv: Sequence[str]) -> None:
    """Replace this process by ``argv`` running on host ``node`` (its exit status becomes ours)."""
    command, env = exec_command(state, node, argv)
    os.execvpe(command[0], command, env)


def partition(state: Mapping, node: str, other: str | None = None) -> str:
    """Cut ``node`` off the network, or only the link between ``node`` and ``other``; what was done."""
    a = _host(state, node)
    if other is None:
        netns.ip("-n", state["bridge_netns"], "link", "set", a["veth"][0], "down")
        return f"{node} is cut off (its veth {a['veth'][0]} in {state['bridge_netns']} is down)"
    b = _host(state, other)
    if a is b:
        raise EmulateError(f"partition {node} {other}: name two different hosts")
    netns.ip("-n", a["netns"], "route", "replace", "blackhole", f"{b['address']}/32")
    netns.ip("-n", b["netns"], "route", "replace", "blackhole", f"{a['address']}/32")
    return f"{node} and {other} no longer reach each other (blackhole routes both ways)"


def _blackholes(netns_name: str) -> list[str]:
    out = netns.ip("-n", netns_name, "route", "show", "type", "blackhole", check=False).stdout
    return [line.split()[1] for line in out.splitlines() if line.startswith("blackhole ")]


def heal(state: Mapping) -> list[str]:
    """Undo every partition: every host's veth up, every blackhole route removed; what was changed."""
    changed = []
    for host in state["hosts"]:
        if _port_up(state, host) is False:
            netns.ip("-n", state["bridge_netns"], "link", "set", host["veth"][0], "up")
            changed.append(f"{host['name']}: veth up")
        for dest in _blackholes(host["netns"]):
            netns.ip("-n", host["netns"], "route", "del", "blackhole", dest)
            changed.append(f"{host['name']}: route to {dest} restored")
    return changed


def kill(state: Mapping, node: str) -> list[int]:
    """End every process on host ``node`` by pid (SIGTERM, then SIGKILL); the pids ended."""
    return netns.end_processes([_host(state, node)["netns"]])


def _port_up(state: Mapping, host: Mapping) -> bool | None:
    """Whether the host's veth end in the bridge namespace is administratively up (None: it is gone)."""
    result = netns.ip("-j", "-n", state["bridge_netns"], "link", "show", host["veth"][0], check=False)
    if result.returncode != 0:
        return None
    return "UP" in json.loads(result.stdout)[0].get("flags", [])


def status(state: Mapping) -> list[dict]:
    """One row per host: namespace present, veth up, blackholed peers, processes, Ray role, address."""
    present = set(netns.netns_list())
    rows = []
    for host in state["hosts"]:
        exists = host["netns"] in present
        rows.append({
            "name": host["name"], "address": host["address"], "ray": host["ray"], "netns": host["netns"],
            "exists": exists, "link_up": _port_up(state, host) if exists else None,
            "blackholed": _blackholes(host["netns"]) if exists else [],
            "processes": len(netns.pids(host["netns"])) if exists else 0})
    return rows
