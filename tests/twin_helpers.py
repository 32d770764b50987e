"""Functions the tests run inside twins. Module-level and free of pytest
imports, so every twin can import this module by name."""

from __future__ import annotations

import dataclasses
import enum
import os
import sys
import time

from cpy2py import kernel_state


def identity() -> dict:
    return {
        "implementation": sys.implementation.name,
        "version": tuple(sys.version_info[:3]),
        "pid": os.getpid(),
        "executable": sys.executable,
        "cwd": os.getcwd(),
        "optimize": sys.flags.optimize,
        "twin_id": kernel_state.TWIN_ID,
        "master_id": kernel_state.MASTER_ID,
        "env_twin_id": os.environ.get("__CPY2PY_TWIN_ID__"),
        "env_master_id": os.environ.get("__CPY2PY_MASTER_ID__"),
        "argv": list(sys.argv),
        "codec": __import__("cpy2py.protocol.codec", fromlist=["IMPLEMENTATION"]).IMPLEMENTATION,
    }


def echo(value):
    return value


class Shade(enum.Enum):
    """Plain objects that only pickle carries (the master pickles them)."""

    LIGHT = 1
    DARK = 2


@dataclasses.dataclass
class Sample:
    name: str
    shade: Shade
    values: list


def samples(count: int) -> list:
    """``count`` plain objects that only pickle carries."""
    return [Sample(f"s{i}", Shade.DARK if i % 3 else Shade.LIGHT, [i, i * 0.5]) for i in range(count)]


def add(a, b=0, *rest, scale=1):
    return (a + b + sum(rest)) * scale


class CustomError(Exception):
    """An application exception type known to master and twin."""


class NeedsTwoArgs(Exception):
    def __init__(self, code, text):
        super().__init__(code, text)
        self.code = code
        self.text = text


class HTTPError(Exception):
    """Keeps an attribute beside its args, with a default in __init__."""

    def __init__(self, message, status=500):
        super().__init__(message)
        self.status = status


class StatusError(Exception):
    """Its __init__ takes other arguments than those it passes up."""

    def __init__(self, status):
        super().__init__(f"HTTP {status}")
        self.status = status


def fail_with(kind, *args):
    raise kind(*args)


def fail_with_details():
    """An exception with attributes given after it was made, and a note."""
    import json

    try:
        json.loads('{"a": }')
    except json.JSONDecodeError as err:
        err.request_id = "r-17"
        err.add_note("while reading the settings") if hasattr(err, "add_note") else None
        raise


def fail_deep(depth):
    if depth == 0:
        raise KeyError("bottom of the stack")
    return fail_deep(depth - 1)


def raise_local_type():
    class OnlyInTheTwin(Exception):
        pass

    raise OnlyInTheTwin("local type")


def raise_local_subclass(base_name, *args, note=None):
    """Raise an exception of a class local to this function (no peer finds
    it by its name) that derives from the builtin type ``base_name``."""
    import builtins

    class LocalError(getattr(builtins, base_name)):
        pass

    err = LocalError(*args)
    if note is not None:
        err.__notes__ = [note]  # (what add_note does, on any version)
    raise err


def raise_local_os_error(base_name, errno_name, *args):
    """``raise_local_subclass`` of an OSError type, its errno named (a
    sandboxed guest numbers the errors its own way) and ``args`` after it."""
    import errno

    raise_local_subclass(base_name, getattr(errno, errno_name), *args)


def os_error_caught(base_name, func, *args):
    """Call ``func``: what ``except <base_name>`` caught of it (an OSError):
    its type's name, whether it is a RemoteError, its errno's name, its
    strerror, file names and str."""
    import builtins
    import errno

    from cpy2py import RemoteError

    try:
        func(*args)
    except getattr(builtins, base_name) as err:
        return [
            type(err).__name__,
            isinstance(err, RemoteError),
            errno.errorcode.get(err.errno),
            err.strerror,
            err.filename,
            err.filename2,
            str(err),
        ]
    return None


def raise_of_a_module_only_here(message):
    """Raise an exception whose class is a module-level one of a module
    this interpreter has and its peers do not."""
    module = sys.modules.get("only_in_this_twin")
    if module is None:
        module = type(sys)("only_in_this_twin")
        exec("class MissingThere(KeyError):\n    pass\n", vars(module))
        sys.modules["only_in_this_twin"] = module
    raise module.MissingThere(message)


