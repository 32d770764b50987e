"""Faults (issue 6): twins that die, exit, close their descriptors or stop;
masters that end in every way; stop() and destroy() racing with calls.

Every fault is real: real processes, real signals. Waits are measured only
to tell a hang from an answer: ``HANG`` seconds is far beyond any normal
wait and is never a performance claim.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import reliability_helpers as rh
from cpy2py import TwinMaster, TwinterpreterTerminated, TwinterpreterUnavailable
from cpy2py import master as master_module
from reliability_support import HANG, Calls, Loop, in_thread, settle, stop_twin, wait_for_pending, wait_gone
from support import TESTS_DIR, require_interpreter


@pytest.fixture(params=rh.KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    require_interpreter(request.param)
    return request.param


@pytest.fixture
def victim(kind: str):
    """A twin of ``kind`` that the test may kill; destroyed afterwards whatever happened."""
    master = TwinMaster(kind, twinterpreter_id=f"victim-{kind}")
    master.start()
    processes = [master_module._running[master.twinterpreter_id].process]
    yield master
    twin = master_module._running.get(master.twinterpreter_id)
    if twin is not None:
        processes.append(twin.process)
    for process in processes:  # whatever the test did (a stopped twin must not block anyone)
        process.kill()  # through the child's handle: never another process that reused its pid
    master.destroy()


@pytest.fixture(scope="module")
def bystander():
    """A twin that must not notice what happens to the others."""
    with TwinMaster("python3", twinterpreter_id="bystander") as master:
        yield master


# -- a twin killed, exiting, closing its descriptors ------------------------------------


def test_a_twin_that_dies_mid_call_leaves_the_masters_signals_deliverable(kind, victim):
    """The main thread holds its signals while it reads its reply: a twin that
    exits mid-call must not leave them held (Ctrl-C, or any handler, would then
    wait for the next call: they were, after every such crash)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are held by the main thread only")
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        with pytest.raises(TwinterpreterTerminated):
            victim.execute(os._exit, 3)
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)  # (bytecode runs: a delivered signal's handler with it)
        assert received == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_sigkill_mid_call_fails_every_waiting_call_and_restarts(kind, victim, bystander):
    pid = victim.execute(rh.pid)
    loop = Loop(bystander)
    calls = Calls(victim, 4, rh.sleep_then, 60, "never")
    settle()
    assert calls.running() == 4
    os.kill(pid, signal.SIGKILL)
    waited = calls.join()
    errors = calls.errors()
    assert len(errors) == 4, calls.outcomes
    for err in errors:
        assert isinstance(err, TwinterpreterTerminated), repr(err)
        assert "victim-" in str(err) and "SIGKILL" in str(err), str(err)
    assert not victim.is_alive
    # the calls in flight were told; the next use starts a fresh twin
    assert victim.execute(rh.pid) != pid
    # the other twin never noticed
    served = loop.stop()
    assert served > 0 and bystander.execute(rh.answer, "after", b"") == rh.answer("after", b"")
    assert victim.start() is True
    assert victim.execute(rh.pid) not in (pid, os.getpid())
    assert waited < HANG  # measured only to rule out a hang (see Calls.join)


def test_exit_mid_call_fails_every_waiting_call(kind, victim, bystander):
    pid = victim.execute(rh.pid)
    sleepers = Calls(victim, 3, rh.sleep_then, 60)
    settle()
    exiting = Calls(victim, 1, rh.exit_now, 7)
    sleepers.join()
    exiting.join()
    for err in sleepers.errors() + exiting.errors():
        assert isinstance(err, TwinterpreterTerminated) and "exited with status 7" in str(err), repr(err)
    assert len(sleepers.errors() + exiting.errors()) == 4
    assert wait_gone(pid)
    assert bystander.execute(rh.pid) != pid
    victim.start()
    assert victim.execute(rh.sleep_then, 0, "back") == "back"


