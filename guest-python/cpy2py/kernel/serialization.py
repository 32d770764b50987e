"""What the kernel adds to the codec: references, exceptions and pickle.

The codec carries plain data; everything else passes through the hooks here:

- functions, classes and other module-level names travel as a reference
  (module, qualname) and are looked up on the other side;
- exceptions travel as type reference, args and the formatted traceback,
  and are raised again as the same type with the remote traceback attached;
- on trusted links, any other picklable object is pickled (pass by value).

Looking up a name may fail on the receiving side (a module missing there).
Such failures do not break the link: they are collected while decoding one
frame (``Serializer.decode``) and turned into the error of the request or
reply that carried the name; nothing of one frame is kept for the next.
"""

from __future__ import annotations

import _thread
import builtins
import sys

from .. import kernel_state
from ..capabilities import Exposed
from ..errors import (
    OS_ERROR_FIELDS,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    TwinError,
    remote_error_type,
)
from ..protocol import codec, tags
from ..protocol.messages import (
    OP_CALL_METHOD,
    OP_DELATTR,
    OP_EXECUTE,
    OP_GETATTR,
    OP_INSTANTIATE,
    OP_SETATTR,
    RAISE,
)
from . import main_module, references, std_values
from .main_module import shown_module

TYPE_CHECKING = False
if TYPE_CHECKING:  # (a twin's start imports no typing)
    from typing import Any, Dict, List, Optional, Tuple

PICKLE_PROTOCOL = 4


def _plain_function() -> None:
    pass


FunctionType = type(_plain_function)  # types.FunctionType, without importing types at start-up
_ModuleType = type(sys)


class _Frame:
    """A frame being decoded on this thread: its serializer, failed lookups,
    and the proxy classes it made the link build (a sandbox's count)."""

    __slots__ = ("serializer", "outer", "failures", "new_classes")

    def __init__(self, serializer: Any, outer: Optional[_Frame]) -> None:
        self.serializer = serializer
        self.outer = outer
        self.failures: List[Tuple[Any, BaseException]] = []
        self.new_classes = 0


class _Decoding(_thread._local):
    frame: Optional[_Frame] = None  # (a class default: see protocol/transport.py _Held)


_decoding = _Decoding()


def decoding_from(serializer: Any) -> bool:
    """Whether this thread is decoding a frame of ``serializer``'s link."""
    frame = _decoding.frame
    while frame is not None:
        if frame.serializer is serializer:
            return True
        frame = frame.outer
    return False


class _Unresolved:
    """Stands in for a name that could not be looked up here."""

    __slots__ = ("module", "qualname")

    def __init__(self, module: str, qualname: str) -> None:
        self.module, self.qualname = module, qualname

    def __repr__(self) -> str:
        return f"<unresolved {self.module}.{self.qualname}>"


def import_module(name: str) -> Any:
    if main_module.is_main_name(name):
        return main_module.load()
    # what importlib would return, without its machinery (every function sent
    # by name is looked up again to check the name: twice per call)
    module = sys.modules.get(name)
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        return module
    return main_module.import_by_name(name)


def lookup(module: str, qualname: str) -> Any:
    """The object named ``qualname`` in ``module``."""
    obj = import_module(module)
    meta = None
    for part in qualname.split("."):
        if part == "<locals>":
            raise LookupError(f"{module}.{qualname} is local to a function and has no global name")
        if meta is None and isinstance(obj, type):
            meta = references.twin_meta()
        if meta is not None and isinstance(obj, meta):
            # what a twin class defines, read here: its getattr asks its twin,
            # whose answer (Outer.Inner, by this very name) would ask again
            obj = type.__getattribute__(obj, part)
        else:
            obj = getattr(obj, part)
    return obj


def global_name(obj: Any) -> Optional[Tuple[str, str]]:
    """(module, qualname) if ``obj`` can be found again by that name, else None."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<locals>" in qualname:
        return None
    try:
        found = lookup(module, qualname)
    except Exception:
        return None
    return (module, qualname) if found is obj else None


#: builtin singletons that travel by name on every link, a sandbox's too: a
#: rich comparison's NotImplemented must arrive as itself (a proxy of it is
#: true, and Python would not try the reflected operation)
SINGLETONS = {("builtins", "NotImplemented"): NotImplemented, ("builtins", "Ellipsis"): Ellipsis}


def singleton_name(obj: Any) -> Optional[List[str]]:
    """The name of ``obj`` if it is one of ``SINGLETONS``, else None."""
    if obj is NotImplemented:
        return ["builtins", "NotImplemented"]
    if obj is Ellipsis:
        return ["builtins", "Ellipsis"]
    return None


def _exception_of(kind: type, args: List[Any]) -> BaseException:
    """An exception of ``kind`` with ``args``. A type with an ``__init__`` of
    its own is made without calling it: its args are what that passed up, not
    what it takes (``HTTPError(404)`` says ``super().__init__("HTTP 404")``,
    and ``HTTPError("HTTP 404")`` would say "HTTP HTTP 404"); its attributes
    come after, from the exception's state."""
    init_owner = next((k for k in kind.__mro__ if "__init__" in vars(k)), BaseException)
    try:
        if init_owner.__module__ != "builtins":
            err = kind.__new__(kind, *args)
            err.args = tuple(args)
            return err
        return kind(*args)
    except Exception:  # (a __new__ of its own, or args a builtin type refuses)
        err = kind.__new__(kind)
        err.args = tuple(args)
        return err


