"""``TwinObject``: objects that live in one twinterpreter and are proxies elsewhere.

A class deriving from ``TwinObject`` is native to the interpreter named by
its ``__twin_id__`` (the master by default). Instantiating it anywhere
creates the instance there; other interpreters get a proxy that forwards
attribute access, method calls and special methods. The class itself is the
same code everywhere; in other interpreters its class attributes are read and
written in the native one, and its methods and classmethods run there.
"""

from __future__ import annotations

import abc

from . import kernel_state
from .functions import fresh_twin_named
from .kernel import links
from .kernel.references import AsyncRemoteMethod, RemoteMethod, TwinProxy, call
from .protocol.messages import OP_DELATTR, OP_GETATTR, OP_INSTANTIATE, OP_SETATTR

TYPE_CHECKING = False
if TYPE_CHECKING:  # (a twin's start imports no typing)
    from typing import Any, TypeVar

    #: a function, classmethod or staticmethod: ``localmethod`` keeps its type
    M = TypeVar("M")


def _native_here(cls: type) -> bool:
    return kernel_state.runs_pinned(type.__getattribute__(cls, "__twin_id__"))


def _attributes_here(cls: type) -> bool:
    """Whether the class attributes of ``cls`` are read and written here: it is
    native here, or its twin cannot find it by name yet (a class decorator,
    ``@dataclass`` say, runs before its module binds it) or ever (a class
    local to a function: its instances cannot be made, see serialization)."""
    if _native_here(cls):
        return True
    from .kernel.serialization import global_name

    return global_name(cls) is None


class _ClassSignature:
    """``TwinMeta.__signature__``: what ``inspect.signature(cls)`` says is how
    the class's instances are made (``__init__``, else ``__new__``, without
    their first parameter), not the metaclass's ``__call__``, which takes
    anything and routes it. A descriptor without ``__set__``: a signature a
    class sets for itself is kept and wins."""

    def __get__(self, cls: Any, metaclass: Any = None) -> Any:
        if cls is None:  # (asked of the metaclass itself: inspect finds its own)
            return None
        import inspect

        from .kernel.references import _without_first

        try:
            for name in ("__init__", "__new__"):
                found = inspect.getattr_static(cls, name, None)
                func = getattr(found, "__func__", found)
                if inspect.isfunction(func):
                    return _without_first(inspect.signature(func))
            if found is object.__new__ and inspect.getattr_static(cls, "__init__", None) is object.__init__:
                return inspect.Signature()  # (made without arguments, as any plain class)
        except (TypeError, ValueError):
            pass
        return None


def _kept_here(name: str) -> bool:
    """Class attributes that are never routed: special names, and the state
    ``abc.ABCMeta`` keeps in each class (``_abc_impl``)."""
    return name[:2] == "__" or name[:5] == "_abc_"


def _of_metaclass(cls: type, name: str) -> bool:
    """Whether ``name`` is an attribute of the metaclass that the class does
    not define (a method of the class object itself)."""
    return any(name in vars(meta) for meta in type(cls).__mro__) and not any(
        name in vars(klass) for klass in type.__getattribute__(cls, "__mro__")
    )


class TwinMeta(abc.ABCMeta):
    """Metaclass of twin classes: routes instantiation and class attributes.

    An ``abc.ABCMeta``, so that a twin class may also derive from
    ``abc.ABC`` (or any other abstract base class) and declare abstract
    methods: its native interpreter refuses to instantiate it as Python does.
    """

    __signature__ = _ClassSignature()

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if _native_here(cls):
            return type.__call__(cls, *args, **kwargs)
        owner = type.__getattribute__(cls, "__twin_id__")
        fresh_twin = fresh_twin_named(owner)
        if fresh_twin is not None:  # each instance in a guest of its own, alive while its proxies are
            from . import fresh

            return fresh.execute(fresh_twin, cls, list(args), kwargs)
        return links.connection_to(owner).request(OP_INSTANTIATE, cls, list(args), kwargs)

    def __getattribute__(cls, name: str) -> Any:
        if _kept_here(name) or _attributes_here(cls):
            return type.__getattribute__(cls, name)
        import inspect  # only classes native elsewhere get here; keeps twins' start light

        if _of_metaclass(cls, name):  # (ABCMeta.register, type.mro: about the class object here)
            return type.__getattribute__(cls, name)
        found = inspect.getattr_static(cls, name, None)
        if getattr(found, "__cpy2py_local__", False):
            return type.__getattribute__(cls, name)
        if isinstance(found, (classmethod, staticmethod)) or inspect.isfunction(found):
            if inspect.iscoroutinefunction(getattr(found, "__func__", found)):
                return AsyncRemoteMethod(cls, name)  # (awaited, as the method would be)
            return RemoteMethod(cls, name)
        return call(cls, OP_GETATTR, name)

    def __setattr__(cls, name: str, value: Any) -> None:
        if _kept_here(name) or _attributes_here(cls):
            type.__setattr__(cls, name, value)
        else:
            call(cls, OP_SETATTR, name, value)

    def __delattr__(cls, name: str) -> None:
        if _kept_here(name) or _attributes_here(cls):
            type.__delattr__(cls, name)
        else:
            call(cls, OP_DELATTR, name)

    def __instancecheck__(cls, obj: Any) -> bool:
        proxied = getattr(type(obj), "__proxied_class__", None)
        if isinstance(proxied, type):
            return issubclass(proxied, cls)
        return abc.ABCMeta.__instancecheck__(cls, obj)


class TwinObject(metaclass=TwinMeta):
    """Base class of objects pinned to a twinterpreter by ``__twin_id__``.

    Without ``__twin_id__`` a class is native to the master. Behaves like
    ``object`` wherever it is native.
    """

    #: (a subclass that declares ``__slots__`` gets instances without a ``__dict__``)
    __slots__ = ()
    __twin_id__: str = kernel_state.MASTER_ID
    #: the original's marker: False here, True on proxies
    __is_twin_proxy__: bool = False


def localmethod(func: M) -> M:
    """Mark a method of a TwinObject to run in the interpreter that calls it,
    with ``self`` being the proxy there (attribute access still goes to the
    native object)."""
    target: Any = func.__func__ if isinstance(func, (classmethod, staticmethod)) else func
    target.__cpy2py_local__ = True
    return func


def is_proxy(obj: Any) -> bool:
    """Whether ``obj`` is a proxy of an object that lives in another interpreter."""
    return isinstance(obj, TwinProxy)
