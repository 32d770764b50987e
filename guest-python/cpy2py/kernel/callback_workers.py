"""The threads that run a peer's requests made for awaited calls
(connection.py, ``request_async``), and drive a guest for them.

Such a request may return a coroutine, which runs on the caller's loop
while its thread waits for it; that coroutine may wait in turn for the
callbacks of other awaited calls (a barrier across many of them). So the
pool has no cap: a cap is a deadlock at its size (ThreadPoolExecutor's
1,024 threads hung 1,100 awaits whose callbacks met at a barrier). It
shrinks instead: a thread idle for IDLE_EXIT seconds ends (a stdlib pool
kept every thread of a burst for the life of the process).
"""

from __future__ import annotations

import itertools
import os
import threading
from _collections import deque
from concurrent.futures import Executor, Future
from typing import Any, Callable, Optional

#: seconds a thread waits for work before it ends
IDLE_EXIT = 10.0


class Workers(Executor):
    """A pool of daemon threads that grows with the work waiting and ends
    the threads left idle (``submit`` as ``ThreadPoolExecutor``'s)."""

    def __init__(self, name: str, initializer: Callable[[], None], idle_exit: float = IDLE_EXIT) -> None:
        self._name = name
        self._initializer = initializer
        self._idle_exit = idle_exit
        self._ready = threading.Condition(threading.Lock())
        self._work: deque = deque()
        self._idle = 0  # threads waiting for work
        self._numbers = itertools.count(1)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._ready:
            self._work.append((future, fn, args, kwargs))
            start = len(self._work) > self._idle  # (more work than idle threads to take it)
            if not start:
                self._ready.notify()
        if start:
            name = f"{self._name}-{next(self._numbers)}"
            threading.Thread(target=self._serve, name=name, daemon=True).start()
        return future

    def threads_idle(self) -> int:
        """How many threads wait for work now."""
        return self._idle

    def _serve(self) -> None:
        self._initializer()
        while True:
            with self._ready:
                self._idle += 1
                try:
                    while not self._work:
                        if not self._ready.wait(self._idle_exit) and not self._work:
                            return  # (decided holding the lock: submit counts this thread gone)
                finally:
                    self._idle -= 1
                item = self._work.popleft()
            _run(*item)
            del item


def _run(future: Future, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as err:
        future.set_exception(err)
        future = None  # type: ignore[assignment]  # (err's traceback holds this frame: no cycle)
    else:
        future.set_result(result)


_workers: Optional[Workers] = None
_workers_lock = threading.Lock()


def callback_workers() -> Workers:
    """The process's pool (its threads' signals as a server thread's: blocked
    but while user code runs)."""
    global _workers
    if _workers is None:
        from ..protocol.transport import block_signals_in_this_thread

        with _workers_lock:
            if _workers is None:
                _workers = Workers("cpy2py-callback", block_signals_in_this_thread)
    return _workers


def _forget_in_child() -> None:
    """A forked child has none of the parent's threads: its pool starts anew."""
    global _workers, _workers_lock
    _workers, _workers_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # not on WASI
    os.register_at_fork(after_in_child=_forget_in_child)
