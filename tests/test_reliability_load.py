"""Load and soak (issue 6): many threads, mixed payloads, callbacks and
recursion across interpreters; every reply reaches its own caller; memory
stays flat and released objects are freed.

Sizes: short in `just test`; ``CPY2PY_SOAK=full`` (``just soak``) runs the
sizes of the issue: 8 threads x 10,000 calls, 1,000,000 small calls,
100,000 created-and-dropped proxies.
"""

from __future__ import annotations

import gc
import os
import random
import threading
import time

import pytest
import reliability_helpers as rh
from cpy2py import TwinMaster
from cpy2py.kernel import references
from reliability_support import HANG
from support import require_interpreter, run_master

FULL = os.environ.get("CPY2PY_SOAK", "").lower() == "full"

THREADS = 8
CALLS_PER_THREAD = 10_000 if FULL else 2_000
SOAK_CALLS = 1_000_000 if FULL else 50_000
SOAK_PROXIES = 100_000 if FULL else 10_000

#: Bounded growth of the resident memory over a soak, measured after a
#: warm-up of a tenth of the run (imports, caches, JIT and allocator arenas
#: settle there). A leak of 64 bytes per call would exceed it in the full
#: run (64 MB), 1 KiB per call in the short one (50 MB).
RSS_GROWTH_LIMIT = 32 << 20

#: a soak must not take longer than this (a hang, not a speed requirement)
SOAK_HANG = 3600 if FULL else 600


@pytest.fixture(scope="module", params=rh.KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    require_interpreter(request.param)
    return request.param


_running: dict = {}


def twin(kind: str) -> TwinMaster:
    """The reliability twin of ``kind``, started once for the module."""
    if kind not in _running:
        require_interpreter(kind)
        master = TwinMaster(kind, twinterpreter_id=rh.twin_id(kind))
        master.start()
        _running[kind] = master
    return _running[kind]


@pytest.fixture(scope="module", autouse=True)
def _stop_twins():
    yield
    for master in _running.values():
        master.stop()
    _running.clear()


def run_threads(count: int, work, timeout: float = SOAK_HANG) -> list:
    """Run ``work(n)`` in ``count`` threads; returns what each returned or raised."""
    results: list = [None] * count

    def run(n: int) -> None:
        try:
            results[n] = work(n)
        except BaseException as err:  # judged by the test
            results[n] = err

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    start = time.monotonic()
    for thread in threads:
        thread.join(max(0.0, timeout - (time.monotonic() - start)))
        assert not thread.is_alive(), "a thread hangs (deadlock?)"
    return results


def payload_for(rng: random.Random) -> bytes:
    """Mixed sizes: mostly small, some KiB, a few of 256 KiB and 1 MiB."""
    roll = rng.random()
    if roll < 0.70:
        size = rng.randrange(0, 64)
    elif roll < 0.95:
        size = rng.randrange(64, 16 << 10)
    elif roll < 0.995:
        size = 256 << 10
    else:
        size = 1 << 20
    return rng.randbytes(size)


def mixed_calls(twins: list, n: int, calls: int) -> dict:
    """One thread's share: calls with payloads and callbacks, each checked
    against its own token. Returns counts; raises on the first wrong reply."""
    rng = random.Random(1000 + n)
    counts = {"calls": 0, "callbacks": 0}
    for i in range(calls):
        target = twins[i % len(twins)]
        token = f"t{n}-{i}-{target.twinterpreter_id}"
        payload = payload_for(rng)
        if rng.random() < 0.05:  # the twin calls the master back, on this very thread
            callbacks = rng.randrange(1, 3)
            got = target.execute(rh.answer_with_callback, token, payload, callbacks)
            counts["callbacks"] += callbacks
        else:
            got = target.execute(rh.answer, token, payload)
        expected = rh.answer(token, payload)
        if got != expected:
            raise AssertionError(f"call {token} got {got!r:.200}, expected {expected!r:.200}")
        counts["calls"] += 1
    return counts


def check_all(results: list, calls: int) -> None:
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} thread(s) failed; first: {errors[0]!r}"
    assert sum(r["calls"] for r in results) == calls
    assert sum(r["callbacks"] for r in results) > 0


