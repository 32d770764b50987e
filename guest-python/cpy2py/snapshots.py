"""Snapshots of sandboxed guests taken after their ``preload`` imports.

A sandboxed twin with ``preload=["plugin"]`` (``TwinMaster``, a fresh twin,
``SandboxPool``) starts its guests from a snapshot: a copy of the guest
component whose memory starts where a guest's was once it had imported
those modules. Each guest then starts with them imported, instead of
importing them itself at every start (host/src/wasm/snapshot.rs takes it,
with wasmtime-wizer).

The first start of a given configuration makes the snapshot (a guest runs
the imports, then the new component is compiled for this machine: about
7-10 s on a 2-core machine, said on stderr) and caches it in
``<cache dir>/snapshots/<key>.wasm``. The key is what the imports could
depend on: the guest build, the modules, ``paths``, ``packages`` (their
files, and the size, times and inode of each of their modules and RECORDs
at this start: a reinstall or an edit in place; the snapshot of their
earlier version is then removed) and ``memory_limit``. Beside it,
``<key>.json`` records every ``*.py`` file under ``paths`` (what the guest
can see of them) with its size, its times (modified, and changed: which
nothing can set back, so a file rewritten with its old size and time is
told apart) and SHA-256: a later start that finds a file changed, added or
gone makes the snapshot again, so an edited plugin is never served from an
old one. The record is the master's own
walk of those directories, never what the guest says it read.

A twin without a preload starts its guests from the bare guest's snapshot
(``bare_start``), made once per guest build (about 5-9 s, said on stderr;
``just build`` makes it): its guests share the build's objects, made
immortal there, instead of copying the pages they touch.

Trust: the snapshot is the memory of a guest that ran the user's own
modules, under that twin's limits (the bare guest's: under the default
limits, and no code of the user's), no more than every guest of that twin
runs anyway; the master writes it, guests never see the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat as statmodule
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

from . import _logging
from .bytecode_cache import Interrupted, exclusive, say, writable
from .cache_dir import cache_root, file_digest
from .errors import TwinStartError
from .packages import Resolved, resolve

log = _logging.get_logger("snapshots")

#: what the host's error starts with when the guest failed its preload
#: (an import error, its limits), not the snapshot
_PRELOAD_FAILED = "the preload "
#: at most this many files under ``paths`` for a snapshot (each is checked
#: at every start)
MAX_RECORDED = 20_000
#: scratch files older than this (seconds) were left by a process that died
_SCRATCH_AGE = 3600
#: what says that a snapshot cannot be made (the host's refusals, the cache
#: directory's errors, a file edited meanwhile): its guests then import
#: their preload themselves. Anything else, and whatever a signal handler
#: raises while the host makes it (Ctrl-C, see ``_snapshot``), ends the start.
_CANNOT_MAKE = (TwinStartError, OSError, ValueError, RuntimeError)

#: guards ``_key_locks`` (a snapshot is made under its key's lock only)
_lock = threading.Lock()
_key_locks: Dict[str, threading.Lock] = {}
#: key -> its component once made or checked in this process; None: it
#: could not be made (guests import their preload themselves)
_known: Dict[str, Optional[str]] = {}
#: record file -> (its mtime, the files it lists), read once per process
_records: Dict[str, Any] = {}

#: a file as recorded: size, mtime (ns), SHA-256, ctime (ns)
Described = Dict[str, List[Any]]


#: (guest file, its size and time, modules, paths, memory limit) -> (the
#: packages' Resolved, (the key, its family, the guest build's stamp)):
#: packages.resolve gives the
#: same Resolved while their RECORDs are unchanged, and hashing their
#: listing costs more than a guest's start should (about 0.2 ms for markdown
#: and dateutil)
_keys: Dict[Tuple[Any, ...], Tuple[Resolved, Tuple[str, str, List[Any]]]] = {}


def _key(
    guest_file: str, modules: List[str], paths: List[str], packages: Resolved, sources: str, memory_limit: Any
) -> Tuple[str, str, List[Any]]:
    """What a snapshot's imports depend on, but for the contents of the
    files under ``paths`` (recorded beside it, see the module docs); its
    family: the same but for the packages' ``sources`` (the stamp of their
    modules), whose earlier snapshots a new one replaces; and the stamp of
    the guest build (as ``_guest_stamp``), recorded with it."""
    stat = os.stat(guest_file)
    seen = (guest_file, stat.st_size, stat.st_mtime_ns, tuple(modules), tuple(paths), memory_limit, sources)
    known = _keys.get(seen)
    if known is not None and known[0] is packages:
        return known[1]
    described = {
        "guest": [os.path.realpath(guest_file), stat.st_size, stat.st_mtime_ns],
        "modules": modules,
        "paths": paths,
        "packages": [[root, sorted(files)] for root, files in packages.listing],
        "memory_limit": memory_limit,
    }
    family = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]
    key = hashlib.sha256(f"{family} {sources}".encode()).hexdigest()[:32]
    _keys[seen] = (packages, (key, family, described["guest"]))
    return key, family, described["guest"]


def _sources(roots: List[str]) -> Iterator[Tuple[str, os.stat_result]]:
    """The ``*.py`` regular files under ``roots``, with their stat: what the
    guest's view of them holds (host/src/wasm/view.rs)."""
    count = 0
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(directory, name)
                try:
                    stat = os.stat(path)
                except OSError:
                    continue
                if statmodule.S_ISREG(stat.st_mode):
                    count += 1
                    if count > MAX_RECORDED:
                        raise ValueError(
                            f"more than {MAX_RECORDED} Python files under paths {roots}: too many to check "
                            "at every start (give the guest a directory of its own code)"
                        )
                    yield path, stat


