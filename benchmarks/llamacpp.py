"""The CPU anchor: llama.cpp (``llama-cpp-python``) decoding the bundled target's own GGUF.

Plain greedy decoding, one token at a time, in this process, with the thread count SpecMesh gets;
the prompt's token ids are SpecMesh's own (the GGUF carries the same vocabulary), the prompt's
evaluation is timed with the generation, and both stop at the same end-of-sequence ids. On the
2-vCPU machines llama.cpp with two threads collapses (its threads spin on barriers while the other
vCPU is busy), so compare at one thread (``specmesh bench --threads 1``).

llama-cpp-python is an optional extra (``pip install 'specmesh[llamacpp]'``): it compiles llama.cpp
from source, about 12 minutes on two cores.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from .hf_assisted import PeerRun

INSTALL_HINT = ("llama-cpp-python is not installed; `pip install 'specmesh[llamacpp]'` (or `.venv/bin/pip "
                "install llama-cpp-python`) builds llama.cpp from source, ~12 minutes on two cores")


def available() -> bool:
    """Whether ``llama_cpp`` imports here."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCppPeer:
    """One GGUF loaded by llama.cpp.

    Args:
        gguf_path: the model file.
        threads: llama.cpp threads, for the prompt and for decoding alike.
        n_ctx: context window to allocate.
    """

    def __init__(self, gguf_path: str | Path, threads: int, n_ctx: int = 4096) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         seed=0, verbose=False)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, eos_token_ids: Sequence[int]) -> PeerRun:
        """Greedy decoding (top-k 1) of up to ``max_new_tokens`` tokens after ``prompt_ids``."""
        eos = set(eos_token_ids)
        out: list[int] = []
        t0 = time.perf_counter()
        if max_new_tokens > 0:
            for token in self.llm.generate(list(prompt_ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                           repeat_penalty=1.0, reset=True):
                if token in eos:
                    break
                out.append(int(token))
                if len(out) >= max_new_tokens:
                    break
        return PeerRun(out, time.perf_counter() - t0)
