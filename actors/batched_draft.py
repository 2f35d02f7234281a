"""A draft worker whose concurrent sessions draft together: one forward (and one LM head) per step
for every session drafting at that moment.

Sessions draft depth by depth, each in its own thread (the engine's session threads in process, the
draft actor's executor threads on Ray). Every depth's forward goes through a
:class:`~specmesh.runtime.batching.MicroBatcher`: while one forward runs, the next depths of other
sessions gather, and run as one batched forward (``actors/batched.py``) followed by one LM head over
their last rows. Drafting stays a pure function of each session's context, seed and position up to
float rounding, so overlap and speculation keep their guarantees.

Every weight format computes each row on its own (``actors/lowbit.py``: int8 activations are
quantised per row), so a session's q does not depend on its neighbours' values (up to float rounding
of the padded attention).
"""
from __future__ import annotations

import torch

from specmesh.runtime.batching import MicroBatcher

from . import batched, hf
from .draft import DraftWorker, _DraftSession


class BatchedDraftWorker(DraftWorker):
    """A :class:`DraftWorker` that batches the forwards of concurrently drafting sessions.

    Args:
        model: the loaded draft.
        threads: torch intra-op threads (None leaves the process default).
        max_batch: most sessions per forward.
    """

    def __init__(self, model: hf.StageModel, threads: int | None = None, max_batch: int = 16) -> None:
        super().__init__(model, threads)
        self.batcher = MicroBatcher(self._logits_many, max_batch)

    def _feed(self, s: _DraftSession, context: list[int], start: int, stop: int) -> torch.Tensor:
        """As :meth:`DraftWorker._feed`, with the
        forward shared with other sessions drafting at the same moment."""
        ids = torch.tensor(context[start:stop], dtype=torch.int64)
        logits = self.batcher.submit(batched.Fed(s.cache, torch.arange(start, stop), input_ids=ids), id(s))
        s.cached.extend(context[start:stop])
        return logits

    def close(self, session_id: str) -> dict[str, int]:
        """As :meth:`DraftWorker.close`; the batcher stops waiting for the session's forwards."""
        s = self.sessions.get(session_id)
        if s is not None:
            self.batcher.forget(id(s))
        return super().close(session_id)

    def _logits_many(self, fed: list[batched.Fed]) -> list[torch.Tensor]:
        """One forward over every session's fed tokens, one LM head over their last rows -> per
        session the logits ``[V]`` after its last fed token."""
        hiddens = batched.forward_grouped(self.model, fed)
        logits = hf.lm_head(self.model, torch.stack([h[-1] for h in hiddens]))  # [B, V]
        return list(logits.unbind(0))

    def batch_stats(self) -> dict[int, int]:
        """How many draft forwards ran of each batch size (``{sessions: count}``)."""
        return self.batcher.stats()


def make_draft_worker(model: hf.StageModel, threads: int | None = None, batch_sessions: int = 1) -> DraftWorker:
    """The draft worker for ``model``: batched when ``batch_sessions > 1``, else the plain
    :class:`DraftWorker`."""
    if batch_sessions > 1:
        return BatchedDraftWorker(model, threads, batch_sessions)
    return DraftWorker(model, threads)
