"""Frames over a pair of file descriptors, in pure Python.

Twins use this for their end of the protocol pipes; the master uses the
compiled ``cpy2py._host.NativeTwin`` with the same three methods.
"""

from __future__ import annotations

import _thread
import math
import os
import select
import sys
from _struct import Struct  # (what struct.py re-exports)

from ..errors import ProtocolError

_HEADER = Struct(">I")
_READ_SIZE = 65536
_writev = getattr(os, "writev", None)
try:  # (only a CPython twin has the compiled host)
    from cpy2py._host import read_frame as _read_frame
except ImportError:
    _read_frame = None
_MAX_IOVECS = 64
DEFAULT_MAX_FRAME = 1 << 30
# the main thread (where Python runs signal handlers); this module is first
# imported there unless an application imports cpy2py from another thread
# first, which has imported threading then
_MAIN_THREAD = (
    sys.modules["threading"].main_thread().ident if "threading" in sys.modules else _thread.get_ident()
)


try:  # the host's own: it keeps the saved mask where its transports' waits see it
    from cpy2py._host import hold_signals, release_signals, signals_held
except ImportError:  # (PyPy, the WASI guest, a remote twin: the same in Python)

    class _Held(_thread._local):
        """Per thread: whether (and with which earlier mask) it holds its
        signals. Class defaults: a missing thread-local attribute costs an
        exception on CPython, on every frame read by a thread that never held."""

        active = False
        mask = None

    _held = _Held()
    #: the WASI guest has no signals (and importing the module would read files)
    _NO_SIGNALS = sys.platform == "wasi"

    def hold_signals() -> bool:
        """In the main thread (where Python runs signal handlers), block every
        signal until ``release_signals``; returns whether it did. The kernel holds
        them while the main thread holds a link's reading role, so that a handler
        that raises (Ctrl-C) never cuts in between reading a frame and delivering
        it, or leaves the role taken. Waits for frames stay interruptible:
        transports return False from ``recv`` when a signal came first."""
        if _NO_SIGNALS or _thread.get_ident() != _MAIN_THREAD or _held.active:
            return False
        import signal

        sigmask = getattr(signal, "pthread_sigmask", None)
        if sigmask is not None:  # (not on the WASI guest)
            _held.mask = sigmask(signal.SIG_BLOCK, signal.valid_signals())
        _held.active = True
        return True

    def release_signals() -> None:
        """Let what ``hold_signals`` held through (handlers run now)."""
        if _held.active:
            _held.active = False
            mask, _held.mask = _held.mask, None
            if mask is not None:
                import signal

                signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def signals_held() -> bool:
        return _held.active


class _Blocked(_thread._local):
    """Per thread of the master's cpy2py: the mask it had before
    ``block_signals_in_this_thread`` (None: that was not called here)."""

    mask = None


_blocked = _Blocked()


def block_signals_in_this_thread() -> None:
    """For threads the master's cpy2py starts: signals go to the main thread
    instead (Python runs their handlers there anyway), so that while it holds
    them they wait. (Twins, in process groups of their own, get none.)"""
    from .. import kernel_state

    if not kernel_state.is_master():
        return
    import signal

    sigmask = getattr(signal, "pthread_sigmask", None)
    if sigmask is not None and _thread.get_ident() != _MAIN_THREAD:
        _blocked.mask = sigmask(signal.SIG_BLOCK, signal.valid_signals())


