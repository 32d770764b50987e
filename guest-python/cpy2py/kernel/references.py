"""Twin references: objects stay where they live; elsewhere they are proxies.

Exports: an object sent by reference (a TwinObject, or anything that cannot
travel as a copy) is kept alive here in ``_exports``, keyed by
``(owner twin id, instance id)``, with the number of times it was sent. A
proxy passed on to a third interpreter is exported the same way, which keeps
the proxy (and thus the object in its owner) alive. Each link counts what
its peer holds (``Connection.handed``): a peer releases only its own
references, and everything it holds is released when its link ends.

Proxies: a reference received here becomes the one proxy of that object in
this interpreter (``_proxies``), so identity is kept. A proxy belongs to the
link it came over (its owner's link in the master, the master's in a twin):
once that link ended the proxy raises ``TwinterpreterTerminated``, and it
never reaches a restarted twin of the same id. A proxy counts the references
it received; when it is collected it queues a release of that many on its
link, which is sent in a batch (before the next request, or by a flusher
thread) - never from ``__del__`` itself. The owner subtracts the count and
drops the object when nothing is left.
"""

from __future__ import annotations

import _thread
import itertools
import os
import sys
import time

from .. import kernel_state
from ..capabilities import DATA_MODEL_METHODS
from ..errors import NestedTooDeep, ProtocolError, SharedParts, TwinterpreterTerminated
from ..protocol import codec
from ..protocol.messages import (
    OP_CALL_METHOD,
    OP_DELATTR,
    OP_EXECUTE,
    OP_GETATTR,
    OP_SETATTR,
)
from ..protocol.tags import SHARING_DETECT, SHARING_REFS, SHARING_TREE
from . import links, main_module

TYPE_CHECKING = False
if TYPE_CHECKING:  # (a twin's start imports no typing)
    from typing import Any, Dict, List, Optional, Set, Tuple
    from weakref import WeakValueDictionary

    from .connection import Connection

    Key = Tuple[str, int]

#: cpy2py.twin_object.TwinMeta (twin_object imports the kernel): imported
#: with the first look (twin_meta), not at each one (an import statement in
#: a function costs 1-3 us, several times per pickled object)
_twin_meta: Optional[type] = None


def twin_meta() -> type:
    """The metaclass of TwinObject classes."""
    global _twin_meta
    if _twin_meta is None:
        from ..twin_object import TwinMeta

        _twin_meta = TwinMeta
    return _twin_meta


_lock = _thread.allocate_lock()
_exports: Dict[Key, List[Any]] = {}  # key -> [object, times sent]
_iid_of: Dict[int, int] = {}  # id(native object) -> its instance id, while exported
# Instance ids start at a random offset, so that a restarted twin never
# hands out the id of an object of its previous life to a stale proxy.
_iids = itertools.count((int.from_bytes(os.urandom(4), "big") << 24) + 1)
# key -> its proxy here; made with the first proxy (weakref and its imports
# cost a PyPy twin about 3 ms of its start, and many twins never hold one)
_proxies: Optional[WeakValueDictionary[Key, TwinProxy]] = None
_flusher = False  # the flusher thread runs

# how a proxy class reaches an attribute of its object
_GETATTR, _METHOD, _LOCAL, _ASYNC_METHOD = "getattr", "method", "local", "async method"

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


def export(obj: Any, connection: Connection, by_name: bool = True, grant: Any = None) -> List[Any]:
    """The wire form ``[owner, instance id, class info]`` of ``obj``, counted as
    sent over ``connection``; a proxy going back to its owner carries no
    class info (None).

    ``by_name=False`` (sandbox links) never names a class: the receiver gets
    a generic description and looks nothing up. ``grant`` (sandbox links: a
    ``capabilities.Grant``) is what the peer may do with the object; it is
    kept with the link's count and described in the class info.
    """
    if isinstance(obj, TwinProxy):
        key = (
            object.__getattribute__(obj, "__twin_owner__"),
            object.__getattribute__(obj, "__instance_id__"),
        )
        if connection.peer_id == key[0]:
            # back to its owner, which finds its own object by the key (the
            # class info of a module or a granted object is long, and the
            # target of every call on the proxy)
            return [key[0], key[1], None]
        info = type(obj).__class_info__
        if grant is not None:
            info = capability_info(obj, grant)
        elif not by_name and isinstance(info, type):
            info = class_info(info, by_name=False)
        # The receiver counts (and later releases) a reference only if it
        # makes a proxy that talks to us: a twin getting it from the master.
        # The master getting it back keeps no count.
        if not kernel_state.is_master():
            return [key[0], key[1], info]
    elif grant is not None:
        info = capability_info(obj, grant)
    else:
        info = class_info(type(obj), by_name)
        # (not the master's modules to a sandbox: their names are not the guest's to see)
        if issubclass(type(obj), _ModuleType) and (by_name or not kernel_state.is_master()):
            info = module_info(obj, info)
    with _lock:
        if not isinstance(obj, TwinProxy):
            iid = _iid_of.get(id(obj))
            if iid is None:
                if connection.broken is not None:  # it will never arrive: nothing to keep
                    return [kernel_state.TWIN_ID, 0, info]
                iid = _iid_of[id(obj)] = next(_iids)
            key = (kernel_state.TWIN_ID, iid)
        if connection.broken is not None:  # it will never arrive: nothing to count
            return [key[0], key[1], info]
        entry = _exports.get(key)
        if entry is None:
            _exports[key] = [obj, 1]
        else:
            entry[1] += 1
        connection.handed[key] = connection.handed.get(key, 0) + 1
        known = connection.grants.get(key)
        if grant is not None:
            connection.grants[key] = grant if known is None else known | grant
        journal = getattr(_encoding, "journal", None)
        if journal is not None:  # undone if the message it is for is never sent
            # (with the grant the peer held before: what a message grants
            # must not outlive it either)
            journal.append((connection, key, known, connection.grants.get(key)))
    return [key[0], key[1], info]


