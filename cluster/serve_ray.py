"""The OpenAI app as a Ray Serve deployment, for the Ray backends ("local" and "cluster").

One replica holds a SpecMesh engine, whose draft and stage workers are Ray actors placed by the
engine's topology, and serves the same FastAPI app as ``specmesh serve`` in process (same routes,
errors, limits and metrics). Deploy it the Ray way:

    from specmesh.cluster.serve_ray import application
    serve.run(application(SpecConfig(backend="cluster", topology="cluster.toml")), route_prefix="/")

or from a shell, with :func:`build_app` as the application builder:
``serve run specmesh.cluster.serve_ray:build_app backend=cluster topology=cluster.toml``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ray import serve

from specmesh.runtime.api import SpecMesh
from specmesh.runtime.config import SpecConfig

from .serve_app import create_app

DEPLOYMENT_NAME = "specmesh"


@serve.ingress()
class SpecMeshServer:
    """A Ray Serve replica: loads the engine at start, serves the OpenAI app, closes it at the end.

    Args:
        config: the engine's configuration (models, topology, backend, defaults of requests).
        served_model_name / max_running / max_waiting: as for :func:`create_app`.
    """

    def __init__(self, config: SpecConfig, served_model_name: Optional[str] = None,
                 max_running: int = 16, max_waiting: int = 64) -> None:
        self.engine = SpecMesh(config)
        self._app_args = (served_model_name, max_running, max_waiting)

    def __serve_build_asgi_app__(self):
        return create_app(self.engine, *self._app_args)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def application(config: SpecConfig, served_model_name: Optional[str] = None, max_running: int = 16,
                max_waiting: int = 64, **deployment_options: Any):
    """A bound Ray Serve application serving ``config`` (``serve.run`` it).

    The replica itself asks for no CPU: the cores belong to the engine's workers. Ray Serve's own
    limit on requests in flight is set above the app's, so that the app answers 503 when full.

    Args:
        config: the engine; its backend must be "local" or "cluster".
        deployment_options: further ``serve.deployment`` options (``name``, ``ray_actor_options``...).

    Raises:
        ValueError: an in-process backend (serve that with ``specmesh serve`` instead).
    """
    if config.backend == "inproc":
        raise ValueError("Ray Serve needs a Ray backend ('local' or 'cluster'), got backend='inproc': "
                         "use specmesh serve for one process")
    options = dict(name=DEPLOYMENT_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0},
                   max_ongoing_requests=max_running + max_waiting + 8)
    options.update(deployment_options)
    return serve.deployment(SpecMeshServer, **options).bind(config, served_model_name, max_running, max_waiting)


def build_app(args: dict[str, str]):
    """Application builder for ``serve run specmesh.cluster.serve_ray:build_app key=value ...``:
    keys are SpecConfig fields (values parsed by the field's type) plus ``served_model_name``."""
    args = dict(args)
    name = args.pop("served_model_name", None)
    types = {f.name: str(f.type) for f in dataclasses.fields(SpecConfig)}
    unknown = sorted(set(args) - set(types))
    if unknown:
        raise ValueError(f"unknown SpecConfig fields {unknown}; known: {sorted(types)}")
    return application(SpecConfig(**{k: _parse(v, types[k]) for k, v in args.items()}), name)


def _parse(text: str, type_name: str) -> Any:
    """A command-line value as the field's declared type (``"int | None"`` and the like)."""
    if "None" in type_name and text.lower() in ("none", "null", ""):
        return None
    for name, parse in (("bool", lambda t: t.lower() in ("1", "true", "yes")), ("int", int),
                        ("float", float), ("tuple", lambda t: tuple(x for x in t.split(",") if x))):
        if type_name.startswith(name):
            return parse(text)
    return text
