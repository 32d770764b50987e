"""The master's side of a sandboxed link: what it sends to a WASI guest and
what it accepts from one (docs/security.md, "Policy").

A guest is untrusted. From it the master accepts data, exceptions and
references to the guest's own objects only:

- no pickle, either way;
- no name reference (module, qualname): nothing is imported or looked up in
  the master on the guest's say-so. A refused value fails the request or
  reply that carried it with ``SandboxViolation``; the link stays up;
- exceptions become builtin exception types (by name, among the builtin
  ``Exception`` subclasses, never looked up elsewhere) or ``RemoteError``
  carrying the guest's type name, message and traceback text.

The guest may also send references to master objects it was handed, and use
those: call them, read and write their public attributes, and use the data
model's special methods - never a private or dunder attribute, so a handed
callback cannot be walked to its globals, class or module.

To the guest, functions and classes travel by name if the guest can import
them (the standard library, modules under its ``paths``); anything else that
is not data is handed to it as a reference (a capability), never pickled.

Nothing in this module imports anything on a peer's behalf.
"""

from __future__ import annotations

import builtins
import os
import sys
from typing import Any, Iterable, List, Optional, Tuple

from .. import errors, kernel_state
from ..errors import RemoteError, RemoteTraceback, SandboxViolation
from ..protocol import tags
from ..protocol.messages import OP_CALL_METHOD, OP_DELATTR, OP_GETATTR, OP_SETATTR
from . import main_module, references
from .serialization import (
    Serializer,
    _forget_failure,
    _GlobalRef,
    _is_twin,
    _record_failure,
    global_name,
)

#: guest exception texts longer than this are cut (the frame cap bounds them anyway)
MAX_TRACEBACK_TEXT = 64 * 1024

_STDLIB_NAMES = frozenset(getattr(sys, "stdlib_module_names", ())) | {"builtins"}


class _GuestName:
    """A name reference the guest sent: kept as two strings, never resolved."""

    __slots__ = ("module", "qualname")

    def __init__(self, module: str, qualname: str) -> None:
        self.module, self.qualname = module, qualname

    def __repr__(self) -> str:
        return f"<name {self.module}.{self.qualname} sent by a sandboxed guest>"


def _builtin_exception(module: Any, qualname: Any) -> Optional[type]:
    """The builtin ``Exception`` subclass (or cpy2py error) of that name, or None. SystemExit,
    KeyboardInterrupt and GeneratorExit are not mapped: a guest must not be
    able to end or interrupt the master."""
    if not isinstance(qualname, str) or "." in qualname:
        return None
    if module == "cpy2py.errors":  # cpy2py's own errors, raised by the guest's kernel
        found = getattr(errors, qualname, None)
        return found if isinstance(found, type) and issubclass(found, errors.TwinError) else None
    if module != "builtins":
        return None
    found = getattr(builtins, qualname, None)
    if isinstance(found, type) and issubclass(found, Exception):
        return found
    return None


