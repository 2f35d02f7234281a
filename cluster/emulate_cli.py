"""``specmesh emulate``: the command line of :mod:`specmesh.cluster.emulate` (a typer sub-app).

    specmesh emulate up --topology cluster/examples/tiny.toml
    specmesh emulate exec client -- ray job submit --address http://10.213.0.1:8265 -- \
        python -m specmesh.cluster.submit --topology cluster/examples/tiny.toml --prompt-ids 1,2,3
    specmesh emulate partition edge1          # or: partition device edge1 (that link only)
    specmesh emulate heal
    specmesh emulate kill edge2
    specmesh emulate status
    specmesh emulate down

Also runnable as ``python -m specmesh.cluster.emulate_cli``. Needs root and iproute2.
"""
from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import emulate, emulate_ops
from .emulate_plan import PREFIX, SUBNET

emulate_app = typer.Typer(no_args_is_help=True, add_completion=False,
                          help="Real hosts on one machine: a network namespace per topology node, Ray on each.")
PREFIX_OPTION = typer.Option(PREFIX, "--prefix", envvar="SPECMESH_EMULATE_PREFIX",
                             help="Common prefix of every namespace; one emulation per prefix.")


def _fail(exc: Exception) -> None:
    typer.echo(f"specmesh emulate: {exc}", err=True)
    raise typer.Exit(1)


def _state(prefix: str) -> dict:
    try:
        emulate.require_root()
        return emulate.load_state(prefix)
    except (emulate.EmulateError, ValueError) as exc:
        _fail(exc)
        raise  # unreachable: _fail exits


def _egress(rules: list[dict]) -> str:
    if not rules:
        return "unshaped"
    def one(r: dict) -> str:
        rate = "unshaped" if math.isinf(r["rate_mbps"]) else f"{r['rate_mbps']:g} Mbit/s"
        delay = f" +{r['delay_ms']:g} ms" if r["delay_ms"] else ""
        return f"{'all' if r['peer'] is None else 'to ' + r['peer']} {rate}{delay}"
    return "; ".join(one(r) for r in rules)


def summary(state: dict) -> str:
    """What ``up`` prints: the hosts, how latency is emulated, how to submit a job."""
    flag = "" if state["prefix"] == PREFIX else f" --prefix {state['prefix']}"
    lines = [f"emulated cluster {state['prefix']!r} up in {state['up_s']:g} s "
             f"(state: {emulate.state_dir(state['prefix']) / emulate.STATE_FILE})"]
    for h in state["hosts"]:
        ray = f"ray {h['ray']}" if h["ray"] != "none" else "no ray"
        cores = ",".join(map(str, h["cores"])) if h["cores"] else "any"
        lines.append(f"  {h['name']:<10} {h['address']:<15} {h['netns']:<20} {ray:<11} cores {cores:<5} "
                     f"{json.dumps(h['resources'])}  egress: {_egress(h['egress'])}")
    lines.append(f"latency: {state['latency']}")
    if state["ray"]:
        topo = shlex.quote(state["job_topology"])
        lines += ["submit a job from the client host:",
                  f"  specmesh emulate exec{flag} {state['client']} -- ray job submit --address "
                  f"{state['dashboard']} -- python -m specmesh.cluster.submit --topology {topo} "
                  "--prompt 'def fib(n):'",
                  f"a driver on the head host: specmesh emulate exec{flag} {state['head']} -- python script.py "
                  f"(RAY_ADDRESS={state['gcs']} is set)"]
    lines.append(f"tear down: specmesh emulate down{flag}")
    return "\n".join(lines)


