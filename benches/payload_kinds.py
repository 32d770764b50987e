"""Echo of many kinds of payload through native twins, beside
multiprocessing.Pipe: to find the kinds a call carries far slower than
the payloads `just bench` measures (run alone, pinned):

    taskset -c 1 .venv/bin/python benches/payload_kinds.py [python3 pypy3]

Prints the median milliseconds of an echo of each payload, and each twin's
time as a multiple of multiprocessing's. Kinds that multiprocessing cannot
send say why.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict

from cpy2py import TwinMaster

MiB = 1 << 20


class Color(enum.Enum):
    RED = 1
    BLUE = 2


@dataclasses.dataclass
class Point:
    x: float
    y: float
    label: str


Pair = collections.namedtuple("Pair", "a b")


def echo(value: Any) -> Any:
    return value


def payloads() -> Dict[str, Any]:
    latin1 = bytes(range(256)).decode("utf-8", "surrogateescape")  # a file read with surrogateescape
    return {
        "1 MiB bytes, random": os.urandom(MiB),
        "1 MiB bytes, zeros": bytes(MiB),
        "1 MiB bytearray": bytearray(MiB),
        "1M ASCII chars": "a" * MiB,
        "1M Cyrillic chars": "\u0436" * MiB,
        "100k chars, half surrogates": latin1 * 400,
        "100k ints": list(range(100_000)),
        "100k ints of 2**100": [1 << 100 | i for i in range(100_000)],
        "100k floats": [i * 0.5 for i in range(100_000)],
        "100k short strs": [f"s{i}" for i in range(100_000)],
        "100k None": [None] * 100_000,
        "10k tuples of two": [(i, str(i)) for i in range(10_000)],
        "10k sets of ints": set(range(10_000)),
        "10k dict entries, str keys": {f"k{i}": i for i in range(10_000)},
        "10k dataclasses": [Point(i * 0.5, i * 1.5, f"p{i}") for i in range(10_000)],
        "10k datetimes": [datetime.datetime(2026, 1, 1, 0, 0, i % 60, i) for i in range(10_000)],
        "10k Decimals": [decimal.Decimal(i) / 7 for i in range(10_000)],
        "10k enum members": [Color.RED, Color.BLUE] * 5_000,
        "10k namedtuples": [Pair(i, str(i)) for i in range(10_000)],
    }


def _child(connection: Any) -> None:
    while True:
        value = connection.recv()
        if value is None:
            return
        connection.send(value)


def median_ms(call: Callable[[], Any], rounds: int = 15) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    kinds = sys.argv[1:] or ["python3", "pypy3"]
    values = payloads()
    results: Dict[str, Dict[str, Any]] = {name: {} for name in values}
    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.Process(target=_child, args=(theirs,))
    child.start()
    try:
        for name, value in values.items():
            try:
                results[name]["mp"] = median_ms(lambda value=value: (ours.send(value), ours.recv()))
            except Exception as err:
                results[name]["mp"] = type(err).__name__
    finally:
        ours.send(None)
        child.join()
    for kind in kinds:
        with TwinMaster(kind) as twin:
            for name, value in values.items():
                try:
                    results[name][kind] = median_ms(lambda value=value: twin.execute(echo, value))
                except Exception as err:
                    results[name][kind] = type(err).__name__
    heads = "".join(f"{kind:>10s}{'x mp':>7s}" for kind in kinds)
    print(f"{'payload, echo (ms)':30s}{'mp.Pipe':>10s}{heads}")
    for name, row in results.items():
        mp = row["mp"]
        line = f"{name:30s}{mp:10.2f}" if isinstance(mp, float) else f"{name:30s}{mp:>10s}"
        for kind in kinds:
            got = row[kind]
            if not isinstance(got, float):
                line += f"{got:>17s}"
                continue
            line += f"{got:10.2f}" + (f"{got / mp:7.1f}" if isinstance(mp, float) else f"{'':7s}")
        print(line)


if __name__ == "__main__":
    main()