def caught_as(base_name, func, *args):
    """Call ``func``: the type of what ``except <base_name>`` caught of it."""
    import builtins

    try:
        func(*args)
    except getattr(builtins, base_name) as err:
        return type(err).__name__, str(err)
    return None


def talk(text):
    print(text, flush=True)
    os.write(1, b"raw fd 1 output\n")
    os.write(2, b"raw fd 2 output\n")
    sys.stderr.write("stderr text\n")
    return "talked"


def shout(lines):
    """Many lines on stderr, written just before the call returns."""
    for n in range(lines):
        os.write(2, b"line %d of what the twin said on its way out\n" % n)
    return lines


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def exit_now(status):
    os._exit(status)


def sys_path() -> list:
    return list(sys.path)


def unpicklable_result():
    return lambda: None


def echo_all(*args, **kwargs):
    return list(args), kwargs


def cyclic(kind):
    """A list or dict that holds itself."""
    value = [] if kind == "list" else {}
    if kind == "list":
        value.append(value)
    else:
        value["self"] = value
    return value


def identities(value):
    """Which parts of ``[a, b, {"k": c}]`` are the same object, seen here."""
    return [value[0] is value[1], value[2]["k"] is value[0]]


def proxy_held_twice(sample):
    """``sample.values`` holds one twin object twice: is it one object here,
    and does it answer?"""
    first, second = sample.values
    return first is second, first.increment(1)


def all_the_same(items):
    """Whether every item of ``items`` is one object, seen here."""
    return all(item is items[0] for item in items)


def repeated(size, count):
    """A list of ``count`` references to one str of ``size`` characters."""
    return ["x" * size] * count


def holds_itself(value):
    """Whether the list ``value`` holds itself at index 1, seen here."""
    return value[1][0] is value


def doubled(levels):
    """A list of two references to one list, ``levels`` deep: 2**levels
    leaves written out as a tree."""
    value: list = []
    for _ in range(levels):
        value = [value, value]
    return value


def debugged(x):
    """A function that stops in the debugger."""
    y = x * 2
    breakpoint()
    return y


def read_stdin():
    import sys

    return sys.stdin.read()


def read_stdin_line_bytes():
    """A line of stdin as bytes, and what asking for its descriptor raises."""
    import sys

    try:
        sys.stdin.fileno()
    except Exception as err:
        failed = type(err).__name__
    return sys.stdin.buffer.readline(), failed


def call(func, *args, **kwargs):
    return func(*args, **kwargs)


def run_in(twin_id, func, *args, **kwargs):
    """Run ``func`` in the twin ``twin_id`` (started on first use)."""
    from cpy2py.master import connection_for
    from cpy2py.protocol.messages import OP_EXECUTE

    return connection_for(twin_id).request(OP_EXECUTE, func, list(args), kwargs)


def pinned_function(module: str, name: str) -> dict:
    """How a twinfunction of ``module`` looks in the interpreter running this."""
    import importlib

    func = getattr(importlib.import_module(module), name)
    return {"wrapped": hasattr(func, "__wrapped__"), "twin_id": func.__twin_id__, "name": func.__qualname__}


def own_function(module: str, name: str):
    """A twinfunction of ``module``, sent back from the interpreter running this."""
    import importlib

    return getattr(importlib.import_module(module), name)


def environ_get(names):
    return {name: os.environ.get(name) for name in names}


def link_pipe_sizes():
    """The capacity of the pipes of this twin's link (F_GETPIPE_SZ)."""
    import fcntl

    from cpy2py.kernel import links

    transport = links.all_connections()[0].transport
    return [fcntl.fcntl(fd, 1032) for fd in (transport.read_fd, transport.write_fd)]


def builtin_iterators_and_callables():
    """Values that PyPy pickles with reconstructors of its own (CPython
    cannot unpickle them): iterators of builtins, a bound method of a
    builtin object, operator's callables."""
    import operator

    numbers = [5, 6, 7]
    return {
        "range": iter(range(3)),
        "keys": iter({"a": 1, "b": 2}),
        "items": iter({"a": 1}.items()),
        "append": numbers.append,
        "itemgetter": operator.itemgetter(1),
        "attrgetter": operator.attrgetter("real"),
        "methodcaller": operator.methodcaller("upper"),
        "numbers": numbers,
        "a key named like the module": {"_pickle_support": "_operator"},
    }


def cpu_seconds():
    """The CPU time this process (all its threads) has used."""
    return time.process_time()
