"""Where cpy2py keeps what it caches: compiled guests, their bytecode, the
twins' kernel bytecode; and the digest of a file that keys some of it."""

from __future__ import annotations

import os


def cache_root() -> str:
    """``$CPY2PY_CACHE_DIR``, else ``$XDG_CACHE_HOME/cpy2py``, else
    ``~/.cache/cpy2py`` (as the host's, host/src/wasm/config.rs)."""
    explicit = os.environ.get("CPY2PY_CACHE_DIR")
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return os.path.join(xdg, "cpy2py")
    return os.path.join(os.path.expanduser("~"), ".cache", "cpy2py")


def file_digest(path: str) -> str:
    """The SHA-256 of the file at ``path``, read a MiB at a time (hex)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