def _describe(roots: List[str]) -> Described:
    return {
        path: [stat.st_size, stat.st_mtime_ns, file_digest(path), stat.st_ctime_ns]
        for path, stat in _sources(roots)
    }


def _unchanged(record: str, roots: List[str]) -> bool:
    """Whether the files under ``roots`` are those recorded: the same names,
    and each with the recorded size and times, or else the same contents
    (then its times are remembered for this process, so it is not read again)."""
    try:
        stamp = os.stat(record).st_mtime_ns
        known = _records.get(record)
        if known is None or known[0] != stamp:
            with open(record) as f:
                known = _records[record] = (stamp, json.load(f)["files"])
        files = known[1]
        seen = 0
        for path, stat in _sources(roots):
            seen += 1
            recorded = files.get(path)
            if recorded is None:
                return False  # a new file (it may shadow an imported one)
            if (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns) != (recorded[0], recorded[1], recorded[3]):
                if file_digest(path) != recorded[2]:
                    return False
                recorded[:2], recorded[3] = [stat.st_size, stat.st_mtime_ns], stat.st_ctime_ns
        return seen == len(files)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def snapshot_for(master: Any, start: Dict[str, Any]) -> Optional[str]:
    """The component to start ``master``'s guests from: a snapshot taken
    after its ``preload`` imports, made now if there is none or the files
    under its paths changed; without a preload, the bare guest's snapshot
    (``bare_start``). None when no snapshot can be made (the guest then
    starts from the guest build, and imports its preload itself), and for
    the twin that compiles the standard library's bytecode (its guest comes
    first). ``start`` holds what ``wasi.start_guest`` gives the host (the
    guest, its mounts, its paths). Raises TwinStartError when the preload
    fails."""
    if getattr(master, "compiles_bytecode", False):
        return None
    modules = list(master.preload or ())
    if not modules:
        start = bare_start(start)
    paths = list(start["paths"])
    key, family, guest = _key(
        start["guest"],
        modules,
        paths,
        start["resolved"],
        start["sources"],
        start["limits"].get("memory_limit"),
    )
    base = os.path.join(cache_root(), "snapshots")
    component = os.path.join(base, f"{key}.wasm")
    record = os.path.join(base, f"{key}.json")
    with _lock:
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:  # one snapshot of a key at a time; other keys go on
        if key in _known and (_known[key] is None or _unchanged(record, paths)):
            return _known[key]
        if not writable(base):
            if os.path.exists(component) and _unchanged(record, paths):
                _known[key] = component  # (made before: read-only, it serves all the same)
                return component
            log.info("the cache directory %s is not writable: guests import their preload themselves", base)
            _known[key] = None
            return None
        try:
            with exclusive(os.path.join(base, f"{key}.lock")):  # (another process may be making it)
                if not (os.path.exists(component) and _unchanged(record, paths)):
                    _make(master, start, modules, component, record, base, family, guest)
        except _PreloadFailed as failed:
            if not modules:  # (no code of the user's ran: the guest build serves)
                log.warning("no snapshot of the bare guest for %r: %s", master.twinterpreter_id, failed)
                _known[key] = None
                return None
            raise TwinStartError(f"sandboxed twin {master.twinterpreter_id!r}: {failed}") from None
        except Interrupted as interrupted:  # (not a reason to fall back: the start ends)
            raise interrupted.error from None
        except _CANNOT_MAKE as err:  # guests still work: they import their preload themselves
            if modules:
                twin = master.twinterpreter_id
                say(f"cpy2py: no snapshot for {twin!r} ({err}); its guests import {modules}\n")
            else:  # (its guests lose nothing but shared pages)
                log.info("no snapshot of the bare guest for %r: %s", master.twinterpreter_id, err)
            _known[key] = None
            return None
        _known[key] = component
    _sweep(base, keep=key, family=family)
    return component


