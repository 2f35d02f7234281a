"""``specmesh serve``: an OpenAI-compatible HTTP endpoint over a SpecMesh engine, under uvicorn.

    specmesh serve --target tiny --draft tiny-draft --dtype float32 --port 8000
    curl localhost:8000/v1/completions -d '{"prompt": [1, 2, 3], "max_tokens": 16}'

In Python, :func:`serve_command` serves a config until interrupted, and :class:`ServerThread` runs the
same app in a background thread (tests, notebooks). For the Ray backends, ``serve_ray`` deploys the
same app with Ray Serve.
"""
from __future__ import annotations

import threading
from typing import Optional

import uvicorn

from specmesh.runtime.api import SpecMesh
from specmesh.runtime.config import SpecConfig

from .serve_app import create_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_RUNNING = 16
DEFAULT_MAX_WAITING = 64


def serve_command(
    config: SpecConfig,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    served_model_name: Optional[str] = None,
    max_running: int = DEFAULT_MAX_RUNNING,
    max_waiting: int = DEFAULT_MAX_WAITING,
    log_level: str = "info",
) -> None:
    """Loads the engine of ``config`` and serves it until interrupted, then closes every worker.

    Args:
        config: the engine (models, stages, backend, defaults for requests that leave fields out).
        host / port: where to listen (127.0.0.1 by default: loopback only).
        served_model_name: the ``model`` clients name (default: ``config.target``).
        max_running: sessions generating at once.
        max_waiting: requests queued for a slot; beyond that the server answers 503.
        log_level: uvicorn's log level.
    """
    engine = SpecMesh(config)
    try:
        app = create_app(engine, served_model_name, max_running, max_waiting)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.close()


class ServerThread:
    """Runs an app under uvicorn in a daemon thread, on ``port`` (0: any free port).

        with ServerThread(create_app(engine)) as server:
            openai.OpenAI(base_url=server.url + "/v1", api_key="-")...

    Attributes:
        url: ``http://host:port`` once started.
    """

    def __init__(self, app, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning") -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    lifespan="on"))
        self.host = host
        self.url: str | None = None
        self._thread = threading.Thread(target=self.server.run, name="specmesh-uvicorn", daemon=True)

    def start(self, timeout_s: float = 30.0) -> "ServerThread":
        """Starts serving; returns once the socket listens.

        Raises:
            RuntimeError: the server did not start within ``timeout_s``.
        """
        self._thread.start()
        self._thread.join(0.05)
        waited = 0.05
        while not self.server.started:
            if not self._thread.is_alive() or waited > timeout_s:
                raise RuntimeError(f"uvicorn did not start on {self.host} within {timeout_s} s")
            self._thread.join(0.05)
            waited += 0.05
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stops serving (cancelling sessions in flight) and waits for the thread."""
        self.server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
