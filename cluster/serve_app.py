"""The OpenAI-compatible FastAPI app over a loaded :class:`SpecMesh` engine.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics``. Every request is checked (JSON, model, prompt length, every value against the
engine's config) before it is admitted, so a bad request never reaches a worker; a client that goes
away mid-generation has its session closed on every worker.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from specmesh.runtime.api import SpecMesh

from . import serve_protocol as proto
from .serve_metrics import ServeMetrics
from .serve_protocol import ApiError, ChatCompletionRequest, CompletionRequest
from .serve_runner import Finished, Overloaded, Session, SessionRunner, open_generation
from .serve_text import IncrementalText

# How often a non-streaming request checks that its client is still there (seconds).
_DISCONNECT_POLL_S = 0.25


class _Server:
    """What the routes share: the engine, its name, the session runner and the metrics."""

    def __init__(self, engine: SpecMesh, model_name: str, max_running: int, max_waiting: int) -> None:
        self.engine = engine
        self.model_name = model_name
        self.runner: SessionRunner | None = None
        self.metrics = ServeMetrics(engine.backend.traffic, self.load)
        self.limits = (max_running, max_waiting)
        self.created = int(time.time())

    def load(self) -> tuple[int, int]:
        return self.runner.load() if self.runner is not None else (0, 0)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(400, f"unknown model {model!r}: this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompt = req.single_prompt()
        if isinstance(prompt, list):
            return [int(t) for t in prompt]
        tok = self.engine.tokenizer
        if tok is None:
            raise ApiError(400, f"model {self.model_name!r} has no tokenizer: give the prompt as a list "
                           "of token ids", param="prompt")
        return list(tok.encode(prompt))

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None:
            raise ApiError(400, f"model {self.model_name!r} has no tokenizer, hence no chat template: use "
                           "/v1/completions with the prompt as a list of token ids", param="messages")
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, f"the tokenizer of model {self.model_name!r} has no chat template: use "
                           "/v1/completions", param="messages")
        messages = [m.for_template() for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template may reject a conversation (roles out of order, ...)
            raise ApiError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        return list(tok.encode(text, add_special_tokens=False))

    def open(self, req, prompt_ids: list[int]):
        """The request's generation, checked like the engine checks it; ApiError (400) if bad."""
        req.check_supported()
        overrides = req.overrides()
        context = self.engine.backend.info.max_positions
        if len(prompt_ids) >= context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens, but the prompt "
                           f"has {len(prompt_ids)} tokens", param="prompt" if isinstance(req, CompletionRequest)
                           else "messages", code="context_length_exceeded")
        asked = req.requested_max_tokens()
        if asked is not None and len(prompt_ids) + asked > context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens, but {len(prompt_ids)} "
                           f"prompt tokens + max_tokens {asked} = {len(prompt_ids) + asked}",
                           param="max_tokens", code="context_length_exceeded")
        if asked is None:  # the server's default length, cut to the context that is left
            overrides["max_new_tokens"] = min(self.engine.config.max_new_tokens, context - len(prompt_ids))
        try:
            dataclasses.replace(self.engine.config, **overrides)  # SpecConfig's own validation
            gen = open_generation(self.engine, prompt_ids, overrides)
        except (ValueError, TypeError, KeyError) as exc:
            raise ApiError(400, str(exc).strip("'\""), param=_param_of(str(exc), overrides)) from None
        return gen, IncrementalText(self._decode(), overrides.get("stop", ()))

    def _decode(self):
        tok = self.engine.tokenizer
        return None if tok is None else (lambda ids: tok.decode(ids, skip_special_tokens=True))

    def admit(self, gen) -> Session:
        try:
            return self.runner.submit(gen, time.perf_counter())
        except Overloaded as exc:
            raise ApiError(503, str(exc), type="service_unavailable", code="overloaded") from None


def _param_of(message: str, overrides: dict) -> str | None:
    """The request field that a config error names."""
    names = {cfg: api for api, cfg in proto.CONFIG_FIELDS.items()}
    for key in sorted(overrides, key=lambda k: not message.startswith(k)):
        if key in message:
            return names.get(key, key)
    return "prompt" if "prompt" in message else None


