"""Plain-data blocks (tag 40014): large plain containers between a master
and its sandboxed guests, as a pickle of plain data only.

Both codecs write them (``dumps(..., plain=True)``: the compiled one with its
own writer, the pure-Python one with the C pickler) and read each other's;
the compiled codec, which reads what guests send, accepts nothing but plain
data in them and charges them to the decoding budget. No twin is started
here: tests/test_sandbox_policy.py sends hostile blocks from a real guest.
"""

from __future__ import annotations

import io
import math
import pickle
from typing import Any

import pytest
from cpy2py.errors import ProtocolError, SharedParts
from cpy2py.protocol import codec_py
from cpy2py.protocol.tags import MAX_DEPTH

_host = pytest.importorskip("cpy2py._host", reason="the compiled codec cpy2py._host is not built")

TAG_HEAD = b"\xd9\x9c\x4e"  # tag 40014


def tagged(block: bytes) -> bytes:
    """``block`` as the content of tag 40014 (a byte string with a 4-byte length)."""
    return TAG_HEAD + b"\x5a" + len(block).to_bytes(4, "big") + block


def c_pickled(value: Any) -> bytes:
    """What a guest's C pickler writes for ``value`` (codec_py's block writer)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, 5)
    pickler.fast = True
    pickler.dump(value)
    return buffer.getvalue()


def exact(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (and NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(exact(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(exact(a[k], b[k]) for k in a)
    return a == b


SCALARS = [
    None,
    True,
    False,
    0,
    255,
    256,
    65535,
    65536,
    -1,
    -(2**31),
    2**31,
    2**63 - 1,
    -(2**63),
    2**63,
    2**64,
    -(2**64) - 1,
    3**200,
    -(3**200),
    0.0,
    -0.0,
    1.5,
    float("inf"),
    -float("inf"),
    float("nan"),
    1e-310,
    "",
    "a",
    "é",
    "ab" * 200,
    "x" * 70000,
    b"",
    b"x",
    b"\x00" * 300,
    bytearray(),
    bytearray(b"yz"),
]

PLAIN_VALUES = {
    "nested dict": {f"group{g}": {f"key{k}": 7 + 100 * g + k for k in range(100)} for g in range(20)},
    "int list": list(range(-3000, 3000)),
    "every scalar": SCALARS * 2,
    "tuples": [(i, str(i)) for i in range(40)] + [(), (1,), (1, 2), (1, 2, 3), tuple(range(30))],
    "sets": [set(range(i)) for i in range(20)] + [frozenset(range(i)) for i in range(20)],
    "tuple keys": {(i, -i): [i] * 3 for i in range(30)},
    "frozenset keys": {frozenset({i}): i for i in range(30)},
    "a tuple": tuple(range(100)),
    "a set": set(range(100)),
    "a frozenset": frozenset(range(100)),
    "nested lists": [[[i] * 20] * 20 for i in range(20)],
    "2000 items (two batches)": list(range(2500)),
    "empty containers": [[], {}, (), set(), frozenset()] * 5,
}


@pytest.mark.parametrize("name", PLAIN_VALUES)
@pytest.mark.parametrize("writer", ["compiled", "pure"])
def test_plain_values_go_as_blocks_and_come_back_exactly(name, writer):
    value = PLAIN_VALUES[name]
    frame = (_host if writer == "compiled" else codec_py).dumps([1, value], plain=True)
    assert TAG_HEAD in frame  # large plain containers: a block
    for reader in (_host, codec_py):
        back = reader.loads(frame)
        assert exact(back, [1, value]), f"{name}: {writer} -> {reader.__name__}"


def test_the_compiled_writer_writes_what_pickle_reads():
    value = PLAIN_VALUES["every scalar"]
    frame = _host.dumps([value], plain=True)  # (the message itself is never a block)
    assert frame[1:4] == TAG_HEAD  # [tag 40014 over a byte string]
    length_bytes = {0x58: 1, 0x59: 2, 0x5A: 4, 0x5B: 8}[frame[4]]
    assert exact(pickle.loads(frame[5 + length_bytes :]), value)


def test_what_the_c_pickler_writes_is_read_by_the_compiled_codec():
    for value in PLAIN_VALUES.values():
        assert exact(_host.loads(tagged(c_pickled(value))), value)


def test_small_containers_the_message_and_anything_not_plain_stay_cbor():
    class Sub(int):
        pass

    for codec in (_host, codec_py):
        assert TAG_HEAD not in codec.dumps(list(range(100)), plain=True)  # the message itself
    not_plain = [
        list(range(PLAIN_MIN - 1)),  # too small to be worth a block
        [1j] + list(range(20)),  # complex: CBOR has a tag for it, blocks do not
        [Sub(1)] + list(range(20)),  # a subclass: default() decides
        {"k": [Sub(1)], **{str(i): i for i in range(20)}},
    ]
    for value in not_plain:
        for codec in (_host, codec_py):
            frame = codec.dumps([value], lambda obj: (40011, ["m", "Sub"]), plain=True)
            assert TAG_HEAD not in frame, (codec.__name__, value)
    # the plain parts of a value that is not plain through and through still go as blocks
    mixed = [Sub(1), list(range(100))]
    for codec in (_host, codec_py):
        frame = codec.dumps([mixed], lambda obj: (40011, ["m", "Sub"]), plain=True)
        assert frame.count(TAG_HEAD) == 1


def test_with_sharing_a_long_str_held_elsewhere_goes_in_a_block_once_and_twice_not():
    """The compiled writer with shared parts kept (what a master sends its
    guest): long strs (64 or more) that something else references too stay
    in the block when each is in it once (they were all refused, and a list
    of 10k such strs cost a guest 5x to decode as CBOR); one met twice in it,
    or written by an earlier block, refuses the block, so that the CBOR
    around writes it once more at most."""
    from cpy2py.protocol.tags import SHARING_DETECT, SHARING_REFS

    rows = [f"row {i:060d}" for i in range(20)]
    also = list(rows)  # each str referenced twice
    frame = _host.dumps([rows], plain=True, sharing=SHARING_DETECT)
    assert frame.count(TAG_HEAD) == 1
    assert codec_py.loads(frame) == [also]
    big = "é" * 1000
    repeated = [big] * 20 + rows
    frame = _host.dumps([repeated], plain=True, sharing=SHARING_REFS)
    assert TAG_HEAD not in frame and frame.count("é".encode() * 1000) == 1
    back = codec_py.loads(frame)[0]
    assert back == repeated and all(item is back[0] for item in back[:20])
    # nor in many blocks: each of 200 rows holding one big str (a block
    # each) wrote it 200 times; now the first block holds it and the CBOR
    # of the rest refers to one more copy
    rows_of_big = [[big, *range(7)] for _ in range(200)]
    with pytest.raises(SharedParts):
        _host.dumps([rows_of_big], plain=True, sharing=SHARING_DETECT)
    frame = _host.dumps([rows_of_big], plain=True, sharing=SHARING_REFS)
    assert frame.count("é".encode() * 1000) == 2
    back = codec_py.loads(frame)[0]
    assert back == rows_of_big and all(row[0] is back[-1][0] for row in back[1:])
    # without sharing, a block holds what it meets, each time
    frame = _host.dumps([repeated], plain=True)
    assert frame.count(TAG_HEAD) == 1 and codec_py.loads(frame) == [repeated]


def test_without_plain_nothing_goes_as_a_block():
    value = PLAIN_VALUES["nested dict"]
    assert _host.dumps(value) == codec_py.dumps(value)
    assert TAG_HEAD not in _host.dumps(value)


PLAIN_MIN = codec_py.PLAIN_MIN


# -- what the compiled codec refuses (it reads what guests send) ----------------------

HOSTILE_BLOCKS = {
    "a global and a call": b"\x80\x05cos\nmkdir\n(X\x04\x00\x00\x00/tmptR.",
    "a stack global": b"\x80\x05\x8c\x02os\x8c\x05mkdir\x93.",
    "a persistent id": b"\x80\x05K\x01Q.",
    "a memo (a list that holds itself)": b"\x80\x05]\x94(h\x00e.",
    "an object built from a class": b"\x80\x05cbuiltins\nobject\n)\x81.",
    "an extension code": b"\x80\x05\x82\x01.",
    "protocol 2": b"\x80\x02K\x01.",
    "no protocol": b"K\x01.",
    "no STOP": b"\x80\x05K\x01",
    "bytes after STOP": b"\x80\x05K\x01.K\x02",
    "two values": b"\x80\x05K\x01K\x02.",
    "an unclosed mark": b"\x80\x05(K\x01.",
    "SETITEMS on a list": b"\x80\x05](K\x01K\x02u.",
    "a length past the end": b"\x80\x05X\xff\xff\xff\x00ab.",
    "a LONG4 of negative length": b"\x80\x05\x8b\xff\xff\xff\xff.",
    "a FRAME past the end": b"\x80\x05\x95\xff\x00\x00\x00\x00\x00\x00\x00K\x01.",
    "invalid UTF-8": b"\x80\x05\x8c\x02\xff\xfe.",
    "an unhashable key": b"\x80\x05}(]K\x01u.",
    "an unhashable set item": b"\x80\x05\x8f(]\x90.",
}


@pytest.mark.parametrize("name", HOSTILE_BLOCKS)
def test_the_compiled_codec_refuses_anything_but_plain_data(name, tmp_path):
    with pytest.raises(ProtocolError, match="plain-data block"):
        _host.loads(tagged(HOSTILE_BLOCKS[name]))
    # under a decoding budget (frames from guests) just the same
    with pytest.raises(ProtocolError, match="plain-data block"):
        _host.loads(tagged(HOSTILE_BLOCKS[name]), budget=codec_py.sandbox_budget(1000))


def test_the_pure_codec_makes_nothing_but_plain_data_either(tmp_path):
    target = tmp_path / "made"
    block = b"\x80\x05cos\nmkdir\n(X" + len(str(target)).to_bytes(4, "little") + str(target).encode() + b"tR."
    with pytest.raises(ProtocolError, match="names the global os.mkdir"):
        codec_py.loads(tagged(block))
    with pytest.raises(ProtocolError, match="plain-data block"):
        _host.loads(tagged(block))
    assert not target.exists()
    # and it never decodes a block under a budget (frames from guests are the compiled codec's)
    with pytest.raises(ProtocolError, match="compiled codec only"):
        codec_py.loads(tagged(c_pickled([1, 2])), budget=10**9)


def test_a_block_is_charged_to_the_decoding_budget_before_anything_is_made():
    # 1 MiB of empty sets: one byte each in the block, 232 bytes each decoded
    count = 1 << 20
    block = b"\x80\x05](" + b"\x8f" * count + b"e."
    frame = tagged(block)
    with pytest.raises(ProtocolError, match="decoding budget"):
        _host.loads(frame, budget=codec_py.sandbox_budget(len(frame)))
    # its cost is what the same value costs as CBOR, give or take the list's slots
    value = [[set() for _ in range(1000)]]
    as_cbor = _host.dumps(value)
    as_block = _host.dumps(value, plain=True)
    assert TAG_HEAD in as_block
    for budget in (200_000, 300_000):
        assert _accepted(as_cbor, budget) == _accepted(as_block, budget)


def _accepted(frame: bytes, budget: int) -> bool:
    try:
        _host.loads(frame, budget=budget)
    except ProtocolError as err:
        assert "decoding budget" in str(err)
        return False
    return True


def test_a_block_nested_too_deep_fails_its_value_not_the_link():
    """A guest's C pickler has no depth limit: a value nested deeper than
    MAX_DEPTH in a block is a ValueError (that call fails), not a ProtocolError
    (which stops the guest)."""
    deep: Any = []
    for _ in range(MAX_DEPTH + 10):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper than 256 levels") as info:
        _host.loads(tagged(c_pickled(deep)))
    assert not isinstance(info.value, ProtocolError)
    # counted as CBOR counts it: the block's tag is one level, a tuple two
    fits: Any = None
    for _ in range(MAX_DEPTH - 1):
        fits = [fits]
    assert _host.loads(tagged(c_pickled(fits))) == fits
    with pytest.raises(ValueError):
        _host.loads(tagged(c_pickled([fits])))
    # the compiled writer never writes such a block: CBOR refuses the value as before
    with pytest.raises(ValueError, match="MAX_DEPTH"):
        _host.dumps([[deep] * PLAIN_MIN], plain=True)


def test_lone_surrogates_cross_in_blocks():
    """Pickle writes a str with lone surrogates with them passed through (as
    CBOR's tag 40015 does): the host writes such blocks and reads those a
    guest's pickler wrote."""
    latin1 = bytes(range(256)).decode("utf-8", "surrogateescape")  # (a file read with surrogateescape)
    value = [["\ud800x", "\udcff", "\ud83d\ude00\u00e9\U0001f600", latin1] * PLAIN_MIN]
    written = _host.dumps(value, plain=True)
    assert TAG_HEAD in written
    assert _host.loads(written) == codec_py.loads(written) == value
    assert _host.loads(codec_py.dumps(value, plain=True)) == value


def test_a_block_in_chunks_is_refused_before_anything_is_made():
    """The budget's estimate reads a block of stated length only: one in
    chunks (an indefinite-length byte string) is refused by the decoder too,
    instead of being decoded without a budget."""
    block = b"\x80\x05](" + b"\x8f" * (1 << 20) + b"e."
    chunked = TAG_HEAD + b"\x5f\x5a" + len(block).to_bytes(4, "big") + block + b"\xff"
    for budget in (None, codec_py.sandbox_budget(len(chunked))):
        with pytest.raises(ProtocolError, match="stated length"):
            _host.loads(chunked, budget=budget)


def test_containers_a_block_opens_are_charged_as_they_open():
    """A block that opens a million lists and never closes them (refused at
    its end) passes the budget long before that end."""
    block = b"\x80\x05" + b"]" * (1 << 20) + b"."
    frame = tagged(block)
    with pytest.raises(ProtocolError, match="decoding budget"):
        _host.loads(frame, budget=codec_py.sandbox_budget(len(frame)))


def test_the_pure_codec_writes_blocks_with_a_pure_python_pickler_too():
    """PyPy's pickle is pickle.py, which asks reducer_override about every
    object (the C pickler only about the others): blocks still come out."""
    import shutil
    import subprocess
    from pathlib import Path

    pypy = shutil.which("pypy3")
    if pypy is None:
        pytest.skip("no pypy3 on this machine: its pure-Python pickler is not tried")
    package_root = Path(codec_py.__file__).resolve().parents[2]
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); from cpy2py.protocol import codec_py; "
        "value = [{'k%d' % i: (i, [1.5] * 3) for i in range(20)}]; "
        "sys.stdout.buffer.write(codec_py.dumps(value, plain=True))"
    )
    frame = subprocess.run([pypy, "-c", script, str(package_root)], capture_output=True, check=True).stdout
    assert TAG_HEAD in frame
    assert _host.loads(frame) == [{f"k{i}": (i, [1.5] * 3) for i in range(20)}]


