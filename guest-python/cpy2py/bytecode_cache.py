"""Bytecode of a guest's standard library and packages, compiled once and
cached by the master.

A guest cannot write bytecode, so without this every guest compiles each
module it imports that is not in its snapshot (``pathlib``, ``email``,
markdown), again at every start. The first guest of a guest build (in a
cache directory) waits while a *compiler guest* compiles the whole standard
library (cpy2py/kernel/compiler.py: a guest that runs nothing but that
module; about 5 s), written to ``<cache dir>/pyc/stdlib-<key>/``; the first
guest with a given set of ``packages=`` (per guest build and set, keyed by
their RECORDs) waits while one compiles them, written to
``<cache dir>/pyc/<key>/`` beside links to the standard library's. A guest
sees one of those directories read-only at ``/pycache`` and imports from
it. A set of packages has a directory of its own, so a guest sees the
bytecode of its own packages only. Bytecode is checked against the hash of
its source at import, so a stale file costs a compilation in the guest,
never a wrong module.

Trust: the bytecode comes from a guest that ran only cpy2py's own code on
the sources, and it is written by the master; guests never write to the
cache. Its directory is the user's, as for compiled guests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from . import _logging, kernel_state
from .cache_dir import cache_root
from .packages import Resolved

log = _logging.get_logger("bytecode")

#: seconds a compiler guest may take (the standard library takes about 5 on
#: a 2-core machine): past that, guests compile what they import themselves
COMPILE_TIMEOUT = 300.0

#: key -> its directory (or None: compiling failed, guests compile themselves)
_known: Dict[str, Optional[str]] = {}
_lock = threading.Lock()


def _guest_key(guest_file: str) -> str:
    """The guest build: its file, size and time (the standard library is built with it)."""
    stat = os.stat(guest_file)
    return f"{os.path.realpath(guest_file)} {stat.st_size} {stat.st_mtime_ns}\n"


def _key(guest_file: str, packages: Resolved, stdlib: Optional[str]) -> str:
    digest = hashlib.sha256()
    digest.update(_guest_key(guest_file).encode())
    digest.update(f"stdlib {stdlib is not None}\n".encode())  # (its bytecode is linked in)
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
    (compiled now if it is not there): the standard library's, with that
    of the packages beside it if there are any; None if it could not be
    made (the guest then compiles what it imports)."""
    if getattr(master, "compiles_bytecode", False):
        return None
    stdlib = _stdlib_cache(guest_file, master)
    if not packages.listing:
        return stdlib
    key = _key(guest_file, packages, stdlib)
    with _lock:  # one compilation of a key at a time; others wait for it
        if key in _known:
            return _known[key]
        directory = os.path.join(cache_root(), "pyc", key)
        if not os.path.exists(os.path.join(directory, "complete")):
            try:
                from .kernel.compiler import compile_for_cache

                sources = [
                    os.path.join(r, f) for r, files in packages.listing for f in files if f.endswith(".py")
                ]
                written = _write(_compiled(master, compile_for_cache, [sources], packages.names), directory)
                if stdlib is not None:
                    _link_tree(stdlib, directory)  # one directory is the guest's /pycache
                with open(os.path.join(directory, "complete"), "w") as f:
                    f.write(f"{written} files for packages {list(packages.names)}\n")
                log.info(
                    "cached the bytecode of %d modules for packages %s in %s",
                    written,
                    list(packages.names),
                    directory,
                )
            except Exception as err:  # guests still work, only slower
                log.warning("could not cache the bytecode of packages %s: %s", list(packages.names), err)
                _known[key] = None
                return None
        _known[key] = directory
        return directory