def _is_twin(obj: Any) -> bool:
    """A twin object (native here) or a proxy: sent by reference, never copied."""
    if isinstance(obj, references.TwinProxy):  # (the target of every call on a proxy)
        return True
    return isinstance(type(obj), references.twin_meta())


def _wrapper_by_its_name(func: Any) -> Any:
    """What ``func``'s module holds under its name if that wraps ``func``
    (a twinfunction's or another decorator's ``__wrapped__``), else None."""
    import inspect  # (an error's path only)

    try:
        found = lookup(func.__module__, func.__qualname__)
        return (
            found if found is not func and inspect.unwrap(found, stop=lambda f: f is func) is func else None
        )
    except Exception:  # (not found; or a loop of __wrapped__: ValueError)
        return None


def _pinned_elsewhere(obj: Any) -> bool:
    """... except a twin class or twinfunction pinned to another interpreter:
    it means something only there, so it goes by name and the receiver
    decides (a sandboxed guest's master refuses it). As a reference to the
    sender's object it would bounce back to the sender forever."""
    if isinstance(obj, references.twin_meta()):
        from ..twin_object import _native_here  # (only for a twin class)

        return not _native_here(obj)
    owner = getattr(obj, "__twin_id__", None) if type(obj) is FunctionType else None
    return owner is not None and not kernel_state.runs_pinned(owner)


def unfindable_pinned(obj: Any) -> TypeError:
    """The error for a twinfunction or twin class pinned elsewhere that has
    no name its twin could find it by."""
    return TypeError(
        f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)} is pinned to "
        f"{getattr(obj, '__twin_id__', '?')!r}, which cannot find it by its name: define "
        "twinfunctions and TwinObject classes at the top level of a module (not inside a "
        "function), use them once the module has defined them, and make @twinfunction the "
        "outermost decorator (its name must hold what twinfunction returned, not another "
        "decorator's wrapper of it)"
    )


_pickle_classes: Optional[Tuple[type, type]] = None
#: types whose instances a pickler writes as they are, as their type says
#: (no twin object, proxy, module, class, function, exception or grant):
#: the builtin ones, and those met since (up to _MAX_PLAIN_TYPES, which it
#: keeps alive)
_plain_types = {
    int,
    float,
    str,
    bytes,
    bool,
    type(None),
    tuple,
    list,
    dict,
    set,
    frozenset,
    complex,
    bytearray,
}
_MAX_PLAIN_TYPES = 1024


def _picklers() -> Tuple[type, type]:
    """The kernel's (Pickler, Unpickler), made on first use: a twin that is
    sent no pickle never imports pickle."""
    global _pickle_classes
    if _pickle_classes is not None:
        return _pickle_classes
    import pickle

    class _Pickler(pickle.Pickler):
        """Pickles by value, but twin objects inside by reference."""

        def __init__(self, file: Any, serializer: Serializer) -> None:
            super().__init__(file, protocol=PICKLE_PROTOCOL)
            self.serializer = serializer
            #: a batch of a message's objects (references.encode): what CBOR
            #: carries its own way is refused, and the message encoded anew
            self.batch = False

        def reducer_override(self, obj: Any) -> Any:
            # Called for each object the pickle holds that is neither
            # memoized already nor, in CPython's pickler, of a type it
            # writes itself (None, bool, int, float, str, bytes, and exact
            # dict, list, tuple, set, frozenset, bytearray); pickle.py (PyPy)
            # calls it for those too. Not ``persistent_id``, which both call
            # for every object, memoized ones included: a class once per
            # object of a batch, each int and str of a record's fields.
            # What is decided here by the type alone is remembered by type;
            # a class or function is asked about once (then memoized).
            kind = type(obj)
            try:
                if kind in _plain_types:
                    return NotImplemented
            except TypeError:  # (a class whose metaclass makes it unhashable)
                pass
            if kind is _GenericAlias and _ON_PYPY:  # (PyPy names a module of its own: see _generic_alias)
                return _generic_alias, (obj.__origin__, obj.__args__)
            if isinstance(obj, (type, FunctionType)):  # pickled by name
                if getattr(obj, "__module__", None) == "__main__":
                    if self.serializer.master_only(obj, obj.__qualname__):
                        # the value goes as a proxy instead (see Serializer.default)
                        raise pickle.PicklingError(f"{obj.__qualname__} exists in the master only")
                    # the peer needs it if the master's main has no file
                    self.serializer.define_in_peer(obj.__qualname__)
                return NotImplemented
            if self.batch and (isinstance(obj, BaseException) or kind is Exposed):
                raise pickle.PicklingError("an exception or a grant goes as CBOR")
            # a module stays where it is (PyPy would pickle it by name, and
            # the peer would import its own copy and run it there)
            if _is_twin(obj) or kind is _ModuleType:
                # (memoized: the same object again in this pickle is this one reference)
                return _twin_reference, tuple(references.export(obj, self.serializer.connection))
            if (
                not isinstance(obj, BaseException)
                and kind is not Exposed
                and len(_plain_types) < _MAX_PLAIN_TYPES
            ):
                try:
                    if obj.__class__ is kind:  # (isinstance believes a __class__ that says otherwise)
                        _plain_types.add(kind)
                except Exception:  # (an unhashable class; a __class__ that raises)
                    pass
            return NotImplemented

    class _Unpickler(pickle.Unpickler):
        def __init__(self, file: Any, serializer: Serializer) -> None:
            super().__init__(file)
            self.serializer = serializer

        def find_class(self, module: str, name: str) -> Any:
            if main_module.is_main_name(module):
                return lookup(module, name)
            if name == "_twin_reference" and module == __name__:
                return self._resolve  # (resolved through this unpickler's link)
            return super().find_class(module, name)

        def _resolve(self, owner: str, iid: int, info: Any) -> Any:
            return references.resolve(owner, iid, info, self.serializer.connection)

    _pickle_classes = (_Pickler, _Unpickler)
    return _pickle_classes