def bare_start(start: Dict[str, Any]) -> Dict[str, Any]:
    """``start`` for the snapshot of the bare guest, which every twin
    without a preload starts its guests from: the guest build as it is,
    with its objects made immortal (cpy2py/kernel/snapshot_heap.py), which
    the build cannot do itself (only the host writes a snapshot's memory),
    so that its guests share the pages of the build's modules instead of
    each copying those it touches. It depends on the guest build alone: no
    paths, no packages, no bytecode cache (each guest mounts its own), and
    the default limits, whatever the twin's: its memory is the build's and
    what the walk over its objects added (a page or two), which any guest
    of the build needs anyway. If it cannot be made, guests start from the
    build itself."""
    empty = resolve(())
    return dict(start, paths=[], resolved=empty, sources=empty.sources_stamp(), pycache=None, limits={})


def _make(
    master: Any,
    start: Dict[str, Any],
    modules: List[str],
    component: str,
    record: str,
    base: str,
    family: str,
    guest: Optional[List[Any]],
) -> None:
    from . import _host

    # the preload is part of a start: bounded by the twin's timeout for a
    # call and by its handshake_timeout, whichever is shorter
    timeout = start["limits"].get("timeout", _host.WASI_DEFAULT_TIMEOUT)
    timeout = min(float("inf") if timeout is None else timeout, float(master.handshake_timeout))
    started_ns = time.time_ns()
    started = time.monotonic()
    # two whole lines: what the preload prints comes between them
    after = f"after importing {', '.join(modules)}" if modules else "with the objects of its build shared"
    say(f"cpy2py: snapshotting the WASI guest {after} (cached in {base}) ...\n")
    outcome = "failed"
    try:
        _snapshot(
            master.twinterpreter_id,
            start["guest"],
            start["stdlib"],
            modules,
            component,
            bundled_dir=start["bundled"],
            kernel_dir=start["kernel"],
            paths=start["paths"],
            packages=start["resolved"].listing,
            packages_stamp=start["sources"],
            pycache_dir=start["pycache"],
            cache_dir=os.environ.get("CPY2PY_CACHE_DIR") or None,
            memory_limit=start["limits"].get("memory_limit", _host.WASI_DEFAULT_MEMORY_LIMIT),
            timeout=timeout,
            output_limit=start["limits"].get("output_limit", _host.WASI_DEFAULT_OUTPUT_LIMIT),
        )
        try:
            files = _describe(list(start["paths"]))
            # (its change time too: a file rewritten with its old modification time)
            if any(max(described[1], described[3]) >= started_ns for described in files.values()):
                # edited while the guest imported it: which version it saw is unknown
                raise RuntimeError(
                    "a file under paths changed while the snapshot was made; the next start makes it"
                )
            if start["resolved"].sources_stamp() != start["sources"]:  # (the same, of the packages)
                raise RuntimeError(
                    "a module of its packages changed while the snapshot was made; the next start makes it"
                )
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(component)  # (no snapshot without its record)
            raise
        tmp = f"{record}.tmp{os.getpid()}"
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            roots = [root for root, _ in start["resolved"].listing]
            recorded = {"modules": modules, "files": files, "family": family, "roots": roots, "guest": guest}
            json.dump(recorded, f)
        os.replace(tmp, record)
        outcome = "was made"
    except TwinStartError as err:
        if str(err).startswith(_PRELOAD_FAILED):  # (with the guest's traceback: its controls written out)
            from .kernel.sandbox import written_out

            raise _PreloadFailed(written_out(str(err))) from None
        raise
    except BaseException as err:
        if isinstance(err, Interrupted) or not isinstance(err, _CANNOT_MAKE):
            outcome = "was interrupted"
        raise
    finally:
        say(f"cpy2py: the snapshot of the WASI guest {outcome} after {time.monotonic() - started:.1f} s\n")
    log.info("snapshot of the guest after importing %s: %s", modules, component)


