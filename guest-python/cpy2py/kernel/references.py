"""Twin references: objects stay where they live; elsewhere they are proxies.

Exports: an object sent by reference (a TwinObject, or anything that cannot
travel as a copy) is kept alive here in ``_exports``, keyed by
``(owner twin id, instance id)``, with the number of times it was sent. A
proxy passed on to a third interpreter is exported the same way, which keeps
the proxy (and thus the object in its owner) alive.

Proxies: a reference received here becomes the one proxy of that object in
this interpreter (``_proxies``), so identity is kept. A proxy counts the
references it received over the link to its owner; when it is collected it
queues a release of that many, which is sent in a batch (before the next
request, or by a flusher thread) - never from ``__del__`` itself. The owner
subtracts the count and drops the object when nothing is left.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from .. import kernel_state
from ..errors import ProtocolError
from ..protocol.messages import (
    OP_CALL_METHOD,
    OP_DELATTR,
    OP_GETATTR,
    OP_SETATTR,
)
from . import links

if TYPE_CHECKING:
    from .connection import Connection

Key = Tuple[str, int]

_lock = threading.Lock()
_exports: Dict[Key, List[Any]] = {}  # key -> [object, times sent]
_iid_of: Dict[int, int] = {}  # id(native object) -> its instance id, while exported
# Instance ids start at a random offset, so that a restarted twin never
# hands out the id of an object of its previous life to a stale proxy.
_iids = itertools.count((int.from_bytes(os.urandom(4), "big") << 24) + 1)
_proxies: weakref.WeakValueDictionary[Key, TwinProxy] = weakref.WeakValueDictionary()
#: releases queued by collected proxies, per link they travel over (the
#: owner's twin id in the master; in a twin, the master's): lists of (owner,
#: instance id, count). A list is never removed, so no append from __del__
#: can land in a list that was already taken away.
_pending_releases: Dict[str, List[Tuple[str, int, int]]] = {}
_flusher: Optional[threading.Thread] = None

# how a proxy class reaches an attribute of its object
_GETATTR, _METHOD, _LOCAL = "getattr", "method", "local"

#: special methods a proxy never forwards: they make the proxy itself work
_NOT_FORWARDED = frozenset(
    {
        "__init__",
        "__new__",
        "__del__",
        "__getattribute__",
        "__getattr__",
        "__setattr__",
        "__delattr__",
        "__init_subclass__",
        "__class_getitem__",
        "__subclasshook__",
        "__slots__",
        "__dict__",
        "__weakref__",
        "__module__",
        "__qualname__",
        "__doc__",
        "__twin_id__",
        "__class__",
        "__reduce__",
        "__reduce_ex__",
        "__getstate__",
        "__setstate__",
        "__sizeof__",
        "__annotations__",
        "__format__",
        "__instancecheck__",
        "__subclasscheck__",
        "__prepare__",
        "__mro_entries__",
        "__set_name__",
        "__copy__",
        "__deepcopy__",
        "__getnewargs__",
        "__getnewargs_ex__",
        "__abstractmethods__",
        "__orig_bases__",
        "__parameters__",
        "__firstlineno__",
        "__static_attributes__",
        "__match_args__",
        "__dataclass_fields__",
        "__dataclass_params__",
        "__hash__",
        "__eq__",
    }
)
#: forwarded for every proxy, defined by the class or not
_ALWAYS_FORWARDED = ("__repr__", "__str__", "__dir__")


# -- exporting ----------------------------------------------------------------


def export(obj: Any, connection: Connection, by_name: bool = True) -> List[Any]:
    """The wire form ``[owner, instance id, class info]`` of ``obj``, counted as sent.

    ``by_name=False`` (sandbox links) never names a class: the receiver gets
    a generic description and looks nothing up.
    """
    if isinstance(obj, TwinProxy):
        key = (
            object.__getattribute__(obj, "__twin_owner__"),
            object.__getattribute__(obj, "__instance_id__"),
        )
        info = type(obj).__class_info__
        if not by_name and isinstance(info, type):
            info = class_info(info, by_name=False)
        # The receiver counts (and later releases) a reference only if it
        # makes a proxy that talks to us: a twin getting it from the master.
        # Its owner, or the master getting it back, keeps no count.
        if not kernel_state.is_master() or connection.peer_id == key[0]:
            return [key[0], key[1], info]
    else:
        info = class_info(type(obj), by_name)
    with _lock:
        if not isinstance(obj, TwinProxy):
            iid = _iid_of.get(id(obj))
            if iid is None:
                iid = _iid_of[id(obj)] = next(_iids)
            key = (kernel_state.TWIN_ID, iid)
        entry = _exports.get(key)
        if entry is None:
            _exports[key] = [obj, 1]
        else:
            entry[1] += 1
    connection.handed.add(key)
    return [key[0], key[1], info]


def class_info(cls: type, by_name: bool = True) -> Any:
    """What a receiver needs to build a proxy class: the class itself for twin
    classes (sent by name), else the type's name and its special methods."""
    from ..twin_object import TwinMeta

    if by_name and isinstance(cls, TwinMeta):
        return cls
    return [f"{cls.__module__}.{cls.__qualname__}", sorted(_special_names(cls))]


