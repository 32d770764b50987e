"""asyncio (issue 15): awaiting twins, proxies and sandboxed plugins, on every
twin kind, without blocking the event loop or a thread per call."""

from __future__ import annotations

import asyncio
import threading

import async_helpers as helpers
import pytest
import twin_classes as tc
from cpy2py import TwinMaster, aio, is_proxy
from support import SANDBOX_KIND, TESTS_DIR, start_twin


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


def test_recursion_from_async_code_through_a_twin(twin):
    kind = twin.twinterpreter_id

    async def main():
        async def step(depth):  # master -> twin -> master -> ... from async code
            return await twin.execute_async(helpers.recurse, step, depth)

        assert await step(4) == [kind] * 5

    run(main())


def test_a_coroutine_function_called_in_a_twin_is_awaited_there(twin):
    if twin.twinterpreter_id == SANDBOX_KIND:
        pytest.skip("not for the sandbox: asyncio cannot run in a WASI guest (its loop needs a socketpair)")
    assert run(twin.execute_async(helpers.double_here, 21)) == 42


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