def _stdlib_cache(guest_file: str, master: Any) -> Optional[str]:
    """The bytecode of the guest build's whole standard library, compiled at
    its first guest in this cache directory (about 5 s on a 2-core machine,
    13 MB), or None if it could not be made."""
    key = "stdlib-" + hashlib.sha256(_guest_key(guest_file).encode()).hexdigest()[:32]
    with _lock:
        if key in _known:
            return _known[key]
        directory = os.path.join(cache_root(), "pyc", key)
        if not os.path.isdir(directory) and not _writable(os.path.dirname(directory)):
            log.info("the cache directory %s is not writable: guests compile the standard library", directory)
            _known[key] = None
            return None
        if not os.path.isdir(directory):
            try:
                from .kernel.compiler import compile_stdlib

                # made beside it and renamed: another process that compiles it
                # meanwhile finds a whole directory or none
                scratch = f"{directory}.tmp{os.getpid()}"
                shutil.rmtree(scratch, ignore_errors=True)
                started = time.monotonic()
                sys.stderr.write(
                    "cpy2py: compiling the WASI guest's standard library to bytecode "
                    f"(first use; cached in {os.path.dirname(directory)}) ..."
                )
                sys.stderr.flush()
                try:
                    written = _write(_compiled(master, compile_stdlib, [], ()), scratch)
                finally:
                    outcome = "done" if os.path.isdir(scratch) else "failed"
                    sys.stderr.write(f" {outcome} after {time.monotonic() - started:.1f} s\n")
                with open(os.path.join(scratch, "guest"), "w") as f:
                    f.write(_guest_key(guest_file))
                try:
                    os.rename(scratch, directory)
                except OSError:  # another process was first
                    shutil.rmtree(scratch, ignore_errors=True)
                _remove_replaced(guest_file, directory)
                log.info(
                    "cached the bytecode of the guest's standard library (%d modules) in %s",
                    written,
                    directory,
                )
            except Exception as err:  # guests still work, only slower
                shutil.rmtree(f"{directory}.tmp{os.getpid()}", ignore_errors=True)
                log.warning("could not cache the bytecode of the guest's standard library: %s", err)
                _known[key] = None
                return None
        _known[key] = directory
        return directory


def _writable(directory: str) -> bool:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


def _remove_replaced(guest_file: str, kept: str) -> None:
    """Removes the standard library bytecode of earlier builds of this guest
    file (13 MB each): one per guest file stays. (A guest of an earlier build
    still running then compiles what it imports.)"""
    path = os.path.realpath(guest_file) + " "
    for name in os.listdir(os.path.dirname(kept)):
        other = os.path.join(os.path.dirname(kept), name)
        if not name.startswith("stdlib-") or other == kept or ".tmp" in name:
            continue
        try:
            with open(os.path.join(other, "guest")) as f:
                replaced = f.read().startswith(path)
        except OSError:
            continue
        if replaced:
            shutil.rmtree(other, ignore_errors=True)


def _compiled(master: Any, function: Any, args: List[Any], packages: Any) -> List[Tuple[str, bytes]]:
    """What ``function(*args)`` returns in a compiler guest with ``packages``."""
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
        timeout=COMPILE_TIMEOUT,
        memory_limit=max(int(master.memory_limit or 0), 1 << 30),
        packages=list(packages),
    )
    twin = compiler._spawn()  # not started as a twin of the group: no initializers, no finalizers
    try:
        return twin.connection.request(OP_EXECUTE, function, args, {})
    finally:
        twin.shut_down("compiled bytecode", timeout=0)


def _write(compiled: List[Tuple[str, bytes]], directory: str) -> int:
    """Writes the compiler's pycs under ``directory``; how many."""
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
    os.makedirs(directory, exist_ok=True)
    return written


def _link_tree(source: str, directory: str) -> None:
    """Hard links (copies where links fail) of the files under ``source``
    into ``directory``, but for those it has."""
    for root, _, files in os.walk(source):
        target_root = os.path.join(directory, os.path.relpath(root, source))
        os.makedirs(target_root, exist_ok=True)
        for name in files:
            target = os.path.join(target_root, name)
            if os.path.exists(target):
                continue
            try:
                os.link(os.path.join(root, name), target)
            except FileExistsError:
                pass
            except OSError:
                shutil.copyfile(os.path.join(root, name), target)
