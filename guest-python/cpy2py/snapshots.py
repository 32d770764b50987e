"""Snapshots of sandboxed guests taken after their ``preload`` imports.

A sandboxed twin with ``preload=["plugin"]`` (``TwinMaster``, a fresh twin,
``SandboxPool``) starts its guests from a snapshot: a copy of the guest
component whose memory starts where a guest's was once it had imported
those modules. Each guest then starts with them imported, instead of
importing them itself at every start (host/src/wasm/snapshot.rs takes it,
with wasmtime-wizer).

The first start of a given configuration makes the snapshot (a guest runs
the imports, then the new component is compiled for this machine: about
15-25 s on a 2-core machine, said on stderr) and caches it in
``<cache dir>/snapshots/<key>.wasm``. The key is what the imports could
depend on: the guest build, the modules, ``paths``, ``packages`` and
``memory_limit``. Beside it, ``<key>.json`` records the files the imports
read (those under ``paths`` and of the packages) with their size, time and
SHA-256: a later start whose files differ makes the snapshot again, so an
edited plugin is never served from an old one.

Trust: the snapshot is the memory of a guest that ran the user's own
modules, no more than every guest of that twin runs anyway; the master
writes it, guests never see the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat as statmodule
import threading
import time
from typing import Any, Dict, List, Optional

from . import _logging
from .bytecode_cache import exclusive, say, writable
from .cache_dir import cache_root
from .errors import TwinStartError
from .packages import Resolved

log = _logging.get_logger("snapshots")

#: what the host's error starts with when the guest failed its preload
#: (an import error, its limits), not the snapshot
_PRELOAD_FAILED = "the preload "

_lock = threading.Lock()
#: key -> its component once made or checked in this process; None: it
#: could not be made (guests import their preload themselves)
_known: Dict[str, Optional[str]] = {}


def _key(guest_file: str, modules: List[str], paths: List[str], packages: Resolved, memory_limit: Any) -> str:
    """What a snapshot's imports depend on, but for the contents of the
    files they read (recorded beside it, see the module docs)."""
    stat = os.stat(guest_file)
    described = {
        "guest": [os.path.realpath(guest_file), stat.st_size, stat.st_mtime_ns],
        "modules": modules,
        "paths": paths,
        "packages": [[root, sorted(files)] for root, files in packages.listing],
        "records": [[r, os.stat(r).st_mtime_ns if os.path.exists(r) else None] for r in packages.records],
        "memory_limit": memory_limit,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


#: at most this many files recorded for a snapshot
MAX_RECORDED = 20_000


def _describe(files: List[str], roots: List[str]) -> Dict[str, List[Any]]:
    """Size, time and SHA-256 of the files the guest says its preload read.
    The list comes from the guest, which ran the preloaded code: only
    regular files under its own roots are looked at (never a device, a
    pipe, or a file elsewhere on the host)."""
    if len(files) > MAX_RECORDED:
        raise ValueError(f"the guest named {len(files)} files for its snapshot (at most {MAX_RECORDED})")
    inside = [os.path.join(os.path.realpath(root), "") for root in roots]
    described = {}
    for path in files:
        if not isinstance(path, str):
            continue
        real = os.path.realpath(path)
        if not any(real.startswith(root) for root in inside):
            continue
        try:
            stat = os.stat(real)
        except OSError:
            continue
        if statmodule.S_ISREG(stat.st_mode):
            described[real] = [stat.st_size, stat.st_mtime_ns, _digest(real)]
    return described


#: record file -> (its mtime, the files it lists), read once per process
_records: Dict[str, Any] = {}


def _unchanged(record: str) -> bool:
    """Whether the files the snapshot's imports read are as recorded (a file
    whose size or time changed is compared by its contents)."""
    try:
        stamp = os.stat(record).st_mtime_ns
        known = _records.get(record)
        if known is None or known[0] != stamp:
            with open(record) as f:
                known = _records[record] = (stamp, json.load(f)["files"])
        for path, (size, mtime_ns, digest) in known[1].items():
            stat = os.stat(path)
            if (stat.st_size, stat.st_mtime_ns) == (size, mtime_ns):
                continue
            if not statmodule.S_ISREG(stat.st_mode) or _digest(path) != digest:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def snapshot_for(master: Any, start: Dict[str, Any]) -> Optional[str]:
    """The component to start ``master``'s guests from: a snapshot taken
    after its ``preload`` imports, made now if there is none or its files
    changed; None without a preload, or when no snapshot can be made (the
    guest then imports its preload itself). ``start`` holds what
    ``wasi.start_guest`` gives the host (the guest, its mounts, its paths).
    Raises TwinStartError when the preload fails."""
    modules = list(master.preload or ())
    if not modules or getattr(master, "compiles_bytecode", False):
        return None
    paths, packages = start["paths"], start["resolved"]
    limits = start["limits"]
    key = _key(start["guest"], modules, paths, packages, limits.get("memory_limit"))
    base = os.path.join(cache_root(), "snapshots")
    component = os.path.join(base, f"{key}.wasm")
    record = os.path.join(base, f"{key}.json")
    with _lock:  # one snapshot at a time in this process
        if key in _known and (_known[key] is None or _unchanged(record)):
            return _known[key]
        if not writable(base):
            log.info("the cache directory %s is not writable: guests import their preload themselves", base)
            _known[key] = None
            return None
        try:
            with exclusive(os.path.join(base, f"{key}.lock")):  # (another process may be making it)
                if not (os.path.exists(component) and _unchanged(record)):
                    _make(master, start, modules, component, record, base)
        except _PreloadFailed as failed:
            raise TwinStartError(f"sandboxed twin {master.twinterpreter_id!r}: {failed}") from None
        except Exception as err:  # guests still work: they import their preload themselves
            log.warning("could not snapshot the guest after its preload %s: %s", modules, err)
            _known[key] = None
            return None
        _known[key] = component
        _sweep(base, keep=key)
        return component


#: scratch files older than this (seconds) were left by a process that died
_SCRATCH_AGE = 3600


def _sweep(base: str, keep: str) -> None:
    """Removes the snapshots whose recorded files are gone (those of a
    plugin directory that was deleted: a test's, say), with their
    compilations, and scratch files dead processes left."""
    from . import _host

    for name in os.listdir(base):
        path = os.path.join(base, name)
        key, _, suffix = name.partition(".")
        if key == keep:
            continue
        try:
            if suffix.startswith(("tmp", "json.tmp")):
                if time.time() - os.stat(path).st_mtime > _SCRATCH_AGE:
                    os.remove(path)
                continue
            if suffix != "json":
                continue
            with open(path) as f:
                files = json.load(f)["files"]
            if all(os.path.exists(file) for file in files):
                continue
            component = os.path.join(base, f"{key}.wasm")
            _host.forget_compiled_guest(component, os.environ.get("CPY2PY_CACHE_DIR") or None)
            for leftover in (component, path, os.path.join(base, f"{key}.lock")):
                with contextlib.suppress(OSError):
                    os.remove(leftover)
            _known.pop(key, None)
        except (OSError, ValueError, KeyError, TypeError):
            continue


class _PreloadFailed(Exception):
    """The preload's own import failed in the guest (its traceback)."""


def _make(
    master: Any, start: Dict[str, Any], modules: List[str], component: str, record: str, base: str
) -> None:
    from . import _host

    started = time.monotonic()
    say(f"cpy2py: snapshotting the WASI guest after importing {', '.join(modules)} (cached in {base}) ...")
    outcome = "failed"
    try:
        files = _host.WasiGuest.snapshot(
            master.twinterpreter_id,
            start["guest"],
            start["stdlib"],
            modules,
            component,
            bundled_dir=start["bundled"],
            kernel_dir=start["kernel"],
            paths=start["paths"],
            packages=start["resolved"].listing,
            pycache_dir=start["pycache"],
            cache_dir=os.environ.get("CPY2PY_CACHE_DIR") or None,
            **{k: v for k, v in start["limits"].items() if k in ("memory_limit", "timeout")},
        )
        tmp = f"{record}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            roots = list(start["paths"]) + [root for root, _ in start["resolved"].listing]
            json.dump({"modules": modules, "files": _describe(files, roots)}, f)
        os.replace(tmp, record)
        outcome = "done"
    except TwinStartError as err:
        if str(err).startswith(_PRELOAD_FAILED):
            raise _PreloadFailed(str(err)) from None
        raise
    finally:
        say(f" {outcome} after {time.monotonic() - started:.1f} s\n")
    log.info("snapshot of the guest after importing %s: %s", modules, component)
