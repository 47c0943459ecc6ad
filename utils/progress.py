"""Progress bars that stay out of logs: shown on a terminal, off when stderr is redirected (a file,
a cluster job), where the per-epoch log lines say enough."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable=None, **kwargs) -> tqdm:
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("disable", not _is_terminal(kwargs["file"]))
    return tqdm(iterable, **kwargs)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
