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
    try:  # (both in one go: this runs after every request)
        sys.stdout.flush()
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):  # one is None, closed or broken: each alone
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
        #: the bytes of the master's stdin (``sys.stdin.buffer.read()``)
        self.buffer = MasterStdinBytes(self)

    def readable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return bool(self._ask("isatty"))

    def fileno(self) -> int:
        raise io.UnsupportedOperation(
            "a twin reads the master's standard input through the link: it has no file descriptor here"
        )

    def read(self, size: Any = -1) -> str:
        return self._ask("read", -1 if size is None else size)

    def readline(self, size: Any = -1) -> str:
        return self._ask("readline", -1 if size is None else size)

    def _ask(self, method: str, *args: Any) -> Any:
        return self._connection.request(OP_EXECUTE, read_master_stdin, [method, *args], {})


class MasterStdinBytes(io.BufferedIOBase):
    """``sys.stdin.buffer`` of a native twin: the master's standard input as
    bytes, each read a call to the master as for ``MasterStdin``."""

    def __init__(self, text: MasterStdin) -> None:
        super().__init__()
        self._text = text

    def readable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._text.isatty()

    def fileno(self) -> int:
        return self._text.fileno()

    def read(self, size: Any = -1) -> bytes:
        return self._text._ask("read_bytes", -1 if size is None else size)  # type: ignore[no-any-return]

    read1 = read

    def readline(self, size: Any = -1) -> bytes:
        return self._text._ask("readline_bytes", -1 if size is None else size)  # type: ignore[no-any-return]


def read_master_stdin(method: str, *args: Any) -> Any:
    """Run in the master for a twin's ``MasterStdin``: a read of its own
    ``sys.stdin`` (end of input if it has none); ``*_bytes``: of its bytes
    (``sys.stdin.buffer``, or the text encoded where there is none)."""
    if method not in ("read", "readline", "isatty", "read_bytes", "readline_bytes"):
        raise ValueError(f"stdin has no method {method!r} for twins")
    stdin = sys.stdin
    as_bytes = method.endswith("_bytes")
    if stdin is None:
        return False if method == "isatty" else (b"" if as_bytes else "")
    if not as_bytes:
        return getattr(stdin, method)(*args)
    method = method[: -len("_bytes")]
    binary = getattr(stdin, "buffer", None)
    if binary is not None:
        return getattr(binary, method)(*args)
    text = getattr(stdin, method)(*args)
    return text.encode(getattr(stdin, "encoding", None) or "utf-8")


class NoStdin(io.TextIOBase):
    """A sandboxed guest's ``sys.stdin``: there is none (the master's is not
    granted to it); reading it, or its ``buffer``, raises an ``EOFError``
    that says so."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = _NoStdinBytes()

    def readable(self) -> bool:
        return True

    def read(self, size: Any = -1) -> str:
        raise _no_stdin()

    readline = read


class _NoStdinBytes(io.BufferedIOBase):
    def readable(self) -> bool:
        return True

    def read(self, size: Any = -1) -> bytes:
        raise _no_stdin()

    read1 = readline = read


def _no_stdin() -> EOFError:
    return EOFError(
        "a sandboxed twin has no standard input (input() and sys.stdin read nothing here): "
        "pass what the code needs as arguments"
    )
