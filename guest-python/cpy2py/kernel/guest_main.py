"""The kernel of the sandboxed WASI guest: handshake with the master, then serve.

Runs inside CPython compiled to WebAssembly (see wasm/): the component's
``wasi:cli/run`` export calls ``main`` with the ``link`` import, whose
``recv`` gives it the master's frames; its own go out on its stdout, each
marked (``FRAME_MARK``, its length, its bytes: host/src/wasm/frames_out.rs),
beside its text. The frames are the very ones a native twin exchanges
(``twin_main.py``): hello, welcome, ready, then requests and replies.

The guest has no threads, so one ``Connection`` with ``threads=False`` serves
and calls on the single thread. Its serializer never pickles (the link is not
trusted); the master enforces the same from its side (``sandbox.py``).

Module-level imports here are made while the component is built
(pre-initialized), so a guest starts with them already in memory.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Dict, List, Optional

from .. import _logging, kernel_state
from ..protocol import codec, codec_py
from ..protocol.transport import TransportDefaults
from . import compiler, guest_asyncio, handshake, links, main_module, references
from .connection import Connection
from .group_state import run_exit_hooks
from .serialization import Serializer
from .stdio import NoStdin, flush_stdio

log = _logging.get_logger("guest")

#: what the guest reports as its executable
EXECUTABLE = "wasi-python"


#: what starts a frame on the guest's stdout (host/src/wasm/frames_out.rs)
FRAME_MARK = b"\x00\xffcpy2py"
#: WASI writes at most this much at once (larger writes come back short)
_WRITE_CHUNK = 4096


def send_frame(payload: bytes) -> None:
    """Write one frame to the host: marked, its length, its bytes. Written
    from the bytes object itself (a ``list<u8>`` import argument is copied
    into memory that componentize-py 0.25 never frees)."""
    header = FRAME_MARK + len(payload).to_bytes(4, "big")
    if len(header) + len(payload) <= _WRITE_CHUNK:
        os.write(1, header + payload)  # (a small frame, the common case: one write)
        return
    os.write(1, header)  # (the host takes a frame's header from one write)
    view = memoryview(payload)
    while view:
        view = view[os.write(1, view) :]


class HostTransport(TransportDefaults):
    """The guest's transport: frames from the host over the component's
    ``link`` import, to it over stdout (``send_frame``). No descriptor: the
    guest's one thread reads (protocol/transport.py, TransportDefaults)."""

    #: large plain containers go as plain-data blocks, written by the C
    #: pickler several times faster than the pure-Python codec encodes them
    plain_blocks = True
    #: a guest has no signals: its reads need not hold them
    stops_for_signals = False

    def __init__(self, link: Any) -> None:
        self._link = link
        self.max_frame: int = int(link.max_frame())
        #: the guest's one link (to the master), once made
        self.connection: Optional[Connection] = None

    def send(self, payload: Any) -> None:
        # a frame over max_frame makes the host stop the guest with a clear error
        try:
            send_frame(payload)
        except OSError as err:  # (the link ends: say why, where the master's user sees it)
            message = (
                f"cpy2py: this guest cannot answer the master any more: writing to its stdout "
                f"(fd 1), which carries its frames, failed ({err}); its code closed or replaced fd 1\n"
            )
            os.write(2, message.encode())
            raise

    def recv(self, soon: bool = False) -> Optional[bytes]:
        # about to wait: first tell the master what this guest let go of (a
        # guest has no thread to do it later, and the master must not keep
        # what it handed longer than the guest holds it)
        connection = self.connection  # (its only link: none before it is made)
        if connection is not None and connection.pending_releases:
            references.flush_releases(connection)
        return self._link.recv()

    def wait_readable(self, timeout: Optional[float] = None, unless: int = -1) -> bool:
        # one thread only: the next recv blocks until the master sends
        return True


def _inside(path: Optional[str], roots: List[str]) -> bool:
    if not path:
        return False
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _apply_config(config: Dict[str, Any], paths: List[str]) -> None:
    """The welcome's settings that apply in a sandbox: the guest's own code
    roots go on sys.path (the master's app_paths/site_paths do not: the guest
    cannot see them); the master's main module only if it lies in a root."""
    sys.path[:0] = [p for p in paths if p not in sys.path]
    kernel_state.FRESH_OF = str(config.get("fresh_of") or "")
    if config.get("argv") is not None:
        sys.argv[:] = list(config["argv"])
    main_path = config.get("main_path")
    main_name = config.get("main_name")
    if not _inside(main_path, paths):
        main_path = None
    main_module.configure_twin(main_path, main_name, bool(config.get("run_main")) and bool(main_path))
    if config.get("main_definitions"):  # the initializers' source, from a master without a main file
        main_module.define(config["main_definitions"])


def warm_noop() -> None:
    """What ``warm_up`` asks the kernel to run (and the master, in a guest
    it starts ahead of calls: cpy2py/fresh.py)."""


class _WarmUpTransport(HostTransport):
    """Frames for ``warm_up``: requests prepared in advance, replies dropped."""

    def __init__(self, frames: List[bytes]) -> None:
        self._frames = frames
        self.replies = 0

    def send(self, payload: Any) -> None:
        self.replies += 1

    def recv(self, soon: bool = False) -> Optional[bytes]:
        return self._frames.pop() if self._frames else None


