"""Reference cycles across two interpreters, and how they are collected.

A master object M that holds a proxy of a twin object T, while T holds a
proxy of M, is a cycle no garbage collector sees whole: the master keeps M
alive for the twin (it is exported), the twin keeps T alive for the master,
and each side's collector sees a live object. Dropping every other
reference leaves both alive for as long as the link lives.

``collect(connection)`` (``TwinMaster.collect``) finds such cycles with the
help of the twin, in three steps:

1. each side lists its *candidates*: objects it keeps only for the peer (the
   only reference to them is their export entry, and the peer holds every
   count of it), and, for each, the proxies of the peer's objects reachable
   from it; a proxy also referenced from anywhere else is *live*;
2. the master keeps, of the candidates of both sides, those whose proxy on
   the other side is held only by candidates that are kept themselves (a
   greatest fixed point: one live holder anywhere keeps the whole group);
3. each side lets go of what was kept: the export entries go, and the
   objects are then ordinary garbage on each side.

Limits, by design: an object reached only from a running call's local
variables is invisible to ``gc.get_referrers`` and could be taken for
garbage; ``collect`` is therefore meant for quiet moments (the proxies of
the objects it frees raise ``TwinterpreterTerminated``-like lookup errors
if, against the odds, someone still held them). Cycles through a third
interpreter are not found. Only objects up to a few containers deep are
looked through for proxies.
"""

from __future__ import annotations

import gc
import types
from typing import Any, Dict, List, Set, Tuple

from .. import kernel_state
from ..protocol.messages import OP_EXECUTE
from . import links, references

Key = Tuple[str, int]

#: how deep, and through how many objects, a candidate is looked through
_MAX_DEPTH = 4
_MAX_OBJECTS = 2000
#: never looked through: shared by everyone, not owned by a candidate
_OPAQUE = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.CodeType,
    types.FrameType,
    types.BuiltinFunctionType,
)


def _walk(root: Any, walked: Dict[int, Any]) -> Set[Any]:
    """The proxies reachable from ``root`` through plain containers and
    instances; every object looked at goes into ``walked`` (id -> object)."""
    found: Set[Any] = set()
    level = [root]
    for _ in range(_MAX_DEPTH):
        following = []
        for obj in level:
            for ref in gc.get_referents(obj):
                if isinstance(ref, references.TwinProxy):
                    found.add(ref)
                elif not isinstance(ref, _OPAQUE) and id(ref) not in walked and len(walked) < _MAX_OBJECTS:
                    walked[id(ref)] = ref
                    following.append(ref)
        level = following
    return found


def local_view(peer_id: str) -> Dict[str, Any]:
    """This side's candidates for the link to ``peer_id``: ``candidates`` as
    ``[[owner, iid], [peer keys reachable]]`` and ``live`` (peer keys whose
    proxy here is referenced by anything else)."""
    connection = links.existing_connection(peer_id)
    if connection is None:
        return {"candidates": [], "live": []}
    with references._lock:
        held = [
            (key, entry)
            for key, entry in (
                (key, references._exports.get(key)) for key, count in connection.handed.items()
            )
            if entry is not None and key[0] == kernel_state.TWIN_ID and entry[1] == connection.handed[key]
        ]
    entry_ids = {id(entry) for _, entry in held}
    objects = [entry[0] for _, entry in held]
    ours = {id(held), id(objects), id(entry_ids)}
    # local variables of running code are no gc referrers: they count as holders
    in_frames = _held_by_frames()
    # one scan of the heap for all of them: who refers to each
    referred: Dict[int, int] = dict.fromkeys(in_frames, 1)
    for referrer in gc.get_referrers(*objects):
        if (
            id(referrer) in entry_ids
            or id(referrer) in ours
            or isinstance(referrer, types.FrameType)
            or _is_arguments(referrer, objects)
        ):
            continue
        for ref in gc.get_referents(referrer):
            referred[id(ref)] = referred.get(id(ref), 0) + 1
    candidates: List[List[Any]] = []
    walked: Dict[int, Any] = {}
    proxies: Dict[int, Any] = {}
    for key, entry in held:
        obj = entry[0]
        if referred.get(id(obj)):
            continue  # something here still uses it
        walked[id(obj)] = obj
        reach = _walk(obj, walked)
        for proxy in reach:
            proxies[id(proxy)] = proxy
        candidates.append([list(key), [list(_key(proxy)) for proxy in reach if _link(proxy) is connection]])
        del reach  # a set of proxies: it would count as one more holder below
    live: List[List[Any]] = []
    if proxies:
        ours.update({id(walked), id(proxies), id(candidates), id(objects)})
        proxy_list = list(proxies.values())
        ours.add(id(proxy_list))
        holders = {pid: True for pid in proxies if pid in in_frames}
        for referrer in gc.get_referrers(*proxy_list):
            if (
                id(referrer) in ours
                or isinstance(referrer, types.FrameType)
                or _is_arguments(referrer, proxy_list)
            ):
                continue
            outside = id(referrer) not in walked
            for ref in gc.get_referents(referrer):
                if id(ref) in proxies and outside:
                    holders[id(ref)] = True
        live = [list(_key(proxies[pid])) for pid in holders]
    return {"candidates": candidates, "live": live}


