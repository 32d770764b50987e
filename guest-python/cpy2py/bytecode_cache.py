"""Bytecode of a guest's standard library and packages, compiled once and
cached by the master.

A guest cannot write bytecode, so without this every guest compiles each
module it imports that is not in its snapshot (``pathlib``, ``email``,
markdown), again at every start. The first guest of a guest build (in a
cache directory) waits while a *compiler guest* compiles the whole standard
library (cpy2py/kernel/compiler.py: a guest that runs nothing but that
module; about 5 s), written to ``<cache dir>/pyc/stdlib-<key>/``; the first
guest with a given set of ``packages=`` (per guest build and set, keyed by
their RECORDs and their modules as they are, see below) waits while one
compiles them, written to
``<cache dir>/pyc/<key>/`` beside links to the standard library's. A guest
sees one of those directories read-only at ``/pycache`` and imports from
it. A set of packages has a directory of its own, so a guest sees the
bytecode of its own packages only.

The standard library's pycs are unchecked: a guest imports them without
reading the source (reading and hashing every source were 7-8 ms of the 56
that a guest took to import markdown and python-dateutil; the packages'
own, kept, about 4); their key is the guest
build (its file, size and time), which the standard library comes with (it
is not to be edited in place). Those of packages are checked against the
hash of their source, since those files can change under a running master;
so a stale file costs a compilation in the guest, never a wrong module. The
key of a set of packages holds their RECORDs and the size, times and inode
of each of their ``*.py`` files at this guest's start (packages.py), so a
module edited in place gets its bytecode made again once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

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
#: (guest file as named, its size, its mtime) -> the key of its standard library's bytecode
_stdlib_keys: Dict[Tuple[str, int, int], str] = {}


def _guest_key(guest_file: str) -> str:
    """The guest build: its file, size and time (the standard library is built with it)."""
    stat = os.stat(guest_file)
    return f"{os.path.realpath(guest_file)} {stat.st_size} {stat.st_mtime_ns}\n"


def _key(guest_file: str, packages: Resolved, stdlib: Optional[str], sources: str) -> str:
    digest = hashlib.sha256()
    digest.update(_guest_key(guest_file).encode())
    digest.update(f"stdlib {stdlib is not None}\n".encode())  # (its bytecode is linked in)
    for root, files in packages.listing:
        digest.update(f"{root}\n{len(files)}\n".encode())
        digest.update("\n".join(files).encode())
    digest.update(f"sources {sources}\n".encode())  # (a reinstall, a module edited in place)
    return digest.hexdigest()[:32]


def cache_for(
    guest_file: str, packages: Resolved, master: Any, sources: Optional[str] = None
) -> Optional[str]:
    """The directory of cached bytecode for a guest with ``packages``
    (compiled now if it is not there): the standard library's, with that
    of the packages beside it if there are any; None if it could not be
    made (the guest then compiles what it imports). ``sources``: the
    packages' ``sources_stamp()`` taken for this start (taken here if None)."""
    if getattr(master, "compiles_bytecode", False):
        return None
    stdlib = stdlib_cache(guest_file, master)
    if not packages.listing:
        return stdlib
    key = _key(guest_file, packages, stdlib, packages.sources_stamp() if sources is None else sources)
    with _lock:  # one compilation of a key at a time; others wait for it
        if key in _known:
            return _known[key]
        directory = os.path.join(cache_root(), "pyc", key)
        if not os.path.exists(os.path.join(directory, "complete")) and not writable(
            os.path.dirname(directory)
        ):
            _known[key] = None  # (each process would pay the compilation for nothing)
            return None
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
            except Interrupted as interrupted:  # (not a reason to fall back: the start ends)
                raise interrupted.error from None
            except Exception as err:  # guests still work, only slower
                log.warning("could not cache the bytecode of packages %s: %s", list(packages.names), err)
                _known[key] = None
                return None
        _known[key] = directory
        return directory


def stdlib_cache(guest_file: str, master: Any) -> Optional[str]:
    """The bytecode of the guest build's whole standard library, compiled at
    its first guest in this cache directory (about 5-8 s on a 2-core machine,
    13 MB; processes sharing the directory wait for one compilation), or
    None if it could not be made."""
    if getattr(master, "compiles_bytecode", False):
        return None
    stat = os.stat(guest_file)
    seen = (guest_file, stat.st_size, stat.st_mtime_ns)
    key = _stdlib_keys.get(seen)
    if key is None:  # (every guest start asks, twice: no realpath nor hash then)
        key = _stdlib_keys[seen] = (
            "stdlib-" + hashlib.sha256(_guest_key(guest_file).encode()).hexdigest()[:32]
        )
    with _lock:
        if key in _known:
            return _known[key]
        base = os.path.join(cache_root(), "pyc")
        directory = os.path.join(base, key)
        if not os.path.isdir(directory) and not writable(base):
            log.info("the cache directory %s is not writable: guests compile the standard library", base)
            _known[key] = None
            return None
        try:
            with exclusive(os.path.join(base, f"{key}.lock")):  # (another process may compile it)
                if not os.path.isdir(directory):
                    _compile_stdlib(guest_file, master, directory)
        except Interrupted as interrupted:  # (not a reason to fall back: the start ends)
            raise interrupted.error from None
        except Exception as err:  # guests still work, only slower
            log.warning("could not cache the bytecode of the guest's standard library: %s", err)
            _known[key] = None
            return None
        _known[key] = directory
        return directory