@emulate_app.command()
def up(
    topology: Path = typer.Option(..., exists=True, dir_okay=False, help="Topology TOML: nodes, links, resources, cores."),
    prefix: str = PREFIX_OPTION,
    subnet: str = typer.Option(SUBNET, help="Private IPv4 test subnet of the hosts."),
    head: Optional[str] = typer.Option(None, help="Node of the Ray head. [default: the driver node, else the device]"),
    num_cpus: Optional[int] = typer.Option(None, help="Ray CPUs per node. [default: the node's core count, else 1]"),
    ray: bool = typer.Option(True, help="Start Ray on the hosts (--no-ray: the network only)."),
    timeout: float = typer.Option(emulate.UP_TIMEOUT_S, help="Seconds for every Ray node to come alive."),
) -> None:
    """Create a namespace per node (plus a client), link them, shape them, start Ray, wait for it."""
    try:
        state = emulate.up(topology, prefix=prefix, subnet=subnet, head=head, num_cpus=num_cpus, ray=ray,
                           timeout_s=timeout)
    except (emulate.EmulateError, ValueError, TypeError) as exc:
        _fail(exc)
    typer.echo(summary(state))


@emulate_app.command()
def down(prefix: str = PREFIX_OPTION) -> None:
    """End every process in the emulation's namespaces (by pid) and delete all it created; safe to repeat."""
    try:
        report = emulate.down(prefix)
    except (emulate.EmulateError, ValueError) as exc:
        _fail(exc)
    typer.echo(f"down in {report['down_s']:g} s: {len(report['namespaces'])} namespace(s) deleted, "
               f"{len(report['pids'])} process(es) ended")


@emulate_app.command("exec", context_settings={"ignore_unknown_options": True})
def exec_(
    node: str = typer.Argument(..., help="Host to run on (a topology node or the client)."),
    command: List[str] = typer.Argument(..., help="The command, after `--`."),
    prefix: str = PREFIX_OPTION,
) -> None:
    """Run a command on a host: inside its namespace, on its cores, with the venv and Ray settings."""
    state = _state(prefix)
    try:
        emulate_ops.run_exec(state, node, command)
    except (emulate.EmulateError, OSError) as exc:
        _fail(exc)


@emulate_app.command()
def partition(
    node: str = typer.Argument(..., help="Host to cut off."),
    other: Optional[str] = typer.Argument(None, help="Cut only the link between NODE and this host."),
    prefix: str = PREFIX_OPTION,
) -> None:
    """Partition a host from everyone (its veth down), or two hosts from each other."""
    try:
        typer.echo(emulate_ops.partition(_state(prefix), node, other))
    except (emulate.EmulateError, RuntimeError) as exc:
        _fail(exc)


@emulate_app.command()
def heal(prefix: str = PREFIX_OPTION) -> None:
    """Undo every partition."""
    changed = emulate_ops.heal(_state(prefix))
    typer.echo("\n".join(changed) if changed else "nothing was partitioned")


@emulate_app.command()
def kill(node: str = typer.Argument(..., help="Host whose processes to end."), prefix: str = PREFIX_OPTION) -> None:
    """End every process on a host by pid (its Ray node dies, its namespace and links stay)."""
    try:
        pids = emulate_ops.kill(_state(prefix), node)
    except emulate.EmulateError as exc:
        _fail(exc)
    typer.echo(f"{node}: {len(pids)} process(es) ended")


@emulate_app.command()
def status(prefix: str = PREFIX_OPTION,
           as_json: bool = typer.Option(False, "--json", help="One JSON object: the state file plus live rows.")) -> None:
    """Every host: address, Ray role, namespace present, link up, blackholed peers, processes."""
    state = _state(prefix)
    rows = emulate_ops.status(state)
    if as_json:
        typer.echo(json.dumps({**state, "live": rows}))
        return
    for r in rows:
        link = {True: "up", False: "DOWN", None: "-"}[r["link_up"]]
        cut = f" blackholed: {','.join(r['blackholed'])}" if r["blackholed"] else ""
        typer.echo(f"{r['name']:<10} {r['address']:<15} ray {r['ray']:<7} netns {'ok' if r['exists'] else 'GONE'} "
                   f"link {link:<4} processes {r['processes']}{cut}")
    typer.echo(f"job server: {state['dashboard']}   latency: {state['latency']}")


if __name__ == "__main__":
    emulate_app(prog_name="specmesh emulate")
    sys.exit(0)
