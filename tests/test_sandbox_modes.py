"""The sandbox's suites again, with every sandboxed twin in another mode.

Issue 14: the limits, the policy of docs/security.md and the sandbox tests
hold in every mode a guest can run in, not only in a guest started from the
build's own snapshot that lives across calls. Each suite runs in a pytest
of its own (tests/conftest.py, ``GUEST_MODE_ENV``), where every sandboxed
twin the suite makes is changed as it is made:

- "fresh": ``fresh=True``, a guest per top-level call. A test that needs one
  guest across calls (it marks the guest to tell it from a new one) is
  marked ``lasting_guest`` and skipped there, saying why.
- "snapshot": ``preload=[a standard library module]`` for a twin without a
  preload of its own, so its guests start from a snapshot taken for its
  configuration after that import, not from the build's.
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
    with open(report_file) as switched:
        assert json.load(switched), f"no sandboxed twin of {suite} was set to the {mode} mode"