def warm_up(calls: int = 64) -> None:
    """Serve ``calls`` no-op requests on a link of its own that nothing else
    sees, while the component is built (wasm/app.py): the snapshot then holds
    the call path's code already specialized by the interpreter and its caches
    filled, so each guest's first call skips that work (and the pages it would
    dirty). Leaves no state behind: the link ends, and was never registered."""
    from ..protocol.messages import OP_EXECUTE, REQUEST

    encoder = Serializer("__warm_up__")
    frames = [
        bytes(
            references.encode(
                [REQUEST, number, 1, OP_EXECUTE, warm_noop, [], {}], encoder.default, share=False
            )
        )
        for number in range(calls, 0, -1)
    ]
    transport = _WarmUpTransport(frames)
    connection = Connection(
        transport,
        "__warm_up__",
        Serializer("__warm_up__", trusted=False),
        describe_end=lambda: "ended its warm-up",
        threads=False,
    )
    connection.serve()
    if transport.replies != calls:
        raise RuntimeError(f"the guest kernel's warm-up answered {transport.replies} of {calls} calls")
    # the pickler and unpickler of plain-data blocks, made (and pickle
    # imported) now rather than at a guest's first large value (inside a
    # message: the message itself is never a block)
    for _ in range(8):
        codec.loads(codec.dumps([list(range(64))], plain=True))
    codec_py.rendition_unpickler()  # (its class; a guest makes its reader at its first call)


#: set in a guest whose snapshot was taken after ``preload``: componentize-py
#: seeds ``random`` once per component at its first call, which was the
#: preload's, so each guest from that snapshot seeds it again
_RESEED_RANDOM = False


def _guest_io() -> None:
    """What the guest's code finds for input and asyncio: no stdin (it says
    so), and loops without the socket pair they cannot make here."""
    sys.stdin = NoStdin()
    guest_asyncio.install()


def preload(modules: List[str], link: Any) -> None:
    """Import ``modules`` as a guest with this link's paths would, for a
    snapshot of the guest taken right after (host/src/wasm/snapshot.rs)."""
    global _RESEED_RANDOM
    import gc
    import importlib

    _RESEED_RANDOM = True
    compiler.use_cached_bytecode()
    _guest_io()  # (the preload is the guest's code as any other)
    sys.path[:0] = [p for p in link.paths() if p not in sys.path]
    for name in modules:
        importlib.import_module(name)
    flush_stdio()
    # What the imports made stays as it is in the snapshot; left to the
    # collector, each guest's first full collection would write to every
    # object of it, and so copy every page the snapshot shares with the
    # other guests (CPython's advice for processes that share memory).
    gc.collect()
    gc.freeze()


def describe_failure(failure: BaseException) -> str:
    """A failed preload as the master shows it: the guest's traceback."""
    return "".join(traceback.format_exception(type(failure), failure, failure.__traceback__)).rstrip()


def main(link: Any = None) -> None:
    """Run the guest kernel until the master closes the link."""
    if link is None:  # the bindings exist only inside the component
        from wit_world.imports import link  # type: ignore[import-not-found,no-redef]
    references.reseed_instance_ids()  # every guest starts from the same snapshot
    if _RESEED_RANDOM:
        import random

        random.seed()
    compiler.use_cached_bytecode()  # the host's bytecode of its packages, if any
    kernel_state.TWIN_ID = link.twin_id()
    _guest_io()
    paths = list(link.paths())
    transport = HostTransport(link)
    # the host gives this guest the master's messages as pickles, which its C
    # unpickler reads faster than the CBOR (protocol/codec_py.py, "Renditions")
    handshake.send_hello(transport, EXECUTABLE, renditions=True)
    raw = transport.recv()
    if raw is None:  # the master gave up on us
        return
    serializer = Serializer("__master__", trusted=False)
    # the plain data first: the names in the welcome (initializers) may need
    # the guest's paths or the master's definitions applied
    plain = codec.loads(raw, lambda tag, value: None)
    handshake.check_welcome(plain)
    kernel_state.MASTER_ID = str(plain["master_id"])
    serializer.peer_id = kernel_state.MASTER_ID
    try:
        _apply_config(plain.get("config") or {}, paths)
        welcome, failure = serializer.decode(raw)
        config = welcome.get("config") or {}
        if failure is not None:
            raise failure
        handshake.run_initializers(config)
    except BaseException:
        handshake.send_failure(transport)
        return
    handshake.send_ready(transport)
    connection = Connection(
        transport,
        kernel_state.MASTER_ID,
        serializer,
        describe_end=lambda: "closed the link",
        after_request=flush_stdio,
        threads=False,
        share_values=False,  # (the master refuses shared values from a guest)
    )
    links.register(kernel_state.MASTER_ID, connection)
    transport.connection = connection
    if main_module.runs_main():
        # the main block runs like in the master (only if it lies in the guest's
        # paths); with one thread, requests that come meanwhile are served
        # whenever it waits for the master
        try:
            main_module.load()
        except BaseException:
            log.exception("the main module failed in guest %s", kernel_state.TWIN_ID)
            traceback.print_exc()
    connection.serve()
    run_exit_hooks()
    flush_stdio()
