"""Code the reliability tests run in twins and in the master.

Module-level and free of pytest imports, so every interpreter can import it
by name. Twin objects are pinned to the twin ids the tests start
(``rel-python3``, ``rel-pypy3``); functions pinned to the master are the
callbacks a twin makes while the master waits for it.
"""

from __future__ import annotations

import gc
import hashlib
import os
import signal
import time

from cpy2py import TwinObject, kernel_state, twinfunction

KINDS = ("python3", "pypy3")


def twin_id(kind: str) -> str:
    """The id under which the reliability tests run a twin of ``kind``."""
    return f"rel-{kind}"


# -- small functions for twins ----------------------------------------------------


def pid() -> int:
    return os.getpid()


def sleep_then(seconds: float, value=None):
    time.sleep(seconds)
    return value


def wait_for_file(path: str) -> str:
    """Blocks until ``path`` exists (a test releases it)."""
    while not os.path.exists(path):
        time.sleep(0.01)
    return "released"


def exit_now(status: int) -> None:
    os._exit(status)


def close_fds(*fds: int) -> str:
    """Close the twin's protocol descriptors from inside a request."""
    for fd in fds:
        os.close(fd)
    return "closed"


def stop_self() -> None:
    """SIGSTOP this very process (the kernel stops reading and writing)."""
    os.kill(os.getpid(), signal.SIGSTOP)
    # the group stop reaches this thread asynchronously: never reply before it
    time.sleep(1)


def rss_bytes() -> int:
    """Resident set size of this process, from /proc."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def export_count() -> int:
    """Objects this interpreter keeps alive for other interpreters."""
    from cpy2py.kernel import references

    gc.collect()
    return references.export_count()


def proxy_count() -> int:
    """Proxies alive in this interpreter."""
    from cpy2py.kernel import references

    gc.collect()
    return references.proxy_count()


def collect() -> None:
    gc.collect()


# -- load: every request carries its own token, every reply must echo it --------


def digest(data) -> str:
    return hashlib.sha1(bytes(data)).hexdigest()


def answer(token, payload):
    """The reply a load request expects: its token and its payload's digest."""
    return [token, len(payload), digest(payload)]


def answer_with_callback(token, payload, callback_count: int):
    """Like ``answer``, after calling the master back ``callback_count`` times;
    every callback is checked against its own token."""
    for i in range(callback_count):
        sub = f"{token}/cb{i}"
        got = master_echo(sub, payload[: 64 + i])
        if got != [sub, kernel_state.MASTER_ID, digest(payload[: 64 + i])]:
            raise AssertionError(f"callback {sub} got {got!r}")
    return answer(token, payload)


@twinfunction(kernel_state.MASTER_ID)
def master_echo(token, payload):
    """Runs in the master whoever calls it."""
    return [token, kernel_state.TWIN_ID, digest(payload)]


def recurse(token, depth: int, twins: list):
    """In a twin: twin -> master -> twin ... ``depth`` more levels, the master
    choosing the next twin from ``twins`` by depth; returns the path taken."""
    here = [f"{token}@{kernel_state.TWIN_ID}"]
    if depth == 0:
        return here
    return here + master_recurse(token, depth - 1, twins)


@twinfunction(kernel_state.MASTER_ID)
def master_recurse(token, depth: int, twins: list):
    from cpy2py import TwinMaster

    here = [f"{token}@{kernel_state.TWIN_ID}"]
    if depth == 0:
        return here
    twin = twins[depth % len(twins)]
    return here + TwinMaster(twinterpreter_id=twin).execute(recurse, token, depth - 1, twins)


def expected_path(token, depth: int, twins: list, first: str) -> list:
    """The path ``recurse(token, depth, twins)`` takes when started in ``first``."""
    path, where = [], first
    for level in range(depth, -1, -1):
        path.append(f"{token}@{where}")
        if where == kernel_state.MASTER_ID:
            where = twins[level % len(twins)]
        else:
            where = kernel_state.MASTER_ID
    return path


# -- objects pinned to the reliability twins -------------------------------------


class Blob_python3(TwinObject):  # noqa: N801 - named after the kind it lives in
    __twin_id__ = twin_id("python3")

    def __init__(self, tag, size=16):
        self.tag = tag
        self.data = bytes(size)

    def describe(self):
        return [self.tag, len(self.data), kernel_state.TWIN_ID]


