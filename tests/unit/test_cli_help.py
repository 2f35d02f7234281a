"""``specmesh`` help and argument errors: every command explains itself, bad input is refused naming
the flag and the value, before any model loads; what ``run`` and ``demo`` print does not come from the
benchmarks."""
from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from specmesh.cluster.cli import app
from specmesh.cluster.topology import example_path

USAGE_ERROR = 2  # click's exit status for a bad parameter

HELP_MENTIONS = {
    (): ["run", "demo", "bench", "models"],
    ("run",): ["--prompt", "--prompt-file", "--prompt-ids", "--topology", "--backend", "--no-draft", "--stages",
               "--gamma", "--threads", "--compare"],
    ("demo",): ["--backend", "--topology", "--prompts", "--max-new-tokens", "--gamma", "--draft-length", "--dense"],
    ("bench",): ["--out", "--scenario", "--models", "--quick", "--repeats", "--problems", "--threads", "--dtype",
                 "latency", "gamma", "sparsifier", "hf", "quality"],
}


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize("command", list(HELP_MENTIONS), ids=lambda c: " ".join(c) or "specmesh")
def test_help_lists_every_option(runner, command):
    result = runner.invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for word in HELP_MENTIONS[command]:
        assert word in result.output, word


def _refused(runner, args: list[str]) -> str:
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == USAGE_ERROR, result.output
    # rich wraps the message inside a box: drop its borders and compare with spaces collapsed
    return " ".join(result.output.replace("│", " ").split())


def test_run_needs_exactly_one_prompt(runner):
    assert "give exactly one of --prompt, --prompt-file or --prompt-ids" in _refused(runner, ["run"])
    assert "give exactly one" in _refused(runner, ["run", "--prompt", "a", "--prompt-ids", "1"])


@pytest.mark.parametrize("args, says", [
    (["run", "--prompt-ids", "1,x,3"], "--prompt-ids = '1,x,3': must be comma-separated integers"),
    (["demo", "--prompts", "0,two"], "--prompts = '0,two': must be comma-separated integers"),
    (["bench", "--problems", "1;2"], "--problems = '1;2': must be comma-separated integers"),
    (["bench", "--scenario", "nope"], "scenario ['nope']: choose from latency, gamma"),
    (["bench", "--models", "huge"], "models = 'huge': choose from tiny, bundled"),
])
def test_bad_values_are_named(runner, args, says):
    assert says in _refused(runner, args)


def test_run_refuses_more_threads_than_a_node_owns_cores(runner):
    path = str(example_path("tiny"))  # device core 0, edges core 1
    text = _refused(runner, ["run", "--topology", path, "--prompt-ids", "1,2", "--threads", "2"])
    assert "threads = 2: node 'device' owns 1 core(s) (nodes[0].cores = [0])" in text


def test_run_and_demo_print_without_the_benchmarks():
    # The closing tables of run and demo live in specmesh.cluster: loading them loads no benchmark module.
    code = ("import sys, specmesh.cluster.cli, specmesh.cluster.report, specmesh.cluster.compare; "
            "print(sorted(m for m in sys.modules if m.startswith('specmesh.benchmarks')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
