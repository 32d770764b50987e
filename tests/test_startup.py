"""What a twin imports before its first call (issue 10: a twin starts close to
its bare interpreter). Only what the first call needs is loaded; the rest
comes on first use. Benchmarks measure the time (benches/, "Startup"); these
tests check which modules are there, never how long anything took."""

from __future__ import annotations

import itertools
import shutil
import subprocess

import pytest
import startup_probe
from cpy2py import TwinMaster
from support import run_master

_ids = itertools.count()

#: never imported by a native twin before a first call that does not need
#: them: the master's machinery, logging (loaded when the application loads
#: it or CPY2PY_DEBUG is set), the slow stdlib modules that only errors,
#: pickles, twin classes or the master's script need
NOT_AT_START = [
    "cpy2py.master",
    "logging",
    "inspect",
    "importlib.util",
    "importlib.abc",
    "string",
    "shutil",
    "sysconfig",
    "platform",
    "typing",
    "threading",
    "pickle",
    "signal",
    "collections",
    # the kernel's own needs met without them: the proxy table (weakref) with
    # the first proxy, modules imported with __import__ (importlib, warnings),
    # _struct for struct, FunctionType for types
    "weakref",
    "importlib",
    "warnings",
    "types",
    "struct",
]
#: CPython only (PyPy 3.9 loads some of these by itself as soon as anything
#: imports threading)
NOT_AT_START_CPYTHON = ["traceback", "linecache", "tokenize"]


def bare_modules(kind: str) -> set:
    """What the interpreter loads by itself (site, .pth files of its environment)."""
    code = "import sys; print(' '.join(sys.modules))"
    result = subprocess.run([shutil.which(kind), "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def first_call_modules(kind: str) -> list:
    with TwinMaster(kind, twinterpreter_id=f"{kind}-startup-{next(_ids)}") as master:
        return master.execute(startup_probe.loaded_modules)


def test_a_twin_loads_only_what_its_first_call_needs(kind):
    loaded = set(first_call_modules(kind)) - bare_modules(kind)
    assert "cpy2py.kernel.connection" in loaded and "startup_probe" in loaded  # the probe ran in a twin
    unexpected = [name for name in NOT_AT_START if name in loaded]
    if kind == "python3":
        unexpected += [name for name in NOT_AT_START_CPYTHON if name in loaded]
        # the compiled codec is used: the pure-Python one is not even imported
        unexpected += [name for name in ["cpy2py.protocol.codec_py"] if name in loaded]
    assert not unexpected, f"a fresh {kind} twin imported {unexpected} before its first call"


def test_what_a_twin_did_not_import_still_works_there(kind):
    with TwinMaster(kind, twinterpreter_id=f"{kind}-startup-{next(_ids)}") as master:
        assert "cpy2py.master" not in master.execute(startup_probe.loaded_modules)
        assert master.execute(startup_probe.twin_master_name) == "TwinMaster"
        # the master's machinery, loaded in the twin on first use, asks the master
        assert master.execute(startup_probe.twin_sees_itself_alive, master.twinterpreter_id) is True


def test_a_pypy_twin_hints_its_jit_after_a_few_hundred_requests_and_only_then(kind):
    """A PyPy twin marks the kernel's per-request functions for its JIT once
    it has served a few hundred requests (so that it reaches its steady
    speed sooner), never at its start, where compiling would slow a twin
    that serves a few calls only; a CPython twin has nothing to mark."""
    with TwinMaster(kind, twinterpreter_id=f"{kind}-startup-{next(_ids)}") as master:
        at_start = master.execute(startup_probe.jit_hints)
        for _ in range(at_start[0] + 50):
            assert master.execute(abs, -2) == 2
        later = master.execute(startup_probe.jit_hints)
        assert master.execute(abs, -3) == 3  # (and it goes on serving)
    if kind == "pypy3":
        assert at_start == (300, False)
        assert later == (0, True)
    else:
        assert at_start == later == (0, False)


def test_the_master_does_not_import_logging_for_cpy2py():
    """Logs are built only when someone can receive them; once the
    application loads logging and configures the ``__cpy2py__`` tree,
    records arrive, naming the caller's function."""
    result = run_master(
        """
        import sys
        import cpy2py
        from cpy2py import _logging
        from cpy2py.protocol import codec

        assert "logging" not in sys.modules, "import cpy2py imported logging"
        log = _logging.get_logger("probe")
        log.info("dropped: nobody can listen yet")
        log.exception("dropped as well")
        assert "logging" not in sys.modules, "a record was built without a listener"

        import logging

        records = []

        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record)

        tree = logging.getLogger("__cpy2py__")
        tree.addHandler(Keep())
        tree.setLevel(logging.INFO)

        def caller():
            log.info("seen %d", 1)
            log.info("seen %d", 2)
            log.debug("below the level")

        caller()
        assert [r.getMessage() for r in records] == ["seen 1", "seen 2"], records
        assert {r.funcName for r in records} == {"caller"}, [r.funcName for r in records]
        assert records[0].name == "__cpy2py__.probe"
        assert log.isEnabledFor(logging.INFO) and not log.isEnabledFor(logging.DEBUG)
        assert tree.propagate, "the application's own logger settings were overridden"
        assert codec.sandbox_budget(10) > 10 and codec.codec_py.sandbox_budget is codec.sandbox_budget
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_cpy2py_logger_tree_is_silent_and_apart_by_default():
    """Loaded before or after cpy2py, logging keeps cpy2py's records out of
    the application's root handlers unless CPY2PY_DEBUG is set."""
    for order in ("import logging, cpy2py", "import cpy2py, logging"):
        result = run_master(
            f"""
            {order}
            from cpy2py import _logging

            logging.basicConfig(level=logging.DEBUG)
            _logging.get_logger("probe").warning("must not reach the root handler")
            tree = logging.getLogger("__cpy2py__")
            assert tree.propagate is False and tree.handlers, (tree.propagate, tree.handlers)
            print("ok")
            """,
            env={"CPY2PY_DEBUG": ""},
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "ok"
        assert "must not reach" not in result.stderr


@pytest.mark.parametrize("level", ["1", "INFO"])
def test_cpy2py_debug_still_logs_from_the_start(level):
    result = run_master(
        """
        import cpy2py
        from cpy2py import _logging

        _logging.get_logger("probe").info("logged at start")
        """,
        env={"CPY2PY_DEBUG": level},
    )
    assert result.returncode == 0, result.stderr
    assert "__cpy2py__.probe INFO: logged at start" in result.stderr
