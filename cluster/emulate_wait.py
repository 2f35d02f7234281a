"""Waits that ``specmesh emulate up`` runs inside a namespace (the root namespace cannot reach the hosts).

    python -m specmesh.cluster.emulate_wait port HOST PORT TIMEOUT_S
    python -m specmesh.cluster.emulate_wait nodes GCS_ADDRESS DASHBOARD_URL ADDR[,ADDR...] TIMEOUT_S

``port`` returns once a TCP connection to HOST:PORT succeeds. ``nodes`` (run on a Ray node: a driver needs
a local raylet) connects to the cluster, returns once a live node holds each address and the job server
answers HTTP, and prints one JSON line: ``{"nodes": [{"address", "node_id", "resources"}, ...]}``.
Exit status 1 and a message on stderr when the deadline passes first.
"""
from __future__ import annotations

import json
import socket
import sys
import time
import urllib.error
import urllib.request

POLL_S = 0.5
CONNECT_TIMEOUT_S = 2.0


def wait_port(host: str, port: int, timeout_s: float) -> None:
    """Return once ``host:port`` accepts a TCP connection; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} did not accept a connection within {timeout_s:g} s: {exc}")
            time.sleep(POLL_S)


def _dashboard_answers(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=CONNECT_TIMEOUT_S)
        return True
    except urllib.error.HTTPError:  # 401 without a token: it answers
        return True
    except OSError:
        return False


def wait_nodes(gcs: str, dashboard: str, addresses: list[str], timeout_s: float) -> list[dict]:
    """Return the live nodes once every one of ``addresses`` has one and the job server answers."""
    import ray

    deadline = time.monotonic() + timeout_s
    while not ray.is_initialized():
        try:
            ray.init(address=gcs, log_to_driver=False, logging_level="ERROR")
        except ConnectionError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Ray cluster at {gcs} within {timeout_s:g} s") from None
            time.sleep(POLL_S)
    while True:
        live = {n["NodeManagerAddress"]: n for n in ray.nodes() if n["Alive"]}
        missing = [a for a in addresses if a not in live]
        if not missing and _dashboard_answers(dashboard):
            return [{"address": a, "node_id": live[a]["NodeID"], "resources": live[a]["Resources"]}
                    for a in addresses]
        if time.monotonic() > deadline:
            why = f"no live Ray node on {', '.join(missing)}" if missing else f"the job server {dashboard} is silent"
            raise TimeoutError(f"{why} after {timeout_s:g} s")
        time.sleep(POLL_S)


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["port"] and len(argv) == 4:
            wait_port(argv[1], int(argv[2]), float(argv[3]))
            return 0
        if argv[:1] == ["nodes"] and len(argv) == 5:
            nodes = wait_nodes(argv[1], argv[2], argv[3].split(","), float(argv[4]))
            print(json.dumps({"nodes": nodes}), flush=True)
            return 0
    except TimeoutError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
