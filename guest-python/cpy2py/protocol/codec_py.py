"""The pure-Python codec of the twin protocol's value model.

CBOR (RFC 8949) as described in docs/protocol.md, section "Values". The
compiled codec ``cpy2py._host`` (host/src/python/codec.rs) behaves identically
and writes byte-identical output; this one runs where it is not available
(PyPy, CPython on WASI) and needs nothing but the standard library.

``dumps(obj, default=None)`` encodes the exact types ``None``, ``bool``,
``int``, ``float``, ``str``, ``bytes``, ``list``, ``dict``, ``tuple``, ``set``,
``frozenset``, ``complex`` and ``bytearray``. Anything else (subclasses
included) is handed to ``default(obj)``, which returns ``(tag, value)``; the
value is encoded under that tag.

``dumps(obj, default, plain=True)`` writes large plain containers as
plain-data blocks (tag 40014: a pickle of plain data only, made by the C
pickler where there is one), which is how a sandboxed guest sends bulk data
to the host several times faster than this codec encodes it; ``loads``
reads them with an unpickler that refuses every global, for blocks from a
trusted peer only (the host reads a guest's blocks with its own walker;
docs/protocol.md, "Plain-data blocks").

``loads(data, tag_hook=None, budget=None)`` decodes exactly one item. Tags
outside the value model are handed to ``tag_hook(tag, value)``. Every
malformed input raises :class:`cpy2py.errors.ProtocolError`. With a
``budget`` (bytes), a frame whose objects would cost more than that is
refused with ``ProtocolError`` before any is made: see "Decoding budget"
below and in docs/protocol.md; :func:`sandbox_budget` is the budget of
frames from sandboxed guests.
"""

from __future__ import annotations

import sys
from _struct import Struct
from _struct import error as _StructError  # (struct.py re-exports _struct: one module less at start-up)
from itertools import islice as _islice
from math import frexp as _frexp

from ..errors import NestedTooDeep, ProtocolError, SharedParts
from . import int_runs
from .tags import (
    BYTEARRAY,
    COMPLEX,
    FROZENSET,
    MAX_DEPTH,
    NEG_BIGNUM,
    PLAIN,
    POS_BIGNUM,
    SET,
    SHAREABLE,
    SHARED_REF,
    SHARING_DETECT,
    SHARING_REFS,
    SHARING_TREE,
    SURROGATE_STR,
    TUPLE,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not imported at run time: twins start faster
    from typing import Any, Callable, Dict, List, Optional, Tuple, Union

    Default = Callable[[Any], Any]
    TagHook = Callable[[int, Any], Any]
    _Decoder = Callable[[bytes, int, int, int, Optional[TagHook]], Tuple[Any, int]]
    _Coster = Callable[[bytes, int, int, int, int], Tuple[int, int]]

__all__ = ["dumps", "loads", "sandbox_budget"]

_U64_LIMIT = 1 << 64

_unpack_from_e = Struct(">e").unpack_from
_unpack_from_f = Struct(">f").unpack_from
_unpack_from_d = Struct(">d").unpack_from
_unpack_from_H = Struct(">H").unpack_from
_unpack_from_I = Struct(">I").unpack_from
_unpack_from_Q = Struct(">Q").unpack_from
_pack_BH = Struct(">BH").pack
_pack_BI = Struct(">BI").pack
_pack_BQ = Struct(">BQ").pack
_pack_Bd = Struct(">Bd").pack
_pack_Bf = Struct(">Bf").pack
_pack_Be = Struct(">Be").pack
_pack_reply_H = Struct(">BBBH").pack
_pack_reply_I = Struct(">BBBI").pack
# PyPy's JIT appends three bytes to a bytearray in half the time of packing
# them into a new bytes object first (10k two-byte ints: 86 against 177 us);
# on CPython both take the same time (and int lists go by runs there)
_BYTEWISE = sys.implementation.name == "pypy"
#: chars of a str with surrogates encoded at a time (0: all at once; _enc_surrogate_str)
_SURROGATE_PIECE = 256 if _BYTEWISE else 0

# Arrays of unsigned integers go a run at a time (int_runs.py; CPython only)
_RUNS = int_runs.ENABLED
_RUN_MIN = int_runs.MIN_RUN
_RUN_BATCH = 2 * int_runs.MIN_RUN
_run_length = int_runs.run_length
_take_run = int_runs.take

# Heads of tags that carry Python types (preferred serialization).
_TAG_POS_BIGNUM = b"\xc2"
_TAG_NEG_BIGNUM = b"\xc3"
_TAG_SET = b"\xd9\x01\x02"
_TAG_TUPLE = b"\xd9\x9c\x41"
_TAG_FROZENSET = b"\xd9\x9c\x42"
_TAG_COMPLEX = b"\xd9\x9c\x43\x82"  # with the head of its 2-item array
_TAG_BYTEARRAY = b"\xd9\x9c\x44"
_TAG_PLAIN = b"\xd9\x9c\x4e"
_TAG_SURROGATE_STR = b"\xd9\x9c\x4f"
_TAG_SHAREABLE = b"\xd8\x1c"
_TAG_SHARED_REF = b"\xd8\x1d"
_NAN = b"\xf9\x7e\x00"
_POS_INF = b"\xf9\x7c\x00"
_NEG_INF = b"\xf9\xfc\x00"


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


def _too_deep() -> ValueError:
    return NestedTooDeep(f"cannot encode a value nested deeper than {MAX_DEPTH} levels (MAX_DEPTH)")


def _type_name(obj: object) -> str:
    cls = type(obj)
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls.__name__)}"


def _head(out: bytearray, major: int, n: int) -> None:
    """Appends the shortest head of major type ``major`` (already shifted) and argument ``n``."""
    if n < 24:
        out.append(major | n)
    elif n < 256:
        out.append(major | 24)
        out.append(n)
    elif n < 65536:
        out += _pack_BH(major | 25, n)
    elif n < 4294967296:
        out += _pack_BI(major | 26, n)
    else:
        out += _pack_BQ(major | 27, n)


def small_reply(kind: int, key: int, value: Any) -> Optional[bytes]:
    """The bytes of ``[kind, key, value]`` when the kind is small, the id
    under 2**32 and the value None, a bool or an int under 24 (most replies
    of a guest, which runs this codec about five times slower than
    natively), written in one go; None for anything else. The kernel asks
    for its replies here first (``codec.small_reply``), without building the
    list or going through ``dumps``."""
    # (the common case first, and in as few steps as a guest can take:
    # a reply to a request id of two bytes)
    if type(key) is not int or type(kind) is not int or not 0 <= kind < 24:
        return None
    if type(value) is int:  # (exactly: not a bool, nor an int subclass)
        tail = _SMALL_UINTS.get(value)
        if tail is None:
            return None
    elif value is None:
        tail = b"\xf6"
    elif value is True or value is False:
        tail = b"\xf5" if value else b"\xf4"
    else:
        return None
    if 256 <= key < 65536:
        return _pack_reply_H(0x83, kind, 0x19, key) + tail
    if 0 <= key < 24:
        return bytes((0x83, kind, key)) + tail
    if 24 <= key < 256:
        return bytes((0x83, kind, 0x18, key)) + tail
    if 65536 <= key < 4294967296:
        return _pack_reply_I(0x83, kind, 0x1A, key) + tail
    return None


_SMALL_UINTS = {n: bytes((n,)) for n in range(24)}  # (an int under 24 is its own head)


def _enc_none(obj: None, out: bytearray, depth: int, default: Optional[Default]) -> None:
    out.append(0xF6)


def _enc_bool(obj: bool, out: bytearray, depth: int, default: Optional[Default]) -> None:
    out.append(0xF5 if obj else 0xF4)


def _enc_int(n: int, out: bytearray, depth: int, default: Optional[Default]) -> None:
    if n >= 0:
        if n < 24:
            out.append(n)
        elif n < _U64_LIMIT:
            _head(out, 0x00, n)
        else:
            if depth >= MAX_DEPTH:
                raise _too_deep()
            out += _TAG_POS_BIGNUM
            magnitude = n.to_bytes((n.bit_length() + 7) >> 3, "big")
            _head(out, 0x40, len(magnitude))
            out += magnitude
    else:
        n = -1 - n
        if n < 24:
            out.append(0x20 | n)
        elif n < _U64_LIMIT:
            _head(out, 0x20, n)
        else:
            if depth >= MAX_DEPTH:
                raise _too_deep()
            out += _TAG_NEG_BIGNUM
            magnitude = n.to_bytes((n.bit_length() + 7) >> 3, "big")
            _head(out, 0x40, len(magnitude))
            out += magnitude


#: 2.0 ** n for the significant bits a width may hold
_POW2 = [float(1 << n) for n in range(25)]


def _float_bytes(x: float) -> bytes:
    """The shortest of half, single and double precision that holds ``x``
    exactly: the narrowest width whose exponent range holds it with room
    for all its significant bits (fewer for that width's subnormals), told
    by float arithmetic. Packing ``x`` to each narrower width and back to
    compare cost five struct calls for a float that needs all of a double:
    this takes half the time on PyPy, two thirds in the guest."""
    if x != x:
        return _NAN
    m, e = _frexp(x)  # x == m * 2**e, 0.5 <= abs(m) < 1 (infinity: m is)
    # single precision: exponents -126 to 127 (e - 1), 24 bits, down to
    # one at its least subnormal, 2**-149
    if -148 <= e <= 128 and (m * _POW2[24 if e >= -125 else e + 149]).is_integer():
        # half precision: exponents -14 to 15, 11 bits, down to 2**-24
        if -23 <= e <= 16 and (m * _POW2[11 if e >= -13 else e + 24]).is_integer():
            return _pack_Be(0xF9, x)
        return _pack_Bf(0xFA, x)
    if x - x != 0.0:  # infinity
        return _POS_INF if x > 0 else _NEG_INF
    return _pack_Bd(0xFB, x)


def _enc_float(x: float, out: bytearray, depth: int, default: Optional[Default]) -> None:
    out += _float_bytes(x)


#: the length from which a str or bytes that a value holds more than once
#: is sent once and referred to after, with sharing on (the compiled
#: codec's SHARED_STRING_MIN): shorter ones are not worth looking up
SHARED_STRING_MIN = 64


def _may_share(s: Union[str, bytes], depth: int) -> bool:
    """Whether a str or bytes at ``depth`` is looked up while sharing: a
    long one, short of the deepest level (a tag is one more level; there
    it is written in full)."""
    return len(s) >= SHARED_STRING_MIN and depth < MAX_DEPTH


