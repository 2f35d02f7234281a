"""Streamed text of a generation: token ids in, text deltas out, stop strings cut as OpenAI does.

The engine ends a generation on the token that completes a stop string and keeps that token; the
OpenAI API returns the text *before* the stop string. While streaming, the last characters that could
still turn out to be the start of a stop string, and a trailing incomplete UTF-8 character (decoded as
U+FFFD), are held back until the next round or the end.
"""
from __future__ import annotations

from typing import Callable, Sequence

_INCOMPLETE = "\ufffd"


class IncrementalText:
    """Turns the growing list of generated token ids into text deltas.

    Args:
        decode: token ids -> text, or None for a model without a tokenizer (every delta is "").
        stop: stop strings, removed from the output with everything after them.
    """

    def __init__(self, decode: Callable[[list[int]], str] | None, stop: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._sent = 0  # characters already returned

    def push(self, output_ids: list[int]) -> str:
        """The new text that is safe to send after a round (``output_ids``: every generated id)."""
        if self.decode is None:
            return ""
        text = self.decode(list(output_ids))
        safe = len(text) - self._hold
        cut = self._stop_at(text)
        if cut is not None:
            safe = min(safe, cut)
        while safe > self._sent and text[safe - 1] == _INCOMPLETE:
            safe -= 1
        return self._take(text, safe)

    def finish(self, output_ids: list[int]) -> str:
        """The rest of the text once the generation has ended."""
        if self.decode is None:
            return ""
        text = self.decode(list(output_ids))
        cut = self._stop_at(text)
        return self._take(text, len(text) if cut is None else cut)

    def full(self, output_ids: list[int]) -> str:
        """The whole output text at once (non-streaming responses)."""
        return self.finish(output_ids)

    def _stop_at(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _take(self, text: str, upto: int) -> str:
        if upto <= self._sent:
            return ""
        delta, self._sent = text[self._sent:upto], upto
        return delta
