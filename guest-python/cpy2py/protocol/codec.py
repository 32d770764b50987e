"""The codec in use: the compiled one from ``cpy2py._host`` where it imports
(CPython >= 3.9 with the abi3 extension), the pure-Python one elsewhere (PyPy,
the WASI guest). Both pass the same vectors and give identical bytes.

``CPY2PY_PURE_CODEC=1`` forces the pure-Python codec (but for
``guest_loads``, which decodes what sandboxed guests send).

Both ``loads`` take ``budget=`` (bytes of decoded objects; None: no limit).
Frames from a sandboxed guest are decoded with
``loads(raw, hook, budget=sandbox_budget(len(raw)))`` (docs/protocol.md,
"Decoding budget").
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

if os.environ.get("CPY2PY_PURE_CODEC"):
    from .codec_py import dumps, loads, peek, small_reply

    IMPLEMENTATION = "python"
    try:  # frames from guests: see guest_loads
        from cpy2py._host import loads as guest_loads
    except ImportError:
        guest_loads = loads
else:
    try:
        from cpy2py._host import dumps, loads, peek  # type: ignore[no-redef]

        IMPLEMENTATION = "compiled"
        small_reply = None  # (the compiled dumps is as quick)
    except ImportError:
        from .codec_py import dumps, loads, peek, small_reply

        IMPLEMENTATION = "python"
    guest_loads = loads

#: the bytes of a reply ``[kind, id, value]`` of a scalar, written in one go
#: by the pure-Python codec (None: ask ``dumps``), or None with the compiled one
small_reply: Any

#: ``loads`` of frames from sandboxed guests (decoded under a budget): the
#: compiled codec's wherever it imports, even where the pure-Python one was
#: asked for, which does not estimate plain-data blocks
guest_loads: Any


def __getattr__(name: str) -> Any:
    # ``sandbox_budget`` (and ``codec_py`` itself) load the pure-Python codec
    # on first use only: a CPython twin with the compiled codec never needs it
    if name in ("sandbox_budget", "codec_py"):
        from . import codec_py

        globals().update(sandbox_budget=codec_py.sandbox_budget, codec_py=codec_py)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["dumps", "loads", "peek", "small_reply", "guest_loads", "sandbox_budget", "IMPLEMENTATION"]  # noqa: F822 (sandbox_budget: __getattr__)
