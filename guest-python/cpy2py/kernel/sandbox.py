"""The master's side of a sandboxed link: what it sends to a WASI guest and
what it accepts from one (docs/security.md, "Policy").

A guest is untrusted. From it the master accepts data, exceptions and
references to the guest's own objects, and references back to what it was
handed; nothing else:

- no pickle, either way;
- no name reference (module, qualname): nothing is imported or looked up in
  the master on the guest's say-so. A refused value fails the request or
  reply that carried it with ``SandboxViolation``; the link stays up;
- exceptions become builtin exception types (by name, among the builtin
  ``Exception`` subclasses, never looked up elsewhere) or ``RemoteError``
  carrying the guest's type name, message and traceback text.

What the master hands a guest is an allowlist (``cpy2py.capabilities``):
data is copied; a callable can be called and nothing else; any other object
is opaque unless the application granted names of it (``expose``,
``@exposed``); frames, generators, coroutines, code, modules, loaders,
classes and tracebacks are never handed. An exception from master code
reaches the guest as a builtin type and its plain message only.

Nothing in this module imports anything on a peer's behalf.
"""

from __future__ import annotations

import builtins
import errno
import functools
import importlib.abc
import importlib.machinery
import os
import sys
import time
import types
import zipimport
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Tuple

from .. import _logging, errors
from ..capabilities import CALL_ONLY, OPAQUE, Exposed, Grant, class_grant
from ..errors import RemoteError, RemoteTraceback, SandboxViolation
from ..protocol import codec, tags
from ..protocol.messages import (
    OP_CALL_METHOD,
    OP_DELATTR,
    OP_EXECUTE,
    OP_GETATTR,
    OP_INSTANTIATE,
    OP_SETATTR,
    RAISE,
    REPLY,
)
from . import main_module, references, std_values
from .serialization import (
    SINGLETONS,
    Serializer,
    _decoding,
    _GlobalRef,
    _pinned_elsewhere,
    format_exception,
    global_name,
    remote_error_near,
    remote_os_error,
    singleton_name,
    unfindable_pinned,
)

log = _logging.get_logger("sandbox")

#: guest exception texts longer than this are cut (the frame cap bounds them anyway)
MAX_TRACEBACK_TEXT = 64 * 1024
#: notes of a guest's exception kept (each cut to MAX_TEXT characters)
MAX_NOTES = 16
#: a guest's repr/str results, and the message of a master exception sent to
#: a guest, are cut to this many characters
MAX_TEXT = 4096
#: at most this many characters of a name a guest sent end up in a message
MAX_NAME = 200
#: classes of its objects a guest's frame may describe that the link has no
#: proxy class for (each costs up to about 22 KB here, 77 special methods: at most about 22 MB)
MAX_NEW_CLASSES_PER_FRAME = 1024
#: what the master's time spent reading a guest's frames is measured by
_clock = time.perf_counter
#: (a guest placed on a Ray node, whose clock the master does not keep) the
#: share of the time that passes by which the charge for the master's time
#: on its frames drains: a guest can keep the master busy reading them at
#: most this share of the time, beyond its timeout's worth
CHARGE_DRAIN = 0.1

_STDLIB_NAMES = frozenset(getattr(sys, "stdlib_module_names", ())) | {"builtins"}

#: never handed to a guest, whatever the application does: each of these
#: reaches the master's globals, code, files or import system
NEVER_HANDED: Tuple[type, ...] = (
    type,
    types.ModuleType,
    types.FrameType,
    types.TracebackType,
    types.CodeType,
    types.GeneratorType,
    types.CoroutineType,
    types.AsyncGeneratorType,
    importlib.machinery.ModuleSpec,
    importlib.abc.Loader,
    importlib.abc.MetaPathFinder,
    importlib.abc.PathEntryFinder,
    zipimport.zipimporter,
)

#: what the types of NEVER_HANDED are called in another twin (for proxies of
#: its objects, which the master may hold and hand on)
_NEVER_HANDED_NAMES = frozenset(f"{t.__module__}.{t.__qualname__}" for t in NEVER_HANDED) | {
    "cpy2py.twin_object.TwinMeta",
    "abc.ABCMeta",
    "enum.EnumType",
    "enum.EnumMeta",
}

#: the plain values an exception may carry to a guest
_PLAIN = (str, bytes, int, float, bool, type(None))

#: the frames of a guest's that answer the master's calls (not charged: see decode)
_ANSWERS = (REPLY, RAISE)


class _GuestName:
    """A name reference the guest sent: kept as two strings, never resolved."""

    __slots__ = ("module", "qualname")

    def __init__(self, module: str, qualname: str) -> None:
        self.module, self.qualname = module, qualname

    def __repr__(self) -> str:
        return f"<name {self.module:.{MAX_NAME}}.{self.qualname:.{MAX_NAME}} sent by a sandboxed guest>"


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


