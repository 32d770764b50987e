"""In the master: the source of a module, for a remote twin that lacks it.

A twin on another host (``cpy2py/ssh.py``) asks for the modules it cannot
import from its own installation (``kernel/remote_twin.py``). The master
looks for them where a local twin would: its application directories and
its site-packages (``master._path_config``), not its standard library (the
twin's interpreter has its own). Looking up never imports anything in the
master, not even a parent package: packages are followed through their
search locations.

A remote twin is trusted like a local one (docs/security.md): it may read
any Python source the master's paths hold, as a local twin could.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional

MAIN = "__main__"

_specs: Dict[str, Any] = {}


def _search_path() -> List[str]:
    from ..master import _path_config

    config = _path_config()
    return config["app_paths"] + config["site_paths"]


def _find(name: str) -> Any:
    """The spec of ``name`` in the master's paths, or None; imports nothing."""
    if name not in _specs:
        parent, _, _ = name.rpartition(".")
        if parent:
            parent_spec = _find(parent)
            locations = parent_spec.submodule_search_locations if parent_spec is not None else None
        else:
            locations = _search_path()
        _specs[name] = _find_in(name, list(locations or ()))
    return _specs[name]


def _find_in(name: str, locations: List[str]) -> Any:
    """What ``PathFinder`` does, without its namespace-package path objects
    (which look up the parent package in ``sys.modules``: the master has not
    imported it, and must not)."""
    from importlib.machinery import ModuleSpec

    portions: List[str] = []
    for location in locations:
        finder = _path_finder(location)
        spec = finder.find_spec(name) if finder is not None else None
        if spec is None:
            continue
        if spec.loader is not None:
            return spec
        portions.extend(spec.submodule_search_locations or ())  # a portion of a namespace package
    if not portions:
        return None
    spec = ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = portions
    return spec


def _path_finder(location: str) -> Any:
    finder = sys.path_importer_cache.get(location)
    if finder is None:
        for hook in sys.path_hooks:
            try:
                finder = hook(location)
                break
            except ImportError:
                continue
    return finder if hasattr(finder, "find_spec") else None


def module_source(name: str) -> Optional[List[Any]]:
    """``[origin, is_package, source bytes]`` of module ``name``; source None
    for a module that is not Python source (a C extension); None when the
    master has no such module either. ``__main__`` is the master's script."""
    if name == MAIN:
        from .main_module import main_file

        path = main_file(sys.modules.get(MAIN))
        return [os.path.abspath(path), False, _read(path)] if path else None
    if name == "cpy2py" or name.startswith("cpy2py."):
        return None  # the twin runs the kernel the master sent it
    spec = _find(name)
    if spec is None:
        return None
    is_package = spec.submodule_search_locations is not None
    origin = spec.origin
    if spec.loader is None or origin is None or not os.path.isfile(origin):  # a namespace package
        return [name.replace(".", "/"), True, b""] if is_package else None
    if not origin.endswith(".py"):
        return [origin, is_package, None]
    return [origin, is_package, _read(origin)]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