# -- encoding: exports count only for messages that are sent -------------------

#: per thread: the exports made by the message being encoded (a list), or None
_encoding = _thread._local()


def encode(message: Any, default: Any, parts: bool = False, plain: bool = False, share: bool = True) -> Any:
    """``codec.dumps(message, default, parts, plain, sharing)``, undoing
    the exports it made if it fails part-way (an argument that cannot be
    encoded after one that was exported): a message never sent must not pin
    objects for the peer. With ``parts``, a frame holding large byte strings
    may come as a tuple of its parts (see ``cpy2py._host.dumps``); with
    ``plain``, large plain containers go as plain-data blocks (the links
    between a master and its sandboxed guests). With ``share``, a container
    that the message holds twice (or that holds itself) arrives as one
    object, referred to where it occurs again (docs/protocol.md, "Shared
    values"); without (what a sandboxed guest sends), it is written out
    each time."""
    journal = getattr(_encoding, "journal", None)
    outer = journal is None  # else nested: a __reduce__ that encodes another message
    if outer:
        journal = _encoding.journal = []
    mark = len(journal)
    counting = getattr(_encoding, "pickles_left", None)  # (an outer message's count)
    # (only a trusted serializer pickles: counting for the others costs nothing)
    _encoding.pickles_left = MANY_PICKLES
    try:
        try:
            return _dumps(message, default, parts, plain, share, mark)
        except ManyPickles:
            # Objects that only pickle can carry, many of them in the
            # message's containers (records, enums, dates): each container
            # goes as one pickle, as multiprocessing sends it, instead of a
            # pickle per object (each with its own pickler and class name:
            # 10k enum members took 0.9 s, against 1 ms in one pickle)
            undo_exports(mark)
            _encoding.pickles_left = None
            # (empty ones hold nothing of another: a call's keyword
            # arguments, mostly; with one left, nothing need be walked)
            containers = [item for item in message if type(item) in _CONTAINERS and item]
            if len(containers) > 1 and _held_by_two(containers):  # (two pickles would make two copies of it)
                return _dumps(message, default, parts, plain, share, mark)
            batched = [Whole(item, batch=True) if type(item) in _CONTAINERS else item for item in message]
            try:
                return _dumps(batched, default, parts, plain, share, mark)
            except Exception:  # (a part that pickle cannot carry: an object at a time, as before)
                undo_exports(mark)
                return _dumps(message, default, parts, plain, share, mark)
    except BaseException as err:
        undo_exports(mark)
        if type(err) is NestedTooDeep and type(message) is list:
            cyclic = _container_inside_itself(message)
            if cyclic is not None:
                if getattr(getattr(default, "__self__", None), "trusted", False):
                    # (the values that hold a cycle go as one pickle each: pickle keeps it)
                    return encode(
                        [_whole_where_cyclic(item, 1) for item in message], default, parts, plain, share
                    )
                what = (
                    "data from a sandboxed guest crosses as a copy written out as a tree"
                    if not share
                    else "a tuple that holds itself (through a list or dict) cannot be referred to "
                    "before it is complete"
                )
                raise ValueError(
                    f"cannot send a value that contains itself (a {cyclic} holds itself, directly or "
                    f"further down) over a sandboxed link: {what}, and no pickle crosses that link. "
                    "Break the cycle, or hand over an object that holds it (it crosses as a proxy)"
                ) from None
        raise
    finally:  # done with: sent or undone
        _encoding.pickles_left = counting
        if outer:
            _encoding.journal = None
        else:
            del journal[mark:]


def _dumps(message: Any, default: Any, parts: bool, plain: bool, share: bool, mark: int) -> Any:
    try:
        # (positional: keywords cost a third more for a small frame)
        return codec.dumps(message, default, parts, plain, SHARING_DETECT if share else SHARING_TREE)
    except SharedParts:
        # (rare: the first pass looked only for containers met twice;
        # the exports it made are undone, the second makes them again)
        undo_exports(mark)
        return codec.dumps(message, default, parts, plain, SHARING_REFS)