def _public_type(kind: type) -> type:
    """The nearest base of ``kind`` that a guest knows by name: a builtin
    ``Exception`` subclass or a cpy2py error."""
    for klass in kind.__mro__:
        module, name = getattr(klass, "__module__", None), klass.__name__
        if module == "builtins" and vars(builtins).get(name) is klass and issubclass(klass, Exception):
            return klass
        if (
            module == "cpy2py.errors"
            and getattr(errors, name, None) is klass
            and issubclass(klass, Exception)
        ):
            return klass
    return Exception


#: the operations a guest may ask for, and how many operands each has
_OPERANDS = {OP_EXECUTE: 3, OP_CALL_METHOD: 4, OP_GETATTR: 2, OP_SETATTR: 3, OP_DELATTR: 2}


#: The errno numbers of the guest's C library (wasi-libc), by number (its
#: ``errno`` module has the same: tests/test_wasi.py checks). An OSError's
#: errno crosses between master and guest as the number of the same name on
#: the other side (44 is ENOENT in a guest, ECHRNG on Linux).
_WASI_ERRNO = (
    "", "E2BIG", "EACCES", "EADDRINUSE", "EADDRNOTAVAIL", "EAFNOSUPPORT", "EAGAIN", "EALREADY",
    "EBADF", "EBADMSG", "EBUSY", "ECANCELED", "ECHILD", "ECONNABORTED", "ECONNREFUSED", "ECONNRESET",
    "EDEADLK", "EDESTADDRREQ", "EDOM", "EDQUOT", "EEXIST", "EFAULT", "EFBIG", "EHOSTUNREACH", "EIDRM",
    "EILSEQ", "EINPROGRESS", "EINTR", "EINVAL", "EIO", "EISCONN", "EISDIR", "ELOOP", "EMFILE", "EMLINK",
    "EMSGSIZE", "EMULTIHOP", "ENAMETOOLONG", "ENETDOWN", "ENETRESET", "ENETUNREACH", "ENFILE",
    "ENOBUFS", "ENODEV", "ENOENT", "ENOEXEC", "ENOLCK", "ENOLINK", "ENOMEM", "ENOMSG", "ENOPROTOOPT",
    "ENOSPC", "ENOSYS", "ENOTCONN", "ENOTDIR", "ENOTEMPTY", "ENOTRECOVERABLE", "ENOTSOCK", "ENOTSUP",
    "ENOTTY", "ENXIO", "EOVERFLOW", "EOWNERDEAD", "EPERM", "EPIPE", "EPROTO", "EPROTONOSUPPORT",
    "EPROTOTYPE", "ERANGE", "EROFS", "ESPIPE", "ESRCH", "ESTALE", "ETIMEDOUT", "ETXTBSY", "EXDEV",
    "ENOTCAPABLE",
)  # fmt: skip
_WASI_NUMBERS = {name: number for number, name in enumerate(_WASI_ERRNO) if name}
#: the host's other names of numbers the guest knows by one
_WASI_NUMBERS.update(EWOULDBLOCK=6, EDEADLOCK=16, EOPNOTSUPP=58, ESHUTDOWN=64)


def errno_from_guest(number: Any) -> Any:
    """The master's errno for a guest's (None if it has no such error)."""
    if type(number) is not int or not 0 < number < len(_WASI_ERRNO):
        return None
    return getattr(errno, _WASI_ERRNO[number], None)


def errno_for_guest(number: Any) -> Any:
    """The guest's errno for the master's (None if it has no such error)."""
    return _WASI_NUMBERS.get(errno.errorcode.get(number, "")) if type(number) is int else None


def guest_exception(err: Exception) -> Exception:
    """What a guest may see of a master exception: a new exception of the
    nearest builtin (or cpy2py) type, with the plain-data arguments only
    (dates, Decimals and UUIDs too), texts cut; no objects, no traceback, no cause. An OSError's errno is the
    guest's number for it, and its file names stay."""
    kind = _public_type(type(err))
    args = [
        a[:MAX_TEXT] if isinstance(a, (str, bytes)) else a
        for a in err.args
        if type(a) in _PLAIN or std_values.encode(a) is not None  # (a date, Decimal or UUID)
    ]
    if isinstance(err, OSError) and len(err.args) == 2 and len(args) == 2:
        args = [errno_for_guest(err.errno), *args[1:], *_file_names(err)]
    if isinstance(err, RemoteError):  # another twin's traceback text stays here
        args = [err.type_name[:MAX_TEXT], err.message[:MAX_TEXT]]
        kind = RemoteError
    try:
        safe = kind(*args)
    except Exception:  # arguments that do not fit the constructor
        safe = kind.__new__(kind)
        safe.args = tuple(args)
    return safe