def _enc_str(s: str, out: bytearray, depth: int, default: Optional[Default]) -> None:
    if (
        type(default) is _Sharing
        and _may_share(s, depth)
        and _written_shared(s, out, depth, default, _enc_str)
    ):
        return
    # encode() and decode() without arguments are UTF-8 (strict) and skip
    # looking the codec up by name: about 5% of decoding a dict of strings
    try:
        b = s.encode()
    except UnicodeEncodeError:
        _enc_surrogate_str(s, out, depth)
        return
    n = len(b)
    if n < 24:
        out.append(0x60 | n)
    else:
        _head(out, 0x60, n)
    out += b


def _enc_surrogate_str(s: str, out: bytearray, depth: int) -> None:
    """A str with lone surrogates (``os.fsdecode`` makes them of a file name
    that is not UTF-8), which CBOR text cannot hold: its bytes with the
    surrogates passed through, as pickle writes them, under a tag."""
    if depth >= MAX_DEPTH:
        raise _too_deep()
    if _SURROGATE_PIECE and len(s) > _SURROGATE_PIECE:
        # PyPy 3.9 encodes with an error handler in time that grows with the
        # square of the str's surrogates (16,000 of them in 800k chars: 22 s);
        # a piece at a time is the same bytes (a surrogate pair is two lone
        # surrogates to this codec) in 42 ms
        k = _SURROGATE_PIECE
        b = b"".join([s[i : i + k].encode("utf-8", "surrogatepass") for i in range(0, len(s), k)])
    else:
        b = s.encode("utf-8", "surrogatepass")
    out += _TAG_SURROGATE_STR
    _head(out, 0x40, len(b))
    out += b


def _enc_bytes(b: bytes, out: bytearray, depth: int, default: Optional[Default]) -> None:
    if (
        type(default) is _Sharing
        and _may_share(b, depth)
        and _written_shared(b, out, depth, default, _enc_bytes)
    ):
        return
    _head(out, 0x40, len(b))
    if len(b) >= PART_MIN and type(default) in _CUTTERS and default.cuts is not None:  # type: ignore[union-attr]
        default.cuts.append((len(out), b))  # type: ignore[union-attr]
        return
    out += b


def _enc_bytearray(b: bytearray, out: bytearray, depth: int, default: Optional[Default]) -> None:
    if type(default) is _Sharing and _written_shared(b, out, depth, default, _enc_bytearray):
        return
    if depth >= MAX_DEPTH:
        raise _too_deep()
    out += _TAG_BYTEARRAY
    _head(out, 0x40, len(b))
    out += b


def _enc_complex(c: complex, out: bytearray, depth: int, default: Optional[Default]) -> None:
    if depth + 2 > MAX_DEPTH:
        raise _too_deep()
    out += _TAG_COMPLEX
    out += _float_bytes(c.real)
    out += _float_bytes(c.imag)


def _enc_int_pieces(items: Any, out: bytearray, depth: int, default: Optional[Default]) -> None:
    """Encodes a list or tuple that starts with an int a piece at a time:
    a piece of exact ints whose heads have one width at once (int_runs.py),
    any other one by one, read from the live array as the per-item path does
    (a default() may change it). After the second piece in a row that could
    not go at once, 1, 3, 7 ... (up to 63) pieces' worth more go one by one
    before the next try."""
    piece_len = int_runs.ENCODE_PIECE
    live = iter(items)
    n = len(items)
    i = misses = 0
    while i < n:
        piece = items[i : i + piece_len]
        if len(piece) >= _RUN_MIN and int_runs.encode(piece, out):
            i += len(piece)
            live.__setstate__(i)
            misses = 0
            continue
        count = len(piece) if not misses else piece_len << misses
        _enc_items(_islice(live, count), out, depth, default)
        i += count
        misses = misses + 1 if misses < 6 else 6


def _enc_items(items: Any, out: bytearray, depth: int, default: Optional[Default]) -> None:
    """Encodes the items of an array at ``depth`` (the array included), one by one."""
    get = _ENCODERS.get
    for item in items:
        t = type(item)
        if t is int and 0 <= item < 4294967296:
            if item < 24:
                out.append(item)
            elif item < 256:
                out.append(0x18)
                out.append(item)
            elif item < 65536:
                if _BYTEWISE:
                    out.append(0x19)
                    out.append(item >> 8)
                    out.append(item & 0xFF)
                else:
                    out += _pack_BH(0x19, item)
            else:
                out += _pack_BI(0x1A, item)
            continue
        if item is None:  # (a no-op's result, in every such reply)
            out.append(0xF6)
            continue
        enc = get(t)
        if enc is None:
            _enc_default(item, out, depth, default)
        else:
            enc(item, out, depth, default)


def _enc_list(obj: List[Any], out: bytearray, depth: int, default: Optional[Default]) -> None:
    if type(default) is _Sharing and _written_shared(obj, out, depth, default, _enc_list):
        return
    if depth >= MAX_DEPTH:
        raise _too_deep()
    n = len(obj)
    if n >= PLAIN_MIN and _blocks_wanted(default) and depth and _enc_block(obj, out, default):
        return
    if n < 24:
        out.append(0x80 | n)
    else:
        _head(out, 0x80, n)
    if _RUNS and n >= _RUN_MIN and type(obj[0]) is int:
        _enc_int_pieces(obj, out, depth + 1, default)
    else:
        _enc_items(obj, out, depth + 1, default)
    if len(obj) != n:
        # only a default() that mutates the list can do this
        raise RuntimeError("list changed size during encoding")


def _enc_tuple(obj: Tuple[Any, ...], out: bytearray, depth: int, default: Optional[Default]) -> None:
    if type(default) is _Sharing and obj and _written_shared(obj, out, depth, default, _enc_tuple):
        return
    if depth + 2 > MAX_DEPTH:
        raise _too_deep()
    n = len(obj)
    if n >= PLAIN_MIN and _blocks_wanted(default) and depth and _enc_block(obj, out, default):
        return
    out += _TAG_TUPLE
    if n < 24:
        out.append(0x80 | n)
    else:
        _head(out, 0x80, n)
    if _RUNS and n >= _RUN_MIN and type(obj[0]) is int:
        _enc_int_pieces(obj, out, depth + 2, default)
    else:
        _enc_items(obj, out, depth + 2, default)


def _enc_set(obj: Union[set, frozenset], out: bytearray, depth: int, default: Optional[Default]) -> None:
    if (
        type(default) is _Sharing
        and (obj or type(obj) is set)
        and _written_shared(obj, out, depth, default, _enc_set)
    ):
        return
    if depth + 2 > MAX_DEPTH:
        raise _too_deep()
    if len(obj) >= PLAIN_MIN and _blocks_wanted(default) and depth and _enc_block(obj, out, default):
        return
    out += _TAG_SET if type(obj) is set else _TAG_FROZENSET
    _head(out, 0x80, len(obj))
    # iterating raises RuntimeError if default() changes the set's size
    _enc_items(obj, out, depth + 2, default)


def _enc_dict(obj: Dict[Any, Any], out: bytearray, depth: int, default: Optional[Default]) -> None:
    if type(default) is _Sharing and _written_shared(obj, out, depth, default, _enc_dict):
        return
    if depth >= MAX_DEPTH:
        raise _too_deep()
    n = len(obj)
    if n >= PLAIN_MIN and _blocks_wanted(default) and depth and _enc_block(obj, out, default):
        return
    if n < 24:
        out.append(0xA0 | n)
    else:
        _head(out, 0xA0, n)
    depth += 1
    get = _ENCODERS.get
    # iterating raises RuntimeError if default() changes the dict's size
    for key, value in obj.items():
        t = type(key)
        if t is str and len(key) < SHARED_STRING_MIN:  # the most common key, inline
            try:
                b = key.encode()
            except UnicodeEncodeError:
                _enc_surrogate_str(key, out, depth)
                b = None
            if b is not None:
                k = len(b)
                if k < 24:
                    out.append(0x60 | k)
                else:
                    _head(out, 0x60, k)
                out += b
        else:
            enc = get(t)
            if enc is None:
                _enc_default(key, out, depth, default)
            else:
                enc(key, out, depth, default)
        t = type(value)
        if t is int and 0 <= value < 4294967296:  # inline as in _enc_items: a call per entry is the cost
            if value < 24:
                out.append(value)
            elif value < 256:
                out.append(0x18)
                out.append(value)
            elif value < 65536:
                if _BYTEWISE:
                    out.append(0x19)
                    out.append(value >> 8)
                    out.append(value & 0xFF)
                else:
                    out += _pack_BH(0x19, value)
            else:
                out += _pack_BI(0x1A, value)
            continue
        enc = get(t)
        if enc is None:
            _enc_default(value, out, depth, default)
        else:
            enc(value, out, depth, default)


# -- plain-data blocks ---------------------------------------------------------------

#: the least number of items of a container that ``dumps(..., plain=True)``
#: tries as a block (host/src/python/plain.rs: PLAIN_MIN; the message itself
#: never is one): in the guest, 8 ints took 10 us as a block, 20 as CBOR
PLAIN_MIN = 8
#: byte strings of this many bytes or more are left out of an encoding with
#: ``parts`` (the compiled codec's PART_MIN, host/src/python/codec.rs)
PART_MIN = 64 * 1024


class _Blocks:
    """The ``default`` of an encoding with ``plain=True``: marks it for the
    container encoders (which pass ``default`` down every level) and hands
    what plain data cannot carry to the caller's ``default``."""

    __slots__ = ("default", "cuts")

    def __init__(self, default: Optional[Default]) -> None:
        self.default = default
        self.cuts: Optional[List[Tuple[int, bytes]]] = None

    def __call__(self, obj: Any) -> Any:
        return NotImplemented if self.default is None else self.default(obj)


class _Parts(_Blocks):
    """The ``default`` of an encoding with ``parts=True`` and neither
    sharing nor blocks: only collects the large byte strings left out."""

    __slots__ = ()


class _Sharing:
    """The ``default`` of an encoding with sharing on (``sharing=``
    SHARING_DETECT or SHARING_REFS): the containers met so far, and whether
    blocks are wanted too; hands what the value model does not carry to the
    caller's ``default``."""

    __slots__ = ("default", "plain", "refs", "seen", "numbered", "skip", "only", "cuts")

    def __init__(self, default: Optional[Default], plain: bool, refs: bool) -> None:
        self.default = default
        #: with parts: (offset in the encoding, a large byte string left out there)
        self.cuts: Optional[List[Tuple[int, bytes]]] = None
        self.plain = plain
        self.refs = refs
        #: id -> the container (kept alive, so that no other takes its id);
        #: with references, [the container, its number (None: the value
        #: itself, never tagged), whether it is a tuple or set still being written]
        self.seen: Dict[int, Any] = {}
        self.numbered = 0
        #: with references: the ids of the containers the value holds twice,
        #: the only ones tagged (a tag is a level of nesting and 2 bytes)
        self.only: Any = frozenset()
        #: the container whose encoder _shared calls next (it writes it as it is)
        self.skip: Any = None

    def __call__(self, obj: Any) -> Any:
        return NotImplemented if self.default is None else self.default(obj)