#: pickles of single objects one message to a trusted peer may hold before
#: its containers go as one pickle each (``encode``)
MANY_PICKLES = 16


class ManyPickles(Exception):
    """The message being encoded made MANY_PICKLES pickles (``pickled``)."""


def pickled() -> None:
    """Serializer.default pickled an object for the message being encoded."""
    left = getattr(_encoding, "pickles_left", None)
    if left is not None:
        if left <= 1:
            raise ManyPickles
        _encoding.pickles_left = left - 1


class Whole:
    """A value sent to a trusted peer as one pickle instead of as CBOR: one
    that holds a cycle (pickle keeps its cycles and shared parts), or a
    ``batch`` of objects only pickle carries (``encode``), which must not
    hold an exception (CBOR carries its traceback) or a grant."""

    __slots__ = ("value", "batch")

    def __init__(self, value: Any, batch: bool = False) -> None:
        self.value = value
        self.batch = batch


def _whole_where_cyclic(value: Any, levels: int) -> Any:
    """``value``, or a copy of the list or dict it is with its items wrapped
    (``levels`` deep: a request's arguments, keyword arguments), where a
    cycle makes them a ``Whole``."""
    if _container_inside_itself(value) is None:
        return value
    if levels and type(value) in (list, dict) and not _holds_itself(value):
        if type(value) is list:
            return [_whole_where_cyclic(item, levels - 1) for item in value]
        return {key: _whole_where_cyclic(item, levels - 1) for key, item in value.items()}
    return Whole(value)


def _holds_itself(value: Any) -> bool:
    """Whether the list or dict ``value`` is found again inside itself."""
    seen: Set[int] = set()
    stack = list(_values_in(value))
    while stack:
        obj = stack.pop()
        if obj is value:
            return True
        if type(obj) in _CONTAINERS and id(obj) not in seen:
            seen.add(id(obj))
            stack.extend(_values_in(obj))
    return False


_CONTAINERS = (list, tuple, dict, set, frozenset)


def _held_by_two(values: List[Any]) -> bool:
    """Whether a list, tuple, dict, set or frozenset is found in two of
    ``values`` (``f(a, key=a)``: the message holds it twice, as CBOR keeps)."""
    owners: Dict[int, int] = {}
    for index, value in enumerate(values):
        stack = [value]
        while stack:
            obj = stack.pop()
            if type(obj) not in _CONTAINERS:
                continue
            owner = owners.get(id(obj))
            if owner is None:
                owners[id(obj)] = index
                stack.extend(_values_in(obj))
            elif owner != index:
                return True
    return False


def _values_in(container: Any) -> Any:
    """What a container holds: a dict's keys and values, another's items."""
    return itertools.chain(container, container.values()) if type(container) is dict else container


def _container_inside_itself(value: Any) -> Optional[str]:
    """The type name of a list, tuple, dict, set or frozenset in ``value``
    that holds itself, if one does (asked only once encoding found the value
    nested too deep: a cycle is why, most often)."""
    on_path: Set[int] = set()
    done: Set[int] = set()
    stack: List[Tuple[Any, bool]] = [(value, False)]
    while stack:
        obj, leaving = stack.pop()
        if leaving:
            on_path.discard(id(obj))
            done.add(id(obj))
            continue
        if type(obj) not in _CONTAINERS or id(obj) in done:
            continue
        if id(obj) in on_path:
            return type(obj).__name__
        on_path.add(id(obj))
        stack.append((obj, True))
        stack.extend((item, False) for item in _values_in(obj))
    return None


def exports_mark() -> int:
    """Where the current encoding's exports stand (for ``undo_exports``)."""
    journal = getattr(_encoding, "journal", None)
    return -1 if journal is None else len(journal)


def undo_exports(mark: int) -> None:
    """Undo the exports of the current encoding since ``mark``: their value
    was thrown away (a failed or trial encoding)."""
    journal = getattr(_encoding, "journal", None)
    if journal is None or mark < 0:
        return
    undone, journal[mark:] = journal[mark:], []
    dropped = []
    with _lock:
        for connection, key, before, made in reversed(undone):
            dropped.extend(_drop(connection, key, 1))
            # a grant the undone message widened goes back to what it was
            # (unless another message changed it meanwhile, or the object is
            # no longer held: then _drop removed it)
            if key in connection.handed and connection.grants.get(key) is made and made is not before:
                if before is None:
                    connection.grants.pop(key, None)
                else:
                    connection.grants[key] = before
    del dropped  # finalizers, if any, outside the lock


def class_info(cls: type, by_name: bool = True) -> Any:
    """What a receiver needs to build a proxy class: the class itself for twin
    classes (sent by name), else the type's name and its special methods."""
    if by_name and isinstance(cls, twin_meta()):
        return cls
    return [f"{main_module.shown_module(cls.__module__)}.{cls.__qualname__}", sorted(_special_names(cls))]


_ModuleType = type(sys)
_MODULE_NAMESPACE = _ModuleType.__dict__["__dict__"]
_CLASS_NAMESPACE = type.__dict__["__dict__"]