def test_threads_calling_one_twin(kind):
    target = twin(kind)
    results = run_threads(THREADS, lambda n: mixed_calls([target], n, CALLS_PER_THREAD))
    check_all(results, THREADS * CALLS_PER_THREAD)


def test_threads_calling_two_twins_at_once():
    require_interpreter("pypy3")
    twins = [twin("python3"), twin("pypy3")]
    order = [twins, twins[::-1]]
    results = run_threads(THREADS, lambda n: mixed_calls(order[n % 2], n, CALLS_PER_THREAD))
    check_all(results, THREADS * CALLS_PER_THREAD)


def test_threads_mixed_with_recursion_across_interpreters():
    """Half the threads recurse master -> twin -> master -> ... (through both
    twins where there are two), half make plain calls: no deadlock, every
    path is its own."""
    kinds = [k for k in rh.KINDS if k == "python3" or _installed(k)]
    twins = [twin(k) for k in kinds]
    ids = [t.twinterpreter_id for t in twins]
    rounds = CALLS_PER_THREAD // 10

    def work(n: int) -> dict:
        rng = random.Random(n)
        if n % 2:
            return mixed_calls(twins, n, rounds * 4)
        for i in range(rounds):
            token, depth = f"r{n}-{i}", rng.randrange(1, 9)
            first = twins[i % len(twins)]
            got = first.execute(rh.recurse, token, depth, ids)
            expected = rh.expected_path(token, depth, ids, first.twinterpreter_id)
            if got != expected:
                raise AssertionError(f"recursion {token} went {got}, expected {expected}")
        return {"calls": 0, "callbacks": 0, "recursions": rounds}

    results = run_threads(THREADS, work)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} thread(s) failed; first: {errors[0]!r}"
    assert sum(r.get("recursions", 0) for r in results) == rounds * THREADS // 2


def _installed(kind: str) -> bool:
    import shutil

    return shutil.which(kind) is not None


# -- soak --------------------------------------------------------------------------------


def settle_memory(target: TwinMaster) -> tuple:
    """Collect garbage on both sides; the master's and the twin's RSS."""
    gc.collect()
    target.execute(rh.collect)
    return rh.rss_bytes(), target.execute(rh.rss_bytes)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {HANG} s"
        gc.collect()
        time.sleep(0.05)


def assert_flat(before: tuple, after: tuple, what: str) -> None:
    for side, old, new in (("master", before[0], after[0]), ("twin", before[1], after[1])):
        grew = new - old
        assert grew < RSS_GROWTH_LIMIT, (
            f"the {side}'s memory grew by {grew / 2**20:.1f} MiB over {what} "
            f"(limit {RSS_GROWTH_LIMIT >> 20} MiB): a leak?"
        )


def test_soak_small_calls_memory_stays_flat(kind):
    target = twin(kind)
    warmup = SOAK_CALLS // 10
    payload = b"0123456789" * 3
    for i in range(warmup):
        target.execute(rh.answer, i, payload)
    before = settle_memory(target)
    for i in range(SOAK_CALLS):
        got = target.execute(rh.answer, i, payload)
        if got[0] != i:
            raise AssertionError(f"call {i} got the reply {got!r}")
    after = settle_memory(target)
    assert_flat(before, after, f"{SOAK_CALLS} calls")