@pytest.mark.parametrize("fds", [(3, 4), (4,), (3,)], ids=["both", "write-end", "read-end"])
def test_twin_closing_its_protocol_fds(kind, victim, bystander, fds):
    pid = victim.execute(rh.pid)
    # With only its read end closed the twin can still answer the calls it
    # runs, and it ends when they are done (its main thread runs one of
    # them): the sleepers are short so that the test is.
    sleepers = Calls(victim, 2, rh.sleep_then, 60 if 4 in fds else 2, "slept")
    settle()
    closer = Calls(victim, 1, rh.close_fds, *fds)
    closer.join()
    outcome = closer.outcomes[0]
    if 4 in fds:  # the reply cannot travel
        assert outcome[0] == "error" and isinstance(outcome[1], TwinterpreterTerminated), outcome
    else:  # the twin can still answer this one, but reads nothing more
        assert outcome == ("value", "closed") or isinstance(outcome[1], TwinterpreterTerminated), outcome
    # the next use either finds it dead (when no call was told yet) or,
    # once a call was told, starts a fresh twin
    try:
        assert victim.execute(rh.pid) != pid
    except TwinterpreterTerminated:
        pass
    sleepers.join()
    for outcome in sleepers.outcomes:
        if 4 in fds:
            assert outcome[0] == "error" and isinstance(outcome[1], TwinterpreterTerminated), outcome
        else:
            assert outcome == ("value", "slept") or isinstance(outcome[1], TwinterpreterTerminated), outcome
    assert wait_gone(pid), "a twin that closed its link was left running"
    assert bystander.execute(rh.answer, "ok", b"") == rh.answer("ok", b"")
    victim.start()
    assert victim.execute(rh.pid) != pid


# -- a twin that stops reading ------------------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "destroy"])
def test_stopped_twin_with_a_full_pipe_can_be_stopped_and_destroyed(kind, victim, bystander, how):
    """A SIGSTOPped twin reads nothing: a slow twin is waited for (there is no
    per-call timeout for native twins), but the pipe to it fills up and
    senders block. stop() and destroy() must still end it, and fail every call."""
    pid = victim.execute(rh.pid)
    stop_twin(pid)
    small = Calls(victim, 2, rh.sleep_then, 0, "small")
    big = Calls(victim, 3, rh.answer, "big", bytes(1 << 20))  # 3 MiB: far more than a pipe holds
    wait_for_pending(victim, 5, small, big)  # a fixed pause was too short under load
    assert small.running() == 2 and big.running() == 3, "calls to a stopped twin must wait, not fail"
    assert bystander.execute(rh.pid) != pid  # other twins carry on meanwhile
    stopper = threading.Thread(target=getattr(victim, how), kwargs={"timeout": 1.0} if how == "stop" else {})
    stopper.start()
    stopper.join(HANG)
    assert not stopper.is_alive(), f"{how}() hangs on a twin that stopped reading"
    small.join()
    big.join()
    for err in small.errors() + big.errors():
        assert isinstance(err, TwinterpreterTerminated), repr(err)
    assert len(small.errors() + big.errors()) == 5
    assert wait_gone(pid)
    victim.start()
    assert victim.execute(rh.sleep_then, 0, "back") == "back"


def test_twin_stopping_itself_mid_call_is_waited_for_then_destroyed(kind, victim):
    pid = victim.execute(rh.pid)
    stopped = Calls(victim, 1, rh.stop_self)
    settle()
    assert stopped.running() == 1, "a stopped twin is slow, not dead: its call waits"
    destroyer = threading.Thread(target=victim.destroy)
    destroyer.start()
    destroyer.join(HANG)
    assert not destroyer.is_alive()
    stopped.join()
    assert isinstance(stopped.errors()[0], TwinterpreterTerminated)
    assert wait_gone(pid)


# -- stop() and destroy() while other threads call ----------------------------------------


