"""The heap of a snapshot of the guest, left so that its guests share it.

Guests started from one snapshot (the guest build, or one taken after a
``preload``: host/src/wasm/snapshot.rs) share its memory pages until they
touch one: a page a guest reads or writes is counted in the master's RSS
for that guest, and one it writes is its own copy. Two things make guests
touch far more pages than the objects they use, and both are settled here,
as the last work before a snapshot.

Reference counts: CPython writes to an object whenever a reference to it is
taken or dropped, so a guest that only runs what the snapshot holds (calls
a function of a module, looks a name up) copies the page of each object it
touches. An immortal object's count is never written (PEP 683), so the host
gives every object the snapshot holds the immortal count as it takes the
snapshot (the ``immortal-objects`` export of wasm/wit/world.wit); only
``immortal_objects`` here knows where they are: every object reachable from
``sys.modules`` (the modules, what their namespaces hold, down to the
constants of their code). What runs between this walk and the snapshot
(the free blocks' filling below, the export's return, the C library's
resets) frees none of them: the preload's garbage was collected before,
and the collector is off until the snapshot's objects are frozen. They are
never freed in a guest from it: what a guest replaces of them (a module's
global set again) stays as it was in the snapshot, whose pages hold it
anyway.

Free blocks: the guest's CPython allocates every object with the C
library's malloc (componentize-py's build has no pymalloc), whose free lists
after the build hold thousands of small blocks spread over the whole heap.
A guest's new objects went into them, each on another page: a call that
keeps 3,000 small lists touched 3.5 MiB of pages. ``fill_free_blocks``
takes every small free block for objects that stay unused in the
snapshot, so a guest's objects come from memory after them, side by side:
1.2 MiB for the same call (0.6 in a guest from a preload's snapshot), and
the call in a fresh guest about 1.5-2 ms faster (benches/README.md).
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

#: the objects that hold the heap's small free blocks (``fill_free_blocks``)
_FILLERS: List[List[object]] = []
#: ``fill_free_blocks`` stops once this many objects in a row came side by
#: side: malloc then carves them from a free block of at least this many
#: times their size (4 KiB), and every smaller one was used up before
#: (malloc takes the smallest that fits)
_SIDE_BY_SIDE = 256
#: and in any case after this many (4 MiB of malloc's smallest blocks): a
#: heap this fragmented is left with what is left
_MAX_FILLERS = 1 << 18


def settle() -> None:
    """Leave the heap for a snapshot: its small free blocks taken
    (``fill_free_blocks``) with the collector off, so that nothing found
    before is freed meanwhile, then everything in it frozen (no guest's
    collection writes to what all guests share, the fillers included).
    The last work of the build and of each snapshot's guest."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        fill_free_blocks()
    finally:
        if collecting:
            gc.enable()
    gc.freeze()


def fill_free_blocks() -> int:
    """Take the heap's small free blocks for objects kept unused (see the
    module docs); the number of objects taken. Run as the last allocation
    before a snapshot; nothing in a running guest."""
    fillers: List[object] = []
    last = step = run = 0
    while run < _SIDE_BY_SIDE and len(fillers) < _MAX_FILLERS:
        filler = object()  # (malloc's smallest block)
        fillers.append(filler)
        address = id(filler)
        run = run + 1 if 0 < address - last == step else 0
        step, last = address - last, address
    _FILLERS.append(fillers)
    return len(fillers)


def immortal_objects() -> Tuple[int, bytes]:
    """The immortal reference count, and the addresses of the objects of
    the snapshot whose count is not (little-endian 32-bit words): what the
    host writes. (0, b"") where objects are not counted that way (another
    interpreter, a 64-bit build).

    The walk keeps next to nothing in Python objects of its own (a bitmap
    of what it saw, an array of addresses): what it allocates goes into the
    snapshot too, freed but written."""
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
