"""The OpenAI wire format of ``specmesh serve``: request models, error bodies, response bodies.

Pure pydantic and dicts: nothing here touches an engine or a worker, so every request is checked
here (and against the engine's config) before any worker sees it.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from specmesh.runtime.stats import SessionStats

# The engine's finish reasons -> OpenAI's ("context": the model's context is full).
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}

# Request fields -> SpecConfig fields, for per-request overrides.
CONFIG_FIELDS = {
    "max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
    "seed": "seed", "gamma": "gamma", "tree_width": "tree_width", "draft_length": "draft_length",
    "sparsifier": "sparsifier", "sparse_k": "sparse_k", "sparse_mass": "sparse_mass",
    "acceptance": "acceptance",
}

# OpenAI fields SpecMesh does not implement, accepted only at the value that means "off".
_OFF_VALUES = {
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (False, 0),
    "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "logit_bias": ({},), "suffix": ("",),
}


class ApiError(Exception):
    """A request answered with an OpenAI-style error body ``{"error": {message, type, param, code}}``.

    Args:
        status: HTTP status.
        message: what was wrong, naming the bad value.
        type: OpenAI error type ("invalid_request_error", "server_error", ...).
        param: the request field at fault, if one is.
        code: a short machine-readable code ("model_not_found", "context_length_exceeded", ...).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields common to completions and chat completions; ``None`` = the server's configuration."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    # SpecMesh's own knobs, validated like SpecConfig.
    gamma: int | None = None
    tree_width: int | None = None
    draft_length: str | None = None
    sparsifier: str | None = None
    sparse_k: int | None = None
    sparse_mass: float | None = None
    acceptance: str | None = None
    # Not implemented: accepted only when off (clients send some of them at their defaults).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        """Raises ApiError (400) for n != 1 or an unimplemented feature switched on."""
        if self.n != 1:
            raise ApiError(400, f"n must be 1 (one choice per request), got {self.n}", param="n")
        for name, off in _OFF_VALUES.items():
            value = getattr(self, name)
            if value is not None and value not in off:
                raise ApiError(400, f"{name}={value!r} is not supported by SpecMesh", param=name)

    def overrides(self) -> dict[str, Any]:
        """The SpecConfig fields this request sets (the rest keep the server's configuration).

        Raises:
            ApiError: max_tokens < 1 (the config would name it max_new_tokens).
        """
        max_tokens = self.requested_max_tokens()
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        out = {cfg: getattr(self, field) for field, cfg in CONFIG_FIELDS.items()
               if getattr(self, field) is not None and field != "max_tokens"}
        if max_tokens is not None:
            out["max_new_tokens"] = max_tokens
        if self.stop is not None:
            out["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return out

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: one prompt, as text or (models without a tokenizer) token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]

    def single_prompt(self) -> str | list[int]:
        """The one prompt (a batch of one is unwrapped); ApiError for a batch of several."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ApiError(400, f"one prompt per request, got a batch of {len(p)}", param="prompt")
            return p[0]
        return p


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def for_template(self) -> dict:
        """The message as the chat template expects it (text parts joined)."""
        content = self.content
        if isinstance(content, list):
            kinds = {part.get("type") for part in content} - {"text"}
            if kinds:
                raise ApiError(400, f"only text content parts are supported, got {sorted(map(str, kinds))}",
                               param="messages")
            content = "".join(str(part.get("text", "")) for part in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``: messages rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def specmesh_stats(stats: SessionStats) -> dict:
    """SpecMesh's figures for one response: acceptance, mean accepted length, bytes per token."""
    return {
        "acceptance_rate": round(stats.acceptance_rate, 4),
        "mean_accepted_length": round(stats.mean_accepted_length, 4),
        "bytes_up_per_token": round(stats.bytes_up_per_token, 1),
        "bytes_down_per_token": round(stats.bytes_down_per_token, 1),
        "rounds": stats.rounds, "drafted": stats.drafted, "accepted": stats.accepted,
        "bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down, "wall_s": round(stats.wall_s, 4),
    }


def completion_choice(text: str, token_ids: list[int], finish_reason: str | None, chat: bool,
                      delta: bool = False, first: bool = False) -> dict:
    """One choice: ``text`` for completions, ``message``/``delta`` for chat; ``token_ids`` always
    (the only output of a model without a tokenizer)."""
    choice: dict[str, Any] = {"index": 0}
    if not chat:
        choice.update(text=text, logprobs=None)
    elif delta:
        choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
    else:
        choice["message"] = {"role": "assistant", "content": text}
    choice.update(finish_reason=finish_reason, token_ids=token_ids)
    return choice


def response_body(rid: str, model: str, chat: bool, choices: list[dict], stream: bool,
                  created: int | None = None, **extra) -> dict:
    """A response or stream chunk object around ``choices`` (``extra``: usage, specmesh)."""
    obj = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    return {"id": rid, "object": obj, "created": created or int(time.time()), "model": model,
            "choices": choices, **extra}
