"""The form of every topology error: ``key path = value: what is accepted``.

Nested tables prefix their key with :func:`at`, so an error raised for ``role`` inside the second
``[[nodes]]`` table reads ``nodes[1].role = 'gpu': must be one of ...``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


def fail(key: str, value: Any, accepted: str) -> ValueError:
    """The ValueError for ``key = value``, saying what is ``accepted`` (raise it)."""
    return ValueError(f"{key} = {value!r}: {accepted}")


@contextmanager
def at(prefix: str) -> Iterator[None]:
    """Prefix the key path of a nested error with ``prefix`` (``nodes[1]`` + ``.role = ...``)."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{prefix}.{exc}") from None