def _within(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


#: special methods a guest may call on master objects it was handed
_SAFE_SPECIAL_METHODS = frozenset(
    """__call__ __len__ __iter__ __next__ __getitem__ __setitem__ __delitem__ __contains__
    __bool__ __repr__ __str__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ __hash__ __add__
    __sub__ __mul__ __truediv__ __floordiv__ __mod__ __neg__ __enter__ __exit__""".split()
)


class SandboxSerializer(Serializer):
    """Codec hooks for the master's link to a sandboxed guest."""

    keeps_interrupts = True

    def __init__(self, peer_id: str, guest_paths: Iterable[str] = ()) -> None:
        super().__init__(peer_id, trusted=False)
        #: real paths of the roots the guest imports code from
        self.guest_paths: Tuple[str, ...] = tuple(os.path.realpath(p) for p in guest_paths)

    # -- what goes to the guest ---------------------------------------------

    def guest_can_import(self, module: str) -> bool:
        """Whether the guest can import ``module``: the standard library, or a
        module loaded here from a file under the guest's paths."""
        if module.split(".")[0] in _STDLIB_NAMES:
            return True
        if main_module.is_main_name(module):
            main = sys.modules.get("__main__")
        else:
            main = sys.modules.get(module)
        path = getattr(main, "__file__", None)
        return isinstance(path, str) and _within(os.path.realpath(path), self.guest_paths)

    def default(self, obj: Any) -> Tuple[int, Any]:
        if isinstance(obj, BaseException) or type(obj) is _GlobalRef:
            # an exception (its type travels as a name for the guest to look up, or not)
            return super().default(obj)
        if _is_twin(obj):  # twin objects and proxies: references, never names
            return tags.TWIN_REF, references.export(obj, self.connection, by_name=False)
        if callable(obj) or isinstance(obj, type):
            name = global_name(obj)
            if name is not None and self.guest_can_import(name[0]):
                return tags.GLOBAL_REF, list(name)
        # Anything else is handed to the guest as a reference: a capability to
        # call it and use its public attributes (see perform), nothing more.
        return tags.TWIN_REF, references.export(obj, self.connection, by_name=False)

    def check_executable(self, call: Any) -> None:
        """``execute`` runs its callable in the guest, so the guest must be able
        to import it (handing it as a callback would run it in the master)."""
        name = global_name(call) if callable(call) else None
        if name is not None and self.guest_can_import(name[0]):
            return
        what = f"{name[0]}.{name[1]}" if name else repr(call)
        raise TypeError(
            f"cannot run {what} in the sandboxed twin {self.peer_id!r}: functions and classes "
            f"travel by name, and the guest can import only the standard library and modules "
            f"under its paths {list(self.guest_paths)}. Define it in a module under those paths "
            f"(and pass paths= to TwinMaster)"
        )

    # -- what comes from the guest ------------------------------------------

    def tag_hook(self, tag: int, value: Any) -> Any:
        if tag == tags.GLOBAL_REF:
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
                return self._refuse("a malformed name reference", value)
            placeholder = _GuestName(value[0], value[1])
            # refused unless it turns out to be the type of an exception (see _exception)
            _record_failure(
                placeholder,
                SandboxViolation(
                    f"the sandboxed twin {self.peer_id!r} sent a reference to {value[0]}.{value[1]}; "
                    f"a guest may not name objects in the master, twinfunctions and TwinObject classes "
                    f"pinned to it included (nothing was imported or looked up). Hand the guest what it "
                    f"may use as arguments, or return data from the guest instead"
                ),
            )
            return placeholder
        if tag == tags.PICKLE:
            return self._refuse("a pickle", None)
        if tag == tags.EXCEPTION:
            return self._exception(value)
        if tag == tags.TWIN_REF:
            return self._reference(value)
        return super().tag_hook(tag, value)

    def _reference(self, value: Any) -> Any:
        """A reference from the guest: to its own object (a proxy here), or to
        a master object it was handed (the object itself); nothing else."""
        if not (isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)):
            return self._refuse("a malformed reference", value)
        owner, iid, info = value
        if isinstance(info, _GuestName):  # a class named by the guest: never imported
            _forget_failure(info)
            info = [f"{info.module}.{info.qualname}", []]
        if isinstance(info, list) and info and isinstance(info[0], str):
            info = self._own_twin_class(info[0]) or info
        if not isinstance(iid, int):
            return self._refuse("a malformed reference", value)
        if owner == self.peer_id:
            return references.resolve(owner, iid, info, self.connection)
        if owner == kernel_state.TWIN_ID and (owner, iid) in self.connection.handed:
            return references.exported((owner, iid))
        return self._refuse("a reference to an object it was not handed", value)

    def _own_twin_class(self, dotted: str) -> Optional[type]:
        """A TwinObject class pinned to this guest that the master has loaded
        already (so proxies pass isinstance); found without importing or
        running anything: plain dictionary lookups in loaded modules."""
        from ..twin_object import TwinMeta

        parts = dotted.split(".")
        for split in range(len(parts) - 1, 0, -1):
            module = sys.modules.get(".".join(parts[:split]))
            if module is None:
                continue
            found: Any = module
            for part in parts[split:]:
                found = vars(found).get(part) if hasattr(found, "__dict__") else None
            if isinstance(found, TwinMeta) and type.__getattribute__(found, "__twin_id__") == self.peer_id:
                return found
        return None

    # -- what the guest may do with what it was handed --------------------------

    def perform(self, op: int, operands: List[Any]) -> Any:
        """Requests from the guest: only public attributes and the special
        methods of the data model, so a handed callback cannot be walked to
        its globals, class or module."""
        if op in (OP_GETATTR, OP_SETATTR, OP_DELATTR, OP_CALL_METHOD):
            name = operands[1]
            allowed = op == OP_CALL_METHOD and name in _SAFE_SPECIAL_METHODS
            if not isinstance(name, str) or (name.startswith("_") and not allowed):
                raise SandboxViolation(
                    f"the sandboxed twin {self.peer_id!r} may not use attribute {name!r} of a master "
                    f"object: only public attributes and the data model's special methods"
                )
        return super().perform(op, operands)

    def _refuse(self, what: str, value: Any) -> None:
        shown = f" ({value!r:.100})" if value is not None else ""
        _record_failure(
            None,
            SandboxViolation(
                f"the sandboxed twin {self.peer_id!r} sent {what}{shown}, which the sandbox policy "
                f"refuses; the call it belonged to failed, the guest keeps running"
            ),
        )
        return None

    def _exception(self, value: Any) -> BaseException:
        if not (isinstance(value, list) and len(value) == 3 and isinstance(value[1], list)):
            return RemoteError("<malformed exception>", f"{value!r:.200}", None)
        kind, args, text = value
        if isinstance(kind, _GuestName):
            _forget_failure(kind)  # a type name is fine here: it is only compared, never resolved
            module, qualname = kind.module, kind.qualname
        else:
            module, qualname = "<unknown>", repr(kind)[:100]
        if not isinstance(text, str):
            text = None
        elif len(text) > MAX_TRACEBACK_TEXT:
            text = text[:MAX_TRACEBACK_TEXT] + "\n[... cut by cpy2py]"
        builtin = _builtin_exception(module, qualname)
        err: BaseException
        if builtin is None:
            name = qualname if module == "builtins" else f"{module}.{qualname}"
            err = RemoteError(name, ", ".join(_short(a) for a in args), text)
        else:
            try:
                err = builtin(*args)
            except Exception:  # args that do not fit the constructor
                err = builtin.__new__(builtin)
                err.args = tuple(args)
        if text:
            err.__cause__ = RemoteTraceback(text)
        return err


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 1000 else text[:1000] + "..."
