"""Token trees: several candidate branches per round, verified in one target forward (DSD, TSLT).

Pure tensor math, no model. A round's candidates form a tree over the last context token: candidate
``i`` has a token and a parent (an earlier candidate, or ``-1`` for the root, the last context token).
A chain is the tree ``parents = [-1, 0, 1, ...]`` and everything here then reduces to the chain case
of :mod:`specmesh.runtime.verify`, draw for draw.

Target side: the stage feeds ``context + candidates`` in one forward with
:func:`tree_attention_mask` and :func:`tree_position_ids`; ``target_probs`` for verification are the
last ``1 + g`` output rows (row 0 after the last context token, row ``1 + i`` after candidate ``i``);
after the verdict it keeps :func:`accepted_slots` of its KV cache.

Exact verification is SpecInfer-style recursive rejection over siblings (Miao et al. 2024; TSLT's
multi-candidate extension). Contract with the draft, which makes it lossless: the children of a node
appear in the candidate list in the order they were drawn, and row ``i`` of the shipped ``draft_q`` is
exactly the distribution candidate ``i`` was drawn from *given its earlier siblings*. Two ways to obey
it, both produced by :func:`sample_siblings`:

- i.i.d. (``replacement=True``): every sibling is drawn from the same truncated q and ships it;
  duplicate tokens are allowed and must stay separate candidates (a duplicate of a rejected sibling is
  always rejected, but its rejection still updates the residual).
- without replacement (``replacement=False``, recommended: no candidate budget is spent on
  duplicates): sibling ``j`` is drawn from q with siblings ``0..j-1`` zeroed and renormalised, and that
  row is what it ships. De-duplicating i.i.d. draws is this scheme too, so it must ship these rows;
  shipping the shared q with distinct siblings, or taking the deterministic top-c of q, is biased.

The draft may choose how many siblings to draw from its own earlier draws (a token budget, stopping
when q's support is used up); it must not look at p.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .sampling import sample, uniform
from .sparse import SparseDist, normalised
from .verify import Verdict, residual

ROOT = -1  # parent index of a candidate attached to the last context token


@dataclass(frozen=True)
class TokenTree:
    """The candidates of one round.

    Attributes:
        tokens: candidate token ids, ``int64`` ``[g]``.
        parents: parent of each candidate, an earlier index or ``ROOT`` (-1); i.e. topological order.
    """

    tokens: torch.Tensor  # [g] int64
    parents: list[int]
    _children: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tokens.dim() != 1 or self.tokens.dtype != torch.int64:
            raise TypeError(
                "tokens must be a 1-D int64 tensor, "
                f"got {self.tokens.dtype} {tuple(self.tokens.shape)}"
            )
        object.__setattr__(self, "parents", list(self.parents))  # a copy the caller cannot mutate
        if len(self.parents) != self.tokens.numel():
            raise ValueError(f"{len(self.parents)} parents for {self.tokens.numel()} tokens")
        kids: list[list[int]] = [[] for _ in range(len(self.parents) + 1)]  # slot 0 = root
        for i, parent in enumerate(self.parents):
            if not ROOT <= parent < i:
                raise ValueError(
                    f"parent of candidate {i} is {parent}; must be in [-1, {i - 1}] "
                    "(parents precede their children)"
                )
            kids[parent + 1].append(i)
        object.__setattr__(self, "_children", tuple(tuple(k) for k in kids))

    @staticmethod
    def chain(tokens: torch.Tensor) -> "TokenTree":
        """The chain ``tokens[0] -> tokens[1] -> ...`` (``[gamma]`` int64)."""
        return TokenTree(tokens, list(range(ROOT, tokens.numel() - 1)))

    @property
    def num_candidates(self) -> int:
        return len(self.parents)

    @property
    def is_chain(self) -> bool:
        """True when every candidate hangs from the one before it."""
        return self.parents == list(range(ROOT, len(self.parents) - 1))

    @property
    def depths(self) -> list[int]:
        """Number of candidate ancestors of each candidate (0 for children of the root)."""
        return _depths(self.parents)

    def children(self, i: int) -> list[int]:
        """Children of candidate ``i`` (``ROOT`` for the root) in draw order."""
        if not ROOT <= i < self.num_candidates:
            raise ValueError(f"node {i} not in [-1, {self.num_candidates - 1}]")
        return list(self._children[i + 1])

    def path_to(self, i: int) -> list[int]:
        """Candidate indices from the root's child down to ``i`` inclusive (empty for ``ROOT``)."""
        path = []
        while i != ROOT:
            path.append(i)
            i = self.parents[i]
        return path[::-1]


@dataclass(frozen=True)
class TreeVerdict(Verdict):
    """A :class:`Verdict` over a tree (for a chain, identical to the chain's verdict plus ``path``).

    Attributes (beyond :class:`Verdict`):
        path: accepted candidate indices, root's child first; ``accepted == len(path)`` and
            ``tokens[:-1]`` are their tokens.
        accepted_mask: per *candidate* (length g), True iff it is on ``path``; for a chain this is the
            chain's per-position mask.
    """

    path: list[int] = field(default_factory=list)


