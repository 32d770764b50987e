"""The twin's side of the handshake, shared by both entry points
(``twin_main.py`` for native twins, ``guest_main.py`` for the WASI guest):
hello, the version check of the welcome, initializers, ready or the error
(docs/protocol.md, "Handshake"). Finalizers are not the twin's to run: the
master runs them right after the start (kernel/group_state.py).

What differs stays with the entry points: how the welcome is decoded (a
native twin applies its paths before it decodes names, a guest decodes
without pickle) and how a failure ends the interpreter.
"""

from __future__ import annotations

import os
import sys

from .. import kernel_state
from ..errors import ProtocolError
from ..protocol import codec
from ..protocol.messages import PROTOCOL_VERSION
from .stdio import flush_stdio

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict

    from ..protocol.transport import Transport


def send_hello(
    transport: Transport, executable: str, plain_blocks: bool = False, renditions: bool = False
) -> None:
    """The first frame: who this twin is (checked by the host, handshake.rs),
    whether its link carries plain-data blocks (``plain_blocks``), and
    whether it reads the host's renditions of the master's messages
    (``renditions``: a WASI guest, a twin with the pure-Python codec), which
    it then does from the first frame on, the welcome (protocol/codec_py.py,
    "Renditions")."""
    hello = {
        "cpy2py": PROTOCOL_VERSION,
        "twin_id": kernel_state.TWIN_ID,
        "implementation": sys.implementation.name,
        "version": ".".join(map(str, sys.version_info[:3])),
        "executable": executable,
        "pid": os.getpid(),
    }
    if plain_blocks:
        hello["plain_blocks"] = True
    if renditions:
        hello["renditions"] = True
        codec.codec_py.read_renditions()
    transport.send(codec.dumps(hello))


def wants_plain_blocks() -> bool:
    """Whether this native twin's link should carry large plain containers
    as plain-data blocks: it has the pure-Python codec only (a twin on
    another host: the compiled one is not sent) and CPython's C pickle,
    which reads and writes them several times faster. Not on PyPy, whose
    pickle is slower than its codec (benches/README.md)."""
    if codec.IMPLEMENTATION != "python" or sys.implementation.name != "cpython":
        return False
    try:
        import _pickle  # noqa: F401
    except ImportError:
        return False
    return True


def check_welcome(welcome: Any) -> Dict[str, Any]:
    """The welcome's protocol version must be ours; returns its config."""
    version = welcome.get("cpy2py") if isinstance(welcome, dict) else None
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"the master speaks cpy2py protocol {version}, this twin speaks protocol {PROTOCOL_VERSION}"
        )
    return welcome.get("config") or {}


def run_initializers(config: Dict[str, Any]) -> None:
    for func, args, kwargs in config.get("initializers", []):
        func(*args, **kwargs)


def send_ready(transport: Transport) -> None:
    transport.send(codec.dumps({"ready": True}))


def send_failure(transport: Transport) -> None:
    """Tell the master why the start failed (the exception being handled)."""
    import traceback

    transport.send(codec.dumps({"error": traceback.format_exc()}))
    flush_stdio()
