"""Every policy, registered: the one module to ask for an acceptance rule or a draft length
by name.

The registries live beside their interfaces (``acceptance``, ``draft_length``, ``sparsify``); the
policies in other modules register themselves on import. This module imports them all, so a name in a
config or a message always resolves, and no policy module imports another in a circle.
"""
from __future__ import annotations

from typing import Sequence

from . import lossy, online_length, tkslt  # noqa: F401  (they register their names on import)
from .acceptance import ACCEPTANCE, AcceptanceRule, PolicyMap
from .draft_length import make as make_draft_length  # noqa: F401  (the one place to ask)


def make_rule(policy: PolicyMap, vocab: Sequence[str] | None = None) -> AcceptanceRule:
    """The acceptance rule named by ``policy["acceptance"]`` (default ``exact``), built from the
    policy map (its knobs) and, for rules with a lexicon, the vocabulary's token strings."""
    name = policy.get("acceptance", "exact")
    if not isinstance(name, str):
        raise ValueError(f"acceptance = {name!r}: must be a policy name")
    return ACCEPTANCE.get(name)(policy, vocab)


def is_lossless(name: str) -> bool:
    """Whether the acceptance policy ``name`` keeps the target's output distribution exactly."""
    return bool(ACCEPTANCE.get(name)({}, None).lossless)
