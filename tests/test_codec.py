"""The two codecs of the value model: the pure-Python one and the compiled one.

Both are checked against the shared vectors in tests/vectors/ (which the
Rust value model is checked against too, in host/tests/vectors.rs), against
each other on a seeded random corpus, and for their limits and hooks. No
twin processes are started here.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import gc
import json
import math
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
from cpy2py.errors import NestedTooDeep, ProtocolError, SharedParts
from cpy2py.protocol import codec_py, tags
from cpy2py.protocol.tags import MAX_DEPTH

VECTORS = Path(__file__).parent / "vectors"
VALID = json.loads((VECTORS / "values.json").read_text(encoding="utf-8"))
INVALID = json.loads((VECTORS / "invalid.json").read_text(encoding="utf-8"))


def _compiled() -> Any:
    try:
        from cpy2py import _host
    except ImportError as e:
        pytest.skip(f"the compiled codec cpy2py._host is not built for this interpreter ({e})")
    return _host


@pytest.fixture(params=["pure", "compiled"])
def codec(request: pytest.FixtureRequest) -> Any:
    return codec_py if request.param == "pure" else _compiled()


# --------------------------------------------------------------------------
# The references of the kernel (tags 40010-40013), as small marker classes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalRef:
    module: str
    qualname: str


@dataclass(frozen=True)
class ExceptionRef:
    type: GlobalRef
    args: tuple
    traceback: Optional[str]


@dataclass(frozen=True)
class TwinRef:
    owner: str
    instance: int
    cls: Any  # a GlobalRef, or a description [type name, [specials], ([methods])]


@dataclass(frozen=True)
class PickleRef:
    data: bytes


def default(obj: Any) -> Any:
    if type(obj) is GlobalRef:
        return tags.GLOBAL_REF, [obj.module, obj.qualname]
    if type(obj) is ExceptionRef:
        return tags.EXCEPTION, [obj.type, list(obj.args), obj.traceback]
    if type(obj) is TwinRef:
        return tags.TWIN_REF, [obj.owner, obj.instance, obj.cls]
    if type(obj) is PickleRef:
        return tags.PICKLE, obj.data
    return NotImplemented


def tag_hook(tag: int, value: Any) -> Any:
    if tag == tags.GLOBAL_REF and type(value) is list and len(value) == 2:
        return GlobalRef(*value)
    if tag == tags.EXCEPTION and type(value) is list and len(value) == 3:
        return ExceptionRef(value[0], tuple(value[1]), value[2])
    if tag == tags.TWIN_REF and type(value) is list and len(value) == 3:
        return TwinRef(*value)
    if tag == tags.PICKLE and type(value) is bytes:
        return PickleRef(value)
    raise ProtocolError(f"unknown CBOR tag {tag}")


def meaning(m: dict) -> Any:
    """The Python object a vector's language-neutral meaning stands for."""
    ((kind, v),) = m.items()
    if kind == "none":
        return None
    if kind == "bool":
        return v
    if kind == "int":
        n = int(v)
        assert -(2**64) <= n < 2**64, "ints beyond 64 bits are bigints in the vectors"
        return n
    if kind == "bigint":
        n = int.from_bytes(bytes.fromhex(v[1]), "big")
        return n if v[0] == "+" else -1 - n
    if kind == "float":
        return float(v)
    if kind == "str":
        return v
    if kind == "bytes":
        return bytes.fromhex(v)
    if kind == "surrogate_str":
        return bytes.fromhex(v).decode("utf-8", "surrogatepass")
    if kind == "list":
        return [meaning(x) for x in v]
    if kind == "dict":
        return {meaning(k): meaning(x) for k, x in v}
    if kind == "tuple":
        return tuple(meaning(x) for x in v)
    if kind == "set":
        return {meaning(x) for x in v}
    if kind == "frozenset":
        return frozenset(meaning(x) for x in v)
    if kind == "complex":
        return complex(float(v[0]), float(v[1]))
    if kind == "bytearray":
        return bytearray.fromhex(v)
    if kind == "global":
        return GlobalRef(*v)
    if kind == "exception":
        return ExceptionRef(GlobalRef(*v["type"]), tuple(meaning(a) for a in v["args"]), v["traceback"])
    if kind == "twin_ref":
        cls = v[2]["described"] if isinstance(v[2], dict) else None if v[2] is None else GlobalRef(*v[2])
        return TwinRef(v[0], v[1], cls)
    if kind == "pickle":
        return PickleRef(bytes.fromhex(v))
    raise AssertionError(f"unknown meaning kind {kind!r}")


