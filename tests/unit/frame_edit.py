"""Hand-edited codec frames for the strict-decoding tests: a frame's msgpack body, changed in place,
packed again (uncompressed) under the protocol version."""
from __future__ import annotations

import msgpack

from specmesh.runtime import codec


def body_of(data: bytes) -> list:
    """The msgpack body of an uncompressed frame."""
    return msgpack.unpackb(data[2:], strict_map_key=False)


def frame(body: list) -> bytes:
    """``body`` as an uncompressed frame of the current protocol version."""
    return bytes([codec.PROTOCOL_VERSION, 0]) + msgpack.packb(body, use_bin_type=True)


def edited(data: bytes, change) -> bytes:
    """The frame ``data`` with ``change(body)`` applied to its body."""
    body = body_of(data)
    change(body)
    return frame(body)


def set_at(path: tuple, value):
    """A change that sets the field at ``path`` (indices into nested lists) to ``value``."""
    def change(body):
        target = body
        for i in path[:-1]:
            target = target[i]
        target[path[-1]] = value
    return change
