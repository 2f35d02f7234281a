"""A rich progress display for model builds (download, join, convert), or a silent one."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def build_progress(enabled: bool) -> Iterator[Any]:
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