def namespace_of(obj: Any) -> Any:
    """The namespace of a module or class, read through the descriptors of
    ``ModuleType`` and ``type``: nothing of ``obj`` runs (a lazily loaded
    module runs its body on any attribute access, ``__dict__`` and ``vars()``
    included; a metaclass may define ``__getattribute__``); {} for anything else."""
    kind = type(obj)
    if issubclass(kind, _ModuleType):
        return _MODULE_NAMESPACE.__get__(obj)
    if issubclass(kind, type):
        return _CLASS_NAMESPACE.__get__(obj)
    return {}


_FUNCTION_TYPES = (type(lambda: None), type(len))
#: most functions of a module named in its class info
MAX_MODULE_FUNCTIONS = 2000


def module_info(module: Any, info: List[Any]) -> List[Any]:
    """A module's class info with the names of its functions as methods (a
    third element): the receiver's proxy calls ``module.name(...)`` in one
    request (looked up and called where the module lives), not a request
    for the function and another to call it (and a release of it after)."""
    try:
        names = [
            name
            for name, value in list(namespace_of(module).items())
            if type(value) in _FUNCTION_TYPES
            and type(name) is str
            and not (name[:2] == "__" and name[-2:] == "__")
        ]
    except Exception:  # (a module with a strange namespace: described as any module)
        return info
    return [info[0], info[1], sorted(names)[:MAX_MODULE_FUNCTIONS]]


def capability_info(obj: Any, grant: Any) -> List[Any]:
    """The class info of a master object handed to a sandboxed guest: its
    type's name, the special methods and the methods it may call (a third
    element, so the guest's proxy forwards exactly these and nothing else)."""
    import inspect

    cls = type(obj)
    specials = sorted(n for n in grant.names if n[:2] == "__" and n[-2:] == "__")
    methods = sorted(
        n for n in grant.names if n not in specials and callable(inspect.getattr_static(cls, n, None))
    )
    return [f"{cls.__module__}.{cls.__qualname__}", specials, methods]


def key_of(obj: Any) -> Optional[Key]:
    """The key under which ``obj`` (native here, or a proxy) is exported, if it is."""
    if isinstance(obj, TwinProxy):
        return (
            object.__getattribute__(obj, "__twin_owner__"),
            object.__getattribute__(obj, "__instance_id__"),
        )
    iid = _iid_of.get(id(obj))
    if iid is None:
        return None
    key = (kernel_state.TWIN_ID, iid)
    entry = _exports.get(key)
    return key if entry is not None and entry[0] is obj else None


def exported(key: Key) -> Any:
    """The object exported under ``key``; LookupError if it is not (any more)."""
    entry = _exports.get(key)
    if entry is None:
        raise LookupError(
            f"object #{key[1]} of {key[0]!r} is not known here (any more): "
            "it was released, or its twinterpreter was restarted"
        )
    return entry[0]


def release(items: Any, connection: Connection) -> List[Any]:
    """The peer of ``connection`` dropped references: ``[[owner, instance id,
    count], ...]``. A peer releases at most what it was handed over its own
    link; the rest of the counts are other links' and stay. Returns the
    objects nobody holds any more, for the caller to drop where finalizers
    may run."""
    if not isinstance(items, list):
        raise ProtocolError(f"malformed release (not a list): {safe_repr(items)}")
    for item in items:  # plain data only: nothing here may run the peer's code
        if not (
            type(item) is list
            and len(item) == 3
            and type(item[0]) is str
            and type(item[1]) is int
            and type(item[2]) is int
            and item[2] > 0
        ):
            raise ProtocolError(f"malformed release entry {safe_repr(item)}")
    dropped: List[Any] = []
    with _lock:
        for owner, iid, count in items:
            dropped.extend(_drop(connection, (owner, iid), count))
    return dropped  # the last references go outside the lock, and outside the reading role


def forget_link(connection: Connection) -> None:
    """The link ended: whatever its peer held is released at once."""
    dropped = []
    with _lock:
        for key, count in list(connection.handed.items()):
            dropped.extend(_drop(connection, key, count))
        connection.handed.clear()
        connection.grants.clear()
        connection.pending_releases.clear()
    del dropped


def _drop(connection: Connection, key: Key, count: int) -> List[Any]:
    """Caller holds _lock: subtract up to ``count`` of what ``connection``
    holds of ``key``; returns the object if nobody holds it any more."""
    held = connection.handed.get(key, 0)
    count = min(count, held)
    if count <= 0:
        return []
    if held == count:
        del connection.handed[key]
        connection.grants.pop(key, None)
    else:
        connection.handed[key] = held - count
    entry = _exports.get(key)
    if entry is None:
        return []
    entry[1] -= count
    if entry[1] > 0:
        return []
    del _exports[key]
    if key[0] == kernel_state.TWIN_ID:
        _iid_of.pop(id(entry[0]), None)
    return [entry[0]]


