"""twinfunction, recursion across interpreters, auto-start, group state, __main__."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading

import pytest
import twin_functions as tf
from cpy2py import TwinMaster, kernel_state
from cpy2py.kernel.connection import _too_deep
from support import SANDBOX_KIND, TESTS_DIR, require_interpreter, run_master, start_twin


def test_runs_in_its_twin():
    require_interpreter("pypy3")
    result = tf.in_pypy(4, scale=0.5)
    assert result["implementation"] == "pypy" and result["pid"] != os.getpid()
    assert result["result"] == 2.0


def test_runs_natively_where_it_is_native():
    assert tf.in_master(1) == (os.getpid(), 1)


def test_wrapper_keeps_the_functions_metadata():
    wrapped = tf.in_pypy.__wrapped__
    assert tf.in_pypy.__name__ == "in_pypy"
    assert tf.in_pypy.__qualname__ == "in_pypy"
    assert tf.in_pypy.__doc__ == "Runs in PyPy."
    assert tf.in_pypy.__module__ == "twin_functions"
    assert tf.in_pypy.__defaults__ == (3,)
    assert tf.in_pypy.__kwdefaults__ == {"scale": 1.0}
    assert tf.in_pypy.__annotations__ == wrapped.__annotations__
    assert inspect.signature(tf.in_pypy) == inspect.signature(wrapped)
    assert tf.in_pypy.__twin_id__ == "pypy3"


def test_twinfunctions_can_be_passed_around():
    require_interpreter("pypy3")
    # the pypy3 twin is handed a function pinned to python3, and calls it
    pid, value = tf.apply(tf.in_python, "x")
    assert value == "x" and pid != os.getpid()
    with TwinMaster("pypy3") as pypy:
        pid_via_pypy, value = pypy.execute(tf.apply, tf.in_python, "y")
    assert value == "y" and pid_via_pypy == pid


def test_bad_decorator_use_is_explained():
    with pytest.raises(TypeError, match=r"@twinfunction\('pypy3'\)"):

        @tf.twinfunction
        def oops():
            pass

    with pytest.raises(TypeError, match=r"not a _lru_cache_wrapper: put @twinfunction\('pypy3'\) below"):

        @tf.twinfunction("pypy3")
        @functools.lru_cache
        def cached(n):
            return n


def test_classes_nested_in_a_twin_class_are_found_by_name(tmp_path, kind):
    """``Outer.Inner`` of a twin class pinned elsewhere: reading it asked the
    twin, whose answer (the class, by that name) asked again, forever."""
    script = tmp_path / "nested.py"
    script.write_text(
        "import sys\n"
        "from cpy2py import TwinObject\n"
        "class Outer(TwinObject):\n"
        f"    __twin_id__ = {kind!r}\n"
        "    class Meta:\n"
        "        ordering = 'name'\n"
        "    class Inner(TwinObject):\n"
        f"        __twin_id__ = {kind!r}\n"
        "        def where(self):\n"
        "            return sys.implementation.name\n"
        "    def make_inner(self):\n"
        "        return Outer.Inner()\n"
        "if __name__ == '__main__':\n"
        "    print('META', Outer.Meta.__qualname__, Outer.Meta.ordering)\n"
        "    print('INNER', Outer.Inner().where(), Outer().make_inner().where())\n"
    )
    result = run_script(script)
    assert result.returncode == 0, result.stderr[-3000:]
    implementation = "pypy" if kind == "pypy3" else "cpython"
    assert "META Outer.Meta name" in result.stdout
    assert f"INNER {implementation} {implementation}" in result.stdout


def test_a_twinfunction_wrapped_by_another_decorator_says_to_put_it_outermost(tmp_path):
    script = tmp_path / "wrapped.py"
    script.write_text(
        "import functools\n"
        "from cpy2py import twinfunction\n"
        "def logged(func):\n"
        "    @functools.wraps(func)\n"
        "    def wrapper(*args):\n"
        "        return func(*args)\n"
        "    return wrapper\n"
        "@logged\n"
        "@twinfunction('python3')\n"
        "def crunch(n):\n"
        "    return n\n"
        "if __name__ == '__main__':\n"
        "    print(crunch(2))\n"
    )
    result = run_script(script)
    assert result.returncode != 0
    assert "make @twinfunction the outermost decorator" in result.stderr, result.stderr


def test_executing_the_plain_function_of_a_twinfunction_says_to_call_the_twinfunction():
    """``execute(func.__wrapped__)`` in another twin: the function's name
    finds the twinfunction there, not it; the error says so (it said the
    function was defined in the main block only)."""
    twin = start_twin("python3", "plain-of-a-twinfunction")
    try:
        with pytest.raises(TypeError) as info:
            twin.execute(tf.in_pypy.__wrapped__)
        message = str(info.value)
        assert "twin_functions.in_pypy, is the twinfunction pinned to 'pypy3' that wraps it" in message
        assert "Call that instead" in message and "main block" not in message
    finally:
        twin.stop()


def test_recursion_across_interpreters_depth_200():
    path = tf.ping(200)
    assert len(path) == 201
    assert path[0] == "python3" and path[1] == kernel_state.MASTER_ID and path[-1] == "python3"


def test_exceptions_propagate_through_every_level():
    with pytest.raises(LookupError, match="bottom reached") as info:
        tf.ping(41, fail_at_bottom=True)
    # the remote tracebacks nest: every level's frames are there
    text = "".join(__import__("traceback").format_exception(info.type, info.value, info.tb))
    assert text.count("in ping") >= 10 and text.count("in pong") >= 10


def test_recursion_with_pypy():
    require_interpreter("pypy3")
    path = tf.pypy_ping(100)
    assert path[:2] == ["pypy3", "master"] and len(path) == 101


def test_recursion_past_the_limit_fails_cleanly_and_the_twin_goes_on():
    """Too deep for the interpreters' recursion limits: RecursionError reaches
    the caller (no lost reply, no hang), and the twin keeps working."""
    with pytest.raises(RecursionError):
        tf.ping(3000)
    assert tf.ping(2) == ["python3", kernel_state.MASTER_ID, "python3"]


@pytest.fixture(scope="module")
def sandbox():
    master = start_twin(SANDBOX_KIND)
    yield master
    master.stop()


def handed_pong():
    """The master's half of the guest ping-pong: a closure, so the guest gets
    it as a callable it was handed (it cannot import it by name)."""

    def wasi_pong(depth: int, fail_at_bottom: bool = False):
        if depth == 0:
            if fail_at_bottom:
                raise LookupError("bottom reached")
            return [kernel_state.TWIN_ID]
        return [kernel_state.TWIN_ID] + tf.wasi_ping(depth - 1, wasi_pong, fail_at_bottom)

    return wasi_pong


def test_runs_in_the_sandbox(sandbox):
    result = tf.in_wasi(7)
    assert result == {"platform": "wasi", "implementation": "cpython", "value": 7}
    assert tf.in_wasi.__name__ == "in_wasi" and tf.in_wasi.__doc__ == "Runs in the sandboxed guest."
    assert tf.in_wasi.__twin_id__ == SANDBOX_KIND


def test_recursion_through_the_sandbox_depth_200(sandbox):
    path = tf.wasi_ping(200, handed_pong())
    assert len(path) == 201
    assert path[:2] == [SANDBOX_KIND, kernel_state.MASTER_ID] and path[-1] == SANDBOX_KIND


def test_exceptions_propagate_through_every_level_of_the_sandbox(sandbox, caplog):
    """Type and message go through every level; a guest sees no master
    traceback (the master logs its own), the master sees the guest's."""
    import logging

    caplog.set_level(logging.INFO, logger="__cpy2py__.sandbox")
    logging.getLogger("__cpy2py__").propagate = True
    try:
        with pytest.raises(LookupError, match="bottom reached") as info:
            tf.wasi_ping(41, handed_pong(), True)
    finally:
        logging.getLogger("__cpy2py__").propagate = False
    text = "".join(__import__("traceback").format_exception(info.type, info.value, info.tb))
    assert "in wasi_ping" in text  # the guest's frames, as text
    assert "test_functions.py" not in str(info.value.__cause__)  # no master path went through the guest
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert logged.count("in wasi_pong") >= 10  # the master's own traceback, in its log


