"""The wire schema: every message body declared once, as typed msgspec Structs.

A body is a msgpack array ``[tag, field, field, ...]``: each message is a Struct with
``array_like=True`` and an integer tag, fields positional, no maps but the session's policy map.
Decoding is typed (msgspec), so a wrong type fails at its first byte, before anything is built, and
every array, map and buffer is bounded by what the message can legitimately hold (``Meta``); the
same types bound each body's size (:func:`body_limit`). The Structs are built once per
:class:`WireLimits` (they hold its bounds) and cached.

Tags and fields (``ids`` = token ids as a uint32 buffer)::

    1 OPEN_SESSION   session_id, [temperature, top_k, top_p, seed], policy {name: bool|int|float|str}
    2 PROPOSAL       session_id, round, rollback, context ids, candidate ids, parents, prev_path, q
    3 PROPOSAL_DENSE session_id, round, rollback, context ids, candidate ids, parents, prev_path,
                     vocab_size, q as a float32 buffer [g, vocab_size]   (the papers' dense baseline)
    4 STAGE_FRAME    proposal (tag 2 or 3, nested), hidden tensor (model dtype), stage_ms
    5 VERIFY_RESULT  session_id, round, accepted, token ids, accepted_mask, path, stage_ms
    8 ERROR          session_id, round, code, text
    9 PROPOSAL_SPLIT as 2 up to prev_path, then vocab_size, q_x as a float32 buffer [g] (the
                     scalar q_i(x_i) of each candidate: split verification, DSSD), draft_ms
   10 VERIFY_SPLIT   as 5, then correction_p: a one-row sparse q of float32 probabilities (the
                     support of p_j at the first rejection; tokens = the accepted ones only)
   11 FEDERATED_ROWS session_id, round, rows (sparse q, float32: a federated worker's top-K of p),
                     kept (float32 buffer [n]: p's mass on the sent entries), stage_ms (SpecFed)

Tags 6 and 7 (split payload, commit) are retired: no worker sent them. A sparse q is
``[vocab_size, width, row_lengths, prob dtype code, index coding, indices, probs]`` (see
:mod:`specmesh.runtime.sparse_wire`); a tensor is ``[dtype code, shape, buffer]``.
"""
import functools
import re
import sys
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta, Raw, Struct

from .framing import ProtocolError, WireLimits

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# The session's policy map (policy names are validated by the workers' registries, not here).
MAX_POLICY_ENTRIES = 64
MAX_POLICY_KEY_CHARS = 64
POLICY_KEY_PATTERN = r"^[a-z][a-z0-9_]{0,63}\Z"
MAX_POLICY_STR_CHARS = 256
_UTF8_MAX = 4  # bytes per character, at most
_HEADER_MAX = 5  # bytes of a msgpack array/str/bin header, at most (type byte + 32-bit length)
_SCALAR_MAX = 9  # bytes of a msgpack int or float, at most
_FLOAT_MAX = sys.float_info.max  # ge/le by it: finite (NaN fails every comparison)


class Tag(IntEnum):
    """Message type tags (first element of every body)."""

    OPEN_SESSION = 1
    PROPOSAL = 2
    PROPOSAL_DENSE = 3
    STAGE_FRAME = 4
    VERIFY_RESULT = 5
    ERROR = 8
    PROPOSAL_SPLIT = 9
    VERIFY_SPLIT = 10
    FEDERATED_ROWS = 11


@dataclass(frozen=True)
class Schema:
    """The Structs of one :class:`WireLimits`: ``bodies[tag]`` and the ones nested in them."""

    bodies: dict[int, type]
    params: type
    sparse_q: type
    dense_q: Any  # the type a dense proposal's q buffer decodes as
    tensor: type
    raw_holds: dict[tuple[type, str], Any]  # (Struct, field) of a Raw field -> what it holds


