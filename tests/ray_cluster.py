"""A real two-node Ray cluster on this machine, for the tests of Ray-placed
twins (cpy2py/ray.py), that stops only itself, also when the process that
started it is killed.

Each node is a ``ray start --block`` started as the leader of a session of
its own; every process of the node stays in that session (Ray's GCS,
raylet, monitors, the retitled ``ray::DashboardAgent`` and
``ray::RuntimeEnvAgent``, the workers, which take process groups of their
own but not sessions, and the twins the workers start). ``stop()``
therefore ends the cluster by session id: SIGTERM to the leader (Ray then
stops its processes in order), then SIGTERM and SIGKILL to whatever of the
session is left (the two agents outlive a leader that was killed), until
/proc shows none of it. ``ray stop`` is never used: it ends
every Ray cluster of the machine, a developer's own too. The cluster has
a temporary directory of its own (Ray's sessions, logs, sockets, and its
``ray_current_cluster``, so ``ray.init()`` elsewhere still finds the
developer's cluster) and its own ports, and the directory goes at
``stop()``.

A process that starts a cluster and ends without ``stop()`` (pytest
SIGKILLed, or its process group killed by a CI timeout, or a crash) would
leave the nodes running: they are sessions of their own, and nothing of
Ray ends a ``ray start --block`` whose parent died. So each cluster has a
watchdog, this file run as a script in a session of its own, whose stdin is
a pipe that only the starting process can write to (and children it forked
without exec). It reads the nodes' session ids from it as they start,
blocked on the read; end of input without the word ``stopped``, which
``stop()`` sends, means the starter is gone, and the watchdog ends the
sessions and the directory as ``stop()`` does, then exits. (Ray's own
reaper learns of its parent's death the same way.)

The head has a small object store; the second node offers the custom
resource ``NODE_RESOURCE``. Ray binds its nodes to the machine's own
address even when asked for loopback (it replaces 127.0.0.1 by the address
it routes from), so the twins' ports are on that address too; the master
still reaches the cluster through 127.0.0.1. Where Ray is missing or will
not start, the tests skip with the reason, and nothing of the attempt is
left running.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional

#: the custom resource only the second node offers
NODE_RESOURCE = "cpy2py_test_node"
#: how much of it: every twin placed by it takes 1
NODE_RESOURCE_AMOUNT = 100
#: bytes of object store per node (Ray's smallest is 75 MB)
OBJECT_STORE = 80 * 1000 * 1000
START_TIMEOUT = 120
#: how long Ray gets to stop a node's processes after SIGTERM, then SIGKILL
STOP_GRACE = 30
#: what ``ray start`` prints once the node is registered with the GCS (it
#: asks the GCS for the node before printing it; the same point at which
#: ``ray start`` without --block returns)
STARTED = "Ray runtime started"

_ENV = dict(
    os.environ,
    RAY_USAGE_STATS_ENABLED="0",
    # a node waits up to 30 s after SIGTERM for its work to drain otherwise
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
)


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
    if not os.path.isdir("/proc"):
        return "the test cluster finds its processes in /proc, which this system does not have"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stat(pid: int) -> Optional[List[str]]:
    """The fields of /proc/PID/stat after the name (state ppid pgrp session
    ...); None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()  # the name may hold anything
    except (OSError, IndexError):
        return None


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended; it is not reaped by this)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def session_processes(sid: int) -> List[int]:
    """The running processes of session ``sid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(entry))
    return found


def _signal_all(pids: List[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _wait(done, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.1)


def _leads_session(pid: int) -> bool:
    """Whether ``pid`` runs and leads the session of its own id."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and int(fields[3]) == pid


def end_session(sid: int) -> List[int]:
    """Ends every process of session ``sid``; those still running afterwards
    (none, unless the kernel holds one).

    SIGTERM to the leader first: ``ray start --block`` then stops the node's
    processes itself, in order. Whatever of the session outlives it (all of
    its processes that Ray had not stopped yet, when it was killed) gets
    SIGTERM, then SIGKILL. Only processes of the session get a signal: a
    session's id is not given to a new process while anything of it runs
    (and ``stop()`` reaps the leaders only after this)."""
    if _leads_session(sid):
        _signal_all([sid], signal.SIGTERM)
        _wait(lambda: not _leads_session(sid), STOP_GRACE)
    for signum, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        _signal_all(session_processes(sid), signum)
        _wait(lambda: not session_processes(sid), grace)
    return session_processes(sid)


#: what ``stop()`` tells the watchdog once it has ended the cluster itself
STOPPED = b"stopped"


def watch(temp_dir: str) -> None:
    """The watchdog's work (see the module's doc): the session ids from
    stdin until its end, then the cluster's end unless ``stop()`` said
    ``stopped``. Blocked on the read meanwhile: no polling."""
    sessions = []
    for line in sys.stdin.buffer:
        if line.strip() == STOPPED:
            return
        sessions.append(int(line))
    left = []
    for sid in reversed(sessions):  # the second node before the head it reports to
        left += end_session(sid)
    shutil.rmtree(temp_dir, ignore_errors=True)
    if left:
        sys.exit(f"processes of the Ray test cluster still run after SIGKILL: {left}")


