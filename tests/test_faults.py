"""Twins that die, bad executables, and a master that exits: clear errors,
nothing left behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import twin_helpers
from cpy2py import ProtocolError, TwinMaster, TwinStartError, TwinterpreterTerminated
from support import TESTS_DIR, process_exists, require_interpreter, run_master


def test_kill_during_call_fails_waiting_and_later_calls(kind):
    master = TwinMaster(kind, twinterpreter_id=f"{kind}-victim")
    master.start()
    pid = master.execute(os.getpid)
    errors = []

    def wait_long():
        try:
            master.execute(twin_helpers.sleep_then, 60)
        except TwinterpreterTerminated as err:
            errors.append(err)

    waiters = [threading.Thread(target=wait_long) for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    for waiter in waiters:
        waiter.join(timeout=10)
        assert not waiter.is_alive(), "a call kept waiting on a dead twin"
    assert len(errors) == 3
    message = str(errors[0])
    assert f"{kind}-victim" in message and "SIGKILL" in message
    assert "next use starts a fresh twin" in message
    assert not master.is_alive
    # the calls in flight were told: the next use starts a fresh twin
    assert master.execute(twin_helpers.echo, 1) == 1
    assert master.execute(os.getpid) != pid
    master.stop()


def test_twin_exit_is_reported_with_its_status(kind):
    with TwinMaster(kind, twinterpreter_id=f"{kind}-exit") as master:
        with pytest.raises(TwinterpreterTerminated, match="exited with status 3"):
            master.execute(twin_helpers.exit_now, 3)


def test_other_twins_carry_on_when_one_dies():
    require_interpreter("pypy3")
    with TwinMaster("python3", twinterpreter_id="survivor") as survivor:
        with TwinMaster("pypy3", twinterpreter_id="doomed") as doomed:
            with pytest.raises(TwinterpreterTerminated):
                doomed.execute(twin_helpers.exit_now, 1)
        assert survivor.execute(twin_helpers.add, 1, 2) == 3


def test_missing_executable():
    with pytest.raises(TwinStartError, match="no executable named 'no-such-python'"):
        TwinMaster("no-such-python").start()
    with pytest.raises(TwinStartError, match="does not exist"):
        TwinMaster("/no/such/python3").start()


@pytest.mark.parametrize("program", ["/bin/true", "/bin/ls", "/bin/sleep"])
def test_not_python(program):
    with pytest.raises(TwinStartError, match="before answering the cpy2py handshake") as info:
        TwinMaster(program, twinterpreter_id="not-python").start()
    assert program in str(info.value)
    assert "CPython or PyPy >= 3.9" in str(info.value)
    # what it said is shown with long lines cut (ls names the bootstrap it
    # was given: 2,000 characters on one line)
    assert all(len(line) < 400 for line in str(info.value).splitlines()), str(info.value)


def _old_pythons():
    found = [shutil.which(name) for name in ("python2.7", "python2", "python3.8", "python3.7")]
    found = [p for p in found if p and "/shims/" not in p]  # pyenv shims are not interpreters
    pyenv = os.path.expanduser("~/.pyenv/versions")
    if os.path.isdir(pyenv):
        for version in sorted(os.listdir(pyenv)):
            if version.startswith(("2.", "3.6", "3.7", "3.8")):
                found.append(os.path.join(pyenv, version, "bin", "python"))
    return sorted({p for p in found if p and os.path.exists(p)})


@pytest.mark.parametrize("old", _old_pythons() or [None])
def test_too_old_python_is_named(old):
    if old is None:
        pytest.skip("no Python older than 3.9 is installed; see test_python2_stand_in")
    with pytest.raises(TwinStartError, match="need Python 3.9 or newer") as info:
        TwinMaster(old, twinterpreter_id="old-python").start()
    assert "is Python 2." in str(info.value) or "is Python 3." in str(info.value)


def test_python2_stand_in():
    stand_in = os.path.join(TESTS_DIR, "fakes", "python2_like.sh")
    with pytest.raises(TwinStartError, match=r"is Python 2\.7\.18; twinterpreters need Python 3.9 or newer"):
        TwinMaster(stand_in, twinterpreter_id="python2").start()


def test_protocol_version_mismatch_names_both_versions():
    fake = os.path.join(TESTS_DIR, "fakes", "wrong_protocol_twin.py")
    with pytest.raises(ProtocolError, match=r"protocol 99.*protocol 1"):
        TwinMaster(fake, twinterpreter_id="future-twin").start()


@pytest.mark.parametrize("ending", ["normal", "exception", "sys.exit"])
def test_master_exit_leaves_no_twin(ending):
    kinds = ["python3"] + (["pypy3"] if shutil.which("pypy3") else [])
    end = {
        "normal": "pass",
        "exception": "raise RuntimeError('master fails')",
        "sys.exit": "sys.exit(4)",
    }
    result = run_master(
        f"""
        import os, sys, twin_helpers
        from cpy2py import TwinMaster
        for kind in {kinds!r}:
            master = TwinMaster(kind)
            master.start()
            print("twin pid", master.execute(os.getpid), flush=True)
        {end[ending]}
        """
    )
    pids = [int(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("twin pid")]
    assert len(pids) == len(kinds), result.stderr
    deadline = time.time() + 5
    while any(process_exists(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(process_exists(pid) for pid in pids)


def test_master_killed_leaves_no_twin():
    result = run_master(
        """
        import os, signal, twin_helpers
        from cpy2py import TwinMaster
        master = TwinMaster("python3")
        master.start()
        print("twin pid", master.execute(os.getpid), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert result.returncode == -signal.SIGKILL
    pid = int(result.stdout.split()[-1])
    deadline = time.time() + 5
    while process_exists(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not process_exists(pid)


def test_debug_logging_shows_host_and_python_logs(kind):
    result = run_master(
        f"""
        import twin_helpers
        from cpy2py import TwinMaster
        with TwinMaster({kind!r}) as m:
            m.execute(twin_helpers.echo, 1)
        """,
        env={"CPY2PY_DEBUG": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "__cpy2py__.master" in result.stderr  # the master's Python logs
    assert "__cpy2py__.twin" in result.stderr  # the twin's Python logs
    assert "cpy2py_host" in result.stderr  # the Rust host's tracing


def test_debug_off_is_silent(kind):
    result = run_master(
        f"""
        import twin_helpers
        from cpy2py import TwinMaster
        with TwinMaster({kind!r}) as m:
            m.execute(twin_helpers.echo, 1)
        """,
        env={"CPY2PY_DEBUG": ""},
    )
    assert result.returncode == 0
    assert "__cpy2py__" not in result.stderr and "cpy2py_host" not in result.stderr


def test_optimized_master_skips_per_call_logs():
    script = """
        import twin_helpers
        from cpy2py import TwinMaster
        with TwinMaster("python3") as m:
            m.execute(twin_helpers.echo, 1)
        """
    normal = run_master(script, env={"CPY2PY_DEBUG": "DEBUG"})
    optimized = run_master(script, "-O", env={"CPY2PY_DEBUG": "DEBUG"})
    assert "-> python3 request" in normal.stderr
    assert "-> python3 request" not in optimized.stderr
    assert "__cpy2py__.master" in optimized.stderr  # start-up logs remain
    # records of each call cost on every call: made only when DEBUG is asked for
    info = run_master(script, env={"CPY2PY_DEBUG": "INFO"})
    assert info.returncode == 0 and "-> python3 request" not in info.stderr
    assert "__cpy2py__.master INFO" in info.stderr
    # any value that is not a level name asks for DEBUG, per-call records too
    on = run_master(script, env={"CPY2PY_DEBUG": "2"})
    assert "-> python3 request" in on.stderr and "<- __master__ reply" in on.stderr  # (the twin replies)


def test_python_sys_executable_is_accepted(python_exe):
    with TwinMaster(python_exe, twinterpreter_id="same-python") as master:
        assert master.execute(twin_helpers.identity)["version"] == tuple(sys.version_info[:3])


def test_proxies_from_before_a_restart_fail_clearly():
    import twin_classes as tc

    master = TwinMaster("python3")
    master.start()
    old = tc.Counter_python3(1)
    master.destroy()
    master.start()
    new = tc.Counter_python3(2)
    assert new.increment() == 3
    # the old proxy never reaches the new twin: it says its twin ended
    with pytest.raises(TwinterpreterTerminated, match="'python3', which ended: .*destroyed"):
        old.increment()
    master.stop()


FORK_SCRIPT = """
import faulthandler, multiprocessing, os, signal
faulthandler.register(signal.SIGUSR1, all_threads=True)  # (the test asks on a hang; forks inherit it)
import twin_classes as tc
import twin_functions as tf
from cpy2py import TwinterpreterTerminated

def task(n):
    pid, value = tf.in_python(n)  # a twin of this child's own
    return os.getpid(), pid, value

def use_parent_object():
    try:
        COUNTER.increment()  # inherited by the fork
        return "used the parent's twin"
    except TwinterpreterTerminated as err:
        return str(err)

if __name__ == "__main__":
    twin_pid, _ = tf.in_python(0)
    COUNTER = counter = tc.Counter_python3(1)
    ctx = multiprocessing.get_context("fork")
    print("STEP twins started", flush=True)  # (how far it got, should it hang)
    with ctx.Pool(2) as pool:
        print("STEP pool forked", flush=True)
        results = pool.map(task, range(6))
        print("STEP mapped", flush=True)
        said = pool.apply(use_parent_object)
        print("STEP applied", flush=True)
    print("CHILD TWINS", all(pid != twin_pid for _, pid, _ in results), sorted(v for _, _, v in results))
    print("PARENT OBJECT", said)
    print("PARENT AFTER", tf.in_python(7) == (twin_pid, 7), counter.increment() == 2)
"""


def descendants(pid: int) -> list:
    """The processes started by ``pid``, their children and so on (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry}/stat") as stat:
                parents.setdefault(int(stat.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def threads_in_the_kernel(pid: int) -> str:
    """Each thread of ``pid``: its name, where it waits in the kernel and the
    system call it is in (from /proc), to explain a hang."""
    lines = []
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ")[:120].decode(errors="replace")
        lines.append(f"{pid}: {command}")
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            fields = []
            for name in ("comm", "wchan", "syscall"):
                with contextlib.suppress(OSError):
                    with open(f"/proc/{pid}/task/{tid}/{name}") as f:
                        fields.append(f.read().strip()[:60])
            with contextlib.suppress(OSError):  # which signals it blocks, and which wait for it
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    fields += [line.strip() for line in f if line.startswith(("SigBlk", "SigPnd", "ShdPnd"))]
            lines.append(f"  {tid}: {' | '.join(fields)}")
    return "\n".join(lines)


def native_stacks(pid: int) -> str:
    """Each thread's stack of ``pid``, Python and native frames (Rust's
    included), by py-spy (requirements-dev.txt), which reads them from outside:
    it names the lock a hung thread waits for. Empty where py-spy cannot."""
    py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if py_spy is None:
        return "\n  (no py-spy: no native stacks)"
    try:
        dump = subprocess.run(
            [py_spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"\n  (py-spy failed: {err})"
    return "\n" + (dump.stdout + dump.stderr).strip()


def is_this_script(pid: int, script) -> bool:
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return str(script).encode() in cmdline.read()
    return False


def test_a_forked_child_has_twins_of_its_own_and_the_parents_link_is_unaffected(tmp_path):
    """multiprocessing with fork, whose tasks call twins: each child starts its
    own twin, an object of the parent's twin says clearly it is not reachable
    from the child, and the parent's link works on."""
    require_interpreter("python3")
    script = tmp_path / "forking.py"
    script.write_text(FORK_SCRIPT)
    done = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.path.dirname(__file__), PYTHONUNBUFFERED="1"),
    )
    try:
        out, err = done.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        # it hung (seen twice in full runs, never alone): every process of the
        # script shows its threads' stacks before it is killed
        family = [done.pid, *descendants(done.pid)]
        threads = "\n".join(
            threads_in_the_kernel(pid) + native_stacks(pid) for pid in family
        )  # (with signals blocked, no dump comes)
        for pid in family:
            with contextlib.suppress(OSError):
                if is_this_script(pid, script):
                    os.kill(pid, signal.SIGUSR1)
                    time.sleep(1)  # (one at a time: they share stderr)
        for pid in family:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        out, err = done.communicate()
        pytest.fail(f"the script hung; its processes {family}, their threads:\n{threads}\n{out}\n{err}")
    assert done.returncode == 0, out + err
    assert "CHILD TWINS True [0, 1, 2, 3, 4, 5]" in out, out + err
    assert "PARENT OBJECT " in out and "belongs to process" in out, out
    assert "PARENT AFTER True True" in out, out


HELD_AT_FORK = """
import os, signal
import cpy2py.master  # (registers what a forked child does)
from cpy2py.protocol.transport import hold_signals, release_signals

assert hold_signals()  # as the main thread does while it reads its reply
pid = os.fork()
if pid == 0:
    os._exit(0 if not signal.pthread_sigmask(signal.SIG_BLOCK, []) else 1)
release_signals()
_, status = os.waitpid(pid, 0)
print("CHILD", os.waitstatus_to_exitcode(status))
"""


def test_a_child_forked_while_the_main_thread_held_its_signals_gets_them_back():
    """The main thread holds its signals while it reads a reply: a child forked
    then (multiprocessing from a callback, say) would keep them blocked for
    good, and its pool's terminate() (SIGTERM) could not end it."""
    done = run_master(HELD_AT_FORK, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "CHILD 0\n", (done.stdout, done.stderr)


DUE_AT_HOLD = """
import functools, operator, signal, threading, time
from cpy2py.protocol.transport import hold_signals, signals_held


class Due(Exception):
    pass


def handler(signum, frame):
    raise Due()


signal.signal(signal.SIGINT, handler)
stop = threading.Event()
catcher = threading.Thread(target=stop.wait)  # an application's thread, which catches it
catcher.start()
threading.Timer(0.05, signal.pthread_kill, args=(catcher.ident, signal.SIGINT)).start()
returned = []
try:
    # No bytecode of the main thread runs between the sleep, during which the
    # handler becomes due, and the hold (C calls only): the handler first
    # runs in the hold.
    steps = [functools.partial(time.sleep, 0.5), hold_signals, functools.partial(returned.append, True)]
    list(map(operator.call, steps))
    print("NOT RAISED")
except Due:
    print("RAISED", "after the hold returned" if returned else "by the hold")
print("HELD", signals_held(), signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
stop.set()
catcher.join()
"""


def test_a_handler_due_as_the_main_thread_holds_its_signals_raises_from_the_hold():
    """Another thread of the application caught a Ctrl-C, and its handler is
    due in the main thread, which has not run a bytecode since and now holds
    its signals (a step of the kernel's that must not be cut): the handler
    runs in ``hold_signals``, and what it raises comes out of it with
    nothing held, as if the Ctrl-C had come just before (the kernel's
    steps then never start)."""
    done = run_master(DUE_AT_HOLD, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "RAISED by the hold\nHELD False False\n", (done.stdout, done.stderr)


CHILDREN_MODULE = """
import multiprocessing, os, subprocess, sys, threading
from cpy2py import kernel_state, twinfunction


def _blocked(pid="self"):
    with open(f"/proc/{pid}/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith("SigBlk")), 16)


def _worker_mask():
    return _blocked()


@twinfunction(kernel_state.MASTER_ID)
def start_children():
    '''User code of the master, run for the twin: a subprocess and a pool.'''
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child_mask = _blocked(process.pid)
    process.terminate()
    try:
        ended = process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        ended = "still running 10 s after SIGTERM"
    with multiprocessing.get_context("fork").Pool(1) as pool:
        worker_mask = pool.apply(_worker_mask)
    # (leaving the block terminates the pool: SIGTERM to its worker)
    thread_mask = _blocked(f"self/task/{threading.get_native_id()}")
    return ended, child_mask, worker_mask, threading.current_thread().name, thread_mask


@twinfunction("{kind}")
def from_a_thread_of_the_twin():
    found = []
    thread = threading.Thread(target=lambda: found.append(start_children()))
    thread.start()
    thread.join()
    return found[0]


@twinfunction("{kind}")
def from_the_twin():
    return start_children()
"""

CHILDREN_SCRIPT = """
import asyncio, signal, sys
sys.path.insert(0, {directory!r})
import cpy2py, children

print("IN CHAIN", children.from_the_twin())
print("TWIN THREAD", children.from_a_thread_of_the_twin())
print("AWAITED", asyncio.run(cpy2py.aio(children.from_the_twin)()))
"""


@pytest.mark.parametrize("kind", ["python3", "pypy3"])
def test_processes_started_by_callbacks_of_the_twin_end_on_sigterm(tmp_path, kind):
    """A callback runs on a thread of the master's cpy2py when the twin's own
    thread (or an awaited call) makes it; that thread blocks the signals that
    Python handles, so they reach the main thread. A subprocess the callback
    starts inherits its mask: it must still end on SIGTERM (Popen.terminate,
    a pool's terminate), and a pool's forked worker gets a mask as clean as
    the main thread's."""
    require_interpreter(kind)
    (tmp_path / "children.py").write_text(CHILDREN_MODULE.replace("{kind}", kind))
    done = run_master(CHILDREN_SCRIPT.format(directory=str(tmp_path)), timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(line.split(" (", 1) for line in done.stdout.splitlines() if " (" in line)
    assert set(lines) == {"IN CHAIN", "TWIN THREAD", "AWAITED"}, done.stdout + done.stderr
    sigterm, sigint = 1 << (signal.SIGTERM - 1), 1 << (signal.SIGINT - 1)
    for where, said in lines.items():
        ended, child_mask, worker_mask, thread, thread_mask = eval("(" + said)
        assert ended == -signal.SIGTERM, (where, said)
        assert not child_mask & sigterm, (where, said)
        assert worker_mask == 0, (where, said)
        # Python handles SIGINT: on a thread of cpy2py's it waits for the main thread
        assert bool(thread_mask & sigint) == (thread != "MainThread"), (where, said)
    assert "cpy2py" in eval("(" + lines["TWIN THREAD"])[3], lines  # (the case this is about)
