"""One link between this interpreter and a peer: requests, replies, threads.

Frames travel raw until they reach the thread they belong to. Whichever
thread needs a frame takes the link's *reading role*, reads frames, looks at
their header only (kind, id, chain: ``codec.peek``, which runs no user code)
and routes each raw frame: a reply to the thread that sent the request, a
request of a chain to the thread running that chain here, a request of a
new chain to a server thread. The thread a frame belongs to decodes it
itself, after the role is given up: decoding may run user code (``__hash__``
of a key, unpickling, a finalizer) and may even call the peer, and a frame
that fails to decode fails the call it belongs to and nothing else.

A caller reads its own reply itself when nobody else reads (no hand-off
between threads in the common, single-threaded case). Idle *servers* wait for
the link in an epoll set (``_Gate``) in which the link's descriptor is armed
only while nobody holds the role: a caller that reads disarms it first, so a
reply never wakes a server. A server that reads a request of a new chain
runs it itself; the gate is armed again first, so another idle server takes
whatever arrives meanwhile. No thread polls on a timer.

Chains: every request names the chain (thread of control) it belongs to. A
request whose chain is running in a thread here is executed by that very
thread, which is what makes recursion across interpreters work on one thread
and keeps the replies of many threads apart. All routing state belongs to
the link; a thread's mailbox (``_Waiter``) is the only per-thread state.
"""

from __future__ import annotations

import _thread
import itertools
import os
import select
import sys
import time
from _collections import deque
from _weakref import ref as _weakref

from .. import _logging, kernel_state
from ..errors import ProtocolError, SandboxViolation, TwinError, TwinterpreterTerminated
from ..protocol import codec
from ..protocol.messages import OP_NAMES, RAISE, RELEASE, REPLY, REQUEST, SHUTDOWN
from ..protocol.transport import (
    block_signals_in_this_thread,
    hold_signals,
    release_signals,
    user_code_signals,
)
from . import references
from .serialization import Serializer, bare_failure, decoding_from

TYPE_CHECKING = False
if TYPE_CHECKING:  # (a twin's start imports neither typing nor threading)
    from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple, Union

    from ..protocol.transport import PeerRunner, Transport

    #: a routed frame: (link, kind, id or chain, raw frame)
    Item = Tuple["Connection", int, int, Any]

log = _logging.get_logger("connection")

_chain_ids = itertools.count(1)
_no_loop: Callable[[], Any] = type(None)  # (a dead reference: "no loop")
#: yields the CPU (see Connection.TAKING_TURNS): not on every platform, nor
#: on PyPy, whose servers hand a batch over to each other through a lock
#: that costs more than the wake-ups it saves (8 threads and 100 awaits on a
#: pypy3 twin made about 0.9 of their calls with it)
_yield_cpu = getattr(os, "sched_yield", None) if sys.implementation.name == "cpython" else None
try:  # (CPython: twins and the master; PyPy's and the guest's gates sleep at once)
    from cpy2py._host import MomentPoll as _MomentPoll
except ImportError:
    _MomentPoll = None
_UNREAD: Any = object()  # (_read: no frame was read before)
_local = _thread._local()
#: PyPy: after how many frames routed on a link its server marks the
#: kernel's per-request functions for the JIT (``_hint_jit``); 0: never (or done)
_JIT_HINTS_AT = 300 if sys.implementation.name == "pypy" else 0
_jit_hinted = False  # ... and it did


class _Waiter:
    """A thread's mailbox: frames routed to it, and a lock to sleep on."""

    __slots__ = ("inbox", "wake", "mutex", "parked", "offered", "queued", "chain", "depth", "name", "early")

    def __init__(self) -> None:
        self.inbox: Deque[Item] = deque()
        self.wake = _thread.allocate_lock()
        self.wake.acquire()
        #: guards ``parked`` and ``offered``: links deliver to a thread from any thread
        self.mutex = _thread.allocate_lock()
        self.parked = False
        #: a link's reading role was offered to this thread while it slept
        self.offered = False
        #: the link in whose queue for the reading role this thread stands
        self.queued: Optional[Connection] = None
        #: the chain this thread runs, or None before its first call
        self.chain: Optional[int] = None
        #: calls this thread makes and requests it runs, on any link, now
        self.depth = 0
        self.name = _thread_name()
        #: replies to outer calls of this thread that came while a later
        #: call waited, (link, request id) -> frame (see _wait_for_reply)
        self.early: Dict[Tuple[Connection, int], Item] = {}

    def deliver(self, item: Item, on: Any = None) -> None:
        """``item`` is this thread's (``on``: the event loop the deliverer
        runs, which matters to an awaited call's mailbox only)."""
        self.inbox.append(item)
        self._wake_up()

    def offer(self) -> None:
        """The reading role of the link this thread waits on is free."""
        with self.mutex:
            self.offered = True
            if self.parked:
                self.parked = False
                self.wake.release()

    def _wake_up(self) -> None:
        with self.mutex:
            if self.parked:
                self.parked = False
                self.wake.release()

    def sleep(self) -> None:
        """Sleep until a frame is delivered or a role offered; return at once if
        one was. Interrupted (Ctrl-C), it leaves no wake-up behind."""
        with self.mutex:
            if self.inbox or self.offered:
                self.offered = False
                return
            self.parked = True
        woken = False
        try:
            self.wake.acquire()
            woken = True
        finally:
            with self.mutex:
                self.offered = False
                if self.parked:  # not woken: nobody will release the lock
                    self.parked = False
                elif not woken:  # woken meanwhile: consume the wake-up
                    self.wake.acquire(False)


class _AsyncWaiter:
    """The mailbox of a call awaited on an event loop: frames routed to it
    wake the loop (from any thread), which resumes the call (in
    ``request_async``) by the future it awaits."""

    __slots__ = (
        "loop",
        "thread",
        "inbox",
        "chain",
        "req_id",
        "turn_no",
        "queued",
        "future",
        "payload",
        "sent",
        "driving",
        "outer",
        "context",
        "callbacks",
    )

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        #: the calling task's context: the twin's callbacks of the call run
        #: in copies of it (what the caller set in contextvars, a request
        #: id say, is theirs too), coroutines on the loop included (_run_for)
        self.context = _copy_context()
        self.thread = _thread.get_ident()  # the loop's (made by a coroutine on it)
        self.inbox: Deque[Item] = deque()
        self.chain: Optional[int] = None
        self.req_id = 0  # its request's id
        self.turn_no = 0  # (a guest's) the link's count of turns given when it got its own
        self.queued: Optional[Connection] = None  # (it never waits for the reading role)
        self.future: Any = None  # what the call awaits, woken by a frame
        # a call to a guest this side runs (see request_async):
        self.payload: Any = None  # its request, until it is queued for the guest
        self.sent = False  # its request was queued for the guest
        self.driving = False  # a worker thread runs the guest for it
        self.outer: Tuple[_AsyncWaiter, ...] = ()  # the awaited calls whose callbacks made it
        #: coroutines of the peer's callbacks it awaits on the loop now
        #: (their futures): cancelled with it (``_await_callback``)
        self.callbacks: Any = None

    def deliver(self, item: Item, on: Any = None) -> None:
        """``item`` is this call's; ``on``: the event loop the deliverer runs
        (its reader callback), which wakes its own call directly."""
        self.inbox.append(item)
        if on is self.loop:
            self._wake()
        else:
            self.offer()

    def offer(self) -> None:
        """Wake the loop: a frame came, or the link ended."""
        if _thread.get_ident() == self.thread:
            if self.future is None:
                # its call does not wait on a future now (only the loop's
                # thread sets one): it looks at its inbox before it does
                return
            if _running_loop() is self.loop:  # the loop itself read it
                self._wake()
                return
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop was closed: nobody awaits any more
            pass

    def _wake(self) -> None:
        future = self.future
        if future is not None and not future.done():
            future.set_result(None)


async def _coroutine() -> None:
    pass


_probe = _coroutine()
_Coroutine = type(_probe)
_probe.close()
del _probe


def callback_workers() -> Any:
    """The threads that run the peer's requests of awaited calls
    (kernel/callback_workers.py: imported at first use, with threading,
    which a twin's start does without)."""
    from .callback_workers import callback_workers as workers

    return workers()


_context_copier: Any = None


def _await_callback(awaiter: _AsyncWaiter, start: Callable[[], Any]) -> Any:
    """Wait, on a thread that serves the callbacks of the awaited call
    ``awaiter``, for the coroutine that ``start`` schedules on its loop
    (its concurrent future); cancelled with that call (request_async), as a
    coroutine it awaited in one interpreter would be, instead of running on
    orphaned (and holding this thread, and the peer's, while it waits)."""
    with _callback_lock:
        future = start()
        if awaiter.callbacks is _CALL_CANCELLED:
            future.cancel()  # (the call was cancelled as this callback came)
        elif awaiter.callbacks is None:
            awaiter.callbacks = {future}
        else:
            awaiter.callbacks.add(future)
    try:
        return future.result()
    finally:
        with _callback_lock:
            if type(awaiter.callbacks) is set:
                awaiter.callbacks.discard(future)


class NotSent(Exception):
    """An awaited call that a guest's link never sent: the guest ended
    before the call's turn came (``request_async``, ``again_if_unsent``).
    Its argument is the link's error."""


_callback_lock = _thread.allocate_lock()
#: an awaited call's ``callbacks`` once it was cancelled
_CALL_CANCELLED: Any = object()


def _copy_context() -> Any:
    """contextvars.copy_context (imported with asyncio, which awaited calls
    run on: a twin's start imports neither)."""
    global _context_copier
    if _context_copier is None:
        from contextvars import copy_context

        _context_copier = copy_context
    return _context_copier()


def _run_coroutine(coroutine: Any, link: Any = None, chain: int = 0) -> Any:
    """A coroutine returned by a function the peer called: awaited on the
    loop of the async call it serves (cpy2py/awaitable.py), also when the
    peer made the request as an awaited call of its own while serving that
    call (a ``chain`` derived from the call's: see _derived_chain), else run
    to its end here in a loop of its own."""
    import asyncio

    loop = getattr(_local, "loop", None)
    if loop is not None:  # (a callback of an awaited call: _run_for, in its context)
        return _await_callback(
            _callbacks_of().get()[-1], lambda: asyncio.run_coroutine_threadsafe(coroutine, loop)
        )
    if chain > _ROOT_CHAINS and link is not None:
        awaiter = link._awaited_call(chain & _ROOT_CHAINS)
        if awaiter is not None and asyncio._get_running_loop() is None:
            # (a server's thread: it waits for the coroutine, made in the
            # context of a callback of that call, as _run_for does)

            def schedule() -> Any:
                _callbacks_of().set((*awaiter.outer, awaiter))
                return asyncio.run_coroutine_threadsafe(coroutine, awaiter.loop)

            return _await_callback(awaiter, lambda: awaiter.context.copy().run(schedule))
    if asyncio._get_running_loop() is not None:
        # a sync call made on a running loop's thread: that loop waits for
        # the call, so it cannot run the coroutine, nor can a loop of its own
        coroutine.close()
        raise RuntimeError(
            f"{getattr(coroutine, '__qualname__', 'a coroutine function')} was called back during a "
            "sync call made on the thread of a running event loop, which cannot run it until that "
            "call returns: make the call with await (execute_async, aio(...), or an async "
            "twinfunction) so that the loop runs it"
        )
    return asyncio.run(coroutine)


def _this_waiter() -> _Waiter:
    try:
        return _local.waiter
    except AttributeError:
        waiter = _local.waiter = _Waiter()
        return waiter


def _new_chain() -> int:
    # unique on this machine while this process lives: pid and a counter
    return _chain_base | (next(_chain_ids) & 0xFFFFFF)


#: chains made here or by the peer are below this (a process id of at most
#: 22 bits, shifted by 24); a chain above it is derived from one below
#: (_derived_chain), which its low 48 bits name
_ROOT_CHAINS = (1 << 48) - 1
_derived_ids = itertools.count(1)
#: derived chains of calls in flight, or abandoned (their peer may still run
#: them): never given to another call while there, as a chain twice in flight
#: would route one call's requests to the other's thread (_release_derived)
_derived_in_use: Set[int] = set()
_derived_lock = _thread.allocate_lock()


def _derived_chain(parent: int) -> int:
    """The chain of an awaited call made on a loop that runs on a thread
    serving ``parent`` (a coroutine of a request of that chain, run here in a
    loop of its own): a chain of its own, which the peer can trace back to
    ``parent``, so that if ``parent`` is an awaited call of the peer's, a
    coroutine function of the peer that this call runs is awaited on that
    call's loop (``_run_coroutine``). Bits 48 to 61: a counter (never 0);
    bit 62: set if ``parent`` was made here, so that the two sides never
    derive the same chain from one parent."""
    own = 1 << 62 if parent >> 24 == _chain_base >> 24 else 0
    with _derived_lock:
        for _ in range(0x3FFF):
            chain = parent | own | ((next(_derived_ids) & 0x3FFF or 1) << 48)
            if chain not in _derived_in_use:
                _derived_in_use.add(chain)
                return chain
    raise RuntimeError(
        "16,383 awaited calls made by coroutines run for one call of the peer are in flight or were "
        "abandoned (cancelled before their replies): await fewer at once, or make them from a task "
        "of a loop that the call does not run"
    )


def _release_derived(chain: int) -> None:
    """A derived chain whose call ran its course on both sides: free for the
    next call (a root chain: nothing to do)."""
    if chain > _ROOT_CHAINS:
        with _derived_lock:
            _derived_in_use.discard(chain)


def _set_chain_base() -> None:
    global _chain_base
    _chain_base = os.getpid() << 24  # (a system call: once, and again in a forked child)


_chain_base = 0
_set_chain_base()
if hasattr(os, "register_at_fork"):  # not on WASI
    os.register_at_fork(after_in_child=_set_chain_base)


