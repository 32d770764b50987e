"""Sandboxed twins: CPython compiled to WebAssembly, run by wasmtime in the master.

``TwinMaster('wasi-python')`` (or any id with ``executable='wasi-python'``)
comes here (``master.py`` calls ``start_guest``). The
guest is the component built by ``just wasm`` (wasm/): CPython 3.14 and the
pre-initialized cpy2py kernel. The host (``cpy2py._host.WasiGuest``, Rust)
runs it on the thread that calls it (no thread of its own, no hand-off per
call) with (defaults from the host, ``cpy2py._host.WASI_DEFAULT_*``):

- ``memory_limit``: bytes of guest linear memory (default 256 MiB);
- ``timeout``: seconds of the guest's own running time per call, callbacks
  included, never reset by them (default 10 s; ``float('inf')``: no limit);
- ``paths``: directories the guest may import code from (default: none, only
  the standard library); the guest sees only the ``*.py`` files under them,
  read-only;
- ``packages``: installed pure-Python distributions the guest sees, with all
  the files their RECORD lists, read-only (cpy2py/packages.py);
- no environment variables, arguments, stdin or network; its stdout/stderr go
  to the master's, each line marked ``[<twin id>] ``;
- ``output_limit``: bytes the master writes of the guest's output (its
  marked lines), beyond which it is dropped with one notice (default 4 MiB);

Where the guest is found: ``$CPY2PY_WASI_GUEST`` (the path of a
``cpy2py-guest.wasm``; its standard library ``python-lib/`` lies beside it),
else ``wasm/build/`` of the source tree this package is imported from (an
editable install, ``just build``), else the copy shipped inside the package
(``cpy2py/wasi-guest/``, in wheels built with ``just wheel``). The compiled guest is cached in
``$CPY2PY_CACHE_DIR`` (default ``$XDG_CACHE_HOME/cpy2py`` or
``~/.cache/cpy2py``). See docs/security.md.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, FrozenSet, List, Literal, Optional, Union

from . import _logging, bytecode_cache, snapshots
from . import packages as packages_module
from .errors import TwinStartError
from .kernel.sandbox import SandboxSerializer
from .protocol import transport
from .protocol.transport import TransportDefaults

log = _logging.get_logger("wasi")

GUEST_FILE = "cpy2py-guest.wasm"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def guest_locations() -> List[str]:
    """Where the guest component is looked for, in order."""
    found = []
    override = os.environ.get("CPY2PY_WASI_GUEST")
    if override:
        return [os.path.abspath(override)]
    # an editable install (`just build`): guest-python/cpy2py -> <repo>/wasm/build
    repo = os.path.dirname(os.path.dirname(_PACKAGE_DIR))
    if os.path.isfile(os.path.join(repo, "wasm", "build_guest.py")):
        found.append(os.path.join(repo, "wasm", "build", GUEST_FILE))
    # a wheel built with `just wheel` ships it inside the package
    found.append(os.path.join(_PACKAGE_DIR, "wasi-guest", GUEST_FILE))
    return found


def find_guest() -> str:
    """The path of the guest component, or TwinStartError saying how to build it."""
    candidates = guest_locations()
    for path in candidates:
        if os.path.isfile(path):
            return path
    if os.environ.get("CPY2PY_WASI_GUEST"):
        raise TwinStartError(
            f"CPY2PY_WASI_GUEST points at {candidates[0]!r}, which does not exist: "
            f"build the guest with `just wasm` (it writes wasm/build/{GUEST_FILE}) or fix the variable"
        )
    raise TwinStartError(
        "the sandboxed twin 'wasi-python' needs the WASI guest component, which is not built: "
        f"run `just wasm` in the cpy2py source tree (it writes wasm/build/{GUEST_FILE}), or set "
        f"CPY2PY_WASI_GUEST to the path of a built {GUEST_FILE}. Looked in: " + ", ".join(candidates)
    )


def _check_paths(paths: Optional[List[str]]) -> List[str]:
    checked = []
    for path in paths or []:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"paths must be directories (str or PathLike), not {path!r}")
        real = os.path.realpath(os.fspath(path))
        if not os.path.isdir(real):
            raise TwinStartError(
                f"sandbox path {os.fspath(path)!r} is not a directory: paths= lists the directories "
                f"the guest may import code from"
            )
        checked.append(real)
    return checked


def _positive(value: Any, name: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, not {value!r}")
    return value


def _limits(master: Any) -> Dict[str, Any]:
    """The sandbox limits ``master`` sets; those it leaves at None get the
    host's defaults (``cpy2py._host.WASI_DEFAULT_*``, docs/security.md)."""
    limits: Dict[str, Any] = {}
    if master.memory_limit is not None:
        limits["memory_limit"] = int(_positive(master.memory_limit, "memory_limit"))
    if master.timeout == float("inf"):
        limits["timeout"] = None  # no limit
    elif master.timeout is not None:
        limits["timeout"] = float(_positive(master.timeout, "timeout"))
    if master.output_limit is not None:
        limits["output_limit"] = int(_positive(master.output_limit, "output_limit"))
    return limits


