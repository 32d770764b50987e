"""Deadlines in the master: one thread that runs a callback when a deadline
passes (a native twin's call that runs longer than its ``timeout``, a start
that takes longer than its ``handshake_timeout``).

Setting and clearing a deadline is two dict operations and no lock, so that
a call with a timeout costs about what one without does. The thread sleeps
until the earliest deadline, or, with none set, until one is; it never
polls. Only the master imports this module (twins set no deadlines).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

from .. import _logging

log = _logging.get_logger("deadlines")

#: key -> (monotonic deadline, callback); a callback gets the key
_deadlines: Dict[Hashable, Tuple[float, Callable[[Any], None]]] = {}
_wakeup = threading.Condition(threading.Lock())
_idle = False  # the thread sleeps with no deadline in view
_sleeping_until = float("inf")
_thread: Optional[threading.Thread] = None


def set_deadline(key: Hashable, seconds: float, callback: Callable[[Any], None]) -> None:
    """Run ``callback(key)`` in ``seconds`` unless ``clear(key)`` comes first."""
    deadline = time.monotonic() + seconds
    _deadlines[key] = (deadline, callback)
    if _idle or deadline < _sleeping_until or _thread is None:
        _wake()


def clear(key: Hashable) -> Optional[float]:
    """Forget the deadline of ``key``; the seconds that were left, if it had one."""
    entry = _deadlines.pop(key, None)
    return None if entry is None else entry[0] - time.monotonic()


def _wake() -> None:
    global _thread
    with _wakeup:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_watch, name="cpy2py-deadlines", daemon=True)
            _thread.start()
        _wakeup.notify()


def _watch() -> None:
    global _idle, _sleeping_until
    from ..protocol.transport import block_signals_in_this_thread

    block_signals_in_this_thread()
    while True:
        now = time.monotonic()
        due = []
        earliest = float("inf")
        for key, (deadline, callback) in list(_deadlines.items()):
            if deadline <= now:
                due.append((key, callback))
            elif deadline < earliest:
                earliest = deadline
        for key, callback in due:
            if _deadlines.pop(key, None) is None:
                continue  # cleared meanwhile: the call ended in time
            try:
                callback(key)
            except Exception:  # the watch goes on for the others
                log.exception("deadline callback for %r failed", key)
        if due:
            continue
        with _wakeup:
            _idle = earliest == float("inf")
            _sleeping_until = earliest
            # set after a scan that found none: look again under the lock
            if not any(deadline < earliest for deadline, _ in list(_deadlines.values())):
                _wakeup.wait(None if _idle else earliest - time.monotonic())
            _idle = False
            _sleeping_until = float("inf")


def after_fork() -> None:
    """In a forked child: the thread was the parent's, and so were the deadlines."""
    global _thread, _wakeup, _idle, _sleeping_until
    _thread = None
    _wakeup = threading.Condition(threading.Lock())
    _idle = False
    _sleeping_until = float("inf")
    _deadlines.clear()
