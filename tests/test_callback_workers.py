"""The pool of threads that runs a peer's requests of awaited calls
(kernel/callback_workers.py): it never caps the work that waits, and lets
its idle threads go."""

from __future__ import annotations

import os
import threading
import time

import pytest
from cpy2py.kernel.callback_workers import Workers, callback_workers


def wait_until(check, what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_work_that_waits_for_later_work_never_runs_out_of_threads():
    """Each task waits until all of them have started (as coroutine
    callbacks meeting at a barrier do): a pool of any fixed size hangs."""
    workers = Workers("test-barrier", lambda: None)
    count = 300
    everyone = threading.Barrier(count, timeout=30)
    futures = [workers.submit(everyone.wait) for _ in range(count)]
    assert sorted(future.result(timeout=60) for future in futures) == list(range(count))


def threads_named(prefix: str) -> int:
    return sum(1 for thread in threading.enumerate() if thread.name.startswith(prefix))


def test_threads_are_reused_and_the_idle_ones_end():
    workers = Workers("test-idle", lambda: None, idle_exit=0.3)
    gate = threading.Event()
    futures = [workers.submit(gate.wait, 30) for _ in range(20)]
    wait_until(lambda: threads_named("test-idle-") == 20, "twenty threads for twenty waiting tasks")
    gate.set()
    assert all(future.result(timeout=30) for future in futures)
    wait_until(lambda: workers.threads_idle() == 20, "the twenty threads wait for work")
    for value in range(50):  # one at a time: an idle thread takes each, none is added
        assert workers.submit(abs, -value).result(timeout=30) == value
    assert threads_named("test-idle-") <= 20
    wait_until(lambda: threads_named("test-idle-") == 0, "the idle threads ended")
    assert workers.submit(abs, -7).result(timeout=30) == 7  # (and a new one starts)


def test_an_exception_reaches_the_future_and_the_thread_goes_on():
    workers = Workers("test-errors", lambda: None)
    with pytest.raises(ZeroDivisionError):
        workers.submit(divmod, 1, 0).result(timeout=30)
    assert workers.submit(divmod, 7, 2).result(timeout=30) == (3, 1)


def test_the_initializer_runs_in_each_thread():
    ran = []
    workers = Workers("test-init", lambda: ran.append(threading.get_ident()))
    gate = threading.Event()
    futures = [workers.submit(gate.wait, 30) for _ in range(3)]
    wait_until(lambda: len(ran) == 3, "three threads initialized")
    gate.set()
    for future in futures:
        future.result(timeout=30)
    assert len(set(ran)) == 3


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_pool_of_its_own():
    """A forked child has none of its parent's threads: work it submits to
    the process's pool runs on threads of its own (the parent's idle ones,
    counted as waiting, would have taken it and never run it)."""
    workers = callback_workers()
    assert workers.submit(abs, -1).result(timeout=30) == 1  # (an idle thread waits in the parent)
    wait_until(lambda: workers.threads_idle() >= 1, "a thread of the parent's pool waits for work")
    pid = os.fork()
    if pid == 0:  # the child: exits 0 only if its call ran
        try:
            os._exit(0 if callback_workers().submit(abs, -2).result(timeout=10) == 2 else 1)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
