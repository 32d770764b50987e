"""Exceptions of cpy2py: every failure a user can cause has its own type."""

from __future__ import annotations


class TwinError(Exception):
    """Base class of all cpy2py errors."""


class TwinterpreterUnavailable(TwinError, RuntimeError):
    """A twinterpreter is needed but not running and may not be started."""


class TwinterpreterTerminated(TwinError, ConnectionError):
    """The twinterpreter ended (crash, kill, exit) while or before serving a call."""


class TwinStartError(TwinError, RuntimeError):
    """A twinterpreter could not be started (no such executable, not Python, too old)."""


class ProtocolError(TwinError, ValueError):
    """A peer sent something that is not valid cpy2py protocol."""


class TwinTimeout(TwinError, TimeoutError):
    """A twin ran longer than its ``timeout`` for one call and was stopped
    (a native twin is killed); its state was lost."""


class TwinMemoryError(TwinError, MemoryError):
    """A sandboxed twin needed more memory than its ``memory_limit`` and was
    stopped; its state was lost."""


class SandboxViolation(TwinError, PermissionError):
    """A sandboxed twin asked for something the sandbox policy refuses (a
    pickle, a name in the master, an object it was not handed)."""


class NestedTooDeep(ValueError):
    """A value to send is nested deeper than the protocol's ``MAX_DEPTH``
    levels (256), or holds itself where no reference can be made (a tuple
    that holds itself through a list). Raised by both codecs."""


class SharedParts(ValueError):
    """Raised by both codecs with ``sharing=SHARING_DETECT`` when a value
    holds one of its containers, or a long str or bytes, more than once; the kernel then encodes it
    again with references (docs/protocol.md, "Shared values"). It never
    reaches a user's code."""


class RemoteError(TwinError):
    """An exception in a twin whose type cannot be recreated here.

    Carries the remote type's name, its message and the remote traceback text.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str | None = None):
        super().__init__(type_name, message, traceback_text)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


class RemoteTraceback(Exception):
    """Attached as ``__cause__`` of an exception re-raised from a twin.

    Its text is the traceback as the twin formatted it, so it shows up in the
    printed traceback in the master.
    """

    def __init__(self, traceback_text: str):
        super().__init__(traceback_text)
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        return "\n\n" + self.traceback_text.rstrip()