def export_count() -> int:
    """How many objects are kept alive for other interpreters (for tests and debugging)."""
    return len(_exports)


def link_counts(peer_id: str) -> Dict[str, int]:
    """What this side holds for the link to ``peer_id`` (run in a twin by
    ``TwinMaster.counts``)."""
    connection = links.existing_connection(peer_id)
    if connection is None:
        return {"exports": 0, "proxies": 0, "threads": 0}
    return {
        "exports": len(connection.handed),
        "proxies": proxy_count(connection),
        "threads": connection.thread_count(),
    }


def proxy_count(connection: Optional[Connection] = None) -> int:
    """How many proxies live here (of objects reached over ``connection``, if given)."""
    proxies = list(_proxies.values()) if _proxies is not None else []
    if connection is None:
        return len(proxies)
    return sum(1 for proxy in proxies if object.__getattribute__(proxy, "__twin_link__") is connection)


def _new_proxy_table() -> WeakValueDictionary[Key, TwinProxy]:
    global _proxies
    from weakref import WeakValueDictionary

    _proxies = WeakValueDictionary()
    return _proxies


def reseed_instance_ids() -> None:
    """Start instance ids at a new random offset (a sandboxed guest, whose
    start-up state is a snapshot shared by every guest, does this first)."""
    global _iids
    _iids = itertools.count((int.from_bytes(os.urandom(4), "big") << 24) + 1)


# -- receiving ------------------------------------------------------------------


def resolve(owner: str, iid: int, info: Any, connection: Connection) -> Any:
    """The object for a received reference: the native one, or its proxy here."""
    key = (owner, iid)
    if owner == kernel_state.TWIN_ID:
        return exported(key)
    # references count towards the link to their owner (a twin has only the master's)
    counted = connection.peer_id == owner or not kernel_state.is_master()
    link = connection if counted else links.existing_connection(owner)
    created = False
    with _lock:
        proxies = _proxies if _proxies is not None else _new_proxy_table()
        proxy = proxies.get(key)
        if proxy is None or object.__getattribute__(proxy, "__twin_link__") is not link:
            # new, or a proxy of an earlier life of that twin: that one stays dead
            proxy_cls = proxy_class(info, connection)
            proxy = object.__new__(proxy_cls)
            object.__setattr__(proxy, "__twin_owner__", owner)
            object.__setattr__(proxy, "__instance_id__", iid)
            object.__setattr__(proxy, "__received__", 0)
            object.__setattr__(proxy, "__twin_link__", link)
            proxies[key] = proxy
            created = True
        elif type(info) is list and not kernel_state.is_master() and info != type(proxy).__class_info__:
            # a guest's proxy of a master object it was granted more of since
            # (expose(obj, "__len__") after expose(obj, "title")): its special
            # methods are those of the newest grant (the master checks each use)
            object.__setattr__(proxy, "__class__", proxy_class(info, connection))
        if counted:
            object.__setattr__(proxy, "__received__", object.__getattribute__(proxy, "__received__") + 1)
    watcher = getattr(link, "proxy_watcher", None) if created else None
    if watcher is not None:  # a fresh guest lives while proxies of its objects do (cpy2py/fresh.py)
        watcher(proxy)
    _ensure_flusher()
    return proxy


def _queue_release(link: Any, owner: str, iid: int, count: int) -> None:
    # called from __del__: an atomic list append only, no locks, no I/O
    if link is not None and link.broken is None:
        link.pending_releases.append((owner, iid, count))


def flush_releases(connection: Optional[Connection] = None) -> None:
    """Send the queued releases, one batch per link; with ``connection``, only
    those over that link. A caller flushes only the link it is about to use:
    another twin's link may block (a twin that stopped reading), and must not
    hold up calls to the others."""
    for link in [connection] if connection is not None else links.all_connections():
        queue = link.pending_releases
        items: List[List[Any]] = []
        while queue:
            try:
                owner, iid, count = queue.pop()
            except IndexError:
                break
            items.append([owner, iid, count])
        if items and link.broken is None:
            link.send_release(items)


def _ensure_flusher() -> None:
    global _flusher
    if _flusher or not _threads_available():
        return
    with _lock:
        if _flusher:
            return
        _flusher = True
        from .connection import _start_thread

        _start_thread(_flush_forever, (), "cpy2py-releaser")


def _flush_forever() -> None:
    from ..protocol.transport import block_signals_in_this_thread

    block_signals_in_this_thread()
    while True:
        time.sleep(0.05)
        try:
            flush_releases()
        except Exception:  # a broken link: its releases no longer matter
            pass


def after_fork() -> None:
    """In a child forked from this process: the flusher thread is the
    parent's (the child starts its own), and locks other threads held at the
    fork stay held forever."""
    global _flusher, _lock
    _flusher = False
    _lock = _thread.allocate_lock()


def _threads_available() -> bool:
    return sys.platform != "wasi"  # the WASI guest has no threads: it flushes before it waits


