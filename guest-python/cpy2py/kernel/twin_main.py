"""The kernel of a native twin: handshake with the master, then serve.

Started by the bootstrap that the master passes with ``-c``
(see ``cpy2py.master.BOOTSTRAP``).
"""

from __future__ import annotations

import _thread
import os
import sys

from .. import _logging, kernel_state
from ..protocol import codec
from ..protocol.transport import FdTransport
from . import handshake, links, main_module
from .connection import Connection
from .serialization import Serializer
from .stdio import MasterStdin, flush_stdio

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict

log = _logging.get_logger("twin")


def _apply_config(config: Dict[str, Any]) -> None:
    front = [p for p in config.get("app_paths", []) if p not in sys.path]
    sys.path[:0] = front
    sys.path.extend(p for p in config.get("site_paths", []) if p not in sys.path)
    if config.get("argv") is not None:
        sys.argv[:] = config["argv"]
    main_module.configure_twin(config.get("main_path"), config.get("main_name"), bool(config.get("run_main")))
    if config.get("main_definitions"):  # the initializers' source, from a master without a main file
        main_module.define(config["main_definitions"])


def main() -> None:
    read_fd, write_fd = (int(fd) for fd in os.environ.pop("__CPY2PY_FDS__").split(","))
    # the twin's own children must not hold the protocol pipes open
    os.set_inheritable(read_fd, False)
    os.set_inheritable(write_fd, False)
    _logging.configure_from_environment(kernel_state.TWIN_ID)
    transport = FdTransport(read_fd, write_fd)
    remote_host = os.environ.pop("__CPY2PY_REMOTE__", None)
    if remote_host is not None:  # on another host, over SSH (cpy2py/ssh.py)
        from . import remote_twin

        remote_twin.watch_link(read_fd)
        remote_twin.install(transport, remote_host)
    plain_blocks = handshake.wants_plain_blocks()
    # the same twins (the pure-Python codec, and C pickle) read the master's
    # messages as renditions, which C pickle reads faster than the codec
    # decodes CBOR (protocol/codec_py.py, "Renditions")
    handshake.send_hello(transport, sys.executable, plain_blocks, renditions=plain_blocks)
    raw = transport.recv()
    if raw is None:  # the master gave up on us
        os._exit(0)
    serializer = Serializer(kernel_state.MASTER_ID)
    # The plain data first: the names in the welcome (initializers,
    # finalizers) may live in the application's directories or its main
    # module, which this twin can import only once the configuration is applied.
    plain = codec.loads(raw, lambda tag, value: None)
    handshake.check_welcome(plain)
    try:
        _apply_config(plain["config"])
        welcome, failure = serializer.decode(raw)
        config = welcome["config"]
        if failure is not None:
            raise failure
        handshake.run_initializers(config)
    except BaseException:
        handshake.send_failure(transport)
        os._exit(1)
    handshake.send_ready(transport)
    log.info(
        "twin %s (%s %s) serving",
        kernel_state.TWIN_ID,
        sys.implementation.name,
        sys.version.split()[0],
    )
    connection = Connection(
        transport,
        kernel_state.MASTER_ID,
        serializer,
        describe_end=lambda: "closed the link",
        # asked to stop: end now, even if the main thread is busy with a call
        on_shutdown=_finish,
        after_request=flush_stdio,
        plain_blocks=plain_blocks,
    )
    links.register(kernel_state.MASTER_ID, connection)
    sys.stdin = MasterStdin(connection)  # input() in a twin reads what the master's user types
    if remote_host is not None:  # questions for modules go over the link now
        remote_twin.handshake_done()
    if main_module.runs_main():
        # the main block runs like in the master, while other threads serve
        connection.start_serving()
        try:
            main_module.load()
        except BaseException:
            log.exception("the main module failed in twin %s", kernel_state.TWIN_ID)
    connection.serve()
    _finish()


_finishing = _thread.allocate_lock()


def _finish() -> None:
    """Run the atexit hooks and end the process; the first thread to get here
    does it (the main thread when the link ended, or the one that read the
    master's shutdown request), any other waits for the end."""
    _finishing.acquire()
    log.info("twin %s done", kernel_state.TWIN_ID)
    from .group_state import run_exit_hooks

    run_exit_hooks()
    flush_stdio()
    # other threads may still run user code; the link is gone, so are we
    os._exit(0)