def test_many_keys_of_one_hash_from_a_guest_are_refused():
    """An int's hash is its value modulo 2**61 - 1: distinct keys of one
    hash cost quadratic time to insert (20,000 of them held the master's GIL
    for seconds). A frame decoded under a budget (a guest's) refuses a dict
    or set with more than 64 of them, as CBOR and as a block; a trusted
    peer's frame, and ordinary keys, are decoded as before."""
    modulus = 2**61 - 1
    colliding = [k * modulus for k in range(1, 201)]
    frames = {
        "dict": _host.dumps([{k: 0 for k in colliding}]),
        "set": _host.dumps([set(colliding)]),
        "block dict": _host.dumps([[{k: 0 for k in colliding}]], plain=True),
        "block set": _host.dumps([[set(colliding)]], plain=True),
    }
    for name, frame in frames.items():
        with pytest.raises(ProtocolError, match="of one hash"):
            _host.loads(frame, budget=codec_py.sandbox_budget(len(frame)))
        assert len(_host.loads(frame)[0]) in (1, 200), name  # trusted: decoded
    few = _host.dumps([{k: 0 for k in colliding[:64]}])
    assert len(_host.loads(few, budget=codec_py.sandbox_budget(len(few)))[0]) == 64
    ordinary = _host.dumps([{**{i: i for i in range(5000)}, **{f"k{i}": i for i in range(5000)}}])
    assert len(_host.loads(ordinary, budget=codec_py.sandbox_budget(len(ordinary)))[0]) == 10000