def test_recursion_past_the_limit_in_the_sandbox_fails_cleanly(sandbox):
    with pytest.raises(RecursionError):
        tf.wasi_ping(3000, handed_pong())
    assert sandbox.is_alive  # the guest was not discarded: nothing went wrong in it
    assert tf.wasi_ping(2, handed_pong()) == [SANDBOX_KIND, kernel_state.MASTER_ID, SANDBOX_KIND]


def test_a_guest_that_calls_the_master_from_deep_recursion_gets_recursion_error_and_goes_on(sandbox):
    """Whatever depth the guest's own code has reached when it calls the
    master, the call answers, or fails with cpy2py's RecursionError before
    the kernel starts on it (not somewhere inside the kernel, where it would
    run out of frames half-way through the call); the guest goes on serving."""
    outcomes = {tf.wasi_call_from_depth(headroom, lambda: "answered") for headroom in range(120, 15, -1)}
    assert outcomes == {"answered", str(_too_deep())}
    assert sandbox.is_alive
    assert tf.wasi_ping(2, handed_pong()) == [SANDBOX_KIND, kernel_state.MASTER_ID, SANDBOX_KIND]


def test_recursion_from_many_threads_at_once():
    results = {}

    def run(i):
        results[i] = len(tf.ping(20 + i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {i: 21 + i for i in range(6)}


def test_twin_starts_on_first_use_and_noauto_forbids_it():
    result = run_master(
        """
        import twin_functions as tf
        from cpy2py import TwinMaster
        pid, _ = tf.in_python()
        print("auto-started", TwinMaster("python3").is_alive)
        """
    )
    assert "auto-started True" in result.stdout, result.stderr
    result = run_master(
        """
        import twin_functions as tf
        from cpy2py import TwinterpreterUnavailable
        try:
            tf.in_python()
        except TwinterpreterUnavailable as err:
            print("refused:", err)
        """,
        env={"CPY2PY_NOAUTO": "1"},
    )
    assert "refused:" in result.stdout and "start()" in result.stdout, result.stderr


def test_input_and_breakpoint_in_a_twin_read_what_the_user_types_to_the_master(kind):
    """A twin's sys.stdin is the master's: input(), a debugger stopped by
    breakpoint(), sys.stdin.buffer.readline() and sys.stdin.read() in a twin
    read the master's standard input, in order, and the prompts show on the
    master's stdout; sys.stdin.fileno() says there is no descriptor."""
    result = run_master(
        f"""
        import builtins
        import twin_helpers
        from cpy2py import TwinMaster
        twin = TwinMaster({kind!r})
        twin.start()
        print("line", repr(twin.execute(twin_helpers.read_stdin_line_bytes)))
        print("got", repr(twin.execute(builtins.input, "name? ")))
        print("result", twin.execute(twin_helpers.debugged, 21))
        print("rest", repr(twin.execute(twin_helpers.read_stdin)))
        try:
            twin.execute(builtins.input)
        except EOFError:
            print("then EOFError")
        twin.stop()
        """,
        env={"PYTHONBREAKPOINT": "pdb.set_trace"},
        stdin="bytes\nAda\np y + 1\nc\nthe rest\n",
    )
    assert result.returncode == 0, result.stderr
    assert "name? " in result.stdout and "got 'Ada'" in result.stdout
    assert "(Pdb) 43" in result.stdout and "result 42" in result.stdout
    assert "line (b'bytes\\n', 'UnsupportedOperation')" in result.stdout
    assert "rest 'the rest\\n'" in result.stdout and "then EOFError" in result.stdout


def test_failing_initializer_fails_start():
    result = run_master(
        """
        from cpy2py import TwinMaster, TWIN_GROUP_STATE, TwinStartError
        TWIN_GROUP_STATE.add_initializer(int, "not a number")
        try:
            TwinMaster("python3").start()
        except TwinStartError as err:
            print("start failed:", err)
        """
    )
    assert "start failed:" in result.stdout and "invalid literal" in result.stdout, result.stderr


MAIN_SCRIPT = """
import os, sys
from cpy2py import TwinMaster, TwinObject, twinfunction

print("MAIN MODULE LOADED in", os.getpid(), flush=True)

@twinfunction("python3")
def where():
    return os.getpid()

class Thing(TwinObject):
    __twin_id__ = "python3"
    def pid(self):
        return os.getpid()

def argv():
    return sys.argv

if __name__ == "__main__":
    print("MAIN BLOCK in", os.getpid(), flush=True)
    master = TwinMaster("python3", run_main=RUN_MAIN, restore_argv=True)
    master.start()
    assert Thing().pid() == where()  # in the master, and in a twin running this block
    print("twin argv", master.execute(argv), flush=True)
"""


def run_script(script, *args: str):
    """Runs ``script`` as the main program of a fresh master."""
    import subprocess

    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=TESTS_DIR),
        timeout=120,
    )


