"""Bytecode of a guest's packages, compiled once and cached by the master.

A guest cannot write bytecode, so without this every guest that imports
markdown compiles it (and the standard library modules it needs) again.
The first guest started with a given set of ``packages=`` (per guest build
and set, keyed by their RECORDs) waits while a *compiler guest* compiles
them (cpy2py/kernel/compiler.py: a guest that runs nothing but that
module), and the master writes the result to
``<cache dir>/pyc/<key>/``; every guest given the same set sees that
directory read-only at ``/pycache`` and imports from it. A key has a
directory of its own, so a guest sees the bytecode of its own packages
only. Bytecode is checked against the hash of its source at import, so a
stale file costs a compilation in the guest, never a wrong module.

Trust: the bytecode comes from a guest that ran only cpy2py's own code on
the sources, and it is written by the master; guests never write to the
cache. Its directory is the user's, as for compiled guests.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any, Dict, List, Optional, Tuple

from . import _logging, kernel_state
from .cache_dir import cache_root
from .packages import Resolved

log = _logging.get_logger("bytecode")

#: key -> its directory (or None: compiling failed, guests compile themselves)
_known: Dict[str, Optional[str]] = {}
_lock = threading.Lock()


def _key(guest_file: str, packages: Resolved) -> str:
    digest = hashlib.sha256()
    stat = os.stat(guest_file)
    digest.update(f"{os.path.realpath(guest_file)} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    for root, files in packages.listing:
        digest.update(f"{root}\n{len(files)}\n".encode())
        digest.update("\n".join(files).encode())
    for record in packages.records:
        try:
            digest.update(f"{record} {os.stat(record).st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{record} gone\n".encode())
    return digest.hexdigest()[:32]


def cache_for(guest_file: str, packages: Resolved, master: Any) -> Optional[str]:
    """The directory of cached bytecode for a guest with ``packages``
    (compiled now if it is not there), or None (no packages, or it could
    not be made: the guest then compiles what it imports)."""
    if not packages.listing or getattr(master, "compiles_bytecode", False):
        return None
    key = _key(guest_file, packages)
    with _lock:  # one compilation of a key at a time; others wait for it
        if key in _known:
            return _known[key]
        directory = os.path.join(cache_root(), "pyc", key)
        if not os.path.exists(os.path.join(directory, "complete")):
            try:
                _compile(guest_file, packages, master, directory)
            except Exception as err:  # guests still work, only slower
                log.warning("could not cache the bytecode of packages %s: %s", list(packages.names), err)
                _known[key] = None
                return None
        _known[key] = directory
        return directory


def _compile(guest_file: str, packages: Resolved, master: Any, directory: str) -> None:
    from .kernel.compiler import compile_for_cache
    from .master import TwinMaster
    from .protocol.messages import OP_EXECUTE, PROTOCOL_VERSION

    class BytecodeCompiler(TwinMaster):
        """A guest with the packages only, whose welcome carries no
        initializers and no main module: it runs nothing but cpy2py."""

        compiles_bytecode = True

        def _welcome(self, serializer: Any) -> Tuple[Dict[str, Any], List[Any]]:
            config = {"run_main": False, "argv": None, "initializers": []}
            return {"cpy2py": PROTOCOL_VERSION, "master_id": kernel_state.MASTER_ID, "config": config}, []

    compiler = BytecodeCompiler(
        executable=master.executable,
        twinterpreter_id=f"{master.twinterpreter_id}.bytecode",
        main_module=False,
        handshake_timeout=master.handshake_timeout,
        timeout=float("inf"),
        memory_limit=max(int(master.memory_limit or 0), 1 << 30),
        packages=list(packages.names),
    )
    sources = [os.path.join(root, f) for root, files in packages.listing for f in files if f.endswith(".py")]
    twin = compiler._spawn()  # not started as a twin of the group: no initializers, no finalizers
    try:
        compiled = twin.connection.request(OP_EXECUTE, compile_for_cache, [sources], {})
    finally:
        twin.shut_down("compiled bytecode", timeout=0)
    written = 0
    for relative, data in compiled:
        parts = relative.split("/")
        if not relative.endswith(".pyc") or any(p in ("", ".", "..") for p in parts):
            continue  # (the compiler is ours; a path out of the directory is refused all the same)
        target = os.path.join(directory, *parts)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        written += 1
    with open(os.path.join(directory, "complete"), "w") as f:
        f.write(f"{written} files for packages {list(packages.names)}\n")
    log.info(
        "cached the bytecode of %d modules for packages %s in %s", written, list(packages.names), directory
    )