def _held_by_frames() -> Set[int]:
    """Ids of the objects that the local variables of running code hold."""
    import sys

    held: Set[int] = set()
    for frame in list(sys._current_frames().values()):
        while frame is not None:
            try:
                held.update(id(value) for value in list(frame.f_locals.values()))
            except Exception:  # a frame that cannot show its locals: its objects stay
                pass
            frame = frame.f_back
    return held


def _is_arguments(referrer: Any, objects: List[Any]) -> bool:
    """Whether ``referrer`` is the argument tuple of our own call of
    gc.get_referrers (PyPy reports it)."""
    return (
        type(referrer) is tuple
        and len(referrer) == len(objects)
        and all(a is b for a, b in zip(referrer, objects))
    )


def _key(proxy: Any) -> Key:
    return (
        object.__getattribute__(proxy, "__twin_owner__"),
        object.__getattribute__(proxy, "__instance_id__"),
    )


def _link(proxy: Any) -> Any:
    return object.__getattribute__(proxy, "__twin_link__")


def garbage(mine: Dict[str, Any], theirs: Dict[str, Any]) -> Tuple[List[Key], List[Key]]:
    """Of both sides' candidates, those held only by each other (step 2)."""

    def parse(view: Dict[str, Any]) -> Tuple[Dict[Key, Set[Key]], Set[Key]]:
        reach = {tuple(key): {tuple(k) for k in keys} for key, keys in view["candidates"]}
        return reach, {tuple(k) for k in view["live"]}

    reach_m, live_m = parse(mine)
    reach_t, live_t = parse(theirs)

    def holders(reach: Dict[Key, Set[Key]]) -> Dict[Key, Set[Key]]:
        held_by: Dict[Key, Set[Key]] = {}
        for holder, keys in reach.items():
            for key in keys:
                held_by.setdefault(key, set()).add(holder)
        return held_by

    held_m = holders(reach_t)  # master keys -> twin candidates whose proxies of them
    held_t = holders(reach_m)
    keep_m = {k for k in reach_m if k in held_m and k not in live_t}
    keep_t = {k for k in reach_t if k in held_t and k not in live_m}
    changed = True
    while changed:
        changed = False
        for key in list(keep_m):
            if not held_m[key] <= keep_t:
                keep_m.discard(key)
                changed = True
        for key in list(keep_t):
            if not held_t[key] <= keep_m:
                keep_t.discard(key)
                changed = True
    return sorted(keep_m), sorted(keep_t)


def let_go(peer_id: str, keys: List[Any]) -> int:
    """Step 3: stop keeping ``keys`` for ``peer_id``; how many were let go."""
    connection = links.existing_connection(peer_id)
    if connection is None:
        return 0
    dropped: List[Any] = []
    with references._lock:
        for key in keys:
            key = tuple(key)
            count = connection.handed.get(key, 0)
            if count:
                dropped.extend(references._drop(connection, key, count))
    freed = len(dropped)
    del dropped
    gc.collect()
    return freed


def collect(connection: Any) -> int:
    """Collect the cycles between the master and the twin of ``connection``;
    how many objects both sides let go."""
    peer = connection.peer_id
    gc.collect()  # what is plain garbage here first: its proxies release their objects
    references.flush_releases(connection)
    theirs = connection.request(OP_EXECUTE, local_view, [kernel_state.MASTER_ID], {})
    mine = local_view(peer)
    keep_m, keep_t = garbage(mine, theirs)
    if not keep_m and not keep_t:
        return 0
    freed = connection.request(OP_EXECUTE, let_go, [kernel_state.MASTER_ID, [list(k) for k in keep_t]], {})
    freed += let_go(peer, [list(k) for k in keep_m])
    references.flush_releases(connection)
    return freed