def _guest_stamp(guest_file: str) -> Optional[List[Any]]:
    """The guest build a snapshot was made of: its path, size and time."""
    try:
        stat = os.stat(guest_file)
    except OSError:
        return None
    return [os.path.realpath(guest_file), stat.st_size, stat.st_mtime_ns]


class _PreloadFailed(Exception):
    """The preload failed in the guest (its import, its limits)."""


def _snapshot(*args: Any, **kwargs: Any) -> None:
    """``_host.WasiGuest.snapshot``, whose own failures are TwinStartErrors:
    anything else came from a signal handler."""
    from . import _host

    try:
        _host.WasiGuest.snapshot(*args, **kwargs)
    except TwinStartError:
        raise
    except BaseException as err:
        raise Interrupted(err) from None


def _sweep(base: str, keep: str, family: str) -> None:
    """Removes the snapshots whose recorded files or package directories
    are gone (those of a plugin directory that was deleted: a test's, say),
    those of a guest build since rebuilt or removed, and the others of
    ``keep``'s family (made of an earlier version of its packages' modules),
    with their compilations, and scratch files and components without a
    record that dead processes left. A key another process holds is left
    alone."""
    from . import _host

    for name in os.listdir(base):
        key, _, suffix = name.partition(".")
        if key == keep or suffix == "lock":
            continue
        path = os.path.join(base, name)
        try:
            if suffix != "json":
                orphan = suffix.startswith(("tmp", "json.tmp")) or (
                    suffix == "wasm" and not os.path.exists(os.path.join(base, f"{key}.json"))
                )
                if orphan and time.time() - os.stat(path).st_mtime > _SCRATCH_AGE:
                    os.remove(path)
                continue
            if not _stale(path, family):
                continue
            with _unheld(os.path.join(base, f"{key}.lock")) as free:
                # (read again under its lock: another process may have made it anew)
                if not free or not _stale(path, family):
                    continue
                component = os.path.join(base, f"{key}.wasm")
                _host.forget_compiled_guest(component, os.environ.get("CPY2PY_CACHE_DIR") or None)
                for leftover in (component, path):
                    with contextlib.suppress(OSError):
                        os.remove(leftover)
                _known.pop(key, None)
        except (OSError, ValueError, KeyError, TypeError):
            continue


def _stale(record: str, family: str) -> bool:
    """Whether the snapshot of ``record`` serves no start any more: made of
    an earlier version of ``family``'s packages, of a guest build since
    rebuilt or removed, or of files or package directories that are gone."""
    with open(record) as f:
        recorded = json.load(f)
    guest = recorded.get("guest")
    if recorded.get("family") == family or (guest and _guest_stamp(guest[0]) != guest):
        return True
    there = all(os.path.exists(file) for file in recorded["files"])
    return not (there and all(os.path.isdir(root) for root in recorded.get("roots", ())))


@contextlib.contextmanager
def _unheld(lock_file: str) -> Iterator[bool]:
    """Holds ``lock_file``'s lock if no process holds it (True), else False."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    with open(lock_file, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
