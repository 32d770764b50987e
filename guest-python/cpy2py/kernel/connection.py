"""One link between this interpreter and a peer: requests, replies, threads.

Who reads the stream: whichever thread needs a frame. A thread waiting for a
reply reads the stream itself when nobody else does (no hand-off to another
thread in the common, single-threaded case); otherwise it sleeps until a
frame for it is delivered or the reading role is free. When no thread waits,
an idle *server* thread polls the stream without holding the role, so it
never steals a reply from a caller, and executes requests that start a new
chain of calls. Before executing, it passes polling on to a spare server
(starting one if needed), so the link is always served.

Chains: every request names the chain (thread of control) it belongs to. A
request whose chain is waiting in a thread here is executed by that very
thread, which is what makes recursion across interpreters work on one thread
and keeps the replies of many threads apart.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from .. import _logging
from ..errors import ProtocolError, SandboxViolation, TwinError, TwinterpreterTerminated
from ..protocol import codec
from ..protocol.messages import OP_NAMES, RAISE, RELEASE, REPLY, REQUEST, SHUTDOWN
from . import references
from .serialization import Serializer, bare_failure

log = _logging.get_logger("connection")

#: guards the routing state of all connections of this process
_ROUTE_LOCK = threading.Lock()
#: chain id -> the waiter of the thread currently running that chain here
_CHAINS: Dict[int, _Waiter] = {}
_chain_ids = itertools.count(1)
_local = threading.local()


class _Waiter:
    """A thread's mailbox: frames routed to it, and a lock to sleep on."""

    __slots__ = ("inbox", "wake", "parked_on", "chain", "depth", "name", "early")

    def __init__(self) -> None:
        self.inbox: Deque[Tuple[Connection, list]] = deque()
        self.wake = threading.Lock()
        self.wake.acquire()
        #: the queue this waiter sleeps in, if it sleeps
        self.parked_on: Optional[Deque[_Waiter]] = None
        #: the chain this thread runs, or None before its first call
        self.chain: Optional[int] = None
        #: how many of this thread's calls are in flight (nesting depth)
        self.depth = 0
        self.name = threading.current_thread().name
        #: without threads: replies to outer calls of this thread that came
        #: while a later call waited, (connection, request id) -> message
        self.early: Dict[Tuple[Connection, int], list] = {}


def _this_waiter() -> _Waiter:
    try:
        return _local.waiter
    except AttributeError:
        waiter = _local.waiter = _Waiter()
        return waiter


def _new_chain() -> int:
    # unique on this machine while this process lives: pid and a counter
    return (os.getpid() << 24) | (next(_chain_ids) & 0xFFFFFF)


def _unpark(waiter: _Waiter) -> None:
    """Wake ``waiter`` if it sleeps. Caller holds _ROUTE_LOCK."""
    if waiter.parked_on is not None:
        waiter.parked_on.remove(waiter)
        waiter.parked_on = None
        waiter.wake.release()


def _deliver(waiter: _Waiter, item: Tuple[Connection, list]) -> None:
    with _ROUTE_LOCK:
        waiter.inbox.append(item)
        _unpark(waiter)


def _park(waiter: _Waiter, queue: Deque[_Waiter]) -> None:
    """Caller holds _ROUTE_LOCK; the waiter then calls ``_sleep``."""
    waiter.parked_on = queue
    queue.append(waiter)


def _sleep(waiter: _Waiter, timeout: Optional[float] = None) -> None:
    """Sleep until unparked (or ``timeout`` seconds passed). If interrupted
    (Ctrl-C) or timed out, leave no trace in the queues, so nobody hands the
    reading role to a thread that left."""
    woken = False
    try:
        woken = waiter.wake.acquire(True, -1 if timeout is None else timeout)
    finally:
        if not woken:
            with _ROUTE_LOCK:
                if waiter.parked_on is not None:
                    waiter.parked_on.remove(waiter)
                    waiter.parked_on = None
                else:  # woken meanwhile: consume the wake-up
                    waiter.wake.acquire(False)


