"""The object and function suites again, with every native twin on another
host: an SSH twin on localhost (the "ssh" twin kind), through a real sshd
these tests start (tests/ssh_server.py)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import SSH_SUITE_ENV
from ssh_server import sshd_unavailable, start_sshd
from support import run_suite

SUITES = ["test_objects.py", "test_functions.py"]


@pytest.fixture(scope="module")
def sshd():
    reason = sshd_unavailable()
    if reason:
        pytest.skip(f"no sshd for the remote-twin suites: {reason}")
    server = start_sshd()
    yield server
    server.stop()


@pytest.mark.parametrize("suite", SUITES)
def test_suite_passes_with_twins_over_ssh(sshd, suite):
    env = {SSH_SUITE_ENV: json.dumps({"host": sshd.host, "options": sshd.options})}
    run_suite(suite, env)
    # the twins did run behind sshd: the server saw their logins
    with open(os.path.join(sshd.directory, "sshd.log")) as log:
        assert log.read().count("Accepted publickey") >= 2  # python3 and pypy3 twins at least