def create_app(engine: SpecMesh, model_name: str | None = None, max_running: int = 16,
               max_waiting: int = 64) -> FastAPI:
    """The FastAPI app serving ``engine`` (which the caller keeps and closes).

    Args:
        engine: a loaded engine.
        model_name: the name clients give as ``model`` (default: the engine's target).
        max_running: sessions generating at once (worker threads).
        max_waiting: admitted requests waiting for a running slot; beyond, 503.
    """
    server = _Server(engine, model_name or engine.config.target, max_running, max_waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.runner = SessionRunner(engine, server.metrics, max_running, max_waiting)
        try:
            yield
        finally:
            await asyncio.to_thread(server.runner.close)

    app = FastAPI(title="SpecMesh", lifespan=lifespan)
    app.state.specmesh = server
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        running, waiting = server.load()
        return {"status": "ok", "model": server.model_name, "running": running, "waiting": waiting}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "specmesh",
                "max_model_len": engine.backend.info.max_positions}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        server.check_model(req.model)
        return await _respond(server, req, server.completion_prompt(req), request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        server.check_model(req.model)
        return await _respond(server, req, server.chat_prompt(req), request, chat=True)

    return app


async def _respond(server: _Server, req, prompt_ids: list[int], request: Request, chat: bool):
    gen, text = server.open(req, prompt_ids)
    session = server.admit(gen)
    rid = proto.new_id("chatcmpl" if chat else "cmpl")
    if req.stream:
        return StreamingResponse(_sse(server, req, session, text, rid, len(prompt_ids), chat),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        checked = time.monotonic()
        while True:
            event = await session.next_event(_DISCONNECT_POLL_S)
            if time.monotonic() - checked >= _DISCONNECT_POLL_S:  # rounds may keep coming faster
                checked = time.monotonic()
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; the finally frees the session
            if event is None:
                continue
            kind, value = event
            if kind == "done":
                return _final_body(server, rid, chat, value, len(prompt_ids), text)
            if kind == "error":
                raise _generation_failed(value)
    finally:
        session.cancel()


def _final_body(server: _Server, rid: str, chat: bool, fin: Finished, prompt_len: int,
                text: IncrementalText) -> dict:
    choice = proto.completion_choice(text.full(fin.output_ids), fin.output_ids,
                                     proto.FINISH_REASONS[fin.finish_reason], chat)
    return proto.response_body(rid, server.model_name, chat, [choice], stream=False,
                               usage=proto.usage(prompt_len, len(fin.output_ids)),
                               specmesh=proto.specmesh_stats(fin.stats))


async def _sse(server: _Server, req, session: Session, text: IncrementalText, rid: str,
               prompt_len: int, chat: bool) -> AsyncIterator[str]:
    """The response as server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    created = int(time.time())
    output: list[int] = []
    first = True

    def chunk(delta: str, ids: list[int], finish: str | None = None, **extra) -> str:
        nonlocal first
        choice = proto.completion_choice(delta, ids, finish, chat, delta=True, first=first)
        first = False
        body = proto.response_body(rid, server.model_name, chat, [choice], stream=True, created=created, **extra)
        return f"data: {json.dumps(body)}\n\n"

    try:
        while True:
            kind, value = await session.next_event()
            if kind == "round":
                output.extend(value)
                yield chunk(text.push(output), value)
            elif kind == "done":
                fin: Finished = value
                extra = dict(usage=proto.usage(prompt_len, len(fin.output_ids)),
                             specmesh=proto.specmesh_stats(fin.stats))
                yield chunk(text.finish(fin.output_ids), [], proto.FINISH_REASONS[fin.finish_reason], **extra)
                if req.include_usage_chunk:
                    body = proto.response_body(rid, server.model_name, chat, [], stream=True, created=created, **extra)
                    yield f"data: {json.dumps(body)}\n\n"
                break
            else:
                yield f"data: {json.dumps(_generation_failed(value).body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        session.cancel()  # a client that went away: close the session after the round in flight


def _generation_failed(exc: BaseException) -> ApiError:
    committed = getattr(exc, "output_ids", None)
    after = f" after {len(committed)} committed tokens" if committed is not None else ""
    return ApiError(500, f"generation failed{after}: {type(exc).__name__}: {exc}", type="server_error")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return JSONResponse(proto.error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(proto.error_body(str(exc.detail), kind), status_code=exc.status_code)


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A message naming the bad fields and values, and the first bad field, from pydantic's errors."""
    def where(e: dict) -> str:
        return ".".join(str(p) for p in e.get("loc", ()) if p != "body")

    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return f"invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if first.get("type") == "extra_forbidden":
        return f"unsupported field {where(first)!r}", where(first)
    parts = [f"{where(e)}: field required" if e.get("type") == "missing"
             else f"{where(e)}: {e.get('msg')} (got {e.get('input')!r})" for e in errors[:3]]
    return "; ".join(parts) or "invalid request", where(first) or None