#: the kinds of ``default`` that collect the byte strings an encoding with
#: ``parts`` leaves out (``dumps`` gives one to every such encoding)
_CUTTERS = (_Sharing, _Blocks, _Parts)


def _written_shared(obj: Any, out: bytearray, depth: int, sharing: _Sharing, encode: Any) -> bool:
    """A part's encoder, with sharing on, before it writes ``obj``: whether
    ``obj`` was written here (a reference, or with its tag by ``_shared``,
    which calls ``encode`` again); False: the encoder writes it as it is
    (met first while only detecting, the common case; held once; or called
    back by ``_shared``). Only detecting, a part met again raises
    ``SharedParts``."""
    if sharing.skip is obj:  # (_shared writes it: it was looked up)
        sharing.skip = None
        return False
    if not sharing.refs:  # only detecting: the part itself is kept, by id
        if id(obj) in sharing.seen:
            raise SharedParts("the value holds one of its parts more than once")
        sharing.seen[id(obj)] = obj
        return False
    if id(obj) not in sharing.only:  # held once: written as it is, untagged
        return False
    _shared(obj, out, depth, sharing, encode)
    return True


def _shared(obj: Any, out: bytearray, depth: int, sharing: _Sharing, encode: Any) -> None:
    """Encodes, with references on, a part that ``_held_twice`` found held
    twice: the first time by ``encode`` under tag 28, after that as a
    reference to it (tag 29). (Every part is looked up: the compiled codec
    looks up only those that something else references too, as their
    reference count says; PyPy has none.)"""
    entry = sharing.seen.get(id(obj))
    if entry is not None:
        if entry[1] is None:
            raise NestedTooDeep(
                "cannot encode a value that holds itself at its top level (send it inside a list)"
            )
        if entry[2]:
            raise NestedTooDeep(
                f"cannot encode a {type(obj).__name__} that holds itself (through a list or dict): "
                "it cannot be referred to before it is complete"
            )
        if depth >= MAX_DEPTH:
            raise _too_deep()
        out += _TAG_SHARED_REF
        _head(out, 0, entry[1])
        return
    if not depth:  # the value itself (a message): a frame starts with its array (peek)
        sharing.seen[id(obj)] = [obj, None, False]
        sharing.skip = obj
        encode(obj, out, depth, sharing)
        return
    entry = sharing.seen[id(obj)] = [obj, sharing.numbered, type(obj) in (tuple, set, frozenset)]
    sharing.skip = obj
    sharing.numbered += 1
    if depth >= MAX_DEPTH:
        raise _too_deep()
    out += _TAG_SHAREABLE
    encode(obj, out, depth + 1, sharing)
    entry[2] = False


_CONTAINERS = (list, dict, tuple, set, frozenset, bytearray)


def _shareable(obj: Any) -> bool:
    """Whether sharing keeps ``obj``'s identity: a container (but an empty
    tuple or frozenset, which CPython shares anyway), or a long str or bytes
    (as the compiled codec's ``shareable``)."""
    kind = type(obj)
    if kind is str or kind is bytes:
        return len(obj) >= SHARED_STRING_MIN
    return kind in _CONTAINERS and (bool(obj) or (kind is not tuple and kind is not frozenset))


def _held_twice(value: Any) -> Any:
    """The ids of what sharing keeps (``_shareable``) that ``value`` holds
    more than once (or that holds itself), found by a walk that enters each
    container once."""
    seen: Dict[int, Any] = {}
    twice = set()
    stack = [value]
    while stack:
        obj = stack.pop()
        if not _shareable(obj):
            continue
        if id(obj) in seen:
            twice.add(id(obj))
            continue
        seen[id(obj)] = obj
        kind = type(obj)
        if kind is dict:
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif kind in (list, tuple, set, frozenset):
            stack.extend(obj)
    return twice


def _blocks_wanted(default: Any) -> bool:
    """Whether large plain containers go as plain-data blocks."""
    return type(default) is _Blocks or (type(default) is _Sharing and default.plain)


class _NotPlain(Exception):
    pass


_block_codec: Any = None


def _blocks() -> Any:
    """(make a block of a value or None, read a block): the C pickler where
    there is one, made on first use (a twin that never meets a block never
    imports pickle)."""
    global _block_codec
    if _block_codec is not None:
        return _block_codec
    from io import BytesIO

    try:
        from _pickle import Pickler, Unpickler

        compiled = True
    except ImportError:  # PyPy: its pickle module is pure Python, and JIT-compiled
        from pickle import Pickler, Unpickler  # type: ignore[assignment]

        compiled = False

    plain_types = frozenset(
        (type(None), bool, int, float, str, bytes, bytearray, list, tuple, dict, set, frozenset)
    )

    class BlockPickler(Pickler):  # type: ignore[misc,valid-type]
        # the C pickler calls it for anything but those types; pickle.py
        # (PyPy) for every object, so it lets them through
        def reducer_override(self, obj: Any) -> Any:
            if type(obj) in plain_types:
                return NotImplemented
            raise _NotPlain

    class SharingBlockPickler(BlockPickler):
        # pickle.py (PyPy) calls memoize for each object it writes, also
        # without a memo (``fast``): a container met twice, in the block or
        # in the rest of the value, is shared, and the block is not written
        def memoize(self, obj: Any) -> None:
            if obj is not self.root and _shareable(obj):
                key = id(obj)
                if key in self.containers or key in self.state.seen or key in self.state.only:
                    raise _NotPlain
                self.containers[key] = obj

    class BlockUnpickler(Unpickler):  # type: ignore[misc,valid-type]
        # a block names no global: nothing but plain data can be made from it
        def find_class(self, module: str, name: str) -> Any:
            raise ProtocolError(f"a plain-data block (tag {PLAIN}) names the global {module}.{name}")

    def make(obj: Any, sharing: Optional[_Sharing] = None) -> Optional[bytes]:
        if sharing is not None and compiled:  # (the C pickler says nothing of what it meets)
            return None
        buffer = BytesIO()
        pickler = SharingBlockPickler(buffer, 5) if sharing is not None else BlockPickler(buffer, 5)
        if sharing is not None:
            pickler.root, pickler.state, pickler.containers = obj, sharing, {}
        pickler.fast = True  # no memo: a value shared or repeated is written each time, as CBOR does
        try:
            pickler.dump(obj)
        except Exception:  # not plain data through and through (or cyclic): CBOR says what is wrong
            return None
        if sharing is not None and not sharing.refs:
            sharing.seen.update(pickler.containers)  # (met again after the block: shared)
        return buffer.getvalue()

    def read(block: bytes) -> Any:
        try:
            return BlockUnpickler(BytesIO(block)).load()
        except ProtocolError:
            raise
        except Exception as err:
            what = f"{type(err).__name__}: {err}"
            raise ProtocolError(f"malformed plain-data block (tag {PLAIN}): {what}") from None

    _block_codec = (make, read)
    return _block_codec


def _enc_block(obj: Any, out: bytearray, default: Any) -> bool:
    """Writes ``obj`` as a plain-data block if it is plain data through and
    through (and, with sharing on, holds no container twice); returns
    whether it did."""
    block = _blocks()[0](obj, default if type(default) is _Sharing else None)
    if block is None:
        return False
    out += _TAG_PLAIN
    _head(out, 0x40, len(block))
    out += block
    return True


def _enc_default(obj: Any, out: bytearray, depth: int, default: Optional[Default]) -> None:
    if default is not None:
        result = default(obj)
        if result is not NotImplemented:
            if type(result) is not tuple or len(result) != 2:
                raise TypeError(f"default() must return a (tag, value) pair, not {_type_name(result)!r}")
            tag, value = result
            if not isinstance(tag, int):
                raise TypeError(f"default() returned a tag of type {_type_name(tag)!r}, not an int")
            if not 0 <= tag < _U64_LIMIT:
                raise ValueError(f"default() returned tag {tag}, outside 0..2**64-1")
            if depth >= MAX_DEPTH:
                raise _too_deep()
            _head(out, 0xC0, int(tag))
            enc = _ENCODERS.get(type(value))
            if enc is None:
                _enc_default(value, out, depth + 1, default)
            else:
                enc(value, out, depth + 1, default)
            return
    raise TypeError(
        f"cannot encode a value of type {_type_name(obj)!r}: it is not part of the "
        "cpy2py value model and no default handles it"
    )


_ENCODERS: Dict[type, Callable[[Any, bytearray, int, Optional[Default]], None]] = {
    type(None): _enc_none,
    bool: _enc_bool,
    int: _enc_int,
    float: _enc_float,
    str: _enc_str,
    bytes: _enc_bytes,
    list: _enc_list,
    dict: _enc_dict,
    tuple: _enc_tuple,
    set: _enc_set,
    frozenset: _enc_set,
    complex: _enc_complex,
    bytearray: _enc_bytearray,
}


def dumps(
    obj: Any,
    default: Optional[Default] = None,
    parts: bool = False,
    plain: bool = False,
    sharing: int = SHARING_TREE,
) -> Union[bytes, Tuple[bytes, ...]]:
    """Encodes ``obj`` as one CBOR data item (preferred serialization).

    With ``parts``, an encoding that holds byte strings (exact ``bytes``) of
    at least PART_MIN bytes comes as a tuple of ``bytes`` whose concatenation
    is the encoding, those byte strings among them as they are (as the
    compiled codec gives it): a transport writes them without copying them
    into a frame. With ``plain``, a list, tuple, dict, set or
    frozenset of at least PLAIN_MIN items that is plain data through and
    through goes as a plain-data block. ``sharing`` is what becomes of a
    container the value holds twice (tags.SHARING_*: written out each time,
    ``SharedParts`` raised, or written once and referred to after)."""
    if sharing:
        if sharing not in (SHARING_DETECT, SHARING_REFS):
            raise ValueError(f"sharing must be 0, 1 or 2, not {sharing!r}")
        default = _Sharing(default, plain, sharing == SHARING_REFS)
        if sharing == SHARING_REFS:
            default.only = _held_twice(obj)
    elif plain:
        default = _Blocks(default)
    elif default is None and type(obj) is list and len(obj) < _RUN_MIN and not parts:
        # a message of scalars (a release, a reply small_reply did not write):
        # its items straight away
        out = bytearray((0x80 | len(obj),))
        _enc_items(obj, out, 1, None)
        return bytes(out)
    if parts:
        if type(default) not in _CUTTERS:
            default = _Parts(default)
        default.cuts = []  # type: ignore[union-attr]
    out = bytearray()
    enc = _ENCODERS.get(type(obj))
    if enc is None:
        _enc_default(obj, out, 0, default)
    else:
        enc(obj, out, 0, default)
    if parts and default.cuts:  # type: ignore[union-attr]
        return _pieces(out, default.cuts)  # type: ignore[union-attr,return-value]
    return bytes(out)


