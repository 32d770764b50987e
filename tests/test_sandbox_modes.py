"""The sandbox's suites again, with every sandboxed twin in another mode.

Issue 14: the limits, the policy of docs/security.md and the sandbox tests
hold in every mode a guest can run in, not only in a guest started from the
build's own snapshot that lives across calls. Each suite runs in a pytest
of its own (tests/conftest.py, ``GUEST_MODE_ENV``), where every sandboxed
twin the suite makes is changed as it is made:

- "fresh": ``fresh=True``, a guest per top-level call. Tests that tell a
  guest that goes on from a new one keep theirs with a proxy of a module
  in it (which keeps a fresh twin's guest too); the one that cannot (it
  runs an object of one call's guest in a later top-level call) is marked
  ``lasting_guest`` and skipped there, saying why.
- "snapshot": ``preload=[a standard library module]`` for a twin without a
  preload of its own, so its guests start from a snapshot taken for its
  configuration after that import, not from the build's.

The twins of a test that runs its master in a child process of its own (a
script run with ``subprocess``) are not changed: that child does not load
this directory's conftest.
"""

from __future__ import annotations

import json

import pytest
from conftest import GUEST_MODE_ENV
from support import run_suite, sandbox_unavailable

SUITES = [
    "test_sandbox_policy.py",
    "test_sandbox_hostile.py",
    "test_sandbox_hostile_kernel.py",
    "test_sandbox_hostile_master.py",
    "test_sandbox_limits.py",
    "test_sandbox_packages.py",
    "test_wasi.py",
]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("mode", ["fresh", "snapshot"])
def test_the_suite_passes_in_this_mode(mode, suite, tmp_path):
    reason = sandbox_unavailable()
    if reason:
        pytest.skip(reason)
    report_file = str(tmp_path / "switched.json")
    run_suite(suite, {GUEST_MODE_ENV: json.dumps({"mode": mode, "report": report_file})})
    with open(report_file) as report:
        done = json.load(report)
    assert done["switched"], f"no sandboxed twin of {suite} was set to the {mode} mode"
    if mode == "snapshot":
        assert done["from_snapshots"], f"no guest of {suite} started from its snapshot"