@pytest.mark.parametrize("run_main", [False, True])
def test_main_module_in_twins(tmp_path, run_main):
    script = tmp_path / "app.py"
    script.write_text(MAIN_SCRIPT.replace("RUN_MAIN", str(run_main)))
    result = run_script(script, "--flag")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # the master loads it once; the twin loads it (lazily) without the main block
    assert out.count("MAIN MODULE LOADED") == 2
    assert out.count("MAIN BLOCK") == (2 if run_main else 1)
    assert out.count(f"twin argv ['{script}', '--flag']") == (2 if run_main else 1)


MAIN_BLOCK_SCRIPT = """
import functools, os
from cpy2py import TwinMaster

def call(func, *args):
    return func(*args)

def call_method(obj, name, *args):
    return getattr(obj, name)(*args)

def pid_here():
    return os.getpid()

def handler():
    return "top level"

if __name__ == "__main__":
    seen = []

    def progress(n):  # uses the main block's state: it must run here
        seen.append(n)
        return os.getpid()

    class Recorder:
        def record(self, n):
            seen.append(n)
            return os.getpid()

    def handler():  # the twin has a function of this name, another one
        return "main block"

    twin = TwinMaster(KIND)
    twin.start()
    me = os.getpid()
    assert twin.execute(call, progress, 1) == me
    assert twin.execute(call_method, Recorder(), "record", 2) == me
    assert twin.execute(call, functools.partial(progress, 3)) == me
    assert isinstance(twin.execute(call, Recorder), Recorder)
    assert twin.execute(call, handler) == "main block"
    assert twin.execute(call, pid_here) != me  # defined for all: it runs in the twin
    assert seen == [1, 2, 3], seen
    try:  # execute runs its callable in the twin, which has none of this block
        twin.execute(progress, 4)
    except TypeError as err:
        assert "main block only" in str(err), err
    else:
        raise AssertionError("execute ran a function of the main block in the master")
    twin.stop()
    print("MAIN BLOCK DEFINITIONS OK", flush=True)
"""


