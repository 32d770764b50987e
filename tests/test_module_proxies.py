"""A module imported in a twin (``TwinMaster.import_module``): its functions
run there, each call one request (the module's class info names its
functions, so ``module.f(...)`` is looked up and called where the module
lives); its other attributes are fetched as before. Every twin kind."""

from __future__ import annotations

import gc
import os
import sys
import textwrap

import pytest
from cpy2py import TwinMaster
from cpy2py.kernel import links
from support import SANDBOX_KIND, code_on_sys_path, sandbox_unavailable

PLUGIN = '''
import os, sys

LIMIT = 5


def where():
    """This interpreter: its pid and implementation."""
    return [os.getpid(), sys.implementation.name]


def add(a, b=1):
    return a + b


def fail():
    raise KeyError("from the module")


def made_class():
    """A class made at run time, which no other interpreter can import."""
    class Made:
        def __init__(self, n):
            self.n = n

        def __repr__(self):
            return f"Made({self.n})"

        def __call__(self, k):
            return self.n + k

    return Made


def rebind():
    """Names change after the module was handed over: a function becomes a
    value, and a new function appears."""
    global add

    add = 42
    sys.modules[__name__].later = lambda: "added later"

'''

KINDS = ["python3", "pypy3", SANDBOX_KIND]


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    with code_on_sys_path(
        tmp_path_factory, "module_proxy_code", {"proxied_plugin.py": textwrap.dedent(PLUGIN)}
    ) as root:
        yield root
        assert "proxied_plugin" not in sys.modules, "the master imported the module"


@pytest.fixture(params=KINDS)
def twin(request, code_dir):
    kind = request.param
    if kind == SANDBOX_KIND and sandbox_unavailable():
        pytest.skip(sandbox_unavailable())
    if kind != SANDBOX_KIND and not _on_path(kind):
        pytest.skip(f"{kind} is not installed")
    name = f"module-proxy-{kind}"
    master = (
        TwinMaster(kind, twinterpreter_id=name, paths=[str(code_dir)])
        if kind == SANDBOX_KIND
        else TwinMaster(kind, twinterpreter_id=name)
    )
    master.start()
    yield master
    master.stop()


def _on_path(kind: str) -> bool:
    import shutil

    return shutil.which(kind) is not None


def test_a_modules_functions_run_in_its_twin_one_request_each(twin):
    plugin = twin.import_module("proxied_plugin")
    pid, implementation = plugin.where()
    assert pid != os.getpid() or twin.executable == SANDBOX_KIND  # (a guest runs in this process)
    expected = {"pypy3": "pypy"}.get(twin.executable, "cpython")
    assert implementation == expected
    assert plugin.add(2) == 3 and plugin.add(2, b=5) == 7
    connection = links.existing_connection(twin.twinterpreter_id)
    before = next(connection._ids)
    assert plugin.add(40, 2) == 42
    assert next(connection._ids) == before + 2, "one request for module.f(...)"
    assert plugin.LIMIT == 5  # not a function: fetched as before
    with pytest.raises(KeyError, match="from the module"):
        plugin.fail()


def test_executing_a_function_of_the_module_runs_it_there(twin):
    """``execute(plugin.f, ...)`` (as ``execute`` is used with any function)
    calls it where the module lives, as ``plugin.f(...)`` does: one request,
    sync or awaited (a sandbox refused it, as if it were not the guest's)."""
    import asyncio

    plugin = twin.import_module("proxied_plugin")
    connection = links.existing_connection(twin.twinterpreter_id)
    before = next(connection._ids)
    assert twin.execute(plugin.add, 40, b=2) == 42
    assert next(connection._ids) == before + 2, "one request"
    assert asyncio.run(twin.execute_async(plugin.add, 1)) == 2
    with pytest.raises(KeyError, match="from the module"):
        twin.execute(plugin.fail)


def test_names_that_change_after_the_module_was_handed_over(twin):
    plugin = twin.import_module("proxied_plugin")
    plugin.rebind()
    # a function added later is fetched, then called
    assert plugin.later() == "added later"
    # a function that became a value: calling it says what it is now
    with pytest.raises(TypeError, match="not callable"):
        plugin.add(1)
    del plugin  # (a proxy of the module that is still alive keeps its description;
    gc.collect()  # the failed call's traceback held one)
    assert twin.import_module("proxied_plugin").add == 42  # described anew: now a value


def test_a_class_made_in_the_twin_shows_and_calls_as_a_class(twin):
    """A class of the twin's comes as a proxy: repr and str show the class
    (its metaclass's ``__repr__``, not the unbound one of its instances),
    and calling it makes an instance there, although its instances define
    ``__repr__`` and ``__call__`` of their own."""
    made_class = twin.import_module("proxied_plugin").made_class()
    shown = "<class 'proxied_plugin.made_class.<locals>.Made'>"
    assert repr(made_class) == shown and str(made_class) == shown
    made = made_class(3)
    assert repr(made) == "Made(3)"
    assert made(4) == 7