@functools.lru_cache(maxsize=8)
def schema(limits: WireLimits) -> Schema:
    """The Structs that bound every field by ``limits`` (built once per limits)."""
    count = Annotated[int, Meta(ge=0, le=INT64_MAX)]
    byte = Annotated[int, Meta(ge=0, le=255)]
    vocab = Annotated[int, Meta(ge=1, le=limits.max_vocab_size)]
    non_negative = Annotated[float, Meta(ge=0.0, le=_FLOAT_MAX)]

    def items(item: Any) -> Any:
        return Annotated[list[item], Meta(max_length=limits.max_list_len)]

    def ids(n: int) -> Any:  # n token ids as uint32
        return Annotated[memoryview, Meta(max_length=4 * n)]

    class Body(Struct, array_like=True, forbid_unknown_fields=True):
        pass

    class Params(Body):
        temperature: non_negative
        top_k: count
        top_p: Annotated[float, Meta(gt=0.0, le=1.0)]
        seed: int  # any msgpack int: [-2**63, 2**64 - 1]

    policy_value = Union[bool, int, Annotated[float, Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)],
                         Annotated[str, Meta(max_length=MAX_POLICY_STR_CHARS)]]
    policy_key = Annotated[str, Meta(pattern=POLICY_KEY_PATTERN, max_length=MAX_POLICY_KEY_CHARS)]

    class OpenSession(Body, tag=int(Tag.OPEN_SESSION)):
        session_id: str
        params: Params
        policy: Annotated[dict[policy_key, policy_value], Meta(max_length=MAX_POLICY_ENTRIES)]

    class SparseQ(Body):
        vocab_size: vocab
        width: Annotated[int, Meta(ge=0, le=limits.max_vocab_size)]
        row_lengths: items(Annotated[int, Meta(ge=1, le=limits.max_vocab_size)])
        prob_dtype: byte
        index_coding: byte
        indices: Annotated[memoryview, Meta(max_length=4 * limits.max_sparse_cells)]
        probs: Annotated[memoryview, Meta(max_length=4 * limits.max_sparse_cells)]

    dense_q = Annotated[memoryview, Meta(max_length=4 * limits.max_dense_cells)]

    class ProposalHead(Body):
        session_id: str
        round: count
        rollback: count
        context: ids(limits.max_tokens)
        candidates: ids(limits.max_list_len)
        parents: items(Annotated[int, Meta(ge=-1, le=INT64_MAX)])
        prev_path: items(count)

    class Proposal(ProposalHead, tag=int(Tag.PROPOSAL)):
        q: Raw  # a SparseQ, decoded when first read: a middle stage passes it on as it came
        draft_ms: non_negative

    class DenseProposal(ProposalHead, tag=int(Tag.PROPOSAL_DENSE)):
        vocab_size: vocab
        q: Raw  # a dense_q, decoded when first read
        draft_ms: non_negative

    class SplitProposal(ProposalHead, tag=int(Tag.PROPOSAL_SPLIT)):
        vocab_size: vocab
        q_x: Annotated[memoryview, Meta(max_length=4 * limits.max_list_len)]  # float32 [g]
        draft_ms: non_negative

    class Tensor(Body):
        dtype: byte
        shape: Annotated[list[Annotated[int, Meta(ge=0, le=limits.max_decompressed_bytes)]],
                         Meta(max_length=limits.max_tensor_dims)]
        buffer: Annotated[memoryview, Meta(max_length=limits.max_decompressed_bytes)]

    class StageFrame(Body, tag=int(Tag.STAGE_FRAME)):
        proposal: Union[Proposal, DenseProposal, SplitProposal]
        hidden: Tensor
        stage_ms: items(non_negative)

    class VerifyResult(Body, tag=int(Tag.VERIFY_RESULT)):
        session_id: str
        round: count
        accepted: Annotated[int, Meta(ge=0, le=limits.max_list_len)]
        tokens: ids(limits.max_list_len + 1)
        accepted_mask: items(bool)
        path: items(count)
        stage_ms: items(non_negative)
        draft_ms: non_negative

    class SplitVerifyResult(VerifyResult, tag=int(Tag.VERIFY_SPLIT)):
        correction_p: SparseQ  # one row, float32

    class FederatedRows(Body, tag=int(Tag.FEDERATED_ROWS)):
        session_id: str
        round: count
        rows: SparseQ  # float32 probabilities
        kept: Annotated[memoryview, Meta(max_length=4 * limits.max_list_len)]  # float32 [n]
        stage_ms: items(non_negative)

    class Error(Body, tag=int(Tag.ERROR)):
        session_id: str
        round: Annotated[int, Meta(ge=INT64_MIN, le=INT64_MAX)]  # signed: it may not know its round
        code: str
        text: str

    bodies = {int(cls.__struct_config__.tag): cls for cls in
              (OpenSession, Proposal, DenseProposal, StageFrame, VerifyResult, Error, SplitProposal,
               SplitVerifyResult, FederatedRows)}
    return Schema(bodies, Params, SparseQ, dense_q, Tensor,
                  {(Proposal, "q"): SparseQ, (DenseProposal, "q"): dense_q})