def test_functions_and_classes_of_the_main_block_run_in_the_master(tmp_path, kind):
    """A callback or class defined under ``if __name__ == "__main__":`` exists
    in the master only (twins import the script without that block): a twin
    gets it as a proxy and calling it runs it in the master."""
    script = tmp_path / "app.py"
    script.write_text(MAIN_BLOCK_SCRIPT.replace("KIND", repr(kind)))
    result = run_script(script)
    assert result.returncode == 0, result.stderr
    assert "MAIN BLOCK DEFINITIONS OK" in result.stdout


MAIN_NAMES_SCRIPT = """
import threading
from cpy2py import TwinMaster, TwinObject, twinfunction

class Thing:  # not a twin class; it holds a lock: kept where it is made
    def __init__(self):
        self.lock = threading.Lock()

class Pinned(TwinObject):
    __twin_id__ = KIND

class AppError(ValueError):
    pass

@twinfunction(KIND)
def make_thing():
    return Thing()

@twinfunction(KIND)
def fail(local):
    if local:
        class Hidden(ValueError):  # no peer finds it by its name
            pass

        raise Hidden("hidden")
    raise AppError("app")

if __name__ == "__main__":
    twin = TwinMaster(KIND)
    twin.start()
    thing = make_thing()
    print("REPR", repr(thing))
    print("STR", str(thing))
    print("FORMAT", f"{thing}")
    print("TYPE", type(thing).__module__, type(thing).__qualname__)
    pinned = Pinned()
    print("PINNED", repr(pinned), str(pinned))
    for local in (False, True):
        try:
            fail(local)
        except ValueError as err:
            print("ERROR", type(err).__module__, err)
            print("CAUSE", err.__cause__.traceback_text.strip().splitlines()[-1])
    twin.stop()
"""


def test_the_objects_of_the_main_script_a_twin_shows_name_its_module_main(tmp_path, kind):
    """A twin loads the master's script as a module of its own name
    (``__cpy2py_main__``); what it shows of an object or exception of a
    class the script defines names ``__main__``, as the master would."""
    script = tmp_path / "app.py"
    script.write_text(MAIN_NAMES_SCRIPT.replace("KIND", repr(kind)))
    result = run_script(script)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "__cpy2py_main__" not in out, out
    for line in (
        "REPR <__main__.Thing object at 0x",
        "STR <__main__.Thing object at 0x",
        "FORMAT <__main__.Thing",
        "TYPE __main__ Thing",
    ):
        assert line in out, out
    assert "PINNED <__main__.Pinned object at 0x" in out, out
    assert "ERROR __main__ app" in out and "CAUSE AppError: app" in out, out
    assert "ERROR cpy2py.errors __main__.fail.<locals>.Hidden: hidden" in out, out
    assert "CAUSE fail.<locals>.Hidden: hidden" in out, out