def _depths(parents: Sequence[int]) -> list[int]:
    depths: list[int] = []
    for parent in parents:
        depths.append(0 if parent == ROOT else depths[parent] + 1)
    return depths


def _ancestry(parents: Sequence[int]) -> torch.Tensor:
    """``[g, g]`` bool: ``[i, j]`` is True iff ``j`` is ``i`` or one of its ancestors."""
    g = len(parents)
    anc = torch.eye(g, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent != ROOT:
            anc[i] |= anc[parent]  # parents precede children, so anc[parent] is complete
    return anc


def tree_attention_mask(
    parents: Sequence[int], *, num_cached: int, num_context: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Additive attention mask for feeding ``context + candidates`` after a cached prefix.

    Key order is ``[cached | context | candidates]``, query order ``[context | candidates]``. Context
    tokens are a causal chain after the cache; candidate ``i`` sees the cache, all the context, its
    ancestors and itself. A chain gives exactly the causal mask.

    Args:
        parents: the tree's parents (``TokenTree.parents``), ``g`` entries.
        num_cached: positions already in the KV cache.
        num_context: committed tokens fed before the candidates.
        dtype: mask dtype (the model's); hidden cells hold ``finfo(dtype).min``.
    Returns:
        ``[1, 1, num_context + g, num_cached + num_context + g]``, 0 where visible.
    """
    if num_cached < 0 or num_context < 0:
        raise ValueError(f"num_cached ({num_cached}) and num_context ({num_context}) must be >= 0")
    g = len(parents)
    n_new = num_context + g
    visible = torch.zeros(n_new, num_cached + n_new, dtype=torch.bool)  # [n_new, total]
    visible[:, :num_cached] = True
    visible[:, num_cached : num_cached + num_context] = torch.ones(
        n_new, num_context, dtype=torch.bool
    ).tril()  # context rows: causal; candidate rows: all ones
    visible[num_context:, num_cached + num_context :] = _ancestry(parents)
    mask = torch.full(visible.shape, torch.finfo(dtype).min, dtype=dtype)
    return mask.masked_fill_(visible, 0.0)[None, None]


def tree_position_ids(
    parents: Sequence[int], *, num_cached: int, num_context: int
) -> torch.Tensor:
    """Positions of ``context + candidates``: context continues the cache, candidate ``i`` sits at
    ``num_cached + num_context + depth(i)``.

    Returns:
        ``[1, num_context + g]`` int64.
    """
    base = num_cached + num_context
    context = torch.arange(num_cached, base, dtype=torch.int64)  # [num_context]
    cands = base + torch.tensor(_depths(parents), dtype=torch.int64)  # [g]
    return torch.cat([context, cands])[None]


def accepted_slots(path: Sequence[int], *, num_cached: int, num_context: int) -> torch.Tensor:
    """KV-cache slots to keep after a verdict: the prefix, the context, then the accepted path.

    Slots count in feed order (``[cached | context | candidates]``); gathering them compacts the
    cache to the committed sequence minus the correction/bonus token (fed as next round's context).

    Returns:
        ``[num_cached + num_context + len(path)]`` int64.
    """
    prefix = torch.arange(num_cached + num_context, dtype=torch.int64)
    return torch.cat([prefix, num_cached + num_context + torch.tensor(path, dtype=torch.int64)])


def sample_siblings(
    q: SparseDist, num: int, generator: torch.Generator, replacement: bool = False,
    quantise: Callable[[SparseDist], SparseDist] | None = None,
) -> tuple[torch.Tensor, SparseDist]:
    """Draws the siblings of one node the way :func:`verify_tree_exact` needs: the draft worker's
    sampler (the one function the draft ships and the statistical tests prove).

    Args:
        q: 1 row, the (truncated) draft distribution at the node.
        num: siblings wanted; without replacement at most the size of q's support are drawn.
        generator: the draft's randomness.
        replacement: i.i.d. draws (duplicates possible) instead of draws without replacement.
        quantise: maps a row to exactly what the verifier will decode (the wire's fp16 rounding);
            each sibling is drawn from the quantised row it ships, so sampling and verification see
            the same numbers. None: rows ship as they are.
    Returns:
        ``tokens`` ``[c]`` int64 in draw order, and ``c`` rows: the distribution each was drawn from
        (ship these as the candidates' q).
    """
    if q.num_positions != 1 or num < 1:
        raise ValueError(f"need 1 row of q and num >= 1, got {q.num_positions} rows, num={num}")
    row = quantise(q) if quantise is not None else q
    if replacement:
        picks = torch.multinomial(row.probs.float(), num, replacement=True, generator=generator)[0]
        rows = SparseDist(
            row.indices.expand(num, -1).contiguous(), row.probs.float().expand(num, -1).contiguous(),
            q.vocab_size,
        )
        return row.indices[0, picks], rows
    tokens: list[int] = []
    rows: list[SparseDist] = []
    for _ in range(num):
        probs = row.probs.float()  # [1, k]
        rows.append(SparseDist(row.indices, probs, q.vocab_size))
        pick = int(sample(probs, generator)[0])
        tokens.append(int(row.indices[0, pick]))
        rest = probs.clone()
        rest[0, pick] = 0.0  # a zeroed entry is padding: q(x) = 0
        total = float(rest.sum())
        if total <= 0:
            break  # q's support is used up
        row = SparseDist(row.indices, rest / total, q.vocab_size)
        if quantise is not None:
            row = quantise(row)
    return torch.tensor(tokens, dtype=torch.int64), SparseDist.concat(rows)


def verify_tree_greedy(tree: TokenTree, target_probs: torch.Tensor) -> TreeVerdict:
    """Temperature 0: the longest root path whose every token is the target's argmax.

    At each node take the first child (in draw order) whose token is the argmax of p there; stop
    when none is; commit the path and the argmax at the last node.

    Args:
        tree: the round's candidates (``g``).
        target_probs: ``[1 + g, V]``; row 0 = p after the last context token, row ``1 + i`` = p after
            candidate ``i`` (logits work too: only the argmax matters).
    """
    _check_rows(tree, target_probs)
    argmax = target_probs.argmax(dim=-1).tolist()  # [1 + g]
    tokens = tree.tokens.tolist()
    path: list[int] = []
    node = ROOT
    while True:
        match = [c for c in tree.children(node) if tokens[c] == argmax[node + 1]]
        if not match:
            return _verdict(tree, path, argmax[node + 1])
        node = match[0]
        path.append(node)


def verify_tree_exact(
    tree: TokenTree,
    draft_q: SparseDist,
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> TreeVerdict:
    """Multi-candidate recursive rejection sampling: the committed tokens are distributed exactly as p.

    At a node with residual ``r`` (p there, at first), test its children ``j`` in draw order: accept
    ``x_j`` with probability ``min(1, r(x_j) / q_j(x_j))`` and descend; on rejection set
    ``r <- norm(max(r - q_j, 0))``. If every child is rejected sample the correction from ``r``; at a
    leaf reached by acceptance sample the bonus from p there. Exact when ``x_j ~ q_j`` given earlier
    siblings (module docstring): each test commits ``min(r, q_j)`` and passes on the rest as the next
    residual, ``min(r, q_j) + (1 - sum min(r, q_j)) * norm(max(r - q_j, 0)) == r``, and by induction
    over siblings and depth the output is p. Draws ``g`` uniforms (one per candidate, each tested at
    most once) then one token, so a chain repeats :func:`verify_exact` draw for draw.

    Args:
        tree: the round's candidates (``g``).
        draft_q: ``g`` rows, row ``i`` the sparse distribution candidate ``i`` was drawn from.
        target_probs: ``[1 + g, V]``, ordered as in :func:`verify_tree_greedy`.
        generator: source of the acceptance uniforms and the correction/bonus draw (CPU, like
            every tensor here: move the ``1 + g`` rows of p off the accelerator first).
    """
    _check_rows(tree, target_probs)
    g = tree.num_candidates
    if draft_q.num_positions != g or draft_q.vocab_size != target_probs.shape[1]:
        raise ValueError(
            f"draft_q has {draft_q.num_positions} rows over {draft_q.vocab_size} tokens; "
            f"want {g} rows over {target_probs.shape[1]}"
        )
    draft_q = normalised(draft_q)  # rows that crossed the wire sum to 1 only up to rounding
    q_x = draft_q.prob_of(tree.tokens)  # [g]
    u_q = (uniform(g, generator) * q_x).tolist()  # u * q(x) < r(x)  <=>  u < r(x) / q(x)
    tokens = tree.tokens.tolist()
    path: list[int] = []
    node = ROOT
    while True:
        r = target_probs[node + 1 : node + 2].float()  # [1, V]
        kids = tree.children(node)
        for child in kids:
            if u_q[child] < float(r[0, tokens[child]]):
                break
            r = residual(r, draft_q.row(child).to_dense())
        else:  # every child rejected (or a leaf): correction / bonus from r
            return _verdict(tree, path, int(sample(r, generator)[0]))
        node = child
        path.append(node)


def _check_rows(tree: TokenTree, target_probs: torch.Tensor) -> None:
    if target_probs.dim() != 2 or target_probs.shape[0] != tree.num_candidates + 1:
        raise ValueError(
            f"target_probs {tuple(target_probs.shape)} must be [1 + g, V] with g = "
            f"{tree.num_candidates}"
        )


def _verdict(tree: TokenTree, path: list[int], last: int) -> TreeVerdict:
    on_path = set(path)
    mask = [i in on_path for i in range(tree.num_candidates)]
    tokens = tree.tokens[path].tolist() + [last]
    return TreeVerdict(len(path), tokens, mask, path)
