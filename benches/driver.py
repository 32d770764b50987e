"""A driver: the master process of one scenario (``driver.py SCENARIO CMD_FD RES_FD``).

The coordinator (run.py) starts one driver per scenario and pass, and sends it
commands as JSON lines on CMD_FD; answers go back on RES_FD. Dedicated pipes,
not stdin/stdout, since twins share the master's stdout. Between commands the
driver and its child sleep in a read, so they cost the others nothing.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

import scenarios

perf_ns = time.perf_counter_ns
mono_ns = time.clock_gettime_ns
MONOTONIC = time.CLOCK_MONOTONIC

MiB = 1 << 20


def fresh_payload(kind: str, i: int, templates: dict):
    """A new object for every round trip (no caching by identity anywhere)."""
    if kind in ("bytes-1MiB", "bytes-64MiB"):
        size = MiB if kind == "bytes-1MiB" else 64 * MiB
        template = templates.get(size)
        if template is None:
            template = templates[size] = os.urandom(size)
        return template[:-1] + bytes([i & 0xFF])  # a copy, made before the clock starts
    if kind == "list-10k-ints":
        return list(range(i, i + 10_000))
    if kind == "dict-10k-nested":  # 100 groups of 100 entries
        return {f"group{g}": {f"key{k}": i + 100 * g + k for k in range(100)} for g in range(100)}
    raise ValueError(kind)


class Driver:
    def __init__(self, name: str) -> None:
        self.name = name
        self.main = None  # the long-lived instance
        self.templates: dict = {}

    def op_open(self) -> dict:
        t0 = perf_ns()
        self.main = scenarios.make(self.name)
        self.main.start()
        self.main.call()
        took = perf_ns() - t0
        return {
            "startup_ns": took,
            "describe": self.main.describe(),
            "affinity": self.main.affinity(),
            "driver_affinity": sorted(os.sched_getaffinity(0)),
        }

    def op_warmup(self, n: int, halves: int = 0) -> dict:
        call = self.main.call
        for _ in range(n):
            call()
        for _ in range(halves):
            self.main.stamp()
        return {}

    def op_noop(self, n: int) -> list:
        call = self.main.call
        out = [0] * n
        gc_was = gc.isenabled()
        gc.disable()  # the master's collections are not the transport's cost
        try:
            for i in range(n):
                t0 = perf_ns()
                call()
                out[i] = perf_ns() - t0
        finally:
            if gc_was:
                gc.enable()
        return out

    def op_halves(self, n: int) -> list:
        stamp = self.main.stamp
        out = []
        for _ in range(n):
            t0 = mono_ns(MONOTONIC)
            there = stamp()
            t2 = mono_ns(MONOTONIC)
            out.append((there - t0, t2 - there))
            if not t0 <= there <= t2:
                raise scenarios.Skipped(
                    f"{self.name}: the far side's CLOCK_MONOTONIC is not the master's "
                    "(a WASI guest's clock has an epoch of its own), so a call cannot be split in halves"
                )
        return out

    def op_payload(self, kind: str, n: int, check: bool = True) -> list:
        echo = self.main.echo
        limit = self.main.max_payload
        if limit is not None and kind == "bytes-64MiB" and 64 * MiB >= limit:
            raise scenarios.Skipped(f"{self.name} caps messages at {limit} bytes: no {kind} echo")
        out = []
        for i in range(n):
            obj = fresh_payload(kind, len(out) + int(time.time()), self.templates)
            t0 = perf_ns()
            back = echo(obj)
            took = perf_ns() - t0
            if check and i == 0 and back != obj:
                raise AssertionError(f"{self.name} echoed a different {kind}")
            del back, obj
            out.append(took)
        return out

    def op_start(self, n: int) -> list:
        """n fresh instances: launch to first answered call, then the first
        call alone (the original's "one call per start"), and the stop."""
        out = []
        for _ in range(n):
            inst = scenarios.make(self.name)
            t0 = perf_ns()
            inst.start()
            t1 = perf_ns()
            inst.call()
            t2 = perf_ns()
            inst.stop()
            t3 = perf_ns()
            out.append({"startup": t2 - t0, "first_call": t2 - t1, "stop": t3 - t2})
        return out

    def op_many(self, n: int, calls: int) -> list:
        """The original's "many calls per start": mean per call over ``calls``
        calls to a fresh instance, JIT warm-up included."""
        out = []
        for _ in range(n):
            inst = scenarios.make(self.name)
            inst.start()
            call = inst.call
            t0 = perf_ns()
            for _ in range(calls):
                call()
            out.append((perf_ns() - t0) / calls)
            inst.stop()
        return out

    def op_e2e(self, mode: str, max_n: int) -> float:
        sys.path.insert(0, os.path.join(scenarios.ROOT, "examples"))
        import tutorial
        from cpy2py import TwinMaster

        if mode == "pinned-cold":  # including PyPy's start, as the tutorial prints it
            TwinMaster("pypy3").stop()
            t0 = perf_ns()
            tutorial.sum_series(max_n)
        elif mode == "pinned-warm":
            tutorial.sum_series(10)  # make sure the twin runs
            t0 = perf_ns()
            tutorial.sum_series(max_n)
        else:
            t0 = perf_ns()
            tutorial.sum_series.__wrapped__(max_n)
        return perf_ns() - t0

    def op_close(self) -> dict:
        if self.main is not None:
            self.main.stop()
            self.main = None
        return {}


def main() -> None:
    name, cmd_fd, res_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    # twins and children must not hold the control pipes
    os.set_inheritable(cmd_fd, False)
    os.set_inheritable(res_fd, False)
    commands = os.fdopen(cmd_fd, "r")
    results = os.fdopen(res_fd, "w")
    driver = Driver(name)
    for line in commands:
        command = json.loads(line)
        op = command.pop("op")
        try:
            answer = {"ok": True, "result": getattr(driver, "op_" + op)(**command)}
        except scenarios.Unavailable as err:
            answer = {"ok": False, "unavailable": str(err)}
        except scenarios.Skipped as err:
            answer = {"ok": False, "error": f"skipped: {err}", "traceback": ""}
        except BaseException as err:
            answer = {
                "ok": False,
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(),
            }
        results.write(json.dumps(answer) + "\n")
        results.flush()
        if op == "close":
            break
    scenarios.stop_local_sshd()
    os._exit(0)  # no atexit: every instance has been stopped explicitly


if __name__ == "__main__":
    main()
