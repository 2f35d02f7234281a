"""`specmesh serve` end to end on tiny models, in process: the official `openai` client against uvicorn
on 127.0.0.1, outputs equal to `SpecMesh.generate`, OpenAI error bodies, disconnects, metrics, load."""
from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from specmesh.cluster.serve import ServerThread
from specmesh.cluster.serve_app import create_app
from specmesh.cluster.serve_protocol import FINISH_REASONS
from specmesh.runtime import SpecConfig, SpecMesh

torch.set_num_threads(1)
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 128, 64]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg = SpecConfig(target="tiny", draft="tiny-draft", dtype="float32", backend="inproc", num_stages=2,
                     cache_dir=str(tmp_path_factory.mktemp("models")), max_new_tokens=24)
    with SpecMesh(cfg) as e:
        yield e


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine)) as s:
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _no_sessions(engine) -> bool:
    return not engine.backend.drafter.worker.sessions and not any(s.sessions for s in engine.backend.target.stages)


def _wait_free(engine, server_url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _no_sessions(engine) and httpx.get(server_url + "/health").json()["running"] == 0:
            return
        time.sleep(0.02)
    raise AssertionError("sessions still open on the workers")


def _metrics(http) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_completion_equals_generate(client, engine):
    want = engine.generate(PROMPT, max_new_tokens=20, gamma=3)
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, extra_body={"gamma": 3})
    choice = got.choices[0]
    assert choice.token_ids == want.output_ids and choice.finish_reason == "length" and choice.text == ""
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(PROMPT), 20)
    sm = got.specmesh
    assert sm["rounds"] == want.stats.rounds and sm["accepted"] == want.stats.accepted
    assert sm["mean_accepted_length"] == round(want.stats.mean_accepted_length, 4) > 1
    assert sm["bytes_up_per_token"] > 0 and sm["bytes_down_per_token"] > 0


@pytest.mark.parametrize("kw", [dict(), dict(temperature=1.0, seed=7), dict(tree_width=3, gamma=2),
                                dict(temperature=0.8, top_p=0.9, seed=3, sparsifier="top-p")])
