"""Which connection reaches which twinterpreter from here.

In the master, every twin has its own connection, registered here by
``cpy2py.master`` (which starts a twin on first use). In a twin, everything goes through the
one connection to the master, which forwards what is native elsewhere.
"""

from __future__ import annotations

import _thread

from .. import kernel_state
from ..errors import TwinterpreterUnavailable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Optional

    from .connection import Connection

_lock = _thread.RLock()
_connections: Dict[str, Connection] = {}
#: set by the master module: starts a twin by id and returns its connection
_starter: Optional[Callable[[str], Connection]] = None


def register(twin_id: str, connection: Connection) -> None:
    with _lock:
        _connections[twin_id] = connection


def unregister(twin_id: str, connection: Connection) -> None:
    with _lock:
        if _connections.get(twin_id) is connection:
            del _connections[twin_id]


def after_fork() -> None:
    """In a child forked from this process: the links are the parent's."""
    global _lock
    _lock = _thread.RLock()
    _connections.clear()


def all_connections() -> List[Connection]:
    """Every registered connection that is still up."""
    with _lock:
        return [c for c in _connections.values() if c.broken is None]


def set_starter(starter: Callable[[str], Connection]) -> None:
    global _starter
    _starter = starter


def existing_connection(twin_id: str) -> Optional[Connection]:
    """The live connection towards ``twin_id``, without starting anything."""
    target = twin_id if kernel_state.is_master() else kernel_state.MASTER_ID
    connection = _connections.get(target)
    return connection if connection is not None and connection.broken is None else None


def connection_to(twin_id: str) -> Connection:
    """The connection over which objects native to ``twin_id`` are reached."""
    if kernel_state.is_master():
        if _starter is None:
            raise TwinterpreterUnavailable(f"twinterpreter {twin_id!r} is not running")
        return _starter(twin_id)
    connection = _connections.get(kernel_state.MASTER_ID)
    if connection is None or connection.broken is not None:
        raise TwinterpreterUnavailable(
            f"this twinterpreter ({kernel_state.TWIN_ID!r}) has no link to the master"
        )
    return connection
