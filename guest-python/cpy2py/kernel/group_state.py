"""Running ``TWIN_GROUP_STATE``'s initializers and finalizers in the twins.

The master keeps the lists. A twin's welcome carries the initializers (run
before its kernel serves); once it is up, the master runs the finalizers in
it (``join``) before ``start()`` returns. Whatever is added later runs at
once in every twin that has joined (``add``), never in the interpreter that
added it. One lock orders additions against joins, so a twin that starts
while something is added gets it exactly once: in its welcome, when it
joins, or from ``add``.
"""

from __future__ import annotations

import _thread
import os
import sys
import weakref

from .. import _logging, kernel_state
from ..errors import SandboxViolation, TwinStartError
from ..protocol.messages import OP_EXECUTE
from . import links

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, List, Tuple

    from ..kernel_state import TwinGroupState
    from .connection import Connection

    Entry = Tuple[Callable[..., Any], tuple, dict]

log = _logging.get_logger("group")

_lock = _thread.RLock()
#: twin id -> link, for the twins that joined the group (master only); weak,
#: so a stopped twin's link and all it holds go when the master lets it go
_members: weakref.WeakValueDictionary[str, Connection] = weakref.WeakValueDictionary()


def add(state: TwinGroupState, kind: str, entry: Entry, init_existing: bool) -> None:
    """Add an initializer or finalizer; with ``init_existing``, run it at once
    in every running twin (and, added in a twin, in the master)."""
    if not kernel_state.is_master():
        _add_from_twin(kind, entry, init_existing)
        return
    with _lock:
        getattr(state, kind).append(entry)
        targets = _running_members() if init_existing else []
    _run(targets, [entry])


def welcome_initializers(state: TwinGroupState) -> List[Entry]:
    """The initializers a starting twin's welcome carries."""
    with _lock:
        return list(state.initializers)


def join(state: TwinGroupState, twin_id: str, connection: Connection, welcomed: List[Entry]) -> None:
    """A twin is up: run in it the initializers added since its welcome and
    every finalizer; from now on it gets what is added. Raises TwinStartError
    if one of them fails there."""
    with _lock:
        missed = [e for e in state.initializers if not any(e is w for w in welcomed)]
        entries = missed + list(state.finalizers)
        _members[twin_id] = connection
    try:
        _run([(twin_id, connection)], entries)
    except Exception as err:
        raise TwinStartError(
            f"twinterpreter {twin_id!r} started, but a TWIN_GROUP_STATE finalizer failed there "
            f"({type(err).__name__}: {err}); it was stopped"
        ) from err


def _running_members() -> List[Tuple[str, Connection]]:
    return [(twin_id, link) for twin_id, link in list(_members.items()) if link.broken is None]


def _run(targets: List[Tuple[str, Connection]], entries: List[Entry]) -> None:
    """Run each entry in each target; every target gets its turn, then the
    first failure is raised."""
    failure = None
    for _twin_id, connection in targets:
        for func, args, kwargs in entries:
            try:
                connection.serializer.check_executable(func)
                connection.request(OP_EXECUTE, func, list(args), kwargs)
            except Exception as err:
                if failure is None:
                    failure = err
    if failure is not None:
        raise failure


def _add_from_twin(kind: str, entry: Entry, init_existing: bool) -> None:
    if sys.platform == "wasi":
        raise SandboxViolation(
            "a sandboxed twin cannot add TWIN_GROUP_STATE initializers or finalizers: they would "
            "run in the master and the other twins; add them in the master"
        )
    func, args, kwargs = entry
    links.connection_to(kernel_state.MASTER_ID).request(
        OP_EXECUTE, _add_in_master, [kind, func, list(args), kwargs, init_existing, kernel_state.TWIN_ID], {}
    )


def _add_in_master(
    kind: str,
    func: Callable[..., Any],
    args: List[Any],
    kwargs: Dict[str, Any],
    init_existing: bool,
    adder: str,
) -> None:
    """In the master, for a twin that added an entry: the master's list gets
    it, and it runs in the master and every other running twin."""
    entry = (func, tuple(args), kwargs)
    with _lock:
        getattr(kernel_state.TWIN_GROUP_STATE, kind).append(entry)
        targets = [t for t in _running_members() if t[0] != adder] if init_existing else []
    if init_existing:
        func(*args, **kwargs)
    _run(targets, [entry])


def run_exit_hooks() -> None:
    """Run the ``atexit`` hooks, as a process ending normally would (the
    original's advice for an exit hook: register it from a finalizer); a
    twin ends with ``os._exit``, which skips them."""
    import atexit

    try:
        atexit._run_exitfuncs()  # reports a failing hook and runs the others
    except Exception:
        log.exception("an atexit hook failed in twin %s", kernel_state.TWIN_ID)


def _after_fork() -> None:
    """A forked child: another thread may have held the lock; the members are the parent's."""
    global _lock
    _lock = _thread.RLock()
    _members.clear()


if hasattr(os, "register_at_fork"):  # not on WASI
    os.register_at_fork(after_in_child=_after_fork)
