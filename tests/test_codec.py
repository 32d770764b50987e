"""The two codecs of the value model: the pure-Python one and the compiled one.

Both are checked against the shared vectors in tests/vectors/ (which the
Rust value model is checked against too, in host/tests/vectors.rs), against
each other on a seeded random corpus, and for their limits and hooks. No
twin processes are started here.
"""

from __future__ import annotations

import collections
import enum
import json
import math
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import pytest
from cpy2py.errors import ProtocolError
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
    cls: GlobalRef


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
        return TwinRef(v[0], v[1], GlobalRef(*v[2]))
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


# --------------------------------------------------------------------------
# Sizes and limits
# --------------------------------------------------------------------------


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


def test_unencodable_strings(codec: Any) -> None:
    with pytest.raises(UnicodeEncodeError):
        codec.dumps("lone surrogate \ud800")


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
