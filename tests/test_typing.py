"""The package is typed: ``mypy --strict`` passes on a user program
(tests/typing/user_program.py) that uses the public API as the README does,
and catches a misuse that only a kept signature can reveal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support import TESTS_DIR

PROGRAM = os.path.join(TESTS_DIR, "typing", "user_program.py")
TRANSPORTS = os.path.join(TESTS_DIR, "typing", "transports.py")


def _mypy(path: str, cwd: str, *flags: str) -> subprocess.CompletedProcess:
    try:
        import mypy  # noqa: F401
    except ImportError:
        pytest.skip("mypy is not installed (requirements-dev.txt lists it; run `just setup`)")
    # run from elsewhere than the repository, so cpy2py is found as installed
    # (its py.typed), not as a source tree next to the program
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--python-version",
            "3.11",
            *flags,
            path,
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_mypy_strict_passes_on_a_user_program(tmp_path) -> None:
    result = _mypy(PROGRAM, str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


def test_mypy_strict_catches_misuse_of_twin_functions_and_classes(tmp_path) -> None:
    misuse = tmp_path / "misuse.py"
    with open(PROGRAM) as program:
        source = program.read()
    misuse.write_text(
        source
        + "\n\ndef misuse() -> None:\n"
        + '    sum_series("many")\n'  # a twinfunction keeps its parameters
        + '    Simulation(size="big")\n'  # a TwinObject subclass keeps its __init__
        + '    Simulation(1).run(steps="all")\n'
    )
    result = _mypy(str(misuse), str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 3, result.stdout
    assert '"sum_series" has incompatible type "str"' in result.stdout
    assert '"Simulation" has incompatible type "str"' in result.stdout
    assert '"run" of "Simulation" has incompatible type "str"' in result.stdout


def test_every_transport_has_the_whole_declared_interface(tmp_path) -> None:
    """kernel/connection.py reads what a transport is (``Transport`` in
    protocol/transport.py) without checking for it: each of them declares
    all of it, the compiled NativeTwin through cpy2py/_host.pyi."""
    # (only that file's errors: the package's own typing is not strict)
    result = _mypy(TRANSPORTS, str(tmp_path), "--follow-imports=silent")
    assert result.returncode == 0, result.stdout + result.stderr
    minimal = tmp_path / "minimal.py"
    minimal.write_text(
        "from typing import Any, Optional\n"
        "from cpy2py.protocol.transport import Transport\n"
        "class Minimal:\n"
        "    def send(self, payload: Any) -> None: ...\n"
        "    def recv(self, soon: bool = False) -> Optional[bytes]:\n"
        "        return None\n"
        "    def fileno(self) -> int:\n"
        "        return -1\n"
        "link: Transport = Minimal()\n"
    )
    result = _mypy(str(minimal), str(tmp_path), "--follow-imports=silent")
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and 'variable has type "Transport"' in errors[0], result.stdout
