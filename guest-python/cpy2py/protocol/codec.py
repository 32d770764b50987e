"""The codec in use: the compiled one from ``cpy2py._host`` where it imports
(CPython >= 3.9 with the abi3 extension), the pure-Python one elsewhere (PyPy,
the WASI guest). Both pass the same vectors and give identical bytes.

``CPY2PY_PURE_CODEC=1`` forces the pure-Python codec.

Both ``loads`` take ``budget=`` (bytes of decoded objects; None: no limit).
Frames from a sandboxed guest are decoded with
``loads(raw, hook, budget=sandbox_budget(len(raw)))`` (docs/protocol.md,
"Decoding budget").
"""

from __future__ import annotations

import os

from . import codec_py
from .codec_py import sandbox_budget

if os.environ.get("CPY2PY_PURE_CODEC"):
    dumps, loads, peek = codec_py.dumps, codec_py.loads, codec_py.peek
    IMPLEMENTATION = "python"
else:
    try:
        from cpy2py._host import dumps, loads, peek  # type: ignore[no-redef]

        IMPLEMENTATION = "compiled"
    except ImportError:
        dumps, loads, peek = codec_py.dumps, codec_py.loads, codec_py.peek
        IMPLEMENTATION = "python"

__all__ = ["dumps", "loads", "peek", "sandbox_budget", "IMPLEMENTATION"]