def exported(key: Key) -> Any:
    """The object exported under ``key``; LookupError if it is not (any more)."""
    entry = _exports.get(key)
    if entry is None:
        raise LookupError(
            f"object #{key[1]} of {key[0]!r} is not known here (any more): "
            "it was released, or its twinterpreter was restarted"
        )
    return entry[0]


def release(items: Any) -> None:
    """A peer dropped references: ``[[owner, instance id, count], ...]``."""
    if not isinstance(items, list):
        raise ProtocolError(f"malformed release {items!r:.100}")
    dropped = []
    with _lock:
        for item in items:
            if not (isinstance(item, list) and len(item) == 3):
                raise ProtocolError(f"malformed release entry {item!r:.100}")
            key = (item[0], item[1])
            entry = _exports.get(key)
            if entry is None:
                continue
            entry[1] -= item[2]
            if entry[1] <= 0:
                del _exports[key]
                if key[0] == kernel_state.TWIN_ID:
                    _iid_of.pop(id(entry[0]), None)
                dropped.append(entry[0])  # the last reference goes outside the lock
    del dropped


def export_count() -> int:
    """How many objects are kept alive for other interpreters (for tests and debugging)."""
    return len(_exports)


# -- receiving ------------------------------------------------------------------


def resolve(owner: str, iid: int, info: Any, connection: Connection) -> Any:
    """The object for a received reference: the native one, or its proxy here."""
    key = (owner, iid)
    if owner == kernel_state.TWIN_ID:
        return exported(key)
    # references count towards the link to their owner (a twin has only the master's)
    counted = connection.peer_id == owner or not kernel_state.is_master()
    with _lock:
        proxy = _proxies.get(key)
        if proxy is None:
            proxy_cls = proxy_class(info)
            proxy = object.__new__(proxy_cls)
            object.__setattr__(proxy, "__twin_owner__", owner)
            object.__setattr__(proxy, "__instance_id__", iid)
            object.__setattr__(proxy, "__received__", 0)
            _proxies[key] = proxy
        if counted:
            object.__setattr__(proxy, "__received__", object.__getattribute__(proxy, "__received__") + 1)
    _ensure_flusher()
    return proxy


def _queue_release(owner: str, iid: int, count: int) -> None:
    # called from __del__: atomic dict and list operations only, no locks, no I/O
    link = owner if kernel_state.is_master() else kernel_state.MASTER_ID
    queue = _pending_releases.get(link)
    if queue is None:
        queue = _pending_releases.setdefault(link, [])
    queue.append((owner, iid, count))


def flush_releases(link: Optional[str] = None) -> None:
    """Send the queued releases, one batch per link; with ``link``, only
    those over the link to that twin id. A caller flushes only the link it
    is about to use: another twin's link may block (a twin that stopped
    reading), and must not hold up calls to the others."""
    for target in [link] if link is not None else list(_pending_releases):
        queue = _pending_releases.get(target)
        items: List[List[Any]] = []
        while queue:
            try:
                owner, iid, count = queue.pop()
            except IndexError:
                break
            items.append([owner, iid, count])
        if items:
            connection = links.existing_connection(target)
            if connection is not None:
                connection.send_release(items)


def _ensure_flusher() -> None:
    global _flusher
    if _flusher is not None or not _threads_available():
        return
    with _lock:
        if _flusher is not None:
            return
        _flusher = threading.Thread(target=_flush_forever, name="cpy2py-releaser", daemon=True)
        _flusher.start()


def _flush_forever() -> None:
    while True:
        time.sleep(0.05)
        try:
            flush_releases()
        except Exception:  # a broken link: its releases no longer matter
            pass


def _threads_available() -> bool:
    return sys.platform != "wasi"  # the WASI guest has no threads: releases ride on requests


# -- proxies --------------------------------------------------------------------


def _special_names(cls: type) -> set:
    names = set()
    for klass in cls.__mro__:
        if klass is object or getattr(klass, "__module__", None) == "cpy2py.twin_object":
            continue
        for name, value in vars(klass).items():
            if name[:2] == "__" and name[-2:] == "__" and name not in _NOT_FORWARDED and callable(value):
                names.add(name)
    return names


def _forwarder(name: str) -> Any:
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if name == "__exit__" and len(args) == 3:
            args = (args[0], args[1], None)  # a traceback cannot travel; its text does, in the exception
        return call(self, OP_CALL_METHOD, name, list(args), kwargs)

    forward.__name__ = name
    return forward


_proxy_classes: Dict[Any, type] = {}