def same(a: Any, b: Any) -> bool:
    """Equality that also compares exact types, float bits and order."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return struct.pack(">d", a) == struct.pack(">d", b) or (math.isnan(a) and math.isnan(b))
    if type(a) is complex:
        return same(a.real, b.real) and same(a.imag, b.imag)
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return len(a) == len(b) and all(
            same(k1, k2) and same(v1, v2) for (k1, v1), (k2, v2) in zip(a.items(), b.items())
        )
    if type(a) is ExceptionRef:
        return a.type == b.type and same(a.args, b.args) and a.traceback == b.traceback
    return a == b


def _ids(vectors: List[dict]) -> List[str]:
    return [v["name"] for v in vectors]


# --------------------------------------------------------------------------
# Shared vectors
# --------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_vector_decodes_to_its_meaning(codec: Any, vector: dict) -> None:
    decoded = codec.loads(bytes.fromhex(vector["cbor"]), tag_hook)
    expected = meaning(vector["value"])
    assert same(decoded, expected), f"{decoded!r} != {expected!r}"


ENCODABLE = [v for v in VALID if not v.get("decode_only")]


@pytest.mark.parametrize("vector", ENCODABLE, ids=_ids(ENCODABLE))
def test_vector_meaning_encodes_to_its_bytes(codec: Any, vector: dict) -> None:
    assert codec.dumps(meaning(vector["value"]), default).hex() == vector["cbor"]


@pytest.mark.parametrize("vector", INVALID, ids=_ids(INVALID))
def test_invalid_vector_is_refused(codec: Any, vector: dict) -> None:
    data = bytes.fromhex(vector["cbor"])
    with pytest.raises(ProtocolError):
        codec.loads(data)
    with pytest.raises(ProtocolError):
        codec.loads(data, tag_hook)


def test_vectors_cover_the_value_model() -> None:
    kinds = set()

    def walk(m: Any) -> None:
        if isinstance(m, dict) and len(m) == 1:
            ((kind, v),) = m.items()
            kinds.add(kind)
            if kind in ("list", "tuple", "set", "frozenset"):
                for x in v:
                    walk(x)
            elif kind == "dict":
                for k, x in v:
                    walk(k)
                    walk(x)

    for vector in VALID:
        walk(vector["value"])
    assert kinds >= {
        "none", "bool", "int", "bigint", "float", "str", "bytes", "list", "dict", "tuple", "set",
        "frozenset", "complex", "bytearray", "global", "exception", "twin_ref", "pickle",
        "surrogate_str",
    }  # fmt: skip
    assert len({v["name"] for v in VALID}) == len(VALID)
    assert len({v["name"] for v in INVALID}) == len(INVALID)


# --------------------------------------------------------------------------
# Pure and compiled agree
# --------------------------------------------------------------------------


def _random_float(rnd: random.Random) -> float:
    width = rnd.choice("edde f")
    if width == " ":
        return rnd.choice([0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, 0.1, 65504.0, 1e300, 5e-324])
    bits = rnd.getrandbits({"e": 16, "f": 32, "d": 64}[width])
    return struct.unpack(">" + width, bits.to_bytes(struct.calcsize(width), "big"))[0]


def _random_int(rnd: random.Random) -> int:
    choice = rnd.randrange(6)
    if choice == 0:
        return rnd.randrange(-30, 30)
    if choice == 1:
        edge = rnd.choice([24, 256, 65536, 2**32, 2**63, 2**64, 2**128])
        return rnd.choice([1, -1]) * edge + rnd.randrange(-2, 2)
    if choice == 2:
        return rnd.getrandbits(rnd.randrange(1, 64)) * rnd.choice([1, -1])
    return rnd.getrandbits(rnd.randrange(60, 700)) * rnd.choice([1, -1])


_ALPHABETS = [
    "abcxyz",
    "äöüßé",
    "\u6c34\u706b\u98a8",
    "\U0001f600\U0001f680\U00010151",
    '\x00\x7f\n\t"',
    "\udc80\ud800\udfff",  # lone surrogates (os.fsdecode of a name that is not UTF-8)
]


def _random_str(rnd: random.Random) -> str:
    alphabet = "".join(rnd.sample(_ALPHABETS, 2))
    return "".join(rnd.choice(alphabet) for _ in range(rnd.choice([0, 1, 5, 23, 24, 40, 300])))


def _random_key(rnd: random.Random) -> Any:
    return rnd.choice([
        lambda: _random_int(rnd),
        lambda: _random_str(rnd),
        lambda: _random_float(rnd),
        lambda: rnd.randbytes(3) if hasattr(rnd, "randbytes") else b"abc",
        lambda: None,
        lambda: rnd.random() < 0.5,
        lambda: (_random_int(rnd), _random_str(rnd)),
        lambda: frozenset({_random_int(rnd), _random_int(rnd)}),
    ])()  # fmt: skip


def _random_value(rnd: random.Random, depth: int = 0) -> Any:
    scalars = [
        lambda: None,
        lambda: rnd.random() < 0.5,
        lambda: _random_int(rnd),
        lambda: _random_float(rnd),
        lambda: _random_str(rnd),
        lambda: bytes(rnd.getrandbits(8) for _ in range(rnd.choice([0, 3, 24, 300]))),
        lambda: complex(_random_float(rnd), _random_float(rnd)),
        lambda: bytearray(b"\x00\xff" * rnd.randrange(4)),
    ]
    containers = [
        lambda: [_random_value(rnd, depth + 1) for _ in range(rnd.randrange(6))],
        lambda: tuple(_random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))),
        lambda: {_random_key(rnd): _random_value(rnd, depth + 1) for _ in range(rnd.randrange(5))},
        lambda: {_random_key(rnd) for _ in range(rnd.randrange(5))},
        lambda: frozenset(_random_key(rnd) for _ in range(rnd.randrange(5))),
    ]
    if depth < 5 and rnd.random() < 0.4:
        return rnd.choice(containers)()
    return rnd.choice(scalars)()


def _canon(v: Any) -> Any:
    """A hashable, NaN-proof stand-in for a value: equal iff the values are the same."""
    t = type(v)
    if t is float:
        return ("float", "nan" if math.isnan(v) else struct.pack(">d", v))
    if t is complex:
        return ("complex", _canon(v.real), _canon(v.imag))
    if t in (list, tuple):
        return (t.__name__,) + tuple(_canon(x) for x in v)
    if t is dict:
        return ("dict",) + tuple((_canon(k), _canon(x)) for k, x in v.items())
    if t in (set, frozenset):
        return (t.__name__, frozenset(_canon(x) for x in v))
    if t is bytearray:
        return ("bytearray", bytes(v))
    return (t.__name__, v)


def test_pure_and_compiled_write_identical_bytes() -> None:
    compiled = _compiled()
    rnd = random.Random(20240601)
    for i in range(1500):
        value = _random_value(rnd)
        pure = codec_py.dumps(value)
        assert compiled.dumps(value) == pure, f"value #{i}: {value!r}"
        from_pure = codec_py.loads(pure)
        from_compiled = compiled.loads(pure)
        assert _canon(from_pure) == _canon(from_compiled) == _canon(value), f"value #{i}: {value!r}"


_REPLY_KEYS = [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -1, True, 1.0]
_REPLY_VALUES = [None, True, False, 0, 23, 24, -1, 1.5, 2**70, "x", b""]


def test_a_small_reply_is_the_bytes_dumps_writes() -> None:
    """The pure codec's replies of scalars in one go (``small_reply``, what a
    guest's kernel sends a no-op's reply with): the compiled codec's bytes
    for the same message, and None for whatever it does not write itself."""
    compiled = _compiled()
    written = 0
    for kind in (0, 1, 2, 3, 23, 24, -1, True):
        for key in _REPLY_KEYS:
            for value in [*_REPLY_VALUES, Color.RED]:  # (an int subclass is not an int here)
                got = codec_py.small_reply(kind, key, value)
                small = (
                    type(kind) is int
                    and type(key) is int
                    and 0 <= kind < 24
                    and 0 <= key < 2**32
                    and (value is None or type(value) is bool or (type(value) is int and 0 <= value < 24))
                )
                if not small:
                    assert got is None, (kind, key, value)
                    continue
                assert got == compiled.dumps([kind, key, value]), (kind, key, value)
                written += 1
    assert written == 5 * 8 * 5  # (every small one was written in one go)


def test_large_encodings_at_once_and_nested_come_out_whole() -> None:
    """The compiled codec keeps the buffer of its last large encoding for the
    next one (docs/architecture.md, "Large payloads"): encodings from many
    threads at once, and one started by a ``default`` hook inside another,
    must each get a buffer of their own."""
    import threading

    compiled = _compiled()
    payloads = [bytes([i]) * (300_000 + 4096 * i) for i in range(8)]

    class Inner:
        pass

    def default(obj: Any) -> Any:  # encodes a large value while the outer encoding is half done
        return tags.TUPLE, [compiled.dumps([payloads[7]])]

    outer = [payloads[6], Inner(), payloads[5]]
    expected_outer = codec_py.dumps([payloads[6], (codec_py.dumps([payloads[7]]),), payloads[5]])
    assert compiled.dumps(outer, default) == expected_outer
    failures: List[str] = []

    def encode_many(i: int) -> None:
        for _ in range(30):
            if compiled.dumps([i, payloads[i]]) != codec_py.dumps([i, payloads[i]]):
                failures.append(f"thread {i}")
                return

    threads = [threading.Thread(target=encode_many, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_random_values_round_trip(codec: Any) -> None:
    rnd = random.Random(7)
    for i in range(500):
        value = _random_value(rnd)
        assert _canon(codec.loads(codec.dumps(value))) == _canon(value), f"value #{i}: {value!r}"


def test_random_bytes_never_crash_the_decoders() -> None:
    """Mutated valid frames either decode identically in both codecs or fail in both."""
    codecs = [codec_py]
    try:
        from cpy2py import _host

        codecs.append(_host)
    except ImportError:
        pass
    rnd = random.Random(99)
    for i in range(3000):
        frame = bytearray(codec_py.dumps(_random_value(rnd)))
        for _ in range(rnd.randrange(1, 4)):
            pos = rnd.randrange(len(frame))
            action = rnd.randrange(3)
            if action == 0:
                frame[pos] = rnd.getrandbits(8)
            elif action == 1:
                del frame[pos:]
            else:
                frame.insert(pos, rnd.getrandbits(8))
            if not frame:
                frame.append(0xFF)
        outcomes = []
        for c in codecs:
            try:
                outcomes.append(("ok", codec_py.dumps(c.loads(bytes(frame)))))
            except ProtocolError:
                outcomes.append(("error", None))
        assert all(o == outcomes[0] for o in outcomes), f"frame #{i} {bytes(frame).hex()}: {outcomes}"


def _records() -> List[Any]:
    """Maps whose keys repeat, in a frame large enough for the compiled
    decoder's table of keys (host/src/python/map_keys.rs): rows of the same
    field names (ASCII, other scripts, 23 bytes: the longest short text, 24:
    the shortest that is not), keys of other types among them, then
    thousands of distinct keys (the table is given up) and the first names
    again. Their values are of every kind a map's value is decoded
    inline as (ints of each width, short text, true, false, null, doubles)
    and of some that are not (negative ints, half and single floats, long
    text, bytes)."""
    names = ["id", "name", "clé", "ключ", "k" * 23, "k" * 24, "ké" * 11 + "k"]
    rows: List[Any] = [{name: i * 10 + j for j, name in enumerate(names)} for i in range(400)]
    kinds = [7, 200, 60_000, 2**31, -5, "short", "long " * 9, True, False, None, 0.1, 1.5, 3.4e38, b"xy"]
    rows += [{"id": i, "value": kinds[i % len(kinds)], "ok": i % 2 == 0} for i in range(len(kinds) * 3)]
    rows += [{1: "one", (2, 3): "pair", b"raw": None, "id": i, 2.5: True} for i in range(50)]
    rows.append({f"field{i}": i for i in range(5000)})
    rows += [{"id": i, "name": f"n{i}", "key0": [], "key1": {}} for i in range(100)]
    shared = {"id": -1, "name": "held twice"}  # (the frame then holds shared values too)
    return rows + [shared, shared]


@pytest.fixture(params=[False, True], ids=["as-they-come", "key-tables"])
def key_tables(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The pure codec decodes a large frame's keys through a table on PyPy
    only (``codec_py._KEY_TABLES``): both ways, whatever runs the tests."""
    monkeypatch.setattr(codec_py, "_KEY_TABLES", request.param)
    return bool(request.param)


def test_maps_whose_keys_repeat_decode_whole(codec: Any, key_tables: bool) -> None:
    rows = _records()
    frame = codec.dumps(rows)
    back = codec.loads(frame)
    assert back == rows
    assert [type(k) for k in back[400 + 42]] == [int, tuple, bytes, str, float]
    assert codec_py.loads(frame) == rows  # (the other codec agrees)


def test_a_repeated_key_with_bad_utf8_is_refused(codec: Any, key_tables: bool) -> None:
    """A key of the same length as one seen before, but not UTF-8: refused,
    not taken for the other (nor the other for it)."""
    good = codec_py.dumps([{"abc": i} for i in range(600)])
    last = good.rindex(b"\x63abc")  # text of 3 bytes, the last row's key
    frame = good[:last] + b"\x63ab\xff" + good[last + 4 :]  # (a byte no UTF-8 has)
    with pytest.raises(ProtocolError, match="UTF-8"):
        codec.loads(frame)


def test_large_frames_of_repeated_keys_mutated_fail_alike_in_both_codecs(key_tables: bool) -> None:
    """Large frames of rows with repeated keys, with bytes changed: both
    codecs decode the same value or both refuse."""
    compiled = _compiled()
    rnd = random.Random(5)
    original = codec_py.dumps([{"id": i, "name": "x" * (i % 30), "ok": i % 2 == 0} for i in range(300)])
    for i in range(300):
        frame = bytearray(original)
        for _ in range(rnd.randrange(1, 4)):
            frame[rnd.randrange(len(frame))] = rnd.getrandbits(8)
        outcomes = []
        for c in (codec_py, compiled):
            try:
                outcomes.append(("ok", codec_py.dumps(c.loads(bytes(frame)))))
            except ProtocolError:
                outcomes.append(("error", None))
        assert outcomes[0] == outcomes[1], f"mutation #{i}: {outcomes}"


# --------------------------------------------------------------------------
# Sizes and limits
# --------------------------------------------------------------------------


