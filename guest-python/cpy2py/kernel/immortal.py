"""The objects a snapshot of the guest holds, made immortal in it.

Guests started from one snapshot share its memory pages until they write
to one. CPython writes to an object whenever a reference to it is taken
or dropped, so a guest that only runs what the snapshot holds (calls a
function of a module, looks a name up) still copies the page of every
object it touches: most of the pages an idle guest owns, each copied for
a reference count that went up and back down. An immortal object's count
is never written (PEP 683), so the host gives every object the snapshot
holds the immortal count as it takes the snapshot
(host/src/wasm/snapshot.rs, the ``immortal-objects`` export of
wasm/wit/world.wit); only this walk knows where they are.

What they are: every object reachable from ``sys.modules`` (the modules,
what their namespaces hold, down to the constants of their code) once the
preload is done; nothing of the guest runs between this walk and the
snapshot, so each of them is still there when it is taken. They are never
freed in a guest started from it: what a guest replaces of them (a
module's global set again) stays as it was in the snapshot, whose pages
hold it anyway.
"""

from __future__ import annotations

import gc
import sys
import types
from array import array
from typing import Callable, List, Tuple

#: CPython's reference count of an object made immortal at run time, on a
#: 32-bit build like the guest's (Include/refcount.h,
#: ``_Py_IMMORTAL_INITIAL_REFCNT``); from 2**30 on a count is immortal
IMMORTAL_COUNT_32BIT = 5 << 28


def snapshot_objects() -> Tuple[int, bytes]:
    """The immortal reference count, and the addresses of the objects of
    the snapshot whose count is not (little-endian 32-bit words): what the
    host writes. (0, b"") where objects are not counted that way (another
    interpreter, a 64-bit build).

    The walk keeps next to nothing in Python objects of its own (a bitmap
    of what it saw, an array of addresses): what it allocates goes into the
    snapshot too, freed but written, and scattered free blocks would have
    each guest's first allocations write to as many shared pages."""
    is_immortal = getattr(sys, "_is_immortal", None)  # (CPython 3.14)
    if is_immortal is None or sys.implementation.name != "cpython" or sys.maxsize > 2**32:
        return 0, b""
    collecting = gc.isenabled()
    gc.disable()  # (its lists would start collections: nothing to free here)
    try:
        return IMMORTAL_COUNT_32BIT, _walk(is_immortal).tobytes()
    finally:
        if collecting:
            gc.enable()


def _walk(is_immortal: Callable[[object], bool]) -> array:
    code_type = types.CodeType
    seen = bytearray()  # bit (address / 8): objects are 8-byte aligned
    addresses = array("I")
    level: List[object] = [sys.modules]
    while level:
        found = gc.get_referents(*level)
        for obj in level:
            if not is_immortal(obj):
                addresses.append(id(obj))
            if type(obj) is code_type:  # (gc.get_referents does not reach into code)
                found += (obj.co_consts, obj.co_names, obj.co_filename, obj.co_name, obj.co_qualname)
                found += (obj.co_linetable, obj.co_exceptiontable)
        level = []
        for obj in found:
            slot = id(obj) >> 3
            byte, bit = slot >> 3, 1 << (slot & 7)
            if byte >= len(seen):
                seen += bytes(byte + 1 - len(seen) + (1 << 16))
            if not seen[byte] & bit:
                seen[byte] |= bit
                level.append(obj)
    return addresses
