"""Helpers for the tests (imported by test modules and conftest)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def require_interpreter(kind: str) -> None:
    """Skip, with the reason in the report, when ``kind`` is not installed."""
    if shutil.which(kind) is None:
        hint = " (Debian: apt-get install pypy3; `just setup` does it as root)" if kind == "pypy3" else ""
        pytest.skip(f"{kind} is not installed on this machine{hint}")


def run_master(
    script: str, *flags: str, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``script`` as the main program of a fresh master interpreter."""
    full_env = dict(os.environ, PYTHONPATH=TESTS_DIR, **(env or {}))
    return subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def process_exists(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
