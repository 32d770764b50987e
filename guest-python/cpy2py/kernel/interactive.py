"""Definitions made in a notebook cell or at the interactive prompt, for twins.

A twin finds the master's functions and classes by name; a master whose
``__main__`` has no file (Jupyter/IPython, the interactive prompt) cannot be
imported there. Its definitions have source all the same: IPython and the
Python 3.13+ REPL keep each cell in ``linecache``. The master sends a twin
the source of a definition before the first reference to it
(``Serializer.define_in_peer``), with what it uses of the notebook: the
other definitions (the same way), the modules and imported names (the twin
imports its own copy) and, on trusted links, plain constants. The twin runs
the definition in its stand-in for the master's ``__main__``
(``main_module.define``). Nothing here runs in a twin or on a peer's
behalf: the master sends, never receives, code.
"""

from __future__ import annotations

import ast
import linecache
import sys
import types

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

#: values that may be copied to a trusted twin as the constants a definition uses
_CONSTANT_TYPES = (type(None), bool, int, float, complex, str, bytes)


class NoSourceError(LookupError):
    """The master cannot send the source of an interactive definition."""


def master_main_is_interactive() -> bool:
    """Whether the master's ``__main__`` is neither a file nor an importable
    module (a notebook, the interactive prompt, ``python -c``, piped stdin)."""
    from .main_module import importable_name, main_file

    main = sys.modules.get("__main__")
    return importable_name(main) is None and main_file(main) is None


def definitions(name: str, constants: bool) -> List[Dict[str, Any]]:
    """What a twin needs to define the master's ``__main__.<name>``: one
    entry per definition, the ones it uses first. Raises NoSourceError."""
    found: List[Dict[str, Any]] = []
    _collect(name, constants, set(), found)
    return found


def _collect(name: str, constants: bool, seen: Set[str], found: List[Dict[str, Any]]) -> None:
    seen.add(name)
    namespace = vars(sys.modules["__main__"])
    filename, lines, node = _definition(name, namespace.get(name))
    imports: Dict[str, List[Any]] = {}
    values: Dict[str, Any] = {}
    for used in sorted(_names_used(node) - {name}):
        if used not in namespace:
            continue  # a builtin, or a local name
        value = namespace[used]
        if isinstance(value, types.ModuleType):
            imports[used] = [value.__name__, None]
        elif _defined_interactively(value, used):
            if used not in seen:
                try:
                    _collect(used, constants, seen, found)
                except NoSourceError:
                    pass  # a NameError in the twin if it is ever used there
        elif _importable(value) is not None:
            imports[used] = list(_importable(value))  # type: ignore[arg-type]
        elif constants and _is_constant(value):
            values[used] = value
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    found.append(
        {
            "name": name,
            "filename": filename,
            "line": first,
            "source": "".join(lines[first - 1 : node.end_lineno]),
            "imports": imports,
            "constants": values,
        }
    )


def _definition(name: str, obj: Any) -> Tuple[str, List[str], ast.AST]:
    """The cell (file name, lines) and the top-level statement defining ``obj``."""
    kind = "class" if isinstance(obj, type) else "function"
    for filename, line in _places(obj):
        lines = _cell_lines(filename)
        if lines is None:
            continue
        node = _find_node("".join(lines), name, line)
        if node is not None:
            return filename, lines, node
    raise NoSourceError(
        f"the source of {kind} {name!r} of the master's __main__ is not known (python -c, piped "
        "stdin or an embedded interpreter keep none; Jupyter, IPython and the Python 3.13+ prompt "
        "do), so twins cannot define it: define shared functions and classes in a module instead"
    )


def _places(obj: Any) -> Iterator[Tuple[str, Optional[int]]]:
    """Where ``obj`` may be defined: (cell file name, first line or None)."""
    if isinstance(obj, type):
        for member in vars(obj).values():
            code = _code(member)
            if code is not None:
                yield code.co_filename, None
        # a class without methods: the latest interactive cell that defines it
        cells = [key for key, entry in list(linecache.cache.items()) if _interactive_entry(entry)]
        for filename in reversed(cells):
            yield filename, getattr(obj, "__firstlineno__", None)
    else:
        code = _code(obj)
        if code is not None:
            yield code.co_filename, code.co_firstlineno


def _code(obj: Any) -> Any:
    for _ in range(10):  # twinfunction wrappers, decorators that keep __wrapped__
        inner = getattr(obj, "__wrapped__", None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, (classmethod, staticmethod)):
        obj = obj.__func__
    elif isinstance(obj, property):
        obj = obj.fget
    return getattr(obj, "__code__", None)


def _interactive_entry(entry: Any) -> bool:
    # IPython and the REPL store cells with no modification time, so that
    # linecache.checkcache never drops them; files from disk have one
    return isinstance(entry, tuple) and len(entry) == 4 and entry[1] is None


def _cell_lines(filename: str) -> Optional[List[str]]:
    entry = linecache.cache.get(filename)
    if entry is None or not _interactive_entry(entry):
        return None
    return list(entry[2])


def _find_node(source: str, name: str, line: Optional[int]) -> Optional[ast.AST]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    candidates = [n for n in tree.body if isinstance(n, kinds) and n.name == name]
    for node in candidates:
        starts = {node.lineno} | {d.lineno for d in node.decorator_list}
        if line in starts:
            return node
    if line is None and candidates:
        return candidates[-1]  # the last definition in the cell is the one in force
    return None


def _names_used(node: ast.AST) -> Set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _defined_interactively(value: Any, name: str) -> bool:
    """A function or class of the master's ``__main__``, bound to its own name."""
    if not isinstance(value, (types.FunctionType, type)):
        return False
    return getattr(value, "__module__", None) == "__main__" and getattr(value, "__name__", None) == name


def _importable(value: Any) -> Optional[Tuple[str, str]]:
    """(module, qualname) of a value that a twin can import, if any."""
    module = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or module == "__main__":
        return None
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return (module, qualname) if found is value else None


def _is_constant(value: Any) -> bool:
    if isinstance(value, (tuple, frozenset)):
        return all(_is_constant(item) for item in value)
    return type(value) in _CONSTANT_TYPES