def _file_names(err: OSError) -> List[Any]:
    """The rest of OSError's arguments after errno and strerror, for its file
    names: ``filename`` (and ``winerror``, None, and ``filename2``)."""
    names = [err.filename, None, err.filename2]
    while names and names[-1] is None:
        names.pop()
    return [
        name[:MAX_TEXT] if type(name) is str else name if type(name) in (bytes, int) else None
        for name in names
    ]


def _remote_type_name(proxy: Any) -> str:
    """The qualified name of the type of the object behind ``proxy``."""
    info = type(proxy).__class_info__
    if isinstance(info, type):  # an instance of a twin class
        return f"{info.__module__}.{info.__qualname__}"
    return str(info[0]) if isinstance(info, list) and info else ""


#: special methods every class has (from ``type``), whatever its metaclass
_CLASS_METHODS = frozenset({"__subclasses__", "__instancecheck__", "__subclasscheck__"})


def _never_handed_remote(proxy: Any) -> bool:
    """Whether the object behind ``proxy`` (of another twin) is of a kind
    never handed to a guest: by its type's name, a class of any metaclass
    (its type's special methods are those of ``type``), or a module of any
    type (described with its functions: a third element)."""
    if _remote_type_name(proxy) in _NEVER_HANDED_NAMES:
        return True
    info = type(proxy).__class_info__
    return (
        isinstance(info, list)
        and len(info) > 1
        and (len(info) == 3 or not _CLASS_METHODS.isdisjoint(info[1]))
    )


#: a path's real path, kept for the whole process: a fresh guest comes with a
#: new serializer, and realpath costs tens of microseconds (a system call per
#: component). What it decides (a function goes by name, or as a callback;
#: a clear error for ``execute``) is within the policy either way: the guest
#: sees only the files the host maps for it, and may call what it is handed.
_real_path = functools.lru_cache(maxsize=4096)(os.path.realpath)


