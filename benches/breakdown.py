"""Where the time of one no-op call goes: each stage of the call path timed
alone, in the interpreter that runs it, beside the whole call and the raw
pipe floor (benches/README.md, "One call, stage by stage").

    python benches/breakdown.py [--kinds python3,pypy3] [--json]

A stage is the kernel's own function run in a loop on the frames of a real
call (``codec.peek``, ``Serializer.decode``, ``references.encode``); the
whole call and the floor are timed like `just bench` does (median of calls
timed alone). What the stages leave of the call is the part no stage can be
timed alone in: routing and locks, thread and process switches, and the
system calls beyond the floor's two writes and two reads. Run it pinned to
one CPU (``taskset -c 1``) so that both processes share it, as in the pinned
pass of `just bench`.

Then the same no-op calls made from one thread and from several
(``--threads 1,8``), accounted per process: CPU time and context switches
per call of the master and of the twin (``getrusage`` on each side), and
the twin's threads. That is where contention shows: with more callers the
replies are handed between the master's threads, and the twin runs more
server threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import threading
import time
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_funcs  # noqa: E402
from cpy2py import TwinMaster  # noqa: E402
from scenarios import RawPipe  # noqa: E402

CALLS = 20000


def per_call_ns(func: Callable[[], Any], calls: int = CALLS, rounds: int = 5) -> float:
    """Best of ``rounds`` means: a stage alone, in a hot loop."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter_ns()
        for _ in range(calls):
            func()
        best = min(best, (time.perf_counter_ns() - started) / calls)
    return best


def median_call_ns(call: Callable[[], Any], calls: int = 5000) -> float:
    """The median of calls timed one by one (as `just bench` does)."""
    times: List[int] = []
    for _ in range(calls):
        started = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - started)
    return statistics.median(times)


def stages(request: bytes, reply: bytes, side: str) -> Dict[str, float]:
    """On either side of a link (the master, or in a twin through
    ``execute``): the stages it runs for one no-op call, on real frames.
    ``side`` is "master" (it encodes the request and decodes the reply) or
    "twin" (the reverse)."""
    from cpy2py.kernel import links, references
    from cpy2py.protocol import codec
    from cpy2py.protocol.messages import OP_EXECUTE, REPLY, REQUEST

    serializer = links.all_connections()[0].serializer
    chain = 1 << 30
    if side == "master":
        outgoing = [REQUEST, 7, chain, OP_EXECUTE, bench_funcs.noop, [], {}]
        incoming = reply
    else:
        outgoing = [REPLY, 7, chain, 1]
        incoming = request
    return {
        "encode": per_call_ns(lambda: references.encode(outgoing, serializer.default)),
        "peek": per_call_ns(lambda: codec.peek(incoming)),
        "decode": per_call_ns(lambda: serializer.decode(incoming)),
        "codec": codec.IMPLEMENTATION,  # type: ignore[dict-item]
    }


def frames(twin: TwinMaster) -> Dict[str, bytes]:
    """The request and reply frames of one real no-op call, recorded."""
    from cpy2py.master import connection_for

    connection = connection_for(twin.twinterpreter_id, twin)
    recorded: Dict[str, bytes] = {}
    transport = connection.transport
    real_recv = transport.recv

    class Recording:
        def __getattr__(self, name: str) -> Any:
            return getattr(transport, name)

        def send(self, payload: bytes) -> None:
            recorded["request"] = bytes(payload)
            transport.send(payload)

        def send_now(self, payload: bytes) -> bool:
            sent = transport.send_now(payload)
            if sent:
                recorded["request"] = bytes(payload)
            return sent

        def recv(self, soon: bool = False) -> Any:
            raw = real_recv(soon)
            if raw:
                recorded["reply"] = bytes(raw)
            return raw

    connection.transport = Recording()
    connection._send_now = connection.transport.send_now
    try:
        twin.execute(bench_funcs.noop)
    finally:
        connection.transport = transport
        connection._send_now = transport.send_now
    return recorded