def test_parts_leave_large_byte_strings_out_of_the_encoding(codec: Any) -> None:
    """``dumps(..., parts=True)``: both codecs give a frame that holds byte
    strings of at least 64 KiB as a tuple of its parts, those byte strings
    among them as the very objects (not copies). Joined, the parts are the
    encoding."""
    big, other = b"a" * (64 * 1024), bytes(range(256)) * 1024
    value = [1, big, {"k": other, "small": b"s" * (64 * 1024 - 1)}, bytearray(big), (big,)]
    parts = codec.dumps(value, parts=True)
    assert type(parts) is tuple and b"".join(parts) == codec.dumps(value) == codec_py.dumps(value)
    assert [p for p in parts if p is big or p is other] == [big, other, big]
    copied = b"".join(p for p in parts if p is not big and p is not other)
    assert bytes(big) in copied, "a bytearray (which may change) is copied into the encoding"
    assert codec.loads(b"".join(parts)) == value
    assert codec.dumps([b"a" * 100, 2], parts=True) == codec.dumps([b"a" * 100, 2])
    assert codec.dumps(big, parts=True) == (b"\x5a\x00\x01\x00\x00", big)
    # wherever it sits (a set's member, a dict's key, after a tag), a part
    # is left out at its own place: joined, the parts are the encoding
    keyed = [{other: 1}, frozenset({big}), {2: big}, 3]
    pieces = codec.dumps(keyed, parts=True)
    assert type(pieces) is tuple and b"".join(pieces) == codec.dumps(keyed) == codec_py.dumps(keyed)
    assert codec.loads(b"".join(pieces)) == keyed


def test_a_transport_writes_a_frame_of_parts_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """``FdTransport.send`` takes a tuple of parts and writes them with
    writev, going on where a short write stopped; the reader gets one frame."""
    import os
    import threading

    from cpy2py.protocol import transport as transport_module

    real_writev = os.writev

    def short_writev(fd: int, views: list) -> int:
        """os.writev, of at most 7000 bytes of at most 3 parts (as a pipe
        with little room, or a signal, would have it)."""
        room, cut = 7000, []
        for view in views[:3]:
            cut.append(view[:room])
            room -= len(cut[-1])
        return real_writev(fd, cut)

    monkeypatch.setattr(transport_module, "_writev", short_writev)
    parts = tuple(bytes([i]) * (i * 5003 % 70_000) for i in range(1, 150))  # more than one writev takes
    read_fd, write_fd = os.pipe()
    out = transport_module.FdTransport(read_fd, write_fd)
    got = []
    reader = threading.Thread(target=lambda: got.append(out.recv()))
    reader.start()
    try:
        out.send(parts)
    finally:
        reader.join(30)
        out.close()
    assert bytes(got[0]) == b"".join(parts)


def test_a_transport_finishes_a_small_frame_the_pipe_took_part_of(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small frame goes out in one write; where the pipe takes only part of
    it (nearly full), the rest follows, and the reader gets it whole."""
    import os

    from cpy2py.protocol import transport as transport_module

    real_write = os.write
    monkeypatch.setattr(transport_module.os, "write", lambda fd, data: real_write(fd, bytes(data)[:100]))
    read_fd, write_fd = os.pipe()
    out = transport_module.FdTransport(read_fd, write_fd)
    try:
        out.send(b"s" * 1000)
        monkeypatch.undo()
        assert bytes(out.recv()) == b"s" * 1000
    finally:
        out.close()


@pytest.mark.parametrize(
    "cuts",
    [
        pytest.param(None, id="each-frame-whole"),
        pytest.param([], id="all-in-one-write"),
        pytest.param([2], id="header-split"),
        pytest.param([4, 9], id="header-then-body"),
        pytest.param([9, 17, 330], id="bodies-split"),
    ],
)
def test_a_transport_reads_frames_however_they_arrive(cuts: Optional[List[int]]) -> None:
    """``FdTransport.recv`` takes a frame that came whole in one read at once;
    frames that come together, or in pieces (written apart by another thread),
    come out the same, one at a time; the end of the stream is None."""
    import os
    import threading
    import time

    from cpy2py.protocol.transport import FdTransport

    frames = [b"first", b"x" * 300, b"\x00", b"last frame"]
    stream = b"".join(struct.pack(">I", len(f)) + f for f in frames)
    read_fd, write_fd = os.pipe()
    transport = FdTransport(read_fd, -1)
    got = []
    try:
        if cuts is None:  # one write per frame, read before the next is written
            for frame in frames:
                os.write(write_fd, struct.pack(">I", len(frame)) + frame)
                got.append(transport.recv())
                assert not transport.buffered()
            os.close(write_fd)
        else:
            pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]

            def write() -> None:
                for piece in pieces:
                    os.write(write_fd, piece)
                    time.sleep(0.02)  # (so that the reader mostly finds them apart)
                os.close(write_fd)

            writer = threading.Thread(target=write)
            writer.start()
            got = [transport.recv() for _ in frames]
            writer.join(10)
        assert [bytes(f) for f in got] == frames
        assert transport.recv() is None
    finally:
        os.close(read_fd)


def test_a_transport_refuses_a_frame_over_its_limit_even_when_whole() -> None:
    import os

    from cpy2py.protocol.transport import FdTransport

    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, struct.pack(">I", 100) + b"y" * 100)
        with pytest.raises(ProtocolError, match="frames must hold 1 to 64 bytes"):
            FdTransport(read_fd, -1, max_frame=64).recv()
        os.write(write_fd, struct.pack(">I", 0))
        with pytest.raises(ProtocolError, match="received a frame of 0 bytes"):
            FdTransport(read_fd, -1).recv()
    finally:
        os.close(write_fd)
        os.close(read_fd)


def test_64_mib_bytes_round_trip(codec: Any) -> None:
    payload = bytes(range(256)) * (64 * 1024 * 4)
    assert len(payload) == 64 * 1024 * 1024
    data = codec.dumps(payload)
    assert data[:5] == b"\x5a\x04\x00\x00\x00" and len(data) == len(payload) + 5
    assert codec.loads(data) == payload
    assert codec.loads(memoryview(data)) == payload
    assert codec.loads(bytearray(data)) == payload


def test_loads_takes_bytes_like_only(codec: Any) -> None:
    with pytest.raises(TypeError, match="bytes"):
        codec.loads("a0")
    with pytest.raises(ProtocolError):
        codec.loads(b"")
    assert codec.loads(memoryview(b"\x00\x83\x01\x02\x03")[1:]) == [1, 2, 3]


def _nested_lists(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


def _wrap(levels: int, leaf: Any) -> Any:
    for _ in range(levels):
        leaf = [leaf]
    return leaf


def _nested_tuples(levels: int) -> tuple:
    value: tuple = ()
    for _ in range(levels - 1):
        value = (value,)
    return value


def test_encoding_depth_limit(codec: Any) -> None:
    deepest = codec.dumps(_nested_lists(MAX_DEPTH))
    assert deepest == b"\x81" * (MAX_DEPTH - 1) + b"\x80"
    with pytest.raises(ValueError, match=str(MAX_DEPTH)):
        codec.dumps(_nested_lists(MAX_DEPTH + 1))
    with pytest.raises(ValueError, match=str(MAX_DEPTH)):
        codec.dumps({"a": _nested_lists(MAX_DEPTH)})
    # a tuple is a tag and an array: two levels
    codec.dumps(_nested_tuples(MAX_DEPTH // 2))
    with pytest.raises(ValueError, match=str(MAX_DEPTH)):
        codec.dumps([_nested_tuples(MAX_DEPTH // 2)])
    # a bignum is a tag: one level
    assert codec.dumps(_wrap(MAX_DEPTH - 1, 2**64)).startswith(b"\x81" * (MAX_DEPTH - 1) + b"\xc2")
    with pytest.raises(ValueError, match=str(MAX_DEPTH)):
        codec.dumps(_wrap(MAX_DEPTH, 2**64))
    # a tag from default() is a level, and so is the array it holds here
    codec.dumps(_wrap(MAX_DEPTH - 2, GlobalRef("m", "q")), default)
    with pytest.raises(ValueError, match=str(MAX_DEPTH)):
        codec.dumps(_wrap(MAX_DEPTH - 1, GlobalRef("m", "q")), default)
    codec.dumps(_wrap(MAX_DEPTH - 1, object()), lambda o: (99, None))
    with pytest.raises(ValueError, match=str(MAX_DEPTH)):
        codec.dumps(_wrap(MAX_DEPTH, object()), lambda o: (99, None))
    # complex and bytearray
    codec.dumps(_wrap(MAX_DEPTH - 2, 1j))
    with pytest.raises(ValueError, match=str(MAX_DEPTH)):
        codec.dumps(_wrap(MAX_DEPTH - 1, 1j))
    codec.dumps(_wrap(MAX_DEPTH - 1, bytearray()))
    with pytest.raises(ValueError, match=str(MAX_DEPTH)):
        codec.dumps(_wrap(MAX_DEPTH, bytearray()))
    # a default that returns what it got is stopped by the limit, not the stack
    with pytest.raises(ValueError, match=str(MAX_DEPTH)):
        codec.dumps(object(), lambda obj: (99, obj))


# --------------------------------------------------------------------------
# Shared values (tags 28 and 29): docs/protocol.md, "Shared values"
# --------------------------------------------------------------------------

DETECT, REFS = tags.SHARING_DETECT, tags.SHARING_REFS


def _shared_value() -> list:
    """A message-like list whose parts share containers of every kind, and
    a list and a dict that hold themselves."""
    a, d, t, s, f, b = [1, 2], {"x": 1}, (3, [4]), {5}, frozenset({6}), bytearray(b"7")
    looped: list = ["me"]
    looped.append(looped)
    own: dict = {}
    own["self"] = own
    return [[a, a, {"k": a}], [d, d], [t, t], [s, s], [f, f], [b, b], looped, own, (looped, t)]


def _check_shared(back: list) -> None:
    for pair in back[:6]:
        assert pair[0] is pair[1]
    assert back[0][2]["k"] is back[0][0] == [1, 2]
    assert back[2][0] == (3, [4]) and back[3][0] == {5} and back[5][0] == bytearray(b"7")
    assert back[6][1] is back[6] and back[6][0] == "me"
    assert back[7]["self"] is back[7]
    assert back[8][0] is back[6] and back[8][1] is back[2][0]


@pytest.mark.parametrize("decoder", ["pure", "compiled"])
def test_shared_parts_cross_once_and_come_back_shared(codec: Any, decoder: str) -> None:
    """With references on, what a value holds twice is decoded as one
    object, by either codec from either codec's bytes. Detecting changes
    nothing of a value that shares nothing; with references, which
    containers are tagged shareable is the encoder's choice (the compiled
    one tags those referenced from elsewhere too, the pure one those it
    finds held twice)."""
    decode = codec_py.loads if decoder == "pure" else _compiled().loads
    _check_shared(decode(codec.dumps(_shared_value(), sharing=REFS)))
    plain = [1, "a", (1, 2), {"x": [3]}, [[]], b"b"]
    assert codec.dumps(plain, sharing=DETECT) == codec.dumps(plain)
    assert decode(codec.dumps(plain, sharing=REFS)) == plain
    # empty tuples and frozensets have no identity worth keeping: a tree
    assert codec.dumps([(), (), frozenset(), frozenset()], sharing=DETECT) == codec.dumps(
        [(), (), frozenset(), frozenset()]
    )


def test_the_pure_decoder_finds_shared_values_behind_bytes_that_look_like_their_tag(codec: Any) -> None:
    """The pure decoder looks for tag 28's head (d8 1c) before decoding a
    frame, by its first byte: bytes of 0xd8 before it, or one at the very
    end, must not hide it (nor make a frame without it look shared)."""

    def decoys() -> list:  # (made anew: held by nothing else, never tagged itself)
        return [b"\xd8" * 10, b"\xd8\x1b\xd8", "\u0600" * 5]  # (U+0600 is d8 80 in UTF-8)

    shared = [1, 2]
    frame = codec.dumps([decoys(), shared, shared], sharing=REFS)
    assert frame.index(b"\xd8") < frame.index(b"\xd8\x1c")  # the decoys come first
    back = codec_py.loads(frame)
    assert back == [decoys(), shared, shared] and back[1] is back[2]
    assert codec_py.loads(codec.dumps([decoys(), b"\xd8"])) == [decoys(), b"\xd8"]


@pytest.mark.parametrize("decoder", ["pure", "compiled"])
def test_a_long_str_or_bytes_held_twice_crosses_once(codec: Any, decoder: str) -> None:
    """A str or bytes of 64 or more held more than once (as an item, a
    dict value or key, inside a large plain container) is written once and
    referred to after, as pickle does: a list of a thousand references to
    one 1 MB str was 1 GB. Shorter ones are written each time."""
    decode = codec_py.loads if decoder == "pure" else _compiled().loads
    text, data = "é" * 1000, b"\x00" * 1000
    value = [[text] * 100, {"t": text, text: 1}, [data, data], [text] * 20, ["x" * 63] * 2]
    with pytest.raises(SharedParts):
        codec.dumps([value], sharing=DETECT)
    encoded = codec.dumps([value], plain=True, sharing=REFS)
    assert len(encoded) < 4000  # each written once: 1000 two-byte characters, 1000 bytes
    back = decode(encoded)[0]
    assert back == value
    assert all(item is back[0][0] for item in back[0] + back[3])
    assert back[1]["t"] is back[0][0] is next(k for k in back[1] if k != "t")
    assert back[2][0] is back[2][1] == data
    # at the deepest level a long str is written in full (a tag would be one
    # level more), also in a value that shares something else
    bottom = [text]
    for _ in range(254):
        bottom = [bottom]
    shared = [1]
    deep_value = [bottom, shared, shared, text]
    del bottom  # (the compiled encoder tags a list referenced elsewhere too: a level more)
    back = decode(codec.dumps(deep_value, sharing=REFS))
    deepest = back[0]
    for _ in range(254):
        deepest = deepest[0]
    assert deepest == [text] and back[3] == text and back[1] is back[2]
    # a short str is not looked up (a tree), nor is a long one held once
    assert codec.dumps([["x" * 63] * 2], sharing=DETECT) == codec.dumps([["x" * 63] * 2])
    assert codec.dumps([[text], data], sharing=DETECT) == codec.dumps([[text], data])


def test_detecting_raises_shared_parts_and_a_tree_repeats_them(codec: Any) -> None:
    a = [1]
    with pytest.raises(SharedParts):
        codec.dumps([a, a], sharing=DETECT)
    with pytest.raises(SharedParts):
        codec.dumps([[a], {"k": (a,)}], sharing=DETECT)
    assert codec.loads(codec.dumps([a, a]))[0] is not codec.loads(codec.dumps([a, a]))[1]
    looped: list = []
    looped.append(looped)
    with pytest.raises(SharedParts):
        codec.dumps([looped], sharing=DETECT)
    with pytest.raises(NestedTooDeep, match="MAX_DEPTH"):
        codec.dumps([looped])  # as a tree it never ends: the depth limit stops it


def test_a_value_exponential_as_a_tree_is_written_once(codec: Any) -> None:
    """A list of two references to one list, 60 levels deep: 2**60 leaves
    as a tree, a few bytes per level with references."""
    value: list = []
    for _ in range(60):
        value = [value, value]
    encoded = codec.dumps([value], sharing=REFS)
    assert len(encoded) < 8 * 60
    back = codec.loads(encoded)[0]
    for _ in range(60):
        assert back[0] is back[1]
        back = back[0]
    assert back == []


def test_only_what_is_held_twice_costs_a_level(codec: Any) -> None:
    """A tag is a level of nesting: a value 150 lists deep that shares one
    list anywhere still fits the 256 levels (only the shared list is
    tagged), and its frame is as long as the tree's but for the reference."""
    a = [1]
    deep: list = [a]
    for _ in range(150):
        deep = [deep]
    back = codec.loads(codec.dumps([deep, a], sharing=REFS))
    inner = back[0]
    for _ in range(150):
        inner = inner[0]
    assert inner[0] is back[1] == [1]