def _within(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


class SandboxSerializer(Serializer):
    """Codec hooks for the master's link to a sandboxed guest."""

    keeps_interrupts = True

    def __init__(
        self,
        peer_id: str,
        guest_paths: Iterable[str] = (),
        module_files: FrozenSet[str] = frozenset(),
        fresh_of: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> None:
        super().__init__(peer_id, trusted=False)
        #: the guest's timeout (None: no limit), against which the master's
        #: time reading its frames other than answers counts (``_charge``);
        #: for a guest hosted elsewhere, what they took, drained at
        #: CHARGE_DRAIN of the time that passes, and when it was charged last
        self.charge_limit = timeout
        self.charged_seconds = 0.0
        self._charged_at = _clock()
        #: the twin ids whose twinfunctions and TwinObject classes run in this
        #: guest: its own, and for a guest of a fresh twin that twin's
        #: (cpy2py/fresh.py), as kernel_state.runs_pinned says in the guest
        self.pinned_ids = frozenset({peer_id, fresh_of} - {None})
        #: real paths of the roots the guest imports code from
        self.guest_paths: Tuple[str, ...] = tuple(_real_path(p) for p in guest_paths)
        #: real paths of the modules of the distributions given to it (packages=)
        self.module_files = module_files
        #: module file -> whether it lies under those roots
        self._importable: Dict[str, bool] = {}
        #: callables ``execute`` found the guest can import, by id (kept alive
        #: here, as the names of ``Serializer._names`` are): checked once
        self._executable: Dict[int, Any] = {}

    # -- what goes to the guest ---------------------------------------------

    def guest_can_import(self, module: str) -> bool:
        """Whether the guest can import ``module``: the standard library, cpy2py,
        or a module loaded here from a file under the guest's paths or of
        its packages."""
        top = module.split(".")[0]
        if top in _STDLIB_NAMES or top == "cpy2py":
            return True
        if main_module.is_main_name(module):
            main = sys.modules.get("__main__")
        else:
            main = sys.modules.get(module)
        path = getattr(main, "__file__", None)
        if not isinstance(path, str):
            return False
        known = self._importable.get(path)
        if known is None:
            real = _real_path(path)
            known = self._importable[path] = _within(real, self.guest_paths) or real in self.module_files
        return known

    def default(self, obj: Any) -> Tuple[int, Any]:
        known = self._names.get(id(obj))  # a function or class the guest has its copy of
        if known is not None and known[0] is obj:
            return tags.GLOBAL_REF, list(known[1])
        singleton = singleton_name(obj)
        if singleton is not None:
            return tags.GLOBAL_REF, singleton
        if type(obj) is _GlobalRef:
            return super().default(obj)
        std = std_values.encode(obj)  # a date, Decimal or UUID: a value the guest makes its own
        if std is not None:
            return tags.STD_VALUE, std
        if isinstance(obj, BaseException):
            return tags.EXCEPTION, self._exception_for_guest(obj)
        if _pinned_elsewhere(obj) and global_name(obj) is None:
            raise unfindable_pinned(obj)
        grant: Optional[Grant] = None
        if type(obj) is Exposed:
            obj, grant = obj.target, obj.grant
        proxy = isinstance(obj, references.TwinProxy)
        if proxy and object.__getattribute__(obj, "__twin_owner__") == self.peer_id:
            # the guest's own object, going home
            return tags.TWIN_REF, references.export(obj, self.connection, by_name=False)
        if not proxy:
            if isinstance(obj, NEVER_HANDED):
                if isinstance(obj, type) and grant is None:
                    name = global_name(obj)
                    if name is not None and (self._guest_has(obj, name)):
                        self._names[id(obj)] = (obj, name)
                        return tags.GLOBAL_REF, list(name)  # the guest's own copy of it
                raise SandboxViolation(
                    f"cannot hand a {type(obj).__module__}.{type(obj).__qualname__} to the sandboxed twin "
                    f"{self.peer_id!r}: frames, generators, coroutines, code, modules, loaders, classes "
                    "and tracebacks reach the master's insides and are never handed to a guest "
                    "(pass data, e.g. a list instead of a generator)"
                )
            if grant is None and callable(obj):
                name = global_name(obj)
                if name is not None and (self._guest_has(obj, name)):
                    self._names[id(obj)] = (obj, name)
                    return tags.GLOBAL_REF, list(name)  # the guest runs its own copy
        elif _never_handed_remote(obj):
            raise SandboxViolation(
                f"cannot hand a proxy of a {_remote_type_name(obj)} to the sandboxed twin {self.peer_id!r}: "
                "modules, classes, frames, generators and code are never handed to a guest"
            )
        if grant is None:
            declared = class_grant(type(obj).__proxied_class__ if proxy else type(obj))
            grant = declared or (CALL_ONLY if callable(obj) else OPAQUE)
        # a reference the guest may use exactly as granted (see perform)
        return tags.TWIN_REF, references.export(obj, self.connection, by_name=False, grant=grant)

    def _guest_has(self, obj: Any, name: Tuple[str, str]) -> bool:
        """Whether the guest can find ``obj`` by its name."""
        return self.guest_can_import(name[0]) or self._defined_for_guest(obj, name)

    def _defined_for_guest(self, obj: Any, name: Tuple[str, str]) -> bool:
        """A twinfunction or TwinObject class pinned to this guest, defined in a
        notebook cell or at the prompt: the master sends the guest its source
        (the master sending code to a guest is fine; the reverse never happens)."""
        from ..twin_object import TwinMeta

        if name[0] != "__main__":
            return False
        if isinstance(obj, TwinMeta):
            owner = type.__getattribute__(obj, "__twin_id__")
        else:
            owner = getattr(obj, "__twin_id__", None) if isinstance(obj, types.FunctionType) else None
        if owner not in self.pinned_ids:
            return False
        self.define_in_peer(name[1])
        return True

    def _exception_for_guest(self, err: BaseException) -> List[Any]:
        if not isinstance(err, Exception):
            raise SandboxViolation(
                f"{type(err).__name__} is the master's own (it is not an Exception): it never reaches "
                f"the sandboxed twin {self.peer_id!r}"
            )
        if err.__traceback__ is not None:  # raised by master code: the master keeps its traceback
            log.info(
                "an exception of the master goes to sandbox %s as its type and message:\n%s",
                self.peer_id,
                format_exception(err),
            )
        safe = guest_exception(err)
        kind = type(safe)
        args = list(safe.args)
        if isinstance(safe, OSError) and len(args) == 2:  # (its file names are not among its args)
            args += _file_names(safe)
        return [_GlobalRef((kind.__module__, kind.__qualname__)), args, None]

    def check_executable(self, call: Any) -> None:
        """``execute`` runs its callable in the guest, so the guest must be able
        to import it (handing it as a callback would run it in the master), or
        it must be the guest's own (a proxy of one of its functions)."""
        if self._executable.get(id(call)) is call:
            return
        if isinstance(call, references.TwinProxy):
            if object.__getattribute__(call, "__twin_owner__") == self.peer_id:
                return
            name = None  # never asked: its owner would answer, not this guest
        else:
            name = global_name(call) if callable(call) and type(call) is not Exposed else None
        if name is not None and self.guest_can_import(name[0]):
            self._executable[id(call)] = call
            return
        if name is None:
            raise TypeError(
                f"cannot run this {type(call).__qualname__} in the sandboxed twin {self.peer_id!r}: what "
                "execute runs travels by name, and it has none the guest could find it by (a bound "
                "method, a lambda, a nested function, or an object of another twin). Pass a "
                "module-level function or class of the standard library or of a module under its "
                f"paths {list(self.guest_paths)}"
            )
        raise TypeError(
            f"cannot run {name[0]}.{name[1]} in the sandboxed twin {self.peer_id!r}: functions and "
            f"classes travel by name, and the guest can import only the standard library and "
            f"modules under its paths {list(self.guest_paths)}. Define it in a module under those "
            f"paths (and pass paths= to TwinMaster)"
        )

    def frame_budget(self, size: int) -> Optional[int]:
        budget = getattr(codec, "sandbox_budget", None)
        return budget(size) if budget is not None else None

    def exit_arguments(self, kind: Any, value: Any) -> Optional[Tuple[Any, Any, None]]:
        """``with guest_object:``: an Exception reaches the guest's ``__exit__``
        as ``guest_exception`` makes it; a ``BaseException`` that is not an
        Exception (Ctrl-C, an exit) never does: ``__exit__`` is not called and
        the exception goes on in the master."""
        if value is None:
            return (None, None, None)
        if not isinstance(value, Exception):
            return None
        safe = guest_exception(value)
        return (type(safe), safe, None)

    def received_text(self, text: Any) -> Any:
        """What a guest object's ``__repr__``, ``__str__`` or ``__format__``
        answered: cut, and its terminal controls written out (printed, an
        exception holding the object included, it must not steer the
        master's terminal)."""
        if isinstance(text, str) and len(text) > MAX_TEXT:
            text = text[:MAX_TEXT] + f"... [{len(text) - MAX_TEXT} more characters cut by cpy2py]"
        return written_out(text)

    # -- what comes from the guest ------------------------------------------

    def decode(self, raw: Any, budget: Optional[int] = None) -> Tuple[Any, Optional[BaseException]]:
        """``Serializer.decode``, charging the guest for the master's time
        reading a frame of its that is not an answer to the master's call:
        the guest's own time stops while it waits for the master, and what
        costs the guest a copy can cost the master far more (a frame of
        20,000 references resent 150 times took the master 15 s of a call
        with a timeout of 1 s; through a callback it was handed, 1,000 new
        classes per call took it 40 s). That time counts toward the call's
        timeout (``_charge``). Answers are not charged: one comes per call
        the master makes, and its result is the caller's."""
        started = _clock()
        try:
            value, failure = Serializer.decode(self, raw, budget)
        except Exception:
            self._charge(_clock() - started)
            raise
        if failure is not None or not (type(value) is list and value and value[0] in _ANSWERS):
            self._charge(_clock() - started)
        return value, failure

    def release(self, items: Any) -> List[Any]:
        """``Serializer.release``, its walk charged as the frame's reading was
        (entries for objects the guest was never handed cost the master as
        much as its decoding did: 50,000 of them about 35 ms)."""
        started = _clock()
        try:
            return Serializer.release(self, items)
        finally:
            self._charge(_clock() - started)

    def _charge(self, seconds: float) -> None:
        """The master's ``seconds`` on what the guest sent, charged to the
        call it serves as its own running time, by its host here (the next
        call starts anew: a plugin that calls back with its own objects,
        whose proxies cost the master a fifth of the time, is never stopped
        for them across calls). A guest placed on a Ray node keeps its clock
        there: its link is charged instead, drained at CHARGE_DRAIN of the
        time that passes. Past its timeout, the guest is stopped."""
        connection = self.connection
        if connection is None:
            return
        runner = connection._runner
        if runner is not None:
            over = runner.charge(seconds)
        else:
            now = _clock()
            drained = (now - self._charged_at) * CHARGE_DRAIN
            self.charged_seconds = max(0.0, self.charged_seconds - drained) + seconds
            self._charged_at = now
            over = self.charge_limit is not None and self.charged_seconds > self.charge_limit
        if over:
            connection._break_and_kill(
                errors.TwinTimeout(
                    f"twinterpreter {self.peer_id!r} was stopped: it ran longer than its timeout of "
                    f"{self.charge_limit:g} s, counting the master's time reading what it sent "
                    "(requests, releases); its state was lost (the next call starts a fresh one)"
                )
            )

    def tag_hook(self, tag: int, value: Any) -> Any:
        if tag == tags.GLOBAL_REF:
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
                return self._refuse("a malformed name reference", value)
            if (value[0], value[1]) in SINGLETONS:  # (the one kind of name a guest may send)
                return SINGLETONS[value[0], value[1]]
            placeholder = _GuestName(value[0], value[1])
            # refused unless it turns out to be the type of an exception (see _exception)
            self._record_failure(
                placeholder,
                SandboxViolation(
                    f"the sandboxed twin {self.peer_id!r} sent a reference to "
                    f"{written_out(value[0][:MAX_NAME])}.{written_out(value[1][:MAX_NAME])}; a guest may "
                    "not name objects in the "
                    "master, twinfunctions and TwinObject classes pinned to it included (nothing was "
                    "imported or looked up). Hand the guest what it may use as arguments, or return "
                    "data from the guest instead"
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
        what it was handed (the object itself); nothing else."""
        if not (isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)):
            return self._refuse("a malformed reference", value)
        owner, iid, info = value
        if type(iid) is not int:
            return self._refuse("a malformed reference", value)
        if owner == self.peer_id:
            if isinstance(info, _GuestName):  # a class named by the guest: never imported
                self._forget_failure(info)
                info = [f"{info.module}.{info.qualname}", []]
            if isinstance(info, list) and info and isinstance(info[0], str):
                # (its name is the proxy class's, which errors and reprs show:
                # no terminal controls of the guest's)
                name = written_out(info[0])
                if name is not info[0]:
                    info = [name, *info[1:]]
                info = self._own_twin_class(info[0]) or info
            return references.resolve(owner, iid, info, self.connection)
        if isinstance(info, _GuestName):
            self._forget_failure(info)
        if (owner, iid) in self.connection.handed:
            return references.exported((owner, iid))
        return self._refuse("a reference to an object it was not handed", [owner, iid])

    def building_proxy_class(self) -> None:
        """A proxy class costs a class and a function per special method.
        Past MAX_NEW_CLASSES_PER_FRAME of them for one frame of the guest's,
        the frame is refused at once, its decoding stopped (70,000 made-up
        classes in one frame took the master 2 GB and 21 s, over the
        decoding budget, which counts the frame's items, not the classes
        they make)."""
        frame = _decoding.frame
        if frame is None or frame.serializer is not self:  # (not decoding a frame of the guest's)
            return
        frame.new_classes += 1
        if frame.new_classes > MAX_NEW_CLASSES_PER_FRAME:
            raise SandboxViolation(
                f"the sandboxed twin {self.peer_id!r} sent a frame describing more than "
                f"{MAX_NEW_CLASSES_PER_FRAME} classes of its objects not seen before, which the sandbox "
                "policy refuses; the call it belonged to failed, the guest keeps running"
            )

    def _own_twin_class(self, dotted: str) -> Optional[type]:
        """A TwinObject class pinned to this guest that the master has loaded
        already (so proxies pass isinstance); found without importing or
        running anything: plain dictionary lookups in loaded modules."""
        from ..twin_object import TwinMeta

        parts = dotted[: 4 * MAX_NAME].split(".")
        # The modules it may name: its prefixes that are loaded, from the left,
        # up to the first that is not (a module is loaded after its package).
        # Time linear in the name: trying every prefix, each joined anew, cost
        # the master 2 ms per reference of a name of 400 parts (a 2 MB frame
        # of such references held its GIL for 5 s).
        modules = []  # (where the rest of the name starts, the module)
        prefix = ""
        for split in range(1, len(parts)):
            prefix = f"{prefix}.{parts[split - 1]}" if prefix else parts[0]
            module = sys.modules.get(prefix)
            if module is None:
                break
            modules.append((split, module))
        for split, found in reversed(modules):  # the longest module first
            for part in parts[split:]:
                found = references.namespace_of(found).get(part)
                if found is None:
                    break
            # (by its type: isinstance would ask an object for its __class__)
            if (
                issubclass(type(found), TwinMeta)
                and type.__getattribute__(found, "__twin_id__") in self.pinned_ids
            ):
                return found
        return None

    # -- what the guest may do with what it was handed --------------------------

    def perform(self, op: int, operands: List[Any]) -> Any:
        """Requests from the guest, checked (``_check_request``) and carried
        out (the master's time reading them was charged by ``decode``)."""
        self._check_request(op, operands)
        return super().perform(op, operands)

    def _check_request(self, op: int, operands: List[Any]) -> None:
        """A request from the guest may be an operation on something it was
        handed, within what was granted of it; nothing else.

        The operation must be an int as decoded: one of the guest's own
        objects in its place (a proxy here, whose ``==`` the guest answers)
        could pass the checks below as one operation and be carried out by
        ``Serializer.perform`` as another (checked as a call, carried out as
        a method call of any name: ``__class__`` made a master object,
        ``__getattribute__`` read any attribute)."""
        if type(op) is not int:
            raise SandboxViolation(
                f"the sandboxed twin {self.peer_id!r} sent a request whose operation is not an int"
            )
        if op not in _OPERANDS:
            what = "create master objects" if op == OP_INSTANTIATE else f"use operation {op!r}"
            raise SandboxViolation(f"the sandboxed twin {self.peer_id!r} may not {what}")
        if len(operands) != _OPERANDS[op]:
            raise SandboxViolation(f"the sandboxed twin {self.peer_id!r} sent a malformed request")
        if op == OP_EXECUTE or op == OP_CALL_METHOD:
            # unpacked here as they came: a list and a dict of str keys, never
            # one of the guest's objects (an endless iterator of its own as
            # *args made the master unpack it until its memory ran out)
            args, kwargs = operands[-2], operands[-1]
            if type(args) is not list or type(kwargs) is not dict or any(type(k) is not str for k in kwargs):
                raise SandboxViolation(
                    f"the sandboxed twin {self.peer_id!r} sent a call whose arguments are not a list "
                    "and a dict of str keys"
                )
        target = operands[0]
        key = references.key_of(target)
        grant = self.connection.grants.get(key) if key is not None else None
        if grant is None:
            raise SandboxViolation(
                f"the sandboxed twin {self.peer_id!r} asked the master to act on something it was not "
                "handed; the master acts only on what it handed to the guest"
            )
        if op == OP_EXECUTE:
            name, allowed, verb = "__call__", grant.allows_call("__call__"), "call"
        else:
            name = operands[1]
            if type(name) is not str:  # (as decoded: never one of the guest's objects)
                raise SandboxViolation(
                    f"the sandboxed twin {self.peer_id!r} sent an attribute name that is not a str"
                )
            if op == OP_CALL_METHOD:
                allowed, verb = grant.allows_call(name), "call"
            elif op == OP_GETATTR:
                allowed, verb = grant.allows_read(name), "read"
            else:
                allowed, verb = grant.allows_write(name), "set or delete"
        if not allowed:
            granted = sorted(grant.names) or "nothing"
            if verb == "read" and name in grant.names:  # a special method: used, never read
                raise SandboxViolation(
                    f"the sandboxed twin {self.peer_id!r} may use {name[:MAX_NAME]!r} of the "
                    f"{type(target).__qualname__} it was handed only through its operation (len(obj), "
                    "obj[key], ...), not read it as an attribute"
                )
            raise SandboxViolation(
                f"the sandboxed twin {self.peer_id!r} may not {verb} {name[:MAX_NAME]!r} of the "
                f"{type(target).__qualname__} it was handed (granted: {granted}); the application "
                "grants names with cpy2py.expose(obj, ...) or @cpy2py.exposed(...) on the class"
            )

    def _refuse(self, what: str, value: Any) -> None:
        shown = f" ({references.safe_repr(value, 100)})" if value is not None else ""
        self._record_failure(
            None,
            SandboxViolation(
                f"the sandboxed twin {self.peer_id!r} sent {what}{shown}, which the sandbox policy "
                f"refuses; the call it belonged to failed, the guest keeps running"
            ),
        )
        return None

    def _exception(self, value: Any) -> BaseException:
        if not (isinstance(value, list) and len(value) in (3, 4) and isinstance(value[1], list)):
            return RemoteError("<malformed exception>", references.safe_repr(value), None)
        kind, args, text = value[:3]
        extra = value[3] if len(value) == 4 else {}
        notes = extra.get("notes", []) if type(extra) is dict else None
        if not (
            type(extra) is dict
            and set(extra) <= {"base", "notes"}
            and isinstance(extra.get("base", ""), str)
            and type(notes) is list
            and all(type(note) is str for note in notes)
        ):
            return RemoteError("<malformed exception>", references.safe_repr(value), None)
        if isinstance(kind, _GuestName):
            self._forget_failure(kind)  # a type name is fine here: it is only compared, never resolved
            module, qualname = kind.module[:MAX_NAME], kind.qualname[:MAX_NAME]
        else:
            module, qualname = "<unknown>", references.safe_repr(kind, 100)
        if not isinstance(text, str):
            text = None
        elif len(text) > MAX_TRACEBACK_TEXT:
            text = text[:MAX_TRACEBACK_TEXT] + "\n[... cut by cpy2py]"
        # what Python prints of an exception nobody catches: no terminal
        # controls of the guest's (its text arguments, type name, traceback)
        text = written_out(text)
        args = [written_out(a) for a in args]
        builtin = _builtin_exception(module, qualname)
        err: BaseException
        if builtin is None:
            name = written_out(qualname if module == "builtins" else f"{module}.{qualname}")
            # the builtin type the guest's derives from, if any (looked up
            # among the builtin Exception subclasses by name only), or the
            # nearest of its bases with a plain constructor, as for a
            # native twin's exception
            base = _builtin_exception("builtins", extra.get("base"))
            remote = remote_error_near(base.__name__) if base is not None else RemoteError
            message = ", ".join(_short(a) for a in args)
            if issubclass(remote, OSError):  # (a RemoteOSError) its errno... as OSError reads its args
                err = remote_os_error(remote, name, message, text, _os_error_fields(args))
            else:
                err = remote(name, message, text)
        else:
            # (str of a builtin exception is Python's: a RemoteError's message
            # is made above without str of its arguments)
            args = [_shown_long_int(a) for a in args]
            if issubclass(builtin, OSError) and args and type(args[0]) is int:
                args[0] = errno_from_guest(args[0])  # (the guest's numbers are WASI's)
            if builtin is ModuleNotFoundError and len(args) == 1 and type(args[0]) is str:
                args[0] += (
                    f" (in the sandboxed twin {self.peer_id!r}, which imports the standard library, the "
                    f"modules under its paths {list(self.guest_paths)} and its packages: pass paths= or "
                    "packages= to TwinMaster)"
                )
            try:
                err = builtin(*args)
            except Exception:  # args that do not fit the constructor
                err = builtin.__new__(builtin)
                err.args = tuple(args)
        if notes:  # (shown under it by Python 3.11+; cut, and written out as its other texts)
            err.__notes__ = [written_out(note[:MAX_TEXT]) for note in notes[:MAX_NOTES]]
        if text:
            err.__cause__ = RemoteTraceback(text, self.peer_id)
        return err


def _os_error_fields(args: List[Any]) -> Dict[str, Any]:
    """The errno, strerror and file names of a guest's OSError of its own
    type, read from its arguments as OSError's constructor does (the guest
    adds its file names to them): the errno is the master's number for the
    guest's, a strerror that is not text is its text, a file name anything
    but text or a number is dropped; nothing of the guest is asked for."""
    if not 2 <= len(args) <= 5:
        return {}
    number, strerror, filename, _, filename2 = (*args, None, None, None)[:5]  # (the 4th: winerror)
    return {
        "errno": errno_from_guest(number),
        "strerror": strerror if strerror is None or type(strerror) is str else _short(strerror),
        "filename": filename if type(filename) in (str, bytes, int) else None,
        "filename2": filename2 if type(filename2) in (str, bytes, int) else None,
    }


def _short(value: Any) -> str:
    """An argument of a guest's exception as text, without asking the guest."""
    if isinstance(value, str):
        return value if len(value) <= 1000 else value[:1000] + "..."
    return references.safe_repr(value, 1000)


#: C0 controls but tab and newline, DEL and the C1 controls, as ``\xHH``
#: (host/src/wasm/output.rs writes out a guest's output the same way); lone
#: surrogates as ``\uDXXX``: a stream that writes them as bytes
#: (``surrogateescape``, as stdout does under ``-X utf8`` or the C locale)
#: could turn two of them into a C1 control (``\udcc2\udc9b`` is CSI)
_CONTROLS = {
    code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if code not in (0x09, 0x0A)
}
_CONTROLS.update({code: f"\\u{code:04x}" for code in range(0xD800, 0xE000)})
#: the line and paragraph separators (line ends to log readers and
#: str.splitlines: a line of the guest's without its prefix) and the
#: bidirectional controls (they reorder what a line shows), as the host writes them out
_CONTROLS.update(
    {
        code: f"\\u{code:04x}"
        for code in (0x061C, 0x200E, 0x200F, *range(0x2028, 0x202F), *range(0x2066, 0x206A))
    }
)


def _shown_long_int(arg: Any) -> Any:
    """An argument of a guest's builtin exception that holds an int too long
    for ``str`` (over the interpreter's limit, 4,300 digits unless the
    application set another, which made ``str(err)``, and so an ``except``
    clause that logs it, raise ValueError), as a short text saying what it
    was (``safe_repr``); anything else as it is."""
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()  # (0: no limit, before 3.11)
    if limit and _holds_long_int(arg, limit * 3, 0):  # (3 bits a digit: under the limit)
        return references.safe_repr(arg, 200)
    return arg


def _holds_long_int(value: Any, bits: int, depth: int) -> bool:
    """Whether ``value`` (plain data as decoded) holds an int of more than ``bits``."""
    kind = type(value)
    if kind is int:
        return value.bit_length() > bits
    if depth > 20 or kind not in (list, tuple, set, frozenset, dict):
        return False
    items = list(value.items()) if kind is dict else value
    return any(_holds_long_int(item, bits, depth + 1) for item in items)


def written_out(text: Any) -> Any:
    """A guest's text as the master shows it (an exception's message and
    traceback, its last output in a start's error): carriage returns,
    backspaces, escape sequences and the other terminal controls written out
    as ``\\xHH``, so that printed on the master's terminal it cannot move
    the cursor, erase the master's lines or pass for them; line separators
    and bidirectional controls as ``\\uHHHH``. Tabs and newlines stay;
    anything but a str is returned as it is."""
    if type(text) is not str or text.isprintable():
        return text
    return text.translate(_CONTROLS)
