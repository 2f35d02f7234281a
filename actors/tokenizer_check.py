"""Draft and target must share a tokenizer: speculative decoding exchanges token ids."""
from __future__ import annotations

import os
from pathlib import Path

from .manifest import sha256_file

#: How many differing tokens a tokenizer-mismatch error lists.
TOKEN_DIFF_EXAMPLES = 5


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
