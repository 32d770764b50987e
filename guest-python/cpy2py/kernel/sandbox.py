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

To the guest, functions and classes travel by name only if the guest can
import them (the standard library, modules under its ``paths``); anything
else is refused with ``TypeError`` instead of being pickled.

Nothing in this module imports anything on a peer's behalf.
"""

from __future__ import annotations

import builtins
import os
import sys
from typing import Any, Iterable, Optional, Tuple

from ..errors import RemoteError, RemoteTraceback, SandboxViolation
from ..protocol import tags
from . import main_module
from .serialization import Serializer, _forget_failure, _GlobalRef, _record_failure, global_name

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
    """The builtin ``Exception`` subclass of that name, or None. SystemExit,
    KeyboardInterrupt and GeneratorExit are not mapped: a guest must not be
    able to end or interrupt the master."""
    if module != "builtins" or not isinstance(qualname, str) or "." in qualname:
        return None
    found = getattr(builtins, qualname, None)
    if isinstance(found, type) and issubclass(found, Exception):
        return found
    return None


def _within(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


class SandboxSerializer(Serializer):
    """Codec hooks for the master's link to a sandboxed guest."""

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
        # TODO(TWIN_REF policy, twin objects engineer): twin objects and proxies
        # (kernel/references.py) are not sent to guests yet. Decide here which
        # master objects may be handed to a guest as a TWIN_REF (and record them
        # as handed, so the guest can call back into exactly those), e.g.:
        #     if _is_twin(obj) or <callback allowed>:
        #         return super().default(obj)
        if callable(obj) or isinstance(obj, type):
            name = global_name(obj)
            if name is not None and self.guest_can_import(name[0]):
                return tags.GLOBAL_REF, list(name)
            what = f"{name[0]}.{name[1]}" if name else repr(obj)
            raise TypeError(
                f"cannot send {what} to the sandboxed twin {self.peer_id!r}: functions and classes "
                f"travel by name, and the guest can import only the standard library and modules "
                f"under its paths {list(self.guest_paths)}. Define it in a module under those paths "
                f"(and pass paths= to TwinMaster), or send data instead"
            )
        raise TypeError(
            f"cannot send {type(obj).__module__}.{type(obj).__qualname__} object to the sandboxed twin "
            f"{self.peer_id!r}: only data (None, bool, int, float, str, bytes, list, tuple, dict, set, "
            f"complex) crosses a sandbox link; objects are never pickled into a guest"
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
                    f"a guest may not name objects in the master (nothing was imported or looked up). "
                    f"Return data from the guest instead"
                ),
            )
            return placeholder
        if tag == tags.PICKLE:
            return self._refuse("a pickle", None)
        if tag == tags.EXCEPTION:
            return self._exception(value)
        if tag == tags.TWIN_REF:
            # TODO(TWIN_REF policy, twin objects engineer): accept references to
            # the guest's own objects (proxies of them) and to master objects the
            # guest was handed; refuse all others. Until then only the guest's own
            # objects are accepted. Note: the class inside a reference (value[2])
            # was decoded first, by the GLOBAL_REF branch above, into a _GuestName
            # placeholder with a SandboxViolation recorded; a policy that accepts
            # it (e.g. a generic proxy, or a class the master itself asked to
            # instantiate there) must call _forget_failure(placeholder) and must
            # not resolve the name. Today such references still fail with that
            # SandboxViolation (TwinObject with __twin_id__='wasi-python' does).
            if isinstance(value, list) and value and value[0] == self.peer_id:
                return super().tag_hook(tag, value)
            return self._refuse("a reference to an object it does not own", value)
        return super().tag_hook(tag, value)

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