def _pieces(out: bytearray, cuts: List[Tuple[int, bytes]]) -> Tuple[bytes, ...]:
    """The encoding ``out`` with the byte strings left out at ``cuts``, as a
    tuple of its pieces in order."""
    pieces: List[bytes] = []
    start = 0
    for at, left_out in cuts:
        if at > start:
            pieces.append(bytes(out[start:at]))
        pieces.append(left_out)
        start = at
    if start < len(out):
        pieces.append(bytes(out[start:]))
    return tuple(pieces)


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------

_MAJOR_NAMES = (
    "unsigned integer",
    "negative integer",
    "byte string",
    "text string",
    "array",
    "map",
    "tag",
    "simple value",
)


def _truncated(pos: int, what: str) -> ProtocolError:
    return ProtocolError(f"truncated CBOR: input ends at offset {pos} inside {what}")


def _nested_too_deep(pos: int) -> ProtocolError:
    return ProtocolError(f"CBOR nested deeper than {MAX_DEPTH} levels (MAX_DEPTH) at offset {pos}")


def _argument(data: bytes, pos: int, ib: int) -> Tuple[int, int]:
    """The argument of the head with initial byte ``ib`` whose following bytes start at ``pos``.

    Returns ``(-1, pos)`` for an indefinite length (additional information 31).
    """
    ai = ib & 0x1F
    if ai < 24:
        return ai, pos
    if ai == 24:
        if pos >= len(data):
            raise _truncated(pos, "a head")
        return data[pos], pos + 1
    if ai == 25:
        if pos + 2 > len(data):
            raise _truncated(len(data), "a head")
        return _unpack_from_H(data, pos)[0], pos + 2
    if ai == 26:
        if pos + 4 > len(data):
            raise _truncated(len(data), "a head")
        return _unpack_from_I(data, pos)[0], pos + 4
    if ai == 27:
        if pos + 8 > len(data):
            raise _truncated(len(data), "a head")
        return _unpack_from_Q(data, pos)[0], pos + 8
    if ai == 31:
        return -1, pos
    raise ProtocolError(f"reserved additional information {ai} in the head at offset {pos - 1}")


def _dec_uint(data: bytes, pos: int, ib: int, depth: int, hook: Optional[TagHook]) -> Tuple[Any, int]:
    n, pos = _argument(data, pos, ib)
    if n < 0:
        raise ProtocolError(f"an unsigned integer cannot have an indefinite length (offset {pos - 1})")
    return n, pos


def _dec_nint(data: bytes, pos: int, ib: int, depth: int, hook: Optional[TagHook]) -> Tuple[Any, int]:
    n, pos = _argument(data, pos, ib)
    if n < 0:
        raise ProtocolError(f"a negative integer cannot have an indefinite length (offset {pos - 1})")
    return -1 - n, pos


def _chunks(data: bytes, pos: int, major: int) -> Tuple[List[bytes], int]:
    """The chunks of an indefinite-length byte or text string, up to and past its break."""
    chunks = []
    end = len(data)
    while True:
        if pos >= end:
            raise _truncated(pos, "an indefinite-length string")
        ib = data[pos]
        if ib == 0xFF:
            return chunks, pos + 1
        if ib >> 5 != major or ib & 0x1F == 31:
            raise ProtocolError(
                f"a chunk of an indefinite-length {_MAJOR_NAMES[major]} must be a definite "
                f"{_MAJOR_NAMES[major]} (offset {pos})"
            )
        n, pos = _argument(data, pos + 1, ib)
        if n > end - pos:
            raise ProtocolError(
                f"a {_MAJOR_NAMES[major]} chunk declares {n} bytes but only {end - pos} remain"
            )
        chunks.append(data[pos : pos + n])
        pos += n


def _dec_bytes(data: bytes, pos: int, ib: int, depth: int, hook: Optional[TagHook]) -> Tuple[Any, int]:
    n, pos = _argument(data, pos, ib)
    if n < 0:
        chunks, pos = _chunks(data, pos, 2)
        return b"".join(chunks), pos
    end = pos + n
    if end > len(data):
        raise ProtocolError(f"a byte string declares {n} bytes but only {len(data) - pos} remain")
    return data[pos:end], end


def _invalid_utf8(start: int, e: UnicodeDecodeError) -> ProtocolError:
    return ProtocolError(f"invalid UTF-8 in the text string at offset {start}: {e.reason}")


def _utf8(b: bytes, pos: int) -> str:
    try:
        return b.decode()
    except UnicodeDecodeError as e:
        raise ProtocolError(f"invalid UTF-8 in the text string before offset {pos}: {e.reason}") from None


def _dec_text(data: bytes, pos: int, ib: int, depth: int, hook: Optional[TagHook]) -> Tuple[Any, int]:
    n, pos = _argument(data, pos, ib)
    if n < 0:
        chunks, end = _chunks(data, pos, 3)
        # every chunk must be valid UTF-8 on its own (RFC 8949, 3.2.3)
        return "".join([_utf8(c, end) for c in chunks]), end
    end = pos + n
    if end > len(data):
        raise ProtocolError(f"a text string declares {n} bytes but only {len(data) - pos} remain")
    try:
        return data[pos:end].decode(), end
    except UnicodeDecodeError as e:
        raise _invalid_utf8(pos, e) from None


def _dec_array(data: bytes, pos: int, ib: int, depth: int, hook: Optional[TagHook]) -> Tuple[Any, int]:
    if depth >= MAX_DEPTH:
        raise _nested_too_deep(pos - 1)
    if ib < 0x98:  # 0 to 23 items (every message): no call for the head
        n = ib & 0x1F
    else:
        n, pos = _argument(data, pos, ib)
    depth += 1
    end = len(data)
    items: List[Any]
    if n < 0:
        items = []
        append = items.append
        while True:
            if pos >= end:
                raise _truncated(pos, "an indefinite-length array")
            ib = data[pos]
            if ib == 0xFF:
                return items, pos + 1
            if ib < 24:
                append(ib)
                pos += 1
            else:
                item, pos = _DECODERS[ib >> 5](data, pos + 1, ib, depth, hook)
                append(item)
    if n > end - pos:
        raise ProtocolError(f"an array declares {n} items but only {end - pos} bytes remain")
    decoders = _DECODERS
    # A long array looks for a run of unsigned integers of one width (taken
    # whole: int_runs.py) before its first item and after each batch of items
    # it decoded one by one (_RUN_BATCH, doubled for each look in a row that
    # found none, up to 64 times).
    look = int_runs.FIRST_LOOK if _RUNS and n >= _RUN_MIN else 0
    # The items are stored into a list made at its length (of ints until
    # something else is stored): PyPy's JIT fills it item by item in less
    # than half the time that appending takes (a 10k-int list 104 -> 44 us).
    # CPython stores an item by index as fast as it appends one; its runs go
    # in by slice, which costs a 10k list of ints below 24 about 30 us more
    # than extending did.
    items = [0] * n
    done = 0  # items decoded
    left = n
    misses = 0  # looks in a row that found no run: the next look comes later each time
    while left:
        if look:
            if pos >= end:
                raise _truncated(pos, "an array")
            ib = data[pos]
            if ib < 0x1C and left >= _RUN_MIN:
                run = _run_length(data, pos, ib, left if left < look else look)
                if run >= _RUN_MIN:
                    items[done : done + run], pos = _take_run(data, pos, ib, run)
                    done += run
                    left -= run
                    look = look * 2 if run == look and look < int_runs.LONGEST_LOOK else int_runs.FIRST_LOOK
                    misses = 0
                    continue
                misses = misses + 1 if misses < 6 else 6
            batch = _RUN_BATCH << misses
            if batch > left:
                batch = left
        else:
            batch = left
        left -= batch
        for i in range(done, done + batch):
            if pos >= end:
                raise _truncated(pos, "an array")
            ib = data[pos]
            # inline fast paths for the most common items, grouped by major
            # type (an item takes two or three compares to reach its path);
            # anything unusual (including truncation) takes the general path
            if ib < 24:
                items[i] = ib
                pos += 1
                continue
            if ib < 0x1C:  # an unsigned integer with a head of 1, 2, 4 or 8 bytes
                if ib == 0x19 and pos + 2 < end:
                    items[i] = (data[pos + 1] << 8) | data[pos + 2]
                    pos += 3
                    continue
                if ib == 0x18 and pos + 1 < end:
                    items[i] = data[pos + 1]
                    pos += 2
                    continue
                if ib == 0x1B and pos + 8 < end:  # a chain id
                    items[i] = _unpack_from_Q(data, pos + 1)[0]
                    pos += 9
                    continue
                if ib == 0x1A and pos + 4 < end:
                    items[i] = _unpack_from_I(data, pos + 1)[0]
                    pos += 5
                    continue
            elif 0x60 <= ib < 0x78:
                start = pos + 1
                if start + ib - 0x60 <= end:
                    pos = start + ib - 0x60
                    try:
                        items[i] = data[start:pos].decode()
                    except UnicodeDecodeError as e:
                        raise _invalid_utf8(start, e) from None
                    continue
            elif (ib == 0x80 or ib == 0xA0) and depth < MAX_DEPTH:  # no arguments, no keywords
                items[i] = [] if ib == 0x80 else {}
                pos += 1
                continue
            items[i], pos = decoders[ib >> 5](data, pos + 1, ib, depth, hook)
        done += batch
    return items, pos


