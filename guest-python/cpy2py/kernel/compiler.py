"""Bytecode for the host's cache, compiled inside a guest (cpy2py/bytecode_cache.py).

A guest cannot write bytecode (it sees no writable directory), so CPython
compiled every module it imports from source at every start. The master
instead asks a guest that runs nothing but this module (no paths, no
initializers, no main module: no code of anyone else runs in it) to compile
the whole standard library once per guest build, and the modules of its
packages and the standard library modules they import once per set of
packages, and keeps the result in its cache directory; later guests see it read-only
as ``sys.pycache_prefix`` (``/pycache``). The standard library's pycs are
unchecked: a guest's importer takes them without reading the source (which
comes with the guest build, the key of their cache). Those of packages
(files of the master's environment, which can change under a running
master) are checked-hash pycs: the importer compares the hash of the source
the guest sees with the one recorded, and compiles a changed one itself.

Finding the standard library modules reads the ``import`` statements of the
sources (``ast``), never runs them: from the packages' own modules every
import, from the standard library only module-level ones (those run at
import); modules already in the guest's snapshot need no bytecode.
"""

from __future__ import annotations

import ast
import os
import sys
from typing import List, Optional, Set, Tuple

#: where guests find the cached bytecode (host/src/wasm/config.rs, PYCACHE_MOUNT)
PYCACHE = "/pycache"
#: the guest's standard library (host/src/wasm/config.rs, STDLIB_MOUNT)
STDLIB = "/python"
#: bytes of bytecode one answer carries at most (a frame holds 64 MiB)
BUDGET = 48 << 20


def use_cached_bytecode() -> None:
    """In a guest: import from the host's cached bytecode, if it gave some."""
    if os.path.isdir(PYCACHE):
        sys.pycache_prefix = PYCACHE


def compile_for_cache(files: List[str]) -> List[Tuple[str, bytes]]:
    """Pycs of ``files`` (every one compiled) and of the modules
    outside the snapshot they import: (path under ``/pycache``, bytes)."""
    sys.pycache_prefix = PYCACHE
    roots = [p for p in sys.path if p and os.path.isdir(p)]
    own = set(files)
    queue = list(files)
    seen: Set[str] = set(queue)
    out: List[Tuple[str, bytes]] = []
    size = 0
    while queue:
        path = queue.pop()
        compiled = _pyc(path)
        if compiled is None or size + len(compiled[1]) > BUDGET:
            continue
        size += len(compiled[1])
        out.append(compiled[:2])
        for name in _imported(compiled[2], _module_name(path, roots), everywhere=path in own):
            found = _find_source(name, roots)
            if found is not None and found not in seen:
                seen.add(found)
                queue.append(found)
    return out


def compile_stdlib() -> List[Tuple[str, bytes]]:
    """Unchecked pycs of every module of the guest's standard library
    (``/python``; about 650 files, 13 MB of bytecode): (path under
    ``/pycache``, bytes). A guest otherwise compiles each one it imports
    that is not in its snapshot (``pathlib``, ``email``, ``argparse``: 50-90
    ms each), at every start."""
    sys.pycache_prefix = PYCACHE
    out: List[Tuple[str, bytes]] = []
    size = 0
    for root, dirs, files in os.walk(STDLIB):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            compiled = _pyc(os.path.join(root, name)) if name.endswith(".py") else None
            if compiled is not None and size + len(compiled[1]) <= BUDGET:
                size += len(compiled[1])
                out.append(compiled[:2])
    return out


def _pyc(path: str) -> Optional[Tuple[str, bytes, ast.AST]]:
    """The pyc of the source at ``path``, unchecked for the standard
    library and checked against the source's hash otherwise: (its path under
    ``/pycache``, its bytes, the source's tree); None if it does not compile
    (the guest that imports it reports that) or lies outside the cache."""
    import importlib.util
    from importlib._bootstrap_external import _code_to_hash_pyc  # type: ignore[attr-defined]

    try:
        with open(path, "rb") as f:
            source = f.read()
        tree = ast.parse(source, path)
        code = compile(tree, path, "exec", dont_inherit=True)
    except (OSError, SyntaxError, ValueError):
        return None
    cached = importlib.util.cache_from_source(path)
    if not cached.startswith(PYCACHE + "/"):
        return None
    checked = not path.startswith(STDLIB + "/")
    data = bytes(_code_to_hash_pyc(code, importlib.util.source_hash(source), checked))
    return cached[len(PYCACHE) + 1 :], data, tree


def _module_name(path: str, roots: List[str]) -> Optional[str]:
    for root in roots:
        if path.startswith(root.rstrip("/") + "/"):
            parts = path[len(root.rstrip("/")) + 1 : -3].split("/")
            return ".".join(parts)
    return None


def _imported(tree: ast.AST, module: Optional[str], everywhere: bool) -> List[str]:
    """Names of the modules ``tree`` imports (and of their parents)."""
    nodes = ast.walk(tree) if everywhere else _module_level(tree)
    names: List[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                if module is None:
                    continue
                # a/b/c.py is a.b.c and a/b/__init__.py a.b.__init__: the package is a.b
                package = module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            if not base:
                continue
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    wanted: List[str] = []
    for name in names:
        parts = name.split(".")
        for end in range(1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            if prefix not in sys.modules:
                wanted.append(prefix)
    return wanted


def _module_level(tree: ast.AST) -> List[ast.AST]:
    """Statements that run at import: the module's, and those nested in its
    ``if``/``try``/``with`` blocks (not in functions or classes)."""
    found: List[ast.AST] = []
    todo = list(getattr(tree, "body", []))
    while todo:
        node = todo.pop()
        found.append(node)
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, field, []) or [])
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)
    return found


def _find_source(name: str, roots: List[str]) -> Optional[str]:
    """The source file of module ``name`` on the roots, found without importing."""
    relative = name.replace(".", "/")
    for root in roots:
        for candidate in (f"{root}/{relative}.py", f"{root}/{relative}/__init__.py"):
            if os.path.isfile(candidate):
                return candidate
    return None
