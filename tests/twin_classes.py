"""Twin classes for the object tests. Each base class here is native to the
master; ``native_to(kind)`` gives module-level subclasses pinned to a twin
kind (``Counter_pypy3``, ...), so every interpreter can find them by name."""

from __future__ import annotations

import gc
import os
import sys
import threading
import weakref

from cpy2py import TwinObject, is_proxy, kernel_state, localmethod, twinfunction

#: twin kinds the object suite runs against (the sandboxed guest included)
SANDBOX_KIND = "wasi-python"
KINDS = ("python3", "pypy3", SANDBOX_KIND)

#: weak references to instances created here, by a key the test chooses
_tracked: dict[str, weakref.ref] = {}


class Counter(TwinObject):
    """Counts; the test subject for attributes and methods."""

    step = 1
    created = 0

    def __init__(self, start=0):
        self.value = start
        type(self).created += 1

    def increment(self, by=None):
        """Add ``by`` (the class's step if None); the new value."""
        self.value += self.step if by is None else by
        return self.value

    _lock = threading.Lock()

    def locked_increment(self, by):
        with self._lock:  # calls from many threads run concurrently in the twin
            self.value += by
            return self.value

    def where(self):
        return {"pid": os.getpid(), "implementation": sys.implementation.name, "proxy": is_proxy(self)}

    @classmethod
    def make(cls, start):
        """A counter from ``start``."""
        return cls(start)

    @staticmethod
    def twice(x):
        return 2 * x, os.getpid()

    @property
    def double(self):
        return 2 * self.value

    @double.setter
    def double(self, value):
        self.value = value // 2

    @double.deleter
    def double(self):
        self.value = 0

    @localmethod
    def local_where(self):
        return os.getpid()

    def track(self, key):
        _tracked[key] = weakref.ref(self)

    def fail(self, kind, *args):
        raise kind(*args)


class Upper:
    """A data descriptor: stores upper-case text in the instance."""

    def __set_name__(self, owner, name):
        self.name = "_" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self.name, None)

    def __set__(self, obj, value):
        setattr(obj, self.name, value.upper())

    def __delete__(self, obj):
        delattr(obj, self.name)


class Box(TwinObject):
    """Special methods."""

    label = Upper()

    def __init__(self, *items):
        self.items = list(items)
        self.entered = 0

    def __len__(self):
        return len(self.items)

    def __format__(self, spec):
        return f"{len(self.items):{spec}} items in {sys.implementation.name}"

    def __iter__(self):
        # a native twin creates a master object here; a sandboxed guest may not
        # (the master refuses), so its iterator stays with it
        if type(self).__twin_id__ == SANDBOX_KIND:
            return native_to(SANDBOX_KIND, BoxIterator)(self.items)
        return BoxIterator(self.items)

    def __getitem__(self, index):
        return self.items[index]

    def __setitem__(self, index, value):
        self.items[index] = value

    def __delitem__(self, index):
        del self.items[index]

    def __contains__(self, item):
        return item in self.items

    def __call__(self, *args):
        return ("called", args, os.getpid())

    def __bool__(self):
        return bool(self.items)

    def __eq__(self, other):
        return isinstance(other, Box) and list(self.items) == list(other.items)

    def __hash__(self):
        return hash(tuple(self.items))

    def __lt__(self, other):
        if not isinstance(other, Box):
            return NotImplemented  # (Python then tries other > self, and raises TypeError)
        return sum(self.items) < sum(other.items)

    def __add__(self, other):
        return type(self)(*(self.items + list(other.items)))

    def __iadd__(self, other):
        self.items.extend(other.items)
        return self

    def __neg__(self):
        return [-i for i in self.items]

    def __repr__(self):
        return f"Box{tuple(self.items)!r}@{os.getpid()}"

    def __str__(self):
        return "box of " + ", ".join(map(str, self.items))

    def __enter__(self):
        self.entered += 1
        return self

    def __exit__(self, kind, value, traceback):
        self.entered -= 1
        self.last_exit = None if kind is None else kind.__name__
        return kind is KeyError  # swallow KeyError only


class BoxIterator(TwinObject):
    def __init__(self, items):
        self.items = list(items)

    def __iter__(self):
        return self

    def __next__(self):
        if not self.items:
            raise StopIteration
        return self.items.pop(0)


class Base(TwinObject):
    def who(self):
        return ["Base"]

    def pid(self):
        return os.getpid()


class Left(Base):
    def who(self):
        return ["Left"] + super().who()


class Right(Base):
    def who(self):
        return ["Right"] + super().who()


class Diamond(Left, Right):
    def who(self):
        return ["Diamond"] + super().who()


class Fetcher(TwinObject):
    """Async methods: awaited where they are called, run in their twin."""

    def __init__(self, factor):
        self.factor = factor

    async def fetch(self, x):
        import asyncio
        import sys

        await asyncio.sleep(0)
        return x * self.factor, sys.implementation.name, os.getpid()

    @classmethod
    async def make(cls, factor):
        return cls(factor)

    def plain(self):
        return self.factor


class Stream(TwinObject):
    """An async context manager and async iterator."""

    def __init__(self, count):
        self.count = count
        self.state = "new"

    async def __aenter__(self):
        self.state = "open"
        return self

    async def __aexit__(self, kind, value, traceback):
        self.state = f"closed after {kind.__name__ if kind else 'nothing'}"
        return kind is KeyError  # swallows KeyError only

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.count == 0:
            raise StopAsyncIteration
        self.count -= 1
        return self.count


class Caller(TwinObject):
    """Calls other objects, wherever they live."""

    def call_method(self, obj, name, *args):
        return getattr(obj, name)(*args)

    def same(self, obj):
        return obj

    def spawn_threads(self, func, count):
        results = [None] * count

        def run(i):
            results[i] = func(i)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results


def native_to(kind: str, base: type) -> type:
    return globals()[_pinned_name(base, kind)]


def _pinned_name(base: type, kind: str) -> str:
    return f"{base.__name__}_{kind.replace('-', '_')}"


for _kind in KINDS:
    for _base in (Counter, Box, BoxIterator, Base, Left, Right, Diamond, Caller, Fetcher, Stream):
        _name = _pinned_name(_base, _kind)
        globals()[_name] = type(_base)(
            _name, (_base,), {"__twin_id__": _kind, "__qualname__": _name, "__module__": __name__}
        )


def is_tracked_alive(key):
    gc.collect()
    ref = _tracked.get(key)
    return ref is not None and ref() is not None


def identity_round_trip(obj, echo=None):
    """In a twin: send ``obj`` to the master and back (by ``echo``, a master
    callable; by default a twinfunction); is it the same object?"""
    return obj is (echo or echo_in_master)(obj)


@twinfunction(kernel_state.MASTER_ID)
def echo_in_master(value):
    return value


def state_here():
    return {
        "twin_id": kernel_state.TWIN_ID,
        "is_master": kernel_state.is_master(),
        **{f"is_{kind}": kernel_state.is_twinterpreter(kind) for kind in KINDS},
    }


def boxes_keyed(kind):
    """A set and a dict keyed by twin objects with __eq__/__hash__, made in their twin."""
    box = native_to(kind, Box)
    return {box(1), box(2)}, {box(3): "three"}
