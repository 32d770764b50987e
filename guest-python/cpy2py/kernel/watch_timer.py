"""A one-shot kernel timer on a descriptor (Linux ``timerfd``), for the
watchdog of a link's gate (``connection._Gate``): it wakes a server only if
it expires, so arming it costs one system call and no thread wakes while
it is not needed.

``os.timerfd_create`` where the interpreter has it (CPython 3.13+), else
libc's through ctypes (PyPy 3.9, older CPython): imported only when a link
first needs the watchdog, since ctypes takes PyPy about 50 ms to import.
"""

from __future__ import annotations

import os

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = 0o4000
_TFD_CLOEXEC = 0o2000000


class WatchTimer:
    """A timerfd: ``fileno()`` becomes readable ``start(seconds)`` later."""

    def __init__(self) -> None:
        if hasattr(os, "timerfd_create"):
            self._fd = os.timerfd_create(_CLOCK_MONOTONIC, flags=_TFD_NONBLOCK | _TFD_CLOEXEC)
            self._settime = None
        else:
            self._fd, self._settime = _from_libc()

    def fileno(self) -> int:
        return self._fd

    def start(self, seconds: float) -> None:
        """Expire once, ``seconds`` from now (replacing any earlier start)."""
        seconds = max(seconds, 1e-6)  # (zero would disarm it)
        if self._settime is None:
            os.timerfd_settime(self._fd, initial=seconds)
        else:
            self._settime(self._fd, seconds)

    def clear(self) -> None:
        """Take the expiry that made the descriptor readable."""
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self._fd)


def _from_libc() -> tuple:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    class Itimerspec(ctypes.Structure):
        _fields_ = [("it_interval", Timespec), ("it_value", Timespec)]

    libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
    if fd < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    spec = Itimerspec()

    def settime(fd: int, seconds: float) -> None:
        whole = int(seconds)
        spec.it_value.tv_sec = whole
        spec.it_value.tv_nsec = int((seconds - whole) * 1e9)
        if libc.timerfd_settime(fd, 0, ctypes.byref(spec), None) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))

    return fd, settime
