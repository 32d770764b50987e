"""Hostile peers (issue 6): a twin that does the handshake right and then
speaks the protocol badly (tests/fakes/hostile_twin.py).

For every kind of bad input the master raises ``cpy2py.ProtocolError`` for
that twin - for the call in flight and for later calls - marks it broken,
kills it, and stays healthy: other twins carry on, new twins start, nothing
hangs, and memory does not balloon (a length prefix is checked before
anything is allocated for it).
"""

from __future__ import annotations

import os
import time

import pytest
import reliability_helpers as rh
from cpy2py import ProtocolError, TwinMaster
from cpy2py import master as master_module
from reliability_support import HANG, Calls, Loop, wait_gone
from support import TESTS_DIR

HOSTILE = os.path.join(TESTS_DIR, "fakes", "hostile_twin.py")

#: the master may grow by this much while it refuses one bad peer; a frame
#: allocated from a hostile length prefix (4 GiB, or the 1 GiB limit) would
#: be far more
RSS_SLACK = 64 << 20

MODES = [
    "truncated-frame",  # the stream ends inside a frame
    "truncated-large-bytes",  # ... inside a large byte string the master reads apart
    "truncated-cbor",  # a whole frame holding an incomplete CBOR item
    "huge-prefix",  # length prefix 2**32-1, the largest 4 bytes can say
    "limit-prefix",  # length prefix 2**30 (the limit), 3 bytes, the end
    "empty-frame",  # length prefix 0
    "unknown-tag",  # a CBOR tag outside the value model
    "unknown-kind",  # message kind 9
    "not-a-message",  # a map instead of a message array
    "empty-message",  # []
    "string-id",  # wrong types in known fields ...
    "short-reply",
    "float-kind",
    "string-chain",
    "bad-tuple",
    "bad-name-ref",
    "bad-twin-ref",
    "bad-exception",
    "bad-release",
    "deep-nesting",  # 100,000 nested arrays
    "never-sent",  # a reply to a request never sent
    "second-hello",  # the handshake again
    "garbage-frame",  # a frame of random bytes
    "garbage-stream",  # random bytes where a frame should start
]


@pytest.fixture(scope="module")
def bystander():
    """A healthy twin that must not notice the hostile ones."""
    with TwinMaster("python3", twinterpreter_id="hostile-bystander") as master:
        yield master


def hostile_pid(master: TwinMaster) -> int:
    return master_module._running[master.twinterpreter_id].process.pid


def wait_broken(master: TwinMaster) -> None:
    deadline = time.monotonic() + HANG
    while master.is_alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not master.is_alive, "the link to a hostile peer was not marked broken"


def check_master_healthy(bystander: TwinMaster, loop: Loop, name: str) -> None:
    assert loop.stop() > 0
    assert bystander.execute(rh.answer, "still", b"ok") == rh.answer("still", b"ok")
    with TwinMaster("python3", twinterpreter_id=f"after-{name}") as fresh:
        assert fresh.execute(rh.answer, "fresh", b"") == rh.answer("fresh", b"")


@pytest.mark.parametrize("mode", MODES)
def test_hostile_peer_is_refused_and_the_master_stays_healthy(mode, bystander):
    rss_before = rh.rss_bytes()
    hostile = TwinMaster(HOSTILE, twinterpreter_id=f"hostile-{mode}")
    hostile.start()
    pid = hostile_pid(hostile)
    try:
        loop = Loop(bystander)
        call = Calls(hostile, 1, rh.pid)  # the request the peer answers badly
        call.join()
        kind, outcome = call.outcomes[0]
        assert kind == "error" and isinstance(outcome, ProtocolError), (mode, call.outcomes[0])
        # later calls fail the same way, and say how to start anew
        with pytest.raises(ProtocolError, match=r"start\(\)"):
            hostile.execute(rh.pid)
        assert not hostile.is_alive
        assert wait_gone(pid), f"the hostile peer ({mode}) was not killed"
        check_master_healthy(bystander, loop, mode)
        grew = rh.rss_bytes() - rss_before
        assert grew < RSS_SLACK, f"the master grew by {grew >> 20} MiB refusing {mode}"
    finally:
        hostile.destroy()


def test_duplicate_reply_breaks_the_link_after_the_call(bystander):
    """The right reply, then the same reply again: the call gets the first;
    the second is a protocol error that breaks the link for later calls."""
    hostile = TwinMaster(HOSTILE, twinterpreter_id="hostile-duplicate-reply")
    hostile.start()
    pid = hostile_pid(hostile)
    try:
        assert hostile.execute(rh.pid) == "first"
        wait_broken(hostile)
        with pytest.raises(ProtocolError, match="request"):
            hostile.execute(rh.pid)
        assert wait_gone(pid)
        assert bystander.execute(rh.pid) != pid
    finally:
        hostile.destroy()


def test_many_hostile_peers_at_once(bystander):
    """Bad peers side by side, each refused on its own, while a good twin works."""
    modes = ["huge-prefix", "deep-nesting", "never-sent", "garbage-frame", "unknown-tag", "second-hello"]
    loop = Loop(bystander)
    masters = [TwinMaster(HOSTILE, twinterpreter_id=f"hostile-{mode}") for mode in modes]
    for master in masters:
        master.start()
    pids = [hostile_pid(master) for master in masters]
    try:
        calls = [Calls(master, 2, rh.pid) for master in masters]
        for call in calls:
            call.join()
            assert len(call.errors()) == 2 and all(isinstance(e, ProtocolError) for e in call.errors())
        for pid in pids:
            assert wait_gone(pid)
        check_master_healthy(bystander, loop, "many")
    finally:
        for master in masters:
            master.destroy()


def test_hostile_peer_runs_standalone():
    """The fake needs no installed cpy2py: it finds the package beside itself."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-I", HOSTILE], capture_output=True, text=True, timeout=HANG, env={"PATH": ""}
    )
    # without fds 3 and 4 it fails at its first write, after importing the codec
    assert "ModuleNotFoundError" not in result.stderr and "ImportError" not in result.stderr, result.stderr
    assert "Bad file descriptor" in result.stderr, result.stderr