def test_the_names_a_main_block_binds_are_found_in_its_source(tmp_path):
    from cpy2py.kernel import main_module

    script = tmp_path / "app.py"
    script.write_text(
        "import os\n"
        "def top(): pass\n"
        "try:\n"
        "    if '__main__' == __name__:\n"
        "        def in_try(): pass\n"
        "except ImportError:\n"
        "    pass\n"
        "if __name__ == '__main__':\n"
        "    import json as codec, xml.dom\n"
        "    class Local:\n"
        "        def method(self): inner = 1\n"
        "    for step in range(2):\n"
        "        handler = [x for x in range(step)]\n"
        "    with open(__file__) as source:\n"
        "        pass\n"
        "else:\n"
        "    def when_imported(): pass\n"
    )
    names = main_module._names_bound_in_main_block(str(script))
    assert names == {"in_try", "codec", "xml", "Local", "step", "handler", "source"}
    assert main_module._names_bound_in_main_block(None) == frozenset()
    (tmp_path / "broken.py").write_text("if __name__ == '__main__':\n    def f(:\n")
    assert main_module._names_bound_in_main_block(str(tmp_path / "broken.py")) == frozenset()


def test_a_main_script_a_twin_cannot_import_is_explained(tmp_path, kind):
    """A twin imports the master's script to find what is pinned to it; an
    import there that only the master can do (numpy in PyPy, say) fails
    every such function, and the error says why and what to do."""
    (tmp_path / "master_only_extension.py").write_text(
        "from cpy2py import kernel_state\n"
        "if not kernel_state.is_master():\n"
        "    raise ImportError('built for the master only')\n"
    )
    script = tmp_path / "app.py"
    script.write_text(
        "import master_only_extension\n"
        "from cpy2py import twinfunction\n"
        f"@twinfunction({kind!r})\n"
        "def pinned():\n"
        "    return 1\n"
        "if __name__ == '__main__':\n"
        "    pinned()\n"
    )
    result = run_script(script)
    assert result.returncode != 0
    assert (
        "could not import the master's main script: ImportError: built for the master only" in result.stderr
    )
    assert "move the imports only the master can do" in result.stderr


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_workers_a_pool_spawns_call_the_main_scripts_twinfunctions(tmp_path, kind, method):
    """A worker that multiprocessing starts by spawn or forkserver (the
    default on macOS and Windows, and on Linux from Python 3.14) imports the
    main script as ``__mp_main__``; its twinfunctions run in the worker's
    own twins (it is a master of its own)."""
    script = tmp_path / "pooled.py"
    script.write_text(
        "import multiprocessing, os, sys\n"
        "from cpy2py import twinfunction\n"
        f"@twinfunction({kind!r})\n"
        "def where(x):\n"
        "    return sys.implementation.name, os.getpid(), x\n"
        "def work(x):\n"
        "    name, pid, value = where(x)\n"
        "    return name, pid != os.getpid(), value\n"
        "if __name__ == '__main__':\n"
        f"    with multiprocessing.get_context({method!r}).Pool(1) as pool:\n"
        "        print('RESULTS', pool.map(work, range(3)))\n"
    )
    result = run_script(script)
    assert result.returncode == 0, result.stderr
    implementation = "pypy" if kind == "pypy3" else "cpython"
    expected = [(implementation, True, n) for n in range(3)]
    assert f"RESULTS {expected}" in result.stdout, result.stdout + result.stderr


def test_a_main_script_without_its_main_guard_is_explained(tmp_path, kind):
    """A script that does its work at its top level (no ``if __name__ ==
    "__main__":``) does it again in the twin that imports it, where using
    twins fails: the error says to put that work under the guard."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from cpy2py import TwinMaster, twinfunction\n"
        f"@twinfunction({kind!r})\n"
        "def pinned():\n"
        "    return 1\n"
        f"with TwinMaster({kind!r}):\n"
        "    print(pinned())\n"
    )
    result = run_script(script)
    assert result.returncode != 0
    assert "could not import the master's main script: TwinterpreterUnavailable" in result.stderr, (
        result.stderr
    )
    assert 'put that work under `if __name__ == "__main__":`' in result.stderr, result.stderr