def safe_repr(value: Any, limit: int = 200) -> str:
    """``repr`` of a value received from a peer that never calls the peer: a
    proxy inside is described here (its own ``repr`` would ask its owner,
    which may be the very peer whose frame is being read)."""

    def show(item: Any, depth: int) -> str:
        if isinstance(item, TwinProxy):
            return (
                f"<{type(item).__qualname__} #{object.__getattribute__(item, '__instance_id__')} "
                f"of {object.__getattribute__(item, '__twin_owner__')!r}>"
            )
        if depth > 4:
            return "..."
        if type(item) in (list, tuple, set, frozenset):
            inner = ", ".join(show(i, depth + 1) for i in list(item)[:20])
            return {list: "[{}]", tuple: "({})", set: "{{{}}}", frozenset: "frozenset({{{}}})"}[
                type(item)
            ].format(inner)
        if type(item) is dict:
            pairs = list(item.items())[:20]
            return "{" + ", ".join(f"{show(k, depth + 1)}: {show(v, depth + 1)}" for k, v in pairs) + "}"
        if type(item) in (str, bytes, bytearray):
            return repr(item[:limit])
        if type(item) is int and item.bit_length() > 4 * limit:
            # (repr of an int over 4300 digits raises ValueError; a shorter one is still too long)
            return f"<int of {item.bit_length()} bits>"
        if type(item) in (int, float, bool, complex) or item is None:
            return repr(item)[:limit]
        return f"<{type(item).__qualname__} object>"

    text = show(value, 0)
    return text if len(text) <= limit else text[:limit] + "..."


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
    if name in _ASYNC_SPECIALS:
        return _async_forwarder(name)

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        link = object.__getattribute__(self, "__twin_link__")
        if name == "__exit__" and len(args) == 3:
            # a traceback cannot travel (its text does, in the exception); the
            # link's policy decides what of the exception the owner may see
            args = _serializer(link).exit_arguments(args[0], args[1])
            if args is None:
                return None  # not for the owner to see: the exception goes on here
        result = call(self, OP_CALL_METHOD, name, list(args), kwargs)
        if name in _TEXT_METHODS:
            return _serializer(link).received_text(result)
        return result

    forward.__name__ = name
    return forward


#: special methods that return awaitables (``async with``, ``async for``)
_ASYNC_SPECIALS = frozenset({"__aenter__", "__aexit__", "__anext__"})


def _async_forwarder(name: str) -> Any:
    """A special method of ``async with`` or ``async for``: a coroutine that
    runs it in its twin, awaited on the caller's loop (cpy2py/awaitable.py)."""

    async def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        from ..awaitable import call_method

        if name == "__aexit__" and len(args) == 3:  # (as __exit__'s, above)
            args = _serializer(object.__getattribute__(self, "__twin_link__")).exit_arguments(
                args[0], args[1]
            )
            if args is None:
                return None
        return await call_method(self, name, args, kwargs)

    forward.__name__ = name
    return forward


def _serializer(link: Any) -> Any:
    from .serialization import Serializer

    return link.serializer if link is not None else Serializer("?")


_TEXT_METHODS = frozenset({"__repr__", "__str__", "__format__"})
#: proxy classes of twin classes (known by name, so bounded by the program)
_twin_proxy_classes: Dict[type, type] = {}
#: proxy classes per link, for the class descriptions its peer sent; beyond
#: this many a link's proxies get classes of their own, freed with them
MAX_PROXY_CLASSES_PER_LINK = 256
#: longest class name taken from a peer's description
MAX_CLASS_NAME = 200


def proxy_class(info: Any, connection: Any = None) -> type:
    """The proxy class for a class info: a twin class, or a description
    ``[qualified name, special methods]`` from a peer, or a capability
    ``[qualified name, special methods, methods]`` from a sandbox's master
    (cached: twin classes globally, descriptions per link)."""
    if isinstance(info, twin_meta()):
        cls = _twin_proxy_classes.get(info)
        if cls is None:
            cls = _twin_proxy_classes[info] = _make_proxy_class(info, _special_names(info), info, None)
        return cls
    if not (
        isinstance(info, list)
        and len(info) in (2, 3)
        and isinstance(info[0], str)
        and all(isinstance(part, list) and all(isinstance(n, str) for n in part) for part in info[1:])
    ):
        raise LookupError(f"cannot make a proxy for class {safe_repr(info, 100)}")
    cache: Dict[Any, type] = connection.proxy_classes if connection is not None else {}
    cache_key = (info[0], *(tuple(part) for part in info[1:]))
    cls = cache.get(cache_key)
    if cls is not None and len(cache) >= MAX_PROXY_CLASSES_PER_LINK:
        cache[cache_key] = cache.pop(cache_key)  # (full: the last used go last, the least used first)
    if cls is None:
        if connection is not None:
            connection.serializer.building_proxy_class()  # (a sandbox bounds them per frame)
        trusted = connection is None or connection.serializer.trusted
        specials = {n for n in info[1] if n not in _NOT_FORWARDED and (trusted or n in DATA_MODEL_METHODS)}
        methods = info[2] if len(info) == 3 else None
        cls = _make_proxy_class(info, specials, None, methods)
        if len(cache) >= MAX_PROXY_CLASSES_PER_LINK:  # the least used goes (its proxies keep it)
            del cache[next(iter(cache))]
        cache[cache_key] = cls
    return cls