def check_options(master: Any) -> None:
    """Raise what ``start_guest`` would for ``master``'s paths and limits,
    without starting a guest (a fresh twin or a pool checks them up front)."""
    _check_paths(master.paths)
    _limits(master)
    packages_module.resolve(master.packages)


class GuestTransport(TransportDefaults):
    """The master's transport to a running guest (protocol/transport.py,
    ``Transport``): the interface of ``cpy2py._host.NativeTwin`` over a
    ``cpy2py._host.WasiGuest``.

    The guest runs on the threads that call it, in the host with the GIL
    released, one at a time: ``send`` of a request or an answer carries it out
    at once (unless another thread runs the guest), so it may take as long as
    the guest's work: never call it holding a lock others need. ``recv``
    runs the guest until it has sent a frame; the kernel lets one thread at a
    time read, and routes what it read. Other frames (releases) only queue:
    a guest nobody calls does nothing, and takes them when a thread next runs
    it. ``wait_readable`` does not run the guest: it tells a thread that does
    not read (the link's poller) about frames a reader left for others (the
    guest's releases after a reply) and about the end. Ctrl-C reaches a
    thread running the guest within about 60 ms; the guest then stays
    suspended where it was (the kernel stops a guest whose call was
    interrupted: kernel/connection.py, ``request``).
    """

    __slots__ = (
        "_twin",
        "_fd",
        "hello",
        "pid",
        "paths",
        "module_files",
        "send",
        "recv",
        "queue",
        "drive_for",
        "charge",
        "buffered",
        "publish",
    )

    #: ``recv`` runs the guest, and returns False (having taken no frame)
    #: once a signal comes that the reading main thread holds
    #: (protocol/transport.py): a handler that raises must not run between
    #: taking a frame and delivering it
    stops_for_signals = True
    #: ``send`` runs the guest on the calling thread for all of its work; an
    #: awaited call ``queue``s its request and its loop ``drive_for``s the
    #: guest a slice at a time (kernel/connection.py, ``request_async``)
    runs_peer = True
    #: large plain containers go to the guest as plain-data blocks, which its
    #: C unpickler reads several times faster than its pure-Python codec
    plain_blocks = True
    #: ``send_now`` always sends (see there)
    sends_now = True

    def __init__(self, twin: Any, paths: List[str], module_files: FrozenSet[str] = frozenset()) -> None:
        self._twin = twin
        # the guest's own methods, not wrapped (each is on the path of every call):
        #: ``send(payload)``: queue a frame; a request or an answer runs the
        #: guest on this thread until it has dealt with it (see the class docs)
        self.send: Callable[[bytes], None] = twin.send
        #: ``recv(soon=False)``: the next frame, running the guest on this
        #: thread until it sends one; None once the guest ended and all it
        #: sent was read; False when a signal this thread holds came first
        self.recv: Callable[..., Union[bytes, None, Literal[False]]] = twin.recv
        #: ``queue(payload)``: queue a frame without running the guest
        self.queue: Callable[[bytes], None] = twin.queue
        #: ``drive_for(limit)``: run the guest on this thread until it has sent
        #: a frame and waits, or ended (True), or for at most ``limit`` seconds (False)
        self.drive_for: Callable[[float], bool] = twin.drive_for
        #: ``charge(spent)``: the master's seconds on what the guest sent,
        #: charged to the call it serves as its own running time; whether
        #: that call is past its timeout now (kernel/sandbox.py)
        self.charge: Callable[[float], bool] = twin.charge
        #: ``buffered()``: whether frames the guest sent wait (``recv`` returns
        #: one at once): a reader routes them all while it holds the role, so
        #: a release before a reply does not leave the reply to another thread
        self.buffered: Callable[[], bool] = twin.has_frames
        #: ``publish()``: makes ``fileno`` readable if frames wait (``recv``
        #: never does: a reader that leaves frames says so as it leaves)
        self.publish: Callable[[], None] = twin.publish
        self._fd: int = twin.readable_fd
        self.hello: Dict[str, Any] = twin.hello
        self.pid: int = twin.pid
        #: real paths of the roots the guest imports code from
        self.paths = paths
        #: real paths of the modules of its packages
        self.module_files = module_files

    def __repr__(self) -> str:
        return repr(self._twin)

    def send_now(self, payload: bytes) -> bool:
        """``send``, which never waits for a reader: the caller may send its
        request holding the link's reading role and read the reply itself
        (kernel/connection.py, ``request``); always True."""
        self._twin.send(payload)
        return True

    def relay(self, link_fd: int) -> bool:
        """A Ray-placed guest's host (ray_sandbox.py): move frames between
        the master's link ``link_fd`` and the guest until the guest ends
        (True) or the link does (False: the guest was stopped)."""
        return self._twin.relay(link_fd)

    def fileno(self) -> int:
        """Readable once the guest ended, and while frames a reader left for
        others wait (``publish``)."""
        return self._fd

    def wait_readable(self, timeout: Optional[float] = None, unless: int = -1) -> bool:
        """Whether frames left for other readers, or the end, are there
        within ``timeout`` seconds (None: forever), or before ``unless`` is
        readable; does not run the guest."""
        return transport.wait_readable(self._fd, timeout, unless)

    def exit_status(self) -> Optional[str]:
        return self._twin.exit_status()

    def wait(self, timeout: float) -> Optional[str]:
        """Run the guest (or wait for the thread that does) up to ``timeout``
        seconds for it to end; how it ended, or None."""
        return self._twin.wait(timeout)

    def kill(self) -> str:
        return self._twin.kill()

    def stderr_tail(self) -> str:
        return self._twin.stderr_tail()

    def end_error(self) -> Optional[BaseException]:
        """The exception for callers once the guest ended abnormally (timeout,
        memory, crash: it says the guest's state was lost), else None."""
        return self._twin.end_error()


