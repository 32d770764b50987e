"""Standard streams of a twin or guest."""

from __future__ import annotations

import io
import sys

from ..protocol.messages import OP_EXECUTE

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def flush_stdio() -> None:
    """Flush stdout and stderr, so what a request printed shows before its reply."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


class MasterStdin(io.TextIOBase):
    """A native twin's ``sys.stdin``: the master's standard input, read
    through the link (``input()``, ``breakpoint()`` and ``sys.stdin.readline()``
    in a twin read what the user types to the master). Each read is a call
    to the master on the reading code's own chain, so the master reads on the
    thread that waits for that code."""

    #: what reads get is text already; code that looks finds the usual values
    encoding = "utf-8"
    errors = "strict"

    def __init__(self, connection: Any) -> None:
        super().__init__()
        self._connection = connection

    def readable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return bool(self._ask("isatty"))

    def read(self, size: Any = -1) -> str:
        return self._ask("read", -1 if size is None else size)

    def readline(self, size: Any = -1) -> str:
        return self._ask("readline", -1 if size is None else size)

    def _ask(self, method: str, *args: Any) -> Any:
        return self._connection.request(OP_EXECUTE, read_master_stdin, [method, *args], {})


def read_master_stdin(method: str, *args: Any) -> Any:
    """Run in the master for a twin's ``MasterStdin``: a read of its own
    ``sys.stdin`` (end of input if it has none)."""
    if method not in ("read", "readline", "isatty"):
        raise ValueError(f"stdin has no method {method!r} for twins")
    stdin = sys.stdin
    if stdin is None:
        return False if method == "isatty" else ""
    return getattr(stdin, method)(*args)


class NoStdin(io.TextIOBase):
    """A sandboxed guest's ``sys.stdin``: there is none (the master's is not
    granted to it); reading it raises an ``EOFError`` that says so."""

    def readable(self) -> bool:
        return True

    def read(self, size: Any = -1) -> str:
        raise EOFError(
            "a sandboxed twin has no standard input (input() and sys.stdin read nothing here): "
            "pass what the code needs as arguments"
        )

    readline = read
