"""Exceptions of cpy2py: every failure a user can cause has its own type."""

from __future__ import annotations

import builtins

TYPE_CHECKING = False
if TYPE_CHECKING:  # (a twin's start imports no typing)
    from typing import Any, Dict, Optional


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


class RemoteOSError(RemoteError, OSError):
    """A ``RemoteError`` for a remote exception whose type derives from
    ``OSError``: ``except OSError`` catches it, and it has the remote one's
    ``errno``, ``strerror``, ``filename`` and ``filename2``. The ``Remote<type>``
    of a builtin OSError subclass (``RemoteFileNotFoundError``) derives from
    this and that type.

    Its args are a RemoteError's (type name, message, traceback text), not
    OSError's: OSError's constructor would take them for errno, strerror and
    file name; those come as keywords instead.
    """

    def __init__(
        self,
        type_name: str,
        message: str,
        traceback_text: str | None = None,
        *,
        errno: Any = None,
        strerror: Any = None,
        filename: Any = None,
        filename2: Any = None,
    ):
        Exception.__init__(self, type_name, message, traceback_text)  # (not OSError's: see above)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text
        self.errno = errno
        self.strerror = strerror
        self.filename = filename
        self.filename2 = filename2

    def __reduce__(self) -> Any:  # (OSError's would pass its fields as args)
        state = dict(vars(self))
        for key in OS_ERROR_FIELDS:
            state[key] = getattr(self, key)
        return type(self), self.args, state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        for key, value in state.items():  # (PyPy's would put errno... in __dict__, behind OSError's)
            setattr(self, key, value)


#: what an OSError has beyond its args (RemoteOSError's keywords)
OS_ERROR_FIELDS = ("errno", "strerror", "filename", "filename2")


def remote_error_type(base: type) -> type:
    """``RemoteError`` that is also a ``base`` (a builtin exception type the
    remote type derives from, such as ``ValueError`` for a
    ``json.JSONDecodeError``), so that ``except ValueError`` catches it; named
    ``cpy2py.errors.Remote<base>`` (any interpreter finds it by that name).
    For ``OSError`` and its builtin subclasses a ``RemoteOSError``;
    ``RemoteError`` itself for a base whose constructor takes particular
    arguments (UnicodeError, SyntaxError, ...)."""
    found = _remote_types.get(base)
    if found is not None:
        return found
    found = RemoteError
    plain = (
        isinstance(base, type)
        and issubclass(base, Exception)
        and not issubclass(base, _PARTICULAR)
        and base is not Exception
        and getattr(builtins, base.__name__, None) is base
    )
    if plain:
        mixin = RemoteOSError if issubclass(base, OSError) else RemoteError
        try:
            found = type(f"Remote{base.__name__}", (mixin, base), {"__module__": __name__})
            found("type", "message", None)
        except Exception:  # (bases that cannot be combined, or built so)
            found = RemoteError
    _remote_types[base] = found
    return found


#: builtin exception types whose constructors give their arguments a meaning
#: (UnicodeError's positions, ...), or that steer iteration
_PARTICULAR = (UnicodeError, SyntaxError, ImportError, StopIteration, StopAsyncIteration) + tuple(
    group
    for group in (vars(builtins).get("BaseExceptionGroup"),)
    if group is not None  # (3.11+)
)
_remote_types: Dict[Any, type] = {OSError: RemoteOSError}


def __getattr__(name: str) -> type:
    """``Remote<builtin exception>`` (see remote_error_type), made on first use."""
    base = getattr(builtins, name[6:], None) if name.startswith("Remote") else None
    found = remote_error_type(base) if isinstance(base, type) else None
    if found is None or found is RemoteError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return found


class RemoteTraceback(Exception):
    """Attached as ``__cause__`` of an exception re-raised from a twin.

    Its text is the traceback as the twin formatted it, so it shows up in the
    printed traceback in the master, under the twin's id (``twin_id``).
    """

    def __init__(self, traceback_text: str, twin_id: Optional[str] = None):
        super().__init__(traceback_text)
        self.traceback_text = traceback_text
        self.twin_id = twin_id

    def __str__(self) -> str:
        where = f"in twinterpreter {self.twin_id!r}:" if self.twin_id is not None else ""
        return f"{where}\n\n{self.traceback_text.rstrip()}"