def _start_config(master: Any) -> Dict[str, Any]:
    """What the host is given to start ``master``'s guest (and to snapshot
    one: cpy2py/snapshots.py)."""
    guest = find_guest()
    guest_dir = os.path.dirname(guest)
    bundled = os.path.join(guest_dir, "bundled")
    kernel = os.path.join(guest_dir, "stage")  # the guest's own sources, for its tracebacks
    resolved = packages_module.resolve(master.packages)
    # what the packages' modules are now, once per start: the key of their
    # bytecode and of a snapshot (the host's copy of them follows the files)
    sources = resolved.sources_stamp()
    return {
        "guest": guest,
        "stdlib": os.path.join(guest_dir, "python-lib"),
        "bundled": bundled if os.path.isdir(bundled) else None,
        "kernel": kernel if os.path.isdir(kernel) else None,
        "paths": _check_paths(master.paths),
        "limits": _limits(master),
        "resolved": resolved,
        "sources": sources,
        "pycache": bytecode_cache.cache_for(guest, resolved, master, sources),
    }


def prepare_start(master: Any) -> Dict[str, Any]:
    """What ``start_guest`` gives the host for ``master``'s guest, made
    before its start is timed: the first guest of a guest build waits while
    the master compiles its standard library (cpy2py/bytecode_cache.py),
    and the first with a given ``preload`` while it snapshots a guest after
    those imports (cpy2py/snapshots.py). Raises TwinStartError."""
    try:
        from . import _host  # noqa: F401
    except ImportError as err:
        raise TwinStartError(
            "sandboxed twins run in the compiled part of cpy2py (cpy2py._host), which is not "
            f"available in this interpreter: install cpy2py with pip or build it with `just build` ({err})"
        ) from None
    start = _start_config(master)
    # with a preload: a snapshot of the guest taken after it, if one can be made
    start["component"] = snapshots.snapshot_for(master, start) or start["guest"]
    return start


def start_guest(master: Any, start: Optional[Dict[str, Any]] = None) -> GuestTransport:
    """Start the guest for ``master`` (a TwinMaster) and return the
    transport of its link (hello received); ``start``: what
    ``prepare_start`` made for it, if it was called. Raises TwinStartError
    on failure."""
    if start is None:
        start = prepare_start(master)
    log.info(
        "starting sandboxed twin %s from %s, paths %s",
        master.twinterpreter_id,
        start["component"],
        start["paths"],
    )
    try:
        twin = _start_host_guest(master, start)
    except TwinStartError as err:
        if start["component"] == start["guest"] or not master.preload or "crashed" not in str(err):
            raise  # (the bare guest's snapshot holds nothing but the build: its error stands)
        # (the preload ran in the guest the snapshot was taken of: a crash of
        # its guests may be its doing, not the guest build's)
        raise TwinStartError(
            f"sandboxed twin {master.twinterpreter_id!r}, started from the snapshot taken after its preload "
            f"of {list(master.preload)}: {err}. Every guest from that snapshot holds what the preload did; "
            "a twin without preload= imports the modules in each guest instead"
        ) from None
    return GuestTransport(twin, start["paths"], start["resolved"].module_files)


def _start_host_guest(master: Any, start: Dict[str, Any]) -> Any:
    from . import _host

    return _host.WasiGuest.start(
        master.twinterpreter_id,
        start["component"],
        start["stdlib"],
        start["bundled"],
        start["kernel"],
        start["paths"],
        packages=start["resolved"].listing,
        packages_stamp=start["sources"],
        pycache_dir=start["pycache"],
        cache_dir=os.environ.get("CPY2PY_CACHE_DIR") or None,
        handshake_timeout=float(master.handshake_timeout),
        **start["limits"],
    )


def serializer_for(
    twin_id: str, transport: GuestTransport, fresh_of: Optional[str] = None, timeout: Optional[float] = None
) -> SandboxSerializer:
    """The master's serializer for the link to sandboxed twin ``twin_id``
    (the guest's code roots are the transport's: they end with the guest);
    ``fresh_of``: the fresh twin whose guest it is, if it is one;
    ``timeout``: the guest's (``time_limit``)."""
    return SandboxSerializer(twin_id, transport.paths, transport.module_files, fresh_of, timeout)


def time_limit(master: Any) -> Optional[float]:
    """The seconds per call a sandboxed twin of ``master`` may run (None: no limit)."""
    from . import _host

    return _limits(master).get("timeout", _host.WASI_DEFAULT_TIMEOUT)