def _make_proxy_class(info: Any, specials: set, proxied: Any, methods: Optional[List[str]]) -> type:
    if proxied is not None:
        name, qualname, module = proxied.__name__, proxied.__qualname__, proxied.__module__
        unhashable = proxied.__hash__ is None
        has_eq = "__eq__" in _all_names(proxied)
    else:
        dotted = info[0][:MAX_CLASS_NAME]
        module, _, qualname = dotted.rpartition(".")
        name = qualname = qualname or dotted
        unhashable = False
        has_eq = "__eq__" in info[1]
    namespace: Dict[str, Any] = {
        "__slots__": (),
        "__proxied_class__": proxied,
        "__class_info__": info,
        "__module__": module,
        "__qualname__": qualname,
        "__doc__": getattr(proxied, "__doc__", None),
        "_kinds": {},
    }
    if methods is None:
        forwarded = set(_ALWAYS_FORWARDED) | specials
    else:
        # a capability: exactly what was granted; anything else is refused by
        # its owner, and its repr is made here unless that was granted too
        forwarded = specials
        namespace["_kinds"] = {m: _METHOD for m in methods}
        if "__repr__" not in specials:
            namespace["__repr__"] = _capability_repr
    for special in forwarded:
        namespace[special] = _forwarder(special)
    if proxied is not None:
        # a proxy of a twin class says it is one (``p.__class__``, what
        # isinstance, functools.singledispatch and ``self.__class__(...)``
        # in a localmethod ask), and carries the description of the
        # dataclass it stands for (dataclasses.fields, asdict, replace)
        namespace["__class__"] = property(lambda self: proxied)
        for name in ("__dataclass_fields__", "__dataclass_params__"):
            if hasattr(proxied, name):
                namespace[name] = getattr(proxied, name)
    if has_eq:
        namespace["__eq__"] = _forwarder("__eq__")
        namespace["__hash__"] = None if unhashable else _forwarder("__hash__")
    elif unhashable:
        namespace["__hash__"] = None
    return type(name, (TwinProxy,), namespace)


def _capability_repr(self: Any) -> str:
    return (
        f"<{type(self).__qualname__} object of {object.__getattribute__(self, '__twin_owner__')!r}, "
        f"handed to this sandbox>"
    )


def _all_names(proxied: type) -> set:
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
        return _ASYNC_METHOD if inspect.iscoroutinefunction(found.__func__) else _METHOD
    if inspect.isfunction(found):
        if getattr(found, "__cpy2py_local__", False):
            return _LOCAL
        return _ASYNC_METHOD if inspect.iscoroutinefunction(found) else _METHOD
    return _GETATTR


def call(target: Any, op: int, *operands: Any) -> Any:
    """Run an operation on the object behind ``target`` (a proxy or a twin class)."""
    if isinstance(target, TwinProxy):
        link = object.__getattribute__(target, "__twin_link__")
        if link is None or link.broken is not None:
            raise _gone(target, link)
        return link.request(op, target, *operands)
    owner = type.__getattribute__(target, "__twin_id__")
    return links.connection_to(owner).request(op, target, *operands)


def _copied_there(proxy: Any, how: str) -> Any:
    """``copy.copy`` or ``copy.deepcopy`` of a proxy: the object is copied
    where it lives (a proxy of the copy; a deep copy's memo stays on each
    side, so what two proxies share there is copied twice)."""
    import copy

    link = object.__getattribute__(proxy, "__twin_link__")
    if link is None or link.broken is not None:
        raise _gone(proxy, link)
    return link.request(OP_EXECUTE, getattr(copy, how), [proxy], {})


def _gone(proxy: Any, link: Any) -> TwinterpreterTerminated:
    owner = object.__getattribute__(proxy, "__twin_owner__")
    iid = object.__getattribute__(proxy, "__instance_id__")
    why = f": {link.broken}" if link is not None else ""
    return TwinterpreterTerminated(
        f"{type(proxy).__qualname__} object #{iid} lived in twinterpreter {owner!r}, which ended{why}; "
        "its objects ended with it (a restarted twin starts without them)"
    )