class _UserCodeSignals:
    """``with user_code_signals:`` in a thread of the master's cpy2py around
    user code it runs (a twin's request, a callback): only the signals that
    have a Python handler stay blocked, the rest are as before cpy2py blocked
    them; on leaving, every signal is blocked again (a Python handler
    installed meanwhile must find the thread blocked). A handler of Python's
    runs in the main thread, between any two of its bytecodes, so those must
    wait while it holds its signals (``hold_signals``); a signal without one
    (SIGTERM left at its default, SIGPIPE, SIGCHLD) runs no Python code. A
    process that user code starts inherits the thread's mask: with every
    signal blocked, ``Popen.terminate()`` and a pool's ``terminate()`` could
    not end it. Elsewhere (twins, the main thread, a forked child's) it does
    nothing."""

    def __enter__(self) -> None:
        if _blocked.mask is not None:
            import _signal

            getsignal = _signal.getsignal
            handled = {sig for sig in _signal.valid_signals() if callable(getsignal(sig))}
            _signal.pthread_sigmask(_signal.SIG_SETMASK, handled | _blocked.mask)

    def __exit__(self, *exc_info: Any) -> None:
        if _blocked.mask is not None:  # (not in a child forked meanwhile: see unblock_after_fork)
            import _signal

            _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())


user_code_signals = _UserCodeSignals()


def unblock_after_fork() -> None:
    """In a child forked from a thread of the master's cpy2py (user code it
    ran: ``multiprocessing`` with fork, ``os.fork``): that thread is the
    child's main thread, with the mask it had before cpy2py blocked it."""
    if _blocked.mask is not None:
        import _signal

        _signal.pthread_sigmask(_signal.SIG_SETMASK, _blocked.mask)
        _blocked.mask = None


TYPE_CHECKING = False
if TYPE_CHECKING:  # no cost at run time (a twin's start imports as little as it can)
    from typing import Any, Optional, Protocol, Union

    from .._host import Frame

    class Transport(Protocol):
        """What a ``Connection`` moves frames with, declared in full: every
        transport has all of it (kernel/connection.py reads it directly).
        They are ``FdTransport`` (twins), ``cpy2py._host.NativeTwin`` (the
        master's native and SSH twins), ``cpy2py.ray.RayTwin`` (Ray-placed
        twins), ``cpy2py.wasi.GuestTransport`` (the master's sandboxed
        guests) and ``kernel.guest_main.HostTransport`` (a guest's end)."""

        #: ``send`` also takes a frame as a tuple of its parts (``dumps(...,
        #: parts=True)``: large byte strings as they are, not copied)
        sends_parts: bool
        #: ``send_now`` can send a small frame at once (else it never does)
        sends_now: bool
        #: ``send`` runs the peer on the calling thread for all of its work
        #: (a guest): asyncio calls go to a worker (cpy2py/awaitable.py)
        runs_peer: bool
        #: ``recv`` returns False when this thread holds its signals and one
        #: came (else it lets signal handlers raise without losing a frame)
        stops_for_signals: bool
        #: large plain containers go as plain-data blocks (tag 40014: a
        #: master's link to a guest, the guest's end; a twin says so in its hello)
        plain_blocks: bool

        @property
        def cut_mid_frame(self) -> bool:
            """Whether a send was interrupted half-way through a frame (the
            stream is then unusable)."""

        def send(self, payload: Any) -> None:
            """Send one frame (waits for room in the pipe)."""

        def send_now(self, payload: bytes) -> bool:
            """Send a small frame only if it goes out at once; False: not sent."""

        def recv(self, soon: bool = False) -> Union[bytes, bytearray, Frame, bool, None]:
            """The next frame; None: the stream ended between frames; False:
            this thread holds its signals (``hold_signals``) and one came
            first, with nothing read. ``soon``: the caller alone waits on the
            link, for a reply expected soon (a native twin polls a moment
            before it sleeps; the others ignore it)."""

        def wait_readable(self, timeout: Optional[float] = None, unless: int = -1) -> bool:
            """Whether a frame (or the end of the stream) can be read within
            ``timeout`` seconds (None: waits for it); False sooner once the
            descriptor ``unless`` is readable (an event loop's selector: the
            loop has something to do; -1: none)."""

        def fileno(self) -> int:
            """Readable while there is more to read than ``buffered`` holds
            (servers wait on it with epoll); -1: no such descriptor."""

        def buffered(self) -> bool:
            """Whether a whole frame was read ahead and waits here."""

    class PeerRunner(Transport, Protocol):
        """A transport whose ``send`` runs the peer on the calling thread
        (``runs_peer``: ``cpy2py.wasi.GuestTransport``), which an event loop
        can also run a slice at a time."""

        def queue(self, payload: bytes) -> None:
            """Queue a frame without running the peer."""

        def drive_for(self, limit: float) -> bool:
            """Run the peer until it has sent a frame and waits, or ended
            (True), or for at most ``limit`` seconds (False)."""

        def publish(self) -> None:
            """Make ``fileno`` readable if frames wait: ``recv`` never does
            (its reader takes all ``buffered`` says are there), so a reader
            that leaves the reading role with frames left says so."""

        def charge(self, spent: float) -> bool:
            """Charge ``spent`` seconds of this side's time on what the peer
            sent to the call it serves, as its own running time; whether
            that call is past its timeout now."""


