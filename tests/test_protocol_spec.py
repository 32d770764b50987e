"""The spec tells the truth: every frame of real sessions, recorded on the
master's end of each link, matches the Rust model of the protocol
(host/src/protocol/message.rs and value.rs, the model docs/protocol.md
describes), for each twin kind. A frame the code sends and the model does
not know fails here, naming the frame."""

from __future__ import annotations

import datetime
import decimal
import gc
import threading
import uuid

import pytest
import twin_functions
import twin_helpers
from cpy2py import ProtocolError, TwinMaster, expose
from cpy2py.protocol import codec, tags
from frame_recorder import checked_kinds, recording
from support import SANDBOX_KIND, start_twin
from twin_classes import Caller, Counter, native_to

KINDS = ["python3", "pypy3", SANDBOX_KIND]


def _check_frame():
    try:
        from cpy2py._host import check_frame
    except ImportError as err:
        pytest.skip(f"cpy2py._host is not built (run `just build`): {err}")
    return check_frame


class Account:
    """A master object that cannot be pickled (a lock): twins get a reference."""

    def __init__(self) -> None:
        self.balance = 0
        self._lock = threading.Lock()

    def deposit(self, amount: int) -> int:
        with self._lock:
            self.balance += amount
            return self.balance

    def fail(self, text: str) -> None:
        raise ValueError(text)


def _session(kind: str, twin: TwinMaster) -> None:
    """Calls of every operation, callbacks both ways, errors both ways, releases."""
    counter = native_to(kind, Counter)(1)  # instantiate
    assert counter.increment(2) == 3  # call_method
    assert counter.value == 3  # getattr
    counter.value = 10  # setattr
    del counter.double  # delattr (a property's deleter)
    assert counter.value == 0
    every_type = [None, True, 7, -8, 2**70, -(2**70), 1.5, "text", b"bytes", bytearray(b"ba")]
    every_type += [[1], {"k": 1, 2: "v"}, (1, 2), {3}, frozenset({4}), 1 + 2j]
    assert twin.execute(twin_helpers.echo, every_type) == every_type  # execute
    if kind == SANDBOX_KIND:  # dates, Decimals and UUIDs as values (tag 40016), both ways
        dated = [datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.timezone.utc), decimal.Decimal("1.5")]
        dated.append(uuid.UUID(int=7))
        assert twin.execute(twin_helpers.echo, dated) == dated
    with pytest.raises(ValueError, match="boom"):  # a raise from the twin
        counter.fail(ValueError, "boom")

    account = Account()
    caller = native_to(kind, Caller)()
    if kind == SANDBOX_KIND:  # a guest gets what it was granted, a class described with methods
        handed = expose(account, "deposit", "fail")
    else:  # a native twin gets a reference to an object that cannot be pickled
        handed = account
    assert caller.call_method(handed, "deposit", 5) == 5  # a callback into the master
    with pytest.raises(ValueError, match="from the master"):  # a raise from the master, and back
        caller.call_method(handed, "fail", "from the master")

    def callback(x: int) -> int:
        return x * 2

    assert twin.execute(twin_functions.apply, callback, 21) == 42  # a master function called back
    assert caller.same(counter) is counter  # a twin object, home and back

    del counter, caller, handed
    gc.collect()
    twin.execute(twin_helpers.echo, None)  # carries the master's releases first


@pytest.mark.parametrize("kind", KINDS)
def test_every_frame_of_a_session_matches_the_spec(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _check_frame()
    TwinMaster(twinterpreter_id=kind).stop()  # a fresh twin, recorded from its hello on
    with recording(monkeypatch) as recorders:
        twin = start_twin(kind)
        try:
            _session(kind, twin)
        finally:
            twin.stop()
    kinds = checked_kinds(recorders[kind])
    seen = set(kinds)
    expected = {
        ("twin", "hello"),
        ("master", "welcome"),
        ("twin", "ready"),
        ("master", "shutdown"),
        ("master", "release"),
        ("twin", "raise"),
        ("master", "raise"),
        ("twin", "reply"),
        ("master", "reply"),
        ("twin", "request call_method"),  # the callbacks
    }
    ops = ["execute", "instantiate", "getattr", "setattr", "delattr", "call_method"]
    expected |= {("master", f"request {op}") for op in ops}
    assert expected <= seen, f"the session sent no {sorted(expected - seen)}; it sent {sorted(seen)}"


def test_a_frame_that_drifted_from_the_spec_is_refused() -> None:
    check_frame = _check_frame()
    assert check_frame(codec.dumps([3, [["pypy3", 5, 1]]]), "message", "twin") == "release"
    with pytest.raises(ProtocolError, match="release entry"):  # the layout messages.py once described
        check_frame(codec.dumps([3, [5]]), "message", "twin")
    with pytest.raises(ProtocolError, match="unknown operation 6"):
        check_frame(codec.dumps([0, 1, 1, 6, None]), "message", "master")
    with pytest.raises(ProtocolError, match="unknown key"):
        check_frame(codec.dumps({"ready": True, "debug": None}), "answer", "twin")
    with pytest.raises(ProtocolError, match="pickle on a sandboxed link"):
        pickled = codec.dumps([1, 1, Account()], lambda obj: (tags.PICKLE, b"\x80\x04N."))
        check_frame(pickled, "message", "twin", "sandboxed")
    dated = codec.dumps([1, 1, Account()], lambda obj: (tags.STD_VALUE, ["datetime.date", 2026, 1, 2]))
    assert check_frame(dated, "message", "twin", "sandboxed") == "reply"
    for content in ([2026, "datetime.date"], "datetime.date"):
        frame = codec.dumps([1, 1, Account()], lambda obj, content=content: (tags.STD_VALUE, content))
        with pytest.raises(ProtocolError, match="40016|standard-library value"):
            check_frame(frame, "message", "twin")
    with pytest.raises(ValueError, match="sender must be"):
        check_frame(codec.dumps([1, 1, None]), "message", "guest")


@pytest.mark.parametrize("kind", KINDS)
def test_a_reference_going_back_to_its_owner_carries_no_class(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/protocol.md, tag 40012: a proxy sent back to its owner (the target
    of a call on it, or an argument) is ``[owner, id, null]``. The owner finds
    its own object by the ids; a class (a module's function names, what a
    guest was granted) would be decoded there on every call for nothing."""
    from cpy2py import kernel_state

    TwinMaster(twinterpreter_id=kind).stop()
    with recording(monkeypatch) as recorders:
        twin = start_twin(kind)
        try:
            counter = native_to(kind, Counter)(1)
            assert counter.increment(2) == 3  # a call on the proxy: its target goes home
            caller = native_to(kind, Caller)()
            assert caller.same(counter) is counter  # an argument going home
            account = Account()
            handed = expose(account, "deposit") if kind == SANDBOX_KIND else account
            assert caller.call_method(handed, "deposit", 5) == 5  # the twin calls the master's object
        finally:
            twin.stop()
    references: list = []  # (sender, [owner, id, class]) of every twin reference

    for sender, payload in recorders[kind].frames:
        codec.loads(
            payload,
            lambda tag, value, s=sender: references.append((s, value)) if tag == tags.TWIN_REF else value,
        )
    home = [
        (sender, ref)
        for sender, ref in references
        if ref[0] == (kind if sender == "master" else kernel_state.TWIN_ID)
    ]
    away = [(sender, ref) for sender, ref in references if (sender, ref) not in home]
    assert {sender for sender, _ in home} == {"master", "twin"}, references
    assert all(ref[2] is None for _, ref in home), home
    assert away and all(ref[2] is not None for _, ref in away), away  # new proxies need their class