def test_soak_proxies_are_released_and_memory_stays_flat(kind):
    """Objects created in the twin and dropped in the master (and master
    objects handed to the twin and dropped there) are released: the export
    counts return to where they were, and memory stays flat."""
    target = twin(kind)
    cls = rh.blob_class(kind)
    twin_exports = target.execute(rh.export_count)
    twin_proxies = target.execute(rh.proxy_count)
    master_exports = references.export_count()
    master_proxies = rh.proxy_count()

    def make_and_drop(count: int, offset: int = 0) -> None:
        for i in range(count):
            blob = cls(offset + i, 8)
            if i % 10 == 0:
                assert blob.describe() == [offset + i, 8, target.twinterpreter_id]
            del blob

    def hand_and_drop(count: int) -> None:
        assert target.execute(rh.use_and_drop_master_objects, count) == sum(range(count))

    warmup = SOAK_PROXIES // 10
    make_and_drop(warmup)
    hand_and_drop(warmup // 10)
    before = settle_memory(target)
    make_and_drop(SOAK_PROXIES, offset=warmup)
    hand_and_drop(SOAK_PROXIES // 10)
    gc.collect()
    wait_until(lambda: target.execute(rh.export_count) == twin_exports, "the twin releasing its objects")
    wait_until(lambda: references.export_count() == master_exports, "the master releasing its objects")
    wait_until(lambda: target.execute(rh.proxy_count) == twin_proxies, "the twin dropping its proxies")
    wait_until(lambda: rh.proxy_count() == master_proxies, "the master dropping its proxies")
    after = settle_memory(target)
    assert_flat(before, after, f"{SOAK_PROXIES} proxies")


def test_server_threads_stay_bounded(kind):
    """Calls that take longer than the serving tick make the twin hand polling
    to another server thread; the threads left idle must not pile up (found
    by the full soak: hundreds of idle threads and ~80 bytes per call)."""
    target = twin(kind)
    before = target.execute(rh.thread_count)
    for i in range(300):
        assert target.execute(rh.sleep_then, 0.004, i) == i
    results = run_threads(THREADS, lambda n: [target.execute(rh.sleep_then, 0.004, n) for _ in range(20)])
    assert results == [[n] * 20 for n in range(THREADS)]
    after = target.execute(rh.thread_count)
    assert after <= before + THREADS + 4, f"the twin went from {before} to {after} threads"


def test_steady_concurrency_keeps_its_server_threads(kind):
    """8 threads calling a twin at once keep about 8 server threads busy there:
    the same ones serve call after call (a server thread that retired as soon
    as 4 others were idle was started again for one call in ten)."""
    target = twin(kind)
    target.execute(rh.count_server_starts)
    results = run_threads(THREADS, lambda n: [target.execute(rh.sleep_then, 0, n) for _ in range(200)])
    assert results == [[n] * 200 for n in range(THREADS)]
    started = target.execute(rh.server_starts)
    assert started <= THREADS + 4, f"{started} server threads were started for {THREADS * 200} calls"


def test_idle_server_threads_retire_after_a_burst(kind):
    """16 calls at once have servers of their own; those beyond
    Connection.MAX_IDLE idle ones end once they have waited
    Connection.RETIRE_AFTER seconds with nothing to do."""
    from cpy2py.kernel.connection import Connection

    target = twin(kind)
    before = target.execute(rh.thread_count)
    results = run_threads(16, lambda n: [target.execute(rh.sleep_then, 0.05, n)])
    assert results == [[n] for n in range(16)]
    wait_until(
        lambda: target.execute(rh.thread_count) <= before + Connection.MAX_IDLE,
        "the idle servers beyond MAX_IDLE retiring",
    )


_BUSY_EXIT = """
import sys, threading, time
import reliability_helpers as rh
from cpy2py import TwinMaster

masters = [TwinMaster(kind, twinterpreter_id="busy-" + kind) for kind in {kinds!r}]
for master in masters:
    master.start()


def loop(master):
    while True:
        master.execute(rh.sleep_then, 0.001)


for i in range(12):
    threading.Thread(target=loop, args=(masters[i % len(masters)],), daemon=True).start()
time.sleep(0.3)
print("EXITING", flush=True)
"""


def test_master_exit_with_busy_daemon_threads():
    """The master exits while daemon threads keep calling its twins: it must
    end with its own status, never abort ("FATAL: exception not rethrown",
    when CPython ends a thread inside the host's Rust frames), and start no
    twin while it exits."""
    kinds = [k for k in rh.KINDS if _installed(k)]
    runs = 40 if FULL else 6
    for run in range(runs):
        result = run_master(_BUSY_EXIT.format(kinds=kinds), timeout=HANG * 2)
        assert "EXITING" in result.stdout, result.stderr
        assert result.returncode == 0, f"run {run}: status {result.returncode}\n{result.stderr[-2000:]}"
        assert "FATAL" not in result.stderr
