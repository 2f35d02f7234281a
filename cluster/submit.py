"""Entry point for ``ray job submit``: runs the ``specmesh run`` command against the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m specmesh.cluster.submit --topology cluster/examples/three_nodes.toml --prompt "def fib(n):"

Same options as ``specmesh run``; the backend defaults to ``cluster`` (the job's own Ray cluster).
"""
from __future__ import annotations

import sys

from .cli import app


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--backend" or a.startswith("--backend=") for a in args):
        args += ["--backend", "cluster"]
    app(["run", *args], prog_name="specmesh.cluster.submit")


if __name__ == "__main__":
    main()