def _dec_map(data: bytes, pos: int, ib: int, depth: int, hook: Optional[TagHook]) -> Tuple[Any, int]:
    if depth >= MAX_DEPTH:
        raise _nested_too_deep(pos - 1)
    if ib < 0xB8:  # 0 to 23 entries
        n = ib & 0x1F
    else:
        n, pos = _argument(data, pos, ib)
    depth += 1
    result: Dict[Any, Any] = {}
    end = len(data)
    if n < 0:
        while True:
            if pos >= end:
                raise _truncated(pos, "an indefinite-length map")
            ib = data[pos]
            if ib == 0xFF:
                return result, pos + 1
            pos = _dec_entry(data, pos, ib, depth, hook, result)
    if 2 * n > end - pos:
        raise ProtocolError(f"a map declares {n} entries but only {end - pos} bytes remain")
    decoders = _DECODERS
    left = n
    # a large frame's short keys, each decoded once (_FrameKeys), until few
    # repeat; then the loop below (one loop with a branch per key made PyPy's
    # JIT slower at distinct keys once it had run the table's branch)
    keys = hook.keys if type(hook) is _FrameKeys or type(hook) is _SharedValues else None
    if keys is not None:
        found = missed = 0
        while left:
            if pos >= end:
                raise _truncated(pos, "a map")
            ib = data[pos]
            if 0x60 <= ib < 0x78 and pos + ib - 0x5F < end:  # whole, and a value follows
                start = pos + 1
                pos = start + ib - 0x60
                raw = data[start:pos]
                key = keys.get(raw)
                if key is None:
                    try:
                        key = keys[raw] = raw.decode()
                    except UnicodeDecodeError as e:
                        raise _invalid_utf8(start, e) from None
                    missed += 1
                else:
                    found += 1
                value, pos = _map_value(data, pos, end, depth, hook)
                result[key] = value  # (a str is hashable)
            else:
                pos = _dec_entry(data, pos, ib, depth, hook, result)
            left -= 1
            if missed >= _KEYS_REVIEW and 4 * found < missed:
                break
        hook.tally(found, missed)  # type: ignore[union-attr]
    for _ in range(left):
        if pos >= end:
            raise _truncated(pos, "a map")
        ib = data[pos]
        # inline fast paths for the most common keys (short text) and values
        # (small ints, short text); anything unusual (including truncation)
        # takes the general path
        if 0x60 <= ib < 0x78 and pos + ib - 0x5F < end:  # whole, and a value follows
            start = pos + 1
            pos = start + ib - 0x60
            try:
                key = data[start:pos].decode()
            except UnicodeDecodeError as e:
                raise _invalid_utf8(start, e) from None
        else:
            key, pos = decoders[ib >> 5](data, pos + 1, ib, depth, hook)
            if pos >= end:
                raise _truncated(pos, "a map")
        ib = data[pos]
        if ib < 24:
            value: Any = ib
            pos += 1
        elif ib == 0x19 and pos + 2 < end:
            value = (data[pos + 1] << 8) | data[pos + 2]
            pos += 3
        elif ib == 0x18 and pos + 1 < end:
            value = data[pos + 1]
            pos += 2
        elif 0x60 <= ib < 0x78 and pos + ib - 0x60 < end:
            start = pos + 1
            pos = start + ib - 0x60
            try:
                value = data[start:pos].decode()
            except UnicodeDecodeError as e:
                raise _invalid_utf8(start, e) from None
        else:
            value, pos = decoders[ib >> 5](data, pos + 1, ib, depth, hook)
        try:
            result[key] = value
        except TypeError:
            raise ProtocolError(f"unhashable map key of type {_type_name(key)!r}") from None
    return result, pos


def _map_value(data: bytes, pos: int, end: int, depth: int, hook: Optional[TagHook]) -> Tuple[Any, int]:
    """The value of a map's entry at ``pos``, which is within ``data``: the
    most common ones (small ints, short text, true, false, null, doubles)
    without a further call (PyPy's JIT inlines this one; CPython, which
    makes the call, decodes keys as they come: _FrameKeys)."""
    ib = data[pos]
    if ib < 24:
        return ib, pos + 1
    if ib == 0x19 and pos + 2 < end:
        return (data[pos + 1] << 8) | data[pos + 2], pos + 3
    if ib == 0x18 and pos + 1 < end:
        return data[pos + 1], pos + 2
    if 0x60 <= ib < 0x78 and pos + ib - 0x60 < end:
        start = pos + 1
        pos = start + ib - 0x60
        try:
            return data[start:pos].decode(), pos
        except UnicodeDecodeError as e:
            raise _invalid_utf8(start, e) from None
    if ib == 0xF5:
        return True, pos + 1
    if ib == 0xF4:
        return False, pos + 1
    if ib == 0xF6:
        return None, pos + 1
    if ib == 0xFB and pos + 8 < end:
        return _unpack_from_d(data, pos + 1)[0], pos + 9
    return _DECODERS[ib >> 5](data, pos + 1, ib, depth, hook)


def _dec_entry(
    data: bytes, pos: int, ib: int, depth: int, hook: Optional[TagHook], result: Dict[Any, Any]
) -> int:
    """Decodes one map entry into ``result``; ``ib`` is the initial byte of its key at ``pos``."""
    key, pos = _DECODERS[ib >> 5](data, pos + 1, ib, depth, hook)
    if pos >= len(data):
        raise _truncated(pos, "a map")
    ib = data[pos]
    if ib < 24:
        value: Any = ib
        pos += 1
    else:
        value, pos = _DECODERS[ib >> 5](data, pos + 1, ib, depth, hook)
    try:
        result[key] = value
    except TypeError:
        raise ProtocolError(f"unhashable map key of type {_type_name(key)!r}") from None
    return pos


def _content(data: bytes, pos: int, major: int, tag: int) -> int:
    """Checks that the content of ``tag`` at ``pos`` has major type ``major``.

    Returns the initial byte of the content.
    """
    if pos >= len(data):
        raise _truncated(pos, f"tag {tag}")
    ib = data[pos]
    if ib >> 5 != major:
        raise ProtocolError(
            f"tag {tag} must hold a {_MAJOR_NAMES[major]}, not a {_MAJOR_NAMES[ib >> 5]} (offset {pos})"
        )
    return ib


def _dec_tag(data: bytes, pos: int, ib: int, depth: int, hook: Optional[TagHook]) -> Tuple[Any, int]:
    if depth >= MAX_DEPTH:
        raise _nested_too_deep(pos - 1)
    if ib == 0xD9 and pos + 1 < len(data):  # a two-byte number: the kernel's tags, tuples
        tag = (data[pos] << 8) | data[pos + 1]
        pos += 2
    else:
        tag, pos = _argument(data, pos, ib)
        if tag < 0:
            raise ProtocolError(f"a tag cannot have an indefinite length (offset {pos - 1})")
    depth += 1
    if tag not in _CODEC_TAGS:  # the kernel's (a reference to a function, say): the hook's
        if hook is None:
            raise ProtocolError(f"unknown CBOR tag {tag}")
        if pos >= len(data):
            raise _truncated(pos, f"tag {tag}")
        ib = data[pos]
        value, pos = _DECODERS[ib >> 5](data, pos + 1, ib, depth, hook)
        return hook(tag, value), pos
    if tag == TUPLE or tag == SET or tag == FROZENSET:
        ib = _content(data, pos, 4, tag)
        items, pos = _dec_array(data, pos + 1, ib, depth, hook)
        if tag == TUPLE:
            return tuple(items), pos
        try:
            return (set(items) if tag == SET else frozenset(items)), pos
        except TypeError:
            bad = next((i for i in items if not _hashable(i)), _NONE_FOUND)
            if bad is _NONE_FOUND:  # not a hash failure: an __eq__ raised it
                raise
            raise ProtocolError(f"unhashable set item of type {_type_name(bad)!r}") from None
    if tag == POS_BIGNUM or tag == NEG_BIGNUM:
        ib = _content(data, pos, 2, tag)
        magnitude, pos = _dec_bytes(data, pos + 1, ib, depth, hook)
        n = int.from_bytes(magnitude, "big")
        return (n if tag == POS_BIGNUM else -1 - n), pos
    if tag == COMPLEX:
        ib = _content(data, pos, 4, tag)
        items, pos = _dec_array(data, pos + 1, ib, depth, hook)
        if len(items) != 2 or type(items[0]) is not float or type(items[1]) is not float:
            raise ProtocolError(f"tag {COMPLEX} (complex) must hold an array of two floats")
        return complex(items[0], items[1]), pos
    if tag == BYTEARRAY:
        ib = _content(data, pos, 2, tag)
        b, pos = _dec_bytes(data, pos + 1, ib, depth, hook)
        return bytearray(b), pos
    if tag == PLAIN:
        ib = _content(data, pos, 2, tag)
        b, pos = _dec_bytes(data, pos + 1, ib, depth, hook)
        return _blocks()[1](b), pos
    if tag == SHAREABLE or tag == SHARED_REF:
        if type(hook) is not _SharedValues:
            raise ProtocolError(
                f"tag {tag} (a shared value) where none may be: in a frame from a sandboxed guest "
                f"(whose values are trees), or not in its shortest form (offset {pos - 2})"
            )
        if tag == SHAREABLE:
            return _dec_shareable(data, pos, depth, hook)
        ib = _content(data, pos, 0, tag)
        at = pos
        n, pos = _argument(data, pos + 1, ib)
        values = hook.values
        if n >= len(values):
            raise ProtocolError(
                f"tag {tag} at offset {at} refers to shared value {n}, but only {len(values)} came before it"
            )
        value = values[n]
        if value is _INCOMPLETE:
            raise ProtocolError(
                f"tag {tag} at offset {at} refers to shared value {n} from inside it, which is a tuple, "
                "set or frozenset made only once its items are"
            )
        return value, pos
    # SURROGATE_STR: the last of _CODEC_TAGS
    ib = _content(data, pos, 2, tag)
    head = pos
    b, pos = _dec_bytes(data, pos + 1, ib, depth, hook)
    try:
        return b.decode("utf-8", "surrogatepass"), pos
    except UnicodeDecodeError as e:
        raise ProtocolError(
            f"invalid UTF-8 in a str with surrogates (tag {SURROGATE_STR}) at offset {head}: {e.reason}"
        ) from None


#: the tags this codec gives a meaning to; any other is the hook's
_CODEC_TAGS = frozenset(
    {
        TUPLE,
        SET,
        FROZENSET,
        POS_BIGNUM,
        NEG_BIGNUM,
        COMPLEX,
        BYTEARRAY,
        PLAIN,
        SHAREABLE,
        SHARED_REF,
        SURROGATE_STR,
    }
)


_NONE_FOUND = object()
_INCOMPLETE = object()


class _FrameKeys:
    """The tag hook of a large frame: the caller's hook, and the short text
    keys of the frame's maps, each decoded once and handed out again.
    Records and nested dicts repeat their keys; a str made once, its hash
    with it, goes into a dict faster (PyPy: a 10k-entry nested dict decodes
    in 0.75 of the time; the compiled codec does the same: map_keys.rs).
    Where few keys repeat (under a quarter of those looked up after
    ``_KEYS_REVIEW``), the frame's keys are decoded as they come."""

    __slots__ = ("hook", "keys", "found", "missed")

    def __init__(self, hook: Optional[TagHook]) -> None:
        self.hook = hook
        self.keys: Optional[Dict[bytes, str]] = {} if _KEY_TABLES else None
        self.found = self.missed = 0

    def __call__(self, tag: int, value: Any) -> Any:
        if self.hook is None:
            raise ProtocolError(f"unknown CBOR tag {tag}")
        return self.hook(tag, value)

    def tally(self, found: int, missed: int) -> None:
        """A map's keys: ``found`` in the table, ``missed`` (added)."""
        self.found += found
        self.missed += missed
        if self.missed >= _KEYS_REVIEW and 4 * self.found < self.missed:
            self.keys = None


