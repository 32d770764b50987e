"""Helpers for the tests (imported by test modules and conftest)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
from typing import Iterator

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def require_interpreter(kind: str) -> None:
    """Skip, with the reason in the report, when ``kind`` is not installed."""
    if shutil.which(kind) is None:
        hint = " (Debian: apt-get install pypy3; `just setup` does it as root)" if kind == "pypy3" else ""
        pytest.skip(f"{kind} is not installed on this machine{hint}")


def find_cpython(version: str) -> tuple[str | None, str]:
    """The executable of CPython ``version`` ("3.13") on this machine (its
    real path: pyenv's shims run only the versions it was told to, so its
    versions directory is looked in too), and why there is none if not."""
    found = shutil.which(f"python{version}")
    pyenv = os.path.join(os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv")), "versions")
    if os.path.isdir(pyenv):
        for name in sorted(os.listdir(pyenv), reverse=True):
            candidate = os.path.join(pyenv, name, "bin", f"python{version}")
            if name.startswith(version + ".") and os.access(candidate, os.X_OK):
                found = candidate
                break
    if found is None:
        return None, f"CPython {version} is not installed here (no python{version} on PATH nor in pyenv)"
    says = "import sys; print(sys.implementation.name, '%d.%d' % sys.version_info[:2], sys.executable)"
    probe = subprocess.run(
        [found, "-c", says],
        capture_output=True,
        text=True,
        timeout=60,
    )
    fields = probe.stdout.split()
    if probe.returncode != 0 or len(fields) != 3 or fields[:2] != ["cpython", version]:
        said = (probe.stdout.strip() or probe.stderr.strip())[-300:]
        return None, f"python{version} here does not run as CPython {version}: {said}"
    return fields[2], ""


def run_master(
    script: str, *flags: str, env: dict | None = None, timeout: float = 120, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """Run ``script`` as the main program of a fresh master interpreter
    (``stdin``: what it reads from its standard input)."""
    full_env = dict(os.environ, PYTHONPATH=TESTS_DIR, **(env or {}))
    return subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
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
    except (FileNotFoundError, ProcessLookupError):  # reaped meanwhile
        return False


@contextlib.contextmanager
def code_on_sys_path(tmp_path_factory, name: str, files: dict) -> Iterator[pathlib.Path]:
    """A new directory ``name`` of the test session's tmp dir holding
    ``files`` (file name: text), first on sys.path for the block: the guest
    code of a test module, which the master may import too. Afterwards the
    directory is off sys.path and every module imported from it is
    forgotten, so that nothing of it reaches the next test module."""
    root = tmp_path_factory.mktemp(name)
    for file_name, text in files.items():
        (root / file_name).write_text(text)
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        inside = str(root) + os.sep
        for module_name, module in list(sys.modules.items()):
            if (getattr(module, "__file__", None) or "").startswith(inside):
                del sys.modules[module_name]


#: the sandboxed twin kind, run by the semantic suites where they apply
SANDBOX_KIND = "wasi-python"


def sandbox_unavailable() -> str | None:
    """Why the sandboxed guest cannot run here, or None."""
    from cpy2py import TwinStartError

    try:
        from cpy2py import _host, wasi

        wasi.find_guest()
        _host.WasiGuest  # noqa: B018
    except (ImportError, AttributeError) as err:
        return f"cpy2py._host has no WasiGuest (run `just build`): {err}"
    except TwinStartError as err:
        return str(err)
    return None


def start_twin(kind: str, twin_id: str | None = None):
    """A started TwinMaster of ``kind``, skipping with the reason when it cannot run here."""
    from cpy2py import TwinMaster

    if kind == SANDBOX_KIND:
        reason = sandbox_unavailable()
        if reason:
            pytest.skip(f"the sandboxed twin cannot run here: {reason}")
        # the guest may import the test helpers (and nothing else of the host)
        master = TwinMaster(executable=kind, twinterpreter_id=twin_id or kind, paths=[TESTS_DIR])
    else:
        require_interpreter(kind)
        master = TwinMaster(kind, twinterpreter_id=twin_id)
    master.start()
    return master


def native_only(kind: str, why: str) -> None:
    """Skip for the sandboxed twin, saying why the semantics differ there."""
    if kind == SANDBOX_KIND:
        pytest.skip(f"not for the sandbox: {why}")


def run_suite(suite: str, env: dict) -> None:
    """Runs the test file ``suite`` of this directory in a pytest of its own
    with ``env`` added to the environment (the remote kinds' reruns of the
    object and function suites); fails with its report unless it passed."""
    import subprocess

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            os.path.join(TESTS_DIR, suite),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, **env),
        cwd=os.path.dirname(TESTS_DIR),
        timeout=900,
    )
    report = done.stdout[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, report
    assert " passed" in done.stdout and " failed" not in done.stdout, report


@contextlib.contextmanager
def sandboxes(code_dir) -> Iterator:
    """A function that starts a sandboxed twin of the code in ``code_dir`` by
    name (for a test that stops, breaks or configures it); all are stopped
    at the end."""
    from cpy2py import TwinMaster

    masters = []

    def start(name: str):
        master = TwinMaster("wasi-python", twinterpreter_id=name, paths=[str(code_dir)])
        master.start()
        masters.append(master)
        return master

    try:
        yield start
    finally:
        for master in masters:
            master.stop()


#: guest code shared by the hostile plugins (test_sandbox_hostile.py, and a
#: guest placed on a Ray node in test_ray.py): appended to their source
GUEST_PROBES = '''

def attempt(action):
    """What happened: the type name of what ``action`` raised, or ``ran: <its result>``."""
    try:
        result = action()
    except BaseException as err:  # interrupts and exits too: the plugin swallows all
        return type(err).__name__
    return f"ran: {result!r:.200}"


def what_the_guest_was_given():
    import os
    import sys

    return {
        "argv": list(sys.argv),
        "orig_argv": list(getattr(sys, "orig_argv", [])),
        "executable": sys.executable,
        "stdin": attempt(sys.stdin.read),
        "environ": dict(os.environ),
        "getenv": [os.getenv(name) for name in ("PATH", "HOME", "RAY_ADDRESS", "__CPY2PY_SANDBOX__")],
    }
'''


def assert_the_guest_was_given_nothing(given: dict) -> None:
    """What ``what_the_guest_was_given`` (GUEST_PROBES) returned holds nothing
    of a host: no environment, arguments or input."""
    assert given["environ"] == {} and given["getenv"] == [None] * 4, given
    assert not any(given["argv"]) and not any(given["orig_argv"]), given
    assert given["stdin"] == "ran: ''" or not given["stdin"].startswith("ran"), given["stdin"]
