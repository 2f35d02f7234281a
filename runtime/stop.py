"""When a generation ends: length, end-of-sequence tokens, stop strings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# Extra tokens decoded beyond a stop string's length when looking for it: a token decodes to at least
# one character (byte-level BPE pieces of one multi-byte character aside), so the last len(s) + 2
# tokens hold any occurrence of s that the newest token completes.
_STOP_WINDOW_SLACK = 2


@dataclass(frozen=True)
class StopRule:
    """When a generation ends.

    Attributes:
        max_new_tokens: at most this many generated tokens.
        eos_token_ids: generation ends after any of these (the token is kept).
        stop_strings: generation ends after the token that completes any of these.
        decode: token ids -> text; required when ``stop_strings`` is non-empty.
    """

    max_new_tokens: int
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.stop_strings and self.decode is None:
            raise ValueError("stop strings need a tokenizer to decode with; this model has none")

    @property
    def _window(self) -> int:
        return max(len(s) for s in self.stop_strings) + _STOP_WINDOW_SLACK

    def cut(self, generated: list[int], new: list[int]) -> tuple[list[int], str | None]:
        """Returns the part of ``new`` to keep and the finish reason if generation ends."""
        for i, tok in enumerate(new):
            if tok in self.eos_token_ids:
                return new[: i + 1], "eos"
            if self.stop_strings:
                upto = generated + new[: i + 1]
                text = self.decode(upto[-self._window:])
                if any(s in text for s in self.stop_strings):
                    return new[: i + 1], "stop"
            if len(generated) + i + 1 >= self.max_new_tokens:
                return new[: i + 1], "length"
        return new, None