#: frames shorter than this decode their keys as they come, and are looked
#: through for tag 28 before a table of shared values is made for them
_LARGE_FRAME = 2048
_KEYS_REVIEW = 128
# (on CPython the keyed loop made the pure codec a fifth slower: its call per
# value costs more than the table saves; the compiled codec keeps its own)
_KEY_TABLES = sys.implementation.name == "pypy"


class _SharedValues(_FrameKeys):
    """The tag hook of a frame that holds shared values (tag 28): the
    caller's hook, and the shareable values met so far, by number."""

    __slots__ = ("values",)

    def __init__(self, hook: Optional[TagHook]) -> None:
        super().__init__(hook)
        self.values: List[Any] = []


def _dec_shareable(data: bytes, pos: int, depth: int, shared: _SharedValues) -> Tuple[Any, int]:
    """The content of a tag 28 (``depth`` counts the tag), numbered as the
    next shareable value. A list or dict is numbered before its items are
    decoded, so that they may refer to it (a value that holds itself);
    anything else once it is made."""
    values = shared.values
    number = len(values)
    values.append(_INCOMPLETE)
    if pos >= len(data):
        raise _truncated(pos, f"tag {SHAREABLE}")
    ib = data[pos]
    major = ib >> 5
    value: Any
    if major == 4:
        value = values[number] = []
        items, pos = _dec_array(data, pos + 1, ib, depth, shared)
        value.extend(items)
    elif major == 5:
        value = values[number] = {}
        entries, pos = _dec_map(data, pos + 1, ib, depth, shared)
        value.update(entries)
    else:
        value, pos = _DECODERS[major](data, pos + 1, ib, depth, shared)
        values[number] = value
    return value, pos


def _hashable(obj: Any) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


def _dec_simple(data: bytes, pos: int, ib: int, depth: int, hook: Optional[TagHook]) -> Tuple[Any, int]:
    if ib == 0xF6:
        return None, pos
    if ib == 0xF5:
        return True, pos
    if ib == 0xF4:
        return False, pos
    end = len(data)
    if ib == 0xFB:
        if pos + 8 > end:
            raise _truncated(end, "a double-precision float")
        return _unpack_from_d(data, pos)[0], pos + 8
    if ib == 0xFA:
        if pos + 4 > end:
            raise _truncated(end, "a single-precision float")
        return _unpack_from_f(data, pos)[0], pos + 4
    if ib == 0xF9:
        if pos + 2 > end:
            raise _truncated(end, "a half-precision float")
        return _unpack_from_e(data, pos)[0], pos + 2
    if ib == 0xFF:
        raise ProtocolError(f"unexpected break (0xff) outside an indefinite-length item at offset {pos - 1}")
    if ib == 0xF7:
        raise ProtocolError(f"the CBOR value undefined (0xf7) at offset {pos - 1} has no meaning in cpy2py")
    if ib == 0xF8:
        if pos >= end:
            raise _truncated(pos, "a simple value")
        raise ProtocolError(f"unsupported CBOR simple value {data[pos]} at offset {pos - 1}")
    if ib & 0x1F < 24:
        raise ProtocolError(f"unsupported CBOR simple value {ib & 0x1F} at offset {pos - 1}")
    raise ProtocolError(f"reserved additional information {ib & 0x1F} in the head at offset {pos - 1}")


_DECODERS: Tuple[_Decoder, ...] = (
    _dec_uint,
    _dec_nint,
    _dec_bytes,
    _dec_text,
    _dec_array,
    _dec_map,
    _dec_tag,
    _dec_simple,
)


def _holds_shareable_tag(data: bytes, at: int) -> bool:
    """Whether tag 28's head (``d8 1c``) is in ``data`` from ``at``, its
    first 0xd8 (-1: none): found by that byte, which CPython looks for with
    memchr (it searches a two-byte needle byte by byte). Small frames only:
    the loop runs once per 0xd8, in a byte string's content too."""
    while at >= 0:
        if data[at + 1 : at + 2] == b"\x1c":
            return True
        at = data.find(0xD8, at + 1)
    return False


def loads(
    data: Union[bytes, bytearray, memoryview],
    tag_hook: Optional[TagHook] = None,
    budget: Optional[int] = None,
) -> Any:
    """Decodes exactly one CBOR data item from ``data``.

    With ``budget`` (bytes; None: no limit), a frame whose estimated cost in
    objects passes it is refused with ``ProtocolError`` before decoding.
    """
    if type(data) is not bytes:  # (a large frame a transport read into a bytearray, say)
        if not isinstance(data, (bytes, bytearray, memoryview)) and not hasattr(type(data), "__bytes__"):
            raise TypeError(
                f"loads() takes bytes, bytearray, memoryview or a received Frame, not {_type_name(data)!r}"
            )
        data = bytes(data)
    if _renditions and budget is None and data[:2] == b"\x80\x05":
        return _load_rendition(data, tag_hook)  # (first: a guest reads nothing else from the master)
    estimated = True
    if budget is not None:
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise TypeError(f"budget must be an int (bytes) or None, not {_type_name(budget)!r}")
        if budget < 0:
            raise ValueError(f"budget must be at least 0 bytes, not {budget}")
        estimated = _estimate(data, budget) is not None
    if not data:
        raise ProtocolError("empty input: expected one CBOR data item")
    if budget is not None:  # (a guest's frames: trees, no shared values)
        if len(data) >= _LARGE_FRAME and _KEY_TABLES:
            tag_hook = _FrameKeys(tag_hook)
    elif len(data) >= _LARGE_FRAME:
        # may hold shared values, not looked for: that scans the content of
        # its byte strings, where 0xd8 is one byte in 256 of random data
        # (and PyPy finds a byte without memchr: 0.7 ms per MiB)
        tag_hook = _SharedValues(tag_hook)
    else:
        at = data.find(0xD8)  # (most small frames have none: no call)
        if at >= 0 and _holds_shareable_tag(data, at):
            tag_hook = _SharedValues(tag_hook)
    ib = data[0]
    value, pos = _DECODERS[ib >> 5](data, 1, ib, 0, tag_hook)
    if pos != len(data):
        raise ProtocolError(f"{len(data) - pos} trailing bytes after the CBOR data item (offset {pos})")
    if not estimated:
        # the estimate stopped at something the decoder accepted: never
        # expected, and refused rather than decoded without a budget
        raise ProtocolError(f"a frame of {len(data)} bytes could not be checked against the decoding budget")
    return value


# --------------------------------------------------------------------------
# Renditions: what a WASI guest is given to read
# --------------------------------------------------------------------------
#
# The host gives a guest whose hello asks for them the master's messages as
# pickles of the same values (host/src/protocol/rendition.rs; docs/protocol.md,
# "What a guest is given to read"): PROTO 5, FRAME, data opcodes, the kernel's
# tags as persistent ids ``(tag, content)``, STOP, then 18 bytes: kind, which
# of id and chain are there, id, chain. Its C unpickler reads one several times
# faster than ``loads`` decodes the CBOR; a frame the host did not render is
# CBOR, decoded as before. Only a guest reads them (``read_renditions``): a
# rendition begins with 0x80 0x05, which no message frame does.

_renditions = False
_unpack_trailer = Struct("<BBQQ").unpack_from
_free_reader: Any = None


def read_renditions() -> None:
    """This interpreter's hello asked for renditions (a WASI guest, a twin
    with this codec: ``handshake.send_hello``): ``peek`` and ``loads`` read
    them."""
    global _renditions
    _renditions = True


def _load_rendition(data: bytes, hook: Optional[TagHook]) -> Any:
    global _free_reader
    reader, _free_reader = _free_reader, None  # (decoding may decode another frame)
    if reader is None:
        reader = _rendition_reader()
    # a read that raised leaves the reader behind: its unpickler may still
    # hold the rest of that frame, which the next load would read first
    value = reader(data, hook)
    _free_reader = reader
    return value


_unpickler_class: Any = None


def rendition_unpickler() -> Any:
    """The unpickler class that reads renditions, made once (a guest's
    snapshot holds it: made at a guest's first call, it cost each guest
    the pages a new class writes)."""
    global _unpickler_class
    if _unpickler_class is not None:
        return _unpickler_class
    from _pickle import Unpickler  # (the C module only: pickle.py is not imported)

    class RenditionUnpickler(Unpickler):  # type: ignore[misc,valid-type]
        hook: Optional[TagHook] = None

        def persistent_load(self, pid: Any) -> Any:
            hook = self.hook
            if hook is None:
                raise ProtocolError(f"unknown CBOR tag {pid[0]}")
            return hook(pid[0], pid[1])

        def find_class(self, module: str, name: str) -> Any:
            raise ProtocolError(f"a rendition of a frame names the global {module}.{name}")

    _unpickler_class = RenditionUnpickler
    return RenditionUnpickler


def _rendition_reader() -> Any:
    """A reader of renditions: an unpickler on a buffer it fills with each
    frame (the host renders frames of up to 64 KiB only)."""
    from _pickle import UnpicklingError
    from io import BytesIO

    buffer = BytesIO()
    unpickler = rendition_unpickler()(buffer)

    def read(frame: bytes, hook: Optional[TagHook]) -> Any:
        buffer.__init__(frame)  # (at its start, holding the frame: shared, not copied)
        unpickler.hook = hook
        try:
            return unpickler.load()
        except UnpicklingError as err:
            raise ProtocolError(f"malformed rendition of a frame: {err}") from None
        finally:
            unpickler.hook = None

    return read


# --------------------------------------------------------------------------
# Decoding budget
# --------------------------------------------------------------------------
#
# ``_estimate`` walks a frame's heads, making no objects, and adds up what
# decoding it costs in memory. It computes the same number as the compiled
# codec (host/src/protocol/budget.rs), so both refuse the same frames.
#
# What objects cost, in bytes: CPython 3.12+ on 64-bit, sys.getsizeof
# rounded up to 16 (pymalloc's size classes). Measured with sys.getsizeof on
# CPython 3.9-3.13 (x86-64): [] 56, () 40 + 8 per item, {} 64, {'a': 1} 184
# and {1: 1} 224 (3.11+; 232 both on 3.9 and 3.10), set() 216, '' 41 (3.12+;
# 49 before) + 1 per ASCII byte, b'' 33 + 1 per byte, bytearray() 56, 300
# 28, 2**60 36, 1.5 24, 1j 32. Cached singletons (None, True, False, ints
# -5..256, '' and one-character ASCII strings, b'' and one-byte bytes, ())
# cost nothing but the slot that holds them, which their container pays.

SANDBOX_BUDGET_FACTOR = 16
"""Bytes of decoded objects a sandboxed guest's frame may cost per byte of frame ..."""
SANDBOX_BUDGET_FLOOR = 8 << 20
"""... plus this many (8 MiB), so that small frames of any ordinary data fit."""