class Blob_pypy3(Blob_python3):  # noqa: N801
    __twin_id__ = twin_id("pypy3")


def blob_class(kind: str):
    return {"python3": Blob_python3, "pypy3": Blob_pypy3}[kind]


class Opaque:
    """Not picklable (holds a lock): crosses as a proxy of a master object."""

    def __init__(self, n):
        import threading

        self.n = n
        self.lock = threading.Lock()

    def value(self):
        return self.n


def use_opaque(obj) -> int:
    """In a twin: call a proxy of a master object, then drop it."""
    return obj.value()


def use_and_drop_master_objects(count: int) -> int:
    """In a twin: get ``count`` objects of the master as proxies, use each, drop it."""
    total = 0
    for i in range(count):
        total += master_opaque(i).value()
    gc.collect()
    return total


@twinfunction(kernel_state.MASTER_ID)
def master_opaque(n):
    return Opaque(n)


def write_marker(path: str, text: str) -> None:
    """Leaves a trace that it ran."""
    with open(path, "a") as marker:
        marker.write(text + "\n")


def write_marker_at_exit(path: str, text: str) -> None:
    """A twin's group finalizer: an exit hook that leaves a trace when the twin ends."""
    import atexit

    atexit.register(write_marker, path, text)


def die_mid_frame(status: int) -> None:
    """Crash while sending a reply: half a frame on the protocol pipe, then exit."""
    import struct

    os.write(4, struct.pack(">I", 1 << 20) + b"\x83\x01\x01" + bytes(1000))
    os._exit(status)


def thread_count() -> int:
    import threading

    return threading.active_count()


#: server threads this twin's links started since ``count_server_starts``
SERVER_STARTS = [0]


def count_server_starts() -> None:
    """From now on, count the server threads the twin's links start."""
    from cpy2py.kernel.connection import Connection

    original = getattr(Connection._start_server, "__wrapped__", Connection._start_server)

    def counted(self):
        SERVER_STARTS[0] += 1
        return original(self)

    counted.__wrapped__ = original
    Connection._start_server = counted
    SERVER_STARTS[0] = 0


def server_starts() -> int:
    return SERVER_STARTS[0]


# -- a Ctrl-C in the master's own steps around a callback ------------------------------


class Interrupt(BaseException):
    """What the tests' SIGINT handler raises, as KeyboardInterrupt is (not
    an Exception); here, so that every twin can rebuild it."""


#: the ident of a thread of the master's application that catches the
#: SIGINT ``SignalsOnArrival`` sends, if not the main thread (set by a test)
CATCHER = None


class SignalsOnArrival:
    """Rebuilt in the master (unpickled), it sends the master a SIGINT: a
    Ctrl-C that comes while the master decodes a callback's arguments,
    before the callback runs. It goes to the main thread, or to the thread
    ``CATCHER`` names (as the kernel gives a process's Ctrl-C to another
    thread while the main thread blocks it): Python runs the handler in the
    main thread either way."""

    def __init__(self) -> None:
        self.made_in = kernel_state.TWIN_ID

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        if kernel_state.is_master():
            import threading

            if CATCHER is None:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]
                return
            signal.pthread_kill(CATCHER, signal.SIGINT)
            # the decoding goes on long enough for that thread's handler to run
            ends = time.monotonic() + 0.05
            while time.monotonic() < ends:
                pass


#: how each ``call_back_noting`` here ended, in order
NOTED: list = []


def call_back_noting(callback, value):
    """Calls the master's ``callback`` and says how that ended (and notes it)."""
    try:
        outcome = ["returned", callback(value)]
    except BaseException as err:
        outcome = ["raised", type(err).__name__]
    NOTED.append(outcome)
    return outcome


def noted() -> list:
    return NOTED


def call_back_with_signal(callback):
    """``call_back_noting`` with a value that signals the master as it arrives."""
    return call_back_noting(callback, SignalsOnArrival())


def interrupt_master_then_call_back(master_pid: int, callback):
    """Run nested in a callback of the master: a SIGINT to the master
    interrupts its call waiting for this one (the callback that made that
    call is answered at once); then, once that answer has surely arrived
    here, this calls ``callback`` and says how that ended."""
    os.kill(master_pid, signal.SIGINT)
    time.sleep(0.5)
    return call_back_noting(callback, "late")
