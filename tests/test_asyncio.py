"""asyncio (issue 15): awaiting twins, proxies and sandboxed plugins, on every
twin kind, without blocking the event loop or a thread per call."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time

import async_helpers as helpers
import pytest
import twin_classes as tc
from cpy2py import TwinMaster, aio, is_proxy
from cpy2py.errors import TwinterpreterTerminated
from support import SANDBOX_KIND, TESTS_DIR, native_only, sandbox_unavailable, start_twin


@pytest.fixture(params=tc.KINDS, scope="module")
def twin(request):
    master = start_twin(request.param)
    yield master
    master.stop()


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 120))  # a hang fails, it does not block the suite


def test_execute_async_returns_and_raises_like_execute(twin):
    async def main():
        assert await twin.execute_async(helpers.where) == twin.twinterpreter_id
        assert await twin.execute_async(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]
        with pytest.raises(ZeroDivisionError):
            await twin.execute_async(divmod, 1, 0)

    run(main())


def test_import_module_async_gives_the_module_of_the_twin(twin):
    async def main():
        module = await twin.import_module_async("async_helpers")
        return is_proxy(module), await aio(module.where)()

    assert run(main()) == (True, twin.twinterpreter_id)


def test_a_thousand_concurrent_awaits_on_one_twin_without_a_thread_each(twin):
    seen = []

    async def main():
        loop_thread = threading.get_ident()
        calls = [twin.execute_async(abs, -n) for n in range(1000)]
        results = await asyncio.gather(*calls)
        seen.append(threading.get_ident() == loop_thread)
        return results

    before = threading.active_count()
    assert run(main()) == list(range(1000))
    # the calls were in flight at once, yet no thread was made per call
    assert threading.active_count() - before < 20


def test_aio_views_of_functions_classes_and_proxies(twin):
    kind = twin.twinterpreter_id

    async def main():
        assert await aio(helpers.SQUARE[kind])(7) == 49
        counter = await aio(tc.native_to(kind, tc.Counter))(5)
        assert is_proxy(counter)
        assert await aio(counter).increment() == 6
        assert await aio(counter).call("increment", 10) == 16
        assert await aio(counter).getattr("value") == 16
        await aio(counter).setattr("value", 1)
        assert counter.value == 1  # the sync API sees the same object
        await aio(counter).setattr("extra", "x")
        await aio(counter).delattr("extra")
        with pytest.raises(AttributeError):
            await aio(counter).getattr("extra")

    run(main())


def test_aio_of_an_object_of_this_interpreter_runs_it_here():
    class Local:
        value = 3

        async def later(self, x):
            return x + 1

        def now(self, x):
            return x * 2

    async def main():
        obj = Local()
        assert await aio(obj).later(1) == 2
        assert await aio(obj).now(4) == 8
        assert await aio(obj).getattr("value") == 3

    run(main())


def test_a_coroutine_function_of_the_master_is_awaited_on_its_loop(twin):
    async def main():
        loop = asyncio.get_running_loop()
        ran_on = []

        async def double(value):  # a closure: the twin gets a reference, it runs here
            await asyncio.sleep(0)
            ran_on.append(asyncio.get_running_loop() is loop)
            return value * 2

        assert await twin.execute_async(helpers.call_twice, double, 5) == 20
        assert ran_on == [True, True]

    run(main())


def test_more_awaits_than_any_pool_has_threads_whose_callbacks_wait_for_each_other(kind):
    """1,100 awaited calls whose twin calls back a coroutine function of the
    master, each waiting until all 1,100 callbacks have come (a barrier): in
    one interpreter they pass at once. Each callback's request holds a thread
    of the master while its coroutine runs on the loop, so a pool capped at
    1,024 threads hung them all."""
    count = 1100

    async def main():
        arrived, everyone = 0, asyncio.Event()

        async def meet(value):
            nonlocal arrived
            arrived += 1
            if arrived == count:
                everyone.set()
            await everyone.wait()
            return value

        master = TwinMaster(kind, f"{kind}-barrier")
        async with master:
            results = await asyncio.gather(
                *(master.execute_async(helpers.call_once, meet, n) for n in range(count))
            )
        assert results == list(range(count))

    run(main())


def test_a_sync_call_on_a_loop_says_why_a_coroutine_callback_cannot_run(twin):
    """A sync call made on a running loop's thread blocks that loop: a
    coroutine function it hands the twin cannot be run there (the loop
    waits), and the error says to await the call instead."""

    async def main():
        async def double(value):
            return value * 2

        with pytest.raises(RuntimeError, match="sync call made on the thread of a running event loop.*await"):
            twin.execute(helpers.call_twice, double, 5)
        assert await twin.execute_async(helpers.call_twice, double, 5) == 20

    run(main())


def test_recursion_from_async_code_through_a_twin(twin):
    kind = twin.twinterpreter_id

    async def main():
        async def step(depth):  # master -> twin -> master -> ... from async code
            return await twin.execute_async(helpers.recurse, step, depth)

        assert await step(4) == [kind] * 5

    run(main())


def test_a_twins_coroutine_awaits_a_coroutine_function_of_the_master_on_the_callers_loop(twin):
    """A coroutine run in the twin that awaits a coroutine function of the
    master (``await aio(callback)(...)``, an awaited call of the twin's own):
    the master awaits it on the loop of the call that led to it, so state
    bound to that loop works there. (Before, a native twin's awaited call
    was a new chain, whose coroutine the master ran on a server thread in a
    loop of its own; a guest's was refused and the guest stopped.)"""

    async def main():
        loop = asyncio.get_running_loop()
        woken, gate = asyncio.Event(), asyncio.Event()
        bound = asyncio.ensure_future(gate.wait())  # gate: bound to this loop
        await asyncio.sleep(0)
        seen = []

        async def callback(value):
            seen.append(asyncio.get_running_loop() is loop)
            woken.set()  # wakes the task below, on this loop
            await asyncio.wait_for(gate.wait(), 30)  # (elsewhere: "bound to a different event loop")
            return value * 2

        async def opener():
            await woken.wait()
            gate.set()

        opening = asyncio.ensure_future(opener())
        assert await twin.execute_async(helpers.await_callbacks, callback, [1, 2, 3]) == [2, 4, 6]
        await asyncio.wait_for(asyncio.gather(bound, opening), 30)
        assert seen == [True, True, True]

    run(main())


def test_the_callbacks_of_an_awaited_call_see_the_callers_context(twin):
    """What the calling task set in a ``contextvars.ContextVar`` (a request
    id, as a web server's logging keeps) is seen by the master's callbacks
    that the twin calls during the call, sync or coroutine, and by those a
    coroutine run in the twin awaits, as in one interpreter; what they set
    stays theirs."""
    import contextvars

    request_id = contextvars.ContextVar("request_id", default="unset")
    seen = []

    def sync_callback(value):
        seen.append(("sync", request_id.get()))
        request_id.set("changed by a callback")
        return value * 2

    async def async_callback(value):
        seen.append(("async", request_id.get()))
        return value * 3

    async def handle(name):
        request_id.set(name)
        doubled = await twin.execute_async(helpers.call_twice, sync_callback, 1)
        tripled = await twin.execute_async(helpers.call_twice, async_callback, 1)
        awaited = await twin.execute_async(helpers.await_callbacks, async_callback, [1, 2])
        return doubled, tripled, awaited, request_id.get()

    async def main():
        return await asyncio.gather(handle("request-1"), handle("request-2"))

    results = run(main())
    assert results == [(4, 9, [3, 6], name) for name in ("request-1", "request-2")]
    assert sorted(set(seen)) == [
        (how, name) for how in ("async", "sync") for name in ("request-1", "request-2")
    ]
    assert len(seen) == 12  # (two of each kind, per request)


def test_cancelling_an_awaited_call_cancels_the_callback_it_awaits(twin):
    """A coroutine function of the master that the twin called back, awaited
    on the loop when the awaiting task is cancelled, is cancelled with it
    (as in one interpreter); it ran on, orphaned, holding a thread of the
    master and one of the twin while it waited."""

    async def main():
        started, never = asyncio.Event(), asyncio.Event()
        ended = []

        async def callback(value):
            started.set()
            try:
                await never.wait()
            except asyncio.CancelledError:
                ended.append("cancelled")
                raise
            return value

        task = asyncio.ensure_future(twin.execute_async(helpers.call_twice, callback, 1))
        await asyncio.wait_for(started.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(1000):  # (a hang guard: it ends on the loop's next turns)
            if ended:
                break
            await asyncio.sleep(0.01)
        return list(ended)  # (asyncio.run cancels what is left as it ends: not that)

    assert run(main()) == ["cancelled"]
    assert twin.execute(abs, -3) == 3


@pytest.mark.parametrize("how", ["await", "aio", "execute_async"])
def test_an_async_twinfunction_of_the_master_awaited_in_a_twin_runs_on_the_callers_loop(twin, how):
    """An async twinfunction of a native twin whose coroutine awaits async
    twinfunctions pinned to the master, two at once: both run on the loop of
    the master's task that awaits the twin's, at the same time (each waits
    there for an event that the task sets once both started)."""
    kind = twin.twinterpreter_id
    native_only(kind, "a guest may not name the master's twinfunctions")
    pinned = helpers.VIA_MASTER[kind]

    async def main():
        events = {name: asyncio.Event() for name in ("a", "b", "go")}
        helpers.master_side.update(loop=asyncio.get_running_loop(), events=events, loops=[])
        bound = asyncio.ensure_future(events["go"].wait())  # bound to this loop
        await asyncio.sleep(0)
        if how == "await":
            call = pinned(["a", "b"])
        elif how == "aio":
            call = aio(pinned)(["a", "b"])
        else:
            call = twin.execute_async(pinned, ["a", "b"])
        call = asyncio.ensure_future(call)
        await asyncio.wait_for(asyncio.gather(events["a"].wait(), events["b"].wait()), 30)
        events["go"].set()
        assert await call == [kind, "a", "b"]
        await bound
        return helpers.master_side["loops"]

    try:
        assert run(main()) == [True, True]
    finally:
        helpers.master_side.clear()


def test_recursion_between_async_twinfunctions_of_the_master_and_a_twin(twin):
    """master -> twin -> master -> ... where each level is an ``async def``
    twinfunction awaiting the next: every level of the master runs on the
    loop of the task that awaited the first."""
    kind = twin.twinterpreter_id
    native_only(kind, "a guest may not name the master's twinfunctions")

    async def main():
        helpers.master_side.update(loop=asyncio.get_running_loop(), loops=[])
        return await helpers.BOUNCE[kind](kind, 3), helpers.master_side["loops"]

    try:
        assert run(main()) == ([kind, "master"] * 4, [True] * 4)
    finally:
        helpers.master_side.clear()


def test_a_coroutine_function_called_in_a_twin_is_awaited_there(twin):
    """Also in a sandboxed guest, where asyncio's loops cannot make the socket
    pair they wake on (kernel/guest_asyncio.py): sleeps and gathers run, and
    so does code that runs a loop of its own."""
    assert run(twin.execute_async(helpers.double_here, 21)) == 42
    assert twin.execute(helpers.gathered, 5) == 10
    assert run(twin.execute_async(helpers.gathered, 4)) == 6
    assert twin.execute(helpers.run_own_loop, 3) == 3


def test_a_guests_loop_refuses_signal_handlers_as_asyncio_does_without_signals():
    """A guest receives no signals: ``loop.add_signal_handler`` raises
    NotImplementedError, as asyncio does on Windows, which servers expect
    (before: an AttributeError of ``signal`` from deep in asyncio)."""
    twin = start_twin(SANDBOX_KIND, "wasi-aio-signals")
    try:
        assert twin.execute(helpers.add_a_signal_handler).startswith(
            "NotImplementedError: a sandboxed twin receives no signals"
        )
    finally:
        twin.stop()


def test_an_async_twinfunction_is_awaited_like_the_function_itself(twin):
    """``@twinfunction`` on an ``async def``: calling it gives a coroutine, as
    the function would, and awaiting it runs the coroutine in the twin
    without blocking the caller's loop; the sync API runs it there too."""
    kind = twin.twinterpreter_id
    square = helpers.ASYNC_SQUARE[kind]
    assert inspect.iscoroutinefunction(square) and square.__name__ == f"async_square_{kind.replace('-', '_')}"

    async def main():
        results, ticks = await ticks_during(asyncio.gather(*(square(n) for n in range(5))), 0)
        assert ticks > 0  # the loop ran meanwhile
        return results

    assert run(main()) == [(n * n, kind) for n in range(5)]
    assert twin.execute(square, 3) == (9, kind)


def test_a_cancelled_call_raises_at_once_and_the_link_stays_usable(twin):
    """``asyncio.timeout`` / ``wait_for``: the caller gets TimeoutError at once. A
    native twin runs the call to its end (its reply is dropped); a sandboxed
    guest is stopped (its state is lost) and the next call gets a fresh one."""
    kind = twin.twinterpreter_id

    async def main():
        assert await twin.execute_async(helpers.remember, "before") == ["before"]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(twin.execute_async(helpers.busy_then, 3, "late"), 0.3)
        # the link (or, for the sandbox, a fresh guest) serves the next calls
        assert await twin.execute_async(abs, -3) == 3
        return await twin.execute_async(helpers.remember, "after")

    remembered = run(main())
    if kind == SANDBOX_KIND:
        assert remembered == ["after"]  # a fresh guest: the stopped one's state is gone
    else:
        assert remembered == ["before", "after"]  # the same twin, still running


@pytest.mark.parametrize("kind", [kind for kind in tc.KINDS if kind != SANDBOX_KIND])
def test_awaited_calls_share_a_chain_only_once_nothing_of_it_runs(kind, tmp_path):
    """Awaited calls one after another run on one chain in the twin, as a
    thread's calls do (the server that answered one takes the next); calls
    in flight at once have chains of their own; and the chain of a cancelled
    call, which the twin still runs, is never given to a later call, which
    would wait behind it (here: for ever, as the cancelled call waits for
    the later ones to end)."""
    twin = start_twin(kind, f"{kind}-aio-chains")
    flag = tmp_path / "later-calls-ended"
    try:

        async def main():
            first = await twin.execute_async(helpers.chain_after)
            assert await twin.execute_async(helpers.chain_after) == first
            both = await asyncio.gather(*(twin.execute_async(helpers.chain_after, 0.2) for _ in range(2)))
            assert len(set(both)) == 2 and first in both

            def triple(value):  # a closure: the twin calls back into the master
                return value * 3

            for n in range(6):  # callbacks between calls on lent chains, and the reverse
                assert await twin.execute_async(helpers.call_twice, triple, n) == n * 9
                assert await twin.execute_async(abs, -n) == n
            waiting = asyncio.ensure_future(twin.execute_async(helpers.wait_for_file, str(flag)))
            await asyncio.sleep(0.3)  # (sent, and running in the twin)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            later = [await asyncio.wait_for(twin.execute_async(helpers.chain_after), 30) for _ in range(3)]
            flag.touch()
            assert len(set(later)) == 1
            # the cancelled call ended, and its reply was dropped: the twin serves on
            assert await twin.execute_async(helpers.slow, 0.5) == 0.5
            return await twin.execute_async(abs, -3)

        assert run(main()) == 3
    finally:
        twin.stop()


def test_cancelling_a_call_queued_for_a_guest_never_runs_it():
    twin = start_twin(SANDBOX_KIND, "wasi-aio-queue")
    try:

        async def main():
            first = asyncio.ensure_future(twin.execute_async(helpers.busy_then, 0.5, "first"))
            queued = asyncio.ensure_future(twin.execute_async(helpers.remember, "queued"))
            await asyncio.sleep(0.1)
            queued.cancel()
            assert await first == "first"
            with pytest.raises(asyncio.CancelledError):
                await queued
            return await twin.execute_async(helpers.remember, "next")

        assert run(main()) == ["next"]  # the cancelled call never ran; the guest lives on
    finally:
        twin.stop()


@pytest.mark.parametrize("how", ["cancelled", "timed out"])
def test_calls_queued_behind_one_that_stopped_the_guest_run_on_the_next(how):
    """A call to a guest cancelled, or timed out, while it runs stops the
    guest (that call says its state was lost). The calls queued behind it
    for their turns never reached that guest: they run on the next one, as
    calls made after the end would (they failed, each with the ended call's
    error, which did not describe them). By name, and (on the twin
    'wasi-python', with the settings of this module's) by a twinfunction."""
    from cpy2py import TwinTimeout

    if how == "cancelled":  # (the guest is stopped, not the twin: the next use starts it)
        twin = start_twin(SANDBOX_KIND)
    else:
        if sandbox_unavailable():
            pytest.skip(f"the sandboxed twin cannot run here: {sandbox_unavailable()}")
        twin = TwinMaster(SANDBOX_KIND, "wasi-aio-behind-timeout", paths=[TESTS_DIR], timeout=0.5)
    try:

        async def main():
            long_call = asyncio.ensure_future(twin.execute_async(helpers.busy_then, 8, "long"))
            await asyncio.sleep(0)  # (its turn first: the others queue behind it)
            queued = [asyncio.ensure_future(twin.execute_async(abs, -n)) for n in range(20)]
            if how == "cancelled":
                queued.append(asyncio.ensure_future(aio(helpers.square_wasi_python)(7)))
                await asyncio.sleep(0.3)
                long_call.cancel()
            (ended,) = await asyncio.gather(long_call, return_exceptions=True)
            return ended, await asyncio.gather(*queued)

        ended, results = run(main())
        if how == "cancelled":
            assert isinstance(ended, asyncio.CancelledError) and results == [*range(20), 49]
        else:
            assert isinstance(ended, TwinTimeout) and results == list(range(20))
    finally:
        if how != "cancelled":
            twin.stop()


def test_calls_queued_for_a_guest_that_is_stopped_fail_and_start_no_other():
    """``stop()`` while awaited calls wait for their turns: they fail with
    the stop's error, and no guest starts again for them (the calls queued
    behind a call that stopped its guest are made again: not these)."""
    twin = start_twin(SANDBOX_KIND, "wasi-aio-stop-queued")

    async def main():
        long_call = asyncio.ensure_future(twin.execute_async(helpers.busy_then, 3, "long"))
        await asyncio.sleep(0)  # (its turn first: the others queue behind it)
        queued = [asyncio.ensure_future(twin.execute_async(abs, -n)) for n in range(5)]
        await asyncio.sleep(0.3)
        await asyncio.get_running_loop().run_in_executor(None, twin.stop)
        return await asyncio.gather(long_call, *queued, return_exceptions=True)

    try:
        outcomes = run(main())
        assert all(isinstance(outcome, TwinterpreterTerminated) for outcome in outcomes), outcomes
        assert not twin.is_alive
    finally:
        twin.stop()


@pytest.mark.parametrize("kind", tc.KINDS)
def test_async_with_starts_and_stops_a_twin(kind):
    start_twin(kind, f"{kind}-aio-with").stop()  # skips when the kind cannot run here
    twin_id = f"{kind}-aio-with"

    async def main():
        master = TwinMaster(kind, twin_id, **({"paths": [TESTS_DIR]} if kind == SANDBOX_KIND else {}))
        async with master as running:
            assert running.is_alive
            assert await running.execute_async(abs, -1) == 1
        assert not master.is_alive

    run(main())


# -- the event loop reads the link while its awaited calls are pending -----------

NATIVE_KINDS = [kind for kind in tc.KINDS if kind != SANDBOX_KIND]


async def ticks_during(awaitable, pause):
    """``awaitable``'s result, and how often a task of the same loop that
    sleeps ``pause`` seconds at a time ran meanwhile."""
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(pause)

    beat = asyncio.ensure_future(ticker())
    try:
        return await awaitable, ticks
    finally:
        beat.cancel()


@pytest.mark.parametrize("kind", NATIVE_KINDS)
def test_a_twin_is_served_after_the_loop_that_awaited_it_ended(kind):
    """The loop that read the link for its awaited calls is gone: a request the
    twin makes on its own (a thread of its own calls the master) is still
    served, with no call of the master's to carry it."""
    twin = start_twin(kind, f"{kind}-aio-after-loop")
    try:
        called = threading.Event()

        async def main():
            await _many_awaits(twin, 50)
            await twin.execute_async(helpers.call_from_a_thread, _set_event(called), None, 0.3)

        run(main())  # the loop ends; no call of the master follows
        assert called.wait(60), "the twin's request was never read"
    finally:
        twin.stop()


def _set_event(event):
    def set_it(_value):
        event.set()

    return set_it


async def _many_awaits(twin, count):
    return await asyncio.gather(*(twin.execute_async(abs, -n) for n in range(count)))


@pytest.mark.parametrize("kind", NATIVE_KINDS)
def test_awaited_and_sync_calls_from_other_threads_share_a_twin(kind):
    """While a loop reads the link for its awaited calls, threads that call
    the same twin synchronously read for themselves or get their replies
    from the loop; loops in two threads await the same twin at once."""
    twin = start_twin(kind, f"{kind}-aio-mixed")
    errors = []

    def sync_caller(offset):
        try:
            for n in range(300):
                assert twin.execute(abs, -(n + offset)) == n + offset
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    def loop_in_a_thread():
        try:
            assert run(_many_awaits(twin, 300)) == list(range(300))
        except BaseException as err:
            errors.append(err)

    try:
        threads = [threading.Thread(target=sync_caller, args=(k * 1000,)) for k in range(3)]
        threads.append(threading.Thread(target=loop_in_a_thread))
        for thread in threads:
            thread.start()
        for _ in range(3):  # this thread's loop, meanwhile
            assert run(_many_awaits(twin, 300)) == list(range(300))
        for thread in threads:
            thread.join(120)
        assert not errors
    finally:
        twin.stop()


@pytest.mark.parametrize("kind", NATIVE_KINDS)
def test_a_sync_call_on_the_loop_while_its_awaited_calls_are_pending(kind):
    """Blocking the loop with a sync call to the twin (poor style, but it must
    not hang): the sync call reads the link itself, replies of the awaited
    calls wait for the loop, and everything completes."""
    twin = start_twin(kind, f"{kind}-aio-sync-on-loop")
    try:

        async def main():
            pending = [asyncio.ensure_future(twin.execute_async(helpers.busy_then, 0.2, n)) for n in range(5)]
            await asyncio.sleep(0.05)  # sent; the loop watches the link
            assert twin.execute(helpers.busy_then, 0.3, "sync") == "sync"
            return await asyncio.gather(*pending)

        assert run(main()) == list(range(5))
    finally:
        twin.stop()


def test_loops_that_come_and_go_leave_no_descriptor_behind():
    """Each loop that awaits a twin reads it through a descriptor of its own;
    it is closed once a later loop (or the link's end) replaces it."""
    import os

    twin = start_twin("python3", "python3-aio-fds")
    try:
        run(_many_awaits(twin, 10))
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            assert run(_many_awaits(twin, 10)) == list(range(10))
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        twin.stop()


@pytest.mark.parametrize("kind", NATIVE_KINDS)
def test_a_twin_that_dies_under_pending_awaits_fails_them_all(kind):
    twin = start_twin(kind, f"{kind}-aio-dies")
    try:

        async def main():
            pending = [asyncio.ensure_future(twin.execute_async(helpers.busy_then, 5, n)) for n in range(5)]
            await asyncio.sleep(0.2)
            threading.Thread(target=twin.destroy).start()
            return await asyncio.gather(*pending, return_exceptions=True)

        results = run(main())
        assert all(isinstance(result, TwinterpreterTerminated) for result in results), results
    finally:
        twin.stop()


# -- fresh guests (TwinMaster(..., fresh=True)) -----------------------------------


@pytest.fixture
def fresh_twin():
    start_twin(SANDBOX_KIND, "wasi-aio-fresh-probe").stop()  # skips when no sandbox runs here
    twin = TwinMaster(SANDBOX_KIND, "wasi-aio-fresh", paths=[TESTS_DIR], fresh=True)
    yield twin
    twin.stop()


def test_awaited_fresh_calls_run_at_once_each_in_a_guest_of_its_own(fresh_twin):
    async def main():
        return await asyncio.gather(*(fresh_twin.execute_async(helpers.remember, n) for n in range(4)))

    assert run(main()) == [[0], [1], [2], [3]]  # nothing of one call is seen by another
    assert not fresh_twin.is_alive  # each guest ended with its call


def test_a_cancelled_fresh_call_stops_its_guest(fresh_twin):
    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(fresh_twin.execute_async(helpers.busy_then, 30, "late"), 0.5)
        return await fresh_twin.execute_async(helpers.remember, "next")

    assert run(main()) == ["next"]
    assert not fresh_twin.is_alive  # the cancelled call's guest was stopped, not left running


def test_a_guest_hands_each_result_back_without_waiting_for_the_calls_queued_after_it():
    """Awaited calls to a guest take turns in it; each result reaches its
    caller as the guest sends it, never waiting for the calls after it."""
    twin = start_twin(SANDBOX_KIND, "wasi-aio-results")
    try:

        async def main():
            first = asyncio.ensure_future(twin.execute_async(abs, -1))
            slow = [asyncio.ensure_future(twin.execute_async(helpers.busy_then, 0.5, n)) for n in range(3)]
            done, _ = await asyncio.wait([first, *slow], return_when=asyncio.FIRST_COMPLETED)
            assert done == {first} and not any(call.done() for call in slow)
            return await first, await asyncio.gather(*slow)

        assert run(main()) == (1, [0, 1, 2])
    finally:
        twin.stop()


def test_awaited_calls_queued_behind_a_long_one_each_get_their_own_outcome():
    """Awaited calls to a guest queued behind one longer than the loop's
    slice: once it ends, the loop's thread runs the guest for the calls whose
    turn follows, one after another within a slice, and each task finds its
    own reply. Short calls, calls beyond a slice, calls that call back into
    the master, one that raises and one cancelled before its turn each end
    as their own, and the guest serves on."""
    twin = start_twin(SANDBOX_KIND, "wasi-aio-batches")
    try:

        def shape(n):
            if n % 15 == 7:
                return twin.execute_async(helpers.call_twice, lambda value: value + 1, n), n + 2
            if n % 15 == 11:
                return twin.execute_async(helpers.busy_then, 0.004, n), n
            if n == 20:
                return twin.execute_async(int, "twenty"), ValueError
            return twin.execute_async(abs, -n), n

        async def main():
            long_call = asyncio.ensure_future(twin.execute_async(helpers.busy_then, 0.05, "long"))
            await asyncio.sleep(0)  # (its turn first: the others queue behind it)
            shaped = [shape(n) for n in range(60)]
            tasks = [asyncio.ensure_future(call) for call, _ in shaped]
            tasks[40].cancel()  # (before its turn: it never reaches the guest)
            outcomes = await asyncio.gather(long_call, *tasks, return_exceptions=True)
            return outcomes, [expected for _, expected in shaped], await twin.execute_async(abs, -61)

        outcomes, expected, after = run(main())
        assert outcomes[0] == "long"
        for n, (outcome, wanted) in enumerate(zip(outcomes[1:], expected)):
            if n == 40:
                assert isinstance(outcome, asyncio.CancelledError)
            elif wanted is ValueError:
                assert isinstance(outcome, ValueError) and "twenty" in str(outcome)
            else:
                assert outcome == wanted, n
        assert after == 61
    finally:
        twin.stop()


def test_sync_calls_of_another_thread_and_recursive_calls_beside_batches_of_awaited_ones():
    """While a loop's awaited calls to a guest run in batches behind a long
    one, a thread's sync calls to it, and awaited calls that call back into
    a master coroutine which awaits the guest again, each get their own
    results (the batch gives the reading role up to the thread, and never
    runs the guest for a call that waits for its callback's answer)."""
    twin = start_twin(SANDBOX_KIND, "wasi-aio-batch-neighbours")
    synced = []

    def sync_calls():
        for n in range(200):
            synced.append(twin.execute(abs, -n))

    async def again(value):
        return await twin.execute_async(abs, -value) + 1

    try:

        async def main():
            caller = threading.Thread(target=sync_calls)
            long_call = asyncio.ensure_future(twin.execute_async(helpers.busy_then, 0.02, "long"))
            await asyncio.sleep(0)
            caller.start()
            calls = [
                twin.execute_async(helpers.call_twice, again, n)
                if n % 10 == 3
                else twin.execute_async(abs, -n)
                for n in range(100)
            ]
            outcomes = await asyncio.gather(long_call, *calls)
            await asyncio.get_running_loop().run_in_executor(None, caller.join)
            return outcomes

        outcomes = run(main())
        assert outcomes == ["long"] + [n + 2 if n % 10 == 3 else n for n in range(100)]
        assert synced == list(range(200))
    finally:
        twin.stop()


# -- found by review: each of these hung or failed before its fix -----------------


def test_a_turn_passed_to_a_loop_that_stops_before_its_task_runs_holds_up_no_other_call():
    """A long awaited call goes on on a worker; the call queued behind it on
    the same loop gets its turn while the loop is busy, and the loop stops
    before its task runs (run_until_complete returned): a worker runs the
    guest for it, and another loop's call gets its turn (it waited for ever)."""
    twin = start_twin(SANDBOX_KIND, "wasi-aio-stopped-turn")
    try:

        async def first_loop():
            asyncio.ensure_future(twin.execute_async(helpers.busy_then, 0.3, "A"))
            await asyncio.sleep(0)
            asyncio.ensure_future(twin.execute_async(abs, -2))  # (behind A)
            await asyncio.sleep(0.05)  # (A goes on on a worker)
            time.sleep(0.6)  # (busy as the worker passes the turn on; then the loop stops)

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(first_loop())
            assert run(twin.execute_async(abs, -3)) == 3  # (with the first loop stopped, not closed)
        finally:
            loop.close()
    finally:
        twin.stop()


def test_a_loop_held_up_by_sync_code_holds_up_no_other_loops_calls_to_a_guest():
    """Loop 1's long call A; loop 2's call B behind it, then loop 1's call C
    behind B; loop 2's thread then waits (sync code) for C. B's turn comes
    while loop 2 cannot run it: a worker does, and C runs (a deadlock)."""
    twin = start_twin(SANDBOX_KIND, "wasi-aio-held-loop")
    other = asyncio.new_event_loop()
    runner = threading.Thread(target=other.run_forever, daemon=True)
    runner.start()
    try:

        async def on_other(value, seconds=0.0):
            return await twin.execute_async(helpers.busy_then, seconds, value)

        first = asyncio.run_coroutine_threadsafe(on_other("A", 0.5), other)
        time.sleep(0.05)

        async def held():
            second = asyncio.ensure_future(twin.execute_async(abs, -2))  # (behind A)
            await asyncio.sleep(0.05)
            third = asyncio.run_coroutine_threadsafe(on_other("C"), other)  # (behind B)
            time.sleep(0.05)
            return third.result(60), await second  # (the loop's thread waits, as sync code does)

        assert run(held()) == ("C", 2)
        assert first.result(60) == "A"
    finally:
        other.call_soon_threadsafe(other.stop)
        runner.join(60)
        other.close()
        twin.stop()


@pytest.mark.parametrize("kind", NATIVE_KINDS)
def test_the_loop_never_waits_in_a_read_of_frames_another_thread_took(kind):
    """A frame comes while no awaited call is pending: a server of the gate
    and the loop both see it; whoever loses must not then wait on the link
    (the loop froze until the next frame: here, never). Timing-dependent: it
    caught the bug about one run in three."""
    twin = start_twin(kind, f"{kind}-aio-stale")
    try:
        called = []

        async def main():
            for _ in range(15):
                await twin.execute_async(helpers.call_back_later, lambda: called.append(1), 0.05)
                await asyncio.sleep(0.15)  # the callback comes meanwhile

        run(main())  # (a frozen loop is caught by the suite's timeout)
        deadline = threading.Event()
        for _ in range(100):
            if len(called) == 15:
                break
            deadline.wait(0.1)
        assert len(called) == 15
    finally:
        twin.stop()


@pytest.mark.parametrize("kind", tc.KINDS)
def test_a_loop_gets_its_replies_while_the_loop_that_watched_is_stopped(kind):
    """Loop A watches the link with a call pending, then stops (its
    run_until_complete returned); loop B, in another thread, awaits a call of
    its own: its reply must not wait for A to run again."""
    twin = start_twin(kind, f"{kind}-aio-two-loops")
    loop_a = asyncio.new_event_loop()
    try:
        pending = loop_a.create_task(twin.execute_async(helpers.slow, 2.0))
        got = []

        def in_b():
            got.append(run(twin.execute_async(helpers.slow, 0.2)))

        b = threading.Thread(target=in_b)
        loop_a.call_later(0.1, b.start)  # B's call starts while A runs ...
        loop_a.run_until_complete(asyncio.sleep(0.3))  # ... then A stops, its call pending
        b.join(30)
        assert got == [0.2]  # (before the fix: no reply until A ran again)
        assert loop_a.run_until_complete(pending) == 2.0
    finally:
        loop_a.close()
        twin.stop()


@pytest.mark.parametrize("kind", tc.KINDS)
def test_sync_calls_work_after_a_loop_was_closed_with_an_awaited_call_pending(kind):
    twin = start_twin(kind, f"{kind}-aio-closed-loop")
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(twin.execute_async(helpers.slow, 0.3))
        loop.run_until_complete(asyncio.sleep(0.05))  # sent; its reply comes later
        loop.close()
        # the abandoned call's reply is read by this thread (the closed loop's own)
        assert twin.execute(helpers.slow, 0.5) == 0.5
        assert twin.execute(abs, -2) == 2
        del task
    finally:
        twin.stop()


def test_short_awaited_calls_to_a_guest_run_on_the_loop_and_long_ones_leave_it_free():
    """An awaited call runs the guest on the loop's own thread for one slice:
    a short call ends there, with no thread started or handed the call (a
    hand-off each way cost more than half of a no-op call); a longer one
    goes on on a worker thread, and the loop's other tasks run meanwhile."""
    twin = start_twin(SANDBOX_KIND, "wasi-aio-slices")
    try:

        async def main():
            threads = set(threading.enumerate())
            assert await asyncio.gather(*(twin.execute_async(abs, -n) for n in range(20))) == list(range(20))
            assert not set(threading.enumerate()) - threads  # (none started; an idle worker may end)
            result, ticks = await ticks_during(twin.execute_async(helpers.busy_then, 0.3, "done"), 0.001)
            assert result == "done"
            return ticks

        assert run(main()) > 10  # (the loop's 1 ms sleeps ran through the 0.3 s call)
    finally:
        twin.stop()


@pytest.mark.parametrize("kind", tc.KINDS)
def test_a_loop_closed_with_a_call_pending_holds_up_no_other_call(kind):
    """A loop closed (or just stopped) while its awaited call waits: a sync
    call queued behind it on another thread, and an awaited call of a new
    loop, are answered (before, with a guest, the first waited for ever for
    the role, and the second for the closed loop's turn)."""
    twin = start_twin(kind, f"{kind}-aio-closed-turn")
    try:
        results = {}
        busy = threading.Thread(
            target=lambda: results.setdefault("busy", twin.execute(helpers.busy_then, 1.0, 1))
        )
        busy.start()
        time.sleep(0.1)  # (the busy call holds the link's reading role, running its twin)
        loop = asyncio.new_event_loop()
        task = loop.create_task(twin.execute_async(abs, -2))
        loop.run_until_complete(asyncio.sleep(0.2))
        loop.close()
        after = threading.Thread(target=lambda: results.setdefault("after", twin.execute(abs, -3)))
        after.start()
        busy.join(30)
        after.join(30)
        assert results == {"busy": 1, "after": 3}
        assert run(twin.execute_async(abs, -4)) == 4
        del task
    finally:
        twin.stop()


def test_a_fresh_guest_ends_once_the_proxies_of_awaited_calls_go(fresh_twin):
    """A proxy returned by an awaited call keeps its fresh guest alive, and
    nothing else of the calls does (no worker keeps the last result)."""
    import gc
    import time

    async def main():
        for n in range(4):
            box = await fresh_twin.execute_async(helpers.make_box, n)
            assert box.value == n
            del box

    run(main())
    for _ in range(50):
        gc.collect()
        if not fresh_twin.is_alive:
            break
        time.sleep(0.1)
    assert not fresh_twin.is_alive


@pytest.mark.parametrize("kind", NATIVE_KINDS)
def test_a_lone_awaited_call_waits_on_an_idle_loop_and_gives_it_back_for_its_work(kind):
    """A lone awaited call to a native twin waits for its reply on the
    loop's thread while the loop has nothing to do (no turn of the loop for
    a short call), and hands the loop back as soon as it has work: here a
    callback from another thread, which runs while the call still does."""
    twin = start_twin(kind, f"{kind}-aio-idle-wait")
    try:

        async def main():
            loop = asyncio.get_running_loop()
            ran = loop.create_future()
            ended = []
            poker = threading.Timer(0.2, loop.call_soon_threadsafe, (lambda: ran.set_result(bool(ended)),))
            poker.start()
            try:
                assert await twin.execute_async(time.sleep, 1.0) is None
                ended.append(True)
                return await ran
            finally:
                poker.cancel()

        assert run(main()) is False  # (False: the callback ran before the call ended)
    finally:
        twin.stop()


@pytest.mark.parametrize("kind", NATIVE_KINDS)
def test_signals_that_come_while_an_awaited_call_waits_do_not_hold_the_loops_timers(kind):
    """A signal handler of the program (not the loop's) that runs while an
    awaited call waits on the loop's thread for its reply does not start
    the wait's time again: with an alarm every 5 ms, a timer of the loop
    still runs while the call does."""
    import signal

    twin = start_twin(kind, f"{kind}-aio-signals")
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    try:
        twin.execute(abs, -1)

        async def main():
            loop = asyncio.get_running_loop()
            ended = []
            fired = []
            loop.call_later(0.05, lambda: fired.append(bool(ended)))
            signal.setitimer(signal.ITIMER_REAL, 0.005, 0.005)
            try:
                assert await twin.execute_async(time.sleep, 1.0) is None
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0, 0)
            ended.append(True)
            return fired

        assert run(main()) == [False]  # (False: the timer ran before the call ended)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
        twin.stop()


def test_a_derived_chain_is_never_given_to_two_calls_in_flight():
    """The chains of awaited calls made while serving one call of the peer
    come from a counter of 14 bits: past 16,383 of them, one still in flight
    (a callback waiting on an event) was given to a new call, whose requests
    then went to the first one's thread, and both hung. A chain in flight is
    skipped; when all are, the call says so."""
    from cpy2py.kernel import connection

    parent = (4321 << 24) | 7  # (the peer's chain: not made here)
    held = connection._derived_chain(parent)
    taken = {held}
    try:
        for _ in range(0x3FFE):
            chain = connection._derived_chain(parent)
            assert chain not in taken and chain & connection._ROOT_CHAINS == parent
            taken.add(chain)
        with pytest.raises(RuntimeError, match="16,383 awaited calls"):
            connection._derived_chain(parent)
        connection._release_derived(held)
        assert connection._derived_chain(parent) == held
    finally:
        for chain in taken:
            connection._release_derived(chain)
