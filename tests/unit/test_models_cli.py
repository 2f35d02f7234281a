"""`specmesh models ...` through the real CLI app (typer's CliRunner), on a temporary cache directory.

Nothing here downloads: `list` only reads the cache, and the cached models are fake directories built
here (config, one safetensors file, tokenizer files) with a manifest written by the store itself.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from specmesh.actors.bundled import BUNDLED_MODELS, DRAFT_MODEL_NAME, TARGET_MODEL_NAME
from specmesh.actors.cache import CACHE_ENV_VAR
from specmesh.actors.manifest import write_manifest
from specmesh.cluster.cli import app

#: Width of the fake weights: small, any value works.
FAKE_WEIGHT_ROWS = 4


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _fake_cached(cache: Path, name: str, *, gguf_sha256: str | None = None) -> Path:
    """A model directory of ``name`` in ``cache`` that passes the store's fast check."""
    d = cache / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    (d / "tokenizer_config.json").write_text("{}")
    save_file({"w": np.zeros((FAKE_WEIGHT_ROWS, 2), dtype=np.float32)}, str(d / "model.safetensors"))
    sha = gguf_sha256 if gguf_sha256 is not None else BUNDLED_MODELS[name].gguf_sha256
    write_manifest(d, name=name, source={"kind": "bundled", "gguf_sha256": sha})
    return d


def _line_of(output: str, name: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith(name + " ")]
    assert len(lines) == 1, f"expected one line for {name} in:\n{output}"
    return lines[0]


def _is_cached(line: str) -> bool:
    """True for 'cached', False for 'not cached'; fails on a line that says neither."""
    if re.search(r"\bnot cached\b", line):
        return False
    assert re.search(r"\bcached\b", line), line
    return True


def test_list_empty_cache_names_both_models_not_cached(runner, tmp_path):
    result = runner.invoke(app, ["models", "list"], env={CACHE_ENV_VAR: str(tmp_path)})
    assert result.exit_code == 0, result.output + repr(result.exception)
    for name in (DRAFT_MODEL_NAME, TARGET_MODEL_NAME):
        line = _line_of(result.output, name)
        assert not _is_cached(line)
        assert BUNDLED_MODELS[name].hf_equivalent in line
    assert list(tmp_path.iterdir()) == []  # listing builds nothing


def test_list_reports_cached_model_with_its_path(runner, tmp_path):
    path = _fake_cached(tmp_path, DRAFT_MODEL_NAME)
    result = runner.invoke(app, ["models", "list", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    draft = _line_of(result.output, DRAFT_MODEL_NAME)
    assert _is_cached(draft) and str(path) in draft
    assert not _is_cached(_line_of(result.output, TARGET_MODEL_NAME))


def test_list_cache_dir_option_overrides_env(runner, tmp_path):
    _fake_cached(tmp_path / "a", TARGET_MODEL_NAME)
    (tmp_path / "b").mkdir()
    result = runner.invoke(
        app, ["models", "list", "--cache-dir", str(tmp_path / "a")], env={CACHE_ENV_VAR: str(tmp_path / "b")}
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert _is_cached(_line_of(result.output, TARGET_MODEL_NAME))


def test_list_reports_corrupted_and_outdated_caches_as_not_usable(runner, tmp_path):
    draft = _fake_cached(tmp_path, DRAFT_MODEL_NAME)
    (draft / "tokenizer.json").unlink()
    _fake_cached(tmp_path, TARGET_MODEL_NAME, gguf_sha256="0" * 64)
    result = runner.invoke(app, ["models", "list", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    draft_line = _line_of(result.output, DRAFT_MODEL_NAME)
    assert not _is_cached(draft_line) and "tokenizer.json" in draft_line
    target_line = _line_of(result.output, TARGET_MODEL_NAME)
    assert not _is_cached(target_line) and "0" * 64 in target_line


@pytest.mark.parametrize("sub", [[], ["list"], ["pull"]])
def test_models_help(runner, sub):
    result = runner.invoke(app, ["models", *sub, "--help"])
    assert result.exit_code == 0, result.output
    assert "--cache-dir" in result.output or not sub
    if not sub:
        assert "pull" in result.output and "list" in result.output


def test_pull_of_unknown_name_fails_naming_the_bundled_models(runner, tmp_path):
    result = runner.invoke(app, ["models", "pull", "qwen9-giant", "--cache-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "qwen9-giant" in str(result.exception) and DRAFT_MODEL_NAME in str(result.exception)
