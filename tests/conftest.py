"""Shared fixtures: twin kinds, and twins started once per module and kind.

Twin kinds are parametrized; a kind whose interpreter is missing is skipped
with the reason in the test report, never passed silently.
"""

from __future__ import annotations

import sys

import pytest
from support import require_interpreter

# the native twin kinds every semantic test runs against
NATIVE_KINDS = ["python3", "pypy3"]


@pytest.fixture(params=NATIVE_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    require_interpreter(request.param)
    return request.param


@pytest.fixture(params=NATIVE_KINDS, scope="module")
def twin(request: pytest.FixtureRequest):
    """A running twin of each kind, shared by the tests of one module."""
    require_interpreter(request.param)
    from cpy2py import TwinMaster

    master = TwinMaster(request.param)
    master.start()
    yield master
    master.stop()


@pytest.fixture
def python_exe() -> str:
    return sys.executable


@pytest.fixture(autouse=True, scope="module")
def _stop_twins_after_module():
    """Twins started on demand by one test module do not leak into the next."""
    yield
    from cpy2py import master

    for twin_id in list(master._running):  # dead ones too: they would block auto-start
        master.TwinMaster(twinterpreter_id=twin_id).stop()


#: set by tests/test_ssh_suites.py: run this session's native twins on
#: another host over SSH (JSON: {"host": ..., "options": [...]}), the suites'
#: "ssh" twin kind
SSH_SUITE_ENV = "CPY2PY_TEST_SSH_TWINS"


def _suite_settings(variable: str):
    """The JSON settings a rerun of the suites was given in ``variable``, or None."""
    import json
    import os

    spec = os.environ.get(variable)
    return json.loads(spec) if spec else None


@pytest.fixture(autouse=True, scope="session")
def _native_twins_over_ssh():
    settings = _suite_settings(SSH_SUITE_ENV)
    if settings is None:
        yield
        return

    def over_ssh(twin):
        twin.host = settings["host"]
        twin.ssh_options = list(settings["options"])

    import cpy2py.ssh

    # as on a host without the master's files: its CPython twins run the
    # pure-Python codec (on localhost they would find the master's build)
    original_build = cpy2py.ssh.host_build
    cpy2py.ssh.host_build = lambda: "the build of no host"
    undo = _set_up_native_twins(over_ssh)
    try:
        yield
    finally:
        undo()
        cpy2py.ssh.host_build = original_build


#: set by tests/test_interpreters.py: this session's "python3" twins run
#: another CPython (JSON: {"executable": its path, "report": a file that gets
#: the executables the twins were started with})
PYTHON3_SUITE_ENV = "CPY2PY_TEST_PYTHON3"


@pytest.fixture(autouse=True, scope="session")
def _python3_twins_on_another_cpython():
    import json

    settings = _suite_settings(PYTHON3_SUITE_ENV)
    if settings is None:
        yield
        return
    started = []

    def on_another_cpython(twin):
        if twin.executable == "python3":
            twin.executable = settings["executable"]
            started.append(twin.executable)

    undo = _set_up_native_twins(on_another_cpython)
    try:
        yield
    finally:
        undo()
        with open(settings["report"], "w") as report:
            json.dump(started, report)


def _set_up_native_twins(configure, sandboxes: bool = False, native: bool = True):
    """Every native twin made in this session (not already remote) is set up
    by ``configure(twin)`` (the suites' remote kinds), unless not ``native``;
    with ``sandboxes``, every sandboxed one too that is the user's (not a
    fresh twin's own guest, not the master's own bytecode compiler); returns
    the undo."""
    from cpy2py import master

    original_init = master.TwinMaster.__init__

    def init(self, executable=None, twinterpreter_id=None, *args, **kwargs):
        original_init(self, executable, twinterpreter_id, *args, **kwargs)
        if self.host is not None or self.placement is not None:
            return
        if not master.is_sandboxed(self.executable):
            if native:
                configure(self)
        elif (
            sandboxes
            and "#" not in self.twinterpreter_id  # (a fresh twin's own guest: "<id>#<n>")
            and not getattr(self, "compiles_bytecode", False)
        ):
            configure(self)

    master.TwinMaster.__init__ = init
    return lambda: setattr(master.TwinMaster, "__init__", original_init)


#: set by tests/test_ray.py: place this session's native twins on a Ray
#: cluster (JSON: {"address": ..., "resources": {...}, "report": file,
#: "sandboxes": its sandboxed twins too}), the suites' "ray" kind; the file
#: gets the node ids the twins ran on
RAY_SUITE_ENV = "CPY2PY_TEST_RAY_TWINS"


@pytest.fixture(autouse=True, scope="session")
def _native_twins_on_ray():
    import json

    settings = _suite_settings(RAY_SUITE_ENV)
    if settings is None:
        yield
        return
    import cpy2py.ray

    def on_ray(twin):
        if twin.fresh:  # (a fresh twin cannot be placed)
            return
        resources, address = settings["resources"], settings["address"]
        twin.placement = cpy2py.ray.Placement(resources=resources, num_cpus=0, address=address)

    original_start = cpy2py.ray.start
    placed = []

    def start(twin, *args, **kwargs):
        handle = original_start(twin, *args, **kwargs)
        placed.append(handle.node_id)
        return handle

    undo = _set_up_native_twins(on_ray, sandboxes=bool(settings.get("sandboxes")))
    cpy2py.ray.start = start
    try:
        yield
    finally:
        undo()
        cpy2py.ray.start = original_start
        with open(settings["report"], "w") as report:  # the nodes the twins ran on
            json.dump(placed, report)


#: set by tests/test_sandbox_modes.py: this session's sandboxed twins run in
#: another mode (JSON: {"mode": "fresh" or "snapshot", "report": a file that
#: gets {"switched": the ids of the twins set so, "from_snapshots": those
#: whose guests started from the mode's snapshot}): "fresh", a guest per
#: top-level call; "snapshot", guests started from a snapshot taken after a
#: preload
GUEST_MODE_ENV = "CPY2PY_TEST_GUEST_MODE"

#: what the "snapshot" mode preloads into every sandboxed twin that has no
#: preload of its own (a standard library module the suites do not use)
SNAPSHOT_MODE_PRELOAD = "colorsys"


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("lasting_guest")
    if marker is not None and guest_mode() == "fresh":
        pytest.skip(
            f"fresh guests: a fresh twin runs each call in a new guest, and this test {marker.args[0]}"
        )


def guest_mode():
    """The mode this session's sandboxed twins run in: None (as made), "fresh" or "snapshot"."""
    settings = _suite_settings(GUEST_MODE_ENV)
    return settings["mode"] if settings else None


@pytest.fixture(autouse=True, scope="session")
def _sandboxed_twins_in_another_mode():
    import json

    settings = _suite_settings(GUEST_MODE_ENV)
    if settings is None:
        yield
        return
    from cpy2py import snapshots

    switched, from_snapshots = [], []

    def in_mode(twin):
        if settings["mode"] == "fresh" and not twin.fresh:
            twin.fresh = True
            switched.append(twin.twinterpreter_id)
        elif settings["mode"] == "snapshot" and not twin.preload:
            twin.preload = [SNAPSHOT_MODE_PRELOAD]
            switched.append(twin.twinterpreter_id)

    original_snapshot_for = snapshots.snapshot_for

    def snapshot_for(master, start):
        # (a snapshot that cannot be made leaves its guests importing the
        # preload themselves: the run would pass without the mode)
        component = original_snapshot_for(master, start)
        if component is not None and master.preload == [SNAPSHOT_MODE_PRELOAD]:
            from_snapshots.append(master.twinterpreter_id)
        return component

    undo = _set_up_native_twins(in_mode, sandboxes=True, native=False)
    snapshots.snapshot_for = snapshot_for
    try:
        yield
    finally:
        undo()
        snapshots.snapshot_for = original_snapshot_for
        with open(settings["report"], "w") as report:
            json.dump({"switched": switched, "from_snapshots": from_snapshots}, report)
