"""Functions and classes the lifecycle tests (tests/test_native_lifecycle.py)
run inside twins. Module-level and free of pytest imports, so every twin can
import this module by name."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time

from cpy2py import TwinObject, kernel_state


def pid() -> int:
    return os.getpid()


def sleep_then(seconds: float, value=None):
    time.sleep(seconds)
    return value


def call_back(callback, *args):
    """Call ``callback`` (a function of the master) from the twin."""
    return callback(*args)


def fork_sleeper(how: str) -> int:
    """Start a descendant that sleeps for a long time, holding the twin's
    descriptors; returns its pid."""
    if how == "os.fork":
        child = os.fork()
        if child == 0:
            time.sleep(300)
            os._exit(0)
        return child
    if how == "multiprocessing":
        import multiprocessing

        process = multiprocessing.get_context("fork").Process(target=time.sleep, args=(300,), daemon=False)
        process.start()
        return process.pid
    if how == "subprocess":  # a program of its own, with the twin's descriptors passed on
        return subprocess.Popen(["sleep", "300"], close_fds=False, pass_fds=(3, 4)).pid
    raise ValueError(how)


class Unsendable(Exception):
    """An exception whose arguments cannot travel as a copy (a lock)."""


def raise_with_lock():
    raise Unsendable("holds a lock", threading.Lock())


def raise_with(obj):
    raise Unsendable("holds an object", obj)


def export_count() -> int:
    from cpy2py.kernel import references

    gc.collect()
    return references.export_count()


class PartlyPicklable:
    """Pickling it exports the twin object inside, then fails: it travels by
    reference instead."""

    def __init__(self, inner):
        self.inner = inner

    def __reduce__(self):
        return (PartlyPicklable, (self.inner, threading.Lock()))


def take_and_drop(value) -> str:
    return type(value).__name__


class MasterNode(TwinObject):
    """Lives in the master; holds a partner (a proxy of a twin object)."""

    __twin_id__ = kernel_state.MASTER_ID

    def __init__(self, size: int = 0):
        self.partner = None
        self.payload = bytearray(size)


def _pinned(kind: str) -> type:
    name = f"TwinNode_{kind.replace('-', '_')}"
    return type(MasterNode)(
        name,
        (TwinObject,),
        {
            "__twin_id__": kind,
            "__qualname__": name,
            "__module__": __name__,
            "__init__": MasterNode.__init__,
        },
    )


TwinNode_python3 = _pinned("python3")
TwinNode_pypy3 = _pinned("pypy3")


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def running_in() -> str:
    return sys.implementation.name


def raise_with_twin_object():
    """Raise with an object native to this twin (sent by reference)."""
    node = globals()[f"TwinNode_{kernel_state.TWIN_ID.replace('-', '_')}"]()
    raise Unsendable("holds a twin object", node)
