"""What asyncio itself adds to a round trip: a raw pipe ping-pong with a
forked child, sync and awaited (the reply read by a reader callback that
resolves the future the coroutine awaits), in microseconds.

    taskset -c 1 python benches/asyncio_floor.py [calls]

The awaited ping-pong is the floor of an awaited cpy2py call, as the raw pipe
is of a sync one (benches/README.md).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any, List, Tuple


def measure(calls: int) -> Tuple[float, float]:
    """(sync, awaited) microseconds per round trip with a forked echo child."""
    to_child, from_master = os.pipe()
    from_child, to_master = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child echoes 8-byte messages until the pipe closes
        os.close(from_master)
        os.close(from_child)
        while True:
            message = os.read(to_child, 8)
            if not message:
                os._exit(0)
            os.write(to_master, message)
    os.close(to_child)
    os.close(to_master)

    started = time.perf_counter()
    for _ in range(calls):
        os.write(from_master, b"12345678")
        os.read(from_child, 8)
    sync_us = (time.perf_counter() - started) / calls * 1e6

    async def awaited() -> float:
        loop = asyncio.get_running_loop()
        waiting: List[Any] = []

        def on_reply() -> None:
            os.read(from_child, 8)
            waiting.pop().set_result(None)

        loop.add_reader(from_child, on_reply)
        started = time.perf_counter()
        for _ in range(calls):
            future = loop.create_future()
            waiting.append(future)
            os.write(from_master, b"12345678")
            await future
        loop.remove_reader(from_child)
        return (time.perf_counter() - started) / calls * 1e6

    try:
        async_us = asyncio.run(awaited())
    finally:
        os.close(from_master)
        os.close(from_child)
        os.waitpid(pid, 0)
    return sync_us, async_us


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    sync_us, async_us = measure(calls)
    extra = async_us - sync_us
    print(f"raw pipe round trip: sync {sync_us:.1f} us, awaited {async_us:.1f} us (+{extra:.1f})")


if __name__ == "__main__":
    main()