class Connection:
    """The link to one peer interpreter, usable from any number of threads.

    ``transport`` moves frames (``send``, ``recv``, ``wait_readable``);
    ``describe_end`` explains, once the stream ended, how the peer ended
    (a text, or the exception to raise in the waiting callers);
    ``kill_peer`` stops a peer that broke the protocol; ``after_request``
    runs after each request served here (a twin flushes its stdout).
    Without ``threads`` (the WASI guest), the one thread serves requests
    inline, also those of other chains that arrive while it waits.
    Without ``new_chains`` (the master's link to a sandboxed guest, which has
    no threads), a request must belong to a call this side is making to the
    peer: any other breaks the link, and no thread is ever started for it.
    """

    def __init__(
        self,
        transport: Any,
        peer_id: str,
        serializer: Serializer,
        describe_end: Callable[[], Any],
        on_shutdown: Optional[Callable[[], None]] = None,
        after_request: Optional[Callable[[], None]] = None,
        kill_peer: Optional[Callable[[], Any]] = None,
        threads: bool = True,
        new_chains: bool = True,
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
        # routing state, guarded by _ROUTE_LOCK
        self._pending: Dict[int, _Waiter] = {}  # request id -> its caller, until its reply is routed
        self._abandoned: Set[int] = set()  # requests whose caller left before the reply
        self._reading = False
        self._reader: Optional[int] = None  # the thread that holds the reading role
        self._garbage: List[Any] = []  # released objects, to drop once the role is given up
        self._callers: Deque[_Waiter] = deque()  # callers waiting for the reading role
        # servers (see "serving the peer" below)
        self._poller: Optional[_Waiter] = None
        self._watcher: Optional[_Waiter] = None
        self._pollers: Deque[_Waiter] = deque()  # the poller, resting while callers read
        self._watchers: Deque[_Waiter] = deque()  # the watcher, between ticks
        self._idle: Deque[_Waiter] = deque()  # servers without a role
        self._executed = 0  # requests started by servers
        self._watched = 0  # ... as the watcher saw it last
        self._watcher_asleep = False
        self.broken: Optional[BaseException] = None
        # references (kernel/references.py, guarded by its lock): what the peer
        # holds of this side's objects, key -> count, and (sandboxes) what it
        # may do with them; releases of proxies here, queued until sent;
        # proxy classes made for the class descriptions the peer sent
        self.handed: Dict[Tuple[str, int], int] = {}
        self.grants: Dict[Tuple[str, int], Any] = {}
        self.pending_releases: List[Tuple[str, int, int]] = []
        self.proxy_classes: Dict[Any, type] = {}
        serializer.connection = self

    def __repr__(self) -> str:
        return f"<cpy2py Connection to {self.peer_id!r}{' (broken)' if self.broken else ''}>"

    # -- calling the peer -------------------------------------------------

    def request(self, op: int, *operands: Any) -> Any:
        """Send a request and wait for its result (or raise its exception)."""
        if self.pending_releases:  # what this link carries only
            references.flush_releases(self)
        if self._reading and self._reader == threading.get_ident():
            # this thread is reading a frame of this very link: it would wait
            # for a reply that only it could read
            raise CallWhileReading(
                f"a value from {self.peer_id!r} cannot be rebuilt here without a call to "
                f"{self.peer_id!r} (one of its objects used as a dict key or set member, whose "
                "hash or equality it computes); send such values as a list of pairs instead"
            )
        waiter = _this_waiter()
        if waiter.depth and _near_recursion_limit():  # only nested calls can be this deep
            raise _too_deep()
        if waiter.chain is None:
            if not self._threads:
                raise SandboxViolation(
                    f"this sandboxed twin can call {self.peer_id!r} only while it serves a call from it "
                    "(a guest has no threads of its own): not from a finalizer, a timer or code run "
                    "at its start"
                )
            waiter.chain = _new_chain()
        chain = waiter.chain
        req_id = next(self._ids)
        payload = codec.dumps([REQUEST, req_id, chain, op, *operands], self.serializer.default)
        if __debug__:
            log.debug("-> %s request %d %s (chain %x)", self.peer_id, req_id, OP_NAMES.get(op, op), chain)
        with _ROUTE_LOCK:
            if self.broken is not None:
                raise self._broken_error()
            self._pending[req_id] = waiter
            _CHAINS[chain] = waiter
            waiter.depth += 1
        try:
            try:
                self.transport.send(payload)
            except OSError as err:
                self._fail(err)
                raise self._broken_error() from None
            return self._wait_for_reply(waiter, req_id)
        finally:
            with _ROUTE_LOCK:
                if self._pending.pop(req_id, None) is not None and self.broken is None:
                    # left before its reply was routed (a signal handler raised):
                    # the reply may still come, and is dropped then
                    self._abandoned.add(req_id)
                waiter.depth -= 1
                if waiter.depth == 0:
                    _CHAINS.pop(chain, None)

    def _wait_for_reply(self, waiter: _Waiter, req_id: int) -> Any:
        while True:
            early = waiter.early.pop((self, req_id), None) if waiter.early else None
            conn, message = (self, early) if early is not None else self._next_for(waiter)
            kind = message[0]
            if kind == REQUEST:  # a nested call of our chain: run it right here
                if _near_recursion_limit():  # answered, not run: the kernel keeps its frames
                    conn._send_reply(message[1], RAISE, _too_deep())
                else:
                    conn._execute_nested(waiter, message)
                del message  # its arguments must not outlive the nested call
            elif conn is self and message[1] == req_id:
                if kind == REPLY:
                    return message[2]
                raise self.serializer.reraise(message[2])
            elif not conn._threads:
                # one thread serves several callers' chains: the reply to an
                # outer call came while a call made later waits; kept for it
                waiter.early[(conn, message[1])] = message
            else:
                # the reply to an outer call of this thread: its peer gave up on
                # the nested call this thread waits for, which would wait forever
                conn._fail(
                    ProtocolError(
                        f"{conn.peer_id!r} answered request {message[1]} while a call nested in it "
                        "was still waiting for its reply"
                    )
                )

    def _next_for(self, waiter: _Waiter) -> Tuple[Connection, list]:
        """The next message for ``waiter``: from its inbox, or read by itself."""
        while True:
            with _ROUTE_LOCK:
                if waiter.inbox:
                    if not self._reading:
                        self._role_is_free()  # this thread may have been woken to read
                    return waiter.inbox.popleft()
                if self.broken is not None:
                    raise self._broken_error()
                read = self._take_role_or_park(waiter, self._callers)
            if not read:
                _sleep(waiter)
                continue
            item = self._read_and_route(waiter)
            if item is not None:
                return item

    # -- reading and routing ----------------------------------------------

    def _take_role_or_park(self, waiter: _Waiter, queue: Deque[_Waiter]) -> bool:
        """Caller holds _ROUTE_LOCK: take the free reading role, or park in ``queue``."""
        if self._reading:
            _park(waiter, queue)
            return False
        self._reading = True
        self._reader = threading.get_ident()
        return True

    def _release_role(self) -> None:
        """Caller holds _ROUTE_LOCK: give up the reading role."""
        self._reading = False
        self._reader = None
        self._role_is_free()

    def _role_is_free(self) -> None:
        """Caller holds _ROUTE_LOCK: offer the free role to a waiting caller
        (the poller notices within a tick)."""
        if self._callers:
            _unpark(self._callers[0])

    def _read_and_route(self, reader: Optional[_Waiter]) -> Optional[Tuple[Connection, list]]:
        """Read one message and route it; returns it if it is the reader's.

        The caller holds the reading role. It is given up only after the
        message was delivered: a thread that finds its inbox empty and the
        role free may block reading, so nothing may arrive in its inbox
        after that. Objects a release dropped die only after that, so their
        finalizers run outside the role (they may call the peer).
        """
        try:
            message = self._read_one()
            return None if message is None else self._route(message, reader)
        finally:
            garbage = self._garbage
            if garbage:
                self._garbage = []
            with _ROUTE_LOCK:
                self._release_role()
            del garbage

    def _read_one(self) -> Optional[list]:
        """Read and decode one frame (the caller holds the reading role).
        None when nothing usable was read (the link is then marked broken
        if it ended)."""
        try:
            raw = self.transport.recv()
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
            return None
        budget = self.serializer.frame_budget(len(raw))
        try:
            message, failure = self.serializer.decode(raw, budget)
        except ProtocolError as err:
            self._fail(err)
            return None
        except Exception as err:  # rebuilding a value failed (see CallWhileReading)
            message, failure = _header(raw, budget), err
            if message is None:
                self._fail(ProtocolError(f"{self.peer_id!r} sent a frame that cannot be decoded: {err!r}"))
                return None
        if not isinstance(message, list) or not message or type(message[0]) is not int:
            what = references.safe_repr(message)
            self._fail(ProtocolError(f"received a message that is not a cpy2py message: {what}"))
            return None
        if failure is not None and len(message) > 2:
            # a name in it does not exist here: the request or reply fails, the link stays
            if message[0] == REQUEST:
                self._send_reply(message[1], RAISE, failure)
                return None
            if message[0] in (REPLY, RAISE):
                return [RAISE, message[1], failure]
        return message

    def _route(self, message: list, reader: Optional[_Waiter]) -> Optional[Tuple[Connection, list]]:
        """Send ``message`` where it belongs; returns it if it is the reader's to handle."""
        kind = message[0]
        try:
            if kind == REPLY or kind == RAISE:
                req_id = message[1]
                if len(message) != 3 or type(req_id) is not int:
                    raise ProtocolError(f"malformed reply {references.safe_repr(message)}")
                with _ROUTE_LOCK:
                    # a reply is routed once: a second one is an error
                    target = self._pending.pop(req_id, None)
                    late = target is None and req_id in self._abandoned
                    self._abandoned.discard(req_id)
                if target is None:
                    if late:
                        log.info("dropped the reply to request %d: its caller left", req_id)
                        return None
                    raise ProtocolError(
                        f"{self.peer_id!r} replied to request {req_id}, "
                        "which was never sent or was answered already"
                    )
            elif kind == REQUEST:
                if len(message) < 4 or not all(type(field) is int for field in message[1:4]):
                    raise ProtocolError(f"malformed request {references.safe_repr(message)}")
                chain = message[2]
                with _ROUTE_LOCK:
                    target = _CHAINS.get(chain)
                if target is None and not self._new_chains:
                    raise ProtocolError(
                        f"{self.peer_id!r} sent a request outside any call made to it "
                        "(a sandboxed guest has no threads of its own)"
                    )
                if target is None:  # a new chain here: for the reader if it is a server
                    if reader is None or not self._threads:
                        return (self, message)  # without threads, whoever reads runs it
                    return self._hand_to_server(message)
            elif kind == RELEASE:
                if len(message) != 2:
                    raise ProtocolError(f"malformed release {references.safe_repr(message)}")
                self._garbage.extend(references.release(message[1], self))
                return None
            elif kind == SHUTDOWN:
                if len(message) != 2 or type(message[1]) is not int:
                    raise ProtocolError(f"malformed shutdown {references.safe_repr(message)}")
                self._shutdown(message[1])
                return None
            else:
                raise ProtocolError(f"unknown message kind {references.safe_repr(kind)}")
        except (IndexError, TypeError, ProtocolError) as err:
            self._fail(err if isinstance(err, ProtocolError) else ProtocolError(f"malformed message: {err}"))
            return None
        if target is reader:
            return (self, message)
        _deliver(target, (self, message))
        return None

    def _hand_to_server(self, message: list) -> None:
        """A caller read a request of a new chain: an idle server executes it."""
        with _ROUTE_LOCK:
            if self._idle:
                idle = self._idle[0]
                idle.inbox.append((self, message))
                _unpark(idle)
                return None
        self._start_server(first=(self, message))
        return None

    # -- serving the peer -------------------------------------------------
    #
    # Servers take three roles. The *poller* waits for frames while no
    # caller reads, reads them, and runs requests of new chains itself - so a
    # sequential stream of calls costs no thread switch. While it runs one,
    # nobody polls; the *watcher* looks every TICK seconds and, finding no
    # poller, polls in its place, so a request that blocks never starves the
    # link. Other servers sleep *idle* until a caller hands them a request.
    # After IDLE_TICKS quiet ticks the watcher sleeps too, and the poller
    # wakes it before running the next request. A started server that finds
    # MAX_IDLE others idle ends instead of waiting: every hand-over of
    # polling starts a server, so idle ones would otherwise pile up.

    TICK = 0.002
    IDLE_TICKS = 500
    MAX_IDLE = 4

    def start_serving(self) -> None:
        """Start the first server thread of this link."""
        self._start_server()

    def serve(self) -> None:
        """Serve the peer on this thread until the link ends (a twin's main loop)."""
        self._serve([None], retire=False)

    def _start_server(self, first: Optional[Tuple[Connection, list]] = None) -> None:
        # the first request travels in a list the server empties: a Thread keeps
        # its args until it ends, and a request must not keep its arguments alive
        thread = threading.Thread(
            target=self._serve, args=([first],), name=f"cpy2py-server-{self.peer_id}", daemon=True
        )
        thread.start()

    def _serve(self, handed: List[Optional[Tuple[Connection, list]]], retire: bool = True) -> None:
        waiter = _this_waiter()
        try:
            item = handed.pop()
            while True:
                if item is not None:
                    self._execute_as_server(waiter, item[1])
                # drop the request before waiting: its arguments are not ours to keep
                # (a proxy or native object in them must be releasable meanwhile)
                item = None
                item = self._next_request(waiter, retire)
                if item is None:
                    return
        except BaseException as err:  # a server must never vanish silently
            log.exception("server thread of the link to %s failed", self.peer_id)
            self._fail(err if isinstance(err, ProtocolError) else ProtocolError(f"kernel failure: {err!r}"))
        finally:
            with _ROUTE_LOCK:
                for role in ("_poller", "_watcher"):
                    if getattr(self, role) is waiter:
                        setattr(self, role, None)

    def _next_request(self, waiter: _Waiter, retire: bool = False) -> Optional[Tuple[Connection, list]]:
        """An idle server: wait for a request of a new chain; None when the link
        ended (or, with ``retire``, when enough other servers are idle)."""
        quiet_ticks = 0
        while True:
            with _ROUTE_LOCK:
                if waiter.inbox:
                    return waiter.inbox.popleft()
                if self.broken is not None:
                    return None
                if self._poller is None or self._poller is waiter:
                    self._poller = waiter
                    if self._watcher is waiter:
                        self._watcher = None
                    # callers read for themselves while they wait: no need to poll
                    callers_read = self._reading or bool(self._pending)
                    if callers_read:
                        _park(waiter, self._pollers)
                    role = "poll"
                elif self._watcher is None or self._watcher is waiter:
                    self._watcher = waiter
                    role = "watch"
                    asleep = quiet_ticks >= self.IDLE_TICKS
                    if self._executed == self._watched:
                        quiet_ticks += 1
                    else:
                        quiet_ticks = 0
                    self._watched = self._executed
                    self._watcher_asleep = asleep
                    _park(waiter, self._watchers)
                elif retire and len(self._idle) >= self.MAX_IDLE:
                    return None  # enough servers wait idle: this one ends
                else:
                    role = "idle"
                    _park(waiter, self._idle)
            if role == "idle":
                _sleep(waiter)
            elif role == "watch":
                _sleep(waiter, None if asleep else self.TICK)
            elif callers_read:
                _sleep(waiter, self.TICK)
            else:
                item = self._poll_once()
                if item is not None:
                    return item

    def _poll_once(self) -> Optional[Tuple[Connection, list]]:
        """The poller: wait for a frame, read it if no caller does; a request
        of a new chain is returned to be run by the poller itself."""
        try:
            self.transport.wait_readable(None)
        except (OSError, ValueError) as err:
            self._fail(err)
            return None
        with _ROUTE_LOCK:
            if self.broken is not None or self._reading:
                return None  # a caller reads: it takes what arrived
            self._reading = True
            self._reader = threading.get_ident()
        try:
            ready = self.transport.wait_readable(0)
        except (OSError, ValueError):
            ready = True  # let recv report it
        if not ready:  # a caller took the data meanwhile
            with _ROUTE_LOCK:
                self._release_role()
            return None
        return self._read_and_route(None)

    def _execute_as_server(self, waiter: _Waiter, message: list) -> None:
        if self._threads:
            with _ROUTE_LOCK:
                if self._poller is waiter:
                    self._poller = None  # the watcher takes over if this takes long
                self._executed += 1
                need_watcher = self._watcher is None
                if not need_watcher and self._watcher_asleep:
                    self._watcher_asleep = False
                    _unpark(self._watcher)
            if need_watcher:
                self._start_server()
        waiter.chain = message[2]
        try:
            self._execute(message)
        finally:
            waiter.chain = None

    def _execute_nested(self, waiter: _Waiter, message: list) -> None:
        """Run a request that came while this thread waits for a reply: of its
        own chain (recursion), or, without threads, of any chain; then this
        thread runs it as that chain, so its calls go out and come back there."""
        chain = message[2]
        if chain == waiter.chain:
            self._execute(message)
            return
        outer = waiter.chain
        waiter.chain = chain
        with _ROUTE_LOCK:
            _CHAINS[chain] = waiter
        try:
            self._execute(message)
        finally:
            waiter.chain = outer
            with _ROUTE_LOCK:
                if _CHAINS.get(chain) is waiter:
                    del _CHAINS[chain]

    def _execute(self, message: list) -> None:
        """Run a request on this thread and send its reply."""
        req_id, op, operands = message[1], message[3], message[4:]
        # the request's arguments live as long as the request, not as long as
        # whoever holds the message: what the peer handed for it is released
        # before the reply (see below), so the peer learns at once
        del message[3:]
        try:
            kind, value = REPLY, self.serializer.perform(op, operands)
        except BaseException as err:  # every failure, SystemExit included, goes back to the caller
            if self.serializer.keeps_interrupts and not isinstance(err, Exception):
                self._stop_for(err)
                raise
            kind, value = RAISE, err
        del operands
        if self._after_request is not None:  # e.g. flush what the request printed first
            self._after_request()
        if self.pending_releases:
            references.flush_releases(self)
        self._send_reply(req_id, kind, value)

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

    def _send_reply(self, req_id: int, kind: int, value: Any) -> None:
        """Every request gets its reply: a caller waits for nothing else."""
        try:
            payload = codec.dumps([kind, req_id, value], self.serializer.default)
        except BaseException as err:  # the result cannot be sent: say why instead
            try:
                payload = codec.dumps([RAISE, req_id, err], self.serializer.default)
            except BaseException:  # not even that (a RecursionError near the limit): the bare facts
                payload = bare_failure(req_id, value if kind == RAISE else err)
        if __debug__:
            log.debug("<- %s %s %d", self.peer_id, "reply" if kind == REPLY else "raise", req_id)
        try:
            self.transport.send(payload)
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

    def _broken_error(self) -> BaseException:
        err = self.broken
        assert err is not None
        return err

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
        with _ROUTE_LOCK:
            if self.broken is not None:
                return
            self.broken = error
            for queue in (self._callers, self._pollers, self._watchers, self._idle):
                while queue:
                    _unpark(queue[0])
            for waiter in list(self._pending.values()):
                _unpark(waiter)
        references.forget_link(self)

    def close(self, reason: str) -> None:
        """Mark the link ended by this side (stop/destroy)."""
        self._fail(None, reason=reason)


#: frames below the recursion limit that a nested call leaves for the kernel:
#: reading, routing and answering at any depth must never hit the limit, or a
#: reply could be lost and both sides would wait forever
KERNEL_FRAMES = 60


def _too_deep() -> RecursionError:
    return RecursionError(
        "maximum recursion depth exceeded in a call across interpreters "
        f"(cpy2py keeps the last {KERNEL_FRAMES} frames for its own work)"
    )


def _near_recursion_limit() -> bool:
    try:
        sys._getframe(sys.getrecursionlimit() - KERNEL_FRAMES)
    except ValueError:  # the stack is not that deep
        return False
    return True


class CallWhileReading(TwinError):
    """A value from a peer needs a call to that peer to be rebuilt while its
    frame is being read (a deadlock if it waited): the request or reply that
    carried it fails instead."""


def _header(raw: Any, budget: Optional[int]) -> Optional[list]:
    """The plain fields of a message (kind, id, ...) with every tagged value
    left out: enough to fail the request or reply it belongs to."""
    try:
        message = codec.loads(raw, lambda tag, value: None, budget=budget)
    except Exception:
        return None
    return message if isinstance(message, list) and len(message) > 2 else None


def current_chain() -> Optional[int]:
    """The chain of the calling thread, if it has made or served a call."""
    waiter = getattr(_local, "waiter", None)
    return None if waiter is None else waiter.chain