def _compile_stdlib(guest_file: str, master: Any, directory: str) -> None:
    """Compiles the standard library into a scratch directory of its own,
    renamed to ``directory`` when whole; records which guest file it is for
    beside it (where guests do not see it), and removes what earlier builds
    of that file left."""
    from .kernel.compiler import compile_stdlib

    base = os.path.dirname(directory)
    scratch = tempfile.mkdtemp(dir=base, prefix=os.path.basename(directory) + ".tmp")
    started, outcome, announced = time.monotonic(), "failed", False

    def announce() -> None:  # (once the compiler guest runs: its own first use says so first)
        nonlocal started, announced
        started, announced = time.monotonic(), True
        say(f"cpy2py: compiling the WASI guest's standard library (first use; cached in {base}) ...")

    try:
        written = _write(_compiled(master, compile_stdlib, [], (), announce), scratch)
        stat = os.stat(guest_file)
        with open(f"{directory}.json", "w") as f:
            json.dump(
                {"guest": os.path.realpath(guest_file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}, f
            )
        os.rename(scratch, directory)
        outcome = "done"
    except BaseException as err:
        if not isinstance(err, Exception):  # Ctrl-C: the compiler guest is stopped below
            outcome = "interrupted"
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # (gone when renamed)
        if announced:
            say(f" {outcome} after {time.monotonic() - started:.1f} s\n")
    _remove_replaced(guest_file, directory)
    log.info("cached the bytecode of the guest's standard library (%d modules) in %s", written, directory)


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
    """Holds an exclusive lock on the file at ``path`` (where ``fcntl`` exists)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def say(text: str) -> None:
    """A line of progress on stderr, if there is one that takes it."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):
        pass


def writable(directory: str) -> bool:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


#: scratch directories older than this (seconds) were left by a process that died
_SCRATCH_AGE = 3600


def _remove_replaced(guest_file: str, kept: str) -> None:
    """Removes the standard library bytecode of earlier builds of this guest
    file (13 MB each; one per guest file stays), and scratch directories that
    dead processes left. (A guest of an earlier build still running then
    compiles what it imports.)"""
    base, path = os.path.dirname(kept), os.path.realpath(guest_file)
    for name in os.listdir(base):
        other = os.path.join(base, name)
        if not name.startswith("stdlib-") or other == kept or name.endswith(".lock"):
            continue
        if ".tmp" in name:
            try:
                if time.time() - os.stat(other).st_mtime > _SCRATCH_AGE:
                    shutil.rmtree(other, ignore_errors=True)
            except OSError:
                pass
            continue
        if not name.endswith(".json") or other == f"{kept}.json":
            continue
        try:
            with open(other) as f:
                replaced = json.load(f).get("guest") == path
        except (OSError, ValueError, AttributeError):
            continue
        if replaced:
            shutil.rmtree(other[: -len(".json")], ignore_errors=True)
            for leftover in (other, other[: -len(".json")] + ".lock"):
                try:
                    os.remove(leftover)
                except OSError:
                    pass


def _compiled(
    master: Any, function: Any, args: List[Any], packages: Any, announce: Any = None
) -> List[Tuple[str, bytes]]:
    """What ``function(*args)`` returns in a compiler guest with ``packages``
    (``announce()`` once the guest runs)."""
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
    try:
        twin = compiler._spawn()  # not started as a twin of the group: no initializers, no finalizers
        try:
            if announce is not None:
                announce()
            return twin.connection.request(OP_EXECUTE, function, args, {})
        finally:
            twin.shut_down("compiled bytecode", timeout=0)
    except Exception as err:
        if _from_the_compiler(err):
            raise
        raise Interrupted(err) from None


class Interrupted(BaseException):
    """What a signal handler raised while the master waited for bytecode or
    a snapshot (an alarm's TimeoutError; Ctrl-C goes past as it is), carried
    past the fallback that lets guests work without them: it ends the start."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


def _from_the_compiler(err: BaseException) -> bool:
    """Whether ``err`` says that the compiler guest could not do its work (it
    failed to start, ended, raised, or the cache could not be written), not
    what a signal handler of the master raised meanwhile."""
    from .errors import RemoteError, RemoteTraceback, TwinError

    if isinstance(err, (TwinError, RemoteError)) or isinstance(err.__cause__, RemoteTraceback):
        return True
    # (an alarm's TimeoutError is an OSError too)
    return isinstance(err, (OSError, ValueError)) and not isinstance(err, TimeoutError)


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
