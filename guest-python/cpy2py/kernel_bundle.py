"""The modules a twin imports at start, from one file of their bytecode.

A native twin's bootstrap (``master.BOOTSTRAP``) loads this file on its own,
before anything of cpy2py, and puts a ``Bundle`` first on ``sys.meta_path``
while it imports the kernel: it serves the package's pure-Python modules
from one file in cpy2py's cache holding their code objects, as compiled by
this very interpreter (a bytecode file per module costs a pypy3 twin 12.5
ms of its start, the bundle 7). A module whose source changed since (its
size or modification time) is compiled again, and ``finish`` writes the
bundle anew. Only ``marshal``, ``os``, ``sys`` and ``time`` are used (all
loaded by then): nothing else is imported yet. A bundle no twin started from for 30 days is removed when
another is written (``_prune``): each package path has its own, and venvs
come and go.
"""

import marshal
import os
import sys
import time

try:
    from _frozen_importlib import ModuleSpec
except ImportError:  # (an interpreter without it: the standard name)
    from importlib.machinery import ModuleSpec


class Bundle:
    """A meta path finder and loader for the package at ``package_dir``."""

    def __init__(self, package_dir: str, cache_dir: str) -> None:
        self.package_dir = package_dir
        self.package = os.path.basename(package_dir)
        tag, optimize = sys.implementation.cache_tag, sys.flags.optimize
        # (the package's path, its end only: a file name has at most 255 bytes)
        name = f"{tag}-O{optimize}{package_dir.replace(os.sep, '%')[-200:]}"
        self.path = os.path.join(cache_dir, "kernel-bundle", name)
        self.changed = False
        try:
            with open(self.path, "rb") as f:
                entries = marshal.loads(f.read())
                stale = os.fstat(f.fileno()).st_mtime < time.time() - _DAY
        except Exception:  # missing, unreadable or damaged: made again
            entries = None
        else:
            if stale:  # in use (see _prune): said once a day
                try:
                    os.utime(self.path)
                except OSError:  # (a cache it cannot write)
                    pass
        # name -> (source path, its size, its mtime_ns, marshalled code)
        self.entries = entries if type(entries) is dict else {}

    def find_spec(self, name, path=None, target=None):
        if name != self.package and not name.startswith(self.package + "."):
            return None
        base = os.path.join(self.package_dir, *name.split(".")[1:])
        init = os.path.join(base, "__init__.py")
        if os.path.isfile(init):
            spec = ModuleSpec(name, self, origin=init, is_package=True)
            spec.submodule_search_locations = [base]
        elif os.path.isfile(base + ".py"):
            spec = ModuleSpec(name, self, origin=base + ".py")
        else:
            return None  # (an extension module, say: the usual finders have it)
        spec.has_location = True  # (__file__ is the source)
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        exec(self._code(module.__spec__.name, module.__spec__.origin), module.__dict__)

    def _code(self, name: str, source: str):
        stat = os.stat(source)
        entry = self.entries.get(name)
        if entry is not None and entry[:3] == (source, stat.st_size, stat.st_mtime_ns):
            try:
                return marshal.loads(entry[3])
            except Exception:
                pass
        with open(source, "rb") as f:
            code = compile(f.read(), source, "exec", dont_inherit=True)
        self.entries[name] = (source, stat.st_size, stat.st_mtime_ns, marshal.dumps(code))
        self.changed = True
        return code

    def finish(self) -> None:
        """The kernel is imported: later imports take the usual way, and the
        bundle is written if a module was compiled (where it can be)."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        if not self.changed:
            return
        partial = f"{self.path}.{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(partial, "wb") as f:
                f.write(marshal.dumps(self.entries))
            os.replace(partial, self.path)  # (twins starting at once: each writes a whole one)
        except OSError:  # (a cache it cannot write: it compiles again next time)
            try:
                os.unlink(partial)
            except OSError:
                pass
            return
        _prune(os.path.dirname(self.path))


#: a bundle no twin started from for this long is removed (its package was
#: most likely a venv since deleted: each package path has a bundle of its
#: own, per interpreter, about 300 KB)
UNUSED_FOR = 30 * 86400
_DAY = 86400


def _prune(directory: str) -> None:
    """Removes the bundles of ``directory`` no twin started from for
    ``UNUSED_FOR`` (a bundle's time is refreshed once a day while twins
    start from it), and halves of bundles left by a twin that stopped while
    writing one. Run when a bundle is written, so rarely."""
    oldest = time.time() - UNUSED_FOR
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            if os.stat(path).st_mtime < oldest:
                os.unlink(path)
        except OSError:  # (another twin removed it, or it cannot be)
            pass
