"""Progress bars that stay out of logs: shown on a terminal, off when stderr is redirected (a file,
a cluster job), where the per-epoch log lines say enough."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable=None, **kwargs) -> tqdm:
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("disable", not _is_terminal(kwargs["file"]))
    return tqdm(iterable, **kwargs)


def quiet_progress() -> bool:
    """Whether the bars are off (stderr redirected): a long loop without log lines of its own then
    says where it is in plain lines instead."""
    return not _is_terminal(sys.stderr)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
