"""The OpenAI app deployed with Ray Serve over the local Ray backend, on tiny models in fp32: the
official client gets the in-process engine's greedy and seeded outputs, streamed and not, with
metrics; an in-process backend is refused."""
from __future__ import annotations

import socket

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specmesh.runtime import SpecConfig, SpecMesh

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 128, 64]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(cache: str, backend: str) -> SpecConfig:
    return SpecConfig(target="tiny", draft="tiny-draft", dtype="float32", backend=backend, num_stages=2,
                      cache_dir=cache, max_new_tokens=20, threads=1)


@pytest.fixture(scope="module")
def deployed(local_ray, model_cache):
    from ray import serve

    from specmesh.cluster.serve_ray import application

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(application(_config(model_cache, "local"), served_model_name="tiny"), route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def reference(model_cache):
    with SpecMesh(_config(model_cache, "inproc")) as engine:
        yield engine


@pytest.mark.parametrize("kw", [dict(), dict(temperature=1.0, seed=9)])
def test_ray_serve_equals_in_process(deployed, reference, kw):
    want = reference.generate(PROMPT, **kw).output_ids
    client = openai.OpenAI(base_url=deployed + "/v1", api_key="unused", max_retries=0, timeout=300)
    got = client.completions.create(model="tiny", prompt=PROMPT, **kw)
    assert got.choices[0].token_ids == want and got.specmesh["bytes_up"] > 0
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, stream=True, **kw))
    assert [t for c in chunks for t in c.choices[0].token_ids] == want
    assert chunks[-1].usage.completion_tokens == len(want)


def test_ray_serve_errors_and_metrics(deployed):
    r = httpx.post(deployed + "/v1/completions", json={"model": "tiny", "prompt": [1], "gamma": 0}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["message"] == "gamma must be >= 1, got 0"
    ok = httpx.post(deployed + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 5}, timeout=300)
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["token_ids"]) == 5
    text = httpx.get(deployed + "/metrics", timeout=60).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    assert samples["specmesh:generation_tokens_total"] >= 5
    links = [s for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == "specmesh:link_bytes_total"]
    assert {s.labels["direction"] for s in links} == {"up", "down"}


def test_inproc_backend_is_refused(model_cache):
    from specmesh.cluster.serve_ray import application

    with pytest.raises(ValueError, match="Ray Serve needs a Ray backend"):
        application(_config(model_cache, "inproc"))


def test_serve_run_builder_parses_config_fields(model_cache):
    from ray.serve import Application

    from specmesh.cluster.serve_ray import build_app

    app = build_app({"target": "tiny", "draft": "tiny-draft", "backend": "local", "num_stages": "2",
                     "threads": "1", "overlap": "true", "temperature": "0.5", "stop": "a,b", "cache_dir": model_cache})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match=r"unknown SpecConfig fields \['stagez'\]"):
        build_app({"stagez": "2"})
    with pytest.raises(ValueError, match="gamma must be >= 1, got 0"):
        build_app({"backend": "local", "gamma": "0"})
