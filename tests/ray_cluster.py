"""A real two-node Ray cluster on this machine, for the tests of Ray-placed
twins (cpy2py/ray.py).

``ray start --head`` with a small object store, then a second node that
offers the custom resource ``NODE_RESOURCE``; ``ray stop`` afterwards.
Ray binds its nodes to the machine's own address even when asked for
loopback (it replaces 127.0.0.1 by the address it routes from), so the
twins' ports are on that address too; the master still reaches the
cluster through 127.0.0.1. Where Ray is missing or will not start, the
tests skip with the reason.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

#: the custom resource only the second node offers
NODE_RESOURCE = "cpy2py_test_node"
#: how much of it: every twin placed by it takes 1
NODE_RESOURCE_AMOUNT = 100
#: bytes of object store per node (Ray's smallest is 75 MB)
OBJECT_STORE = 80 * 1000 * 1000
START_TIMEOUT = 120

_ENV = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")


def _ray_cli() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ray")


def ray_unavailable() -> Optional[str]:
    """Why no Ray cluster can be run here (None: it can)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install 'cpy2py[ray]'; requirements-dev.txt has it)"
    if not os.path.exists(_ray_cli()):
        return f"ray is installed but its command {_ray_cli()} is missing"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayCluster:
    address: str  # for ray.init and Placement(address=...)

    def stop(self) -> None:
        subprocess.run([_ray_cli(), "stop"], env=_ENV, capture_output=True, timeout=120)


def _start(args: list, cluster: RayCluster) -> Optional[str]:
    """Run ``ray start``; the reason it failed, or None."""
    try:
        done = subprocess.run(
            [_ray_cli(), "start", *args], env=_ENV, capture_output=True, text=True, timeout=START_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        cluster.stop()
        return f"`ray start` did not finish within {START_TIMEOUT} s"
    if done.returncode != 0:
        cluster.stop()
        return f"`ray start` failed: {(done.stdout + done.stderr).strip()[-800:]}"
    return None


def start_cluster() -> tuple:
    """(the cluster, None) or (None, why it could not start)."""
    port = _free_port()
    cluster = RayCluster(address=f"127.0.0.1:{port}")
    common = [f"--object-store-memory={OBJECT_STORE}", "--num-cpus=2", "--disable-usage-stats"]
    failed = _start(["--head", f"--port={port}", "--include-dashboard=false", *common], cluster)
    if failed is None:
        failed = _start(
            [
                f"--address={cluster.address}",
                f'--resources={{"{NODE_RESOURCE}": {NODE_RESOURCE_AMOUNT}}}',
                *common,
            ],
            cluster,
        )
    return (None, failed) if failed else (cluster, None)