def test_stream_equals_generate(client, engine, kw):
    want = engine.generate(PROMPT, max_new_tokens=24, **kw)
    std = {k: kw[k] for k in ("temperature", "top_p", "seed") if k in kw}
    extra = {k: v for k, v in kw.items() if k not in std}
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, stream=True, extra_body=extra, **std))
    assert [t for c in chunks for t in c.choices[0].token_ids] == want.output_ids
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == FINISH_REASONS[want.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(want.output_ids)
    assert chunks[-1].specmesh["rounds"] == want.stats.rounds
    assert len(chunks) - 1 == want.stats.rounds  # one chunk per round, then the final one


def test_raw_sse_format(http):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6 and "specmesh" in last
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert http.get("/health").json()["status"] == "ok"


BAD = [
    ("/v1/completions", {"model": "gpt-4", "prompt": [1]}, "unknown model 'gpt-4'", "model"),
    ("/v1/completions", {"prompt": [1] * 600}, "maximum context length is 512 tokens, but the prompt has 600", "prompt"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": 511}, r"2 prompt tokens \+ max_tokens 511 = 513", "max_tokens"),
    ("/v1/completions", {"prompt": [1], "max_tokens": 0}, "max_tokens must be >= 1, got 0", "max_tokens"),
    ("/v1/completions", {"prompt": [1], "n": 2}, "n must be 1", "n"),
    ("/v1/completions", {"prompt": [1], "gamma": 0}, "gamma must be >= 1, got 0", "gamma"),
    ("/v1/completions", {"prompt": [1], "temperature": -1}, "temperature must be >= 0, got -1", "temperature"),
    ("/v1/completions", {"prompt": [1], "top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5", "top_p"),
    ("/v1/completions", {"prompt": [1], "tree_width": 0}, "tree_width must be >= 1, got 0", "tree_width"),
    ("/v1/completions", {"prompt": [1], "acceptance": "magic"}, "unknown acceptance policy 'magic'", "acceptance"),
    ("/v1/completions", {"prompt": [1], "sparsifier": "zip"}, "unknown sparsifier 'zip'", "sparsifier"),
    ("/v1/completions", {"prompt": [1, 256]}, r"prompt token ids \[256\] outside the vocabulary", "prompt"),
    ("/v1/completions", {"prompt": []}, "the prompt is empty", "prompt"),
    ("/v1/completions", {"prompt": "hello"}, "has no tokenizer: give the prompt as a list of token ids", "prompt"),
    ("/v1/completions", {"prompt": [[1], [2]]}, "one prompt per request, got a batch of 2", "prompt"),
    ("/v1/completions", {"prompt": [1], "stop": ["x"]}, "stop strings need a tokenizer", "stop"),
    ("/v1/completions", {"prompt": [1], "logprobs": 3}, "logprobs=3 is not supported", "logprobs"),
    ("/v1/completions", {"prompt": [1], "frobnicate": 1}, "unsupported field 'frobnicate'", "frobnicate"),
    ("/v1/completions", {"prompt": [1], "temperature": "hot"}, "temperature: Input should be a valid number", "temperature"),
    ("/v1/completions", {"max_tokens": 3}, "prompt: field required", "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "has no tokenizer, hence no chat template", "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages: List should have at least 1 item", "messages"),
]


def test_bad_requests_get_openai_errors_and_never_reach_a_worker(http, engine, monkeypatch):
    opened = []
    monkeypatch.setattr(engine.backend.target, "open", lambda msg: opened.append(msg))
    monkeypatch.setattr(engine.backend.drafter, "open", lambda msg: opened.append(msg))
    for path, body, message, param in BAD:
        r = http.post(path, json=body)
        err = r.json()["error"]
        assert r.status_code == 400, (body, r.text)
        assert err["type"] == "invalid_request_error" and err["param"] == param, (body, err)
        assert re.search(message, err["message"]), (body, err["message"])
    r = http.post("/v1/completions", content=b'{"prompt": [1],', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("invalid JSON body")
    assert opened == []


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="unknown model 'other'"):
        client.completions.create(model="other", prompt=[1, 2])
    with pytest.raises(openai.BadRequestError, match="got a batch of 2"):
        client.completions.create(model="tiny", prompt=["a", "b"])


@pytest.fixture()
def slow_rounds(engine, monkeypatch):
    """Every round takes at least 20 ms more (so a long generation is surely cut mid-way)."""
    stage = engine.backend.target.stages[0]
    step = stage.step

    def slow(msg):
        time.sleep(0.02)
        return step(msg)

    monkeypatch.setattr(stage, "step", slow)


def test_disconnect_frees_the_session(server, http, engine, slow_rounds):
    before = _metrics(http)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 480, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]  # two rounds (each event is followed by a blank line)
        assert got[0].startswith("data: ") and not _no_sessions(engine)
    _wait_free(engine, server.url)
    after = _metrics(http)
    key = ("specmesh:request_cancelled_total", ())
    assert after[key] == before.get(key, 0) + 1
    generated = ("specmesh:generation_tokens_total", ())
    assert after[generated] - before[generated] < 240  # cut long before the 480 it asked for


def test_non_streaming_disconnect_frees_the_session(server, http, engine, slow_rounds):
    before = _metrics(http)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 480}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    _wait_free(engine, server.url)
    key = ("specmesh:request_cancelled_total", ())
    assert _metrics(http)[key] == before.get(key, 0) + 1


def test_full_server_answers_503(engine, slow_rounds):
    with ServerThread(create_app(engine, max_running=1, max_waiting=1)) as s, \
            httpx.Client(base_url=s.url, timeout=60) as c:
        body = {"prompt": PROMPT, "max_tokens": 200, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as first, \
                c.stream("POST", "/v1/completions", json=body) as second:
            assert first.status_code == 200 and second.status_code == 200  # one runs, one waits
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            err = r.json()["error"]
            assert err["code"] == "overloaded"
            assert "server full: 1 requests running and 1 waiting (limits 1 and 1)" in err["message"]
    assert _no_sessions(engine)  # stopping the server closed the session that still ran


def test_metrics_parse_and_move(client, http, engine):
    records = engine.generate(PROMPT, max_new_tokens=16, gamma=4).stats.records
    before = _metrics(http)
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, extra_body={"gamma": 4})
    after = _metrics(http)
    sm = got.specmesh

    def moved(name, **labels):
        key = ("specmesh:" + name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("generation_tokens_total") == 16
    assert moved("prompt_tokens_total") == len(PROMPT)
    assert moved("num_rounds_total") == sm["rounds"]
    assert moved("spec_decode_num_drafts_total") == sum(r.gamma > 0 for r in records)
    assert moved("spec_decode_num_draft_tokens_total") == sm["drafted"]
    assert moved("spec_decode_num_accepted_tokens_total") == sm["accepted"] > 0
    per_pos = [moved("spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) for i in range(4)]
    assert sum(per_pos) == sm["accepted"] and per_pos == sorted(per_pos, reverse=True)
    assert moved("request_success_total", finished_reason="length") == 1
    for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert moved(hist + "_count") == 1
    assert moved("round_time_seconds_count") == sm["rounds"]
    up = sum(v - before.get(k, 0) for k, v in after.items()
             if k[0] == "specmesh:link_bytes_total" and ("direction", "up") in k[1])
    down = sum(v - before.get(k, 0) for k, v in after.items()
               if k[0] == "specmesh:link_bytes_total" and ("direction", "down") in k[1])
    assert up >= sm["bytes_up"] > 0 and down == sm["bytes_down"] > 0
    assert after[("specmesh:num_requests_running", ())] == 0


def test_sixteen_concurrent_streams_equal_their_solo_runs(server, engine):
    """A bounded load test: 16 streaming clients at once, different prompts and seeds."""
    jobs = [(PROMPT[i % 7:] + [i], dict(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=16 + i % 5))
            for i in range(16)]
    want = [engine.generate(p, max_new_tokens=kw["max_tokens"], temperature=kw["temperature"],
                            seed=kw["seed"]).output_ids for p, kw in jobs]

    def run(job):
        prompt, kw = job
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        return [t for chunk in c.completions.create(model="tiny", prompt=prompt, stream=True, **kw)
                for t in chunk.choices[0].token_ids]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, jobs, timeout=240))
    assert got == want
    _wait_free(engine, server.url)