@pytest.mark.parametrize("how", ["stop", "destroy"])
def test_stop_and_destroy_during_calls_from_other_threads(kind, victim, monkeypatch, how):
    monkeypatch.setenv("CPY2PY_NOAUTO", "1")  # a call after the stop must not start a new twin
    pid = victim.execute(rh.pid)
    results: dict = {}

    def caller(n: int) -> None:
        got = results[n] = []
        i = 0
        while True:
            token = f"{n}-{i}"
            payload = os.urandom(i % 7 * 1000)
            try:
                reply = victim.execute(rh.answer, token, payload)
            except (TwinterpreterTerminated, TwinterpreterUnavailable) as err:
                got.append(err)
                return
            except BaseException as err:  # anything else is a failure of the test
                got.append(err)
                return
            got.append(reply == rh.answer(token, payload))
            i += 1

    threads = [threading.Thread(target=caller, args=(n,), daemon=True) for n in range(8)]
    long_calls = Calls(victim, 2, rh.sleep_then, 60)
    for thread in threads:
        thread.start()
    settle()
    getattr(victim, how)()
    for thread in threads:
        thread.join(HANG)
        assert not thread.is_alive(), f"a call hangs after {how}()"
    long_calls.join()
    for n, got in results.items():
        assert got and all(ok is True for ok in got[:-1]), f"thread {n} got a wrong reply"
        assert isinstance(got[-1], (TwinterpreterTerminated, TwinterpreterUnavailable)), repr(got[-1])
    for err in long_calls.errors():
        assert isinstance(err, TwinterpreterTerminated) and "by the master" in str(err), repr(err)
    assert len(long_calls.errors()) == 2
    assert wait_gone(pid)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("raised", [Interrupted, TimeoutError], ids=["own-exception", "TimeoutError"])
