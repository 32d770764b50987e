"""The master's ``__main__`` module, as seen from every interpreter.

Functions and classes defined in the master's main script are known as
``__main__.name``. In a twin, ``__main__`` is the kernel's bootstrap, so the
twin loads the master's script as the module ``__cpy2py_main__`` (its
``if __name__ == "__main__":`` block does not run unless ``run_main``) on
first use, and resolves ``__main__`` to it. The master aliases
``__cpy2py_main__`` to its own ``__main__``, so names coming back resolve too.

A master without a main file (a notebook, the interactive prompt) sends the
source of each definition a twin needs (``kernel.interactive``); the twin
runs it in a stand-in module ``__cpy2py_main__`` (``define``).
"""

from __future__ import annotations

import _thread
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any, Callable, Dict, List, Optional

MAIN_ALIAS = "__cpy2py_main__"

_lock = _thread.RLock()
_config: Dict[str, Any] = {}
_loaded: Optional[ModuleType] = None
#: in a twin on another host: the spec of the master's script, whose source
#: comes over the link (kernel/remote_twin.py); the path is the master's
main_spec_hook: Optional[Callable[[str], Any]] = None


def import_by_name(name: str) -> Any:
    """``importlib.import_module(name)`` for an absolute name, without
    importing the ``importlib`` package (with ``warnings``: 1.6 ms of a PyPy
    twin's start, on its first call)."""
    __import__(name)
    return sys.modules[name]


def describe_master_main() -> Dict[str, Any]:
    """In the master: where twins find its main module (path or module name)."""
    main = sys.modules.get("__main__")
    name = importable_name(main)
    if name is not None:
        # started with `python -m package.module`: importable by name
        sys.modules.setdefault(name, main)  # type: ignore[arg-type]
        return {"main_name": name, "main_path": None}
    path = main_file(main)
    if path is not None:
        return {"main_name": None, "main_path": os.path.abspath(path)}
    return {"main_name": None, "main_path": None}  # interactive, -c, embedded


def importable_name(main: Any) -> Optional[str]:
    """The module name a ``__main__`` run with ``python -m`` is imported by, or None."""
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if not name or name == "__main__" or _is_prompt(main):
        return None
    return name


def main_file(main: Any) -> Optional[str]:
    """The script a ``__main__`` was run from, or None (a notebook, the prompt, -c)."""
    path = getattr(main, "__file__", None)
    if not isinstance(path, str) or not os.path.exists(path) or _is_prompt(main):
        return None
    return path


def _is_prompt(main: Any) -> bool:
    # the Python 3.13+ prompt leaves the spec (and file) of its own
    # _pyrepl.__main__ in the __main__ it runs the session in
    name = getattr(getattr(main, "__spec__", None), "name", None)
    return isinstance(name, str) and name.startswith("_pyrepl")


_main_block_names: Optional[frozenset] = None


def bound_in_main_block(name: str) -> bool:
    """In the master: whether its main script binds ``name`` under its
    ``if __name__ == "__main__":`` block, which twins do not run (without
    ``run_main``): such a function or class exists in the master only, so
    it goes to twins as a proxy, like a closure, not by name."""
    global _main_block_names
    if _main_block_names is None:
        _main_block_names = _names_bound_in_main_block(main_file(sys.modules.get("__main__")))
    return name in _main_block_names


def _names_bound_in_main_block(path: Optional[str]) -> frozenset:
    """The names the script at ``path`` binds in the body of an
    ``if __name__ == "__main__":`` (at its top level, or inside other
    top-level statements), not inside the functions and classes it defines."""
    if path is None:
        return frozenset()
    import ast

    try:
        with open(path, "rb") as file:
            tree = ast.parse(file.read(), path)
    except (OSError, SyntaxError, ValueError):
        return frozenset()
    names: set = set()
    statements = list(tree.body)
    while statements:
        node = statements.pop()
        if isinstance(node, ast.If) and _is_main_test(node.test):
            names.update(_bindings(node.body))
            statements.extend(node.orelse)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            statements.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
    return frozenset(names)


def _is_main_test(test: Any) -> bool:
    import ast

    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and any(
        isinstance(s, ast.Constant) and s.value == "__main__" for s in sides
    )


def _bindings(body: List[Any]) -> set:
    """Names bound by these statements in their own scope."""
    import ast

    names = set()
    nodes = list(body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)  # (its body is a scope of its own)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif not isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            nodes.extend(ast.iter_child_nodes(node))
    return names


