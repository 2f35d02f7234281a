"""Statistical checks shared by the tests that drive shipped workers (on the path through
``pythonpath`` in pyproject.toml)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from scipy.stats import chi2, kstest

from specmesh.actors import hf
from specmesh.actors.stage import TargetStage


def target_p(stage: TargetStage, prefix: list[int], memo: dict, temperature: float) -> torch.Tensor:
    """The target's next-token distribution after ``prefix`` ``[V]`` at ``temperature``."""
    key = tuple(prefix)
    if key not in memo:
        m = stage.model
        hidden = hf.forward(m, m.new_cache(), input_ids=torch.tensor(prefix), position_ids=torch.arange(len(prefix)))
        memo[key] = torch.softmax(hf.lm_head(m, hidden[-1:])[0].double() / temperature, -1)
    return memo[key]


def follows(rounds: Sequence[Sequence[int]], p_of: Callable[[list[int]], torch.Tensor], prompt: list[int],
             pit: bool = True) -> tuple[float, float]:
    """p-values that each round's committed tokens (after ``prompt``) follow ``p_of(prefix)``: a
    chi-square on the first token (cells expected below 5 pooled) and a Kolmogorov-Smirnov test of
    the randomised probability integral transform of every token (1.0 when ``pit`` is off)."""
    gen = torch.Generator().manual_seed(1234)
    firsts, values = [], []
    for tokens in rounds:
        firsts.append(tokens[0])
        prefix = list(prompt)
        for tok in tokens if pit else ():
            p = p_of(prefix)
            values.append(float(p[:tok].sum()) + float(torch.rand((), generator=gen)) * float(p[tok]))
            prefix.append(tok)
    expected = p_of(list(prompt)) * len(firsts)  # [V]
    counts = torch.bincount(torch.tensor(firsts), minlength=expected.numel()).double()
    keep = expected >= 5
    stat = float((((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum())
    rest_o, rest_e = float(counts[~keep].sum()), float(expected[~keep].sum())
    stat += (rest_o - rest_e) ** 2 / rest_e if rest_e > 0 else 0.0
    return float(chi2.sf(stat, int(keep.sum()))), (float(kstest(values, "uniform").pvalue) if pit else 1.0)