class RemoteMethod:
    # A method of a proxied object or twin class: calling it runs it natively.
    # Where this interpreter has the class (a twin class's), it also says what
    # the native method says of itself: its signature and docstring, for
    # help(), inspect and editors.

    __slots__ = ("__self__", "__name__")

    def __init__(self, target: Any, name: str) -> None:
        self.__self__ = target
        self.__name__ = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call(self.__self__, OP_CALL_METHOD, self.__name__, list(args), kwargs)

    def __repr__(self) -> str:
        return f"<remote method {self.__name__} of {self.__self__!r}>"

    def _native(self) -> Any:
        """The method as the class defines it (function, classmethod or
        staticmethod), if this interpreter has the class; else None."""
        target = self.__self__
        cls = target if isinstance(target, type) else getattr(type(target), "__proxied_class__", None)
        if not isinstance(cls, type):
            return None
        import inspect

        return inspect.getattr_static(cls, self.__name__, None)

    @property
    def __doc__(self) -> Optional[str]:  # type: ignore[override]
        native = self._native()
        return getattr(getattr(native, "__func__", native), "__doc__", None) if native is not None else None

    @property
    def __signature__(self) -> Any:
        """The native method's signature as bound here (None: unknown, and
        inspect falls back to ``(*args, **kwargs)``)."""
        native = self._native()
        func = getattr(native, "__func__", native)
        if not callable(func):
            return None
        import inspect

        try:
            signature = inspect.signature(func)
        except (TypeError, ValueError):
            return None
        # bound: a classmethod's first parameter, and a function's when called on an instance
        bound = isinstance(native, classmethod) or (
            inspect.isfunction(native) and not isinstance(self.__self__, type)
        )
        return _without_first(signature) if bound else signature


class AsyncRemoteMethod(RemoteMethod):
    # An ``async def`` method of a twin class: calling it returns a coroutine
    # that runs the method in its twin, awaited without blocking the loop
    # (as calling an async twinfunction does; cpy2py/awaitable.py)

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from ..awaitable import call_method

        return call_method(self.__self__, self.__name__, args, kwargs)


def _without_first(signature: Any) -> Any:
    """``signature`` as bound: without its first parameter (self, cls) if
    that is a positional one (``*args`` takes it instead and stays)."""
    import inspect

    parameters = list(signature.parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if parameters and parameters[0].kind in positional:
        return signature.replace(parameters=parameters[1:])
    return signature


_PROXY_LOCALS = frozenset(
    {
        "__twin_owner__",
        "__instance_id__",
        "__received__",
        "__twin_link__",
        "__class__",
        "__proxied_class__",
        "__class_info__",
        "_kinds",
        "__reduce_ex__",
        "__reduce__",
        "__copy__",
        "__deepcopy__",
        "__weakref__",
        "__is_twin_proxy__",
        "__dataclass_fields__",
        "__dataclass_params__",
    }
)


#: the ``__class__`` of every object (a proxy class of a twin class has one
#: of its own, which says that class: _make_proxy_class)
_OBJECT_CLASS = object.__dict__["__class__"]


class TwinProxy:
    """Base of all proxies: every attribute access goes to the native object."""

    __slots__ = ("__twin_owner__", "__instance_id__", "__received__", "__twin_link__", "__weakref__")
    __is_twin_proxy__ = True

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # (the kernel makes proxies with object.__new__; this is type(proxy)(...))
        proxied = getattr(cls, "__proxied_class__", None)
        how = f": call {proxied.__qualname__}(...) to make one in its twin" if proxied is not None else ""
        raise TypeError(
            f"cannot make {cls.__qualname__} objects by calling the type of a proxy: it stands for "
            f"objects that live in another interpreter{how}"
        )

    def __getattribute__(self, name: str) -> Any:
        if name in _PROXY_LOCALS:
            return object.__getattribute__(self, name)
        cls = type(self)
        kind = cls._kinds.get(name)
        if kind is None:
            kind = cls._kinds[name] = _classify(cls, name)
        if kind is _METHOD:
            return RemoteMethod(self, name)
        if kind is _ASYNC_METHOD:
            return AsyncRemoteMethod(self, name)
        if kind is _LOCAL:
            import inspect

            return inspect.getattr_static(cls.__proxied_class__, name).__get__(self, cls.__proxied_class__)
        return call(self, OP_GETATTR, name)

    def __setattr__(self, name: str, value: Any) -> None:
        call(self, OP_SETATTR, name, value)
        if name == "__class__" and isinstance(value, twin_meta()):
            # the object's class changed in its twin: this proxy follows it
            _OBJECT_CLASS.__set__(self, proxy_class(value))

    def __delattr__(self, name: str) -> None:
        call(self, OP_DELATTR, name)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "a twin proxy is pickled only as a reference inside cpy2py; it cannot be pickled on its own"
        )

    def __copy__(self) -> Any:
        return _copied_there(self, "copy")

    def __deepcopy__(self, memo: Any) -> Any:
        return _copied_there(self, "deepcopy")

    def __del__(self) -> None:
        try:
            received = object.__getattribute__(self, "__received__")
            if received:
                _queue_release(
                    object.__getattribute__(self, "__twin_link__"),
                    object.__getattribute__(self, "__twin_owner__"),
                    object.__getattribute__(self, "__instance_id__"),
                    received,
                )
        except Exception:  # interpreter shutdown: nothing left to release
            pass


def is_proxy(obj: Any) -> bool:
    """Whether ``obj`` is a proxy of an object that lives in another interpreter."""
    return isinstance(obj, TwinProxy)
