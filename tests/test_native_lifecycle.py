"""Native twins' lifecycle (issue 12): per-call timeouts, restarts with the
settings a twin was started with, starts that never hang the master,
descendants that neither hold a link open nor outlive the master, exports
that failed encodes leave alone, reference cycles across interpreters, and
descriptors closed at once.

Real processes throughout; waits are bounded by ``HANG`` only to tell a hang
from an answer, never to judge speed.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import textwrap
import threading
import time

import lifecycle_helpers as lh
import pytest
from cpy2py import TwinMaster, TwinStartError, TwinterpreterTerminated, TwinTimeout, is_proxy, kernel_state
from cpy2py import master as master_module
from cpy2py.kernel import references
from reliability_support import HANG, in_thread, wait_gone
from support import process_exists, require_interpreter, run_master


@pytest.fixture(autouse=True)
def _forget_settings():
    """Settings remembered for a twin id do not leak into other tests."""
    before = dict(master_module._configs)
    yield
    master_module._configs.clear()
    master_module._configs.update(before)


def _wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: still not so after {HANG} s"
        time.sleep(0.02)


def _script(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


# -- timeout= -----------------------------------------------------------------------------


def test_timeout_kills_the_twin_and_the_next_call_gets_a_fresh_one(kind):
    master = TwinMaster(kind, f"timeout-{kind}", timeout=1.0)
    try:
        master.start()
        before = master.execute(lh.pid)
        with pytest.raises(TwinTimeout, match="ran longer than its timeout of 1 s.*state was lost"):
            master.execute(lh.sleep_then, 60)
        assert wait_gone(before), "the twin that timed out still runs"
        after = master.execute(lh.pid)  # a fresh twin
        assert after != before
        assert master.execute(lh.sleep_then, 0.1, "in time") == "in time"
    finally:
        master.stop()


def test_timeout_does_not_count_the_masters_callbacks(kind):
    master = TwinMaster(kind, f"timeout-cb-{kind}", timeout=1.0)
    try:
        master.start()
        pid = master.execute(lh.pid)
        # the master spends 2 s in a callback of the call: that is not the twin's time
        assert master.execute(lh.call_back, lambda: time.sleep(2) or "slept") == "slept"
        assert master.execute(lh.pid) == pid
    finally:
        master.stop()


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        TwinMaster("python3", "bad-timeout", timeout=0)
    with pytest.raises(ValueError, match="memory_limit, paths, .*output_limit apply to sandboxed twins"):
        TwinMaster("python3", "bad-limit", memory_limit=1 << 20)


# -- a dead twin restarts on its next use, with its settings --------------------------------


def test_a_twin_killed_while_idle_fails_the_next_call_then_restarts(kind):
    master = TwinMaster(kind, f"idle-kill-{kind}")
    try:
        master.start()
        pid = master.execute(lh.pid)
        os.kill(pid, signal.SIGKILL)
        _wait_until(lambda: not master.is_alive, "the master noticed the end")
        with pytest.raises(TwinterpreterTerminated, match="SIGKILL.*next use starts a fresh twin"):
            master.execute(lh.pid)  # the call that found it dead
        assert master.execute(lh.pid) != pid
    finally:
        master.stop()


def test_noauto_does_not_restart(kind, monkeypatch):
    master = TwinMaster(kind, f"noauto-{kind}")
    try:
        master.start()
        pid = master.execute(lh.pid)
        monkeypatch.setenv("CPY2PY_NOAUTO", "1")
        os.kill(pid, signal.SIGKILL)
        _wait_until(lambda: not master.is_alive, "the master noticed the end")
        for _ in range(2):
            with pytest.raises(TwinterpreterTerminated, match=r"start\(\)"):
                master.execute(lh.pid)
        assert master.start() is True
        assert master.execute(lh.pid) != pid
    finally:
        master.stop()


def test_restart_after_stop_keeps_the_executable_and_id():
    """TwinMaster(sys.executable, 'worker-2') comes back as itself, not as
    'no executable named worker-2'."""
    master = TwinMaster(sys.executable, "worker-2")
    master.start()
    master.stop()
    try:
        again = lh_run_in("worker-2", lh.running_in)  # started on demand
        assert again == sys.implementation.name
        assert TwinMaster(twinterpreter_id="worker-2").executable == sys.executable
    finally:
        TwinMaster(twinterpreter_id="worker-2").stop()


def test_a_twin_named_pypy3_started_on_cpython_comes_back_on_cpython():
    require_interpreter("pypy3")  # so that the id would find PyPy if the settings were lost
    master = TwinMaster(sys.executable, "pypy3")
    try:
        master.start()
        pid = master.execute(lh.pid)
        os.kill(pid, signal.SIGKILL)
        _wait_until(lambda: not master.is_alive, "the master noticed the end")
        with pytest.raises(TwinterpreterTerminated):
            lh_run_in("pypy3", lh.pid)
        assert lh_run_in("pypy3", lh.running_in) == sys.implementation.name
    finally:
        TwinMaster(twinterpreter_id="pypy3").stop()


def lh_run_in(twin_id, func, *args):
    from cpy2py.master import connection_for
    from cpy2py.protocol.messages import OP_EXECUTE

    return connection_for(twin_id).request(OP_EXECUTE, func, list(args), {})


# -- starting never hangs the master ---------------------------------------------------------


def test_an_initializer_that_blocks_fails_the_start_within_handshake_timeout(kind):
    group = kernel_state.TWIN_GROUP_STATE
    group.add_initializer(time.sleep, 300)
    try:
        master = TwinMaster(kind, f"blocked-init-{kind}", handshake_timeout=3)
        outcome = in_thread(master.start)
    finally:
        group.initializers.pop()
    assert outcome[0] == "error" and isinstance(outcome[1], TwinStartError), outcome
    assert "handshake_timeout=3 s" in str(outcome[1])
    assert not master.is_alive


def test_a_twin_that_exits_while_setting_up_says_what_it_wrote_or_that_it_wrote_nothing(kind):
    group = kernel_state.TWIN_GROUP_STATE
    for said, expected in (
        ("sys.stderr.write('the reason it stopped\\n'); ", "; its last output:\n.*the reason it stopped"),
        ("", "; it wrote no output$"),
    ):
        group.add_initializer(exec, f"import os, sys; {said}sys.stderr.flush(); os._exit(3)")
        try:
            master = TwinMaster(kind, f"exits-at-init-{kind}")
            with pytest.raises(TwinStartError, match=f"(?s)exited with status 3 while setting up{expected}"):
                master.start()
        finally:
            group.initializers.pop()
        assert not master.is_alive


def test_a_slow_start_blocks_no_other_twin(tmp_path):
    go = tmp_path / "go"
    wrapper = _script(
        tmp_path, "slow-python", f'while [ ! -e "{go}" ]; do sleep 0.05; done\nexec python3 "$@"\n'
    )
    slow = TwinMaster(wrapper, "slow-start")
    starting = threading.Thread(target=slow.start, daemon=True)
    starting.start()
    try:
        _wait_until(lambda: "slow-start" in master_module._starting, "the slow start began")
        # while it starts: others start, stop, and are listed
        other = TwinMaster("python3", "not-held-up")
        assert in_thread(other.start) == ("value", True)
        assert in_thread(master_module.running_twins)[1] == ("not-held-up",)
        assert in_thread(other.stop)[0] == "value"
        assert starting.is_alive(), "the slow start was not in progress meanwhile"
    finally:
        go.touch()
        starting.join(HANG)
        slow.stop()
    assert not starting.is_alive()


def test_the_master_exits_while_a_twin_starts(tmp_path):
    pidfile = tmp_path / "pid"
    wrapper = _script(tmp_path, "never-python", f'echo $$ > "{pidfile}"\nsleep 300\n')
    result = run_master(
        f"""
        import threading, time
        from cpy2py import TwinMaster
        threading.Thread(target=TwinMaster({wrapper!r}, "never").start, daemon=True).start()
        while not __import__("os").path.exists({str(pidfile)!r}):
            time.sleep(0.02)
        print("exiting")
        """,
        timeout=HANG,
    )
    assert result.returncode == 0, result.stderr
    assert "exiting" in result.stdout
    assert wait_gone(int(pidfile.read_text())), "the twin being started outlived the master"


def test_a_wrapper_that_exits_0_is_explained_in_a_sentence(tmp_path):
    wrapper = _script(tmp_path, "not-python", "exit 0\n")
    with pytest.raises(TwinStartError) as info:
        TwinMaster(wrapper, "exits-0").start()
    message = str(info.value)
    assert "exited with status 0 before answering the cpy2py handshake. Twinterpreters must be" in message


# -- descendants --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing", "subprocess"])
def test_a_killed_twin_with_descendants_fails_the_waiting_call_at_once(kind, how):
    master = TwinMaster(kind, f"forker-{kind}")
    try:
        master.start()
        pid = master.execute(lh.pid)
        child = master.execute(lh.fork_sleeper, how)
        waiting = []
        call = threading.Thread(target=lambda: waiting.append(in_thread(master.execute, lh.sleep_then, 250)))
        call.start()
        time.sleep(0.5)  # (inside its call; nothing depends on it)
        os.kill(pid, signal.SIGKILL)
        call.join(HANG)  # the descendant sleeps 300 s: the call must not wait for it
        assert not call.is_alive(), "the call waited for the twin's descendant"
        assert waiting[0][0] == "error" and isinstance(waiting[0][1], TwinterpreterTerminated), waiting
        assert "SIGKILL" in str(waiting[0][1])
        assert wait_gone(child), "the twin's descendant outlived it"
    finally:
        master.stop()


def test_a_wrapper_scripts_helper_neither_holds_the_link_nor_outlives_the_twin(tmp_path):
    helper_pid = tmp_path / "helper"
    wrapper = _script(
        tmp_path, "wrapped-python", f'sleep 300 &\necho $! > "{helper_pid}"\nexec python3 "$@"\n'
    )
    master = TwinMaster(wrapper, "wrapped")
    try:
        master.start()
        pid = master.execute(lh.pid)
        helper = int(helper_pid.read_text())
        assert process_exists(helper)
        outcome = []
        call = threading.Thread(target=lambda: outcome.append(in_thread(master.execute, lh.sleep_then, 250)))
        call.start()
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        call.join(HANG)
        assert not call.is_alive() and isinstance(outcome[0][1], TwinterpreterTerminated), outcome
        assert wait_gone(helper)
    finally:
        master.stop()


@pytest.mark.parametrize("ending", ["exit", "SIGKILL", "SIGTERM"])
def test_no_descendant_of_a_twin_outlives_the_master(kind, ending, tmp_path):
    pids = tmp_path / "pids"
    script = f"""
        import os, signal, sys
        import lifecycle_helpers as lh
        from cpy2py import TwinMaster
        twin = TwinMaster({kind!r}, "parent-of-forks")
        twin.start()
        ways = ("os.fork", "multiprocessing", "subprocess")
        children = [twin.execute(lh.fork_sleeper, how) for how in ways]
        with open({str(pids)!r}, "w") as out:
            out.write(" ".join(map(str, [twin.execute(lh.pid)] + children)))
        if {ending!r} != "exit":
            os.kill(os.getpid(), getattr(signal, {ending!r}))
        """
    result = run_master(script, timeout=HANG)
    assert pids.exists(), result.stderr
    for pid in map(int, pids.read_text().split()):
        assert wait_gone(pid), f"process {pid} outlived the master ({ending})"


# -- failed encodes ------------------------------------------------------------------------------


def test_an_exception_holding_a_lock_leaves_the_twins_exports_alone(twin):
    before = twin.execute(lh.export_count)
    for _ in range(5):
        with pytest.raises(lh.Unsendable):
            twin.execute(lh.raise_with_lock)
    gc.collect()
    _wait_until(lambda: twin.execute(lh.export_count) == before, "the twin's exports are back")


def test_an_exception_holding_a_twin_object_leaves_the_exports_alone(twin):
    before = twin.execute(lh.export_count)
    for _ in range(5):
        with pytest.raises(lh.Unsendable) as info:
            twin.execute(lh.raise_with_twin_object)
        assert is_proxy(info.value.args[1])
    del info
    gc.collect()
    _wait_until(lambda: twin.execute(lh.export_count) == before, "the twin's exports are back")


def test_a_pickle_failing_part_way_leaves_the_exports_alone(twin):
    node = lh.MasterNode()
    before = references.export_count()
    for _ in range(5):  # pickling exports the node, then fails: it goes by reference
        assert twin.execute(lh.take_and_drop, lh.PartlyPicklable(node)) == "PartlyPicklable"
    gc.collect()
    # (the twin collects its garbage, then releases: PyPy has no reference counts)
    _wait_until(
        lambda: twin.execute(lh.export_count) >= 0 and references.export_count() == before,
        "the master's exports are back",
    )


# -- reference cycles across interpreters, counts ----------------------------------------------


def test_cycles_across_interpreters_are_collected(kind):
    require_interpreter(kind)
    twin_class = getattr(lh, f"TwinNode_{kind}")
    master = TwinMaster(kind, kind)
    with master:
        base = master.counts()
        for _ in range(500):
            there, here = twin_class(1000), lh.MasterNode(1000)
            there.partner = here
            here.partner = there
        del there, here
        gc.collect()
        leaked = master.counts()
        assert leaked["exports"] - base["exports"] == 500, leaked
        assert leaked["twin_exports"] - base["twin_exports"] == 500, leaked
        freed = master.collect()
        assert freed >= 500, freed  # the rest go as the freed objects' proxies release theirs
        _wait_until(
            lambda: (
                master.counts()["twin_exports"] == base["twin_exports"]
                and master.counts()["exports"] == base["exports"]
            ),
            "the cycles were collected",
        )
        assert master.counts()["twin_proxies"] == base["twin_proxies"]


def test_collect_leaves_objects_in_use_alone(kind):
    twin_class = getattr(lh, f"TwinNode_{kind}")
    with TwinMaster(kind, kind) as master:
        there, here = twin_class(), lh.MasterNode()
        there.partner = here
        here.partner = there
        master.collect()
        assert there.partner is here  # still there, both ways
        assert here.partner.partner is here


# -- descriptors ----------------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_stopped_twins_descriptors_are_closed_at_once(kind):
    gc.disable()  # at once means without the garbage collector's help
    try:
        before = _open_fds()
        for _i in range(3):
            master = TwinMaster(kind, kind)
            master.start()
            proxy = getattr(lh, f"TwinNode_{kind}")()  # a proxy keeps the link object alive
            master.stop()
            _wait_until(lambda: _open_fds() <= before, "the stopped twin's descriptors are closed")
        del proxy
    finally:
        gc.enable()
