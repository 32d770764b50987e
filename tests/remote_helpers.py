"""Functions the remote-twin tests run in a twin on another host."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

from cpy2py import kernel_state


def where_am_i() -> dict:
    def target(fd: int) -> str:
        return os.path.realpath(f"/proc/self/fd/{fd}")

    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "twin_id": kernel_state.TWIN_ID,
        "stdin": target(0),
        "stdout": target(1),
        "stderr": target(2),
    }


def process_name(pid: int) -> str:
    """The name of process ``pid`` ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def import_and_describe(names: list) -> dict:
    found: dict = {"loaders": {}}
    for name in names:
        module = importlib.import_module(name)
        found["loaders"][name] = type(module.__spec__.loader).__name__
        found[name] = {key: value for key, value in vars(module).items() if key.isupper()}
    return found


def call_in(module: str, function: str, *args):
    return getattr(importlib.import_module(module), function)(*args)


def path_entries() -> list:
    return list(sys.path)


def socket_count() -> int:
    """How many of this process's descriptors are sockets."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # (the listing's own descriptor, closed by now)
            pass
    return count


def codec_in_use() -> dict:
    """Which codec this twin runs, and from where its compiled host came."""
    from cpy2py.protocol import codec

    host = sys.modules.get("cpy2py._host")
    return {
        "implementation": sys.implementation.name,
        "codec": codec.IMPLEMENTATION,
        "host": getattr(host, "__file__", None),
        "left in the environment": os.environ.get("__CPY2PY_HOST_EXTENSION__"),
    }


def assert_the_masters_compiled_host_if_cpython(twin) -> None:
    """(In the master) a CPython ``twin`` runs the compiled codec of the
    master's own ``cpy2py._host``, its path not left to its children; a PyPy
    twin the pure-Python codec."""
    import cpy2py._host

    seen = twin.execute(codec_in_use)
    if seen["implementation"] == "pypy":
        assert seen["codec"] == "python" and seen["host"] is None, seen
    else:
        assert seen == {
            "implementation": "cpython",
            "codec": "compiled",
            "host": cpy2py._host.__file__,
            "left in the environment": None,
        }


@contextlib.contextmanager
def master_log(caplog):
    """(In the master) what cpy2py logs at INFO about remote twins (the
    ``__cpy2py__.ssh`` logger, which does not propagate by default), into
    ``caplog``."""
    import logging

    caplog.set_level(logging.INFO, logger="__cpy2py__.ssh")
    tree = logging.getLogger("__cpy2py__")
    tree.propagate = True
    try:
        yield
    finally:
        tree.propagate = False