def sandbox_budget(frame_len: int) -> int:
    """The decoding budget of a frame of ``frame_len`` bytes from a sandboxed
    guest: ``loads(raw, hook, budget=sandbox_budget(len(raw)))``.

    ``SANDBOX_BUDGET_FACTOR * frame_len + SANDBOX_BUDGET_FLOOR`` bytes: ordinary
    data (records, lists of numbers or strings, nested tuples) costs 4-14
    times its frame; hostile shapes up to about 100 times (empty maps or
    lists 72, small sets 58-99). docs/protocol.md, "Decoding budget", has the
    measurements.
    """
    return SANDBOX_BUDGET_FACTOR * frame_len + SANDBOX_BUDGET_FLOOR


_COST_SLOT = 8  # a reference in a list or tuple (dict and set tables hold their own)
_COST_LIST = 64  # a list (56) without its slots
_COST_TUPLE = 40  # a non-empty tuple without its slots (one allocation with them)
_COST_DICT = 64  # an empty dict; a non-empty one adds its keys table (_dict_cost)
_COST_DICT_KEYS = 32  # the header of a keys table
_COST_DICT_ENTRY_STR = 16  # an entry of a table whose keys are all str (hash, value)
_COST_DICT_ENTRY = 24  # and of any other (hash, key, value)
_COST_SET = 224  # a set or frozenset (216) with 8 inline slots
_COST_SET_SLOT = 16  # a slot of a larger set table (another allocation)
_COST_INT = 32  # an int beyond the cache whose magnitude is below 2**60 (28 or 32)
_COST_INT_64 = 48  # and up to 2**64 (36)
_COST_BIGNUM_HEADER = 24  # a bignum: 24 + 4 per 30-bit digit, rounded (_bignum_cost)
_COST_FLOAT = 32
_COST_COMPLEX = 32
_COST_STR_HEADER = 41  # a str of 2+ bytes: 41 + its UTF-8 length, rounded (ASCII exactly)
_COST_BYTES_HEADER = 33  # a bytes of 2+ bytes: 33 + its length, rounded
_COST_BYTEARRAY = 64  # a bytearray (56); its buffer of length + 1 is another allocation
_COST_HOOK = 64  # what a tag hook makes of a kernel tag, on top of its content
_COST_CHUNK = 16  # each chunk of an indefinite-length string (two references while joining)


def _round16(n: int) -> int:
    return (n + 15) & ~15