def test_what_cannot_be_referred_to_is_said(codec: Any) -> None:
    """A tuple is made once its items are: one that holds itself through a
    list cannot be referred to from inside. The value itself (a message)
    is never tagged, so that a frame starts with its array: it cannot be
    referred to from inside either."""
    knot: tuple = ([],)
    knot[0].append(knot)
    with pytest.raises(NestedTooDeep, match="tuple that holds itself"):
        codec.dumps([knot], sharing=REFS)
    looped: list = []
    looped.append(looped)
    with pytest.raises(NestedTooDeep, match="top level"):
        codec.dumps(looped, sharing=REFS)
    assert codec.dumps([looped], sharing=REFS)[:1] == b"\x81"
    with pytest.raises(ValueError, match="sharing must be 0, 1 or 2"):
        codec.dumps([], sharing=3)


def test_large_plain_containers_keep_their_shared_parts_too(codec: Any) -> None:
    """A plain-data block is a tree: a container that a block would hold
    twice goes as CBOR with references instead (the compiled codec; the pure
    one on PyPy, whose pickler says what it meets; on CPython it writes no
    block while sharing)."""
    row = list(range(10))
    value = [[row] * 20, {"a": row}]
    back = codec.loads(codec.dumps([value], plain=True, sharing=REFS))[0]
    assert back[0][0] is back[0][19] is back[1]["a"] == row
    alone = [list(range(10)) for _ in range(20)]
    assert codec.loads(codec.dumps([alone], plain=True, sharing=DETECT)) == [alone]
    if codec is not codec_py:  # (the compiled codec writes it as a block all the same)
        assert codec.dumps([alone], plain=True, sharing=DETECT) == codec.dumps([alone], plain=True)


@pytest.mark.parametrize(
    "frame, message",
    [
        ("81d81d00", "refers to shared value 0, but only 0 came before it"),
        ("82d81c8101d81d05", "refers to shared value 5, but only 1 came before it"),
        ("81d81cd99c4181d81d00", "from inside it, which is a tuple, set or frozenset"),
        ("81d81c6161", None),  # a tagged str is shareable too (nothing refers to it here)
        ("81d81cd81c80", None),
        ("82d81c80d81d61", "tag 29 must hold a unsigned integer"),
    ],
)
def test_malformed_references_are_refused(codec: Any, frame: str, message: Optional[str]) -> None:
    data = bytes.fromhex(frame)
    if frame == "81d81d00" and codec is codec_py:
        message = "tag 29 .a shared value. where none may be"  # (no tag 28 in the frame at all)
    if message is None:
        codec.loads(data)
        return
    with pytest.raises(ProtocolError, match=message):
        codec.loads(data)


@pytest.mark.parametrize(
    "filler",
    [bytes(range(256)) * 16, bytes(4096), b"\xd8\x1c" * 2048],
    ids=["0xd8 each 256", "zeros", "tag heads"],
)
def test_shared_values_in_large_frames_beside_byte_strings(codec: Any, filler: bytes) -> None:
    """A frame of a few KiB whose byte strings are full of 0xd8 (the first
    byte of tag 28's head), or hold none, keeps the values it shares: the
    pure codec no longer looks through a large frame for that tag."""
    row = [1, "two"]
    value = [filler, row, {"again": row}, filler]
    back = codec.loads(codec.dumps([value], sharing=REFS))[0]
    assert back == value and back[1] is back[2]["again"]
    assert codec.loads(codec.dumps([[filler, 7]]))[0] == [filler, 7]


def test_a_guests_frame_may_not_share(codec: Any) -> None:
    """Decoded under a budget (a sandboxed guest's frames), tags 28 and 29
    are refused: a guest's values are trees, so a short frame never stands
    for a value whose walk does not end (docs/security.md)."""
    a = [1]
    shared = codec.dumps([a, a], sharing=REFS)
    encoded = codec_py.dumps([[[]] * 2], sharing=REFS)
    large = codec.dumps([[bytes(4096), a, a]], sharing=REFS)  # (no look for tag 28 without a budget)
    for frame in (shared, encoded, bytes.fromhex("82d81c80d81d00"), large):
        with pytest.raises(ProtocolError, match="shared value"):
            codec.loads(frame, budget=1 << 20)


