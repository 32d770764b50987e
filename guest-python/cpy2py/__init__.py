"""cpy2py: one Python application, several interpreters.

The master runs the program; twinterpreters (CPython or PyPy subprocesses)
run the parts pinned to them with ``twinfunction`` or ``TwinObject``.
"""

from __future__ import annotations

from . import kernel_state
from ._logging import configure_from_environment as _configure_logging
from .capabilities import expose, exposed
from .errors import (
    ProtocolError,
    RemoteError,
    SandboxViolation,
    TwinError,
    TwinMemoryError,
    TwinStartError,
    TwinterpreterTerminated,
    TwinterpreterUnavailable,
    TwinTimeout,
)
from .functions import twinfunction
from .kernel_state import TWIN_GROUP_STATE
from .twin_object import TwinObject, is_proxy, localmethod

__version__ = "0.1.0"

__all__ = [
    "ProtocolError",
    "RemoteError",
    "SandboxPool",
    "SandboxViolation",
    "TwinError",
    "TwinMaster",
    "TwinMemoryError",
    "TwinStartError",
    "TwinTimeout",
    "TwinterpreterTerminated",
    "TwinterpreterUnavailable",
    "TwinObject",
    "TWIN_GROUP_STATE",
    "aio",
    "expose",
    "exposed",
    "is_proxy",
    "kernel_state",
    "localmethod",
    "twinfunction",
]

if kernel_state.is_master():
    from .master import TwinMaster

TYPE_CHECKING = False
if TYPE_CHECKING:  # at run time: on first use, in __getattr__
    from .pool import SandboxPool


def __getattr__(name: str) -> object:
    # loaded on first use: ``aio`` (it imports asyncio), ``SandboxPool``, and in a twin
    # ``TwinMaster`` (a twin starts serving without the master's machinery)
    if name == "TwinMaster":
        from .master import TwinMaster

        globals()["TwinMaster"] = TwinMaster
        return TwinMaster
    if name == "aio":
        from .awaitable import aio

        globals()["aio"] = aio
        return aio
    if name == "SandboxPool":  # the master's only (it imports concurrent.futures)
        from .pool import SandboxPool

        globals()["SandboxPool"] = SandboxPool
        return SandboxPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | {"TwinMaster", "aio", "SandboxPool"})


_level = _configure_logging(kernel_state.TWIN_ID)
if _level and kernel_state.is_master():
    try:
        from . import _host

        _host.init_logging({"WARNING": "warn", "CRITICAL": "error"}.get(_level, _level.lower()))
    except ImportError:  # pure-Python install: only the Python logs then
        pass