def usage() -> Dict[str, float]:
    """This process's CPU seconds and context switches so far (all its
    threads, ended ones too), and its threads now (Linux; -1 elsewhere)."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        threads = -1
    return {
        "cpu": used.ru_utime + used.ru_stime,
        "switches": used.ru_nvcsw + used.ru_nivcsw,
        "threads": threads,
    }


def accounting(twin: TwinMaster, threads: int, calls: int = 8000) -> Dict[str, float]:
    """``calls`` no-op calls from ``threads`` threads at once: calls per
    second, and per call the CPU (us) and context switches of each side."""

    def work(count: int) -> None:
        for _ in range(count):
            twin.execute(bench_funcs.noop)

    callers = [threading.Thread(target=work, args=(calls // threads,)) for _ in range(threads)]
    master, far = usage(), twin.execute(usage)
    started = time.perf_counter()
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    took = time.perf_counter() - started
    far_after = twin.execute(usage)  # (before the master's: its call is the twin's too)
    master_after = usage()
    made = calls // threads * threads
    return {
        "calls_per_s": made / took,
        "master_cpu_us": (master_after["cpu"] - master["cpu"]) / made * 1e6,
        "twin_cpu_us": (far_after["cpu"] - far["cpu"]) / made * 1e6,
        "master_switches": (master_after["switches"] - master["switches"]) / made,
        "twin_switches": (far_after["switches"] - far["switches"]) / made,
        "twin_threads": far_after["threads"],
    }


def measure(kind: str, threads: List[int]) -> Dict[str, Any]:
    twin = TwinMaster(kind, f"breakdown-{kind}")
    try:
        twin.start()
    except Exception as err:  # pypy3 missing, say
        return {"error": f"{type(err).__name__}: {err}"}
    raw = RawPipe(kind, kind)
    raw.start()
    try:
        recorded = frames(twin)
        for _ in range(2000):  # warm up (PyPy's JIT)
            twin.execute(bench_funcs.noop)
        master = stages(recorded["request"], recorded["reply"], "master")
        far = twin.execute(stages, recorded["request"], recorded["reply"], "twin")
        far = twin.execute(stages, recorded["request"], recorded["reply"], "twin")  # warm
        for count in threads:  # (a first pass warms each one up: PyPy's JIT)
            accounting(twin, count)
        return {
            "call": median_call_ns(lambda: twin.execute(bench_funcs.noop)),
            "floor": median_call_ns(raw.call),
            "master": master,
            "twin": far,
            "frames": {name: len(frame) for name, frame in recorded.items()},
            "threads": {count: accounting(twin, count) for count in threads},
        }
    finally:
        raw.stop()
        twin.stop()


def report(kind: str, result: Dict[str, Any]) -> str:
    if "error" in result:
        return f"{kind}: not measured ({result['error']})"
    master, far = result["master"], result["twin"]
    rows = [
        ("master: encode the request", master["encode"]),
        ("twin: peek at the request's header", far["peek"]),
        ("twin: decode the request", far["decode"]),
        ("twin: encode the reply", far["encode"]),
        ("master: peek at the reply's header", master["peek"]),
        ("master: decode the reply", master["decode"]),
    ]
    staged = sum(ns for _, ns in rows)
    rest = result["call"] - result["floor"] - staged
    lines = [
        f"{kind} twin (codec: master {master['codec']}, twin {far['codec']}; "
        f"request {result['frames']['request']} B, reply {result['frames']['reply']} B)",
        f"  {'whole no-op call (median)':44s} {result['call'] / 1000:7.1f} us",
        f"  {'raw pipe floor (2 writes, 2 reads, 2 wake-ups)':44s} {result['floor'] / 1000:7.1f} us",
    ]
    lines += [f"  {name:44s} {ns / 1000:7.1f} us" for name, ns in rows]
    lines.append(f"  {'rest: routing, locks, switches, syscalls':44s} {rest / 1000:7.1f} us")
    counts = list(result["threads"])
    if counts:
        heading = "per no-op call, from N threads at once"
        lines.append(f"  {heading:44s} " + "".join(f"{n:>9d}" for n in counts))
        for name, key, form in (
            ("calls per second", "calls_per_s", "{:9.0f}"),
            ("master: CPU (us)", "master_cpu_us", "{:9.1f}"),
            ("master: context switches", "master_switches", "{:9.2f}"),
            ("twin: CPU (us)", "twin_cpu_us", "{:9.1f}"),
            ("twin: context switches", "twin_switches", "{:9.2f}"),
            ("twin: threads", "twin_threads", "{:9.0f}"),
        ):
            lines.append(f"    {name:42s} " + "".join(form.format(result["threads"][n][key]) for n in counts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="python3,pypy3")
    parser.add_argument("--threads", default="1,8", help="callers at once, per run (empty: none)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    threads = [int(n) for n in args.threads.split(",") if n]
    results = {kind: measure(kind, threads) for kind in args.kinds.split(",")}
    if args.json:
        print(json.dumps(results))
    else:
        print("\n\n".join(report(kind, result) for kind, result in results.items()))


if __name__ == "__main__":
    main()
