"""The one wire codec of SpecMesh: every message of :mod:`specmesh.runtime.messages` to and from bytes.

The layers, each its own module: :mod:`framing` (version header, flags, zstd, size limits),
:mod:`schema` (each message body as a typed msgspec Struct: fields, types and bounds, declared once),
:mod:`encodings` (tensors, token ids, varints) and :mod:`sparse_wire` (the draft's q). This module maps
every message dataclass onto its Struct field by field, in both directions, from one table of field
converters, and applies the rules that relate fields to each other (:data:`RULES`): the encoder
refuses whatever the receiver would refuse.

In a :class:`StageFrame` the proposal's q stays in its wire form until ``proposal.q`` is first read,
and a frame whose q was never read is re-encoded with those very bytes: a middle stage neither
decodes nor re-encodes q.

Every malformed, oversized or inconsistent input raises :class:`ProtocolError` and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable

import msgspec
import numpy as np
import torch

from . import sparse
from .encodings import DTYPE_CODES, HIDDEN_DTYPES, ids_from_wire, ids_to_wire, tensor_from_wire, tensor_to_wire
from .framing import (DEFAULT_LIMITS, FLAG_ZSTD, PROTOCOL_VERSION, ProtocolError, WireLimits, open_frame,
                      pack_frame, read_tag)
from .messages import DraftProposal, ErrorMessage, OpenSession, SamplingParams, StageFrame, VerifyResult, deferred
from .messages import FederatedRows
from .schema import Tag, body_limit, decode_as, encode_struct, schema
from .sparse_wire import (INDEX_CODINGS, INDEX_DELTA_VARINT, INDEX_UINT32, PROB_DTYPES, dense_to_wire,
                          sparse_from_wire, sparse_to_wire)
from .wire_rules import RULES, WireQ, check_drawable, dense_prob_of
from . import split_wire
from . import federated_wire

__all__ = ["CodecConfig", "DEFAULT_CONFIG", "DEFAULT_LIMITS", "DTYPE_CODES", "FLAG_ZSTD", "INDEX_CODINGS",
           "INDEX_DELTA_VARINT", "INDEX_UINT32", "MESSAGE_TYPES", "Message", "PROTOCOL_VERSION",
           "ProtocolError", "Tag", "WireLimits", "decode", "encode", "quantise_sparse", "tensor_from_wire",
           "tensor_to_wire"]

quantise_sparse = sparse.quantise_fp16  # old name, kept until actors/draft.py uses the new one


@dataclass(frozen=True)
class CodecConfig:
    """How a sender encodes; decoders accept every variant, so peers may differ.

    Attributes:
        compress_threshold: bodies of at least this many bytes are zstd-compressed (kept only if
            smaller); ``None`` never compresses.
        compress_level: zstd level, 1..22.
        prob_dtype: wire dtype of sparse q probabilities, float16 (default) or float32.
        index_coding: sparse token ids as ``"delta-varint"`` (default) or ``"uint32"``.
        limits: the bounds checked on encode (fail at the sender) and by :func:`decode`.
    """

    compress_threshold: int | None = 1024
    compress_level: int = 3
    prob_dtype: torch.dtype = torch.float16
    index_coding: str = "delta-varint"
    limits: WireLimits = field(default_factory=WireLimits)

    def __post_init__(self) -> None:
        if self.compress_threshold is not None and (
            type(self.compress_threshold) is not int or self.compress_threshold < 0
        ):
            raise ValueError(f"compress_threshold must be None or an int >= 0, got "
                             f"{self.compress_threshold!r}")
        if type(self.compress_level) is not int or not 1 <= self.compress_level <= 22:
            raise ValueError(f"compress_level must be an int in 1..22, got {self.compress_level!r}")
        if self.prob_dtype not in PROB_DTYPES:
            raise ValueError(f"prob_dtype must be one of {PROB_DTYPES}, got {self.prob_dtype}")
        if self.index_coding not in INDEX_CODINGS:
            raise ValueError(f"index_coding must be one of {list(INDEX_CODINGS)}, got {self.index_coding!r}")
        if not isinstance(self.limits, WireLimits):
            raise TypeError(f"limits must be a WireLimits, got {type(self.limits).__name__}")


DEFAULT_CONFIG = CodecConfig()
Message = OpenSession | DraftProposal | StageFrame | VerifyResult | ErrorMessage | FederatedRows
MESSAGE_TYPES = (OpenSession, DraftProposal, StageFrame, VerifyResult, ErrorMessage, FederatedRows)
# The message each Struct (by name) carries; a proposal's Struct depends on its q (sparse or dense).
_MESSAGE_OF = {"OpenSession": OpenSession, "Proposal": DraftProposal, "DenseProposal": DraftProposal,
               "StageFrame": StageFrame, "VerifyResult": VerifyResult, "Error": ErrorMessage,
               "SplitProposal": DraftProposal, "SplitVerifyResult": VerifyResult,
               "FederatedRows": FederatedRows}


@dataclass(frozen=True)
class _Ctx:
    """What a conversion needs: the bounds, the receiver's vocabulary, the sender's config, a label."""

    limits: WireLimits
    vocab_size: int | None = None
    config: CodecConfig = DEFAULT_CONFIG
    label: str = ""

    def at(self, name: str) -> str:
        return f"{self.label}.{name}"


def encode(msg: Message, config: CodecConfig = DEFAULT_CONFIG) -> bytes:
    """Encodes one message into a frame.

    Raises:
        ProtocolError: the message cannot be represented or the receiver would refuse it (ids out
            of range, q not a distribution, a candidate with q = 0 after quantisation, a limit...).
    """
    if type(msg) not in MESSAGE_TYPES:
        raise ProtocolError(f"cannot encode {type(msg).__name__}: not a SpecMesh message")
    limits = config.limits
    try:
        wire = _to_wire(msg, _Ctx(limits, None, config, type(msg).__name__))
        body = _ENCODER.encode(wire)
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError, AttributeError, RuntimeError) as exc:
        # A field of the wrong type (a str where ids belong, say) is the sender's protocol error.
        raise ProtocolError(f"cannot encode {type(msg).__name__}: {type(exc).__name__}: {exc}") from None
    tag = read_tag(body)
    decode_as(schema(limits).bodies[tag], body, Tag(tag).name, limits)  # the receiver's type checks
    if len(body) > body_limit(tag, limits):
        raise ProtocolError(f"{Tag(tag).name}: body of {len(body)} bytes exceeds the "
                            f"{body_limit(tag, limits)} its fields can hold")
    return pack_frame(body, config.compress_threshold, config.compress_level, limits)


def decode(data: bytes, *, vocab_size: int | None = None, limits: WireLimits = DEFAULT_LIMITS) -> Message:
    """Decodes and validates one frame.

    Args:
        data: the frame.
        vocab_size: when given, every vocabulary carried must equal it and every token id must lie
            below it (without it, ids are checked against the message's own vocabulary, if any).
        limits: bounds enforced before allocating.
    Raises:
        ProtocolError: anything wrong with the frame, whatever it is.
    """
    tag, body = open_frame(data, limits, lambda t: _body_bound(t, limits))
    name = Tag(tag).name
    wire = decode_as(schema(limits).bodies[tag], body, name, limits)
    try:
        msg = _from_wire(wire, _Ctx(limits, vocab_size, DEFAULT_CONFIG, name))
        if isinstance(msg, DraftProposal):
            msg.q  # noqa: B018 - a proposal's q is checked now (only a frame's q waits for its reader)
        return msg
    except ProtocolError:
        raise
    except (ValueError, TypeError, RuntimeError, OverflowError, IndexError) as exc:
        # A bug-shaped failure in a dataclass or torch must still surface as a protocol error.
        raise ProtocolError(f"{name}: {type(exc).__name__}: {exc}") from None


def _body_bound(tag: int, limits: WireLimits) -> tuple[str, int]:
    bound = body_limit(tag, limits)  # raises first for an unknown tag
    return Tag(tag).name, bound


# ------------------------------------------------------------------ messages <-> Structs


def _to_wire(msg: Any, ctx: _Ctx) -> Any:
    """The Struct of ``msg``: each Struct field from the converter of that name, else as it is."""
    RULES[type(msg)](msg, ctx, encoding=True)
    s = schema(ctx.limits)
    if split_wire.split_tag(msg) is not None:  # split verification's shapes (DSSD)
        kind = s.bodies[split_wire.split_tag(msg)]
    elif isinstance(msg, DraftProposal):
        pending = deferred(msg, "q")
        dense = pending.dense if isinstance(pending, WireQ) else sparse.is_dense(msg.q)
        kind = s.bodies[Tag.PROPOSAL_DENSE if dense else Tag.PROPOSAL]
    else:
        kind = s.bodies[_TAG_OF[type(msg)]]
    return kind(**{name: _TO[name](msg, ctx) if name in _TO else getattr(msg, name)
                   for name in kind.__struct_fields__})


def _from_wire(wire: Any, ctx: _Ctx) -> Any:
    """The message of a decoded Struct: each dataclass field from the converter of that name."""
    cls = _MESSAGE_OF[type(wire).__name__]
    msg = cls(**{f.name: _FROM[f.name](wire, ctx) if f.name in _FROM else getattr(wire, f.name)
                 for f in fields(cls)})
    RULES[cls](msg, ctx, encoding=False)
    return msg


def _text_to(name: str) -> Callable[[Any, _Ctx], str]:
    return lambda msg, ctx: _text(getattr(msg, name), ctx.at(name), ctx.limits)


def _text_from(name: str) -> Callable[[Any, _Ctx], str]:
    return lambda wire, ctx: _text(getattr(wire, name), ctx.at(name), ctx.limits)


def _text(value: Any, label: str, limits: WireLimits) -> str:
    if type(value) is not str or len(value.encode("utf-8", "surrogatepass")) > limits.max_str_bytes:
        size = f" of {len(value.encode('utf-8', 'surrogatepass'))} bytes" if type(value) is str else ""
        raise ProtocolError(f"{label} must be a str of at most {limits.max_str_bytes} bytes, got "
                            f"{type(value).__name__}{size}")
    return value


def _q_vocab(msg: DraftProposal) -> int | None:
    return None if deferred(msg, "q") is not None else msg.q.vocab_size


def _q_to(msg: DraftProposal, ctx: _Ctx) -> msgspec.Raw:
    pending = deferred(msg, "q")
    if isinstance(pending, WireQ):  # as it came in, decoded or not
        return pending.raw
    q, cfg = msg.q, ctx.config
    if sparse.is_dense(q):
        check_drawable(dense_prob_of(q.probs, msg.candidates), msg.candidates, ctx.at("q"))
        return msgspec.Raw(encode_struct(memoryview(dense_to_wire(q, ctx.limits))))
    wire = sparse_to_wire(q, cfg.prob_dtype, INDEX_CODINGS[cfg.index_coding], ctx.limits,
                          schema(ctx.limits).sparse_q)
    received = sparse_from_wire(wire, ctx.at("q"), msg.num_candidates, None, ctx.limits)
    check_drawable(received.prob_of(msg.candidates), msg.candidates, ctx.at("q"))
    return msgspec.Raw(encode_struct(wire))


def _vocab_to(msg: DraftProposal, ctx: _Ctx) -> int:
    pending = deferred(msg, "q")
    return pending.vocab if isinstance(pending, WireQ) else msg.q.vocab_size


def _stage_proposal_to(msg: StageFrame, ctx: _Ctx) -> Any:
    return _to_wire(msg.proposal, _Ctx(ctx.limits, None, ctx.config, ctx.at("proposal")))


def _stage_proposal_from(wire: Any, ctx: _Ctx) -> DraftProposal:
    return _from_wire(wire.proposal, _Ctx(ctx.limits, ctx.vocab_size, ctx.config, ctx.at("proposal")))


def _hidden_to(msg: StageFrame, ctx: _Ctx) -> Any:
    code, shape, buf = tensor_to_wire(msg.hidden)
    return schema(ctx.limits).tensor(code, shape, memoryview(buf))


# Field name -> converter, message to Struct (_TO) and Struct to message (_FROM); every other field
# is the same value on both sides (its type and range checked by the schema).
_TO: dict[str, Callable[[Any, _Ctx], Any]] = {
    "session_id": _text_to("session_id"), "code": _text_to("code"), "text": _text_to("text"),
    "params": lambda m, c: schema(c.limits).params(**{f.name: getattr(m.params, f.name)
                                                      for f in fields(SamplingParams)}),
    "policy": lambda m, c: dict(sorted(m.policy.items())) if isinstance(m.policy, dict) else m.policy,
    "context": lambda m, c: ids_to_wire(m.context, c.at("context"), _q_vocab(m)),
    "candidates": lambda m, c: ids_to_wire(m.candidates.long(), c.at("candidates"), _q_vocab(m)),
    "tokens": lambda m, c: ids_to_wire(m.tokens, c.at("tokens")),
    "q": _q_to, "vocab_size": _vocab_to, "proposal": _stage_proposal_to, "hidden": _hidden_to,
    "q_x": split_wire.q_x_to_wire, "correction_p": split_wire.correction_to_wire,
    "rows": federated_wire.rows_to_wire, "kept": federated_wire.kept_to_wire,
}
_FROM: dict[str, Callable[[Any, _Ctx], Any]] = {
    "session_id": _text_from("session_id"), "code": _text_from("code"), "text": _text_from("text"),
    "params": lambda w, c: SamplingParams(**{f: getattr(w.params, f) for f in w.params.__struct_fields__}),
    "context": lambda w, c: ids_from_wire(w.context, c.at("context"), c.vocab_size).tolist(),
    "candidates": lambda w, c: ids_from_wire(w.candidates, c.at("candidates"), c.vocab_size),
    "tokens": lambda w, c: ids_from_wire(w.tokens, c.at("tokens"), c.vocab_size).tolist(),
    "q": lambda w, c: split_wire.q_from_split(w, c) if split_wire.is_split_wire(w) else WireQ(w, c),
    "q_x": split_wire.q_x_from_wire, "correction_p": split_wire.correction_from_wire,
    "proposal": _stage_proposal_from,
    "rows": federated_wire.rows_from_wire, "kept": federated_wire.kept_from_wire,
    "hidden": lambda w, c: tensor_from_wire(w.hidden, c.at("hidden"), c.limits, HIDDEN_DTYPES),
}
_TAG_OF = {OpenSession: Tag.OPEN_SESSION, StageFrame: Tag.STAGE_FRAME, VerifyResult: Tag.VERIFY_RESULT,
           ErrorMessage: Tag.ERROR, FederatedRows: Tag.FEDERATED_ROWS}


def _enc_hook(obj: Any) -> Any:
    """numpy and torch scalars (and small arrays) become the Python values msgpack carries."""
    if isinstance(obj, (np.generic, np.ndarray, torch.Tensor)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} cannot cross the wire")


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
