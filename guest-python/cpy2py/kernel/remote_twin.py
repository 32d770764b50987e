"""In a twin on another host (started over SSH, ``cpy2py/ssh.py``, or placed
on Ray, ``cpy2py/ray.py``): modules from the master, and an end with the link.

- Imports the twin's own installation cannot satisfy are asked of the
  master (``kernel/module_server.py``), which sends the module's Python
  source: a script run on the master works remotely with nothing installed
  there. The finder comes last in ``sys.meta_path``: what the remote host
  has installed itself wins. During the handshake (the welcome may name
  functions of the application) the question goes as a handshake frame
  ``{"module": name}``; afterwards as an ordinary call over the link.
- The twin ends when its link closes, even while it runs a call: SSH does
  not stop a remote command whose connection dropped, and a remote twin has
  no parent-death signal tied to the master.
"""

from __future__ import annotations

import _thread
import os
import sys

from .. import kernel_state
from ..protocol import codec
from ..protocol.messages import OP_EXECUTE
from . import links, main_module
from .module_server import MAIN, module_source

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, List, Optional

    from ..protocol.transport import Transport

#: how long an idle twin whose link closed may take to end by itself (its
#: exit hooks run) before the watcher ends it
EXIT_GRACE = 1.0

_handshake: Optional[Transport] = None


def install(transport: Transport, host: str) -> None:
    """Serve missing modules from the master; ``transport`` carries the
    questions until the link's connection exists (``handshake_done``)."""
    global _handshake
    _handshake = transport
    sys.meta_path.append(MasterModules(host))
    main_module.main_spec_hook = _main_spec


def handshake_done() -> None:
    global _handshake
    _handshake = None


def _ask(name: str) -> Optional[List[Any]]:
    connection = links.existing_connection(kernel_state.MASTER_ID)
    if connection is not None:
        return connection.request(OP_EXECUTE, module_source, [name], {})
    if _handshake is not None:
        _handshake.send(codec.dumps({"module": name}))
        raw = _handshake.recv()
        answer = codec.loads(raw) if raw else None
        if not isinstance(answer, dict) or "module" not in answer:
            raise ImportError(f"the master did not answer the question for module {name!r}", name=name)
        return answer["module"]
    return None


class _SourceLoader:
    """Runs a module from the source the master sent (and shows it in tracebacks)."""

    def __init__(self, source: bytes) -> None:
        self.source = source

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        exec(compile(self.source, module.__spec__.origin, "exec"), module.__dict__)

    def get_source(self, name: str) -> str:
        return self.source.decode("utf-8")


def _spec(name: str, answer: List[Any]) -> Any:
    from importlib.machinery import ModuleSpec

    origin, is_package, source = answer
    spec = ModuleSpec(name, _SourceLoader(source), origin=origin, is_package=is_package)
    spec.has_location = True
    return spec


class MasterModules:
    """The meta path finder of modules served by the master."""

    def __init__(self, host: str) -> None:
        self.host = host
        #: names the master has not got either (asked once)
        self.missing: set = set()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name in self.missing or name == "cpy2py" or name.startswith("cpy2py."):
            return None
        if links.existing_connection(kernel_state.MASTER_ID) is None and _handshake is None:
            return None  # the link is down (or not up yet): nobody to ask
        with _without_global_import_lock():
            answer = _ask(name)
        if answer is None:
            self.missing.add(name)
            return None
        if answer[2] is None:
            raise ImportError(
                f"module {name!r} is not installed on host {self.host!r} and the master's copy "
                f"({answer[0]}) is compiled code, which the master cannot send: install it there",
                name=name,
            )
        return _spec(name, answer)


class _without_global_import_lock:
    """importlib calls a finder holding the global import lock; a question to
    the master must not: the thread that reads its answer, or runs a
    request of the master meanwhile, may need that lock (to import
    anything). The module's own lock stays held, so other threads importing
    the same module still wait for this one."""

    def __enter__(self) -> None:
        import _imp

        self.depth = 0
        while True:
            try:
                _imp.release_lock()
            except RuntimeError:  # no longer held by this thread
                break
            self.depth += 1

    def __exit__(self, *exc_info: Any) -> None:
        import _imp

        for _ in range(self.depth):
            _imp.acquire_lock()


def _main_spec(run_name: str) -> Any:
    answer = _ask(MAIN)
    if answer is None:
        raise ImportError("the master's main module has no file to send to this twin")
    return _spec(run_name, answer)


def watch_link(read_fd: int) -> None:
    """End this process once the link's read end hangs up (poll reports a
    hang-up without asking for it, and without reading anything). A TCP link
    (a twin placed on Ray) whose peer closed shows it as POLLRDHUP instead:
    asked for too (a pipe never reports it)."""

    def watch() -> None:
        import select
        import time

        poller = select.poll()
        poller.register(read_fd, getattr(select, "POLLRDHUP", 0))
        while not poller.poll():
            pass
        time.sleep(EXIT_GRACE)
        os._exit(1)

    _thread.start_new_thread(watch, ())