def test_interrupted_call_leaves_the_link_usable(kind, victim, raised):
    """A signal handler that raises while a call waits (Ctrl-C with a handler,
    an alarm that raises TimeoutError): the caller gets that exception, the
    twin lives on, the late reply is dropped, the next call gets its own."""

    def handler(signum, frame):
        raise raised("interrupted by a signal handler")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        timer = threading.Timer(0.3, os.kill, args=(os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(raised, match="interrupted by a signal handler"):
            victim.execute(rh.sleep_then, 1.5, "late")
        timer.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    for i in range(5):
        assert victim.execute(rh.sleep_then, 0.4, f"own-{i}") == f"own-{i}"
    assert victim.is_alive


def test_the_next_call_after_ctrl_c_does_not_wait_for_the_interrupted_one(kind, victim, tmp_path):
    """The interrupted call goes on in the twin; the thread's next call is
    not queued behind it (it was: a runaway loop in the twin then blocked
    every later call of that thread, as in a notebook)."""
    flag = tmp_path / "release"
    restore = _interrupt_after(0.3)
    try:
        with pytest.raises(Interrupted):
            victim.execute(rh.wait_for_file, str(flag))
    finally:
        restore()
    release = threading.Timer(HANG, flag.touch)  # (if the next call waits behind it, it ends)
    release.start()
    try:
        assert victim.execute(os.path.exists, str(flag)) is False, (
            "the next call waited for the interrupted one"
        )
        assert victim.execute(rh.sleep_then, 0, "next") == "next"
    finally:
        release.cancel()
        flag.touch()


@pytest.fixture(params=["main thread", "another thread"])
def caught_by(request: pytest.FixtureRequest):
    """Which thread of the master catches a Ctrl-C: the main thread, or
    another thread of the application (the kernel gives a process's signal
    to a thread that does not block it, while the main thread holds them)."""
    if request.param == "main thread":
        yield request.param
        return
    stop = threading.Event()
    catcher = threading.Thread(target=stop.wait, name="catcher")
    catcher.start()
    rh.CATCHER = catcher.ident
    try:
        yield request.param
    finally:
        rh.CATCHER = None
        stop.set()
        catcher.join()


def test_a_ctrl_c_while_the_master_reads_a_callback_is_that_callbacks_answer(kind, victim, caught_by):
    """A Ctrl-C that comes while the master decodes a twin's callback
    (rebuilding its argument, before the callback's function runs) is that
    callback's exception, sent to the twin as its answer. Before, it left
    the master's steps around the callback with no answer sent, and the
    twin's thread waited for ever; caught by another thread of the
    application, it still did so (the main thread's held signals did not
    stop it): the host now sends such a signal on to the main thread. The
    handler is installed after the master held its signals once, as a
    program does that sets its own after its first calls: ``signal.signal``
    then takes the host's SIGINT handler out, and the next hold puts it
    back in front."""

    def handler(signum, frame):
        raise rh.Interrupt("Ctrl-C")

    ran = []

    def callback(value):  # (a closure: the twin gets a reference, it runs here)
        ran.append(value)

    assert victim.execute(rh.sleep_then, 0, "first") == "first"  # (the master held its signals)
    previous = signal.signal(signal.SIGINT, handler)
    try:
        outcome = victim.execute(rh.call_back_with_signal, callback)
    finally:
        signal.signal(signal.SIGINT, previous)
    answers = victim.execute(rh.noted)
    deadline = time.monotonic() + HANG
    while not answers and time.monotonic() < deadline:  # (the twin's thread may be a little behind)
        time.sleep(0.05)
        answers = victim.execute(rh.noted)
    assert answers, "the callback never got an answer: the twin's thread waits for ever"
    assert (outcome, answers, ran) == (["raised", "Interrupt"], [["raised", "Interrupt"]], [])
    assert victim.execute(rh.sleep_then, 0, "next") == "next"


def test_a_ctrl_c_in_a_callback_leaves_the_twins_nested_call_to_finish(kind, victim):
    """A Ctrl-C interrupts the master's call into the twin made inside a
    twin's callback (twin -> master -> twin): the callback is answered at
    once, while the twin still runs the nested call, which then calls the
    master once more. The twin finishes its nested call (the master answers
    its late callback) before it takes the outer answer. Before, the twin
    took the early answer as a protocol error: its link broke and its state
    was lost."""

    def handler(signum, frame):
        raise rh.Interrupt("Ctrl-C")

    ran = []

    def late(value):  # called by the twin after the master's Ctrl-C
        ran.append(value)
        return "answered"

    def callback(value):  # the twin's callback, which calls the twin again
        return victim.execute(rh.interrupt_master_then_call_back, os.getpid(), late)

    pid = victim.execute(rh.pid)
    previous = signal.signal(signal.SIGINT, handler)
    try:
        outcome = victim.execute(rh.call_back_noting, callback, "first")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert outcome == ["raised", "Interrupt"]
    assert ran == ["late"]
    assert victim.execute(rh.noted) == [["returned", "answered"], ["raised", "Interrupt"]]
    assert victim.execute(rh.pid) == pid, "the twin was restarted: its state was lost"


def test_a_second_ctrl_c_while_an_interrupted_call_cleans_up_leaves_the_link_usable(kind, victim):
    """Ctrl-C twice in a row: the second comes while the first unwinds the
    call it interrupted. The call's cleanup is not cut short (a call left
    registered would take a later call's reply, and the link break), and
    every later call gets its own result."""
    main = threading.main_thread().ident
    second: list = []

    def handler(signum, frame):
        if not second:  # the first: another Ctrl-C comes as this one unwinds
            second.append(True)
            signal.pthread_kill(main, signal.SIGINT)  # type: ignore[arg-type]
        raise rh.Interrupt("Ctrl-C")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        for i in range(10):
            second.clear()
            timer = threading.Timer(0.05, signal.pthread_kill, args=(main, signal.SIGINT))
            timer.start()
            try:
                with pytest.raises(rh.Interrupt):
                    victim.execute(rh.sleep_then, 0.2, "late")
            finally:
                timer.join()
            assert second, "the handler ran"
            assert victim.execute(rh.sleep_then, 0, i) == i
    finally:
        signal.signal(signal.SIGINT, previous)
    time.sleep(0.3)  # (the late replies come)
    assert [victim.execute(rh.sleep_then, 0, n) for n in range(3)] == [0, 1, 2]
    assert victim.is_alive


def _interrupt_after(seconds: float):
    """A SIGINT to this process after ``seconds``, with a handler that raises
    Interrupted (pytest's own would end the session); returns a restorer."""

    def handler(signum, frame):
        raise Interrupted("Ctrl-C")

    previous = signal.signal(signal.SIGINT, handler)
    timer = threading.Timer(seconds, os.kill, args=(os.getpid(), signal.SIGINT))
    timer.start()

    def restore():
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGINT, previous)

    return restore


@pytest.mark.parametrize("awaited", [False, True], ids=["sync", "awaited"])
def test_ctrl_c_reaches_a_master_blocked_sending_to_a_twin_that_stopped_reading(kind, victim, awaited):
    """The pipe to a SIGSTOPped twin fills up and a large send blocks (a
    call's, or an awaited call's on its event loop): Ctrl-C still reaches
    the master; the message was cut half-sent, so that twin is stopped (its
    state is lost) and the next start gives a fresh one."""
    import asyncio

    pid = victim.execute(rh.pid)
    stop_twin(pid)
    restore = _interrupt_after(0.3)
    started = time.monotonic()
    try:
        with pytest.raises(Interrupted):
            if awaited:
                asyncio.run(victim.execute_async(rh.answer, "big", bytes(8 << 20)))
            else:
                victim.execute(rh.answer, "big", bytes(8 << 20))
    finally:
        restore()
    assert time.monotonic() - started < HANG / 2, "Ctrl-C waited for the twin to read"
    assert wait_gone(pid), "the twin whose message was cut still runs"
    with pytest.raises(TwinterpreterTerminated, match="cut half-sent"):
        victim.execute(rh.pid)
    victim.start()
    assert victim.execute(rh.sleep_then, 0, "back") == "back"


def test_ctrl_c_reaches_a_master_waiting_for_another_threads_send_to_a_stopped_twin(kind, victim):
    """Another thread's large send blocks on the pipe to a SIGSTOPped twin,
    holding the link's turn to write; a call of the main thread waits for
    that turn: Ctrl-C still reaches it. Nothing of the interrupted call was
    sent, so once the twin reads again the link goes on, with the same twin."""
    pid = victim.execute(rh.pid)
    stop_twin(pid)

    def big():
        try:
            victim.execute(rh.answer, "big", bytes(8 << 20))
        except Exception:
            pass  # (its fate is not this test's)

    sender = threading.Thread(target=big, daemon=True)
    sender.start()
    time.sleep(0.3)  # (it holds the turn to write, waiting for room)
    restore = _interrupt_after(0.3)
    started = time.monotonic()
    try:
        with pytest.raises(Interrupted):
            victim.execute(rh.pid)
    finally:
        restore()
    assert time.monotonic() - started < HANG / 2, "Ctrl-C waited for the other thread's send"
    os.kill(pid, signal.SIGCONT)
    sender.join(HANG)
    assert not sender.is_alive(), "the other thread's send did not go on"
    assert victim.execute(rh.pid) == pid


def test_ctrl_c_reaches_a_master_while_a_twin_starts(tmp_path):
    """A twin that takes long to answer its handshake (a slow wrapper): Ctrl-C
    interrupts start() at once and nothing of the start is left running."""
    require_interpreter("python3")
    wrapper = tmp_path / "slow-python"
    pid_file = tmp_path / "pid"
    wrapper.write_text(f'#!/bin/sh\necho $$ > {pid_file}\nsleep 30\nexec python3 "$@"\n')
    wrapper.chmod(0o755)
    restore = _interrupt_after(0.5)
    started = time.monotonic()
    try:
        with pytest.raises(Interrupted):
            TwinMaster(str(wrapper), twinterpreter_id="slow-start").start()
    finally:
        restore()
    assert time.monotonic() - started < HANG / 2, "Ctrl-C waited for the handshake"
    assert wait_gone(int(pid_file.read_text())), "the interrupted start left its process running"


# -- the master ending --------------------------------------------------------------------

_MASTER = """
import os, sys, signal, threading, time
import reliability_helpers as rh
from cpy2py import TwinMaster

masters = []
for kind in {kinds!r}:
    master = TwinMaster(kind, twinterpreter_id=rh.twin_id(kind))
    master.start()
    print("pid", master.execute(rh.pid), flush=True)
    masters.append(master)
"""

_STATES = {
    # nothing in flight
    "idle": "",
    # daemon threads wait in calls to every twin
    "mid-call": """
for master in masters:
    for _ in range(2):
        threading.Thread(target=master.execute, args=(rh.sleep_then, 60), daemon=True).start()
""",
}

_WAIT_FOR_SIGNAL = """
print("READY", flush=True)
if {midcall}:
    masters[0].execute(rh.sleep_then, 60)
else:
    time.sleep(60)
"""

_ENDINGS = {
    "normal": 'print("READY", flush=True)\ntime.sleep(0.5)\n',
    "exception": 'print("READY", flush=True)\ntime.sleep(0.5)\nraise RuntimeError("the master fails")\n',
    # the main thread itself waits in a call (or sleeps) when the signal comes
    "SIGTERM": _WAIT_FOR_SIGNAL,
    "SIGINT": _WAIT_FOR_SIGNAL,
}


def _kinds() -> list:
    """The kinds installed here (python3 always is)."""
    return [kind for kind in rh.KINDS if shutil.which(kind)]


def start_master(script: str) -> tuple:
    """A master process; returns it and its twins' pids once it printed READY."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=TESTS_DIR),
    )
    pids = []
    for line in proc.stdout:
        if line.startswith("pid "):
            pids.append(int(line.split()[1]))
        if line.strip() == "READY":
            break
    else:
        proc.wait(HANG)
        raise AssertionError(f"the master ended before READY: {proc.stderr.read()}")
    return proc, pids


def finish_master(proc: subprocess.Popen) -> tuple:
    try:
        status = proc.wait(HANG)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the master hangs while exiting") from None
    stderr = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return status, stderr


@pytest.mark.parametrize("state", sorted(_STATES))
@pytest.mark.parametrize("ending", sorted(_ENDINGS))
def test_master_ending_leaves_no_twin_and_does_not_hang(ending, state):
    kinds = _kinds()
    midcall = state == "mid-call"
    script = _MASTER.format(kinds=kinds) + _STATES[state] + _ENDINGS[ending].format(midcall=midcall)
    proc, pids = start_master(script)
    assert len(pids) == len(kinds)
    if ending.startswith("SIG"):
        settle()  # let the main thread enter its call (the outcome must not depend on it)
        proc.send_signal(getattr(signal, ending))
    status, stderr = finish_master(proc)
    expected = {
        "normal": (0,),
        "exception": (1,),
        "SIGTERM": (-signal.SIGTERM,),
        "SIGINT": (-signal.SIGINT, 1),
    }[ending]
    assert status in expected, (status, stderr)
    if ending == "exception":
        assert "the master fails" in stderr
    if ending == "SIGINT":
        assert "KeyboardInterrupt" in stderr
    for pid in pids:
        assert wait_gone(pid), f"twin {pid} outlived its master ({ending}, {state})"


def test_master_exit_with_a_stopped_twin_and_a_blocked_sender_does_not_hang():
    """At exit the master stops its twins; one that is SIGSTOPped with a full
    pipe must not keep the master from exiting."""
    script = (
        _MASTER.format(kinds=["python3"])
        + """
os.kill(masters[0].execute(rh.pid), signal.SIGSTOP)
threading.Thread(target=masters[0].execute, args=(rh.answer, "big", bytes(1 << 20)), daemon=True).start()
time.sleep(0.5)
print("READY", flush=True)
"""
    )
    proc, pids = start_master(script)
    status, stderr = finish_master(proc)
    assert status == 0, stderr
    assert wait_gone(pids[0])


def test_objects_dropped_while_their_twin_is_stopped_do_not_block_other_twins(kind, bystander):
    """Releases of dropped proxies go to their owner's link. If that twin reads
    nothing (SIGSTOP, its pipe full), they must not block calls to other twins."""
    owner = TwinMaster(kind, twinterpreter_id=rh.twin_id(kind))
    owner.start()
    pid = owner.execute(rh.pid)
    blobs = [rh.blob_class(kind)(i) for i in range(200)]
    try:
        stop_twin(pid)
        stuck = Calls(owner, 2, rh.answer, "big", bytes(1 << 20))  # fills the pipe, then blocks
        settle()

        def drop_and_call() -> int:
            served = 0
            while blobs:
                del blobs[-10:]  # releases for the stopped twin are queued ...
                gc.collect()
                time.sleep(0.06)  # ... and the background flusher takes its turn
                assert bystander.execute(rh.answer, served, b"") == rh.answer(served, b"")
                served += 1
            return served

        outcome = in_thread(drop_and_call)
        assert outcome == ("value", 20), outcome
    finally:
        master_module._running[owner.twinterpreter_id].process.kill()
        stuck.join()
        owner.destroy()


def test_stop_during_a_long_call_lets_the_twin_finish_by_itself(kind, tmp_path):
    """stop() while the twin's threads (its main thread among them) run long
    calls: the twin takes the shutdown request, runs its exit hooks (one
    registered by a group finalizer) and ends by itself instead of being
    killed when the timeout is over."""
    from cpy2py import TWIN_GROUP_STATE

    marker = tmp_path / "finalized"
    entry = (rh.write_marker_at_exit, (str(marker), kind), {})
    TWIN_GROUP_STATE.finalizers.append(entry)
    try:
        master = TwinMaster(kind, twinterpreter_id=f"finalized-{kind}")
        master.start()
    finally:
        TWIN_GROUP_STATE.finalizers.remove(entry)
    pid = master.execute(rh.pid)
    long_calls = Calls(master, 3, rh.sleep_then, 600)
    settle()
    stopper = threading.Thread(target=master.stop, kwargs={"timeout": HANG})
    stopper.start()
    stopper.join(HANG + 10)
    assert not stopper.is_alive()
    long_calls.join()
    assert all(isinstance(err, TwinterpreterTerminated) for err in long_calls.errors())
    assert len(long_calls.errors()) == 3
    assert wait_gone(pid)
    assert marker.read_text() == f"{kind}\n", "the twin was killed instead of finishing by itself"


def test_group_state_functions_from_the_application_directory(tmp_path):
    """Initializers and finalizers from a module beside the main script, with
    the master started from another directory: the twin must apply the
    master's paths before it looks their names up (found by the finalizer
    test above)."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "helper.py").write_text("def setup(x):\n    print('initializer ran', x, flush=True)\n")
    (app / "main.py").write_text(
        "import helper\n"
        "from cpy2py import TWIN_GROUP_STATE, TwinMaster\n"
        "TWIN_GROUP_STATE.add_initializer(helper.setup, 42)\n"
        "with TwinMaster('python3', twinterpreter_id='app-twin') as twin:\n"
        "    print('sum', twin.execute(sum, [1, 2]), flush=True)\n"
    )
    main = [sys.executable, str(app / "main.py")]
    result = subprocess.run(main, capture_output=True, text=True, timeout=HANG, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "initializer ran 42" in result.stdout and "sum 3" in result.stdout


def test_twin_dying_while_sending_a_reply_is_terminated_not_a_protocol_error(kind, victim, bystander):
    """A twin that dies in the middle of writing a frame (a crash, the OOM
    killer during a large reply) ended: TwinterpreterTerminated with its
    status, not a ProtocolError (that is for a live peer that breaks a frame)."""
    pid = victim.execute(rh.pid)
    waiting = Calls(victim, 2, rh.sleep_then, 60)
    settle()
    with pytest.raises(TwinterpreterTerminated, match="exited with status 3"):
        victim.execute(rh.die_mid_frame, 3)
    waiting.join()
    assert all(isinstance(err, TwinterpreterTerminated) for err in waiting.errors()), waiting.outcomes
    assert wait_gone(pid)
    assert bystander.execute(rh.pid) != pid
