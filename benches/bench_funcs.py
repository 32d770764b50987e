"""What the benchmark runs on the far side: module-level functions that every
twin kind and peer can import (CPython and PyPy, Python 3.9+).

Kept free of imports beyond the standard library, so the original cpy2py,
execnet, RPyC and multiprocessing children load it as well as cpy2py twins.
"""

import os
import sys
import time

MONOTONIC = time.CLOCK_MONOTONIC


def noop():
    """The no-op call: returns a small int."""
    return 1


def stamp():
    """This process's CLOCK_MONOTONIC, which all processes on Linux share:
    the master's clock before and after the call splits it into halves."""
    return time.clock_gettime_ns(MONOTONIC)


def echo(value):
    return value


def busy(seconds):
    """Runs Python for ``seconds`` (a long call that never waits)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return seconds


_calls = [0]


def now_and_then_slow(value):
    """Returns ``value``; one call in 50 first runs Python for 3 ms (a plugin
    whose calls are mostly short, as real ones are)."""
    _calls[0] += 1
    if _calls[0] % 50 == 0:
        busy(0.003)
    return value


def affinity():
    """The CPUs this process may run on (to check that pinning was inherited).
    PyPy 3.9 has no os.sched_getaffinity: /proc/self/status tells the same;
    a sandboxed twin sees neither ([])."""
    try:
        return cpus_allowed()
    except OSError:
        return []


def cpus_allowed():
    """os.sched_getaffinity(0) without it (PyPy 3.9 lacks it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                cpus = []
                for part in line.split(":", 1)[1].strip().split(","):
                    lo, _, hi = part.partition("-")
                    cpus.extend(range(int(lo), int(hi or lo) + 1))
                return cpus
    return []


def describe():
    """Implementation, version and executable of this process, and the
    codec cpy2py uses here when it is this project's cpy2py."""
    info = {
        "implementation": sys.implementation.name,
        "version": sys.version.split()[0],
        "build": " ".join(sys.version.split()[1:]).replace("\n", " "),
        "executable": sys.executable,
        "pid": getattr(os, "getpid", lambda: None)(),
        "affinity": affinity(),
    }
    codec = sys.modules.get("cpy2py.protocol.codec")
    if codec is not None:
        info["codec"] = getattr(codec, "IMPLEMENTATION", None)
    return info


def mp_child(conn):
    """multiprocessing.Pipe peer: echo until None; 'stamp' answers the clock."""
    recv, send = conn.recv, conn.send
    while True:
        item = recv()
        if item is None:
            return
        if item == "stamp":
            send(time.clock_gettime_ns(MONOTONIC))
        elif item == "affinity":
            send(affinity())
        else:
            send(item)