class _Gate:
    """Where a link's idle servers wait: an epoll set with the link's
    descriptor (one-shot, armed only while nobody reads, so that one frame
    wakes one server and a caller's reply wakes none; a guest's, readable
    only for frames a reader left, stays armed) and a pipe on which
    callers kick a server to take a request they read for it."""

    def __init__(self, fd: int) -> None:
        self._ep = select.epoll()
        self._fd = fd
        self._kick_r, self._kick_w = os.pipe()
        os.set_blocking(self._kick_r, False)
        #: the link ended: the kick stays, so that every waiter wakes (wake_all)
        self._ended = False
        # disarmed: one-shot without EPOLLIN still reports a hang-up, once
        self._ep.register(fd, select.EPOLLONESHOT)
        self._ep.register(self._kick_r, select.EPOLLIN | select.EPOLLONESHOT)
        # A twin's server polls for a moment before it sleeps, where another
        # CPU can run the master meanwhile (host/src/spin.rs: waking costs
        # more). Not the master's: its servers wake for callbacks and for
        # replies that came while nobody read, and polling after each took
        # CPU from its callers (8 threads calling a pypy3 twin).
        moment = _MomentPoll is not None and not kernel_state.is_master()
        self._moment = _MomentPoll() if moment else None

    def arm(self) -> None:
        self._ep.modify(self._fd, select.EPOLLIN | select.EPOLLONESHOT)

    def disarm(self) -> None:
        self._ep.modify(self._fd, select.EPOLLONESHOT)

    def kick(self) -> None:
        os.write(self._kick_w, b"k")

    def wait(self, timeout: Optional[float] = None, alone: bool = False) -> Tuple[bool, bool]:
        """Block until the link has something or a server was kicked, or for
        ``timeout`` seconds: (link readable, kicked). ``alone``: no other
        server runs a request, so one polling for a moment takes no CPU
        that another needs."""
        moment = self._moment if timeout is None and alone else None
        # (what came while it polled is taken at once, unless another server
        # took it first: then it sleeps after all)
        polled = moment is not None and moment.poll(self._ep.fileno())
        while True:
            try:
                events = self._ep.poll(0 if polled else -1 if timeout is None else timeout)
            except InterruptedError:  # (a retry waits the whole timeout again: fine for retiring)
                continue
            if polled and not events:
                polled = False
                continue
            if moment is not None:
                moment.waited()
            readable = kicked = False
            for fd, _ in events:
                if fd == self._fd:
                    readable = True
                elif fd == self._kick_r:
                    kicked = True
            return readable, kicked

    def take_kick(self) -> None:
        if self._ended:
            return  # (it stays for the other waiters)
        try:
            while os.read(self._kick_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._ep.modify(self._kick_r, select.EPOLLIN | select.EPOLLONESHOT)
        if self._ended:  # (ended meanwhile: the kick drained above was everyone's)
            self.wake_all()

    def close(self) -> None:
        for close in (self._ep.close, lambda: os.close(self._kick_r), lambda: os.close(self._kick_w)):
            try:
                close()
            except OSError:
                pass

    def wake_all(self) -> None:
        """The link ended: every waiting server wakes (and sees it)."""
        self._ended = True
        try:
            self._ep.modify(self._kick_r, select.EPOLLIN)  # level-triggered: all of them
            self.kick()
        except (OSError, ValueError):
            pass


class Connection:
    """The link to one peer interpreter, usable from any number of threads.

    ``transport`` moves frames (protocol/transport.py, ``Transport``);
    ``describe_end`` explains, once the stream ended, how the peer ended (a
    text, or the exception to raise in the waiting callers); ``kill_peer``
    stops a peer that broke the protocol; ``after_request`` runs after each
    request served here (a twin flushes its stdout). Without ``threads`` (the
    WASI guest), the one thread serves requests inline, also those of other
    chains that arrive while it waits. Without ``new_chains`` (the master's
    link to a sandboxed guest, which has no threads), a request must belong to
    a call this side is making to the peer: any other breaks the link, and no
    thread is ever started for it. ``plain_blocks``: whether large plain
    containers go as plain-data blocks (None: as the transport says,
    ``plain_blocks``). ``share_values``: whether a container that a value
    holds twice (or that holds itself) is sent once and referred to after
    (not by a sandboxed guest, whose values are trees).
    """

    #: a server that finds this many others waiting ends, once it has waited
    #: RETIRE_AFTER seconds with nothing to do (at once, without a gate).
    #: Ending at once made servers come and go with the load: 8 threads
    #: calling a twin started a new server thread for one call in ten.
    MAX_IDLE = 4
    RETIRE_AFTER = 1.0
    #: seconds the gate stays held for a running server (see ``_busy``)
    #: before a spare opens it: the longest a request that blocks holds up
    #: the requests that came after it
    HOLD_FOR = 0.002
    #: reads that bring a single request each, in a row, that end ``_busy``
    LONE_READS = 4
    #: requests of new chains read alone in a row, each of another chain than
    #: the one before, after which a server yields its CPU once (_next_request)
    TAKING_TURNS = 16

    def __init__(
        self,
        transport: Transport,
        peer_id: str,
        serializer: Serializer,
        describe_end: Callable[[], Any],
        on_shutdown: Optional[Callable[[], None]] = None,
        after_request: Optional[Callable[[], None]] = None,
        kill_peer: Optional[Callable[[], Any]] = None,
        threads: bool = True,
        new_chains: bool = True,
        plain_blocks: Optional[bool] = None,
        share_values: bool = True,
    ) -> None:
        self.transport = transport
        self.peer_id = peer_id
        self.serializer = serializer
        self._describe_end = describe_end
        self._on_shutdown = on_shutdown
        self._after_request = after_request
        self._kill_peer = kill_peer
        self._threads = threads
        self._new_chains = new_chains
        self._ids = itertools.count(1)
        self._buffered = transport.buffered
        #: awaited calls wait on the caller's loop (not: a sandboxed guest run
        #: by the calling thread, which cpy2py/awaitable.py gives a worker)
        self.runs_here = not transport.runs_peer
        #: sends a small frame only if it goes out at once (native twins' transport)
        self._send_now = transport.send_now if transport.sends_now else None
        self._holds_signals = transport.stops_for_signals
        #: the master's main thread holds its signals in the kernel's own
        #: steps that a Ctrl-C must not cut short: decoding a request and
        #: sending its reply (``_run``), an interrupted call's cleanup
        #: (``request``). Twins get no Ctrl-C: they run in process groups
        #: of their own.
        self._shields_steps = self._holds_signals and kernel_state.is_master()
        #: large byte strings go to the transport as they are, among the
        #: frame's parts (``dumps(..., parts=True)``), not copied into it
        self._parts = transport.sends_parts
        #: large plain containers go as plain-data blocks, which the peer (a
        #: sandboxed guest, or its master; a twin with only the pure-Python
        #: codec, said in its hello) decodes with the C unpickler
        self._plain = transport.plain_blocks if plain_blocks is None else plain_blocks
        #: a transport whose peer this side runs (a guest): awaited calls
        #: run it from their loop a slice at a time (request_async)
        self._runner: Optional[PeerRunner] = transport if transport.runs_peer else None  # type: ignore[assignment]
        #: awaited calls to that guest: the one whose turn it is, and those
        #: waiting for theirs (_take_turn)
        self._turn_holder: Optional[_AsyncWaiter] = None
        self._turns: Deque[_AsyncWaiter] = deque()
        self._turns_given = 0  # (what a slice's batch goes by: _drive_turns)
        #: chains of awaited calls that ended with their reply and ran no
        #: callback: nothing of them runs on either side any more, so the
        #: next awaited call takes one, as a thread's calls share its chain
        #: (a new chain for every awaited no-op made the peer switch more:
        #: 2.5 switches a call instead of 2.1 pinned to one CPU, a tenth of
        #: the call; benches/README.md)
        self._spare_chains: List[int] = []
        self._share = share_values
        # routing state, guarded by _lock
        self._lock = _thread.allocate_lock()
        self._pending: Dict[int, _Waiter] = {}  # request id -> its caller, until its reply is routed
        self._express: Optional[int] = None  # the request id of an express call (request), not in _pending
        #: requests whose caller left before the reply -> their chains
        self._abandoned: Dict[int, int] = {}
        self._chains: Dict[int, List[Any]] = {}  # chain -> [its thread here, calls in flight]
        self._reading = False
        self._reader: Optional[int] = None  # the thread that holds the reading role
        self._role_takes = 0  # times the role was taken (see _loop_reads)
        self._callers: Deque[_Waiter] = deque()  # callers waiting for the reading role
        self._heir: Optional[_Waiter] = None  # the caller the free role was offered to
        self._handoff: Deque[Item] = deque()  # requests of new chains, for a server
        # A release applies only once every frame read before it is decoded:
        # a reply may name an object that the peer released right after it
        # (see _decoded). Frames are numbered as routed (by the reader only);
        # routed, not yet decoded: frame id -> number (ids: _reply_id, _request_id)
        self._routed = 0
        self._undecoded: Dict[int, int] = {}
        self._held_releases: List[Tuple[int, Any]] = []  # (frames read before it, raw)
        # frames from this number on came after a malformed release, and its error
        self._distrust: Optional[Tuple[int, BaseException]] = None
        self._gate: Optional[_Gate] = None
        # the gate watches the link. A guest's (``_runner``) stays armed while
        # a thread reads: its descriptor becomes readable only when a reader
        # leaves frames (``_give_up_role``) or the guest ends, never for
        # frames a reader is about to take (two epoll_ctl less per call)
        self._armed = False
        # While awaited calls of an event loop are pending, that loop watches
        # the link instead of the gate, so their replies wake no thread but
        # the loop's (see _watch_from): the loop, its pending calls, whether
        # its reader is "on" (registered), "asked" (to be again) or off
        self._watch_loop: Any = None
        self._watch_calls = 0
        self._watching: Optional[str] = None
        self._watch_fd = -1  # a duplicate of the link's descriptor, for the loop
        self._loop_mark = -1  # _role_takes when the loop's reader last gave the role up
        self._unwatched = 0  # awaited calls of other loops pending: the gate watches for them
        self._slice_skips = 0  # awaited calls to go without a slice (_read_slice)
        #: the loop whose thread waited last (_idle_wait), and what ends its
        #: wait sooner: its selector's descriptor (-1: none, a slice)
        self._loop_idle: Tuple[Callable[[], Any], int] = (_no_loop, -1)
        self._servers = 0  # server threads alive
        self._waiting = 0  # ... of which waiting at the gate
        # Many callers at once. Once servers ran requests at the same time
        # (``_busy``), the gate is held disarmed while a server runs one
        # (``_held``): what arrives meanwhile wakes no other server, and the
        # server whose run is over reads it itself (``_next_request``). On
        # PyPy each extra runnable thread costs tens of microseconds per
        # call (its GIL's waiters retry in 100 us slices); on CPython, two
        # thread switches. A spare server waits at the held gate with a
        # timeout (``_timed`` of them); if no run ended within HOLD_FOR, one
        # may block (waiting for a request that waits behind it), and the
        # spare opens the gate. ``_busy`` ends when a run ends with nothing
        # more to read for HOLD_FOR, or reads bring one request at a time
        # (benches/README.md, "Many callers at once").
        self._busy = False
        self._held = False
        # requests of new chains read alone in a row, each of another chain
        # than the one before (see TAKING_TURNS), and the last one's chain
        self._turns_taken = 0
        self._last_lone_chain: Optional[int] = None
        self._held_handoffs = False  # a reader handed requests without waking a server
        self._lone_reads = 0  # reads of a single request in a row while busy
        self._running = 0  # server threads running a request of the peer now
        self._runs_ended = 0  # requests servers finished (what the spare watches)
        self._timed = 0
        self._idle: Deque[_Waiter] = deque()  # ... or, without a gate, asleep
        self.broken: Optional[BaseException] = None
        #: a caller was told that the link ended (master.py restarts a dead
        #: twin on its next use only once somebody was)
        self.reported = False
        #: seconds a request may wait for its reply before ``on_timeout`` is
        #: called with them (native twins' ``timeout``; the master only)
        self.call_timeout: Optional[float] = None
        self.on_timeout: Optional[Callable[[float], None]] = None
        # references (kernel/references.py, guarded by its lock): what the peer
        # holds of this side's objects, key -> count, and (sandboxes) what it
        # may do with them; releases of proxies here, queued until sent;
        # proxy classes made for the class descriptions the peer sent
        self.handed: Dict[Tuple[str, int], int] = {}
        self.grants: Dict[Tuple[str, int], Any] = {}
        self.pending_releases: List[Tuple[str, int, int]] = []
        self.proxy_classes: Dict[Any, type] = {}
        #: called with each new proxy of the peer's objects made here (the
        #: master's link to a fresh guest counts them: cpy2py/fresh.py)
        self.proxy_watcher: Optional[Callable[[Any], None]] = None
        serializer.connection = self

    def __repr__(self) -> str:
        return f"<cpy2py Connection to {self.peer_id!r}{' (broken)' if self.broken else ''}>"

    # -- calling the peer -------------------------------------------------

    def request(self, op: int, *operands: Any) -> Any:
        """Send a request and wait for its result (or raise its exception)."""
        if self.pending_releases:  # what this link carries only
            references.flush_releases(self)
        if self._reading and self._reader == _thread.get_ident():
            raise CallWhileReading(
                f"{self.peer_id!r} cannot be called from the thread that is reading its link "
                "(a finalizer or signal handler ran there); call it from elsewhere"
            )
        if not self.serializer.trusted and decoding_from(self.serializer):
            # a sandboxed peer's values are rebuilt without ever running its code
            raise CallWhileReading(
                f"a value from {self.peer_id!r} cannot be rebuilt here without calling "
                f"{self.peer_id!r} (one of its objects used as a dict key or set member, whose "
                "hash or equality it computes); send such values as a list of pairs instead"
            )
        waiter = _this_waiter()
        chain = waiter.chain
        if chain is None:
            if not self._threads:
                raise SandboxViolation(
                    f"this sandboxed twin can call {self.peer_id!r} only while it serves a call from it "
                    "(a guest has no threads of its own): not from a finalizer, a timer or code run "
                    "at its start"
                )
            chain = waiter.chain = _new_chain()
        # only nested calls can be this deep (a guest's all are: it calls
        # only while it serves, and records no chain as running: _run)
        if (not self._threads or chain in self._chains) and _near_recursion_limit():
            raise _too_deep()
        req_id = next(self._ids)
        payload = self._encode_request(req_id, chain, op, operands)
        if __debug__ and _logging.PER_CALL:
            log.debug("-> %s request %d %s (chain %x)", self.peer_id, req_id, OP_NAMES.get(op, op), chain)
        # From here on, whatever interrupts the call (Ctrl-C in a main thread
        # that holds no signals) is undone by the finally below: each change
        # is recorded with no call in between that could run a signal handler.
        registered = timed = answered = express = False
        reply: Any = None
        stop_guest: Optional[str] = None  # what interrupted this call while its guest ran it
        waiter.depth += 1
        try:
            with self._lock:
                if self.broken is not None:
                    raise self._broken_error()
                # A lone call (no other call waits on the link: the next
                # frame is then nearly always its reply), without a
                # deadline, that takes the free role goes "express": it is
                # registered only if the next frame is not its reply
                # (_express_reply)
                lone = not self._pending and self.call_timeout is None
                if not lone:  # (registered first: _reads_first counts the others)
                    registered = self._register(waiter, req_id, chain)
                reads_first = self._reads_first(waiter, payload)
                express = lone and reads_first
                if express:
                    self._express = req_id
                elif not registered:
                    registered = self._register(waiter, req_id, chain)
            timed = self.call_timeout is not None
            if timed:  # from before the send: a twin that stops reading times out too
                _deadlines().set_deadline((self, req_id), self.call_timeout, self._timed_out)
            try:
                if not (reads_first and self._send_now(payload)):
                    if reads_first:  # the pipe is full: wait for room without the role
                        with self._lock:
                            if express:  # (before anyone else may read its reply)
                                self._express = None
                                registered = self._register(waiter, req_id, chain)
                            express = reads_first = False
                            self._give_up_role()
                    self.transport.send(payload)
            except OSError as err:
                self._fail(err)
                raise self._broken_error() from None
            except BaseException as err:  # Ctrl-C in a send that could not go on
                self._stop_if_cut(err)
                raise
            del payload
            if express:
                reply = self._express_reply(req_id)
                if reply[0] is None:  # another frame, or the link's end: the call waits as any other
                    with self._lock:
                        self._express = None
                        registered = self._register(waiter, req_id, chain)
                    express = False
                    self._route_first(waiter, reply[1])
                    reply = None
            else:
                reply = self._own_reply(waiter, req_id) if reads_first else None
            kind, raw = reply if reply is not None else self._wait_for_reply(waiter, req_id)
            answered = True
            if timed:  # decoding the reply is not the twin's time
                _deadlines().clear((self, req_id))
                timed = False
            return self._result(req_id, kind, raw)
        except BaseException as err:
            if express and reply is None and self._runner is not None:
                # The link's only call, which this thread ran the guest for,
                # unanswered: the guest has no other thread, and would go on
                # with it whenever next run, charging it to that call. It is
                # stopped (below, with the signals held), as a cancelled
                # awaited call's guest is. With other calls in flight the
                # guest may be running another's: it goes on, and a callback
                # it makes for this call is refused (_refuse_late_callback).
                stop_guest = type(err).__name__
            raise
        finally:
            # An interrupted call's cleanup runs with the main thread's
            # signals held: a second Ctrl-C must not cut it short (a call left
            # registered took a later call's reply, which broke the link).
            held, due = _hold_steps() if not answered and self._shields_steps else (False, None)
            try:
                if stop_guest is not None and self.broken is None:
                    self._break_and_kill(
                        TwinterpreterTerminated(
                            f"twinterpreter {self.peer_id!r} was stopped: a call to it was interrupted "
                            f"({stop_guest}) while it ran; its state was lost (the next call starts a "
                            "fresh one)"
                        )
                    )
                if timed:
                    _deadlines().clear((self, req_id))
                if not (express and answered):  # (an express call's reply left nothing to undo)
                    with self._lock:
                        if registered:
                            self._end_call(req_id, chain)
                        elif express:
                            self._express = None
                            if self.broken is None:
                                # (sent, or about to be: its reply is dropped)
                                self._abandoned[req_id] = chain
                        self._leave_queue(waiter)
                        if self._reading and self._reader == _thread.get_ident():
                            self._give_up_role()  # taken before the send, and interrupted before reading
                    if not answered:  # a reply claimed just before the interruption is dropped too
                        self._decoded(req_id)
                        if waiter.early:  # (or kept for when a nested call ended)
                            waiter.early.pop((self, req_id), None)
                if waiter.inbox:  # interrupted: nothing of this call may reach a later one
                    self._drop_leftovers(waiter, req_id, run_peer=not held)
                waiter.depth -= 1
                if not answered and not waiter.depth:
                    # Left before its reply (Ctrl-C, a timeout), and the thread's
                    # outermost call: its chain may still run in the peer, where
                    # the next call would wait behind it. That one starts anew.
                    waiter.chain = None
            finally:
                if held:
                    release_signals()
            if due is not None:
                raise due  # (a second interrupt, due as the cleanup began: after it)

    def _encode_request(self, req_id: int, chain: int, op: int, operands: tuple) -> Any:
        """A request's frame (bytes, or the parts of a large one)."""
        return references.encode(
            [REQUEST, req_id, chain, op, *operands],
            self.serializer.default,
            self._parts,
            self._plain,
            self._share,
        )

    def calls_waiting(self) -> int:
        """Calls on this link that wait for their replies now."""
        return len(self._pending) + (self._express is not None)

    def _register(self, waiter: _Waiter, req_id: int, chain: int) -> bool:
        """Caller holds _lock: the call waits for its reply (routed to
        ``waiter``) and its chain runs on this thread; True."""
        self._pending[req_id] = waiter
        entry = self._chains.get(chain)
        if entry is None:
            self._chains[chain] = [waiter, 1]
        else:
            entry[1] += 1
        return True

    def _reads_first(self, waiter: _Waiter, payload: Any) -> bool:
        """Caller holds _lock, the call registered (unless it may go
        express: a lone call without a deadline, for which nobody else counts):
        whether it sends holding the reading role, which it then takes. A small request goes out
        holding the free role: the gate stays disarmed, so the reply wakes no
        server thread (which would read it and hand it over: two more thread
        switches per call). A send that runs the peer (a guest) lasts as
        long as the peer's work: then only when no other thread waits on the
        link, whose reply, there already, would wait for all of it (this
        thread's outer calls, of a callback it runs, wait for nothing)."""
        if (
            self._send_now is None
            or self._reading
            or waiter.inbox
            or type(payload) is not bytes  # (the parts of a large frame)
            or len(payload) > _SMALL_FRAME
        ):
            return False
        if not self.runs_here and (self._heir is not None or self._others_wait(waiter)):
            return False
        return self._take_role(None)

    def _others_wait(self, waiter: _Waiter) -> bool:
        """Caller holds _lock: whether a call of another thread waits for its
        reply on this link."""
        return len(self._pending) > 1 and any(other is not waiter for other in self._pending.values())

    def _result(self, req_id: int, kind: int, raw: Any) -> Any:
        """The value of a reply, or its exception raised."""
        distrust = self._distrust
        if distrust is not None and self._undecoded.get(req_id, -1) >= distrust[0]:
            self._decoded(req_id)  # the peer broke the protocol before this reply: not trusted
            self.reported = True  # (the link may not be marked broken yet: then its error)
            raise self.broken if self.broken is not None else distrust[1]
        try:
            message, failure = self.serializer.decode(raw, self.serializer.frame_budget(len(raw)))
            if type(message) is not list or len(message) != 3:
                raise ProtocolError(f"malformed reply {references.safe_repr(message)}")
        except ProtocolError as err:
            self._fail(err)  # a peer that sent a malformed frame is not trusted further
            raise
        finally:
            self._decoded(req_id)
        if kind == REPLY and failure is None:
            return message[2]
        err = failure if failure is not None else self.serializer.reraise(message[2])
        # (a frame whose locals hold the exception it raises is a cycle with
        # its traceback: a proxy among the exception's arguments, and the
        # peer's object behind it, would outlive the caller's except clause
        # until the garbage collector ran; a fresh guest with it)
        del message, failure
        try:
            raise err
        finally:
            del err

    # -- calling the peer from asyncio (cpy2py/awaitable.py) ----------------------

    async def request_async(self, op: int, *operands: Any, again_if_unsent: bool = False) -> Any:
        """``request`` for a coroutine: its reply is routed to this event loop
        by whichever thread reads the link (mostly the loop itself: see
        _watch_from), so no thread waits for it. Each such call is a chain of its
        own; the peer's requests on it (callbacks) run on a worker thread as
        that chain's thread, and a coroutine they return runs on this loop.
        Cancelled, the call is abandoned here (its reply is dropped when it
        comes); the peer runs it to its end. ``again_if_unsent``: a call to a
        guest that ended before the call's turn came (another call was
        cancelled or timed out while it ran) raises NotSent, for the caller
        to make it again on the guest's next link (cpy2py/awaitable.py)."""
        import asyncio

        if not self._threads:
            # a guest (one thread, which serves a call of the peer): the
            # call is made on the chain it serves, as a sync call, so a
            # coroutine function of the peer that it runs is awaited on the
            # loop of the peer's call (the guest waits meanwhile, as it does
            # in any call: it runs only while the host drives it)
            return self.request(op, *operands)
        loop = asyncio.get_running_loop()
        if self.pending_releases:
            references.flush_releases(self)
        waiter = _AsyncWaiter(loop)
        serving = getattr(_local, "waiter", None)
        parent = serving.chain if serving is not None and serving.depth else None
        if parent is not None and parent <= _ROOT_CHAINS:
            # made by a coroutine that a request of the peer's runs on this
            # thread (in a loop of its own): a chain the peer traces back to
            # that request's (_derived_chain); never lent to another call
            chain = waiter.chain = _derived_chain(parent)
        else:
            try:
                # (a chain whose last call ended here, as a thread's next call
                # reuses its own: see _spare_chains)
                chain = waiter.chain = self._spare_chains.pop()
            except IndexError:
                chain = waiter.chain = _new_chain()
        req_id = waiter.req_id = next(self._ids)
        try:
            payload = self._encode_request(req_id, chain, op, operands)
        except BaseException:
            _release_derived(chain)  # (never sent)
            raise
        # whatever interrupts the call from here is undone by the finally below
        # (as in ``request``: each change recorded with no call in between)
        watching: Optional[str] = None
        watch_fd = -1
        registered = timed = express = False
        answered = called_back = False  # (whether its chain can be reused: the finally below)
        runner = self._runner
        turn = False  # (a guest's) its request is queued for the guest
        first: Any = _UNREAD  # what an express call read that was not its reply
        sliced = False  # (an express call to a native twin) it waited a slice, not while the loop idled
        try:
            # (a native twin's only when the loop has nothing else to do: see
            # _read_slice; a guest is run for a slice by the call anyway)
            if self.call_timeout is None and (runner is not None or not getattr(loop, "_ready", None)):
                express = self._send_express(req_id, payload, waiter)
                if express:
                    # its reply is waited for on the loop's thread while the
                    # loop has nothing to do (a guest: for a slice), as in
                    # _read_slice and _drive_slice
                    if runner is not None:
                        ready = runner.drive_for(_LOOP_SLICE)
                    else:
                        timeout, unless = self._idle_wait(loop)
                        ready = self._buffered() or self.transport.wait_readable(timeout, unless)
                        sliced = unless < 0
                    reply = self._express_reply(req_id, waiter) if ready else (None, None)
                    if reply[0] is not None:
                        express = False  # (its reply: nothing to undo)
                        answered = True
                        return self._result(req_id, *reply)
                    first = reply[1]  # the call waits as any other, registered first
            if runner is not None:
                # (no variable yet: no callback of an awaited call ever ran)
                waiter.outer = _callbacks_var.get() if _callbacks_var is not None else ()
            with self._lock:
                if self.broken is not None and not express:
                    raise self._unsent_error(runner is not None and again_if_unsent)
                if runner is None:
                    watching, watch_fd, old = self._watch_from(loop)  # (first: it may fail, in os.dup)
                else:
                    # a guest's frames come to the thread that runs it (the
                    # loop's slice, a worker), and those it leaves to the gate
                    old = None
                    if not express and self._turn_holder is None:
                        # mostly: nobody has the turn (see _take_turn); the
                        # guest runs only when driven, after the deadline is set
                        # (an express call's request is queued already, and
                        # the turn is its own: _send_express)
                        waiter.payload = payload
                        self._give_turn(waiter)
                        turn = True
                self._pending[req_id] = waiter
                self._chains[chain] = [waiter, 1]
                registered = True
                if express:
                    self._express = None
            if express:
                # (the role and the signals it held are given back as the
                # frame is routed; first, so that a failure leaves nothing held)
                express = False
                self._route_for_loop(first, sliced)
            if watch_fd >= 0 or old is not None:
                self._start_watching(loop, watch_fd, old)
                watch_fd = -1  # (the reader is there)
            timed = self.call_timeout is not None
            if timed:  # (an awaited call's callbacks count as the twin's time)
                _deadlines().set_deadline((self, req_id), self.call_timeout, self._timed_out)
            try:
                if first is not _UNREAD:
                    pass  # (sent express)
                elif runner is None:
                    self.transport.send(payload)  # (at once, holding the GIL, if the pipe has room)
                elif turn:  # (taken above)
                    if not waiter.sent:  # the guest ended before its turn
                        self._fail(None)
                        raise self._unsent_error(again_if_unsent)
                elif self._turn_holder is not None and self._turn_holder in waiter.outer:
                    # made by a callback of the awaited call whose turn it
                    # is: the guest waits in that call, and serves this one
                    # meanwhile (a task such a callback leaves behind takes
                    # turns once that call is over)
                    runner.queue(payload)
                    waiter.sent = True
                else:
                    # a guest runs one call at a time: awaited calls take
                    # turns (one cancelled before its turn never reaches it)
                    waiter.payload = payload  # (queued when its turn comes)
                    if not self._take_turn(waiter):
                        await self._wait_for_turn(waiter)
                    if not waiter.sent:  # the guest ended before its turn
                        self._fail(None)
                        raise self._unsent_error(again_if_unsent)
            except OSError as err:
                self._fail(err)
                raise self._broken_error() from None
            except BaseException as err:  # Ctrl-C in a send that could not go on
                self._stop_if_cut(err)
                raise
            del payload
            # the loop ran the guest a slice (or read a native twin's link
            # for one: express) since it last sent it something
            ran = first is not _UNREAD
            while True:
                while not waiter.inbox:  # until a frame is routed to it (or the link ends)
                    if self.broken is not None:
                        raise self._broken_error()
                    if runner is None:
                        # a short call's reply is read here, without a turn
                        # of the loop (a slice of the twin's time, once)
                        if not ran:
                            ran = True
                            # (only when the loop has nothing else to do: asked
                            # first without the lock, then again with it)
                            if len(self._pending) == 1 and not getattr(loop, "_ready", None):
                                self._read_slice(waiter)
                                continue
                    else:
                        # A short call ends in a slice run here (no thread is
                        # handed it); a longer one goes on on a worker thread,
                        # so the loop is free and the guest runs beside it
                        if not ran:
                            ran = True
                            if self._drive_slice(runner, waiter):
                                continue
                        with self._lock:
                            self._start_driver(waiter)
                    future = waiter.future = loop.create_future()
                    try:
                        await future
                    finally:
                        waiter.future = None
                _, kind, key, raw = waiter.inbox.popleft()
                if kind != REQUEST:
                    break  # (only this call's reply is routed to it)
                called_back = True
                await loop.run_in_executor(callback_workers(), self._run_for, waiter, key, raw)
                ran = False  # (the answer ran the guest on, on that thread)
            answered = True
            return self._result(req_id, kind, raw)
        except asyncio.CancelledError:
            with _callback_lock:  # (the peer's callbacks it awaits are cancelled with it)
                for callback in waiter.callbacks if type(waiter.callbacks) is set else ():
                    callback.cancel()
                waiter.callbacks = _CALL_CANCELLED
            if waiter.sent and self.broken is None and self._pending.get(req_id) is waiter:
                # cancelled while the guest runs the call: only stopping the
                # guest ends it (it would go on with it whenever run next)
                self._break_and_kill(
                    TwinterpreterTerminated(
                        f"twinterpreter {self.peer_id!r} was stopped: a call to it was cancelled "
                        "while it ran; its state was lost (the next call starts a fresh one)"
                    )
                )
            raise
        finally:
            if timed:
                _deadlines().clear((self, req_id))
            interrupted = self._express == req_id  # as it went express (not registered)
            if interrupted or registered or watching is not None:
                with self._lock:
                    if interrupted:  # (only this call sets or clears its id there)
                        self._express = None
                        if self.broken is None:
                            self._abandoned[req_id] = chain  # (sent, or about to be: its reply is dropped)
                        if self._reading and self._reader == _thread.get_ident():
                            self._give_up_role()
                    if runner is not None and (self._turn_holder is waiter or self._turns):
                        self._leave_turns(waiter)
                    if registered:
                        self._end_call(req_id, chain)
                    if watching is not None:
                        if watch_fd >= 0 and self._watch_loop is loop and self._watching == "on":
                            # interrupted before its reader was surely added: the
                            # next call adds it (twice is harmless, none a hang)
                            self._watching = None
                        self._unwatch_from(loop, watching)
            if interrupted or express:
                release_signals()  # (held if it read a frame that was not its reply)
                self._decoded(req_id)  # (a reply claimed just before: dropped)
            if waiter.inbox:  # cancelled: nothing of this call may be left behind
                self._drop_leftovers(waiter, req_id)
            elif answered and not called_back:
                if chain > _ROOT_CHAINS:  # (a derived chain is for its call only)
                    _release_derived(chain)
                elif len(self._spare_chains) < _SPARE_CHAINS:
                    self._spare_chains.append(chain)

    def _awaited_call(self, chain: int) -> Optional[_AsyncWaiter]:
        """The awaited call over this link that runs ``chain`` here now, if
        any (its loop awaits the coroutines of the peer's requests of it)."""
        with self._lock:
            entry = self._chains.get(chain)
        awaiter = entry[0] if entry is not None else None
        return awaiter if type(awaiter) is _AsyncWaiter else None

    def _stop_if_cut(self, err: BaseException) -> None:
        """A send ended by ``err`` (Ctrl-C): if it cut a frame half-sent,
        the peer's stream is lost, and so is the peer."""
        if self.transport.cut_mid_frame:
            self._break_and_kill(
                TwinterpreterTerminated(
                    f"twinterpreter {self.peer_id!r} was stopped: a message to it was cut "
                    f"half-sent by {type(err).__name__}; its state was lost"
                )
            )

    # Awaited calls to a guest this side runs take turns: the one whose turn
    # it is has its request queued for the guest; the next one's is queued
    # as soon as the guest's reply to it is routed (by whichever thread
    # reads), and its loop is woken. A call cancelled before its turn is
    # passed over and never reaches the guest.

    def _take_turn(self, waiter: _AsyncWaiter) -> bool:
        """``waiter``'s turn now if nobody has it (its request is queued for
        the guest: True), else in line for it (False: ``_wait_for_turn``)."""
        with self._lock:
            if self._turn_holder is None:
                self._give_turn(waiter)
                return True
            self._turns.append(waiter)
            return False

    async def _wait_for_turn(self, waiter: _AsyncWaiter) -> None:
        """Wait in line for ``waiter``'s turn; its request is queued for the guest then."""
        while not waiter.sent and self.broken is None and self._turn_holder is not waiter:
            future = waiter.future = waiter.loop.create_future()
            try:
                await future
            finally:
                waiter.future = None

    def _give_turn(self, waiter: _AsyncWaiter) -> None:
        """Caller holds _lock: it is ``waiter``'s turn; its request goes to the guest."""
        self._turn_holder = waiter
        self._turns_given += 1
        waiter.turn_no = self._turns_given
        payload, waiter.payload = waiter.payload, None
        try:
            self._runner.queue(payload)  # type: ignore[union-attr]
        except OSError:  # (the guest ended: the call finds the link broken)
            return
        waiter.sent = True

    def _pass_turn(self) -> None:
        """Caller holds _lock: the call whose turn it was got its reply (or
        ended); the next waiting call whose task was not cancelled takes its
        turn and is woken. Its task runs the guest for it; while its loop
        does not run, a worker does, and so does one if the loop, woken from
        another thread, has not got to it within ``_TURN_GRACE`` (a loop
        held up by sync code, or stopped before its task ran: the calls
        behind it, other loops' too, would wait for it)."""
        self._turn_holder = None
        while self._turns:
            waiter = self._turns.popleft()
            if waiter.future is not None and waiter.future.cancelled():
                continue  # (cancelled before its turn: it never reaches the guest)
            self._give_turn(waiter)
            waiter.offer()
            if not waiter.loop.is_running():
                self._start_driver(waiter)
            elif waiter.thread != _thread.get_ident():
                _deadlines().set_deadline((self, "turn", waiter), _TURN_GRACE, self._turn_overdue)
            return

    def _turn_overdue(self, key: Tuple[Any, str, _AsyncWaiter]) -> None:
        """The deadlines thread: the call whose turn another thread passed
        (``_pass_turn``) still waits for its loop to run the guest for it:
        a worker does."""
        waiter = key[2]
        with self._lock:
            waits = self._turn_holder is waiter and not waiter.inbox
            if waits and self._pending.get(waiter.req_id) is waiter:
                self._start_driver(waiter)

    def _leave_turns(self, waiter: _AsyncWaiter) -> None:
        """Caller holds _lock: ``waiter``'s call ends; it waits for no turn any more."""
        if self._turn_holder is waiter:
            self._pass_turn()
        elif waiter in self._turns:
            self._turns.remove(waiter)

    def _start_driver(self, waiter: _AsyncWaiter) -> None:
        """Caller holds _lock: a worker thread runs the guest until a frame for
        ``waiter`` comes (unless one does already)."""
        if not waiter.driving and waiter.sent and self.broken is None:
            waiter.driving = True
            callback_workers().submit(self._drive_for, waiter)

    def _drive_for(self, waiter: _AsyncWaiter) -> None:
        """On a worker thread: run the guest while ``waiter``'s call (an awaited
        call to it, which its loop's slice did not end) waits for a frame, and
        route what it sends; the loop is free meanwhile, and need not run."""
        me = _this_waiter()
        try:
            while True:
                with self._lock:
                    entry = self._chains.get(waiter.chain)  # type: ignore[arg-type]
                    if waiter.inbox or self.broken is not None or entry is None or entry[0] is not waiter:
                        return  # (a frame came for it, or the call ended)
                    read = self._take_role(me)
                if read:  # (the guest's recv runs it until it sends a frame)
                    self._read(None, serve=False)
                else:
                    me.sleep()  # (until offered the role)
        finally:
            with self._lock:
                waiter.driving = False
                self._leave_queue(me)

    def _drive_slice(self, runner: PeerRunner, waiter: _AsyncWaiter) -> bool:
        """``waiter``'s awaited call to a guest this side runs, on
        the loop's thread: if the reading role is free, run the guest for at
        most one slice and route the frame it sent, if any (the call's reply,
        a callback of its chain, a release), and return True; else False
        (the thread that holds the role runs the guest, and routes this
        call's frames). The call's reply, nearly always that frame, goes to
        its inbox without the layers of ``_read`` (as in ``_own_reply``)."""
        with self._lock:
            if self.broken is not None or not self._take_role(None):
                return False
            first = self._turns_given
        try:
            ends = time.monotonic() + _LOOP_SLICE
            ready = runner.drive_for(_LOOP_SLICE)
        except BaseException:
            self._after_loop_read(False, False)
            raise
        if ready:  # a frame waits, or the guest ended: its recv returns at once
            self._deliver_slice_frame(waiter)
            self._drive_turns(runner, waiter, ends, first)
        else:
            self._after_loop_read(False, False)
        return True

    def _drive_turns(self, runner: PeerRunner, waiter: _AsyncWaiter, ends: float, first: int) -> None:
        """After ``_drive_slice`` ran the guest for ``waiter``'s call: while
        the slice lasts, the guest goes on with the calls of the same loop
        whose turn came in this slice (their requests are queued as each
        reply is routed: ``_pass_turn``; not a call whose turn came before,
        which may wait for the answer to a callback that only the loop can
        give), and their replies go to their inboxes.
        Their tasks, woken as their turns came, then find them there: many
        concurrent awaited calls run in batches, one pass of the loop for
        many calls, instead of a pass and a slice each (and a worker's
        hand-offs after a long call: benches/README.md)."""
        while True:
            left = ends - time.monotonic()
            if left <= 0:
                return
            with self._lock:
                nxt = self._turn_holder
                if (
                    nxt is None
                    or nxt.turn_no <= first  # (so never the slice's own call, whose turn came before)
                    or nxt.loop is not waiter.loop
                    or not nxt.sent
                    or nxt.driving
                    or nxt.inbox
                    or self._pending.get(nxt.req_id) is not nxt
                    or self.broken is not None
                    or self._heir is not None  # (a caller of another thread was offered the role: its turn)
                    or not self._take_role(None)
                ):
                    return
            try:
                ready = runner.drive_for(left)
            except BaseException:
                self._after_loop_read(False, False)
                raise
            if not ready:  # (it runs on: its own task's slice, then a worker, go on with it)
                self._after_loop_read(False, False)
                return
            self._deliver_slice_frame(nxt)
            if self._turn_holder is nxt:  # (not its reply: a callback of it, which its task runs)
                return
            waiter = nxt

    def _deliver_slice_frame(self, waiter: _AsyncWaiter) -> None:
        """On the loop's thread, which holds the reading role, a frame waiting
        (or the link's end) for ``waiter``'s awaited call
        (``_read_slice``, ``_drive_slice``): read with the signals held, so
        that it is delivered before a handler runs; the call's reply goes to
        its inbox without the layers of ``_read`` (as in ``_own_reply``),
        anything else (a release before the reply, a callback) is routed by
        ``_read``. The role and the signals are given back."""
        held = False
        handed = False  # the role given up, or handed to _read, which gives it up
        try:
            held = self._holds_signals and hold_signals()  # (see _next_for)
            raw = self._read_frame()
            if raw is not None:  # (else the link ended: marked so)
                kind = self._claim_if_own_reply(raw, waiter.req_id)
                handed = True
                if kind is not None:
                    waiter.inbox.append((self, kind, waiter.req_id, raw))
                else:
                    self._read(None, serve=False, first=raw)
        finally:
            self._after_loop_read(handed, held)

    def _send_express(self, req_id: int, payload: Any, waiter: _AsyncWaiter) -> bool:
        """An awaited call, ``waiter``'s: if it is the only call on the link
        (and, to a guest, no awaited call waits for its turn), the reading
        role is free and its request small, it goes express (as a sync call
        can, see ``request``): sent holding the role, not registered; whether
        it was sent so (else nothing was sent, and the role is free). A
        guest's request is queued, not run, and the turn is the call's
        (``_take_turn``): the caller runs the guest for a slice."""
        if (
            self._send_now is None
            or self._pending  # (asked again below: here it spares concurrent calls the lock)
            or self._reading
            or type(payload) is not bytes
            or len(payload) > _SMALL_FRAME
        ):
            return False
        runner = self._runner
        with self._lock:
            if (
                self.broken is not None
                or self._slice_skips  # (slow calls lately: _read_slice)
                or self._pending
                or self._express is not None
                or self._heir is not None
                or self._turn_holder is not None
                or not self._take_role(None)
            ):
                return False
            self._express = req_id
            if runner is not None:
                self._turn_holder = waiter
                waiter.sent = True
        try:
            if runner is None:
                sent = self._send_now(payload)
            else:
                runner.queue(payload)
                return True
        except OSError as err:
            self._fail(err)  # (request_async's finally gives the role and the turn back)
            raise self._broken_error() from None
        if not sent:  # the pipe is full: it waits for room without the role
            with self._lock:
                self._express = None
                self._give_up_role()
        return sent

    def _route_for_loop(self, raw: Any, sliced: bool) -> None:
        """An express awaited call that did not get its reply while it
        waited, now registered: ``raw``, what it read, is routed (``_read``
        gives the role and the held signals back); None (nothing came, or
        the link ended): the role is given back, and the loop watches a
        native twin's link from now on, whose next awaited calls take no
        slice if the wait was one (``sliced``: as after ``_read_slice``; a
        guest is run by a worker)."""
        if raw is not None:
            self._read(None, serve=False, first=raw)
            return
        with self._lock:
            if sliced:
                self._slice_skips = _SLICE_SKIPS
            self._give_up_role()

    def _read_slice(self, waiter: _AsyncWaiter) -> None:
        """``waiter``'s awaited call to a native twin, just sent, on
        the loop's thread, whose loop has no other task ready to run (its
        caller asks asyncio's loops, by their ready queue): while it is the
        only call waiting on the link and the reading role is free, wait
        for frames (as long as the loop has nothing to do: ``_idle_wait``)
        and route them, until one is the call's (its reply, or a callback).
        A no-op's reply comes in tens of microseconds: handed to the call
        here, it costs none of the loop's turns (about 10 us pinned to one
        CPU, half a call). Concurrent calls go without, so that their
        requests go out together. Where the loop does not say when it has
        something to do, the wait is a slice (``_READ_SLICE``), and one that
        ends with nothing for the call makes the link's next awaited calls
        go without one (``_SLICE_SKIPS``): slow calls leave the loop free."""
        with self._lock:
            if self._slice_skips:
                self._slice_skips -= 1
                return
        left, unless = self._idle_wait(waiter.loop)
        ends = 0.0
        while True:
            with self._lock:
                if self.broken is not None or len(self._pending) != 1 or self._heir is not None:
                    return  # (others wait: their replies are the loop's to route)
                if not self._take_role(None):
                    return
            try:
                ready = self._buffered() or self.transport.wait_readable(left, unless)
            except BaseException:
                self._after_loop_read(False, False)
                raise
            if not ready:
                with self._lock:
                    if unless < 0:  # (a slice, not the loop's own events, ended the wait)
                        self._slice_skips = _SLICE_SKIPS
                    self._give_up_role()
                return
            self._deliver_slice_frame(waiter)
            if waiter.inbox or self.broken is not None:
                return
            if not ends:
                ends = time.monotonic() + left
            left = ends - time.monotonic()
            if left <= 0:
                return

    def _idle_wait(self, loop: Any) -> Tuple[float, int]:
        """``wait_readable``'s arguments for the thread of ``loop``, which has
        nothing ready to run, to wait for a frame: for asyncio's loops, as
        long as the loop has nothing to do: until its next timer, and no
        longer than its selector has nothing for it (any descriptor it
        watches readable, a wake-up from another thread or a signal), for
        at most ``_IDLE_WAIT`` (a step of a task that lasts 100 ms is
        reported in asyncio's debug mode); for others, which do not say
        that, ``_READ_SLICE``. (A short deadline costs: a timer that
        expires before the next tick reprograms the clock, a trap to the
        hypervisor on a VM: about a tenth of an awaited no-op.)"""
        idle = self._loop_idle  # (one read: another thread's loop may replace it)
        if idle[0]() is not loop:
            selector = getattr(loop, "_selector", None)
            fileno = getattr(selector, "fileno", None)
            watched = fileno is not None and type(getattr(loop, "_scheduled", None)) is list
            try:
                # (weakly: a closed loop is not kept alive by the link)
                idle = self._loop_idle = (_weakref(loop), fileno() if watched else -1)
            except TypeError:  # (a loop that takes no weak reference)
                return _READ_SLICE, -1
        if idle[1] < 0:
            return _READ_SLICE, -1
        if getattr(loop, "_stopping", False):  # (loop.stop() was called: it ends this pass)
            return 0.0, idle[1]
        timers = loop._scheduled
        return (min(max(0.0, timers[0].when() - loop.time()), _IDLE_WAIT) if timers else _IDLE_WAIT), idle[1]

    def _end_call(self, req_id: int, chain: int) -> None:
        """Caller holds _lock: a call of ``chain`` is over. If it left before
        its reply was routed (a signal handler raised, a task was cancelled),
        the reply may still come, and is dropped then."""
        if self._pending.pop(req_id, None) is not None and self.broken is None:
            self._abandoned[req_id] = chain
        entry = self._chains[chain]
        entry[1] -= 1
        if entry[1] == 0:
            del self._chains[chain]

    # While awaited calls are pending, their event loop reads the link when
    # the role is free, in place of the gate: a reply then wakes the loop
    # only, not a server thread that would hand it over. One loop watches at
    # a time; awaited calls of other loops keep the gate armed as well, and a
    # loop found stopped is taken over by the next one. Callers of any thread
    # still take the free role and read themselves, so sync calls never wait
    # for a loop. Between awaited calls the gate watches as well, so a loop
    # that ends (asyncio.run returned) leaves the link watched.

    def _watch_from(self, loop: Any) -> Tuple[Optional[str], int, Optional[Tuple[Any, int]]]:
        """Caller holds _lock. On ``loop``, as an awaited call starts: who
        watches the link for it, "loop" (this loop) or "gate" (another loop
        watches), or None (no gate: whoever reads routes its reply), undone by
        ``_unwatch_from``; then the descriptor the loop's reader is to watch
        (-1: none to add) and the earlier loop's watch to drop, both done by
        ``_start_watching``."""
        old = None
        if self._gate is None or self.broken is not None:
            return None, -1, None
        if self._watch_loop is not loop:
            if self._watch_calls and self._watch_loop.is_running():
                self._unwatched += 1  # another loop watches: the gate as well
                if not self._reading and self._heir is None:
                    self._role_is_free()
                return "gate", -1, None
            if self._watch_loop is not None:  # an earlier loop, idle or stopped
                old = self._watch_loop, self._watch_fd
            # the loop's own descriptor, closed by the link on the loop's thread
            self._watch_loop, self._watch_fd = loop, os.dup(self.transport.fileno())
            self._watching, self._watch_calls, self._loop_mark = None, 0, -1
        if self._armed and not self._unwatched and self._runner is None:
            self._armed = False
            self._gate.disarm()
        self._watch_calls += 1  # (after the last call: the caller records what it returns)
        if self._watching is None and not self._reading:  # (else asked when it is free)
            self._watching = "on"
            return "loop", self._watch_fd, old
        return "loop", -1, old

    def _start_watching(self, loop: Any, fd: int, old: Optional[Tuple[Any, int]]) -> None:
        """After ``_watch_from``: the earlier loop's watch dropped, this loop's
        reader added (if anything stops that, Ctrl-C included, the call's
        end marks the loop as not watching: see ``request_async``)."""
        if old is not None:
            _drop_watch(*old)
        if fd >= 0:
            loop.add_reader(fd, self._loop_reads, loop, fd)

    def _unwatch_from(self, loop: Any, how: str) -> None:
        """Caller holds _lock: on ``loop``, one of its awaited calls ends."""
        if how == "gate":
            self._unwatched -= 1
            return
        if self._watch_loop is not loop:  # (taken over meanwhile)
            return
        self._watch_calls -= 1
        if not self._watch_calls and not self._reading and self._heir is None:
            self._role_is_free()  # the gate watches too

    def _loop_watches(self) -> bool:
        """Caller holds _lock, the role is free: whether the watching loop
        takes over (asked to read again, if it stopped when another did)."""
        loop = self._watch_loop
        if not self._watch_calls or self.broken is not None or not loop.is_running():
            return False
        if self._watching is None:
            try:
                loop.call_soon_threadsafe(self._watch_again, loop)
            except RuntimeError:  # closed meanwhile
                return False
            self._watching = "asked"
        return True

    def _watch_again(self, loop: Any) -> None:
        with self._lock:
            add = self._watch_loop is loop and self._watching == "asked"
            if add:
                self._watching = "on"
            fd = self._watch_fd
        if add:
            loop.add_reader(fd, self._loop_reads, loop, fd)

    def _loop_reads(self, loop: Any, fd: int) -> None:
        """The loop's reader: the link was readable when the loop looked."""
        with self._lock:
            mine = self._watch_loop is loop
            read = mine and self._watch_calls and self._watching == "on" and not self._reading
            read = read and self.broken is None
            if read:
                # Another reader may have taken those bytes since the loop
                # looked (the loop never waits in a read): not if nobody took
                # the role since this reader gave it up, before the loop looked
                others_read = self._role_takes != self._loop_mark
                self._take_role(None)
            elif mine:  # another thread reads, or no call waits: asked again when needed
                self._watching = None
        if not read:
            loop.remove_reader(fd)
            return
        if others_read and not self._buffered() and not select.select([fd], [], [], 0)[0]:
            with self._lock:
                self._give_up_role()
            return
        held = handed = False  # handed: the role given up, or handed to _read, which gives it up
        try:
            held = self._holds_signals and hold_signals()  # (see _next_for; _read lets them through)
            raw = self._read_frame()
            if raw is None:  # the link ended (marked so)
                return
            kind, key, _ = codec.peek(raw)
            if (kind == REPLY or kind == RAISE) and not self._buffered():
                # nearly always: the reply to an awaited call. Routed and the
                # role given up in one lock section (delivered first: a waiter
                # that finds the role free must find its reply in its inbox)
                with self._lock:
                    target = self._claim_reply(key)
                    if target is not None:
                        target.deliver((self, kind, key, raw), loop)
                        self._give_up_role()
                        self._loop_mark = self._role_takes  # (see _loop_reads)
                        handed = True
                        return
            handed = True
            self._read(None, serve=False, first=raw)
        except ProtocolError as err:  # (a malformed header)
            self._fail(err)
        finally:
            self._after_loop_read(handed, held)

    def _after_loop_read(self, handed: bool, held: bool) -> None:
        """A read on the loop's thread is over (``_loop_reads``,
        ``_deliver_slice_frame``): the role given back unless it was ``handed`` on
        (to ``_read``, or with a claimed reply), the signals ``held`` for it
        let through."""
        if not handed:
            with self._lock:
                self._give_up_role()
        if held:
            release_signals()

    def _end_watch(self) -> None:
        """The link ended: no loop watches it any more."""
        with self._lock:
            loop, fd = self._watch_loop, self._watch_fd
            self._watch_loop, self._watch_fd, self._watch_calls = None, -1, 0
        if loop is not None:
            _drop_watch(loop, fd)

    def _run_for(self, awaiter: _AsyncWaiter, req_id: int, raw: Any) -> None:
        """On a worker thread: run a request of an async call's chain, this
        thread being that chain's thread meanwhile (the peer's nested
        requests come here, coroutines run on the caller's loop)."""
        waiter = _this_waiter()
        with self._lock:
            entry = self._chains.get(awaiter.chain)  # type: ignore[arg-type]
            taken = entry is not None and entry[0] is awaiter
            if taken:
                entry[0] = waiter
        if not taken:  # the async call was cancelled meanwhile
            self._decoded(_request_id(req_id))
            self._send_reply(req_id, RAISE, _interrupted(self.peer_id))
            return
        outer, waiter.chain = waiter.chain, awaiter.chain
        _local.loop = awaiter.loop
        try:
            # in a copy of the caller's context, as a callback in one
            # interpreter would be
            awaiter.context.copy().run(self._run_callback, awaiter, waiter, req_id, raw)
        finally:
            with self._lock:
                entry[0] = awaiter
            waiter.chain = outer
            _local.loop = None
            while waiter.inbox:  # what came for the chain after the reply went out
                awaiter.deliver(waiter.inbox.popleft())

    def _run_callback(self, awaiter: _AsyncWaiter, waiter: _Waiter, req_id: int, raw: Any) -> None:
        # (a coroutine it returns runs on the loop in this context: an awaited
        # call it makes to this peer does not wait for the turn of this one)
        _callbacks_of().set((*awaiter.outer, awaiter))
        with user_code_signals:
            self._run(waiter, req_id, raw)

    def _wait_for_reply(self, waiter: _Waiter, req_id: int) -> Tuple[int, Any]:
        while True:
            early = waiter.early.pop((self, req_id), None) if waiter.early else None
            conn, kind, key, raw = early if early is not None else self._next_for(waiter)
            if kind == REQUEST:  # a nested call of our chain: run it right here
                # the time this side spends on it is not the peer's
                left = _deadlines().clear((self, req_id)) if self.call_timeout is not None else None
                try:
                    conn._run(waiter, key, raw)
                finally:
                    if left is not None:
                        _deadlines().set_deadline((self, req_id), max(left, 0.0), self._timed_out)
                del raw  # its arguments must not outlive the nested call
            elif conn is self and key == req_id:
                return kind, raw
            else:
                # The reply to an outer call of this thread, come while a call
                # made later waits: kept until this thread's stack is back in
                # that outer call. Without threads, one thread serves several
                # callers' chains; with them, the peer's caller left the
                # request this thread runs (Ctrl-C) and answered the request
                # that made it. The call waiting here still gets its reply:
                # every request is answered, a late callback too, or the link
                # ends and wakes every waiting call.
                waiter.early[(conn, key)] = (conn, kind, key, raw)

    def _own_reply(self, waiter: _Waiter, req_id: int) -> Optional[Tuple[int, Any]]:
        """The caller sent its request holding the reading role: the next
        frame is nearly always its reply. Read it, route it and give the role
        up in one lock section, without the layers of ``_next_for`` and
        ``_read``; anything else is routed by ``_read`` (given the frame) and
        None returned, the call then waits as any other."""
        held = self._holds_signals and hold_signals()  # (see _next_for)
        try:
            raw = self._read_frame()
            if raw is None:
                return None  # (the link ended: marked so)
            kind = self._claim_if_own_reply(raw, req_id)
            if kind is not None:
                return kind, raw
            self._read(waiter, first=raw)  # (its own to its inbox: _wait_for_reply takes it first)
            return None
        finally:
            if held:
                release_signals()

    def _express_reply(self, req_id: int, waiter: Optional[_AsyncWaiter] = None) -> Tuple[Optional[int], Any]:
        """An express call (sync: ``request``; awaited: ``_send_express``,
        its ``waiter``) sent holding the reading role, not registered:
        nobody else reads, so nothing of it can have been routed. The next
        frame is nearly always its reply: claimed and the role (and an
        awaited call's turn) given up in one lock section, returned as
        (kind, frame). Another frame is returned as
        (None, frame) with the role and the signals still held; the link's
        end as (None, None), the role held. Then the caller registers the
        call and routes what was read (``_route_first``, ``_route_for_loop``)."""
        held = self._holds_signals and hold_signals()  # (see _next_for)
        other = False
        try:
            raw = self._read_frame(True)
            if raw is None:  # (the link ended: marked so)
                return None, None
            kind, key, _ = codec.peek(raw)  # (never raises: _route says what is malformed)
            if key == req_id and (kind == REPLY or kind == RAISE) and not self._buffered():
                with self._lock:
                    self._express = None
                    self._undecoded[req_id] = self._routed  # (as _claim_reply)
                    self._routed += 1
                    self._give_up_role(left=False)
                    if waiter is not None and self._turn_holder is waiter:
                        self._pass_turn()
                return kind, raw
            other = True
            return None, raw
        finally:
            if held and not other:
                release_signals()

    def _route_first(self, waiter: _Waiter, raw: Any) -> None:
        """The caller holds the reading role (and its signals: ``_read``
        releases them) and read ``raw``, which is not its reply (None: the
        link ended): it is routed as any frame, and what is the caller's
        goes to its inbox."""
        self._read(waiter, first=raw)  # (its own to its inbox: _wait_for_reply takes it first)

    def _claim_if_own_reply(self, raw: Any, req_id: int) -> Optional[int]:
        """The reader holds the role and read ``raw``: if it is the reply to
        ``req_id`` and nothing else was read ahead, claim it and give the
        role up in one lock section, and return its kind; else None (the
        reader routes it as any frame: a malformed header peeks as Nones,
        and ``_route`` says what is wrong)."""
        kind, key, _ = codec.peek(raw)
        if key == req_id and (kind == REPLY or kind == RAISE) and not self._buffered():
            with self._lock:
                if self._claim_reply(req_id) is not None:
                    self._give_up_role(left=False)
                    return kind
        return None

    def _drop_leftovers(
        self, waiter: Union[_Waiter, _AsyncWaiter], req_id: int, run_peer: bool = True
    ) -> None:
        """A call left early (Ctrl-C): its reply, if delivered, is dropped, and
        requests of its chain that it will not run now are answered (not
        ``run_peer``: signals held, a guest's answers are queued, see
        ``_send_reply``)."""
        kept: List[Item] = []
        while waiter.inbox:
            item = waiter.inbox.popleft()
            conn, kind, key, _ = item
            if conn is self and kind != REQUEST and key == req_id:
                self._decoded(key)
                continue  # the abandoned call's reply
            if kind == REQUEST and conn is self:
                self._decoded(_request_id(key))
                conn._send_reply(key, RAISE, _interrupted(self.peer_id), run_peer)
                continue
            kept.append(item)
        waiter.inbox.extend(kept)

    def _next_for(self, waiter: _Waiter) -> Item:
        """The next frame for ``waiter``: from its inbox, or read by itself."""
        while True:
            if waiter.inbox:
                with self._lock:  # if it waited for the role, it needs it no more
                    self._leave_queue(waiter)
                return waiter.inbox.popleft()
            mine = self._reading and self._reader == _thread.get_ident()  # taken before its send
            held = self._holds_signals and hold_signals()  # (main thread) while it may read; see _read
            read = False
            try:
                with self._lock:
                    if waiter.inbox:
                        continue
                    if self.broken is not None:
                        raise self._broken_error()
                    read = mine or self._take_role(waiter)
            finally:
                # _read releases them once it is done; whatever does not go on
                # to read (the link ended, a frame came, it waits for the role)
                # releases them here, the role it may still hold included
                if held and not read:
                    release_signals()
            if read:
                self._read(waiter)  # (its own to its inbox)
                if waiter.inbox:
                    return waiter.inbox.popleft()
            else:
                waiter.sleep()

    # -- reading and routing ----------------------------------------------

    def _take_role(self, waiter: Optional[_Waiter]) -> bool:
        """Caller holds _lock: take the free reading role (disarming the gate,
        so that what arrives wakes no server; a guest's stays armed), or
        queue for it."""
        if self._reading:
            if waiter is not None and waiter.queued is not self:
                waiter.queued = self
                self._callers.append(waiter)
            return False
        reader = _thread.get_ident()  # (first: no call between the two below)
        self._reading = True
        self._reader = reader
        self._role_takes += 1
        self._heir = None
        self._held = False  # (the reader's now: it disarms the gate)
        if self._armed and self._runner is None:
            self._armed = False
            self._gate.disarm()  # type: ignore[union-attr]
        return True

    def _give_up_role(self, left: bool = True, runs: bool = False) -> None:
        """Caller holds _lock: give up the reading role (``left``: frames may
        have been left unread; False: the reader just found none; ``runs``: a
        server that goes on to run a request it read)."""
        self._reading = False
        self._reader = None
        if left and self._runner is not None and self._buffered():
            self._runner.publish()  # frames left for others: the gate's thread takes them
        self._role_is_free(runs)

    def _role_is_free(self, runs: bool = False) -> None:
        """Caller holds _lock: offer the free role to a queued caller, or let
        the gate watch the link (or hold it for a running server: ``_busy``)."""
        if self._callers:
            self._heir = self._callers.popleft()
            self._heir.queued = None
            self._heir.offer()
        else:
            self._heir = None
            # (_loop_watches first: it asks the loop to watch again)
            if self._watch_loop is not None and self._loop_watches() and not self._unwatched:
                return
            if self._gate is not None and not self._armed and self.broken is None:
                if self._busy and (runs or self._running):
                    self._hold_gate(runs)
                    return
                self._held = False
                self._armed = True
                self._gate.arm()

    def _hold_gate(self, runs: bool) -> None:
        """Caller holds _lock, the role is free, a server runs a request
        (``runs``: the caller, about to) while ``_busy``: the gate stays
        disarmed until a server is done, and a spare waits there with a
        timeout (see _next_request): one waiting without is kicked into it,
        unless a server not yet back at the gate comes to be it. A server
        that starts a run with nobody at the gate starts one (_run)."""
        self._held = True
        self._call_spare(self._servers - self._waiting - self._running - runs)

    def _call_spare(self, coming: int) -> None:
        """Caller holds _lock, the gate is held: unless a spare waits there
        with a timeout or ``coming`` servers are on their way back to it,
        kick one that waits without into a timed wait."""
        if not self._timed and self._waiting and coming <= 0:
            self._gate.kick()  # type: ignore[union-attr]

    def _leave_queue(self, waiter: _Waiter) -> None:
        """Caller holds _lock: ``waiter`` no longer waits for the reading role
        (its frame came, or it leaves); if it was offered the role, the offer
        goes on."""
        if waiter.queued is self:
            waiter.queued = None
            try:
                self._callers.remove(waiter)
            except ValueError:
                pass
        if self._heir is waiter and not self._reading:
            self._role_is_free()

    def _read_request(self) -> Optional[Item]:
        """A server took the role for a readable link (``_next_request``):
        what came is nearly always one request of a new chain, alone. It is
        counted as routed and the role given up in one lock section, without
        the layers of ``_read`` and ``_route`` (the server then runs it: as
        ``_read`` would have returned it); anything else goes through
        ``_read``, given what was read."""
        raw = self._read_frame()
        if raw is not None:
            kind, key, chain = codec.peek(raw)  # (never raises: _route says what is malformed)
            if kind == REQUEST and key is not None and chain is not None and not self._buffered():
                with self._lock:
                    lone = (
                        self.broken is None
                        and chain not in self._chains
                        and self._new_chains
                        and not (self._busy or self._held_handoffs)
                    )
                    if lone:
                        self._undecoded[_request_id(key)] = self._routed  # (as _route)
                        self._routed += 1
                        self._give_up_role()
                        self._turns_taken = self._turns_taken + 1 if chain != self._last_lone_chain else 0
                        self._last_lone_chain = chain
                if lone:
                    release_signals()  # (as _read)
                    return (self, REQUEST, key, raw)
        return self._read(None, first=raw)

    def _read(self, reader: Optional[_Waiter], serve: bool = True, first: Any = _UNREAD) -> Optional[Item]:
        """Read frames and route them. A server (no ``reader``) gets what is
        its own returned (``serve``: a request of a new chain may be its
        own); a caller's own goes to the front of its inbox, before the main
        thread's signals are let through, so that a handler that raises then
        cannot lose it. ``first``: a frame read already, None if that found
        the link ended. The caller holds the reading role; it is
        given up before any frame is decoded, and only after every frame read
        was routed (a
        thread that finds its inbox empty and the role free may block
        reading, so nothing may arrive in its inbox after that)."""
        mine: Optional[Item] = None
        runs = reader is None and serve  # a server: it goes on to run what it takes
        later: List[Item] = []  # releases and shutdowns, handled without the role
        try:
            while True:
                if first is not _UNREAD:
                    raw, first = first, _UNREAD
                else:
                    raw = self._read_frame()
                if raw is None:
                    break
                item = self._route(raw, reader, serve and mine is None, runs and mine is not None)
                if self.broken is not None:
                    break  # (a malformed frame): nothing read after it is trusted, nor routed
                if item is not None:
                    if item[1] in (RELEASE, SHUTDOWN):
                        later.append(item)
                    elif mine is None:
                        mine = item
                    elif reader is not None:
                        # more of the reader's own chain (a peer that does not
                        # wait for its answers): it runs them in turn, as it
                        # would had it read them one at a time
                        reader.inbox.append(item)
                    else:  # a second request of a new chain: a server's
                        self._hand_to_server(item)
                # frames already buffered are routed now: the descriptor says
                # nothing about them, so nobody would come for them
                if not self._buffered():
                    break
        finally:
            wake = None
            with self._lock:
                if not (self._busy or self._held_handoffs):  # (mostly)
                    self._give_up_role()
                else:
                    wake = self._give_up_busy(runs and mine is not None)
            if wake is not None:
                self._wake_server(*wake)
            if reader is not None and mine is not None:
                reader.inbox.appendleft(mine)
                mine = None
            release_signals()  # the main thread's, held while it had the role
        for _, kind, before, raw in later:
            self._handle_control(kind, before, raw)
        return mine

    def _give_up_busy(self, runs: bool) -> Optional[Tuple[Optional[_Waiter], bool]]:
        """Caller holds _lock: ``_read`` gives up the role while ``_busy``
        (``runs``: a server that goes on to run a request it read). Returns
        what ``_wake_server`` is to wake for requests it handed without
        waking anyone, if the gate is not held for them after all."""
        if runs:
            # several requests at once go on; a few reads of one each (one
            # caller again) end it
            self._lone_reads = 0 if self._held_handoffs else self._lone_reads + 1
            if self._lone_reads >= self.LONE_READS:
                self._busy = False
        self._give_up_role(True, runs)
        if not self._held_handoffs:
            return None
        self._held_handoffs = False
        if not self._handoff or self._held:  # (held: the gate's spare takes them if this run lasts)
            return None
        return self._server_to_wake()

    def _read_frame(self, soon: bool = False) -> Optional[Any]:
        """One raw frame (the caller holds the reading role); None when the
        link ended or broke (it is then marked so). ``soon``: the caller is
        alone on the link and waits for its reply (the transport may poll a
        moment before it sleeps, from any thread: ``Transport.recv``)."""
        try:
            raw = self.transport.recv(soon)
            while raw is False:  # a signal came first (held, see _read): its handler runs now
                release_signals()
                hold_signals()
                raw = self.transport.recv(soon)
        except BaseException as err:
            if isinstance(err, TwinError) or (isinstance(err, OSError) and err.errno is not None):
                self._fail(err)  # the stream failed: it is in an unknown state
                return None
            # Anything else was raised by a signal handler while the transport
            # waited (Ctrl-C, an alarm's TimeoutError): it is the caller's, and
            # the frame read so far is kept for the next reader.
            raise
        if raw is None:
            self._fail(None)
        return raw

    def _route(self, raw: Any, reader: Optional[_Waiter], take: bool, runs: bool = False) -> Optional[Item]:
        """Send a raw frame where it belongs, by its header; returns it if the
        reader is to handle it (``take``: it may take a request of a new chain;
        ``runs``: a server that read one already, which it goes on to run)."""
        try:
            kind, key, chain = codec.peek(raw)
            if kind == REPLY or kind == RAISE:
                if key is None:
                    raise ProtocolError(f"malformed reply from {self.peer_id!r}")
                with self._lock:
                    # a reply is routed once: a second one is an error
                    target = self._claim_reply(key)
                    late = target is None and self._abandoned.pop(key, None) is not None
                if target is None:
                    if late:
                        log.info("dropped the reply to request %d: its caller left", key)
                        return None
                    raise ProtocolError(
                        f"{self.peer_id!r} replied to request {key}, "
                        "which was never sent or was answered already"
                    )
            elif kind == REQUEST:
                if key is None or chain is None:
                    raise ProtocolError(f"malformed request from {self.peer_id!r}")
                item = (self, kind, key, raw)
                with self._lock:
                    self._undecoded[_request_id(key)] = self._routed
                    self._routed += 1
                    # looked up and delivered at once: a thread that stops running
                    # the chain (under the lock) finds in its inbox all it was sent
                    entry = self._chains.get(chain)
                    if entry is not None and entry[0] is not reader:
                        entry[0].deliver(item)
                        return None
                if entry is not None:
                    return item
                if not self._new_chains:
                    if self._refuse_late_callback(key, chain):
                        return None
                    raise ProtocolError(
                        f"{self.peer_id!r} sent a request outside any call made to it "
                        "(a sandboxed guest has no threads of its own)"
                    )
                if (reader is None and take) or not self._threads:
                    return item  # a server runs it, or (no threads) whoever reads
                self._hand_to_server(item, runs)
                return None
            elif kind == RELEASE or kind == SHUTDOWN:
                return (self, kind, self._routed, raw)  # key: how many frames came before it
            else:
                raise ProtocolError(f"{self.peer_id!r} sent a frame that is not a cpy2py message")
        except ProtocolError as err:
            self._fail(err)
            return None
        item = (self, kind, key, raw)
        if target is reader:
            return item
        target.deliver(item)
        return None

    def _claim_reply(self, req_id: int) -> Optional[Union[_Waiter, _AsyncWaiter]]:
        """Caller holds _lock: the caller waiting for the reply to ``req_id``
        (None if none waits), the reply counted as routed, not yet decoded."""
        target = self._pending.pop(req_id, None)
        if target is not None:
            self._undecoded[req_id] = self._routed
            self._routed += 1
            if target is self._turn_holder:  # (the guest is done with it: the next one's turn)
                self._pass_turn()
        return target

    def _handle_control(self, kind: int, before: int, raw: Any) -> None:
        """A release or shutdown (``before`` frames were read ahead of it),
        after the role was given up (a release may drop the last reference to
        an object, whose finalizer may call the peer)."""
        if kind == RELEASE:
            with self._lock:
                self._held_releases.append((before, raw))
            self._apply_releases()
            return
        try:
            message, _ = self.serializer.decode(raw, self.serializer.frame_budget(len(raw)))
            if not (isinstance(message, list) and len(message) == 2 and type(message[1]) is int):
                raise ProtocolError(f"malformed shutdown {references.safe_repr(message)}")
            self._shutdown(message[1])
        except Exception as err:  # (malformed, or a value that fails to rebuild or the sandbox refuses)
            if not isinstance(err, ProtocolError):
                err = ProtocolError(f"a shutdown from {self.peer_id!r} could not be read: {err}")
            self._fail(err)

    def _decoded(self, frame_id: int) -> None:
        """A routed frame was decoded (or dropped). A release read after it
        may apply now: the peer may release an object right after sending a
        reply that names it, and the reply, decoded later by its own thread,
        must still find the object."""
        self._undecoded.pop(frame_id, None)  # atomic: no lock on the call path
        if self._held_releases:
            self._apply_releases()

    def _apply_releases(self) -> None:
        """Apply, in order, the releases whose earlier frames are all decoded."""
        with self._lock:
            while True:
                try:  # popped without the lock by _decoded: retry if it changed meanwhile
                    oldest = min(self._undecoded.values(), default=self._routed)
                    break
                except RuntimeError:
                    continue
            ready = [entry for entry in self._held_releases if entry[0] <= oldest]
            if not ready:
                return
            self._held_releases = [entry for entry in self._held_releases if entry[0] > oldest]
        for before, raw in ready:
            if self.broken is not None:  # (what the peer held went with the link: forget_link)
                return
            try:
                try:
                    message, _ = self.serializer.decode(raw, self.serializer.frame_budget(len(raw)))
                    if not (isinstance(message, list) and len(message) == 2):
                        raise ProtocolError(f"malformed release {references.safe_repr(message)}")
                    dropped = self.serializer.release(message[1])
                except ProtocolError:
                    raise
                except Exception as err:
                    # a release whose value cannot even be rebuilt (one of the
                    # peer's objects as a dict key, a failing text of it) is as
                    # malformed as any: never the error of whichever call read it
                    raise ProtocolError(
                        f"{self.peer_id!r} sent a malformed release ({type(err).__name__}: "
                        f"{references.safe_repr(str(err), 200)})"
                    ) from err
                del dropped  # finalizers run here
            except ProtocolError as err:
                # first (no reply read after it is decoded from now), and the
                # earliest if releases applied by two threads both fail
                with self._lock:
                    if self._distrust is None or before < self._distrust[0]:
                        self._distrust = (before, err)
                self._fail(err)
                return

    def _hand_to_server(self, item: Item, runs: bool = False) -> None:
        """A request of a new chain that the reader does not run: a server does
        (with ``runs`` and ``_busy``, the reader, a server, once it has run the
        request it read first: the gate is held for it, see ``_read``)."""
        with self._lock:
            self._handoff.append(item)
            if runs and self._busy:
                # (the reader wakes a server as it gives up the role, or holds the gate)
                self._held_handoffs = True
                return
            idle, start = self._server_to_wake()
        self._wake_server(idle, start)

    def _server_to_wake(self) -> Tuple[Optional[_Waiter], bool]:
        """Caller holds _lock, a request was handed: an idle server (without
        a gate) to offer it to, and whether to start one (none waits)."""
        idle = self._idle.popleft() if self._idle else None
        return idle, idle is None and self._waiting == 0

    def _wake_server(self, idle: Optional[_Waiter], start: bool) -> None:
        """A handed request waits: wake the ``idle`` server, or one at the
        gate, and ``start`` one if none waits."""
        if idle is not None:
            idle.offer()
        elif self._gate is not None:
            self._gate.kick()
        if start:
            self._start_server()

    # -- serving the peer -------------------------------------------------

    def thread_count(self) -> int:
        """Server threads of this link alive now."""
        return self._servers

    def start_serving(self) -> None:
        """Start the first server thread of this link."""
        self._start_server()

    def serve(self) -> None:
        """Serve the peer on this thread until the link ends (a twin's or a
        guest's main loop)."""
        if self._threads:
            self._serve(retire=False)
            return
        waiter = _this_waiter()
        while self.broken is None:  # one thread: it reads, and runs what it read
            try:
                item = self._next_alone(waiter)
            except TwinError:
                return
            _, kind, key, raw = item
            if kind != REQUEST:
                self._decoded(key)  # a reply nobody waits for any more
            else:
                try:
                    self._run(waiter, key, raw)
                except ProtocolError:  # the link is broken
                    return
            del item, raw

    def _next_alone(self, waiter: _Waiter) -> Item:
        """``_next_for`` at the top of ``serve`` without threads (a guest):
        nothing can have been routed to this thread, nor can anyone else
        read or route, so it reads and routes the next frame without taking
        the reading role, and without the layers of ``_next_for`` and
        ``_read`` (a guest runs them about five times slower than a native
        twin). The frame is nearly always a request of the peer, which it
        runs itself: counted as routed, as ``_route`` counts it, without
        the lock (no other thread can look); a release or a shutdown is
        handled as ``_read`` handles them."""
        if waiter.inbox or self._reading:
            return self._next_for(waiter)
        raw = self._read_frame()
        if raw is None:  # (the link ended: marked so)
            raise self._broken_error()
        kind, key, chain = codec.peek(raw)  # (never raises: _route says what is malformed)
        if kind == REQUEST and key is not None and chain is not None:
            self._undecoded[_request_id(key)] = self._routed  # (as _route)
            self._routed += 1
            return (self, REQUEST, key, raw)
        item = self._route(raw, waiter, True)
        if item is not None and item[1] == REQUEST:
            return item
        if item is not None:
            self._handle_control(item[1], item[2], item[3])
        return self._next_for(waiter)  # (what came meanwhile, or the link's end)

    def _start_server(self) -> None:
        with self._lock:
            if self.broken is not None:
                return
            self._servers += 1
            self._open_gate()
        _start_thread(self._serve, (True, True), f"cpy2py-server-{self.peer_id}")

    def _open_gate(self) -> None:
        """Caller holds _lock: servers wait at a gate on the transport's
        descriptor, if it has one (else a server reads, holding the role)."""
        if self._gate is not None or not self._threads:
            return
        fd = self.transport.fileno()
        if fd >= 0:
            self._gate = _Gate(fd)
            if not self._reading:
                self._armed = True
                self._gate.arm()

    def _serve(self, retire: bool, counted: bool = False) -> None:
        block_signals_in_this_thread()
        waiter = _this_waiter()
        if not counted:
            with self._lock:
                self._servers += 1
                self._open_gate()
        try:
            while True:
                item = self._next_request(waiter, retire)
                if item is None:
                    return
                with user_code_signals:
                    self._run_as_server(waiter, item)
                del item  # a request's arguments are not ours to keep
                if _JIT_HINTS_AT and self._routed >= _JIT_HINTS_AT:
                    _hint_jit()
        except BaseException as err:  # a server must never vanish silently
            if self.broken is None:
                log.exception("server thread of the link to %s failed", self.peer_id)
                failure = err if isinstance(err, ProtocolError) else ProtocolError(f"kernel failure: {err!r}")
                self._fail(failure)
        finally:
            with self._lock:
                self._servers -= 1
                last = self._servers == 0 and self.broken is not None
            if last and self._gate is not None:
                self._gate.close()  # the link ended and nobody waits there any more

    def _next_request(self, waiter: _Waiter, retire: bool) -> Optional[Item]:
        """An idle server: wait at the gate for a request of a new chain; None
        when the link ended (or, with ``retire``, when enough others wait)."""
        gate = self._gate
        while True:
            while waiter.inbox:
                # a request of the chain this thread ran, routed here just before
                # it finished (its reply was out first); it runs it now
                item = waiter.inbox.popleft()
                if item[1] == REQUEST:
                    self._pass_on_kick(gate)
                    return item
                self._decoded(item[2])  # a reply nobody waits for any more
            timed = look = False
            with self._lock:
                if self.broken is not None:
                    return None
                if self._handoff and not (self._held and self._running):
                    # (held: the running server takes them once it is done)
                    return self._take_handed(gate)
                surplus = retire and self._waiting >= self.MAX_IDLE
                if surplus and gate is None:
                    return None
                if gate is None:  # no descriptor to wait on: read (holding the role)
                    read = self._take_role(None)
                elif self._held and not self._running and not self._reading and self._heir is None:
                    # the gate was held for this server's run, the last one:
                    # what came meanwhile is its to read (the gate stays shut)
                    look = self._take_role(None)
                else:
                    self._waiting += 1
                    if self._held:  # the spare: opens the gate if no run ends
                        timed = True
                        self._timed += 1
                        ended = self._runs_ended
            if look:
                # (it waits a little for more, holding the role: the spare
                # sleeps; a link closed meanwhile is not read: its descriptor
                # may be another's by now)
                more = self._buffered() or self.transport.wait_readable(self.HOLD_FOR)
                if more and self.broken is None:
                    item = self._read(None)
                    if item is not None:
                        return item
                    continue
                with self._lock:  # nothing came: the burst is over
                    self._busy = False
                    self._give_up_role(left=False)
                continue
            if gate is None:
                if read:
                    item = self._read(None)
                    if item is not None:
                        return item
                else:  # somebody reads; a handed request wakes this one
                    with self._lock:
                        self._idle.append(waiter)
                    try:
                        waiter.sleep()
                    finally:
                        with self._lock:
                            if waiter in self._idle:
                                self._idle.remove(waiter)
                continue
            timeout = self.RETIRE_AFTER if surplus else None
            if timed:
                timeout = self.HOLD_FOR
            try:
                readable, kicked = gate.wait(timeout, not self._running)
            except BaseException:
                with self._lock:
                    self._waiting -= 1
                    if timed:
                        self._timed -= 1
                raise
            if kicked:
                gate.take_kick()
            if readable and self._turns_taken >= self.TAKING_TURNS and _yield_cpu is not None:
                # Many callers of the peer take turns, one request at a
                # time: each woke this server as it was written, on a
                # CPU the caller shares, before the next caller could
                # write. Yielding once lets those ready send theirs first;
                # the requests then come, and run, in batches (one kick is
                # enough: the batches go on. benches/README.md, "Taking
                # turns").
                self._turns_taken = 0
                _yield_cpu()
            with self._lock:  # (one section: a lock costs as much as a system call)
                self._waiting -= 1
                if timed:
                    self._timed -= 1
                    if not (readable or kicked):
                        stuck = self._held and self._runs_ended == ended
                        if stuck and not self._reading and self._heir is None:
                            # no run ended meanwhile: one may wait for a
                            # request behind it; the gate watches again
                            self._busy = False
                            self._role_is_free()
                        continue
                if not readable:
                    read = False
                else:
                    self._armed = False  # one-shot: the event disarmed it
                    if self._handoff and self.broken is None:
                        # A handed request comes first: its kick may be the one
                        # this server took, and the input that woke it may have
                        # been read by a caller since (a read would then block,
                        # and the handed request would wait for ever).
                        if not self._reading and self._heir is None:
                            self._role_is_free()  # the gate watches the link again
                        return self._take_handed(gate)
                    read = self.broken is None and self._take_role(None)
            if not (readable or kicked):  # a surplus server, idle for RETIRE_AFTER
                return None
            if read:
                item = self._read_request()
                if item is not None:
                    return item

    def _take_handed(self, gate: Optional[_Gate]) -> Item:
        """Caller holds _lock: a server takes the oldest handed request."""
        item = self._handoff.popleft()
        if self._handoff and gate is not None and not self._held:
            gate.kick()  # more for others (held: this server comes back for them)
        return item

    def _pass_on_kick(self, gate: Optional[_Gate]) -> None:
        """A server leaves the gate with its chain's request, found in its
        inbox: a kick it took on the way was for a handed request, which
        another server must take, or it waits for ever."""
        if gate is None or not self._handoff:  # (most often: nothing handed, no lock taken)
            return
        with self._lock:
            pass_on = bool(self._handoff) and self.broken is None
        if pass_on:
            gate.kick()

    def _run_as_server(self, waiter: _Waiter, item: Item) -> None:
        conn, kind, key, raw = item
        if kind != REQUEST:  # a release or shutdown the server read
            self._handle_control(kind, key, raw)
            return
        self._run(waiter, key, raw, server=True)

    def _run(self, waiter: _Waiter, req_id: int, raw: Any, server: bool = False) -> None:
        """Decode a request that belongs to this thread, run it, reply. Its
        chain becomes this thread's while it runs (a nested request of this
        thread's own chain, or, for a server or without threads, any chain),
        so its calls go out and come back there. A ``server`` makes sure
        another waits at the gate meanwhile. The master's main thread holds
        its signals but while the request's function runs (``_execute``):
        a Ctrl-C comes after the reply is sent, never instead of it."""
        held, due = _hold_steps() if self._shields_steps else (False, None)
        try:
            if due is not None:  # a handler due as the request came: what it raised answers it
                self._decoded(_request_id(req_id))
                if self.serializer.keeps_interrupts and not isinstance(due, Exception):
                    self._stop_for(due)  # (a guest's callback: as in _execute)
                    raise due
                self._send_reply(req_id, RAISE, due, run_peer=not held)
                return
            # only a nested request can be this deep (sys._getframe is slow on PyPy)
            if waiter.chain is not None and _near_recursion_limit():
                self._decoded(_request_id(req_id))
                # answered, not run: the kernel keeps its frames
                self._send_reply(req_id, RAISE, _too_deep(), run_peer=not held)
                return
            try:
                message, failure = self.serializer.decode(raw, self.serializer.frame_budget(len(raw)))
            except ProtocolError as err:
                self._fail(err)  # the call this request belongs to fails with it
                raise
            except Exception as err:  # rebuilding a value failed: this request fails
                self._send_reply(req_id, RAISE, self._rebuild_failed(err), run_peer=not held)
                return
            finally:
                self._decoded(_request_id(req_id))
            del raw
            if failure is not None:
                self._send_reply(req_id, RAISE, self._rebuild_failed(failure), run_peer=not held)
                return
            if not (isinstance(message, list) and len(message) >= 4):
                err = ProtocolError(f"malformed request {references.safe_repr(message)}")
                self._fail(err)
                raise err
            chain = message[2]
            outer = waiter.chain
            if chain == outer or not self._threads:
                # a nested request of this thread's chain; or, with one thread
                # (a guest's), any request: that thread reads and runs them all,
                # so no chain needs to be recorded as running on it
                waiter.chain = chain
                waiter.depth += 1
                try:
                    self._execute(message, held)
                finally:
                    waiter.depth -= 1
                    waiter.chain = outer
                return
            waiter.chain = chain
            with self._lock:
                entry = self._chains.get(chain)
                if entry is None:
                    self._chains[chain] = [waiter, 1]
                else:
                    entry[1] += 1
                if server:
                    running = self._running = self._running + 1
                    if running > 1 and self._gate is not None:
                        self._busy = True  # servers run at the same time: many callers
                    if self._held:  # (_hold_gate counted on this server coming back)
                        self._call_spare(0)
                # the gate watches the link while a server runs (armed when the
                # role was given up, or held); someone must wait there for what
                # comes meanwhile
                start = server and self._waiting == 0 and self.broken is None and self._gate is not None
            waiter.depth += 1
            try:
                if start:
                    self._start_server()
                self._execute(message, held)
            finally:
                waiter.depth -= 1
                waiter.chain = outer
                with self._lock:
                    entry = self._chains[chain]
                    entry[1] -= 1
                    if entry[1] == 0:
                        del self._chains[chain]
                    if server:
                        self._running -= 1
                        if self._held:  # (what the held gate's spare watches)
                            self._runs_ended += 1
        finally:
            if held:
                release_signals()

    def _rebuild_failed(self, err: BaseException) -> BaseException:
        """``err``, which rebuilding a request raised, noted as such: its own
        message (an ImportError of a module the peer's value needs, say) does
        not tell that a call was being received."""
        _add_note(
            err,
            f"(raised in twinterpreter {kernel_state.TWIN_ID!r} while rebuilding what "
            f"{self.peer_id!r} sent for a call: its function or arguments)",
        )
        return err

    def _execute(self, message: list, held: bool = False) -> None:
        """Run a decoded request on this thread and send its reply; ``held``:
        the thread holds its signals, which it lets through while the
        request's function runs only (a Ctrl-C that comes as it starts or
        ends is that function's exception, sent as its reply)."""
        req_id, op, operands = message[1], message[3], message[4:]
        # the request's arguments live as long as the request, not as long as
        # whoever holds the message: what the peer handed for it is released
        # before the reply (see below), so the peer learns at once
        del message[3:]
        try:
            if held:
                release_signals()
            value = self.serializer.perform(op, operands)
            if type(value) is _Coroutine:  # an async function was called: its result is sent
                value = _run_coroutine(value, self, message[2])
            if held:
                hold_signals()
            kind = REPLY
        except BaseException as err:  # every failure, SystemExit included, goes back to the caller
            if held:
                _hold_steps()  # (a no-op if held already; err is the answer either way)
            if self.serializer.keeps_interrupts and not isinstance(err, Exception):
                self._stop_for(err)
                raise
            kind, value = RAISE, err
        del operands
        if self._after_request is not None:  # e.g. flush what the request printed first
            self._after_request()
        if self.pending_releases:
            references.flush_releases(self)
        try:
            self._send_reply(req_id, kind, value, run_peer=not held)
        finally:
            # (an exception sent holds this frame, which holds it: a cycle that
            # kept what the peer handed in its arguments until a collection)
            del value

    def _stop_for(self, interrupt: BaseException) -> None:
        """Ctrl-C or an exit in the master while it served an untrusted peer: the
        master's own, not the peer's to catch (a guest could swallow it and keep
        the master busy forever). The peer is stopped, and the interrupt goes on here."""
        self._break_and_kill(
            TwinterpreterTerminated(
                f"twinterpreter {self.peer_id!r} was stopped by {type(interrupt).__name__} in the master "
                "while the master ran a request of it; its state was lost"
            )
        )

    def _refuse_late_callback(self, req_id: int, chain: int) -> bool:
        """A request of a peer that may not start chains (a guest), of a
        chain that no call here runs: if it is the chain of a call whose
        caller left before its reply (Ctrl-C), the peer still runs that call,
        and this callback of it is answered with an error and not run
        (queued for a guest: it reads it when next run); True. Else False:
        the peer broke the protocol."""
        with self._lock:
            if chain not in self._abandoned.values():
                return False
        self._decoded(_request_id(req_id))
        error = TwinterpreterTerminated(
            f"this callback to the master came after the master's call to {self.peer_id!r} that made it "
            "was interrupted (its caller left): it was not run"
        )
        # (queued: the reader routes, it must not run the guest here)
        self._send_reply(req_id, RAISE, error, run_peer=False)
        return True

    def _send_reply(self, req_id: int, kind: int, value: Any, run_peer: bool = True) -> None:
        """Every request gets its reply: a caller waits for nothing else.
        Not ``run_peer`` (signals held): a guest's reply is only queued, and
        the thread's next read runs the guest (a send would run it with the
        signals held for all of its work)."""
        try:
            if type(value) in _SCALARS:  # (nothing to export, nor a block: most replies)
                # (a None, bool or small int in one go where the codec is Python)
                payload = _small_reply(kind, req_id, value) if _small_reply is not None else None
                if payload is None:
                    payload = codec.dumps([kind, req_id, value])
            else:
                # (blocks only where there can be one: a no-op's reply skips their set-up)
                plain = self._plain and type(value) in _CONTAINERS
                payload = references.encode(
                    [kind, req_id, value], self.serializer.default, self._parts, plain, self._share
                )
        except BaseException as err:  # the result cannot be sent: say why instead
            try:
                payload = references.encode([RAISE, req_id, err], self.serializer.default, share=self._share)
            except BaseException:  # not even that (a RecursionError near the limit): the bare facts
                payload = bare_failure(req_id, value if kind == RAISE else err, self.serializer.trusted)
        if __debug__ and _logging.PER_CALL:
            log.debug("<- %s %s %d", self.peer_id, "reply" if kind == REPLY else "raise", req_id)
        try:
            if run_peer or self._runner is None:
                self.transport.send(payload)
            else:
                self._runner.queue(payload)
        except OSError as err:
            self._fail(err)

    def send_release(self, items: List[List[Any]]) -> None:
        """Tell the peer that proxies here dropped these references."""
        try:
            self.transport.send(codec.dumps([RELEASE, items]))
        except OSError as err:
            self._fail(err)

    def _shutdown(self, req_id: int) -> None:
        try:
            self.transport.send(codec.dumps([REPLY, req_id, None]))
        except OSError:
            pass
        self._fail(None, reason=f"{self.peer_id} shut this link down")
        if self._on_shutdown is not None:
            self._on_shutdown()

    # -- the end of the link ----------------------------------------------

    def _unsent_error(self, again: bool) -> BaseException:
        """The error of a call the broken link never sent: NotSent if it may
        be made ``again`` on the peer's next link."""
        err = self._broken_error()
        return NotSent(err) if again else err

    def _broken_error(self) -> BaseException:
        err = self.broken
        assert err is not None
        self.reported = True
        return err

    def _timed_out(self, key: Tuple[Connection, int]) -> None:
        """A request ran past ``call_timeout`` (the deadlines thread calls this)."""
        if self.on_timeout is not None and self.broken is None:
            self.on_timeout(self.call_timeout or 0.0)

    def _fail(self, cause: Optional[BaseException], reason: Optional[str] = None) -> None:
        """Mark the link broken and wake everyone who waits on it."""
        if self.broken is not None:
            return
        # described outside the lock (it may wait for the process to end);
        # if several threads fail the link at once, the first to finish wins
        if isinstance(cause, ProtocolError):
            log.error("protocol error on the link to %s: %s", self.peer_id, cause)
            self._break_and_kill(cause)  # a peer that broke the protocol is not trusted further
            return
        try:
            how = reason or self._describe_end()
        except Exception as err:  # describing must never keep waiters hanging
            how = f"ended ({err})"
        if isinstance(how, BaseException):  # the transport knows the exact error
            error: BaseException = how
        else:
            error = TwinterpreterTerminated(f"twinterpreter {self.peer_id!r} {how}")
            if cause is not None:
                error.__cause__ = cause
        log.info("link to %s ended: %s", self.peer_id, how)
        self._mark_broken(error)

    def _break_and_kill(self, error: BaseException) -> None:
        """Mark the link broken, then kill the peer: in this order, so that a call
        that meets the dead peer meanwhile reports ``error``, not the kill."""
        self._mark_broken(error)
        if self._kill_peer is not None:
            try:
                self._kill_peer()
            except Exception as err:
                log.error("could not stop %s: %s", self.peer_id, err)

    def _mark_broken(self, error: BaseException) -> None:
        """The first error wins; everyone waiting on the link is woken to see it,
        and what the peer held of this side's objects is released."""
        with self._lock:
            if self.broken is not None:
                return
            self.broken = error
            waiting = list(self._callers) + list(self._pending.values()) + list(self._idle)
            self._turns.clear()  # (each is among the pending: woken to see the error)
            self._turn_holder = None
            for waiter in self._callers:
                waiter.queued = None
            self._callers.clear()
            self._idle.clear()
            for entry in self._chains.values():
                waiting.append(entry[0])
        self._end_watch()
        for waiter in waiting:
            waiter.offer()
        if self._gate is not None:
            self._gate.wake_all()
        references.forget_link(self)

    def forget_after_fork(self, error: BaseException) -> None:
        """In a child forked from this process: the link is the parent's. It is
        marked ended without a message to the peer, without waking anyone (no
        other thread exists here) and without touching the gate (an epoll set
        shared with the parent); what the peer held is forgotten here."""
        self.broken = error
        self._gate = None
        self._watch_loop = None  # (the parent's loop)
        self._lock = _thread.allocate_lock()  # may have been held by another thread at the fork
        references.forget_link(self)

    def close(self, reason: str) -> None:
        """Mark the link ended by this side (stop/destroy)."""
        self._fail(None, reason=reason)


#: frames below the recursion limit that a nested call leaves for the kernel:
#: reading, routing and answering at any depth must never hit the limit, or a
#: reply could be lost and both sides would wait forever
KERNEL_FRAMES = 60


#: the types that may hold a plain-data block
_CONTAINERS = frozenset((list, tuple, dict, set, frozenset))
#: reply values encoded without the serializer: they refer to nothing
_SCALARS = frozenset((type(None), bool, int, float))
_small_reply = codec.small_reply


_callbacks_var: Any = None


#: what a server runs for each request, each marked by ``_hint_jit`` as a
#: unit of its own (a reference, not a name: a renamed method fails here)
_JIT_UNITS = (
    Connection._next_request,
    Connection._read_request,
    Connection._run,
    Connection._execute,
    Connection._send_reply,
)


def _hint_jit() -> None:
    """PyPy: a server's turn (``_serve``) runs a request through more of the
    kernel than PyPy's JIT traces at once (6,000 operations). Left to
    itself, it gives up on that trace, takes one function out of it and
    tries again a thousand turns later: a twin reached its steady speed
    after about 5,000 requests. Each function of ``_JIT_UNITS`` marked as
    its own unit, the JIT compiles them and the loop within the next couple
    of hundred requests (about 30 ms of them), and a twin is at its steady
    speed by about 1,000. Not at once: a twin that serves a few requests
    only would pay for compiling without gaining from it (benches/README.md,
    "A PyPy twin's warm-up")."""
    global _JIT_HINTS_AT, _jit_hinted
    _JIT_HINTS_AT = 0  # (once, whichever server comes first)
    try:
        import pypyjit

        for function in _JIT_UNITS:
            pypyjit.dont_trace_here(0, False, function.__code__)
        _jit_hinted = True
    except Exception as err:  # (a hint: a PyPy without it serves as before)
        log.debug("no JIT hints on this PyPy: %r", err)


def _callbacks_of() -> Any:
    """A context variable: the awaited calls whose callbacks run in this
    context (made on first use: a twin's start imports no contextvars)."""
    global _callbacks_var
    if _callbacks_var is None:
        import contextvars

        _callbacks_var = contextvars.ContextVar("cpy2py_callbacks_of", default=())
    return _callbacks_var


#: how long (seconds) an awaited call to a native twin waits for its reply
#: on the loop's thread before the loop goes on, where the loop does not
#: say when it has something to do (Connection._idle_wait)
_READ_SLICE = 0.0002
#: how long (seconds) it waits at most while the loop has nothing to do (its
#: events and timers end the wait sooner): beyond a scheduler tick
_IDLE_WAIT = 0.05
#: after a slice that ended without a frame, the link's next awaited calls
#: that take none
_SLICE_SKIPS = 16

#: how long (seconds) an event loop runs a guest for an awaited call before
#: a worker thread takes over (the host looks at it on its epoch ticks,
#: every 2 ms while such slices run: the loop waits about 2.5 ms, at most 4)
_LOOP_SLICE = 0.002
#: how long an awaited call to a guest whose turn another thread passed may
#: wait for its loop to run the guest for it before a worker does (_pass_turn)
_TURN_GRACE = 0.01

#: chains of ended awaited calls a link keeps for its next ones (as many as
#: calls were in flight at once, up to this)
_SPARE_CHAINS = 256


def _running_loop() -> Any:
    return sys.modules["asyncio"]._get_running_loop()  # (loaded: an awaited call asks)


def _drop_watch(loop: Any, fd: int) -> None:
    """``loop`` no longer watches a link: its reader goes, and the descriptor
    it watched is closed (on the loop's thread: the loop may still use it)."""

    def drop() -> None:
        loop.remove_reader(fd)
        os.close(fd)

    try:
        loop.call_soon_threadsafe(drop)
    except RuntimeError:  # the loop was closed, and its selector with it
        os.close(fd)


def _deadlines() -> Any:
    from . import deadlines  # the master's only: twins never load it (nor threading)

    return deadlines


#: the largest request sent holding the reading role, when the transport's
#: ``send_now`` finds it goes out at once (a native twin's: a pipe write of up
#: to PIPE_BUF, or a larger frame that its pipe's free pages hold; 64 KiB is
#: a Linux pipe's default size). A larger one, or one that waited for room,
#: is sent without the role, and a server thread may read its reply and
#: hand it over (two thread switches more).
_SMALL_FRAME = 65532


def _hold_steps() -> Tuple[bool, Optional[BaseException]]:
    """Hold the main thread's signals for kernel steps that must finish
    (see ``_shields_steps``): whether it held them, and what a handler that
    was due already raised as they were held (``hold_signals`` runs it
    first), for the caller to raise or answer with once the steps are done."""
    due = None
    while True:
        try:
            return hold_signals(), due
        except BaseException as err:  # (nothing is held when it raises)
            due = err


def _request_id(key: int) -> int:
    """The id under which a request of the peer is tracked until decoded
    (replies are tracked by the id of the request they answer, which is
    positive: the two never meet)."""
    return -1 - key


def _too_deep() -> RecursionError:
    return RecursionError(
        "maximum recursion depth exceeded in a call across interpreters "
        f"(cpy2py keeps the last {KERNEL_FRAMES} frames for its own work)"
    )


def _add_note(err: BaseException, note: str) -> None:
    """``err.add_note(note)``, also before Python 3.11 (where a traceback
    does not show notes, but they travel with the exception)."""
    notes = getattr(err, "__notes__", None)
    try:
        if notes is None:
            err.__notes__ = [note]
        elif type(notes) is list:
            notes.append(note)
    except Exception:  # (an exception that takes no attributes: left as it is)
        pass


def _near_recursion_limit() -> bool:
    try:
        sys._getframe(sys.getrecursionlimit() - KERNEL_FRAMES)
    except ValueError:  # the stack is not that deep
        return False
    return True


def _interrupted(peer_id: str) -> TwinError:
    return TwinterpreterTerminated(
        f"the call of {peer_id!r} nested in this request was interrupted in its caller"
    )


class CallWhileReading(TwinError):
    """A call to a peer that would wait for a frame only the calling thread
    could read: refused at once instead (the request or reply whose rebuilding
    made it fails)."""


def _threading() -> Any:
    """The threading module if it is loaded (and done loading: another thread
    may be importing it right now), else None."""
    threading = sys.modules.get("threading")
    return threading if hasattr(threading, "Thread") and hasattr(threading, "current_thread") else None


def _thread_name() -> str:
    threading = _threading()
    return threading.current_thread().name if threading is not None else f"thread {_thread.get_ident()}"


def _start_thread(target: Callable[..., None], args: tuple, name: str) -> None:
    """A daemon thread: named where threading is loaded anyway (the master),
    plain where it is not (a twin: threading costs PyPy a fifth of its start)."""
    threading = _threading()
    if threading is None:
        _thread.start_new_thread(target, args)
    else:
        threading.Thread(target=target, args=args, name=name, daemon=True).start()


def current_chain() -> Optional[int]:
    """The chain of the calling thread, if it has made or served a call."""
    waiter = getattr(_local, "waiter", None)
    return None if waiter is None else waiter.chain