def alias_master_main() -> None:
    """In the master: names of ``__cpy2py_main__`` sent back by twins resolve to ``__main__``."""
    if "__main__" in sys.modules:
        sys.modules.setdefault(MAIN_ALIAS, sys.modules["__main__"])


def configure_twin(main_path: Optional[str], main_name: Optional[str], run_main: bool) -> None:
    """In a twin: remember how to load the master's main module."""
    _config.update(main_path=main_path, main_name=main_name, run_main=run_main)


def runs_main() -> bool:
    """Whether this twin runs the master's main block (``run_main=True``)."""
    return bool(_config.get("run_main"))


def shown_module(module: str) -> str:
    """The module name a peer is told for a type or function of ``module``:
    ``__main__`` for this twin's copy of the master's script (which the
    master's own user knows as ``__main__``, and every peer looks up as it)."""
    return "__main__" if module == MAIN_ALIAS else module


def is_main_name(module: str) -> bool:
    # (``__mp_main__``: the main script in a worker that multiprocessing
    # started by spawn or forkserver, whose ``__main__`` it is)
    return module == "__main__" or module == MAIN_ALIAS or module == "__mp_main__"


def load() -> ModuleType:
    """The master's main module in this interpreter (loaded once, on first use)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        if not _config:  # the master itself
            return sys.modules["__main__"]
        main_name, main_path = _config.get("main_name"), _config.get("main_path")
        if main_name:
            module = import_by_name(main_name)
        elif main_path:
            # what importlib.util re-exports, without importing importlib.util (on
            # PyPy that is importlib.abc and typing too: see master.BOOTSTRAP)
            try:
                from _frozen_importlib import module_from_spec  # type: ignore[import-not-found]
                from _frozen_importlib_external import spec_from_file_location  # type: ignore[import-not-found]
            except ImportError:
                from importlib.util import module_from_spec, spec_from_file_location

            run_name = "__main__" if _config.get("run_main") else MAIN_ALIAS
            if main_spec_hook is not None:
                spec = main_spec_hook(run_name)
            else:
                spec = spec_from_file_location(run_name, main_path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load the master's main module from {main_path!r}")
            module = module_from_spec(spec)
            # registered first, so the script's own imports of it and its
            # twinfunctions resolve while it runs
            sys.modules[MAIN_ALIAS] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[MAIN_ALIAS]
                raise
        else:
            module = _StandIn(MAIN_ALIAS)
        sys.modules[MAIN_ALIAS] = module
        _loaded = module
        return module


class _StandIn(type(sys)):  # type: ignore[misc]
    """The master's ``__main__`` in a twin when the master has no main file
    (or, in a sandbox, one outside the guest's paths): holds what the master
    defined here, and says why anything else is missing."""

    def __getattr__(self, name: str) -> Any:
        if name[:2] == "__":
            raise AttributeError(name)
        if sys.platform == "wasi":  # (what a sandboxed twin's user can do differs)
            why = (
                "the master's __main__ has no file this sandboxed twin can load: its script is "
                "outside the twin's paths (give the script's directory in paths=), or it has none "
                "(an interactive session or -c: define shared functions and classes in a module "
                "under those paths)"
            )
        else:
            why = (
                "the master's __main__ has no file this twin can load (an interactive session or "
                "-c), and the master sent no source for it; define shared functions and classes "
                "in a module instead"
            )
        raise AttributeError(f"{name!r} of the master's __main__ is not defined in this twinterpreter: {why}")


def define(definitions: List[Dict[str, Any]]) -> None:
    """In a twin: run definitions the master sent (``kernel.interactive``) in
    the stand-in for its ``__main__``, with the names they use of it."""
    namespace = vars(load())
    import linecache

    for entry in definitions:
        for name, (module, qualname) in entry["imports"].items():
            try:
                value: Any = import_by_name(module)
                for part in qualname.split(".") if qualname else ():
                    value = getattr(value, part)
            except Exception:  # not here (numpy in PyPy, say): a NameError if ever used
                continue
            namespace[name] = value
        namespace.update(entry["constants"])
        # at its line in its cell's file name: tracebacks and inspect show the source
        text = "\n" * (entry["line"] - 1) + entry["source"]
        linecache.cache[entry["filename"]] = (len(text), None, text.splitlines(True), entry["filename"])
        exec(compile(text, entry["filename"], "exec"), namespace)
