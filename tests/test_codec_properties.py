"""Property tests of the two codecs with hypothesis (issue 6).

- Round trips: for any value of the model, the pure-Python and the compiled
  codec write identical bytes, both read them back as the same value (same
  types, float bits, order), and the bytes are canonical (re-encoding what
  was read gives them again).
- Garbage: for any bytes - random, mutated encodings, streams of CBOR heads
  - both decoders either return a value or raise ``ProtocolError`` (never
  another exception, never a hang), and they agree on which.
- Decoding budget: both codecs estimate every value the same (the smallest
  budget that accepts it), and agree on garbage under any budget.

``CPY2PY_SOAK=full`` (``just soak``) runs many more examples.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Any

import pytest
from cpy2py.errors import ProtocolError
from cpy2py.protocol import codec_py, tags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    from cpy2py import _host as compiled
except ImportError:  # pragma: no cover - the suite builds it
    compiled = None

FULL = os.environ.get("CPY2PY_SOAK", "").lower() == "full"
EXAMPLES = 20_000 if FULL else 300

# deadline=None: tests never judge time; pytest-timeout catches a hang
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=not FULL,  # the short run is the same in every CI run
    database=None,  # no .hypothesis/ directory; a failure prints its example
)


def codecs() -> list:
    if compiled is None:
        pytest.skip("the compiled codec cpy2py._host is not built for this interpreter")
    return [codec_py, compiled]


# -- the references of the kernel, as plain markers ---------------------------------


class Ref:
    """A kernel reference (tags 40010-40013) as the tests see it."""

    __slots__ = ("tag", "value")

    def __init__(self, tag: int, value: Any) -> None:
        self.tag, self.value = tag, value

    def __eq__(self, other: object) -> bool:
        return type(other) is Ref and self.tag == other.tag and same(self.value, other.value)

    def __hash__(self) -> int:
        return hash(self.tag)

    def __repr__(self) -> str:
        return f"Ref({self.tag}, {self.value!r})"


def default(obj: Any) -> Any:
    if type(obj) is Ref:
        return obj.tag, obj.value
    return NotImplemented


def tag_hook(tag: int, value: Any) -> Any:
    if tag in (tags.GLOBAL_REF, tags.EXCEPTION, tags.TWIN_REF, tags.PICKLE):
        return Ref(tag, value)
    raise ProtocolError(f"unknown CBOR tag {tag}")


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
    if type(a) in (set, frozenset):
        return len(a) == len(b) and a == b
    return a == b


# -- strategies ------------------------------------------------------------------------

names = st.lists(st.text(max_size=8), min_size=2, max_size=2)
plain_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=40)
    | st.complex_numbers(allow_nan=True, allow_infinity=True)
)
refs = (
    names.map(lambda n: Ref(tags.GLOBAL_REF, n))
    | st.binary(max_size=20).map(lambda b: Ref(tags.PICKLE, b))
    | st.tuples(st.text(max_size=6), st.integers(0, 2**64 - 1), names).map(
        lambda t: Ref(tags.TWIN_REF, [t[0], t[1], Ref(tags.GLOBAL_REF, t[2])])
    )
)
# NaN is left out of set items and keys: a set cannot tell two NaNs apart
hashable_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=10)
)
hashables = st.recursive(
    hashable_leaves,
    lambda inner: st.lists(inner, max_size=3).map(tuple) | st.frozensets(inner, max_size=3),
    max_leaves=8,
)
values = st.recursive(
    plain_leaves | refs | hashables | st.binary(max_size=20).map(bytearray),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(hashables, inner, max_size=4)
        | st.sets(hashables, max_size=4)
        | st.frozensets(hashables, max_size=4)
        | st.tuples(names, st.lists(inner, max_size=3), st.none() | st.text(max_size=30)).map(
            lambda t: Ref(tags.EXCEPTION, [Ref(tags.GLOBAL_REF, t[0]), t[1], t[2]])
        )
    ),
    max_leaves=40,
)

#: bytes that CBOR decoders treat specially
INTERESTING = [0x00, 0x17, 0x18, 0x1B, 0x1C, 0x1F, 0x3B, 0x5F, 0x7F, 0x9F, 0xBF, 0xC2, 0xC3, 0xD9]
INTERESTING += [0xDB, 0xF4, 0xF7, 0xF8, 0xF9, 0xFB, 0xFE, 0xFF, 0x9C, 0x41, 0x4A, 0x4B]
heads = st.lists(st.sampled_from(INTERESTING) | st.integers(0, 255), max_size=200).map(bytes)


# -- round trips -------------------------------------------------------------------------


@PROPERTY
@given(values)
def test_both_codecs_write_identical_bytes_and_read_them_back(value):
    pure_bytes, compiled_bytes = (c.dumps(value, default) for c in codecs())
    assert pure_bytes == compiled_bytes, f"{value!r}: {pure_bytes.hex()} != {compiled_bytes.hex()}"
    for codec in codecs():
        back = codec.loads(pure_bytes, tag_hook)
        assert same(back, value), f"{codec.__name__}: {value!r} came back as {back!r}"
        again = codec.dumps(back, default)
        if not has_sets(value):  # a rebuilt set may iterate in another order
            assert again == pure_bytes, "the encoding is not canonical"
        assert same(codec.loads(again, tag_hook), value)


def has_sets(value: Any) -> bool:
    if type(value) in (set, frozenset):
        return True
    if type(value) in (list, tuple):
        return any(has_sets(v) for v in value)
    if type(value) is dict:
        return any(has_sets(k) or has_sets(v) for k, v in value.items())
    if type(value) is Ref:
        return has_sets(value.value)
    return False


# -- int arrays, which the pure codec takes a run at a time (protocol/int_runs.py) -------

#: the first and last value of each head width, negative and bignum ones around them
WIDTH_EDGES = [
    (0, 23),
    (24, 255),
    (256, 65535),
    (65536, 2**32 - 1),
    (2**32, 2**64 - 1),
    (2**64, 2**70),
    (-(2**64), -1),
]


def int_run(edges: tuple) -> Any:
    low, high = edges
    return st.lists(st.sampled_from([low, high]) | st.integers(low, high), min_size=1, max_size=300)


#: runs of one head width one after the other, now and then an item that is
#: not an exact int (a bool, a float, an int subclass) in among them
int_runs = st.lists(st.sampled_from(WIDTH_EDGES).flatmap(int_run), min_size=1, max_size=6).flatmap(
    lambda runs: st.lists(
        st.tuples(
            st.integers(0, sum(map(len, runs))), st.sampled_from([True, False, 1.0, IntFlavour(7), "7"])
        ),
        max_size=2,
    ).map(lambda odd: with_odd_items([v for run in runs for v in run], odd))
)


class IntFlavour(int):
    """An int subclass: not an int to the codec (it goes to default)."""


def with_odd_items(items: list, odd: list) -> list:
    for at, item in odd:
        items.insert(at, item)
    return items


def int_default(obj: Any) -> Any:
    if type(obj) is IntFlavour:
        return 40099, int(obj)
    return default(obj)


@PROPERTY
@given(int_runs, st.booleans())
def test_int_arrays_in_runs_encode_and_decode_as_item_by_item(items, as_tuple):
    """Runs of one head width (and a bool or subclass among them, which must
    not be taken for an int) come out of both codecs as the same bytes, and
    both read them back; cut anywhere, both refuse them."""
    value = tuple(items) if as_tuple else items
    pure_bytes, compiled_bytes = (c.dumps(value, int_default) for c in codecs())
    assert pure_bytes == compiled_bytes, f"{value!r}: {pure_bytes.hex()} != {compiled_bytes.hex()}"
    hook = lambda tag, v: IntFlavour(v) if tag == 40099 else tag_hook(tag, v)  # noqa: E731
    for codec in codecs():
        back = codec.loads(pure_bytes, hook)
        assert type(back) is type(value) and [(type(x), x) for x in back] == [(type(x), x) for x in value]
    for cut in {1, len(pure_bytes) // 3, len(pure_bytes) // 2, len(pure_bytes) - 1}:
        for codec in codecs():
            with pytest.raises(ProtocolError):
                codec.loads(pure_bytes[:cut], hook)


#: dicts of ints of every head width
int_dicts = st.dictionaries(
    st.text(max_size=3), st.sampled_from(WIDTH_EDGES).flatmap(lambda edges: st.integers(*edges))
)


@PROPERTY
@given(int_runs, int_dicts)
def test_pypys_byte_wise_ints_are_the_same_bytes(items, entries):
    """PyPy's codec writes two-byte ints a byte at a time (``_BYTEWISE``) and
    lists item by item (no runs there): the same bytes as the compiled codec,
    read back item by item into the same values; cut anywhere, refused."""
    saved = codec_py._BYTEWISE, codec_py._RUNS
    codec_py._BYTEWISE, codec_py._RUNS = True, False
    hook = lambda tag, v: IntFlavour(v) if tag == 40099 else tag_hook(tag, v)  # noqa: E731
    try:
        for value in (items, tuple(items), entries, {"nested": [entries, items]}):
            pure_bytes, compiled_bytes = (c.dumps(value, int_default) for c in codecs())
            assert pure_bytes == compiled_bytes, f"{value!r}: {pure_bytes.hex()} != {compiled_bytes.hex()}"
            back = codec_py.loads(pure_bytes, hook)
            assert type(back) is type(value) and back == value
            if isinstance(value, (list, tuple)):
                assert [type(x) for x in back] == [type(x) for x in value]
            with pytest.raises(ProtocolError):
                codec_py.loads(pure_bytes[: len(pure_bytes) // 2], hook)
    finally:
        codec_py._BYTEWISE, codec_py._RUNS = saved


# -- garbage -----------------------------------------------------------------------------


def outcome(codec: Any, data: bytes) -> Any:
    """What decoding ``data`` gives: ("ok", canonical bytes) or ("refused", None)."""
    try:
        value = codec.loads(data, tag_hook)
    except ProtocolError:
        return ("refused", None)
    # anything else propagates and fails the test: only ProtocolError is allowed
    return ("ok", codec_py.dumps(value, default))


def check_garbage(data: bytes) -> None:
    results = [outcome(codec, data) for codec in codecs()]
    assert results[0] == results[1], f"the codecs disagree on {data.hex()}: {results}"


@PROPERTY
@given(st.binary(max_size=4096))
def test_random_bytes_give_a_value_or_a_protocol_error(data):
    check_garbage(data)


@PROPERTY
@given(heads)
def test_streams_of_cbor_heads_give_a_value_or_a_protocol_error(data):
    check_garbage(data)


@PROPERTY
@given(values, st.data())
def test_mutated_encodings_give_a_value_or_a_protocol_error(value, data):
    encoded = bytearray(codec_py.dumps(value, default))
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        position = data.draw(st.integers(0, len(encoded)), label="position")
        action = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), label="action")
        byte = data.draw(st.sampled_from(INTERESTING) | st.integers(0, 255), label="byte")
        if action == "insert" or not encoded:
            encoded.insert(position, byte)
        elif action == "truncate":
            del encoded[position:]
        else:
            at = min(position, len(encoded) - 1)
            if action == "flip":
                encoded[at] ^= 1 << (byte % 8)
            elif action == "set":
                encoded[at] = byte
            else:
                del encoded[at]
    check_garbage(bytes(encoded))


def check_peek(data: bytes) -> None:
    pure, native = (codec.peek(data) for codec in codecs())
    assert pure == native, f"the codecs peek differently at {data.hex()}: {pure} != {native}"


#: message heads: [kind, id, chain, ...] with every width of unsigned integer
uints = st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]) | st.integers(
    0, 2**64 - 1
)
messages = st.lists(uints, min_size=0, max_size=5).flatmap(
    lambda fields: st.lists(values, max_size=3).map(lambda rest: codec_py.dumps([*fields, *rest], default))
)


@PROPERTY
@given(messages | st.binary(max_size=64) | heads)
def test_both_codecs_peek_the_same_header(data):
    """``peek`` routes every frame without decoding it: both codecs must read
    the same (kind, id, chain) from anything, a cut or mangled frame too."""
    check_peek(data)
    for cut in range(min(len(data), 24)):
        check_peek(data[:cut])


@PROPERTY
@given(st.integers(1, 100_000), st.sampled_from([b"\x81", b"\x9f", b"\xa1\x00", b"\xd9\x9c\x41\x81"]))
def test_deep_nesting_is_refused_by_both(levels, head):
    data = head * levels + b"\x00"
    results = [outcome(codec, data) for codec in codecs()]
    assert results[0] == results[1]
    if levels > tags.MAX_DEPTH:
        assert results[0][0] == "refused"


# -- decoding budget ---------------------------------------------------------------------


def budget_outcome(codec: Any, data: bytes, budget: int) -> Any:
    try:
        value = codec.loads(data, tag_hook, budget=budget)
    except ProtocolError:
        return ("refused", None)
    return ("ok", codec_py.dumps(value, default))


@PROPERTY
@given(values)
def test_both_codecs_estimate_every_value_the_same(value):
    """The smallest budget a frame is accepted with is the same in both codecs."""
    data = codec_py.dumps(value, default)
    estimate = codec_py._estimate(data, 1 << 62)
    assert estimate is not None
    for codec in codecs():
        assert budget_outcome(codec, data, estimate)[0] == "ok", codec.__name__
        if estimate:
            assert budget_outcome(codec, data, estimate - 1)[0] == "refused", codec.__name__


@PROPERTY
@given(values, st.data())
def test_budgets_on_mutated_encodings_give_the_same_verdict(value, data):
    encoded = bytearray(codec_py.dumps(value, default))
    for _ in range(data.draw(st.integers(0, 3), label="mutations")):
        position = data.draw(st.integers(0, len(encoded)), label="position")
        byte = data.draw(st.sampled_from(INTERESTING) | st.integers(0, 255), label="byte")
        if data.draw(st.booleans(), label="insert") or not encoded:
            encoded.insert(position, byte)
        else:
            encoded[min(position, len(encoded) - 1)] = byte
    budget = data.draw(st.integers(0, 64 * len(encoded) + 256), label="budget")
    check_budgets(bytes(encoded), budget)


@PROPERTY
@given(heads, st.integers(0, 4096))
def test_budgets_on_streams_of_heads_give_the_same_verdict(data, budget):
    check_budgets(data, budget)


def check_budgets(data: bytes, budget: int) -> None:
    results = [budget_outcome(codec, data, budget) for codec in codecs()]
    assert results[0] == results[1], f"the codecs disagree on {data.hex()} with budget {budget}"
    # what decodes without a budget decodes with an unlimited one: the walk
    # never takes a frame the decoder accepts for malformed
    for codec in codecs():
        assert budget_outcome(codec, data, 1 << 62) == outcome(codec, data), codec.__name__
