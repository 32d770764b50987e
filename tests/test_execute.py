"""TwinMaster.execute: calls, results, exceptions and payloads on native twins."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
import threading
import time
import traceback

import pytest
import twin_classes
import twin_helpers
from cpy2py import RemoteError, TwinMaster, is_proxy
from cpy2py.errors import RemoteTraceback
from support import SANDBOX_KIND, native_only, start_twin

MiB = 1 << 20


@pytest.fixture(params=["python3", "pypy3", SANDBOX_KIND], scope="module")
def twin(request):
    """This suite runs against native twins and the sandboxed guest."""
    master = start_twin(request.param)
    yield master
    master.stop()


def kind_of(twin) -> str:
    return twin.executable


def test_runs_in_the_twin_interpreter(twin):
    info = twin.execute(twin_helpers.identity)
    assert info["pid"] != os.getpid()
    expected = "pypy" if twin.twinterpreter_id == "pypy3" else "cpython"  # the guest is CPython too
    assert info["implementation"] == expected
    assert info["twin_id"] == twin.twinterpreter_id


def test_positional_and_keyword_arguments(twin):
    assert twin.execute(twin_helpers.add, 1, 2, 3, 4, scale=10) == 100
    assert twin.execute(twin_helpers.add, 5) == 5


def test_builtins_and_picklable_callables(twin):
    assert twin.execute(pow, 2, 10) == 1024
    assert twin.execute(len, [1, 2, 3]) == 3
    native_only(kind_of(twin), "nothing is pickled into a guest")
    assert twin.execute(functools.partial(pow, 3), 2) == 9


def test_builtin_types_and_generic_aliases_cross_both_ways(twin):
    """``type(None)`` and its kin, and ``list[int]``: PyPy names the first
    ``builtins.NoneType`` (which CPython's builtins lack) and pickles the
    second by a module of its own; both failed to reach a CPython master."""
    native_only(kind_of(twin), "classes are not handed to a guest by name")
    made_there = (
        "[type(None), type(...), type(NotImplemented), list[int], dict[str, list[int]], tuple[int, ...]]"
    )
    values = [type(None), type(...), type(NotImplemented), list[int], dict[str, list[int]], tuple[int, ...]]
    assert twin.execute(eval, made_there) == values
    assert twin.execute(twin_helpers.echo, values) == values


def test_a_function_the_twin_cannot_find_is_not_run_here_instead(twin):
    """``execute`` runs its callable in the twin; a lambda or a closure has no
    name there, and would otherwise go as a proxy and run in the master."""

    def make(n):
        def task():
            return os.getpid(), n

        return task

    for func, why in ((lambda: os.getpid(), "a lambda has no name"), (make(1), "local to a function")):
        if kind_of(twin) == SANDBOX_KIND:
            why = "in the sandboxed twin"
        with pytest.raises(TypeError, match=f"cannot run .*{why}"):
            twin.execute(func)
    assert twin.execute(os.getpid) != os.getpid()  # and the link goes on


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        -(2**70),
        2**64,
        1.5,
        float("inf"),
        "ünïcode ✓",
        "name-\udcff.txt",  # os.fsdecode of a file name that is not UTF-8: lone surrogates
        {"\ud800": ["\udfff"]},
        b"\x00\xff",
        bytearray(b"mutable"),
        (1, (2, 3)),
        [1, [2, [3]]],
        {"a": 1, 2: "b", (3, 4): None},
        {1, 2, 3},
        frozenset({"x"}),
        3 + 4j,
    ],
    ids=repr,
)
def test_values_round_trip(twin, value):
    back = twin.execute(twin_helpers.echo, value)
    assert back == value and type(back) is type(value)


def test_a_long_str_held_many_times_crosses_once(twin):
    """A str or bytes held many times by a value (a thousand references to
    one 1 MB str) crosses once and arrives as one object held that many
    times, as pickle makes it. Before, each reference was a copy: 1 GB on
    the wire and in the twin (a guest ran out of memory). Native twins send
    theirs so too; a sandboxed guest's values are trees."""
    text, data = "é" * 1_000_000, b"\x00" * 100
    assert twin.execute(twin_helpers.all_the_same, [text] * 1000) is True
    assert twin.execute(twin_helpers.all_the_same, [data] * 1000) is True
    assert twin.execute(twin_helpers.all_the_same, {"k": [text, text]}["k"]) is True
    if kind_of(twin) != SANDBOX_KIND:
        back = twin.execute(twin_helpers.repeated, 1_000_000, 1000)
        assert len(back) == 1000 and back[0] == "x" * 1_000_000
        assert all(item is back[0] for item in back)


def test_a_value_keeps_the_parts_it_shares_and_its_cycles(twin):
    """A container that a value holds twice arrives as one object, held
    twice, as pickle would make it; a value that holds itself arrives
    holding itself; a value whose tree is exponential in its size (a list
    of two references to one list, 60 levels deep) crosses at once. In
    both directions with native twins; a sandboxed guest receives them so
    too, but what it sends is a tree: its shared parts arrive as copies,
    and a cycle fails with a ValueError that says why."""
    a = [1, 2]
    assert twin.execute(twin_helpers.identities, [a, a, {"k": a}]) == [True, True]
    looped: list = [1]
    looped.append([looped])
    assert twin.execute(twin_helpers.holds_itself, looped) is True
    assert twin.execute(twin_helpers.identities, [twin_helpers.doubled(60)] * 2 + [{"k": []}]) == [
        True,
        False,
    ]
    deep: list = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(ValueError, match="MAX_DEPTH"):  # deep, not shared: said as it is
        twin.execute(twin_helpers.echo, deep)
    if kind_of(twin) == SANDBOX_KIND:
        back = twin.execute(twin_helpers.echo, [a, a])
        assert back == [a, a] and back[0] is not back[1]
        with pytest.raises(ValueError, match="contains itself .a list holds itself.*tree"):
            twin.execute(twin_helpers.echo, looped)
        with pytest.raises(ValueError, match="contains itself .a dict holds itself"):
            twin.execute(twin_helpers.cyclic, "dict")
    else:
        back = twin.execute(twin_helpers.echo, [a, a, {"k": a}])
        assert back[0] is back[1] is back[2]["k"] == a and back[0] is not a
        back = twin.execute(twin_helpers.echo, looped)
        assert back is not looped and back[0] == 1 and back[1][0] is back
        again = twin.execute(twin_helpers.cyclic, "dict")  # made there, with its cycle
        assert again["self"] is again
        dag = twin.execute(twin_helpers.doubled, 60)
        assert dag[0] is dag[1] and dag[0][0] is dag[0][1]
        # one call's arguments are one value: what they share stays shared
        args, kwargs = twin.execute(twin_helpers.echo_all, 5, looped, key=looped)
        assert args[0] == 5 and args[1][1][0] is args[1] and kwargs["key"] is args[1]
        # a tuple that holds itself through a list cannot be referred to
        # before it is made: it goes as a pickle, which keeps it
        knot: tuple = ([],)
        knot[0].append(knot)
        back = twin.execute(twin_helpers.echo, knot)
        assert back[0][0] is back
    assert twin.execute(twin_helpers.echo, [looped[0]]) == [1]


def test_an_object_in_a_shared_value_is_handed_once_and_released(twin):
    """A value that shares a container is encoded twice (looked at, then
    written with references): what the first pass handed the twin of this
    side's objects (a proxy of a generator here) is taken back before the
    second, so the twin's one proxy, once dropped, leaves nothing pinned."""
    native_only(kind_of(twin), "a generator of the master is never handed to a guest")
    pinned = _handed_to(twin)
    numbers = (n for n in range(3))
    shared = [numbers]
    assert twin.execute(twin_helpers.identities, [shared, shared, {"k": shared}]) == [True, True]
    _wait_for_releases(twin, pinned)


def _handed_to(twin) -> int:
    """How many of this side's objects ``twin`` holds references to."""
    from cpy2py import master as master_module

    return len(master_module._running[twin.twinterpreter_id].connection.handed)


def _wait_for_releases(twin, pinned: int) -> None:
    """Until ``twin`` holds references to ``pinned`` of this side's objects
    again: its proxies went with the call, and its releases come with the
    next frame (a collection there is that frame)."""
    import gc

    for _ in range(50):
        twin.execute(gc.collect)
        if _handed_to(twin) == pinned:
            break
        time.sleep(0.05)
    assert _handed_to(twin) == pinned


def test_a_twin_object_held_twice_by_a_pickled_record_is_one_reference(twin):
    """A record that only pickle carries, holding one of this side's twin
    objects twice, crosses with one reference to it (the pickle's memo
    keeps the two the same): one proxy there, which answers, and once it is
    dropped nothing of it stays handed."""
    native_only(kind_of(twin), "a guest's values are never pickled")
    pinned = _handed_to(twin)
    counter = twin_classes.Counter(5)
    record = twin_helpers.Sample("held twice", twin_helpers.Shade.DARK, [counter, counter])
    assert twin.execute(twin_helpers.proxy_held_twice, record) == (True, 6)
    assert counter.value == 6  # (the twin's proxy reached this very object)
    _wait_for_releases(twin, pinned)


def test_plain_objects_are_copied(twin):
    original = [1, 2, 3]
    back = twin.execute(twin_helpers.echo, original)
    assert back == original and back is not original


def test_many_objects_only_pickle_carries_cross_as_one_pickle_per_container():
    """A message whose containers hold many objects that only pickle carries
    (records, enums, dates) sends each such container as one pickle, as
    multiprocessing does; below ``MANY_PICKLES`` each object is a pickle of
    its own, and a container holding an exception or something pickle
    cannot carry goes an object at a time, as before."""
    import datetime

    from cpy2py.kernel import references
    from cpy2py.kernel.serialization import Serializer
    from cpy2py.protocol import codec_py, tags
    from cpy2py.protocol.messages import REPLY

    def pickles_in(value):
        found = []

        def hook(tag, content):
            found.append(tag)
            return None

        codec_py.loads(references.encode([REPLY, 1, value], Serializer("peer").default), hook)
        return found.count(tags.PICKLE), found.count(tags.EXCEPTION)

    many = twin_helpers.samples(references.MANY_PICKLES)
    assert pickles_in(many) == (1, 0)
    assert pickles_in({"when": [datetime.date(2026, 12, 7)] * 500}) == (1, 0)
    assert pickles_in(many[:-1]) == (references.MANY_PICKLES - 1, 0)
    assert pickles_in(many + [ValueError("kept")]) == (references.MANY_PICKLES, 1)


@pytest.mark.parametrize("kind", ["python3", "pypy3"])
def test_many_plain_objects_cross_whole_with_what_cannot_be_pickled_among_them(kind):
    """Sent as one pickle, many objects keep what they share; with a local
    function or an exception among them, each goes as before (the function
    as a proxy, which comes back as itself)."""
    master = start_twin(kind)
    try:
        items = twin_helpers.samples(300)
        items.append(items[7])
        back = master.execute(twin_helpers.echo, items)
        assert back == items and back[-1] is back[7]
        assert twin_helpers.samples(300) == master.execute(twin_helpers.samples, 300)

        def local_function():
            return os.getpid()

        back = master.execute(twin_helpers.echo, [*items, local_function])
        assert back[:-1] == items and back[-1] is local_function
        back = master.execute(twin_helpers.echo, {"items": items, "error": KeyError("k")})
        assert back["items"] == items and type(back["error"]) is KeyError and back["error"].args == ("k",)
        # a list held by two arguments arrives as one list, many pickles or not
        back = master.execute(twin_helpers.echo_all, items, key=items)
        assert back[0][0] == items and back[0][0] is back[1]["key"]
    finally:
        master.stop()


@pytest.mark.parametrize("size", [0, 1, MiB + 1, 64 * MiB], ids=["0B", "1B", "1MiB+1", "64MiB"])
def test_payload_sizes(twin, size):
    if size > MiB + 1:
        native_only(kind_of(twin), "a guest's frames are capped at 64 MiB (docs/security.md)")
    payload = os.urandom(size) if size <= MiB + 1 else bytes(range(256)) * (size // 256)
    assert twin.execute(twin_helpers.echo, payload) == payload


def test_large_byte_strings_anywhere_in_a_value_arrive_whole_and_in_place(twin):
    """Large byte strings travel as parts of their frame, not copied into it
    (``dumps(..., parts=True)``, written with writev), and a large frame comes
    to the master as a ``Frame`` read in place: wherever they sit in a value,
    with small ones and other items around them, they come back in order."""
    big = [bytes([i]) * (64 * 1024 + i) for i in range(5)]
    value = [big[0], {"k": big[1], "small": b"x" * 100}, (7, big[2], "text"), [[big[3]]], b"", big[4]]
    back = twin.execute(twin_helpers.echo, value)
    assert back == value and [type(v) for v in back] == [type(v) for v in value]
    assert twin.execute(twin_helpers.echo, big[2]) == big[2]  # a frame that ends with its byte string


@pytest.mark.parametrize("kind", ["python3", "pypy3"])
def test_the_master_reads_a_large_replys_byte_strings_apart(kind, monkeypatch):
    """A native twin's large reply reaches the kernel as a Frame whose large
    byte strings were read straight into their own bytes objects (the value
    the caller gets is that object, not a copy of part of the frame)."""
    from frame_recorder import recording

    with recording(monkeypatch) as recorders:
        master = start_twin(kind, f"{kind}-large-frames")
    try:
        value = [b"x" * (1 << 20), "text", b"y" * (200 * 1024)]
        assert master.execute(twin_helpers.echo, value) == value
        large = recorders[master.twinterpreter_id].large
        assert any("2 byte strings read apart" in r for r in large), large
    finally:
        master.stop()


@pytest.mark.parametrize("kind", ["python3", "pypy3"])
def test_a_request_of_tens_of_kib_goes_out_while_its_caller_reads(kind):
    """A request larger than one all-or-nothing pipe write, for which the
    pipe has room, still goes out at once while its caller holds the link's
    reading role (``send_now``), so the caller reads the reply itself: had
    it been sent without the role, a server thread of the master could read
    the reply first and hand it over (two thread switches, a tenth of a
    10k-int list's echo when both processes share a CPU)."""
    from cpy2py.master import connection_for

    master = start_twin(kind, f"{kind}-mid-frames")
    try:
        link = connection_for(master.twinterpreter_id, master)
        sent_now = []
        send_now = link._send_now

        def recorded(payload):
            went = send_now(payload)
            sent_now.append((len(payload), went))
            return went

        link._send_now = recorded
        value = list(range(10_000))  # a request of about 30 KB
        assert master.execute(twin_helpers.echo, value) == value
        assert [went for size, went in sent_now if size > 20_000] == [True]
        assert not link._reading
    finally:
        master.stop()


def test_exception_same_type_with_remote_traceback(twin):
    with pytest.raises(ValueError) as info:
        twin.execute(twin_helpers.fail_with, ValueError, "boom")
    err = info.value
    assert err.args == ("boom",)
    assert isinstance(err.__cause__, RemoteTraceback)
    assert "fail_with" in err.__cause__.traceback_text
    printed = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    assert "twin_helpers.py" in printed and "raise kind(*args)" in printed
    # the twin's traceback is shown under its id
    assert f"RemoteTraceback: in twinterpreter {twin.twinterpreter_id!r}:" in printed, printed
    # the twin's side shows the application's frames, not cpy2py's own
    assert "kernel" not in err.__cause__.traceback_text, err.__cause__.traceback_text


def test_a_call_recursing_across_interpreters_prints_the_applications_frames(twin):
    """Each hop of master -> twin -> master adds the application's frames to
    the traceback, not the kernel's that carried the call."""

    def fail_here():
        twin_helpers.fail_with(ValueError, "deep")

    with pytest.raises(ValueError) as info:
        twin.execute(twin_helpers.call, fail_here)  # the twin calls back here
    text = info.value.__cause__.traceback_text
    assert "in call" in text, text
    if kind_of(twin) != SANDBOX_KIND:  # (a guest is told nothing of the master's code)
        assert "fail_here" in text and "raise kind(*args)" in text, text
    assert "kernel" not in text, text


def test_application_exception_types(twin):
    native_only(kind_of(twin), "guest exceptions become builtins or RemoteError, never looked up")
    with pytest.raises(twin_helpers.CustomError, match="custom"):
        twin.execute(twin_helpers.fail_with, twin_helpers.CustomError, "custom")
    with pytest.raises(twin_helpers.NeedsTwoArgs) as info:
        twin.execute(twin_helpers.fail_with, twin_helpers.NeedsTwoArgs, 7, "seven")
    assert info.value.args == (7, "seven")


def test_exceptions_keep_the_attributes_they_were_given(twin):
    """Not only their args: what __init__ stored (with a default the args
    alone would restore wrongly), attributes set later, notes, and an
    OSError's file name, where the receiver can rebuild them."""
    native_only(kind_of(twin), "guest exceptions become builtins or RemoteError, never looked up")
    with pytest.raises(twin_helpers.HTTPError) as info:
        twin.execute(twin_helpers.fail_with, twin_helpers.HTTPError, "not found", 404)
    assert (info.value.args, info.value.status) == (("not found",), 404)
    with pytest.raises(twin_helpers.StatusError) as info:  # (made again, it was "HTTP HTTP 404")
        twin.execute(twin_helpers.fail_with, twin_helpers.StatusError, 404)
    assert (str(info.value), info.value.args, info.value.status) == ("HTTP 404", ("HTTP 404",), 404)
    with pytest.raises(json.JSONDecodeError) as info:
        twin.execute(twin_helpers.fail_with_details)
    err = info.value
    assert (err.pos, err.lineno, err.colno, err.doc, err.request_id) == (6, 1, 7, '{"a": }', "r-17")
    if sys.version_info >= (3, 11) and kind_of(twin) == "python3":
        assert err.__notes__ == ["while reading the settings"]
    with pytest.raises(FileNotFoundError) as info:
        twin.execute(open, "/nonexistent/cpy2py/file")
    assert info.value.filename == "/nonexistent/cpy2py/file"
    assert "/nonexistent/cpy2py/file" in str(info.value)


def test_deep_remote_traceback(twin):
    with pytest.raises(KeyError) as info:
        twin.execute(twin_helpers.fail_deep, 5)
    assert info.value.__cause__.traceback_text.count("fail_deep") >= 6


def test_unknown_exception_type_becomes_remote_error(twin):
    with pytest.raises(RemoteError) as info:
        twin.execute(twin_helpers.raise_local_type)
    assert "OnlyInTheTwin" in info.value.type_name
    assert "local type" in str(info.value)
    assert "raise_local_type" in info.value.traceback_text


def test_an_exception_of_a_type_the_receiver_cannot_find_is_caught_as_its_builtin_base(twin):
    """A twin's exception of a type the master cannot find (a class local to a
    function, a module only the twin has) is a RemoteError that also derives
    from the builtin type that type derives from: ``except ValueError``
    catches it. It keeps the type name, message, remote traceback and notes."""
    with pytest.raises(ValueError) as info:
        twin.execute(twin_helpers.raise_local_subclass, "ValueError", "bad value", note="while parsing")
    err = info.value
    assert isinstance(err, RemoteError) and type(err).__name__ == "RemoteValueError"
    assert err.type_name == "twin_helpers.raise_local_subclass.<locals>.LocalError"
    assert str(err) == "twin_helpers.raise_local_subclass.<locals>.LocalError: bad value"
    assert "raise_local_subclass" in err.traceback_text and isinstance(err.__cause__, RemoteTraceback)
    assert err.__notes__ == ["while parsing"]
    with pytest.raises(KeyError) as info:
        twin.execute(twin_helpers.raise_of_a_module_only_here, "missing")
    assert isinstance(info.value, RemoteError) and type(info.value).__name__ == "RemoteKeyError"
    assert info.value.type_name == "only_in_this_twin.MissingThere"
    with pytest.raises(LookupError):  # (a base of the base)
        twin.execute(twin_helpers.raise_local_subclass, "IndexError", "out of range")
    with pytest.raises(OSError) as info:  # (test_an_os_error_of_a_type_the_receiver_cannot_find...)
        twin.execute(twin_helpers.raise_local_subclass, "OSError", "no such thing")
    assert isinstance(info.value, RemoteError) and info.value.errno is None
    assert str(info.value) == "twin_helpers.raise_local_subclass.<locals>.LocalError: no such thing"
    native_only(kind_of(twin), "a guest names the nearest builtin base only (test_wasi.py)")
    # the nearest builtin base with a plain constructor: UnicodeDecodeError's is ValueError
    with pytest.raises(ValueError) as info:
        twin.execute(
            twin_helpers.raise_local_subclass, "UnicodeDecodeError", "utf-8", b"\xff", 0, 1, "invalid"
        )
    assert type(info.value).__name__ == "RemoteValueError"

    # the other way: the master's exception of a type the twin cannot find
    def master_only():
        class OnlyInTheMaster(ValueError):
            pass

        raise OnlyInTheMaster("from the master")

    name = f"{__name__}.{master_only.__qualname__}.<locals>.OnlyInTheMaster"
    caught = twin.execute(twin_helpers.caught_as, "ValueError", master_only)
    assert caught == ("RemoteValueError", f"{name}: from the master")


def test_an_os_error_of_a_type_the_receiver_cannot_find_keeps_its_errno_and_file_names(twin):
    """Such an exception whose type derives from OSError is a RemoteOSError:
    ``except OSError`` catches it (``except FileNotFoundError`` one of a
    FileNotFoundError subclass), and it has the errno, strerror and file
    names it had in the twin; its message is what OSError's str says of
    them. Its errno does not make it another subclass (it did not there)."""
    from cpy2py.errors import RemoteFileNotFoundError, RemoteOSError

    name = "twin_helpers.raise_local_subclass.<locals>.LocalError"
    with pytest.raises(OSError) as info:
        twin.execute(
            twin_helpers.raise_local_os_error, "OSError", "ENOSPC", "no space left", "/mnt/a", None, "/mnt/b"
        )
    err = info.value
    assert type(err) is RemoteOSError and isinstance(err, RemoteError) and err.type_name == name
    assert (err.errno, err.strerror, err.filename, err.filename2) == (
        errno.ENOSPC,
        "no space left",
        "/mnt/a",
        "/mnt/b",
    )
    assert str(err) == f"{name}: [Errno {errno.ENOSPC}] no space left: '/mnt/a' -> '/mnt/b'"
    assert err.message == f"[Errno {errno.ENOSPC}] no space left: '/mnt/a' -> '/mnt/b'"
    assert "raise_local_subclass" in err.traceback_text and isinstance(err.__cause__, RemoteTraceback)
    with pytest.raises(FileNotFoundError) as info:  # the nearest builtin base
        twin.execute(twin_helpers.raise_local_os_error, "FileNotFoundError", "ENOENT", "gone", "a.txt")
    err = info.value
    assert type(err) is RemoteFileNotFoundError and isinstance(err, RemoteOSError)
    assert (err.errno, err.strerror, err.filename, err.filename2) == (errno.ENOENT, "gone", "a.txt", None)
    assert str(err) == f"{name}: [Errno {errno.ENOENT}] gone: 'a.txt'"
    with pytest.raises(ConnectionError) as info:  # (a base of the base)
        twin.execute(twin_helpers.raise_local_os_error, "ConnectionResetError", "ECONNRESET", "reset")
    assert type(info.value).__name__ == "RemoteConnectionResetError" and info.value.errno == errno.ECONNRESET
    with pytest.raises(OSError) as info:
        twin.execute(twin_helpers.raise_local_os_error, "OSError", "ENOENT", "gone")
    assert type(info.value) is RemoteOSError and str(info.value) == f"{name}: [Errno {errno.ENOENT}] gone"
    # its message says what a file name over 4300 digits is (repr refuses it:
    # the call failed with the master's ValueError), and cuts a long strerror
    with pytest.raises(OSError) as info:
        twin.execute(twin_helpers.raise_local_os_error, "OSError", "ENOENT", "x" * 5000, 10**5000)
    assert info.value.filename == 10**5000 and info.value.strerror == "x" * 5000
    assert info.value.message == f"[Errno {errno.ENOENT}] {'x' * 1000}...: <int of 16610 bits>"

    # the other way: the master's exception of a type the twin cannot find
    def master_only(path):
        class DiskGoneHere(OSError):
            pass

        raise DiskGoneHere(errno.ENOSPC, "no space left", path)

    seen = twin.execute(twin_helpers.os_error_caught, "OSError", master_only, "/mnt/a")
    if kind_of(twin) == SANDBOX_KIND:  # (a master exception reaches a guest as its builtin type)
        assert seen[:6] == ["OSError", False, "ENOSPC", "no space left", "/mnt/a", None], seen
        return
    master_name = f"{__name__}.{master_only.__qualname__}.<locals>.DiskGoneHere"
    message = f"[Errno {errno.ENOSPC}] no space left: '/mnt/a'"
    assert seen == [
        "RemoteOSError",
        True,
        "ENOSPC",
        "no space left",
        "/mnt/a",
        None,
        f"{master_name}: {message}",
    ]

    # and back: the twin's, through the master (a RemoteOSError there) to the twin
    def through_the_master():
        twin.execute(
            twin_helpers.raise_local_os_error, "PermissionError", "EACCES", "denied", "/etc/a", None, "b"
        )

    seen = twin.execute(twin_helpers.os_error_caught, "PermissionError", through_the_master)
    message = f"[Errno {errno.EACCES}] denied: '/etc/a' -> 'b'"
    assert seen == ["RemotePermissionError", True, "EACCES", "denied", "/etc/a", "b", f"{name}: {message}"]


def test_a_remote_os_error_copies_and_pickles_with_its_errno_and_file_names():
    """(OSError's own __reduce__ would pass them as its args, which are a
    RemoteError's; PyPy's __setstate__ would hide them in its __dict__.)"""
    import copy
    import pickle

    from cpy2py.errors import RemoteFileNotFoundError, RemoteOSError

    for kind in (RemoteOSError, RemoteFileNotFoundError):
        err = kind(
            "app.Err", "[Errno 2] gone: 'a'", "text", errno=2, strerror="gone", filename="a", filename2="b"
        )
        for made in (copy.copy(err), pickle.loads(pickle.dumps(err))):
            assert type(made) is kind
            assert (made.type_name, made.message, made.traceback_text) == (
                "app.Err",
                "[Errno 2] gone: 'a'",
                "text",
            )
            assert (made.errno, made.strerror, made.filename, made.filename2) == (2, "gone", "a", "b")
            assert str(made) == "app.Err: [Errno 2] gone: 'a'" and made.args == err.args


def test_the_builtin_base_of_an_exception_type_not_found_is_taken_from_builtins_only():
    """What a trusted peer names as its exception type's builtin base (the
    ``__cpy2py_base__`` key of its attributes) is looked up among the
    builtin Exception types only, and is never set as an attribute."""
    from cpy2py.kernel.serialization import BASE_KEY, Serializer, _Unresolved

    serializer = Serializer("exceptions")

    def made(state, kind=None):
        return serializer._exception([kind or _Unresolved("app", "Err"), ["message"], None, state])

    assert type(made({BASE_KEY: "LookupError"})).__name__ == "RemoteLookupError"
    assert type(made({BASE_KEY: "UnicodeDecodeError"})).__name__ == "RemoteValueError"
    for base in ("KeyboardInterrupt", "SystemExit", "os", "RemoteError", 3):
        err = made({BASE_KEY: base})
        assert type(err) is RemoteError and str(err) == "app.Err: message", base
    # an OSError's: its errno, strerror and file names are among the attributes
    err = made({BASE_KEY: "FileNotFoundError", "errno": 2, "strerror": "gone", "filename": "a", "x": 1})
    assert type(err).__name__ == "RemoteFileNotFoundError" and isinstance(err, RemoteError)
    assert (err.errno, err.strerror, err.filename, err.filename2) == (2, "gone", "a", None)
    assert str(err) == "app.Err: [Errno 2] gone: 'a'" and not hasattr(err, "x")
    err = made({BASE_KEY: "OSError"})
    assert type(err).__name__ == "RemoteOSError" and str(err) == "app.Err: message" and err.errno is None
    err = made({BASE_KEY: "ValueError", "status": 404, "__notes__": ["noted"]})
    assert err.__notes__ == ["noted"] and not hasattr(err, "status")  # (a RemoteError's own attributes stay)
    err = made({BASE_KEY: "ValueError", "status": 404}, kind=twin_helpers.CustomError)
    assert type(err) is twin_helpers.CustomError and err.status == 404 and not hasattr(err, BASE_KEY)


def test_os_errors_keep_their_subclass(twin):
    with pytest.raises(FileNotFoundError):
        twin.execute(open, "/nonexistent/cpy2py/file")


def test_uncopyable_result_becomes_a_proxy(twin):
    remote_lambda = twin.execute(twin_helpers.unpicklable_result)
    assert is_proxy(remote_lambda)
    assert remote_lambda() is None  # called where it lives


def test_builtin_iterators_and_callables_arrive_usable(twin):
    """What each interpreter pickles its own way (PyPy rebuilds builtin
    iterators with a module of its own) arrives as a copy where the master
    can rebuild it and as a proxy where not: usable either way."""
    got = twin.execute(twin_helpers.builtin_iterators_and_callables)
    assert list(got["range"]) == [0, 1, 2]
    assert list(got["keys"]) == ["a", "b"]
    assert list(got["items"]) == [("a", 1)]
    assert got["itemgetter"]([5, 6]) == 6
    assert got["attrgetter"](3) == 3
    assert got["methodcaller"]("x") == "X"
    got["append"](8)  # a bound method: of the twin's list, or of a copy of it
    assert got["numbers"][:3] == [5, 6, 7]
    assert got["a key named like the module"] == {"_pickle_support": "_operator"}


def test_uncopyable_argument_comes_back_as_itself(twin):
    def local_function():
        return os.getpid()

    back = twin.execute(twin_helpers.echo, local_function)
    assert back is local_function
    # the twin calls it through its proxy: it runs here, in the master
    assert twin.execute(twin_helpers.call, local_function) == os.getpid()


def test_too_deep_value_is_refused_locally_and_link_survives(twin):
    deep: list = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper"):
        twin.execute(twin_helpers.echo, deep)
    assert twin.execute(twin_helpers.echo, 2) == 2


def test_name_missing_in_twin_fails_the_call_only(twin, tmp_path, monkeypatch):
    native_only(kind_of(twin), "a guest refuses what it cannot import before sending (TypeError)")
    # a module that exists only for the master: the twin cannot import it
    (tmp_path / "only_in_master.py").write_text("def f():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_in_master

    with pytest.raises(LookupError, match="only_in_master"):
        twin.execute(only_in_master.f)
    assert twin.execute(twin_helpers.echo, 3) == 3


def test_an_argument_the_twin_cannot_rebuild_fails_the_call_saying_where(twin, tmp_path, monkeypatch):
    """An argument pickled here whose module the twin cannot import: the call
    raises what rebuilding it raised there, with a note that names the twin
    and says it was rebuilding what the call sent (the error alone, numpy's
    say, does not tell that a cpy2py call was involved)."""
    native_only(kind_of(twin), "a guest takes no pickles: the value is refused before it is sent")
    (tmp_path / "master_only_values.py").write_text("class Value:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import master_only_values

    with pytest.raises(ImportError) as raised:
        twin.execute(twin_helpers.echo, master_only_values.Value())
    notes = getattr(raised.value, "__notes__", [])
    assert any(twin.twinterpreter_id in note and "rebuilding" in note for note in notes), notes
    assert twin.execute(twin_helpers.echo, 3) == 3


def test_output_reaches_the_master_and_does_not_corrupt_the_protocol(kind, capfd):
    # a twin of its own: it shares the master's stdout as it is when started
    with TwinMaster(kind, twinterpreter_id=f"{kind}-talker") as twin:
        assert twin.execute(twin_helpers.talk, "hello from the twin") == "talked"
        assert twin.execute(twin_helpers.echo, "still fine") == "still fine"
    out, err = capfd.readouterr()
    assert "hello from the twin" in out
    assert "raw fd 1 output" in out
    assert "raw fd 2 output" in err and "stderr text" in err


def test_all_a_twin_wrote_to_stderr_is_forwarded_when_stop_returns(kind, capfd):
    with TwinMaster(kind, twinterpreter_id=f"{kind}-shouter") as twin:
        assert twin.execute(twin_helpers.shout, 20000) == 20000
    _, err = capfd.readouterr()
    assert "line 19999 of what the twin said on its way out" in err


def test_a_native_twin_is_set_up_for_large_frames_and_the_user_settings_win(kind, monkeypatch):
    """docs/architecture.md, "Large payloads": 256 KiB pipes to and from the
    twin, glibc's malloc thresholds raised in it, except those the user set."""
    native_only(kind, "a guest has neither pipes nor glibc's malloc")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    with TwinMaster(kind, twinterpreter_id=f"{kind}-large-frames") as twin:
        names = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
        assert twin.execute(twin_helpers.environ_get, names) == {
            "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
            "MALLOC_TRIM_THRESHOLD_": "12345",
        }
        assert twin.execute(twin_helpers.link_pipe_sizes) == [256 << 10, 256 << 10]


def test_threads_get_their_own_replies(twin):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: twin.execute(twin_helpers.add, i, i), range(200)))
    assert results == [2 * i for i in range(200)]


@pytest.mark.parametrize("caller", ["main thread", "worker thread"])
def test_a_long_call_does_not_keep_the_master_busy(twin, caller):
    """The master polls for a reply for a moment before it sleeps (host/src/spin.rs),
    from its main thread and from a thread that calls alone: a call that takes
    0.3 s costs it about nothing of its CPU meanwhile."""
    twin.execute(twin_helpers.sleep_then, 0.0)  # (a first call: imports and the like)
    answers = []

    def call():
        answers.append(twin.execute(twin_helpers.sleep_then, 0.3, "done"))

    started = time.process_time()
    if caller == "main thread":
        call()
    else:
        worker = threading.Thread(target=call)
        worker.start()
        worker.join()
    assert time.process_time() - started < 0.1
    assert answers == ["done"]


def test_an_idle_twin_is_not_kept_busy(twin):
    """A twin's server polls the link for a moment after a request before it
    sleeps: a twin left alone for 0.3 s uses about nothing of its CPU."""
    native_only(kind_of(twin), "a guest runs in the master, only when called")
    before = twin.execute(twin_helpers.cpu_seconds)
    time.sleep(0.3)
    assert twin.execute(twin_helpers.cpu_seconds) - before < 0.1
