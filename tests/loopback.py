"""Two ends of a link in one process, for testing the routing of
``kernel/connection.py`` without spawning twins.

``pair()`` connects two ``Connection``s by two pipes (the real
``FdTransport``, the real epoll gate), each with its own server threads.
Functions run by either end are module-level ones, looked up by name in this
same process; ``SIDES`` lets a function reach the end it runs on, so that it
can call the other end back (recursion both ways, on one thread per end).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict, List, Tuple

from cpy2py.kernel.connection import Connection
from cpy2py.kernel.serialization import Serializer
from cpy2py.protocol.messages import OP_EXECUTE
from cpy2py.protocol.transport import FdTransport

#: side name -> the connection of that end (what code running there calls out on)
SIDES: Dict[str, Connection] = {}


def pair(
    prefix: str = "loop", serving: bool = True, b_threads: bool = True
) -> Tuple[Connection, Connection, List[int]]:
    """Two connected ends ``(a, b)``, serving (else without server threads:
    a test drives them); and the fds, to break the link. Without
    ``b_threads``, ``b`` is an end like a WASI guest's (``threads=False``):
    one thread of its own serves it, running whatever it reads."""
    a_to_b = os.pipe()
    b_to_a = os.pipe()
    a = _end(f"{prefix}-b", FdTransport(b_to_a[0], a_to_b[1]))
    b = _end(f"{prefix}-a", FdTransport(a_to_b[0], b_to_a[1]), threads=b_threads)
    SIDES[f"{prefix}-a"] = a
    SIDES[f"{prefix}-b"] = b
    if serving:
        a.start_serving()
        if b_threads:
            b.start_serving()
        else:
            threading.Thread(target=b.serve, name=f"{prefix}-b-alone", daemon=True).start()
    return a, b, [*a_to_b, *b_to_a]


def send_now(*ends: Connection) -> None:
    """Let ``ends`` send as over a native twin's transport (``send_now``): a
    lone call then sends holding the reading role, and one without a
    deadline goes express (``Connection.request``)."""
    for end in ends:
        end._send_now = lambda payload, end=end: (end.transport.send(payload), True)[1]


def close(ends: Tuple[Connection, ...], fds: List[int]) -> None:
    """End the links of ``pair`` and close its descriptors, once their server
    threads are gone (a descriptor number closed under a thread that is
    about to read it may be the next test's pipe by then), but for those
    still running a request (a test's ``slow``), which read nothing more.
    One blocked in a read already (the input that woke it was taken) is
    let out by the close itself: a short wait, then the descriptors go."""
    for end in ends:
        end.close("the test ended")
    deadline = time.monotonic() + 0.5
    while any(end.thread_count() > end._running for end in ends) and time.monotonic() < deadline:
        time.sleep(0.001)
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _end(peer_id: str, transport: FdTransport, threads: bool = True) -> Connection:
    return Connection(
        transport, peer_id, Serializer(peer_id), describe_end=lambda: "closed its end", threads=threads
    )


def call(connection: Connection, func: Any, *args: Any, **kwargs: Any) -> Any:
    return connection.request(OP_EXECUTE, func, list(args), kwargs)


# -- what the ends run ---------------------------------------------------------------


def echo(value: Any) -> Any:
    return value


def slow(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def bounce(side: str, depth: int) -> List[str]:
    """Runs on ``side``; calls the other end, which calls back, ``depth`` times."""
    if depth == 0:
        return [side]
    here = SIDES[side]
    other = here.peer_id
    return [side] + call(here, bounce, other, depth - 1)


def call_back(side: str, value: Any) -> List[Any]:
    """Runs on ``side``: calls ``echo`` on the other end (a callback, nested
    in this request) and says how that ended."""
    try:
        return ["returned", call(SIDES[side], echo, value)]
    except BaseException as err:
        return ["raised", type(err).__name__]


def fail_at(side: str, depth: int) -> None:
    if depth == 0:
        raise LookupError(f"bottom reached on {side}")
    here = SIDES[side]
    call(here, fail_at, here.peer_id, depth - 1)


class Unpicklable:
    """Pickles fine; fails to unpickle (on whichever end loads it)."""

    def __reduce__(self) -> Any:
        return (_refuse_to_load, ())


def _refuse_to_load() -> None:
    raise ValueError("this value cannot be rebuilt here")


def unpicklable() -> Unpicklable:
    return Unpicklable()


_barriers_lock = threading.Lock()
_flags: Dict[str, threading.Event] = {}


def _flag(name: str) -> threading.Event:
    with _barriers_lock:
        return _flags.setdefault(name, threading.Event())


def wait_for_flag(name: str, timeout: float) -> bool:
    """Blocks the thread that runs it until ``set_flag(name)`` runs (or
    ``timeout`` passes: False)."""
    return _flag(name).wait(timeout)


def set_flag(name: str) -> None:
    _flag(name).set()


_barriers: Dict[str, threading.Barrier] = {}


def meet(name: str, parties: int) -> str:
    """Returns once ``parties`` requests ``meet(name, ...)`` run at the same
    time (raises ``threading.BrokenBarrierError`` after 10 s without them)."""
    with _barriers_lock:
        barrier = _barriers.setdefault(name, threading.Barrier(parties, timeout=10))
    barrier.wait()
    return name


def served_by() -> str:
    """The name of the thread that runs this request."""
    return threading.current_thread().name