@functools.lru_cache(maxsize=64)
def decoder(kind: Any) -> msgspec.msgpack.Decoder:
    """One typed decoder per Struct (decoders are reusable and thread-safe)."""
    return msgspec.msgpack.Decoder(kind)


_encoder = msgspec.msgpack.Encoder()


def encode_struct(value: Any) -> bytes:
    """msgpack bytes of a Struct (or any plain value), positional, as the schema lays it out."""
    return _encoder.encode(value)


def decode_as(kind: Any, data: bytes | memoryview, label: str, limits: WireLimits) -> Any:
    """Typed, bounded decode of ``data`` as ``kind``.

    Raises:
        ProtocolError: naming the field (``label`` and the path inside ``kind``) that was wrong.
    """
    try:
        return decoder(kind).decode(data)
    except msgspec.ValidationError as exc:
        text = str(exc)
        where = re.search(r"`(\$[^`]*)`", text)
        message = text.split(" - at ")[0]
        if where is None:
            raise ProtocolError(f"{label}: {message}") from None
        key = " key" if text.split(" - at ")[-1].startswith("`key`") else ""
        raise ProtocolError(f"{label}{field_path(kind, where.group(1), limits)}{key}: {message}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ProtocolError(f"{label}: malformed msgpack: {exc}") from None


def field_path(kind: Any, path: str, limits: WireLimits) -> str:
    """msgspec's ``$[7][0]`` under ``kind`` -> ``.parents[0]`` (Struct positions become names)."""
    node = msgspec.inspect.type_info(kind)
    out = []
    for index in re.findall(r"\[(\d+|\.\.\.)\]", path):
        if isinstance(node, msgspec.inspect.StructType) and index.isdigit():
            at = int(index) - (node.tag is not None)
            if at < 0:
                out.append(".tag")
                break
            field = node.fields[at]
            out.append(f".{field.name}")
            node = field.type
        elif isinstance(node, msgspec.inspect.UnionType) and index.isdigit():
            names = {s.fields[int(index) - 1].name for s in node.types if len(s.fields) >= int(index)}
            out.append(f".{names.pop()}" if len(names) == 1 else f"[{index}]")
            fields = [f for s in node.types for f in s.fields if f.name == out[-1][1:]]
            node = fields[0].type if fields else None
        else:
            out.append(f"[{index}]")
            node = getattr(node, "item_type", getattr(node, "value_type", None))
    return "".join(out)


def body_limit(tag: int, limits: WireLimits) -> int:
    """The most bytes a body of ``tag`` can hold, from its types (never above the global limit).

    Raises:
        ProtocolError: ``tag`` is not a message tag.
    """
    s = schema(limits)
    if tag not in s.bodies:
        raise ProtocolError(f"unknown message tag {tag!r}")
    return min(_max_bytes(msgspec.inspect.type_info(s.bodies[tag]), s, limits, None),
               limits.max_decompressed_bytes)


def _max_bytes(node: Any, s: Schema, limits: WireLimits, owner: Any) -> int:
    """Upper bound of the msgpack size of a value of the inspected type ``node``."""
    i = msgspec.inspect
    if isinstance(node, i.StructType):
        return _HEADER_MAX + _SCALAR_MAX + sum(
            _max_bytes(f.type, s, limits, (node.cls, f.name)) for f in node.fields)
    if isinstance(node, i.RawType):
        return _max_bytes(msgspec.inspect.type_info(s.raw_holds[owner]), s, limits, None)
    if isinstance(node, i.UnionType):
        return max(_max_bytes(t, s, limits, owner) for t in node.types)
    if isinstance(node, (i.ListType, i.DictType)):
        entry = _max_bytes(getattr(node, "item_type", None) or node.value_type, s, limits, None)
        if isinstance(node, i.DictType):
            entry += _max_bytes(node.key_type, s, limits, None)
        return _HEADER_MAX + node.max_length * entry
    if isinstance(node, (i.BytesType, i.MemoryViewType)):
        return _HEADER_MAX + node.max_length
    if isinstance(node, i.StrType):  # unbounded strings are held to max_str_bytes by the codec
        chars = node.max_length
        return _HEADER_MAX + (limits.max_str_bytes if chars is None else _UTF8_MAX * chars)
    return _SCALAR_MAX  # int, float, bool