def proxy_class(info: Any) -> type:
    """The proxy class for a class info (cached)."""
    from ..twin_object import TwinMeta

    if isinstance(info, TwinMeta):
        cache_key: Any = info
        names = _special_names(info)
        proxied: Any = info
        name, qualname, module = info.__name__, info.__qualname__, info.__module__
        unhashable = info.__hash__ is None
    elif isinstance(info, list) and len(info) == 2 and isinstance(info[1], list):
        cache_key = (info[0], tuple(info[1]))
        names = {n for n in info[1] if isinstance(n, str) and n not in _NOT_FORWARDED}
        proxied = None
        qualname = info[0].rsplit(".", 1)[-1]
        name, module = qualname, info[0].rsplit(".", 1)[0]
        unhashable = False
    else:
        raise LookupError(f"cannot make a proxy for class {info!r:.100}")
    cls = _proxy_classes.get(cache_key)
    if cls is not None:
        return cls
    namespace: Dict[str, Any] = {
        "__slots__": (),
        "__proxied_class__": proxied,
        "__class_info__": info,
        "__module__": module,
        "__qualname__": qualname,
        "__doc__": getattr(proxied, "__doc__", None),
        "_kinds": {},
    }
    for special in set(_ALWAYS_FORWARDED) | names:
        namespace[special] = _forwarder(special)
    if "__eq__" in _all_names(proxied, info):
        namespace["__eq__"] = _forwarder("__eq__")
        namespace["__hash__"] = None if unhashable else _forwarder("__hash__")
    elif unhashable:
        namespace["__hash__"] = None
    cls = type(name, (TwinProxy,), namespace)
    _proxy_classes[cache_key] = cls
    return cls


def _all_names(proxied: Any, info: Any) -> set:
    if proxied is None:
        return set(info[1])
    names = set()
    for klass in proxied.__mro__:
        if klass is not object and getattr(klass, "__module__", None) != "cpy2py.twin_object":
            names.update(vars(klass))
    return names


def _classify(cls: type, name: str) -> str:
    import inspect

    proxied = cls.__proxied_class__
    if proxied is None:
        return _GETATTR
    found = inspect.getattr_static(proxied, name, None)
    if isinstance(found, (classmethod, staticmethod)):
        return _METHOD
    if inspect.isfunction(found):
        return _LOCAL if getattr(found, "__cpy2py_local__", False) else _METHOD
    return _GETATTR


def call(target: Any, op: int, *operands: Any) -> Any:
    """Run an operation on the object behind ``target`` (a proxy or a twin class)."""
    if isinstance(target, TwinProxy):
        owner = object.__getattribute__(target, "__twin_owner__")
    else:
        owner = type.__getattribute__(target, "__twin_id__")
    return links.connection_to(owner).request(op, target, *operands)


class RemoteMethod:
    """A method of a proxied object or twin class: calling it runs it natively."""

    __slots__ = ("__self__", "__name__")

    def __init__(self, target: Any, name: str) -> None:
        self.__self__ = target
        self.__name__ = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call(self.__self__, OP_CALL_METHOD, self.__name__, list(args), kwargs)

    def __repr__(self) -> str:
        return f"<remote method {self.__name__} of {self.__self__!r}>"


_PROXY_LOCALS = frozenset(
    {
        "__twin_owner__",
        "__instance_id__",
        "__received__",
        "__class__",
        "__proxied_class__",
        "__class_info__",
        "_kinds",
        "__reduce_ex__",
        "__reduce__",
        "__weakref__",
        "__is_twin_proxy__",
    }
)


class TwinProxy:
    """Base of all proxies: every attribute access goes to the native object."""

    __slots__ = ("__twin_owner__", "__instance_id__", "__received__", "__weakref__")
    __is_twin_proxy__ = True

    def __getattribute__(self, name: str) -> Any:
        if name in _PROXY_LOCALS:
            return object.__getattribute__(self, name)
        cls = type(self)
        kind = cls._kinds.get(name)
        if kind is None:
            kind = cls._kinds[name] = _classify(cls, name)
        if kind is _METHOD:
            return RemoteMethod(self, name)
        if kind is _LOCAL:
            import inspect

            return inspect.getattr_static(cls.__proxied_class__, name).__get__(self, cls.__proxied_class__)
        return call(self, OP_GETATTR, name)

    def __setattr__(self, name: str, value: Any) -> None:
        call(self, OP_SETATTR, name, value)

    def __delattr__(self, name: str) -> None:
        call(self, OP_DELATTR, name)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "a twin proxy is pickled only as a reference inside cpy2py; it cannot be pickled on its own"
        )

    def __del__(self) -> None:
        try:
            received = object.__getattribute__(self, "__received__")
            if received:
                _queue_release(
                    object.__getattribute__(self, "__twin_owner__"),
                    object.__getattribute__(self, "__instance_id__"),
                    received,
                )
        except Exception:  # interpreter shutdown: nothing left to release
            pass


def is_proxy(obj: Any) -> bool:
    """Whether ``obj`` is a proxy of an object that lives in another interpreter."""
    return isinstance(obj, TwinProxy)