_GenericAlias = type(list[int])


def _generic_alias(origin: Any, args: tuple) -> Any:
    """``origin[args]``: how a PyPy twin pickles ``list[int]`` and its kin
    (PyPy's own pickle names ``_pypy_generic_alias``, which CPython lacks)."""
    return origin[args if len(args) != 1 else args[0]]


def _twin_reference(owner: str, iid: int, info: Any) -> Any:
    """What a pickle holds in place of a twin object, a proxy or a module
    (``_Pickler.reducer_override``): the kernel's unpickler resolves it
    through its own link instead (``_Unpickler.find_class``)."""
    raise ProtocolError(f"a reference to {owner!r}'s object {iid} was unpickled outside cpy2py's kernel")


_ON_PYPY = sys.implementation.name == "pypy"
#: builtin types named ``builtins.<name>`` that CPython's builtins lack (PyPy
#: names ``type(None)`` so; CPython pickles it as ``type(None)``)
_NOT_IN_BUILTINS = {"NoneType": type(None), "ellipsis": type(...), "NotImplementedType": type(NotImplemented)}
#: modules that only PyPy's unpickler knows, named by how PyPy pickles some
#: builtins (range and dict iterators, bound methods of builtin objects:
#: ``_pickle_support``; operator's itemgetter, attrgetter and methodcaller,
#: which CPython's ``_operator`` rebuilds with other arguments): such a
#: value goes to a CPython peer as a proxy instead
_PYPY_ONLY_MODULES = ("_pickle_support", "_operator")
_PYPY_ONLY_NAMES = tuple(name.encode() for name in _PYPY_ONLY_MODULES)
#: opcodes that push a string, or change nothing on the stack
_STRING_OPS = frozenset(("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"))
_NO_STACK_OPS = frozenset(("FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "PROTO"))


def _needs_pypy(data: bytes) -> bool:
    """Whether a pickle made by PyPy names a global of _PYPY_ONLY_MODULES."""
    if not any(name in data for name in _PYPY_ONLY_NAMES):
        return False  # (nearly always: one substring search per module)
    import pickletools

    memo: Dict[Any, Any] = {}
    pushed: List[Any] = []  # what each opcode pushed, the strings by value
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in _STRING_OPS:
            pushed.append(arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif name == "STACK_GLOBAL":
            if len(pushed) >= 2 and pushed[-2] in _PYPY_ONLY_MODULES:
                return True
            pushed.append(None)
        elif name == "GLOBAL":
            if str(arg).split(" ", 1)[0] in _PYPY_ONLY_MODULES:
                return True
            pushed.append(None)
        elif name not in _NO_STACK_OPS:
            pushed.append(None)
    return False


#: frames of cpy2py's own code start with this (see format_exception)
_PACKAGE_PREFIX = __file__.rsplit("kernel", 1)[0]


def format_exception(err: BaseException) -> str:
    """The traceback the peer shows for ``err``: without cpy2py's own frames
    (running the request, calling across; a call that recursed across
    interpreters printed some 28 lines per hop), except for cpy2py's own
    errors (TwinError), where they say where it failed."""
    import traceback  # on the first exception sent, not at start-up

    shown = traceback.TracebackException(type(err), err, err.__traceback__)
    seen = set()
    todo: List[Tuple[Any, Any]] = [(shown, err)]  # (its description, the exception)
    while todo:
        part, exc = todo.pop()
        if part is None or exc is None or id(part) in seen:
            continue
        seen.add(id(part))
        stack = part.stack
        if stack and not isinstance(exc, TwinError):
            part.stack = traceback.StackSummary.from_list(
                [frame for frame in stack if not frame.filename.startswith(_PACKAGE_PREFIX)]
            )
        if type(exc).__module__ == main_module.MAIN_ALIAS:
            _show_as_main(part, type(exc))
        todo += [(part.__cause__, exc.__cause__), (part.__context__, exc.__context__)]
        todo += zip(getattr(part, "exceptions", None) or (), getattr(exc, "exceptions", ()))
    return "".join(shown.format())


def _show_as_main(part: Any, kind: type) -> None:
    """Make the traceback description ``part`` of an exception of ``kind``, a
    class of this twin's copy of the master's script (``__cpy2py_main__``),
    name it as the master would its ``__main__``'s: by its qualname alone."""
    if "exc_type_module" in vars(part):  # (3.13+: exc_type_str is made of it)
        part.exc_type_module = "__main__"
    elif getattr(part, "exc_type", None) is kind:  # (before: read from the type)
        part.exc_type = type(
            kind.__name__,
            (SyntaxError if issubclass(kind, SyntaxError) else Exception,),
            {"__module__": "__main__", "__qualname__": kind.__qualname__},
        )


#: the key of an exception's attributes (the fourth item of its value, on
#: trusted links) that names the builtin type its own type derives from, for
#: a receiver that cannot find that type (never set as an attribute)
BASE_KEY = "__cpy2py_base__"


def builtin_base(kind: type) -> Optional[str]:
    """The name of the nearest builtin type ``kind`` derives from, unless that
    is Exception or BaseException (None)."""
    base = next((k for k in kind.__mro__ if k.__module__ == "builtins" and k is not kind), Exception)
    return None if base is Exception or base is BaseException else base.__name__


def remote_error_near(base_name: Any) -> type:
    """The ``RemoteError`` type for an exception from a trusted peer whose
    type cannot be found here, but which derives from the builtin type
    ``base_name``: the ``Remote<type>`` of the nearest builtin ``Exception``
    type with a plain constructor among that one and its bases (a
    ``UnicodeDecodeError``'s is ``RemoteValueError``; an ``OSError`` and its
    builtin subclasses have a ``RemoteOSError``: ``remote_os_error``), else
    ``RemoteError``."""
    base = vars(builtins).get(base_name) if type(base_name) is str else None
    if not (isinstance(base, type) and issubclass(base, Exception)):
        return RemoteError
    for klass in base.__mro__:
        if klass is Exception:
            break
        found = remote_error_type(klass)
        if found is not RemoteError:
            return found
    return RemoteError


def remote_os_error(
    remote: type, name: str, plain: str, text: Optional[str], fields: Dict[str, Any]
) -> BaseException:
    """A ``RemoteOSError`` (``remote``) named ``name`` with the ``errno``,
    ``strerror``, ``filename`` and ``filename2`` in ``fields``; its message
    what OSError's str says of them (``[Errno 2] gone: 'a.txt'``), or
    ``plain`` (its args as text) when it says only its args. The file names
    are shown without asking anyone: a proxy among them is described here."""
    number, strerror, filename, filename2 = (fields.get(key) for key in OS_ERROR_FIELDS)

    def shown(item: Any, quoted: bool = True) -> str:
        # (text cut at 1000 characters, as other remote messages are; no
        # __format__ or __repr__ of an object runs, nor int's, which refuses
        # more than 4300 digits: safe_repr says what they are)
        if type(item) in (str, bytes):
            cut = item[:1000]
            text = repr(cut) if quoted else str(cut)
            return text + "..." if len(item) > 1000 else text
        return references.safe_repr(item, 1000)

    if filename is not None:  # (as OSError.__str__)
        message = f"[Errno {shown(number)}] {shown(strerror, False)}: {shown(filename)}"
        if filename2 is not None:
            message += f" -> {shown(filename2)}"
    elif number is not None and strerror is not None:
        message = f"[Errno {shown(number)}] {shown(strerror, False)}"
    else:
        message = plain
    return remote(
        name, message, text, errno=number, strerror=strerror, filename=filename, filename2=filename2
    )


class Serializer:
    """Codec hooks and request execution for one link.

    ``trusted`` links (native twins) may carry pickles and look up any name;
    sandboxed links will get a stricter subclass.
    """

    #: Ctrl-C or an exit while serving the peer stops the peer and stays here,
    #: instead of going back to the peer as the request's exception (sandboxes)
    keeps_interrupts = False

    def __init__(self, peer_id: str, trusted: bool = True) -> None:
        self.peer_id = peer_id
        self.trusted = trusted
        #: the link this serializer works for (set by the Connection)
        self.connection: Any = None
        # names known to resolve back to their object: encoding them is a dict hit
        self._names: Dict[int, Tuple[Any, Tuple[str, str]]] = {}
        self._lookups: Dict[Tuple[str, str], Any] = {}
        #: set by the master once the peer serves: it can be sent definitions
        self.peer_ready = False
        #: name -> object of the master's interactive __main__ the peer has the source of
        self._defined: Dict[str, Any] = {}
        self._define_lock = _thread.RLock()

    # -- one frame ----------------------------------------------------------

    def decode(self, raw: Any, budget: Optional[int] = None) -> Tuple[Any, Optional[BaseException]]:
        """Decode one frame: its value, and the first failure of a name lookup
        in it that the value could not do without (or None). Each frame's
        failures are its own: many threads decode at once, and decoding one
        frame may decode another on the same thread (a hash that calls the peer)."""
        outer = _decoding.frame
        frame = _decoding.frame = _Frame(self, outer)
        try:
            if budget is None:
                value = codec.loads(raw, self.tag_hook)
            else:
                value = codec.guest_loads(raw, self.tag_hook, budget=budget)
            return value, (frame.failures[0][1] if frame.failures else None)
        finally:
            _decoding.frame = outer

    def building_proxy_class(self) -> None:
        """The link is about to build a proxy class for a class description
        of the peer's (references.proxy_class): a sandbox counts them."""

    def release(self, items: Any) -> List[Any]:
        """The peer let go of ``items`` (a release frame's entries): what
        nobody holds any more, for the caller to drop outside the reading
        role (a sandbox charges the walk to its guest)."""
        return references.release(items, self.connection)

    def frame_budget(self, size: int) -> Optional[int]:
        """What decoding a frame of ``size`` bytes may cost (None: no limit; a
        trusted peer's frames are as big as the application makes them)."""
        return None

    def _record_failure(self, placeholder: Any, err: BaseException) -> None:
        frame = _decoding.frame
        if frame is not None:
            frame.failures.append((placeholder, err))

    def _forget_failure(self, placeholder: Any) -> None:
        """A failed lookup that the enclosing value can do without."""
        frame = _decoding.frame
        if frame is not None:
            frame.failures[:] = [f for f in frame.failures if f[0] is not placeholder]

    # -- encoding ---------------------------------------------------------

    def default(self, obj: Any) -> Tuple[int, Any]:
        """Codec hook: how to send what plain data cannot carry."""
        known = self._names.get(id(obj))
        if known is not None and known[0] is obj:
            return tags.GLOBAL_REF, list(known[1])
        singleton = singleton_name(obj)
        if singleton is not None:
            return tags.GLOBAL_REF, singleton
        if type(obj) is Exposed:  # a grant means something to sandboxes only
            return self.default(obj.target)
        if type(obj) is _GlobalRef:
            return tags.GLOBAL_REF, list(obj.name)
        if type(obj) is references.Whole and self.trusted:
            return self._whole(obj.value, obj.batch)
        if _is_twin(obj):
            return tags.TWIN_REF, references.export(obj, self.connection, by_name=self.trusted)
        if isinstance(obj, BaseException):
            return tags.EXCEPTION, self._exception_fields(obj)
        # names are looked up by the receiver: only on trusted links (a guest's
        # functions reach the master as references to the guest's objects) ...
        if (self.trusted and (callable(obj) or isinstance(obj, type))) or _pinned_elsewhere(obj):
            name = global_name(obj)
            if name is not None and not (name[0] == "__main__" and self.master_only(obj, name[1])):
                if name[0] == "__main__":
                    self.define_in_peer(name[1])
                self._names[id(obj)] = (obj, name)
                return tags.GLOBAL_REF, list(name)
            if name is None and _pinned_elsewhere(obj):  # (as a reference it would bounce back here)
                raise unfindable_pinned(obj)
        if self.trusted:  # plain objects travel as copies where they can
            import io

            buffer = io.BytesIO()
            mark = references.exports_mark()
            try:
                _picklers()[0](buffer, self).dump(obj)
                data = buffer.getvalue()
                if not (_ON_PYPY and _needs_pypy(data)):
                    references.pickled()  # (many in one message: references.encode)
                    return tags.PICKLE, data
                references.undo_exports(mark)
            except references.ManyPickles:
                raise
            except Exception:  # what it exported before failing is not sent
                references.undo_exports(mark)
        if not self.trusted:  # (a guest's: a date, Decimal or UUID as a value, not a pickle)
            std = std_values.encode(obj)
            if std is not None:
                return tags.STD_VALUE, std
        # what cannot be copied stays here and is used through a proxy
        return tags.TWIN_REF, references.export(obj, self.connection, by_name=self.trusted)

    def _whole(self, value: Any, batch: bool = False) -> Tuple[int, Any]:
        """A value as one pickle (references.Whole): one that holds a cycle,
        or a ``batch``, whose failure is the caller's to handle."""
        import io

        buffer = io.BytesIO()
        try:
            pickler = _picklers()[0](buffer, self)
            pickler.batch = batch
            pickler.dump(value)
            data = buffer.getvalue()
            if _ON_PYPY and _needs_pypy(data):
                raise TypeError("it holds objects that PyPy pickles its own way, which CPython cannot load")
        except Exception as err:
            if batch:
                raise
            raise ValueError(
                f"cannot send a value that contains itself: data crosses as a copy written out as a "
                f"tree, and a value with a cycle goes as a pickle instead, which failed ({err}). Send a "
                "TwinObject that holds it (it crosses as a reference), or break the cycle"
            ) from None
        return tags.PICKLE, data

    def _exception_fields(self, err: BaseException) -> List[Any]:
        from ..protocol import codec  # late: codec imports nothing from here

        kind = type(err)
        # the type's own name even if it cannot be looked up here: the
        # receiver then raises a RemoteError that names it
        name = (shown_module(getattr(kind, "__module__", "builtins")), kind.__qualname__)
        args = list(err.args)
        if not self.trusted and isinstance(err, OSError) and len(args) == 2 and err.filename is not None:
            # (where no state follows: a guest's) the file names as OSError's arguments
            args += [err.filename, None, err.filename2] if err.filename2 is not None else [err.filename]
        mark = references.exports_mark()
        try:
            codec.dumps(args, self.default)
        except Exception:  # the args cannot travel: their text can
            args = [str(err)]
        finally:  # a trial: the args are encoded (and exported) again below
            references.undo_exports(mark)
        fields = [_GlobalRef(name), args, format_exception(err)]
        # the builtin type its type derives from: a receiver that cannot find
        # its type raises a RemoteError that derives from it too (``except
        # ValueError`` catches it)
        base = builtin_base(kind) if name[0] != "builtins" else None
        if self.trusted:
            state = self._exception_state(err)
            state.pop(BASE_KEY, None)
            if base is not None:
                state[BASE_KEY] = base
            if state:
                fields.append(state)
        else:
            # (a guest's) that base, and its notes (``add_note``), as text
            extra: Dict[str, Any] = {}
            if base is not None:
                extra["base"] = base
            notes = getattr(err, "__notes__", None)
            if type(notes) is list and notes:
                extra["notes"] = [str(note) for note in notes]
            if extra:
                fields.append(extra)
        return fields

    def _exception_state(self, err: BaseException) -> Dict[str, Any]:
        """What an exception was given beyond its args, those that can
        travel: its attributes (``__dict__``: ``self.status = 404`` in its
        ``__init__``, ``__notes__``) and an OSError's file names (and errno
        and strerror, of a type that is not a builtin one). The
        receiver sets them on the exception it rebuilds from its args,
        whose ``__init__`` may have given them defaults. Trusted links only
        (a guest's exceptions are the master's own builtin types)."""
        from ..protocol import codec

        state = {key: value for key, value in getattr(err, "__dict__", {}).items() if type(key) is str}
        if isinstance(err, OSError):
            # its errno and strerror too where its type is not a builtin one:
            # its own __init__ may not have passed them up as its args, and a
            # receiver that cannot find its type makes a RemoteOSError of them
            builtin = type(err).__module__ == "builtins"
            for key in ("filename", "filename2") if builtin else OS_ERROR_FIELDS:
                if getattr(err, key, None) is not None:
                    state[key] = getattr(err, key)
        for key in list(state):
            mark = references.exports_mark()
            try:
                codec.dumps(state[key], self.default)
            except Exception:  # this one cannot travel: the others still do
                del state[key]
            finally:
                references.undo_exports(mark)
        return state

    #: the peer runs the master's main block too (``run_main=True``)
    peer_runs_main = False

    def master_only(self, obj: Any, qualname: str) -> bool:
        """Whether ``__main__.<qualname>`` is bound under the master's main
        block, which the peer does not run: it goes as a proxy, not by name
        (a twin could not find it, or would find another object). Pinned
        objects still go by name (their twin must say it lacks them)."""
        return (
            not self.peer_runs_main
            and kernel_state.is_master()
            and main_module.bound_in_main_block(qualname.split(".")[0])
            and not _pinned_elsewhere(obj)
        )

    # -- the master's interactive definitions -------------------------------

    def define_in_peer(self, qualname: str) -> None:
        """Before the peer gets a reference to ``__main__.<qualname>`` of a master
        without a main file (a notebook, the prompt), send it the source of
        that definition, once per version of it (a cell run again redefines it)."""
        if not kernel_state.is_master():
            return
        from . import interactive

        name = qualname.split(".")[0]
        current = vars(sys.modules["__main__"]).get(name)
        if self._defined.get(name) is current or not interactive.master_main_is_interactive():
            return
        with self._define_lock:
            if self._defined.get(name) is current:
                return
            try:
                found = interactive.definitions(name, constants=self.trusted)
            except interactive.NoSourceError as err:
                raise interactive.NoSourceError(f"cannot send {name!r} to {self.peer_id!r}: {err}") from None
            namespace = vars(sys.modules["__main__"])
            needed = [d for d in found if self._defined.get(d["name"]) is not namespace.get(d["name"])]
            if not self.peer_ready:
                raise interactive.NoSourceError(
                    f"cannot send {name!r} to {self.peer_id!r} while it starts (a TWIN_GROUP_STATE "
                    "initializer's argument?): pass plain data, or add the initializer as a function"
                )
            self.connection.request(OP_EXECUTE, main_module.define, [needed], {})
            for definition in needed:
                self._defined[definition["name"]] = namespace.get(definition["name"])

    def definitions_for_welcome(self, funcs: List[Any]) -> List[Dict[str, Any]]:
        """The definitions a starting twin needs for these functions of the
        master's interactive ``__main__`` (its welcome carries them)."""
        if not funcs or not kernel_state.is_master():
            return []
        from . import interactive

        if not interactive.master_main_is_interactive():
            return []
        namespace = vars(sys.modules["__main__"])
        needed: List[Dict[str, Any]] = []
        for func in funcs:
            name = global_name(func)
            if name is None or name[0] != "__main__":
                continue
            for definition in interactive.definitions(name[1].split(".")[0], constants=self.trusted):
                if definition["name"] not in self._defined:
                    needed.append(definition)
                    self._defined[definition["name"]] = namespace.get(definition["name"])
        return needed

    # -- decoding ---------------------------------------------------------

    def tag_hook(self, tag: int, value: Any) -> Any:
        """Codec hook: what a kernel tag means here."""
        if tag == tags.GLOBAL_REF:
            try:
                return self._lookup(value)
            except ProtocolError:
                raise
            except Exception as err:
                placeholder = _Unresolved(value[0], value[1])
                self._record_failure(placeholder, err)
                return placeholder
        try:
            if tag == tags.EXCEPTION:
                return self._exception(value)
            if tag == tags.TWIN_REF:
                if not (isinstance(value, list) and len(value) == 3):
                    raise ProtocolError(f"malformed twin reference {references.safe_repr(value, 100)}")
                owner, iid, info = value
                if not (isinstance(owner, str) and isinstance(iid, int)):
                    raise ProtocolError(f"malformed twin reference {references.safe_repr(value, 100)}")
                return references.resolve(owner, iid, info, self.connection)
            if tag == tags.STD_VALUE:
                return std_values.decode(value)  # (a ValueError fails the call it came with)
            if tag == tags.PICKLE:
                if not self.trusted:
                    raise ProtocolError(f"{self.peer_id!r} sent a pickle on a link that does not allow them")
                import io

                return _picklers()[1](io.BytesIO(value), self).load()
        except ProtocolError:
            raise
        except Exception as err:
            self._record_failure(None, err)
            return None
        raise ProtocolError(f"{self.peer_id!r} sent unknown CBOR tag {tag}")

    def _lookup(self, value: Any) -> Any:
        if not (type(value) is list and len(value) == 2 and type(value[0]) is str and type(value[1]) is str):
            raise ProtocolError(f"malformed name reference {references.safe_repr(value, 100)}")
        key = (value[0], value[1])
        try:
            return self._lookups[key]
        except KeyError:
            pass
        if main_module.is_main_name(key[0]):  # not cached: a notebook cell may redefine it
            try:
                return lookup(*key)
            except AttributeError as err:
                raise LookupError(
                    f"{key[0]}.{key[1]} (sent by {self.peer_id!r}) cannot be found in this interpreter: "
                    f"{type(err).__name__}: {err} (twins import the master's script without its "
                    '`if __name__ == "__main__":` block: define what a twin needs at its top level)'
                ) from err
            except Exception as err:  # the script itself failed here (an import the twin cannot do)
                if isinstance(err, TwinError):  # it used twins as it was imported
                    advice = (
                        "the script's own work ran as it was imported (a TwinMaster used, asyncio.run(...) "
                        'called at its top level): put that work under `if __name__ == "__main__":`'
                    )
                else:
                    advice = (
                        "move the imports only the master can do (a C extension of its environment, such "
                        "as numpy in a PyPy twin) into the main block or into the functions that use them"
                    )
                raise LookupError(
                    f"{key[0]}.{key[1]} (sent by {self.peer_id!r}) cannot be found in this interpreter: "
                    f"it could not import the master's main script: {type(err).__name__}: "
                    f"{references.safe_repr(str(err), 300)[1:-1]}. Twins import that script (without its "
                    f"main block) to find what is pinned to them: {advice}"
                ) from err
        try:
            # builtins need no import machinery (and few frames: a RecursionError
            # from deep down must still be found)
            if key[0] == "builtins":
                found = vars(builtins).get(key[1], _NOT_IN_BUILTINS.get(key[1]))
                obj = found if found is not None else vars(builtins)[key[1]]
            else:
                obj = lookup(*key)
        except Exception as err:
            raise LookupError(
                f"{key[0]}.{key[1]} (sent by {self.peer_id!r}) cannot be found in this interpreter: "
                f"{type(err).__name__}: {err}"
            ) from err
        self._lookups[key] = obj
        return obj

    def _exception(self, value: Any) -> BaseException:
        if not (isinstance(value, list) and len(value) in (3, 4) and isinstance(value[1], list)):
            raise ProtocolError(f"malformed exception {references.safe_repr(value, 100)}")
        kind, args, text = value[:3]
        if isinstance(kind, _Unresolved):
            self._forget_failure(kind)
        state = value[3] if len(value) == 4 and self.trusted and type(value[3]) is dict else {}
        if isinstance(kind, _Unresolved) or not (isinstance(kind, type) and issubclass(kind, BaseException)):
            name = f"{kind.module}.{kind.qualname}" if isinstance(kind, _Unresolved) else repr(kind)
            remote = remote_error_near(state.get(BASE_KEY))
            message = ", ".join(map(str, args))
            err: BaseException
            if issubclass(remote, OSError):  # (its errno... are among the attributes: _exception_state)
                err = remote_os_error(remote, name, message, text, state)
            else:
                err = remote(name, message, text)
            notes = state.get("__notes__")
            if type(notes) is list and notes:  # (shown under it by Python 3.11+)
                err.__notes__ = [str(note) for note in notes]
        else:
            err = _exception_of(kind, args)
            for key, item in state.items():
                if key == BASE_KEY:
                    continue
                try:
                    setattr(err, key, item)
                except Exception:  # (a read-only property of its class, say)
                    pass
        if text:
            err.__cause__ = RemoteTraceback(text, self.peer_id)
        return err

    def reraise(self, value: Any) -> BaseException:
        if isinstance(value, BaseException):
            return value
        return ProtocolError(
            f"{self.peer_id!r} raised something that is not an exception: {references.safe_repr(value, 100)}"
        )

    def check_executable(self, call: Any) -> None:
        """Raise if ``call`` cannot be run by the peer (sandboxes are strict):
        a function the peer cannot find by name would go as a proxy, and
        ``execute`` would run it here instead, unsaid."""
        if type(call) is not FunctionType:
            return
        known = self._names.get(id(call))
        if known is not None and known[0] is call:
            return
        name = global_name(call)
        if name is not None and not (name[0] == "__main__" and self.master_only(call, name[1])):
            return
        if _pinned_elsewhere(call):
            return  # (its encoding says what is wrong)
        advice = (
            "Define it at the top level of a module (outside the main block); to have the twin call "
            "it back here, pass it as an argument of a function that runs there"
        )
        if call.__name__ == "<lambda>":
            why = "a lambda has no name"
        elif "<locals>" in call.__qualname__:
            why = "it is local to a function"
        elif (wrapper := _wrapper_by_its_name(call)) is not None:
            owner = getattr(wrapper, "__twin_id__", None)
            what = f"the twinfunction pinned to {owner!r} that wraps it" if owner else "a wrapper of it"
            why = f"its name, {call.__module__}.{call.__qualname__}, is {what}"
            advice = "Call that instead, or give the plain function a name of its own in a module"
        else:
            why = "it is defined in the master's main block only"
        raise TypeError(
            f"cannot run {call.__qualname__} in twinterpreter {self.peer_id!r}: functions travel by "
            f"name, and {self.peer_id!r} cannot find this one ({why}). {advice}"
        )

    # -- what proxies of the peer's objects pass on -----------------------------

    def exit_arguments(self, kind: Any, value: Any) -> Optional[Tuple[Any, Any, None]]:
        """The arguments for the peer's ``__exit__`` when a ``with`` block on its
        object ends with exception ``value`` (None: do not call it)."""
        return (kind, value, None)

    def received_text(self, text: Any) -> Any:
        """What the peer's ``__repr__``/``__str__`` answered, as shown here."""
        return text

    # -- executing requests -------------------------------------------------

    def perform(self, op: int, operands: List[Any]) -> Any:
        """Run one request operation and return its result."""
        if op == OP_CALL_METHOD:
            obj, name, args, kwargs = operands
            if isinstance(obj, type) and name[:2] == "__" and hasattr(type(obj), name):
                # a class's data model is its metaclass's: repr(cls) is
                # type(cls).__repr__(cls), not the unbound __repr__ of its instances
                return getattr(type(obj), name)(obj, *args, **kwargs)
            result = getattr(obj, name)(*args, **kwargs)
            if type(result) is str and result.startswith(_MAIN_REPR) and _default_repr(obj, name):
                # object's repr of an instance of a class of this twin's copy
                # of the master's script: the name its user knows it by
                result = "<__main__." + result[len(_MAIN_REPR) :]
            return result
        if op == OP_EXECUTE or op == OP_INSTANTIATE:
            func, args, kwargs = operands
            return func(*args, **kwargs)
        if op == OP_GETATTR:
            return getattr(*operands)
        if op == OP_SETATTR:
            return setattr(*operands)
        if op == OP_DELATTR:
            return delattr(*operands)
        raise ProtocolError(f"unknown request operation {op!r}")


#: how object's repr of an instance of a class of this twin's copy of the
#: master's script starts (``<__cpy2py_main__.Thing object at 0x...>``)
_MAIN_REPR = f"<{main_module.MAIN_ALIAS}."
_CLASS_NAMESPACE = type.__dict__["__dict__"]


def _default_repr(obj: Any, name: str) -> bool:
    """Whether ``obj.<name>()`` (``__repr__`` or ``__str__``) is object's:
    the type's module and qualname in angle brackets. Looked up in the
    classes' namespaces (nothing of a metaclass runs)."""
    if name not in ("__repr__", "__str__"):
        return False
    wanted = {"__repr__"} if name == "__repr__" else {"__repr__", "__str__"}
    for klass in type.__getattribute__(type(obj), "__mro__"):
        namespace = _CLASS_NAMESPACE.__get__(klass)
        for method in [m for m in wanted if m in namespace]:
            if namespace[method] is not vars(object)[method]:
                return False
            wanted.discard(method)
    return not wanted


_BARE_NOTE = " (cpy2py: the full exception could not be sent)"


def bare_failure(req_id: int, err: BaseException, trusted: bool = True) -> bytes:
    """A RAISE message for ``err`` that needs few stack frames and nothing of
    ``err`` but its type name and text: for when the full form cannot be
    encoded (a RecursionError near the limit, a failing ``__str__``). To a
    peer that is not ``trusted`` (a sandboxed guest), only what the sandbox
    lets through of a master exception: its nearest builtin type and its
    str arguments (no object's text, no type name of the master's)."""
    from ..protocol import codec  # late: codec imports nothing from here

    if trusted:
        kind = type(err)
        builtin = vars(builtins).get(kind.__name__) is kind
        try:
            text = str(err) if builtin else f"{shown_module(kind.__module__)}.{kind.__qualname__}: {err}"
        except BaseException:  # a failing __str__
            text = kind.__qualname__
        name = kind.__name__ if builtin else "RuntimeError"
    else:
        name, text = _public_bare(err)
    if _BARE_NOTE not in text:
        text = text[:4096] + _BARE_NOTE

    def encode(obj: Any) -> Tuple[int, Any]:
        if type(obj) is _GlobalRef:
            return tags.GLOBAL_REF, list(obj.name)
        return tags.EXCEPTION, [_GlobalRef(("builtins", name)), [text], None]

    return codec.dumps([RAISE, req_id, err], encode)


def _public_bare(err: BaseException) -> Tuple[str, str]:
    """The name of the nearest builtin ``Exception`` type of ``err`` and its
    str arguments (as kernel/sandbox.py's ``guest_exception`` keeps them),
    found without calling anything of ``err``; ("Exception", "") if even
    that fails this close to the recursion limit."""
    try:
        name = next(
            (
                k.__name__
                for k in type(err).__mro__
                if vars(builtins).get(k.__name__) is k and issubclass(k, Exception)
            ),
            "Exception",
        )
        args = BaseException.args.__get__(err)  # (not an override of ``args``)
        return name, ", ".join(a[:4096] for a in args if type(a) is str)
    except BaseException:
        return "Exception", ""


class _GlobalRef:
    """Encodes as a name reference without a lookup (for exception types)."""

    __slots__ = ("name",)

    def __init__(self, name: Tuple[str, str]) -> None:
        self.name = name