def test_decoding_depth_limit(codec: Any) -> None:
    assert codec.loads(b"\x81" * (MAX_DEPTH - 1) + b"\x80") == _nested_lists(MAX_DEPTH)
    with pytest.raises(ProtocolError, match=str(MAX_DEPTH)):
        codec.loads(b"\x81" * MAX_DEPTH + b"\x80")
    tuples = b"\xd9\x9c\x41\x81" * (MAX_DEPTH // 2 - 1) + b"\xd9\x9c\x41\x80"
    assert codec.loads(tuples) == _nested_tuples(MAX_DEPTH // 2)
    with pytest.raises(ProtocolError, match=str(MAX_DEPTH)):
        codec.loads(b"\x81" + tuples)
    with pytest.raises(ProtocolError, match=str(MAX_DEPTH)):
        codec.loads(b"\x9f" * 1_000_000)
    # unknown tags nest too; the limit holds before the hook is asked
    calls = []
    deep_tags = b"\xc6" * (MAX_DEPTH + 1) + b"\x00"
    with pytest.raises(ProtocolError, match=str(MAX_DEPTH)):
        codec.loads(deep_tags, lambda tag, value: calls.append(tag))
    assert calls == []


def test_declared_lengths_are_checked_before_allocating(codec: Any) -> None:
    for data in (b"\x5b" + b"\xff" * 8, b"\x9b" + b"\xff" * 8, b"\xbb" + b"\xff" * 8 + b"\x00"):
        with pytest.raises(ProtocolError, match="declares"):
            codec.loads(data)


# --------------------------------------------------------------------------
# Decoding budget
# --------------------------------------------------------------------------

MiB = 1 << 20
#: frames of the budget tests: big enough that the floor of sandbox_budget
#: (8 MiB) does not cover the hostile shapes, small enough to be quick
FRAME = 6 * MiB


def _array_of(item: bytes, count: int) -> bytes:
    return b"\x9a" + count.to_bytes(4, "big") + item * count


def _fill(size: int, item: bytes) -> bytes:
    return _array_of(item, (size - 5) // len(item))


#: frames a hostile guest sends: each byte or few bytes become an object
HOSTILE = {
    "empty maps": lambda size: _fill(size, b"\xa0"),  # {}: 72 bytes of objects per byte
    "empty lists": lambda size: _fill(size, b"\x80"),
    "one-entry maps": lambda size: _fill(size, b"\xa1\x00\x00"),  # {0: 0}
    "2-char strings": lambda size: _fill(size, b"\x62ab"),
    "small ints": lambda size: _fill(size, b"\x25"),  # -6, not cached
    "empty sets": lambda size: _fill(size, b"\xd9\x01\x02\x80"),
    "sets of 19 ints": lambda size: _fill(size, codec_py.dumps(set(range(19)))),  # 2,264 bytes from 23
    "indefinite lists": lambda size: _fill(size, b"\x9f\xff"),
}


def _ordinary(size: int) -> dict:
    """Ordinary data of about ``size`` bytes of frame, by kind."""
    rnd = random.Random(5)
    return {
        "records": [
            {
                "id": i,
                "name": f"user{i}",
                "email": f"user{i}@example.com",
                "active": i % 2 == 0,
                "score": i / 7,
            }
            for i in range(size // 60)
        ],
        "ints 0..9999": [i % 10_000 for i in range(size // 3)],
        "random doubles": [rnd.random() for _ in range(size // 9)],
        "words": [f"w{i % 100_000}" for i in range(size // 7)],
        "pairs": [(i, -i) for i in range(size // 14)],
        "nested tuples": [((i, i + 1), (str(i), None)) for i in range(size // 30)],
        "str to int": {f"key{i}": i for i in range(size // 14)},
        "text": "x" * size,
    }


def _fast_dumps() -> Any:
    """The compiled encoder where there is one (both write the same bytes)."""
    try:
        from cpy2py._host import dumps
    except ImportError:
        return codec_py.dumps
    return dumps


@functools.cache
def _ordinary_frames(size: int) -> Dict[str, bytes]:
    return {name: _fast_dumps()(value) for name, value in _ordinary(size).items()}


ORDINARY = sorted(_ordinary(100))


@pytest.mark.parametrize("shape", sorted(HOSTILE))
def test_budget_refuses_hostile_frames(codec: Any, shape: str) -> None:
    raw = HOSTILE[shape](FRAME)
    budget = codec_py.sandbox_budget(len(raw))
    with pytest.raises(ProtocolError) as refused:
        codec.loads(raw, budget=budget)
    message = str(refused.value)
    assert f"a frame of {len(raw)} bytes" in message
    assert f"decoding budget of {budget} bytes" in message
    assert "send it in several smaller frames" in message
    # the same shape in a small frame is within the floor
    small = HOSTILE[shape](64 * 1024)
    assert codec.loads(small, budget=codec_py.sandbox_budget(len(small))) == codec.loads(small)


@pytest.mark.parametrize("name", ORDINARY)
def test_budget_accepts_ordinary_data_of_the_same_size(codec: Any, name: str) -> None:
    raw = _ordinary_frames(FRAME)[name]
    assert len(raw) >= FRAME * 0.9
    value = codec.loads(raw, budget=codec_py.sandbox_budget(len(raw)))
    assert _fast_dumps()(value) == raw


def test_sandbox_budget_is_the_one_of_the_codec_module() -> None:
    from cpy2py.protocol import codec as codec_module

    assert codec_module.sandbox_budget is codec_py.sandbox_budget
    assert codec_py.sandbox_budget(0) == codec_py.SANDBOX_BUDGET_FLOOR >= 4 * MiB
    assert 8 <= codec_py.SANDBOX_BUDGET_FACTOR <= 16
    assert codec_py.sandbox_budget(64 * MiB) <= 17 * 64 * MiB


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_budget_none_or_enough_decodes_as_before(codec: Any, vector: dict) -> None:
    data = bytes.fromhex(vector["cbor"])
    expected = meaning(vector["value"])
    for budget in (None, 1 << 20, 2**100):
        assert same(codec.loads(data, tag_hook, budget=budget), expected)


@pytest.mark.parametrize("vector", INVALID, ids=_ids(INVALID))
def test_budget_still_refuses_invalid_vectors(codec: Any, vector: dict) -> None:
    data = bytes.fromhex(vector["cbor"])
    for budget in (0, 1 << 20):
        with pytest.raises(ProtocolError):
            codec.loads(data, tag_hook, budget=budget)


def test_budget_argument(codec: Any) -> None:
    for bad in ("1", 1.5, True, b"1"):
        with pytest.raises(TypeError, match="budget must be an int"):
            codec.loads(b"\xf6", budget=bad)
    with pytest.raises(ValueError, match="at least 0"):
        codec.loads(b"\xf6", budget=-1)
    # cached objects cost nothing; anything else its size
    assert codec.loads(b"\x83\xf6\x18\xff\x61a", budget=64 + 3 * 8) == [None, 255, "a"]
    with pytest.raises(ProtocolError, match="budget of 87 bytes"):
        codec.loads(b"\x83\xf6\x18\xff\x61a", budget=64 + 3 * 8 - 1)
    assert codec.loads(b"\x19\x01\x01", budget=32) == 257
    with pytest.raises(ProtocolError, match="budget"):
        codec.loads(b"\x19\x01\x01", budget=31)
    assert codec.loads(b"\xa0", budget=2**64 + 1) == {}


def test_budget_leaves_malformed_frames_to_the_decoder(codec: Any) -> None:
    """A length beyond the frame is malformed, not expensive: the decoder's error."""
    for data in (b"\x5b" + b"\xff" * 8, b"\x9b" + b"\xff" * 8, b"\xbb" + b"\xff" * 8 + b"\x00"):
        with pytest.raises(ProtocolError, match="declares"):
            codec.loads(data, budget=100)
    with pytest.raises(ProtocolError, match=str(MAX_DEPTH)):
        codec.loads(b"\x81" * MAX_DEPTH + b"\x80", budget=1 << 20)


def _estimates(data: bytes) -> List[int]:
    """The smallest budget each codec accepts ``data`` with (its estimate)."""
    found = []
    for c in (codec_py, _compiled()):
        low, high = 0, 1 << 40
        while low < high:
            middle = (low + high) // 2
            try:
                c.loads(data, tag_hook, budget=middle)
                high = middle
            except ProtocolError:
                low = middle + 1
        found.append(low)
    return found


def test_both_codecs_estimate_the_same() -> None:
    """Both codecs charge every frame the same, so they accept and refuse the same frames."""
    rnd = random.Random(31)
    frames = [bytes.fromhex(v["cbor"]) for v in VALID]
    frames += [codec_py.dumps(_random_value(rnd), default) for _ in range(150)]
    frames += [make(4096) for make in HOSTILE.values()]
    frames += [codec_py.dumps(v, default) for v in _ordinary(4096).values()]
    frames += [  # non-minimal heads, indefinite lengths, the shapes the estimate tells apart
        b"\x1a\x00\x00\x00\x05",
        b"\x38\x02",
        b"\x7f\x61a\x62bc\xff",
        b"\x5f\x41a\xff",
        b"\xbf\x61a\x00\x01\x02\xff",
        b"\xd9\x01\x02\x9f\x01\x02\x03\x04\x05\xff",
        b"\xd9\x9c\x41\x9f\x01\xff",
        b"\xa2\x61a\x00\x01\x02",
        b"\xd9\x9c\x43\x98\x02\xf9\x00\x00\xf9\x00\x00",
        b"\xc2\x49" + b"\x01" * 9,
    ]
    for data in frames:
        pure, compiled = _estimates(data)
        assert pure == compiled, f"{data[:64].hex()}: the pure codec charges {pure}, the compiled {compiled}"
        assert pure == codec_py._estimate(data, 1 << 40)


# what the decoding costs the interpreter (VmHWM, the peak of RSS, and VmRSS
# after) in a fresh one that reads the frame from a file
_RSS_CHILD = r"""
import gc, json, sys
def status():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
from cpy2py.errors import ProtocolError
from cpy2py.protocol import codec_py
if sys.argv[2] == "compiled":
    from cpy2py import _host as codec
else:
    codec = codec_py
with open(sys.argv[1], "rb") as f:
    raw = f.read()
gc.collect()
base = status()
try:
    value = codec.loads(raw, budget=codec_py.sandbox_budget(len(raw)))
    outcome = "accepted"
except ProtocolError as e:
    outcome = str(e)
during = status()
value = None
gc.collect()
after = status()
result = {"outcome": outcome, "base": base["VmRSS"], "peak": during["VmHWM"], "after": after["VmRSS"]}
print(json.dumps(result))
"""


def _decode_in_a_fresh_interpreter(path: Path, codec_name: str) -> dict:
    if codec_name == "compiled":
        _compiled()
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status (Linux) to read the memory of a process")
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(path), codec_name],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("codec_name", ["pure", "compiled"])
def test_a_hostile_64_mib_frame_costs_the_master_nothing(tmp_path: Path, codec_name: str) -> None:
    """Without a budget the master's RSS grows 80 times this frame (5 GiB); with the
    sandbox budget it is refused before a single object is made."""
    count = 64 * MiB - 5
    path = tmp_path / "empty-maps.cbor"
    with path.open("wb") as f:
        f.write(b"\x9a" + count.to_bytes(4, "big"))
        for _ in range(64):
            f.write(b"\xa0" * min(MiB, count))
            count -= MiB
    frame = path.stat().st_size
    assert frame == 64 * MiB
    result = _decode_in_a_fresh_interpreter(path, codec_name)
    assert "decoding budget" in result["outcome"]
    # peak RSS after the frame was read: at most a quarter of it more
    assert result["peak"] - result["base"] < frame // 4, result
    assert result["after"] - result["base"] < frame // 8, result


@pytest.mark.parametrize("codec_name", ["pure", "compiled"])
def test_the_worst_accepted_frame_costs_about_its_budget(tmp_path: Path, codec_name: str) -> None:
    """A frame of empty maps and a bytes blob, just under the sandbox budget: the
    estimate is honest (peak RSS within 25% of the budget) and the memory goes back."""
    frame = 8 * MiB
    budget = codec_py.sandbox_budget(frame)
    # k empty maps (64 + an 8-byte slot each) and a blob of the rest of the frame
    maps = (budget - frame - 1024) // 71
    blob = frame - 5 - maps - 5
    path = tmp_path / "edge.cbor"
    path.write_bytes(_array_of(b"\xa0", maps + 1)[:-1] + b"\x5a" + blob.to_bytes(4, "big") + bytes(blob))
    raw = path.read_bytes()
    assert len(raw) == frame and codec_py._estimate(raw, budget) is not None
    result = _decode_in_a_fresh_interpreter(path, codec_name)
    assert result["outcome"] == "accepted"
    assert result["peak"] - result["base"] < budget * 1.25, result
    assert result["after"] - result["base"] < frame, result


# --------------------------------------------------------------------------
# default and tag_hook
# --------------------------------------------------------------------------


class Color(enum.IntEnum):
    RED = 1


class MyStr(str):
    pass


class MyFloat(float):
    pass


class MyList(list):
    pass


class MyDict(dict):
    pass


@pytest.mark.parametrize(
    "obj",
    [Color.RED, MyStr("x"), MyFloat(1.5), MyList([1]), MyDict(a=1), collections.OrderedDict(a=1),
     collections.Counter("ab"), object(), len, GlobalRef("m", "q")],
    ids=lambda o: type(o).__qualname__,
)  # fmt: skip
def test_anything_but_the_exact_types_goes_to_default(codec: Any, obj: Any) -> None:
    seen = []

    def record(o: Any) -> Any:
        seen.append(o)
        return 12345, [type(o).__name__]

    assert codec.loads(codec.dumps(obj, record), lambda tag, value: (tag, value)) == (
        12345,
        [type(obj).__name__],
    )
    assert seen == [obj] and type(seen[0]) is type(obj)
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    with pytest.raises(TypeError, match=f"cannot encode a value of type '{name}'"):
        codec.dumps(obj)
    with pytest.raises(TypeError, match=f"cannot encode a value of type '{name}'"):
        codec.dumps([1, {"k": obj}], lambda o: NotImplemented)


def test_bool_and_none_are_exact_types(codec: Any) -> None:
    def refuse(o: Any) -> Any:
        raise AssertionError(f"default called for {o!r}")

    assert codec.dumps([True, False, None, 1], refuse) == b"\x84\xf5\xf4\xf6\x01"


def test_default_results_are_checked(codec: Any) -> None:
    with pytest.raises(TypeError, match=r"\(tag, value\)"):
        codec.dumps(object(), lambda o: [1, 2])
    with pytest.raises(TypeError, match=r"\(tag, value\)"):
        codec.dumps(object(), lambda o: (1, 2, 3))
    with pytest.raises(TypeError, match="tag"):
        codec.dumps(object(), lambda o: ("1", 2))
    with pytest.raises(ValueError, match="tag"):
        codec.dumps(object(), lambda o: (-1, 2))
    with pytest.raises(ValueError, match="tag"):
        codec.dumps(object(), lambda o: (2**64, 2))
    assert codec.dumps(object(), lambda o: (2**64 - 1, None)) == b"\xdb" + b"\xff" * 8 + b"\xf6"

    class Boom(Exception):
        pass

    def explode(o: Any) -> Any:
        raise Boom

    with pytest.raises(Boom):
        codec.dumps([object()], explode)


def test_default_value_is_encoded_recursively(codec: Any) -> None:
    class Point:
        def __init__(self, x: Any, y: Any) -> None:
            self.x, self.y = x, y

    def point(o: Any) -> Any:
        return (50000, (o.x, o.y)) if type(o) is Point else NotImplemented

    data = codec.dumps({"p": Point(1, Point(2.5, "z"))}, point)
    assert data == codec_py.dumps({"p": Point(1, Point(2.5, "z"))}, point)

    def hook(tag: int, value: Any) -> Any:
        assert tag == 50000
        return ("P",) + value

    assert codec.loads(data, hook) == {"p": ("P", 1, ("P", 2.5, "z"))}


def test_tag_hook(codec: Any) -> None:
    data = bytes.fromhex("d93039a16161d99c418201c24101")  # 12345({"a": (1, 1)})
    with pytest.raises(ProtocolError, match="unknown CBOR tag 12345"):
        codec.loads(data)
    assert codec.loads(data, lambda tag, value: [tag, value]) == [12345, {"a": (1, 1)}]
    # the model's own tags never reach the hook
    assert codec.loads(bytes.fromhex("d99c4180"), lambda tag, value: 1 / 0) == ()

    class Boom(Exception):
        pass

    def explode(tag: int, value: Any) -> Any:
        raise Boom

    with pytest.raises(Boom):
        codec.loads(data, explode)
    # an unhashable object made by the hook cannot be a key
    with pytest.raises(ProtocolError, match="unhashable"):
        codec.loads(bytes.fromhex("a1c60001"), lambda tag, value: [value])


def test_mutation_by_default_is_an_error(codec: Any) -> None:
    items: list = [object(), 1, 2]

    def shrink(o: Any) -> Any:
        items.clear()
        return 99, None

    with pytest.raises(RuntimeError):
        codec.dumps(items, shrink)

    grow_list: list = [object()]

    def grow(o: Any) -> Any:
        grow_list.append(1)
        return 99, None

    with pytest.raises(RuntimeError):
        codec.dumps(grow_list, grow)
    mapping = {"a": object(), "b": 2}

    def add_key(o: Any) -> Any:
        mapping["c"] = 3
        return 99, None

    with pytest.raises(RuntimeError):
        codec.dumps(mapping, add_key)


def test_a_default_that_replaces_what_is_being_encoded_cannot_pull_it_away(codec: Any) -> None:
    # The compiled encoder reads the items of lists, tuples and dicts through
    # borrowed references; a default() that drops the last reference to an
    # item not yet encoded must find it still alive (and encoded as it was).
    class Key:
        pass

    key = Key()
    mapping = {key: object()}  # the value is referenced by the dict only

    def swap_value(o: Any) -> Any:
        if o is key:
            mapping[key] = 5  # same size: no error, the old value is freed
        return 99, type(o).__name__

    assert codec.loads(codec.dumps(mapping, swap_value), lambda tag, value: (tag, value)) == {
        (99, "Key"): (99, "object")
    }
    items: list = [object(), object(), 3]

    def swap_item(o: Any) -> Any:
        items[1] = "new"  # same length: the list is read again at each index
        return 99, None

    assert codec.loads(codec.dumps(items, swap_item), lambda tag, value: (tag, value)) == [
        (99, None),
        "new",
        3,
    ]


def test_ints_about_64_bits_wide_are_plain_or_bignums_as_they_fit(codec: Any) -> None:
    """Up to 64 bits of magnitude an int is a plain CBOR integer, beyond
    that a bignum (tags 2 and 3), negative ones too (-1 - n): the same bytes
    from both codecs on each side of the line, also where a double cannot
    tell them apart (the compiled codec looks at one first) and for ints too
    large for a double."""
    line = 2**64
    magnitudes = [
        line - 2**12,
        line - 2**11 - 1,
        line - 2**10,
        line - 1,
        line,
        line + 1,
        line + 2**11,
        line + 2**12,
    ]
    for magnitude in magnitudes + [2**1023, 2**1024 + 5, 3**5000]:
        for value, head in (
            (magnitude, 0x1B if magnitude < line else 0xC2),
            (-1 - magnitude, 0x3B if magnitude < line else 0xC3),
        ):
            frame = codec.dumps(value)
            assert frame == codec_py.dumps(value) and frame[0] == head, value
            assert codec.loads(frame) == value
    # a magnitude with leading zero bytes is read all the same
    assert codec.loads(bytes([0xC2, 0x4C, 0, 0, 1]) + bytes(9)) == 2**72
    assert codec.loads(bytes([0xC3, 0x4C, 0, 0, 1]) + bytes(9)) == -1 - 2**72


def test_strings_with_lone_surrogates_cross(codec: Any) -> None:
    """A str that strict UTF-8 cannot encode (``os.fsdecode`` of a file name
    that is not UTF-8, half of a surrogate pair) goes under tag 40015 and
    comes back the same str, as a value, an item and a dict key."""
    name = os.fsdecode(b"report-\xff.txt")
    assert name == "report-\udcff.txt"
    assert codec.dumps(name) == bytes.fromhex("d99c4f4e") + name.encode("utf-8", "surrogatepass")
    for value in (name, "\ud83d", [name, "plain"], {name: 1, "k": name}, (name,), {name}):
        assert codec.loads(codec.dumps(value)) == value
    # the tag is one level, as any tag
    deep: Any = name
    for _ in range(MAX_DEPTH - 1):
        deep = [deep]
    assert codec.loads(codec.dumps(deep)) == deep
    with pytest.raises(ValueError, match="MAX_DEPTH"):
        codec.dumps([deep])


@pytest.mark.parametrize("piece", [0, 3, 256])
def test_long_strings_with_surrogates_are_the_same_bytes_a_piece_at_a_time(
    codec: Any, monkeypatch: pytest.MonkeyPatch, piece: int
) -> None:
    """On PyPy the pure codec encodes a str with surrogates a piece at a
    time (``_SURROGATE_PIECE``: PyPy 3.9 takes time that grows with the
    square of their number); the frame is the compiled codec's, whichever
    piece a surrogate pair, a 4-byte char or a run of surrogates falls on."""
    monkeypatch.setattr(codec_py, "_SURROGATE_PIECE", piece)
    latin1 = bytes(range(256)).decode("utf-8", "surrogateescape") * 40  # (a file read with surrogateescape)
    texts = [latin1, "ab\ud83d\ude00" * 300, "\U0001f600\udcff" * 500, "x" * 1000 + "\udcff", "\udcff" * 1001]
    for text in texts:
        frame = codec_py.dumps([text])
        encoded = text.encode("utf-8", "surrogatepass")
        assert frame[1:4] == bytes.fromhex("d99c4f") and frame.endswith(encoded)  # (tag 40015)
        assert len(frame) - len(encoded) in (7, 9)  # (array, tag, a byte string's head)
        assert codec.dumps([text]) == frame
        assert codec.loads(frame) == [text]


def _surrogate_utf8_samples(count: int) -> Iterator[bytes]:
    """UTF-8 with lone surrogates (pairs among them), and the same broken:
    a byte changed, cut short, an overlong form or a code point past
    U+10FFFF put in."""
    rnd = random.Random(40015)
    pieces = ["a", "\u00e9", "\u20ac", "\U0001f600", "\ud800", "\udcff", "\ud83d\ude00", "\ud7ff", "\ue000"]
    for _ in range(count):
        utf8 = "".join(rnd.choices(pieces, k=rnd.randrange(1, 40))).encode("utf-8", "surrogatepass")
        yield utf8
        broken = bytearray(utf8)
        at = rnd.randrange(len(broken))
        kind = rnd.randrange(4)
        if kind == 0:
            broken[at] = rnd.randrange(256)
        elif kind == 1:
            del broken[at:]
        else:
            broken[at:at] = [b"\xc0\x80", b"\xf4\x90\x80\x80", b"\xed\xa0", b"\xe0\x80\xbf"][rnd.randrange(4)]
        yield bytes(broken)


def test_a_str_with_surrogates_decodes_as_surrogatepass_does(codec: Any) -> None:
    """Tag 40015's content is decoded as ``bytes.decode("utf-8",
    "surrogatepass")`` does it (the compiled codec takes the code points
    itself: CPython's error handler runs once per surrogate), and refused
    where that fails."""
    for utf8 in _surrogate_utf8_samples(400):
        frame = bytes.fromhex("d99c4f") + codec_py.dumps(utf8)
        try:
            expected = utf8.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            with pytest.raises(
                ProtocolError, match="invalid UTF-8 in a str with surrogates .tag 40015. at offset 3"
            ):
                codec.loads(frame)
        else:
            assert codec.loads(frame) == expected, utf8


@contextlib.contextmanager
def _collected_at_next_allocation(garbage: type) -> Iterator[None]:
    """An instance of ``garbage`` in a cycle (freed only by a collection),
    and a collection at the next allocation of a tracked object within."""
    gc.disable()
    bomb = garbage()
    bomb.cycle = bomb
    del bomb
    gc.set_threshold(1)
    gc.enable()
    try:
        yield
    finally:
        gc.set_threshold(700)
        gc.collect()


def test_a_str_with_surrogates_borrowed_from_a_list_outlives_a_collection() -> None:
    """The compiled encoder reads a list's str items without a reference of
    its own. A strict UTF-8 encoding of one with lone surrogates failed with
    an exception object, whose making could start a collection, whose
    finalizer here drops that very str from the list: the encoder then read
    freed memory (a crash, or garbage sent). It makes no such object now."""
    compiled = _compiled()
    items: list = []

    class Bomb:
        def __del__(self) -> None:
            items[1] = 0  # drops the str the encoder is reading; same size

    for trial in range(5):
        text = bytes([0x80 + trial]).decode("utf-8", "surrogateescape") * 30
        items[:] = [1, text]
        with _collected_at_next_allocation(Bomb):
            assert compiled.loads(compiled.dumps(items)) in ([1, text], [1, 0])


def test_a_dict_entry_a_finalizer_drops_while_its_key_is_encoded_is_not_read_freed() -> None:
    """The compiled encoder asks CPython for a short str's UTF-8; for one
    with lone surrogates that fails with an exception object, whose making
    can start a collection, whose finalizer here drops the entry being
    encoded (only the dict held its key and value) and makes new strs of
    their size, likely where they were. The encoder holds references of its
    own: it sends what it read, or the entries that replaced it, never the
    new strs."""
    compiled = _compiled()
    entries: dict = {}
    made: list = []

    class Bomb:
        def __del__(self) -> None:
            entries.clear()
            entries.update({"a": 0, "b": 0})  # (the same size: no error to stop the encoder)
            made.extend("~" * n for n in range(28, 34) for _ in range(50))

    for trial in range(5):
        char = bytes([0x80 + trial]).decode("utf-8", "surrogateescape")
        entries.clear()
        entries[char * 30] = char * 31  # (held by the dict alone)
        entries["z"] = 1
        possible = {(char * 30, char * 31), ("z", 1), ("a", 0), ("b", 0)}
        with _collected_at_next_allocation(Bomb):
            back = compiled.loads(compiled.dumps(entries))
        assert made, "the finalizer ran"
        assert set(back.items()) <= possible, back
        made.clear()


def test_protocol_error_is_the_cpy2py_class(codec: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.loads(b"\x01\x02")
    assert type(info.value) is ProtocolError
    assert "trailing" in str(info.value)


def test_floats_take_the_shortest_exact_width(codec: Any) -> None:
    assert codec.dumps(1.5) == b"\xf9\x3e\x00"
    assert codec.dumps(-0.0) == b"\xf9\x80\x00"
    assert codec.dumps(float("nan")) == b"\xf9\x7e\x00"
    assert codec.dumps(-float("nan")) == b"\xf9\x7e\x00"
    assert codec.dumps(struct.unpack(">d", bytes.fromhex("7ff80000deadbeef"))[0]) == b"\xf9\x7e\x00"
    assert codec.dumps(65520.0) == b"\xfa\x47\x7f\xf0\x00"  # rounds to inf in half precision
    assert codec.dumps(3.4028235677973366e38) == b"\xfb" + struct.pack(">d", 3.4028235677973366e38)
    assert codec.dumps(2.0**-149) == b"\xfa\x00\x00\x00\x01"
    assert codec.dumps(2.0**-150) == b"\xfb" + struct.pack(">d", 2.0**-150)
    for x in (1e-310, 123456.789, 2.0**-24, 2.0**-25, 2.0**-14, 65504.0, 65505.0):
        assert codec.loads(codec.dumps(x)) == x


def _float_samples() -> List[float]:
    """Floats on every edge of half and single precision (their largest,
    their least normal and subnormal values, and one bit past each), with
    random significands of every length and exponents across the double's
    range, infinities, zeros and NaNs with payloads."""
    rng = random.Random(1613)
    out = [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, -5e-324, 2.2250738585072014e-308]
    for width_bits, least in ((11, -24), (24, -149)):
        for e in (least, least + 1, -14, -15, -126, -127, 15, 16, 127, 128, 129):
            for bits in (1, width_bits - 1, width_bits, width_bits + 1, 53):
                m = rng.getrandbits(bits) | 1 << (bits - 1)
                out += [math.ldexp(m, e - bits + 1), -math.ldexp(m, e - bits + 1)]
    for _ in range(3000):
        bits = rng.choice((1, 2, 5, 10, 11, 12, 23, 24, 25, 30, 53))
        m = rng.getrandbits(bits) | 1 << (bits - 1)
        out.append(math.ldexp(m, rng.randint(-1100, 1024) - bits) * rng.choice((1, -1)))
    for payload in (1, 0xDEADBEEF, (1 << 51) | 1):
        out.append(struct.unpack(">d", struct.pack(">Q", 0x7FF0000000000000 | payload))[0])
    out += [rng.random() for _ in range(1000)] + [float(i) for i in range(-300, 300)]
    return out


def test_a_double_cut_short_is_refused_as_truncated(codec: Any) -> None:
    """Doubles and nulls in arrays are taken without reading a head (both
    codecs): one cut short at any length is refused, never read past."""
    assert codec.loads(b"\x83\xf6\xfb" + struct.pack(">d", 2.5) + b"\xf6") == [None, 2.5, None]
    one = b"\x81\xfb" + struct.pack(">d", 2.5)
    for cut in range(1, 9):
        with pytest.raises(ProtocolError, match="truncated"):
            codec.loads(one[:-cut])


def test_the_pure_codec_finds_a_floats_width_as_the_compiled_one_does() -> None:
    """The pure codec finds a float's shortest exact width by arithmetic,
    the compiled one by converting it: the same bytes on every edge of half
    and single precision."""
    compiled = _compiled()
    find = codec_py._float_bytes
    wrong = [(x, find(x).hex(), compiled.dumps(x).hex()) for x in _float_samples()]
    assert [case for case in wrong if case[1] != case[2]] == []


# -- large frames as received (host/src/python/received.rs) ---------------------


def _frame_through_a_pipe(frame: bytes, first: int) -> Any:
    """``_host.read_frame`` of ``frame`` written to a pipe, ``first`` bytes of
    it handed over as read already."""
    import os
    import threading

    host = _compiled()
    read_fd, write_fd = os.pipe()

    def write() -> None:
        view = memoryview(frame)[first:]
        while view:
            view = view[os.write(write_fd, view) :]
        os.close(write_fd)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        return host.read_frame(read_fd, frame[:first], len(frame))
    finally:
        writer.join(30)
        os.close(read_fd)


BIG = 64 * 1024


@pytest.mark.parametrize(
    "value, apart",
    [
        ([1, 2, b"a" * BIG], 1),  # a reply: the byte string ends the frame
        ([0, 5, 9, 0, "f", [b"b" * (BIG + 7), "x" * BIG], {"k": b"c" * (3 * BIG)}], 2),  # text stays in
        ([b"d" * 100, bytearray(b"e" * BIG), (b"f" * BIG, 2**700)], 2),  # a bytearray's too, a copy
        ({"many": [bytes([i]) * (BIG + i) for i in range(6)], "after": list(range(3000))}, 6),
        ([b"g" * (BIG - 1), 1.5, None], 0),  # under the limit
    ],
)
@pytest.mark.parametrize("first", [0, 5, 40_000])
def test_a_received_frame_reads_its_large_byte_strings_apart(value: Any, apart: int, first: int) -> None:
    host = _compiled()
    frame_bytes = codec_py.dumps(value)
    frame = _frame_through_a_pipe(frame_bytes, min(first, len(frame_bytes)))
    assert len(frame) == len(frame_bytes) and bytes(frame) == frame_bytes
    read_apart = int(repr(frame).split(", ")[1].split()[0])
    assert read_apart <= apart and (
        read_apart == apart or first >= 40_000
    )  # (what came with the first part stays in)
    back = host.loads(frame)
    assert back == value and type(back) is type(value)
    assert host.peek(frame) == host.peek(frame_bytes)
    assert codec_py.loads(frame) == value  # (a copy of the whole frame)


def test_chunks_of_an_indefinite_byte_string_stay_in_the_frame() -> None:
    host = _compiled()
    chunked = b"\x82\x5f" + b"\x5a\x00\x01\x00\x00" + b"h" * BIG + b"\x41z\xff" + b"\x01"
    frame = _frame_through_a_pipe(chunked, 0)
    assert "0 byte strings" in repr(frame)
    assert host.loads(frame) == [b"h" * BIG + b"z", 1]


def test_a_received_frame_that_lies_or_ends_early_is_refused() -> None:
    host = _compiled()
    # a byte string longer than the rest of its frame is left in it: the decoder refuses it
    lying = b"\x82\x01\x5a\x00\x02\x00\x00" + b"i" * BIG
    with pytest.raises(ProtocolError):
        host.loads(_frame_through_a_pipe(lying, 0))
    import os

    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"\x81\x5a\x00\x01\x00\x00" + b"j" * 1000)
    os.close(write_fd)
    try:
        with pytest.raises(ProtocolError, match="ended inside a frame"):
            host.read_frame(read_fd, b"", 6 + BIG)
    finally:
        os.close(read_fd)


# --------------------------------------------------------------------------
# Renditions: what a WASI guest is given to read (host/src/protocol/rendition.rs)
# --------------------------------------------------------------------------


def _as_a_guest_reads(monkeypatch: pytest.MonkeyPatch, frame: bytes) -> Optional[bytes]:
    """The host's rendition of a master's frame (None: it goes as it is),
    with the pure codec reading renditions as a guest's does."""
    host = _compiled()
    monkeypatch.setattr(codec_py, "_renditions", True)
    return host.render_for_guest(frame)


def _message(value_cbor: bytes, req_id: int = 7, chain: int = 0x1234_0000_0001) -> bytes:
    """A request frame ``[0, id, chain, 0, value]`` around an encoded value."""
    return b"\x85\x00" + codec_py.dumps(req_id) + codec_py.dumps(chain) + b"\x00" + value_cbor


def test_a_guest_reads_each_vector_from_its_rendition_as_from_its_cbor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rendered = 0
    for vector in VALID:
        frame = _message(bytes.fromhex(vector["cbor"]))
        rendition = _as_a_guest_reads(monkeypatch, frame)
        if rendition is None:
            continue  # (shared values, complex numbers, ...: the guest reads the CBOR)
        rendered += 1
        assert rendition[:2] == b"\x80\x05", vector["name"]
        assert codec_py.peek(rendition) == codec_py.peek(frame), vector["name"]
        from_cbor, from_rendition = codec_py.loads(frame, tag_hook), codec_py.loads(rendition, tag_hook)
        assert same(from_rendition, from_cbor), f"{vector['name']}: {from_rendition!r} != {from_cbor!r}"
        # (a large frame comes from a native twin's transport as a bytearray)
        assert same(codec_py.loads(bytearray(rendition), tag_hook), from_cbor), vector["name"]
    assert rendered >= len(VALID) * 3 // 4, f"only {rendered} of {len(VALID)} vectors were rendered"


def test_a_guest_reads_random_messages_from_their_renditions_as_from_their_cbor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = _compiled()
    rnd = random.Random(11)
    rendered = 0
    for i in range(500):
        value = _random_value(rnd)
        if rnd.random() < 0.3:  # the kernel's own tags, as persistent ids
            value = [
                GlobalRef("builtins", "len"),
                value,
                TwinRef("__master__", i, ["builtins.function", [], []]),
            ]
        frame = bytes(host.dumps([rnd.choice([0, 1, 2]), i, 2**40 + i, 0, value], default))
        rendition = _as_a_guest_reads(monkeypatch, frame)
        if rendition is None:
            continue
        rendered += 1
        assert codec_py.peek(rendition) == codec_py.peek(frame)
        assert _canon(codec_py.loads(rendition, tag_hook)) == _canon(codec_py.loads(frame, tag_hook)), f"#{i}"
    assert rendered >= 250


@pytest.mark.parametrize(
    "frame",
    [
        bytes.fromhex("a16161f5"),  # a map (a handshake frame), not a message
        bytes.fromhex("20"),  # a bare int
        _message(bytes.fromhex("d8409f01ff")),  # indefinite length
        _message(bytes.fromhex("d99c43820102")),  # complex made of ints (the CBOR decoder refuses it)
        _message(bytes.fromhex("6261ff")),  # invalid UTF-8
        _message(b"\x01") + b"\x00",  # trailing bytes
        _message(codec_py.dumps(bytes(64 * 1024))),  # over 64 KiB
    ],
    ids=["map", "int", "indefinite", "bad-complex", "bad-utf8", "trailing", "large"],
)
def test_what_is_not_rendered_goes_as_it_is(monkeypatch: pytest.MonkeyPatch, frame: bytes) -> None:
    assert _as_a_guest_reads(monkeypatch, frame) is None


def test_a_rendition_names_no_global_and_only_a_guest_reads_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    crafted = pickle.dumps([0, 1, 2, 0, GlobalRef("os", "system")], protocol=5) + bytes(18)
    with pytest.raises(ProtocolError, match="a plain-data block|not|rendition|CBOR"):
        codec_py.loads(crafted, tag_hook)  # no guest: it is CBOR, and not valid CBOR
    monkeypatch.setattr(codec_py, "_renditions", True)
    with pytest.raises(ProtocolError, match="names the global"):
        codec_py.loads(crafted, tag_hook)


def test_a_rendition_that_fails_to_read_leaves_the_next_one_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that raises (a hook, a key's hash) may leave the rest of its
    frame in the reader's unpickler: the next frame is read by another."""
    host = _compiled()
    good = bytes(host.dumps([0, 7, 2**40 + 1, 0, [1, (2, 3), {"a": None}]], default))
    keyed = bytes(host.dumps([0, 8, 2**40 + 1, 0, {GlobalRef("m", "n"): True, "x": [1, 2]}], default))
    good_rendition = _as_a_guest_reads(monkeypatch, good)
    keyed_rendition = host.render_for_guest(keyed)
    assert good_rendition is not None and keyed_rendition is not None

    def unhashable(tag: int, value: Any) -> Any:
        return [tag, value]  # a list, as a dict key: the read fails half-way

    for _ in range(3):
        with pytest.raises(TypeError):
            codec_py.loads(keyed_rendition, unhashable)
        assert codec_py.loads(good_rendition, tag_hook) == [0, 7, 2**40 + 1, 0, [1, (2, 3), {"a": None}]]