def _dict_cost(n: int, str_keys: bool) -> int:
    """A dict of ``n`` entries as CPython builds it by inserting them: a table
    of ``size`` slots (a power of two, at least 8) holding ``2 * size // 3``
    entries, with 1, 2, 4 or 8 bytes of index per slot."""
    if n == 0:
        return _COST_DICT
    size = 8
    while size * 2 // 3 < n:
        size *= 2
    index = 1 if size <= 0x80 else 2 if size <= 0x8000 else 4 if size <= 0x80000000 else 8
    entry = _COST_DICT_ENTRY_STR if str_keys else _COST_DICT_ENTRY
    return _COST_DICT + _round16(_COST_DICT_KEYS + size * index + size * 2 // 3 * entry)


def _set_cost(n: int) -> int:
    """A set of ``n`` distinct items as CPython builds it by adding them: 8
    inline slots; when 3/5 of the table is used it moves to the smallest power
    of two above 4 (above 50,000 items: 2) times the items."""
    size = 8
    grow_at = -(-3 * (size - 1) // 5)
    while n >= grow_at:
        wanted = 2 * grow_at if grow_at > 50_000 else 4 * grow_at
        while size <= wanted:
            size *= 2
        grow_at = -(-3 * (size - 1) // 5)
    return _COST_SET if size == 8 else _COST_SET + size * _COST_SET_SLOT


def _bignum_cost(n: int) -> int:
    """A bignum whose magnitude has ``n`` bytes (one more bit for ``-1 - n``)."""
    return _round16(_COST_BIGNUM_HEADER + 4 * ((8 * n + 30) // 30))


def _int_cost(magnitude: int) -> int:
    return _COST_INT if magnitude < 1 << 60 else _COST_INT_64


class _Over(Exception):
    """The estimate passed the budget at offset ``args[0]``."""


class _Malformed(Exception):
    """The walk met malformed input: the decoder says what is wrong."""


# the cost and size of the items that follow from their initial byte alone
# (-1: read further): small ints, short strings, floats, false, true, null,
# empty lists and dicts
_FIXED_COST = [-1] * 256
_FIXED_SIZE = [0] * 256
for _ib in range(24):
    _FIXED_COST[_ib], _FIXED_SIZE[_ib] = 0, 1  # 0..23
    _FIXED_COST[0x20 | _ib], _FIXED_SIZE[0x20 | _ib] = (0 if _ib < 5 else _COST_INT), 1  # -1..-24
    _FIXED_COST[0x40 | _ib], _FIXED_SIZE[0x40 | _ib] = (
        (0 if _ib < 2 else _round16(_COST_BYTES_HEADER + _ib)),
        1 + _ib,
    )
    _FIXED_COST[0x60 | _ib], _FIXED_SIZE[0x60 | _ib] = (
        (0 if _ib < 2 else _round16(_COST_STR_HEADER + _ib)),
        1 + _ib,
    )
_FIXED_COST[0x18], _FIXED_SIZE[0x18] = 0, 2  # 24..255
# [] and {}: past MAX_DEPTH the decoder refuses them, which the walk needs not see
_FIXED_COST[0x80], _FIXED_SIZE[0x80] = _COST_LIST, 1
_FIXED_COST[0xA0], _FIXED_SIZE[0xA0] = _COST_DICT, 1
for _ib, _size in ((0xF4, 1), (0xF5, 1), (0xF6, 1)):
    _FIXED_COST[_ib], _FIXED_SIZE[_ib] = 0, _size
for _ib, _size in ((0xF9, 3), (0xFA, 5), (0xFB, 9)):
    _FIXED_COST[_ib], _FIXED_SIZE[_ib] = _COST_FLOAT, _size
del _ib, _size


def _estimate(data: bytes, budget: int) -> Optional[int]:
    """What decoding ``data`` costs, at most ``budget``; None if the walk met
    malformed input (the decoder then says what). Refuses a frame whose
    estimate passes the budget with ``ProtocolError``."""
    try:
        ib = data[0]
        cost = _FIXED_COST[ib]
        if cost >= 0:
            pos = _FIXED_SIZE[ib]
            if cost > budget:
                raise _Over(pos)
        else:
            cost, pos = _COSTS[ib >> 5](data, 1, ib, 0, budget)
    except _Over as over:
        raise ProtocolError(
            f"a frame of {len(data)} bytes would cost more than the decoding budget of {budget} bytes "
            f"of objects (the estimate passed it at offset {over.args[0]}); it was refused before "
            "decoding. The peer sent data that is costly to decode (many small containers, strings or "
            "numbers): send it in several smaller frames (calls), or packed as bytes or str"
        ) from None
    except _BlockUnderBudget:
        raise ProtocolError(
            f"a plain-data block (tag {PLAIN}) is decoded under a decoding budget by the compiled codec only"
        ) from None
    except (_Malformed, ProtocolError, IndexError, _StructError):
        return None
    return cost if pos == len(data) else None


class _BlockUnderBudget(Exception):
    """A plain-data block met by the budget's walk: only the compiled codec
    (which decodes what guests send) estimates them."""


def _cost_uint(data: bytes, pos: int, ib: int, depth: int, left: int) -> Tuple[int, int]:
    n, pos = _argument(data, pos, ib)
    if n < 0:
        raise _Malformed
    cost = 0 if n <= 256 else _int_cost(n)
    if cost > left:
        raise _Over(pos)
    return cost, pos


def _cost_nint(data: bytes, pos: int, ib: int, depth: int, left: int) -> Tuple[int, int]:
    n, pos = _argument(data, pos, ib)
    if n < 0:
        raise _Malformed
    cost = 0 if n < 5 else _int_cost(n + 1)
    if cost > left:
        raise _Over(pos)
    return cost, pos


def _skip_string(data: bytes, pos: int, ib: int, major: int) -> Tuple[int, int, int]:
    """The length and number of chunks (0: definite) of the string whose head
    starts with ``ib``, and the offset after it."""
    n, pos = _argument(data, pos, ib)
    end = len(data)
    if n >= 0:
        if n > end - pos:
            raise _Malformed
        return n, 0, pos + n
    total = chunks = 0
    while True:
        ib = data[pos]
        if ib == 0xFF:
            return total, chunks, pos + 1
        if ib >> 5 != major or ib & 0x1F == 31:
            raise _Malformed
        n, pos = _argument(data, pos + 1, ib)
        if n > end - pos:
            raise _Malformed
        pos += n
        total += n
        chunks += 1


def _cost_bytes(data: bytes, pos: int, ib: int, depth: int, left: int) -> Tuple[int, int]:
    n, chunks, pos = _skip_string(data, pos, ib, 2)
    if n <= 1 and ib & 0x1F != 31:
        return 0, pos
    cost = _round16(_COST_BYTES_HEADER + n) + chunks * _COST_CHUNK
    if cost > left:
        raise _Over(pos)
    return cost, pos


def _cost_text(data: bytes, pos: int, ib: int, depth: int, left: int) -> Tuple[int, int]:
    n, chunks, pos = _skip_string(data, pos, ib, 3)
    if n <= 1 and ib & 0x1F != 31:
        return 0, pos
    cost = _round16(_COST_STR_HEADER + n) + chunks * _COST_CHUNK
    if cost > left:
        raise _Over(pos)
    return cost, pos


_LIST, _TUPLE, _SET = 0, 1, 2


def _cost_array(data: bytes, pos: int, ib: int, depth: int, left: int, kind: int = _LIST) -> Tuple[int, int]:
    """An array (``ib`` its initial byte) as a list, or as the content of a
    tuple or a set (``kind``); ``depth`` does not count it yet."""
    if depth >= MAX_DEPTH:
        raise _Malformed
    n, pos = _argument(data, pos, ib)
    depth += 1
    slot = 0 if kind == _SET else _COST_SLOT
    fixed_cost = _FIXED_COST
    costs = _COSTS
    if n < 0:
        cost = _COST_LIST if kind == _LIST else _COST_TUPLE if kind == _TUPLE else 0
        count = 0
        while True:
            ib = data[pos]
            if ib == 0xFF:
                pos += 1
                break
            c = fixed_cost[ib]
            if c >= 0:
                pos += _FIXED_SIZE[ib]
                cost += c + slot
            else:
                c, pos = costs[ib >> 5](data, pos + 1, ib, depth, left - cost - slot)
                cost += c + slot
            if cost > left:
                raise _Over(pos)
            count += 1
        if kind == _SET:
            cost += _set_cost(count)
        if cost > left:
            raise _Over(pos)
        return cost, pos
    if n > len(data) - pos:
        raise _Malformed
    if kind == _LIST:
        cost = _COST_LIST + n * _COST_SLOT
    elif kind == _TUPLE:
        cost = _COST_TUPLE + n * _COST_SLOT if n else 0
    else:
        cost = _set_cost(n)
    if cost > left:
        raise _Over(pos)
    for _ in range(n):
        ib = data[pos]
        c = fixed_cost[ib]
        if c >= 0:
            pos += _FIXED_SIZE[ib]
        elif ib == 0x19 or ib == 0x39:  # ints of 16 and 32 bits (what _cost_uint/_cost_nint do)
            c = 0 if (data[pos + 1] << 8) | data[pos + 2] <= (256 if ib == 0x19 else 4) else _COST_INT
            pos += 3
        elif ib == 0x1A or ib == 0x3A:
            c = 0 if _unpack_from_I(data, pos + 1)[0] <= (256 if ib == 0x1A else 4) else _COST_INT
            pos += 5
        elif (
            ib == 0xD9
            and data[pos + 1] == 0x9C
            and data[pos + 2] == 0x41
            and data[pos + 3] >> 5 == 4
            and depth < MAX_DEPTH
        ):
            # a tuple (what _cost_tag does, without its calls)
            c, pos = _cost_array(data, pos + 4, data[pos + 3], depth + 1, left - cost, _TUPLE)
        else:
            c, pos = costs[ib >> 5](data, pos + 1, ib, depth, left - cost)
        if c:
            cost += c
            if cost > left:
                raise _Over(pos)
    return cost, pos


def _cost_map(data: bytes, pos: int, ib: int, depth: int, left: int) -> Tuple[int, int]:
    """A map: its table is charged for str keys when its head gives its
    length, and the difference at its first key of another type."""
    if depth >= MAX_DEPTH:
        raise _Malformed
    n, pos = _argument(data, pos, ib)
    depth += 1
    fixed_cost = _FIXED_COST
    costs = _COSTS
    str_keys = True
    if n < 0:
        cost = count = 0
        while True:
            ib = data[pos]
            if ib == 0xFF:
                pos += 1
                break
            if ib >> 5 != 3:
                str_keys = False
            for _ in (0, 1):  # key, value
                ib = data[pos]
                c = fixed_cost[ib]
                if c >= 0:
                    pos += _FIXED_SIZE[ib]
                else:
                    c, pos = costs[ib >> 5](data, pos + 1, ib, depth, left - cost)
                cost += c
                if cost > left:
                    raise _Over(pos)
            count += 1
        cost += _dict_cost(count, str_keys)
        if cost > left:
            raise _Over(pos)
        return cost, pos
    if 2 * n > len(data) - pos:
        raise _Malformed
    cost = _dict_cost(n, True)
    if cost > left:
        raise _Over(pos)
    for _ in range(n):
        if str_keys and data[pos] >> 5 != 3:
            str_keys = False
            cost += _dict_cost(n, False) - _dict_cost(n, True)
            if cost > left:
                raise _Over(pos)
        for _ in (0, 1):  # key, value
            ib = data[pos]
            c = fixed_cost[ib]
            if c >= 0:
                pos += _FIXED_SIZE[ib]
            else:
                c, pos = costs[ib >> 5](data, pos + 1, ib, depth, left - cost)
            if c:
                cost += c
                if cost > left:
                    raise _Over(pos)
    return cost, pos


_FLOAT_SIZE = {0xF9: 3, 0xFA: 5, 0xFB: 9}


def _complex_shape(data: bytes, pos: int) -> int:
    """The size of a complex number's content at ``pos`` when it has the shape
    the encoders write (0x82 and two floats of any width), else 0."""
    if pos >= len(data) or data[pos] != 0x82 or pos + 1 >= len(data):
        return 0
    re = _FLOAT_SIZE.get(data[pos + 1], 0)
    if not re or pos + 1 + re >= len(data):
        return 0
    im = _FLOAT_SIZE.get(data[pos + 1 + re], 0)
    if not im or pos + 1 + re + im > len(data):
        return 0
    return 1 + re + im


def _cost_tag(data: bytes, pos: int, ib: int, depth: int, left: int) -> Tuple[int, int]:
    if depth >= MAX_DEPTH:
        raise _Malformed
    tag, pos = _argument(data, pos, ib)
    if tag < 0:
        raise _Malformed
    depth += 1
    if tag == PLAIN:
        raise _BlockUnderBudget
    if tag == TUPLE or tag == SET or tag == FROZENSET:
        ib = data[pos]
        if ib >> 5 != 4:
            raise _Malformed
        return _cost_array(data, pos + 1, ib, depth, left, _TUPLE if tag == TUPLE else _SET)
    if tag == COMPLEX:
        size = _complex_shape(data, pos)
        if size:
            cost = _COST_COMPLEX
            pos += size
        else:
            # not two floats: the decoder makes the array, then refuses it
            ib = data[pos]
            if ib >> 5 != 4:
                raise _Malformed
            cost, pos = _cost_array(data, pos + 1, ib, depth, left)
            cost += _COST_COMPLEX
    elif tag == POS_BIGNUM or tag == NEG_BIGNUM or tag == BYTEARRAY or tag == SURROGATE_STR:
        ib = data[pos]
        if ib >> 5 != 2:
            raise _Malformed
        n, chunks, pos = _skip_string(data, pos + 1, ib, 2)
        if tag == BYTEARRAY:
            cost = _COST_BYTEARRAY + (_round16(n + 1) if n else 0)
        elif tag == SURROGATE_STR:  # the str, and the bytes it is decoded from
            cost = _round16(_COST_STR_HEADER + n) + _round16(_COST_BYTES_HEADER + n)
        else:
            cost = _bignum_cost(n)
        cost += chunks * _COST_CHUNK
    else:
        ib = data[pos]
        cost = _FIXED_COST[ib]
        if cost >= 0:
            pos += _FIXED_SIZE[ib]
        else:
            cost, pos = _COSTS[ib >> 5](data, pos + 1, ib, depth, left)
        cost += _COST_HOOK
    if cost > left:
        raise _Over(pos)
    return cost, pos


def _cost_simple(data: bytes, pos: int, ib: int, depth: int, left: int) -> Tuple[int, int]:
    # false, true, null and floats are in _FIXED_COST; the rest is refused by the decoder
    raise _Malformed


_COSTS: Tuple[_Coster, ...] = (
    _cost_uint,
    _cost_nint,
    _cost_bytes,
    _cost_text,
    _cost_array,
    _cost_map,
    _cost_tag,
    _cost_simple,
)


# -- the header of a message -------------------------------------------------------

_PEEK_WIDTHS = {24: 1, 25: 2, 26: 4, 27: 8}


def _peek_argument(data: Any, pos: int) -> Tuple[Optional[int], int]:
    """The argument of the head at ``pos`` and the position after it; None
    for a truncated head, reserved additional information or an indefinite length."""
    info = data[pos] & 0x1F
    if info < 24:
        return info, pos + 1
    width = _PEEK_WIDTHS.get(info)
    if width is None or pos + 1 + width > len(data):
        return None, pos
    return int.from_bytes(data[pos + 1 : pos + 1 + width], "big"), pos + 1 + width


def peek(frame: Any) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """``(kind, id, chain)`` of a message frame, read without decoding it or
    running anything (a message is an array ``[kind, id, chain, ...]``,
    docs/protocol.md). A field is None where the array ends before it or it
    (or a field before it) is not an unsigned integer; all three are None
    when the frame is not an array, or when the head of one of those
    integers is cut short or reserved. Any head width and indefinite lengths are
    read, as the decoders read them (host/src/protocol/header.rs is the same)."""
    if type(frame) is not bytes and type(frame) is not bytearray:
        frame = bytes(frame)  # a Frame received by the compiled host, or a memoryview
    end = len(frame)
    if _renditions and end > 20 and frame[0] == 0x80 and frame[1] == 5:  # (a guest: first)
        kind, has, key, chain = _unpack_trailer(frame, end - 18)
        return kind, (key if has & 1 else None), (chain if has & 2 else None)
    if end > 3 and 0x83 <= frame[0] < 0x98 and frame[1] < 24:
        # every message: three fields or more, its kind small, its id a head
        # of up to 5 bytes, its chain (or a reply's value) small or 8 bytes
        ib = frame[2]
        if ib < 24:
            key, pos = ib, 3
        elif ib == 0x18:
            key, pos = frame[3], 4
        elif ib == 0x19 and end > 5:
            key, pos = (frame[3] << 8) | frame[4], 5
        elif ib == 0x1A and end > 7:
            key, pos = _unpack_from_I(frame, 3)[0], 7
        else:
            return _peek_fields(frame, 1, 3)
        if pos < end:
            ib = frame[pos]
            if ib < 24:
                return frame[1], key, ib
            if ib == 0x1B and pos + 8 < end:
                return frame[1], key, _unpack_from_Q(frame, pos + 1)[0]
            if ib >= 0x20:  # not an unsigned integer (a reply's value)
                return frame[1], key, None
        return _peek_fields(frame, 1, 3)
    if not end or frame[0] >> 5 != 4:
        return None, None, None
    if frame[0] < 0x98:  # 0 to 23 items
        count, pos = frame[0] & 0x1F, 1
    elif frame[0] == 0x9F:  # indefinite length: up to a break
        count, pos = 3, 1
    else:
        count, pos = _peek_argument(frame, 0)
        if count is None:
            return None, None, None
    return _peek_fields(frame, pos, min(count, 3))


def _peek_fields(frame: Any, pos: int, wanted: int) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """The first ``wanted`` (at most 3) fields of the array whose items start
    at ``pos``, without a call per field: it runs for every frame a guest or
    a PyPy twin receives."""
    end = len(frame)
    fields: List[Optional[int]] = [None, None, None]
    for i in range(wanted):
        if pos >= end:
            break
        ib = frame[pos]
        if ib < 24:
            fields[i] = ib
            pos += 1
        elif ib == 0x18 and pos + 1 < end:
            fields[i] = frame[pos + 1]
            pos += 2
        elif ib == 0x19 and pos + 2 < end:
            fields[i] = _unpack_from_H(frame, pos + 1)[0]
            pos += 3
        elif ib == 0x1A and pos + 4 < end:
            fields[i] = _unpack_from_I(frame, pos + 1)[0]
            pos += 5
        elif ib == 0x1B and pos + 8 < end:
            fields[i] = _unpack_from_Q(frame, pos + 1)[0]
            pos += 9
        elif ib < 0x20:  # an integer's head cut short or reserved: not a message
            return None, None, None
        else:  # not an unsigned integer (or the end of an indefinite array): it and what follows are not read
            break
    return fields[0], fields[1], fields[2]