def _start_watchdog(temp_dir: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), temp_dir],
        stdin=subprocess.PIPE,  # the write end is ours alone (not inherited by what we exec)
        stdout=subprocess.DEVNULL,
        bufsize=0,  # each session id reaches the pipe when written
        # pytest's process group, killed by a CI timeout, does not take it along
        start_new_session=True,
    )


@dataclass
class RayCluster:
    address: str  # for ray.init and Placement(address=...)
    temp_dir: str  # Ray's --temp-dir for both nodes
    watchdog: subprocess.Popen  # ends the cluster if we end without stop()
    nodes: List[subprocess.Popen] = field(default_factory=list)  # their `ray start --block`

    @property
    def sessions(self) -> List[int]:
        """The session ids of its nodes, which hold all of its processes."""
        return [node.pid for node in self.nodes]

    def stop(self) -> None:
        """Ends this cluster's processes, all of them, and no other, and its
        watchdog."""
        left = []
        for node in reversed(self.nodes):  # the second node before the head it reports to
            left += end_session(node.pid)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self.watchdog.returncode is None:
            try:
                self.watchdog.communicate(STOPPED + b"\n", timeout=10)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
                self.watchdog.wait()
        # the leaders are reaped only now: until the watchdog has let go of
        # their sessions, no new process can take their ids
        for node in self.nodes:
            try:
                node.wait(10)
            except subprocess.TimeoutExpired:
                left.append(node.pid)
        self.nodes.clear()
        if left:
            raise RuntimeError(f"processes of the Ray test cluster still run after SIGKILL: {left}")

    def start_node(self, args: list) -> Optional[str]:
        """Starts a node and waits until it is registered; why it failed, or None."""
        log_path = os.path.join(self.temp_dir, f"node-{len(self.nodes)}.log")
        with open(log_path, "wb") as log:
            node = subprocess.Popen(
                [_ray_cli(), "start", "--block", f"--temp-dir={self.temp_dir}", *args],
                env=_ENV,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.nodes.append(node)
        try:
            self.watchdog.stdin.write(b"%d\n" % node.pid)
        except BrokenPipeError:
            raise RuntimeError(
                "the watchdog of the Ray test cluster (tests/ray_cluster.py run as a script) ended early"
                f" with exit status {self.watchdog.poll()}; its error is in this run's stderr"
            ) from None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with open(log_path, errors="replace") as log:
                output = log.read()
            if STARTED in output:
                return None
            if not _running(node.pid):  # not reaped: stop() still finds its session by its id
                return f"`ray start` failed: {output.strip()[-800:]}"
            time.sleep(0.2)
        return f"`ray start` did not report the node up within {START_TIMEOUT} s: {output.strip()[-800:]}"


def _own_ports(head: bool) -> list:
    """Ports of our own for what Ray would otherwise bind at a fixed default
    (8265, 10001, 52365), so that a developer's cluster on the defaults and
    this one do not meet; the rest Ray picks at random."""
    ports = [f"--dashboard-agent-listen-port={_free_port()}"]
    if head:
        ports.append(f"--dashboard-port={_free_port()}")
        # Ray runs its client server only where grpc is installed, and
        # refuses a port for it where it is not
        if importlib.util.find_spec("grpc") is not None:
            ports.append(f"--ray-client-server-port={_free_port()}")
    return ports


def start_cluster() -> tuple:
    """(the cluster, None) or (None, why it could not start); a cluster
    that did not start is stopped again."""
    port = _free_port()
    # short: Ray's unix sockets live below it (at most 107 bytes a path)
    temp_dir = tempfile.mkdtemp(prefix="cpy2py-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    cluster = RayCluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir, watchdog=_start_watchdog(temp_dir))
    common = [f"--object-store-memory={OBJECT_STORE}", "--num-cpus=2", "--disable-usage-stats"]
    try:
        failed = cluster.start_node(
            ["--head", f"--port={port}", "--include-dashboard=false", *_own_ports(head=True), *common]
        )
        if failed is None:
            failed = cluster.start_node(
                [
                    f"--address={cluster.address}",
                    f'--resources={{"{NODE_RESOURCE}": {NODE_RESOURCE_AMOUNT}}}',
                    *_own_ports(head=False),
                    *common,
                ]
            )
    except BaseException:  # Ctrl-C while waiting, too: no half-started cluster stays
        cluster.stop()
        raise
    if failed:
        cluster.stop()
        return None, failed
    return cluster, None


if __name__ == "__main__":  # the watchdog: python ray_cluster.py TEMP_DIR
    watch(sys.argv[1])
