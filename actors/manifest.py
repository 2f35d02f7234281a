"""The manifest of a built model directory, and the checks that use it.

:func:`write_manifest` records the sha256 and size of every file of a model directory; it is written
last, so a directory with a manifest is complete. :func:`verify_cache` checks a directory against it.

Verification cost: the *fast* check (``deep=False``: manifest present and matching, every listed file
present with its recorded size, each safetensors header parsable and consistent with its file size,
tokenizer files present) takes milliseconds and catches what really happens to a cache: interrupted
copies, truncation, deleted files, a full disk. Hashing every byte (4.8 GB for the bundled pair in
bf16: about 5 s from the page cache on a 2-core machine, more from a cold disk, and it evicts the page
cache that loading wants) runs only with ``deep=True``, since a same-size bit flip is rare and a cost of
seconds on every start of every worker is not.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Mapping

from .cache import ModelCacheError

#: Name of the manifest file written last into every built model directory.
MANIFEST_NAME = "specmesh-manifest.json"
#: Version of the manifest layout; a different version means "rebuild".
MANIFEST_FORMAT_VERSION = 1
#: Bytes read at a time when hashing or copying.
CHUNK_BYTES = 8 * 1024 * 1024
#: A safetensors file starts with the length of its JSON header as a little-endian u64.
SAFETENSORS_LEN_BYTES = 8
#: Upper bound of a sane safetensors header (the format's own limit is 100 MB).
SAFETENSORS_MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Files without which a model directory has no usable tokenizer.
REQUIRED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
#: dtype the bundled models are stored in.
STORE_DTYPE_NAME = "bfloat16"
#: Permissions of the files of a built model (transformers writes some as 0600).
FILE_MODE = 0o644


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def _listed_files(model_dir: Path) -> list[str]:
    """Relative paths of every regular file under ``model_dir`` except the manifest, sorted."""
    out = []
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".manifest-"):
            out.append(p.relative_to(model_dir).as_posix())
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_manifest(
    model_dir: str | os.PathLike[str],
    *,
    name: str,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Hash every file of ``model_dir`` and write the manifest, atomically. Call it last.

    Args:
        model_dir: a complete model directory (config, safetensors, tokenizer).
        name: the model's name (a bundled name, or any label).
        source: where the model came from (packages and versions, GGUF sha256, ...).

    Returns:
        The manifest's path.
    """
    import transformers

    model_dir = Path(model_dir)
    files = {}
    for rel in _listed_files(model_dir):
        p = model_dir / rel
        files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "name": name,
        "source": dict(source or {}),
        "dtype": STORE_DTYPE_NAME,
        "files": files,
        "total_size": sum(f["size"] for f in files.values()),
        "transformers_version": transformers.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = model_dir / MANIFEST_NAME
    _atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load the manifest of ``model_dir``; ``ModelCacheError`` if missing or unreadable."""
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ModelCacheError(f"missing manifest {path}: the model directory is incomplete")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelCacheError(f"unreadable manifest {path}: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ModelCacheError(f"malformed manifest {path}: no 'files' table")
    if manifest.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise ModelCacheError(
            f"manifest {path} has format_version {manifest.get('format_version')!r}, "
            f"expected {MANIFEST_FORMAT_VERSION}"
        )
    return manifest


def check_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse the header of a safetensors file and check it against the file size.

    Returns the parsed header. Raises ``ModelCacheError`` if the file is shorter than its header
    says (truncated), the header is not valid JSON, or a tensor's byte range lies past the end.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(SAFETENSORS_LEN_BYTES)
        if len(raw_len) < SAFETENSORS_LEN_BYTES:
            raise ModelCacheError(f"truncated safetensors file {path}: only {size} bytes")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > SAFETENSORS_MAX_HEADER_BYTES or SAFETENSORS_LEN_BYTES + header_len > size:
            raise ModelCacheError(
                f"truncated or corrupted safetensors file {path}: header length {header_len} "
                f"does not fit in the file's {size} bytes"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise ModelCacheError(f"corrupted safetensors header in {path}: {e}") from e
    if not isinstance(header, dict):
        raise ModelCacheError(f"corrupted safetensors header in {path}: not a JSON object")
    data_len = size - SAFETENSORS_LEN_BYTES - header_len
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise ModelCacheError(f"corrupted safetensors header in {path}: entry {key!r}") from e
    if end != data_len:
        raise ModelCacheError(
            f"truncated or corrupted safetensors file {path}: tensors need {end} data bytes, "
            f"the file holds {data_len}"
        )
    return header


def verify_cache(path: str | os.PathLike[str], *, deep: bool = True) -> None:
    """Check a built model directory against its manifest; raise ``ModelCacheError`` if bad.

    Always checked: the manifest exists and parses; every file it lists exists with its recorded
    size; the tokenizer files exist; there is a config and at least one safetensors file, whose
    headers parse and agree with their sizes. With ``deep=True`` (the default) the sha256 of every
    file is also recomputed and compared (seconds for a GB-sized model); :func:`ensure` uses
    ``deep=False`` on its hot path.
    """
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise ModelCacheError(f"model directory {model_dir} does not exist")
    manifest = read_manifest(model_dir)
    files: dict[str, dict[str, Any]] = manifest["files"]
    for tok_file in REQUIRED_TOKENIZER_FILES:
        if not (model_dir / tok_file).is_file():
            raise ModelCacheError(f"missing tokenizer file {tok_file} in {model_dir}")
    if "config.json" not in files:
        raise ModelCacheError(f"manifest of {model_dir} lists no config.json")
    if not any(rel.endswith(".safetensors") for rel in files):
        raise ModelCacheError(f"manifest of {model_dir} lists no .safetensors file")
    for rel, info in files.items():
        p = model_dir / rel
        if not p.is_file():
            raise ModelCacheError(f"missing file {rel} in {model_dir} (listed in the manifest)")
        size = p.stat().st_size
        if size != info.get("size"):
            raise ModelCacheError(
                f"size mismatch for {p}: manifest says {info.get('size')} bytes, found {size}"
                + (" (truncated)" if isinstance(info.get("size"), int) and size < info["size"] else "")
            )
        if rel.endswith(".safetensors"):
            check_safetensors_header(p)
    if deep:
        for rel, info in files.items():
            p = model_dir / rel
            actual = sha256_file(p)
            if actual != info.get("sha256"):
                raise ModelCacheError(
                    f"checksum mismatch for {p}: expected sha256 {info.get('sha256')}, got {actual}"
                )