class TransportDefaults:
    """What most transports are (see Transport), written once: each
    transport class derives from this and says where it differs."""

    __slots__ = ()
    sends_parts = False
    sends_now = False
    runs_peer = False
    stops_for_signals = True
    plain_blocks = False
    #: (a send cut by a signal handler is not detected here)
    cut_mid_frame = False

    def send_now(self, payload: bytes) -> bool:
        return False  # (sends_now: never)

    def fileno(self) -> int:
        return -1  # (no descriptor: no server waits at a gate)

    def buffered(self) -> bool:
        return False


def wait_readable(source: Any, timeout: Optional[float] = None, unless: int = -1) -> bool:
    """Whether ``source`` (a descriptor, or anything with ``fileno()``) is
    readable within ``timeout`` seconds (None: until it is); False sooner
    once the descriptor ``unless`` is (-1: none). With ``poll``, not
    ``select``, which refuses descriptors of 1024 or more (a Ray worker
    holds many; an event loop made after many others has one)."""
    poller = select.poll()
    poller.register(source, select.POLLIN)
    if unless >= 0:
        poller.register(unless, select.POLLIN)
    ready = poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000)))
    fd = source if type(source) is int else source.fileno()
    return any(got == fd for got, _ in ready)


class FdTransport(TransportDefaults):
    """Length-prefixed frames: ``send(payload)``, ``recv() -> bytes | None``, ``wait_readable()``."""

    sends_parts = True

    def __init__(self, read_fd: int, write_fd: int, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.max_frame = max_frame
        self._write_lock = _thread.allocate_lock()
        self._read_lock = _thread.allocate_lock()
        self._buffer = bytearray()  # read beyond the last frame
        self._reader: Any = None

    def send(self, payload: bytes | tuple[bytes, ...]) -> None:
        if type(payload) is tuple:
            parts = payload
            header = _HEADER.pack(sum(map(len, parts)))
        elif len(payload) < 65536:
            data = _HEADER.pack(len(payload)) + payload
            with self._write_lock:
                written = os.write(self.write_fd, data)  # (a pipe mostly takes it whole)
                if written < len(data):
                    self._write_all(data[written:])
            return
        else:  # no copy of large payloads
            parts = (payload,)
            header = _HEADER.pack(len(payload))
        with self._write_lock:
            if _writev is None:  # (PyPy 3.9: a write per part)
                self._write_all(header)
                for part in parts:
                    self._write_all(part)
            else:
                self._write_parts([memoryview(header), *map(memoryview, parts)])

    def try_send(self, payload: bytes, timeout: float) -> bool:
        """Send one small frame if it can go out within ``timeout`` seconds
        (the writer role free and the descriptor writable); whether it did.
        For stopping a peer that may have stopped reading."""
        if not self._write_lock.acquire(timeout=max(timeout, 0.0)):
            return False
        try:
            if not select.select([], [self.write_fd], [], max(timeout, 0.0))[1]:
                return False
            self._write_all(_HEADER.pack(len(payload)) + payload)
            return True
        finally:
            self._write_lock.release()

    def _write_parts(self, views: list) -> None:
        """Writes the concatenation of ``views`` with ``writev``, as many of
        them at a time as one call takes here (_MAX_IOVECS)."""
        while views:
            written = _writev(self.write_fd, views[:_MAX_IOVECS])
            while written:
                first = len(views[0])
                if written < first:
                    views[0] = views[0][written:]
                    break
                written -= first
                del views[0]
            while views and not len(views[0]):
                del views[0]

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.write_fd, view)
            view = view[written:]

    def recv(self, soon: bool = False) -> bytes | bytearray | bool | None:
        """One frame's payload; None when the stream ended between frames;
        False, having read nothing, when this thread holds its signals and
        one arrived (see ``hold_signals``).

        Small frames usually arrive whole with their header in one read;
        bytes read beyond the frame are kept for the next call.
        """
        if signals_held():
            import signal

            while not self.buffered() and not select.select([self.read_fd], [], [], 0.05)[0]:
                if signal.sigpending():
                    return False
        return self._recv()

    def _recv(self) -> bytes | bytearray | None:
        with self._read_lock:
            buffer = self._buffer
            if not buffer:  # mostly a frame comes whole, alone: one copy of it
                chunk = os.read(self.read_fd, _READ_SIZE)
                size = len(chunk)
                if 4 < size <= self.max_frame + 4 and size == 4 + _HEADER.unpack_from(chunk)[0]:
                    return chunk[4:]
                if not chunk:
                    return None
                buffer = self._buffer = bytearray(chunk)
            while len(buffer) < 4:
                chunk = os.read(self.read_fd, _READ_SIZE)
                if not chunk:
                    if buffer:
                        raise ProtocolError("the stream ended inside a frame header")
                    return None
                buffer += chunk
            (length,) = _HEADER.unpack_from(buffer)
            if length == 0 or length > self.max_frame:
                raise ProtocolError(
                    f"received a frame of {length} bytes; frames must hold 1 to {self.max_frame} bytes"
                )
            end = 4 + length
            if len(buffer) >= end:
                self._buffer = buffer[end:]
                return bytes(buffer[4:end])
            # a large frame: read the rest straight into its own buffer, a
            # Frame of the compiled host where it imports (not copied again
            # by the codec, as a bytearray would be)
            if _read_frame is not None:
                first = bytes(buffer[4:])
                self._buffer = bytearray()
                return _read_frame(self.read_fd, first, length)
            frame = bytearray(length)
            have = len(buffer) - 4
            frame[:have] = buffer[4:]
            self._buffer = bytearray()
            # straight into the frame, no chunk objects (os.readv: not in PyPy 3.9)
            view = memoryview(frame)
            while have < length:
                got = self._file().readinto(view[have:])
                if not got:
                    raise ProtocolError("the stream ended inside a frame")
                have += got
            return frame

    def _file(self) -> Any:
        """An unbuffered file over the read end, for ``readinto``."""
        if self._reader is None:
            self._reader = os.fdopen(self.read_fd, "rb", buffering=0, closefd=False)
        return self._reader

    def fileno(self) -> int:
        """The descriptor frames arrive on (readable while there is more to read
        than what ``buffered`` has)."""
        return self.read_fd

    def buffered(self) -> bool:
        """Whether a whole frame was read ahead and waits here."""
        buffer = self._buffer
        return len(buffer) >= 4 and len(buffer) >= 4 + _HEADER.unpack_from(buffer)[0]

    def wait_readable(self, timeout: float | None = None, unless: int = -1) -> bool:
        """Whether a frame (or the end of the stream) can be read within
        ``timeout`` seconds, or before ``unless`` is readable."""
        return bool(self._buffer) or wait_readable(self.read_fd, timeout, unless)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
