"""Standard streams of a twin or guest."""

from __future__ import annotations

import sys


def flush_stdio() -> None:
    """Flush stdout and stderr, so what a request printed shows before its reply."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
