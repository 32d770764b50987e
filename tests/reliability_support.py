"""Threads making calls, and waiting without hanging, for the reliability tests."""

from __future__ import annotations

import os
import signal
import threading
import time

import reliability_helpers as rh
from cpy2py import TwinMaster
from support import process_exists

#: a wait longer than this is a hang, never a performance claim (generous:
#: the suite may share 2 cores with other work)
HANG = 30.0


class Calls:
    """``count`` threads, each making one call; records what each got."""

    def __init__(self, master: TwinMaster, count: int, func, *args) -> None:
        self.outcomes: list = [None] * count
        self.threads = [
            threading.Thread(target=self._run, args=(i, master, func, args), daemon=True)
            for i in range(count)
        ]
        for thread in self.threads:
            thread.start()

    def _run(self, i: int, master: TwinMaster, func, args) -> None:
        try:
            self.outcomes[i] = ("value", master.execute(func, *args))
        except BaseException as err:  # recorded, judged by the test
            self.outcomes[i] = ("error", err)

    def running(self) -> int:
        return sum(thread.is_alive() for thread in self.threads)

    def join(self) -> float:
        """Wait for every call; fails if one hangs. Returns the seconds waited."""
        start = time.monotonic()
        for thread in self.threads:
            thread.join(max(0.0, HANG - (time.monotonic() - start)))
        waited = time.monotonic() - start
        assert self.running() == 0, f"{self.running()} call(s) still hang after {waited:.1f} s"
        return waited

    def errors(self) -> list:
        return [outcome[1] for outcome in self.outcomes if outcome[0] == "error"]


class Loop:
    """A thread calling ``master`` again and again until stopped; nothing may fail."""

    def __init__(self, master: TwinMaster) -> None:
        self.master = master
        self.count = 0
        self.failures: list = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                token = f"loop-{self.count}"
                assert self.master.execute(rh.answer, token, b"x" * 100) == rh.answer(token, b"x" * 100)
                self.count += 1
            except BaseException as err:
                self.failures.append(err)
                return

    def stop(self) -> int:
        self.done.set()
        self.thread.join(HANG)
        assert not self.thread.is_alive(), "the bystander's calls hang"
        assert self.failures == [], f"the bystander failed: {self.failures!r}"
        return self.count


def wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + HANG
    while process_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not process_exists(pid)


def stop_twin(pid: int) -> None:
    """SIGSTOP process ``pid`` and wait until every thread of it is stopped:
    a stop takes hold thread by thread, and a PyPy twin answered a call sent
    right after the signal (1 in 40 tries; its last thread stopped 1-2 ms
    after it)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + HANG
    while not all(_thread_state(pid, tid) in ("T", "t", None) for tid in os.listdir(f"/proc/{pid}/task")):
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.001)


def _thread_state(pid: int, tid: str):
    """A thread's state letter (T: stopped), None once it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def wait_for_pending(master: TwinMaster, count: int, *calls: Calls) -> None:
    """Wait until ``count`` calls to ``master``'s twin wait on its link (a
    call counts from before it sends, so each is inside its call);
    ``calls`` are the ones made, whose outcomes a failure shows."""
    from cpy2py.master import connection_for

    connection = connection_for(master.twinterpreter_id)
    deadline = time.monotonic() + HANG
    while connection.calls_waiting() < count:
        if time.monotonic() >= deadline:  # (rare, under load: say where the calls are)
            raise AssertionError(
                f"{count} calls never reached the link ({connection.calls_waiting()} did; "
                f"link {connection!r}; outcomes so far: {[c.outcomes for c in calls]!r}):\n{_thread_stacks()}"
            )
        time.sleep(0.01)


def _thread_stacks() -> str:
    """Where each thread of this process is, for a test that waited in vain."""
    import sys
    import traceback

    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return "\n".join(
        f"--- {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame)[-6:])
        for ident, frame in sys._current_frames().items()
    )


def settle() -> None:
    """Give threads a moment to be inside their calls (no result depends on it)."""
    time.sleep(0.5)


def in_thread(func, *args) -> tuple:
    """Run ``func(*args)`` in a thread: ("value", result) or ("error", exception);
    fails if it hangs."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(("value", func(*args)))
        except BaseException as err:  # judged by the test
            outcome.append(("error", err))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG)
    assert not thread.is_alive(), f"{getattr(func, '__name__', func)} hangs"
    return outcome[0]
