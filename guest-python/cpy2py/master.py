"""``TwinMaster``: start, use and stop a twinterpreter from the master.

A native twin is an interpreter subprocess spawned by the Rust host
(``cpy2py._host.NativeTwin``) with the protocol on dedicated pipes. It needs
nothing installed: the bootstrap below loads this very ``cpy2py`` package from
the master's copy.
"""

from __future__ import annotations

import _thread
import atexit
import os
import sys
import threading
import time
from importlib import import_module as importlib_import_module
from typing import Any, Dict, List, Optional, Set, Tuple

from . import _logging, kernel_state
from .errors import (
    ProtocolError,
    TwinStartError,
    TwinterpreterTerminated,
    TwinterpreterUnavailable,
    TwinTimeout,
)
from .kernel import group_state, links, main_module, references
from .kernel.connection import Connection, NotSent
from .kernel.serialization import Serializer
from .protocol import codec
from .protocol.messages import OP_CALL_METHOD, OP_EXECUTE, PROTOCOL_VERSION, SHUTDOWN
from .protocol.transport import release_signals, unblock_after_fork

log = _logging.get_logger("master")

#: kernels of the original cpy2py; all are served by the one thread-safe kernel now
KNOWN_KERNELS = (None, "single", "async", "multi")

#: exit status of the bootstrap on an interpreter that is too old
TOO_OLD_STATUS = 86

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# Runs in the twin with -c. It must parse on Python 2 too, to say clearly
# that the interpreter is too old instead of failing with a SyntaxError.
BOOTSTRAP = """\
import sys
if sys.version_info < (3, 9):
    sys.stderr.write("cpy2py: %s is Python %s; twinterpreters need Python 3.9 or newer\\n"
                     % (sys.executable, sys.version.split()[0]))
    sys.exit({too_old})
# The kernel's bytecode is cached in cpy2py's cache, only while it is
# imported: the twin's interpreter writes none under PYTHONDONTWRITEBYTECODE
# (common in containers) nor beside a read-only install (where pip compiled
# it for the master's interpreter only), and compiled the kernel at every
# start then (80 ms on pypy3). Its modules come from one file of bytecode
# (cpy2py/kernel_bundle.py); the rest of what it imports uses the prefix.
saved = sys.pycache_prefix, sys.dont_write_bytecode
sys.pycache_prefix, sys.dont_write_bytecode = {pycache!r}, False
try:
    # what importlib.util re-exports, without importing importlib.util (on
    # PyPy that is importlib.abc and typing: about a fifth of a twin's start)
    try:
        from _frozen_importlib_external import spec_from_file_location
        from _frozen_importlib import module_from_spec
    except ImportError:
        from importlib.util import spec_from_file_location, module_from_spec
    spec = spec_from_file_location("_cpy2py_kernel_bundle", {bundle!r})
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    bundle = module.Bundle({package!r}, {cache!r})
    del spec, module, spec_from_file_location, module_from_spec
    sys.meta_path.insert(0, bundle)
    try:
        from cpy2py.kernel.twin_main import main
    finally:
        bundle.finish()
        del bundle
finally:
    sys.pycache_prefix, sys.dont_write_bytecode = saved
    del saved
main()
"""


def _bootstrap() -> str:
    """The bootstrap, with where the kernel's bytecode is cached (read when
    a twin starts)."""
    from .cache_dir import cache_root

    cache = cache_root()
    return BOOTSTRAP.format(
        too_old=TOO_OLD_STATUS,
        bundle=os.path.join(_PACKAGE_DIR, "kernel_bundle.py"),
        package=_PACKAGE_DIR,
        cache=cache,
        pycache=os.path.join(cache, "kernel-pyc"),
    )


_ALIASES = {"pypy": "pypy3", "python": "python3"}

#: executables that name the sandboxed CPython-on-WASI guest instead of a program
SANDBOXED_EXECUTABLES = ("wasi-python",)


def is_sandboxed(executable: str) -> bool:
    return executable in SANDBOXED_EXECUTABLES


def _host() -> Any:
    try:
        from . import _host as host
    except ImportError as err:
        raise TwinStartError(
            "the compiled part of cpy2py (cpy2py._host) is not available in this interpreter, "
            "so it cannot start twinterpreters: install cpy2py with pip in this environment "
            f"or build it with `just build` ({err})"
        ) from None
    return host


def resolve_executable(executable: str) -> str:
    """The path of ``executable`` (a name on PATH or a path), or a clear error."""
    import shutil  # here, not at the top: twins import this module and never need it

    if os.sep in executable:
        if not os.path.exists(executable):
            raise TwinStartError(f"twinterpreter executable {executable!r} does not exist")
        if not os.access(executable, os.X_OK) or os.path.isdir(executable):
            raise TwinStartError(f"twinterpreter executable {executable!r} is not an executable file")
        return executable
    for name in (executable, _ALIASES.get(executable)):
        found = name and shutil.which(name)
        if found:
            return found
    alias = _ALIASES.get(executable)
    also = f" (nor {alias!r})" if alias else ""
    hint = " (on Debian: apt-get install pypy3)" if executable.startswith("pypy") else ""
    import difflib

    typed = executable.lower()
    kinds = ["python3", "pypy3", *SANDBOXED_EXECUTABLES, *_ALIASES]
    # a typo of a twin kind, most likely, or its start ("wasi"); an alias
    # named as what it stands for ("pypy4" is nearest "pypy": "pypy3")
    close = difflib.get_close_matches(typed, kinds, n=1, cutoff=0.6)
    close = close or [kind for kind in kinds if len(typed) >= 3 and kind.startswith(typed)][:1]
    meant = _ALIASES.get(close[0], close[0]) if close else None
    if meant and meant not in (executable, alias):  # (not what was looked for already)
        sandbox = " (the sandbox)" if is_sandboxed(meant) else ""
        hint += f"; did you mean {meant!r}{sandbox}?"
    raise TwinStartError(
        f"no executable named {executable!r}{also} on PATH: install that interpreter{hint} "
        f"or pass its path, e.g. TwinMaster(executable='/path/to/python3')"
    )


#: (stdlib dirs, prefixes) of this interpreter, and the real path of each
#: sys.path entry seen: computed once, not on every start (they cost about
#: 0.7 ms a start, the most of the master's own work in it)
_interpreter_dirs: Optional[Tuple[Set[str], Set[str]]] = None
_realpaths: Dict[Tuple[str, str], str] = {}


#: glibc's malloc, in native twins: buffers of up to 32 MiB come from the
#: heap, and up to 64 MiB of free heap is kept. By default each large frame
#: (bytes of a MiB) is mapped afresh and its pages faulted in, three times per
#: echo in a twin: a 1 MiB echo to a python3 twin took 3.9 ms, 1.1 ms with this
#: (docs/architecture.md, "Large payloads"). Other C libraries ignore it.
_MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}


def _realpath(entry: str) -> str:
    cwd = os.getcwd() if not os.path.isabs(entry) else ""
    key = (entry, cwd)
    path = _realpaths.get(key)
    if path is None:
        path = _realpaths[key] = os.path.realpath(entry or cwd)
    return path


def _path_config() -> Dict[str, List[str]]:
    """The master's sys.path for a twin: application entries go first, the
    master's package dirs last (so the twin's own packages win), its stdlib
    not at all (another interpreter has its own)."""
    global _interpreter_dirs
    if _interpreter_dirs is None:
        import sysconfig

        paths = sysconfig.get_paths()
        stdlib = {os.path.realpath(p) for p in (paths.get("stdlib"), paths.get("platstdlib")) if p}
        prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
        _interpreter_dirs = stdlib, prefixes
    stdlib, prefixes = _interpreter_dirs
    app_paths, site_paths = [], []
    for entry in sys.path:
        path = _realpath(entry)
        if path in stdlib or path.endswith((".zip", "lib-dynload")) or not os.path.isdir(path):
            continue
        if any(path == p or path.startswith(p + os.sep) for p in prefixes) or "-packages" in path:
            site_paths.append(path)
        else:
            app_paths.append(path)
    return {"app_paths": app_paths, "site_paths": site_paths}


class _Twin:
    """A running native twin: the process and the connection to it."""

    def __init__(self, master: TwinMaster, process: Any, connection: Connection) -> None:
        self.twin_id = master.twinterpreter_id
        self.master = master  # how it was started, to start it again
        self.executable = master.executable
        self.host = master.host
        self.sandboxed = is_sandboxed(master.executable)
        self.process = process
        self.connection = connection
        #: the group initializers its welcome carried
        self.welcomed: List[Any] = []

    @property
    def alive(self) -> bool:
        return self.connection.broken is None and self.process.exit_status() is None

    def shut_down(self, reason: str, timeout: float) -> None:
        """Ask the twin to exit, kill it if it does not within ``timeout``.

        Never waits longer: a twin that stopped reading (suspended, or stuck
        with its pipe full and a caller blocked in ``send``) cannot take the
        shutdown request, and is killed when ``timeout`` is over.
        """
        deadline = time.monotonic() + timeout
        sent = self.ask_to_exit(reason, deadline)
        self.end(sent, deadline)

    def ask_to_exit(self, reason: str, deadline: float) -> bool:
        """Mark the link ended and send the shutdown request if it can go
        before ``deadline``; whether it went."""
        self.connection.close(reason)
        links.unregister(self.twin_id, self.connection)
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return False
        payload = codec.dumps([SHUTDOWN, 0])
        try:
            if hasattr(self.process, "try_send"):  # a pipe, which may be full
                return bool(self.process.try_send(payload, timeout))
            self.process.send(payload)  # a sandboxed guest queues frames: sending never blocks
            return True
        except OSError:
            return False

    def end(self, sent: bool, deadline: float) -> None:
        """Wait for the twin to exit until ``deadline`` (if it was asked to),
        kill it otherwise, and close its descriptors at once (proxies of its
        objects may keep this handle alive for a long time)."""
        try:
            if not (sent and self.process.wait(max(0.0, deadline - time.monotonic())) is not None):
                self.process.kill()
        finally:
            close = getattr(self.process, "close", None)
            if close is not None:
                close()


class _Starting:
    """A twin being started: other threads that want it wait here."""

    def __init__(self) -> None:
        # held until the start ends, and let go by one call into C: a signal
        # handler cannot cut a finish in half (``Event.set`` is Python code,
        # and a Ctrl-C inside it left the waiters asleep for ever)
        self._running = _thread.allocate_lock()
        self._running.acquire()
        #: the start ended (its waiters are let go)
        self.ended = False
        self._error: Optional[BaseException] = None
        #: stop() or destroy() came while it started: it is stopped once up
        self.cancelled = False

    def finish(self, error: Optional[BaseException]) -> None:
        """The start ended (``error``: how it failed); the first call counts.
        Called again after an interruption anywhere in it, it does what is
        left: ``ended`` is set only after the waiters were let go."""
        if not self.ended:
            self._error = error
            try:
                self._running.release()
            except RuntimeError:  # (let go already, by the call this one repeats)
                pass
            self.ended = True

    def wait(self, twin_id: str) -> bool:
        with self._running:  # (each waiter in turn, at once: it is let go for good)
            pass
        if self._error is not None:
            raise TwinStartError(
                f"twinterpreter {twin_id!r} failed to start in another thread: {self._error}"
            ) from self._error
        return True


_running: Dict[str, _Twin] = {}
#: twin id -> the TwinMaster it was last started with: a twin restarted on
#: demand (after it died or was stopped) keeps its executable and options
_configs: Dict[str, TwinMaster] = {}
#: twin id -> the start in progress
_starting: Dict[str, _Starting] = {}
#: guards _running and _starting; never held while a twin starts or stops
_running_lock = threading.RLock()


class TwinMaster:
    """Control of one twinterpreter, identified by its twin id.

    ``TwinMaster('pypy3')`` names both the executable and the id; give
    ``executable`` and ``twinterpreter_id`` separately to run several twins
    of one interpreter. Objects and functions with ``__twin_id__`` or
    ``twinfunction(id)`` run in the twin of that id.
    """

    def __init__(
        self,
        executable: Optional[str] = None,
        twinterpreter_id: Optional[str] = None,
        kernel: Any = None,
        main_module: bool = True,
        run_main: bool = False,
        restore_argv: bool = False,
        handshake_timeout: float = 60.0,
        memory_limit: Optional[int] = None,
        timeout: Optional[float] = None,
        paths: Optional[List[str]] = None,
        output_limit: Optional[int] = None,
        fresh: bool = False,
        host: Optional[str] = None,
        ssh_options: Optional[List[str]] = None,
        placement: Any = None,
        packages: Optional[List[str]] = None,
        preload: Optional[List[str]] = None,
    ) -> None:
        if executable is None and twinterpreter_id is None:
            raise ValueError("TwinMaster needs an executable or a twinterpreter_id (or both)")
        known = None
        if executable is None and twinterpreter_id is not None:
            # the settings its twin runs with, else those it would start with
            running = _running.get(twinterpreter_id)
            known = (
                running.master if running is not None and running.alive else _configs.get(twinterpreter_id)
            )
        if known is not None:  # TwinMaster(twinterpreter_id=...) of a twin started before: same settings
            executable = known.executable
            memory_limit = known.memory_limit if memory_limit is None else memory_limit
            timeout = known.timeout if timeout is None else timeout
            paths = known.paths if paths is None else paths
            output_limit = known.output_limit if output_limit is None else output_limit
            fresh = fresh or known.fresh
            host = known.host if host is None else host
            ssh_options = known.ssh_options if ssh_options is None else ssh_options
            placement = known.placement if placement is None else placement
            packages = known.packages if packages is None else packages
            preload = known.preload if preload is None else preload
        if kernel not in KNOWN_KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}: use one of {KNOWN_KERNELS[1:]} or None")
        self.executable: str = executable if executable is not None else str(twinterpreter_id)
        self.twinterpreter_id: str = (
            twinterpreter_id if twinterpreter_id is not None else os.path.basename(self.executable)
        )
        if self.twinterpreter_id == kernel_state.MASTER_ID:
            raise ValueError(f"{self.twinterpreter_id!r} is the id of the master itself")
        self.kernel = kernel
        self.main_module = main_module
        self.run_main = run_main
        self.restore_argv = restore_argv
        self.handshake_timeout = handshake_timeout
        # sandbox options (wasi-python): guest memory in bytes, roots the guest
        # may import code from, bytes of guest output; None: the host's
        # defaults (cpy2py._host.WASI_DEFAULT_*, applied in cpy2py.wasi).
        # ``timeout`` (seconds per call) applies to every twin: a native twin
        # that runs longer is killed (docs/reliability.md, "Per-call timeout")
        sandbox_only = (memory_limit, paths, output_limit, packages, preload)
        if not is_sandboxed(self.executable) and sandbox_only != (None,) * len(sandbox_only):
            raise ValueError(
                "memory_limit, paths, packages, preload and output_limit apply to sandboxed twins only "
                f"(executable={SANDBOXED_EXECUTABLES[0]!r}), not to {self.executable!r}"
            )
        if timeout is not None and not is_sandboxed(self.executable):
            if not (isinstance(timeout, (int, float)) and timeout > 0):
                raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
            if timeout == float("inf"):
                timeout = None
        self.memory_limit = memory_limit
        self.timeout = timeout
        if isinstance(paths, (str, bytes, os.PathLike)):
            raise TypeError(f"paths must be a list of directories, not one: paths=[{paths!r}]")
        self.paths = list(paths) if paths is not None else None
        # installed pure-Python distributions the guest sees (cpy2py/packages.py)
        self.packages = list(_package_names(packages)) if packages is not None else None
        # modules every guest imports as it starts, before its first call
        self.preload = list(_module_names(preload)) if preload is not None else None
        self.output_limit = output_limit
        # every top-level call in a guest of its own (cpy2py/fresh.py)
        if fresh and not is_sandboxed(self.executable):
            raise ValueError(
                "fresh=True applies to sandboxed twins only "
                f"(executable={SANDBOXED_EXECUTABLES[0]!r}), not to {self.executable!r}"
            )
        self.fresh = bool(fresh)
        # another machine, over SSH (cpy2py/ssh.py): 'user@server' or
        # 'ssh://user@server:port'; ssh_options go to the ssh command line
        if host is not None:
            if is_sandboxed(self.executable):
                raise ValueError(
                    f"host applies to native twins only: a sandboxed twin ({self.executable!r}) "
                    "runs in the master, or on a Ray node with placement=; over SSH it is not supported"
                )
            from . import ssh

            ssh.parse_host(host)
        elif ssh_options is not None:
            raise ValueError("ssh_options applies to twins on another host: pass host='user@server' too")
        self.host: Optional[str] = host
        if host is not None:
            from . import ssh

            self.ssh_options: Optional[List[str]] = ssh.check_options(ssh_options)
        else:
            self.ssh_options = None
        # a node of a Ray cluster (cpy2py/ray.py): a cpy2py.ray.Placement
        if placement is not None:
            if host is not None:
                raise ValueError(
                    "a twin runs either on host=... (over SSH) or at a Ray placement=..., not both"
                )
            if fresh:
                raise ValueError(
                    "fresh=True cannot be combined with placement=: a fresh twin starts a guest for "
                    "every call, in the master; a placed sandbox is one guest on its node. Place a "
                    "sandbox without fresh=True (and stop or restart it to start over), or run fresh "
                    "guests locally"
                )
            if type(placement).__name__ != "Placement" or type(placement).__module__ != f"{__package__}.ray":
                raise ValueError(
                    f"placement must be a cpy2py.ray.Placement(resources=..., node=...), not {placement!r}"
                )
        self.placement: Any = placement
        self._warned_running = False  # (see _check_running)
        if kernel_state.is_master():
            # the settings a twinfunction or TwinObject pinned to this id
            # starts it with, also if this TwinMaster is never started itself
            with _running_lock:
                _configs[self.twinterpreter_id] = self

    #: what a twin is started with (compared by ``start``)
    _SETTINGS = (
        "executable",
        "kernel",
        "main_module",
        "run_main",
        "restore_argv",
        "memory_limit",
        "timeout",
        "paths",
        "output_limit",
        "fresh",
        "host",
        "ssh_options",
        "placement",
        "packages",
        "preload",
    )

    def _other_settings(self, other: TwinMaster) -> List[str]:
        """The names of the settings of ``other`` that differ from this one's."""
        return [name for name in self._SETTINGS if getattr(other, name) != getattr(self, name)]

    def _check_running(
        self, twin: Optional[_Twin], stacklevel: int = 2, who: str = "this TwinMaster"
    ) -> None:
        """``twin``, the running twin of this id, was started by another
        TwinMaster, and this one is started or called (or is the last made
        for the id, whose pinned code is called): if with other settings,
        those calls would go to it with its. A sandbox's settings are its
        limits (timeout, memory, what it may import): it is refused
        (TwinterpreterUnavailable), never silently run with limits other than
        those asked for. A native twin goes on with its own settings, which a
        RuntimeWarning says (once per TwinMaster)."""
        if twin is None or twin.master is self or not twin.alive:
            return
        differ = self._other_settings(twin.master)
        if not differ:
            return
        twin_id = self.twinterpreter_id
        running = ", ".join(f"{name}={getattr(twin.master, name)!r}" for name in differ)
        asked = ", ".join(f"{name}={getattr(self, name)!r}" for name in differ)
        if twin.sandboxed:
            raise TwinterpreterUnavailable(
                f"the sandboxed twinterpreter {twin_id!r} is running already with {running}, "
                f"and {who} asks for {asked}: a sandbox runs only with the settings it was "
                f"started with. Stop it first (TwinMaster(twinterpreter_id={twin_id!r}).stop()), reach "
                f"it with its own settings by TwinMaster(twinterpreter_id={twin_id!r}), or give this "
                "one another twinterpreter_id"
            )
        if self._warned_running:
            return
        self._warned_running = True
        import warnings

        warnings.warn(
            f"twinterpreter {twin_id!r} is running already, started with {running}: it goes "
            f"on with those settings, not those of {who} ({asked}); stop() it first to start it "
            "with these",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )

    def __repr__(self) -> str:
        state = "alive" if self.is_alive else "stopped"
        where = f", host={self.host!r}" if self.host is not None else ""
        where += f", placement={self.placement!r}" if self.placement is not None else ""
        return (
            f"TwinMaster(executable={self.executable!r}, "
            f"twinterpreter_id={self.twinterpreter_id!r}{where}) [{state}]"
        )

    # -- lifecycle ----------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        if not kernel_state.is_master():
            return self._in_master(_is_alive_in_master, self.twinterpreter_id)
        if self.fresh:
            from . import fresh

            return fresh.any_running(self.twinterpreter_id)
        twin = _running.get(self.twinterpreter_id)
        return twin is not None and twin.alive

    def _in_master(self, func: Any, *args: Any) -> Any:
        """In a twin: only the master runs twins, so ask it."""
        if self.twinterpreter_id == kernel_state.TWIN_ID:  # that is us
            return True
        return links.connection_to(kernel_state.MASTER_ID).request(OP_EXECUTE, func, list(args), {})

    def start(self) -> bool:
        """Start the twin (or reuse the running one of this id); True once it answers.

        In a twin (say, a main block run with ``run_main=True``), the master
        starts it; a twin starting itself is a no-op.
        """
        if not kernel_state.is_master():
            return self._in_master(_start_in_master, self.executable, self.twinterpreter_id)
        if self.fresh:  # its guests start one per call: only check that they can
            from . import fresh

            fresh.check_can_start(self)
            return True
        twin_id = self.twinterpreter_id
        # Whatever ends this start (Ctrl-C included, anywhere in it), the
        # threads that wait for it are told, and the next call starts anew:
        # it is registered inside the try that tells them (``ours`` is set
        # with no check for signals after the registration).
        ours = False
        try:
            with _running_lock:
                if _exiting:
                    raise TwinterpreterUnavailable(
                        f"twinterpreter {twin_id!r} cannot be started: the master is exiting"
                    )
                twin = _running.get(twin_id)
                if twin is not None and twin.alive:
                    self._check_running(twin, stacklevel=2)
                    return True
                if twin is not None:  # it died: cleared away before starting anew
                    del _running[twin_id]
                starting = _starting.get(twin_id)
                if starting is None or starting.ended:  # (one left behind by a Ctrl-C in a finally)
                    starting = _starting[twin_id] = _Starting()
                    ours = True
                    _configs[twin_id] = self
            # No lock is held while a twin starts: starting one (a slow interpreter,
            # a guest's initializers) never holds up the others or stop().
            if not ours:
                if twin is not None:
                    twin.shut_down("ended and is restarted", timeout=0)
                return starting.wait(twin_id)
            self._start_as_starter(twin_id, twin, starting)
            return True
        except BaseException as err:
            while ours:  # (another Ctrl-C must not keep the waiters from being told)
                try:
                    starting.finish(err)
                    break
                except BaseException:  # (finish does what it left undone: it runs again)
                    pass
            raise
        finally:
            if ours:
                with _running_lock:
                    if _starting.get(twin_id) is starting:
                        del _starting[twin_id]

    def _start_as_starter(self, twin_id: str, dead: Optional[_Twin], starting: _Starting) -> None:
        """``start``, in the thread that registered the start (``starting``)."""
        if dead is not None:
            dead.shut_down("ended and is restarted", timeout=0)
        new = self._spawn()
        with _running_lock:
            del _starting[twin_id]
            stopped = _exiting or starting.cancelled
            if not stopped:
                _running[twin_id] = new
        if stopped:
            new.shut_down("was stopped while it started", timeout=0)
            raise TwinterpreterUnavailable(f"twinterpreter {twin_id!r} was stopped while it started")
        try:  # its kernel serves: the group's finalizers run in it now
            group_state.join(kernel_state.TWIN_GROUP_STATE, twin_id, new.connection, new.welcomed)
        except BaseException:
            with _running_lock:
                if _running.get(twin_id) is new:
                    del _running[twin_id]
            new.shut_down("failed its group finalizers", timeout=0)
            raise
        starting.finish(None)

    def _spawn(self) -> _Twin:
        guest_start = None
        if is_sandboxed(self.executable) and self.placement is None:
            from . import wasi

            # (compiled bytecode and snapshots, made once: not this guest's start)
            guest_start = wasi.prepare_start(self)
        # handshake_timeout covers the whole start: spawn, hello, welcome, initializers
        self._start_deadline = time.monotonic() + float(self.handshake_timeout)
        if is_sandboxed(self.executable):
            from . import wasi

            # a placed guest runs on its node, behind a host process of cpy2py
            # there that enforces the sandbox as the master does for a local one
            if self.placement is not None:
                process = self._start_on_ray()
            else:
                process = wasi.start_guest(self, guest_start)
            fresh_of = getattr(self, "fresh_of", None)  # (a guest of a fresh twin: cpy2py/fresh.py)
            serializer: Serializer = wasi.serializer_for(
                self.twinterpreter_id, process, fresh_of, wasi.time_limit(self)
            )
        else:
            process = self._start_process()
            serializer = Serializer(self.twinterpreter_id)
            serializer.peer_runs_main = self.run_main
        pid: Any = process.pid
        twin_id = self.twinterpreter_id
        if self.host is not None:  # the remote process (the local one is ssh)
            pid = f"{process.hello['pid']} on host {self.host}"
        elif self.placement is not None:
            pid = f"{process.pid} on {process.where}"

        def describe_end() -> Any:
            # a str says how the twin ended; a guest may give a ready exception
            # (TwinTimeout, TwinMemoryError) instead
            ended = getattr(process, "end_error", None)
            if ended is not None and ended() is not None:
                return ended()
            status = process.wait(1.0)
            if self.host is not None and status == "exited with status 255":
                status = "lost its SSH connection (ssh exited with status 255)"
            if status is None:
                killed = process.kill()
                return f"(pid {pid}) closed its end of the link and was killed ({killed}){_lost(twin_id)}"
            return f"(pid {pid}) {status}{_lost(twin_id)}"

        # the link exists before the welcome: initializers may carry references
        # a guest has no threads: it may call back only within calls made to it
        connection = Connection(
            process,
            self.twinterpreter_id,
            serializer,
            describe_end,
            kill_peer=process.kill,
            new_chains=serializer.trusted,
            # a native twin with the pure-Python codec only says so (handshake.py);
            # else the transport's own (a guest's: yes)
            plain_blocks=True if process.hello.get("plain_blocks") else None,
        )
        # the rest of the start (the welcome, the initializers) within what is
        # left of handshake_timeout: a twin that does not get ready is killed
        from .kernel import deadlines

        late: List[bool] = []

        def too_slow(_key: Any) -> None:
            late.append(True)
            process.kill()

        start_key = ("start", id(process))
        deadlines.set_deadline(start_key, max(0.0, self._start_deadline - time.monotonic()), too_slow)
        try:
            welcome, welcomed = self._welcome(serializer)
        except BaseException:  # an initializer a sandboxed twin cannot run
            deadlines.clear(start_key)
            process.kill()
            raise
        try:
            process.send(references.encode(welcome, serializer.default))
            ready = process.recv()
            answer = _answer_to_welcome(ready, serializer)
            while self.is_remote and serializer.trusted and isinstance(answer, dict) and "module" in answer:
                # a remote twin lacks a module the welcome names (kernel/remote_twin.py);
                # never a guest: it gets no source of the master's by asking
                from .kernel.module_server import module_source

                process.send(codec.dumps({"module": module_source(str(answer["module"]))}))
                ready = process.recv()
                answer = codec.loads(ready) if ready is not None else None
        except (OSError, TwinterpreterTerminated):
            answer = None
        except ProtocolError as err:  # a sandboxed guest's answer, refused unread
            answer = {"error": f"its answer to the welcome was refused: {err}"}
        finally:
            deadlines.clear(start_key)
        if not (isinstance(answer, dict) and answer.get("ready")):
            detail = answer.get("error") if isinstance(answer, dict) else None
            status = process.wait(2.0) or process.kill()
            forwarded = getattr(process, "stderr_forwarded", None)
            if forwarded is not None and not detail:
                forwarded(1.0)  # (what it wrote last may still be on its way)
            tail = None if detail else process.stderr_tail()
            if not serializer.trusted:  # a guest's text: cut as its tracebacks are, controls written out
                from .kernel.sandbox import written_out

                if detail is not None:
                    detail = written_out(
                        detail[:_MAX_GUEST_DETAIL]
                        if isinstance(detail, str)
                        else references.safe_repr(detail)
                    )
                tail = written_out(tail)
            close = getattr(process, "close", None)
            if close is not None:
                close()
            if late:
                raise TwinStartError(
                    f"twinterpreter {twin_id!r} ({self.executable}) did not get ready within "
                    f"handshake_timeout={self.handshake_timeout:g} s (an initializer or its start blocked) "
                    "and was killed: find what blocks, or pass a larger handshake_timeout"
                )
            if detail:
                said = f":\n{detail}"
            elif tail:
                said = f"; its last output:\n{tail}"
            else:
                said = "; it wrote no output"
            raise TwinStartError(
                f"twinterpreter {twin_id!r} ({self.executable}) {status} while setting up{said}"
            )
        if self.timeout is not None and not self.sandboxed_twin:
            connection.call_timeout = float(self.timeout)
            connection.on_timeout = lambda seconds: connection._break_and_kill(
                TwinTimeout(
                    f"twinterpreter {twin_id!r} (pid {pid}) ran longer than its timeout of {seconds:g} s "
                    f"for one call and was killed; its state was lost{_lost(twin_id, state=False)}"
                )
            )
        connection.start_serving()
        serializer.peer_ready = True
        links.register(self.twinterpreter_id, connection)
        hello = process.hello
        log.info(
            "twinterpreter %s is %s %s, pid %s",
            self.twinterpreter_id,
            hello["implementation"],
            hello["version"],
            pid,
        )
        twin = _Twin(self, process, connection)
        twin.welcomed = welcomed
        return twin

    @property
    def sandboxed_twin(self) -> bool:
        return is_sandboxed(self.executable)

    def _start_process(self) -> Any:
        """Spawn a native interpreter with the bootstrap; returns the NativeTwin."""
        if self.host is not None:
            return self._start_remote()
        if self.placement is not None:
            return self._start_on_ray()
        host = _host()
        path = resolve_executable(self.executable)
        env = dict(_MALLOC_TUNING)
        env.update(os.environ)  # (the user's own settings win)
        env.update(
            {
                "__CPY2PY_TWIN_ID__": self.twinterpreter_id,
                "__CPY2PY_MASTER_ID__": kernel_state.MASTER_ID,
                "__CPY2PY_FDS__": f"{host.TWIN_READ_FD},{host.TWIN_WRITE_FD}",
            }
        )
        args = ["-O"] * sys.flags.optimize + ["-c", _bootstrap()]
        log.info("starting twinterpreter %s: %s", self.twinterpreter_id, path)
        left = max(0.0, self._start_deadline - time.monotonic())
        return host.NativeTwin.spawn(path, args, list(env.items()), os.getcwd(), left)

    def _start_remote(self) -> Any:
        """Start the twin on ``self.host`` through ssh (cpy2py/ssh.py)."""
        from . import ssh

        env = {
            "__CPY2PY_TWIN_ID__": self.twinterpreter_id,
            "__CPY2PY_MASTER_ID__": kernel_state.MASTER_ID,
            "__CPY2PY_REMOTE__": str(self.host),
        }
        log.info("starting twinterpreter %s on %s: %s", self.twinterpreter_id, self.host, self.executable)
        left = max(0.0, self._start_deadline - time.monotonic())
        return ssh.start(self, _host(), env, ["-O"] * sys.flags.optimize, left)

    def _start_on_ray(self) -> Any:
        """Start the twin at ``self.placement`` on a Ray cluster (cpy2py/ray.py;
        a sandboxed one: cpy2py/ray_sandbox.py)."""
        from . import ray

        env = {
            "__CPY2PY_TWIN_ID__": self.twinterpreter_id,
            "__CPY2PY_MASTER_ID__": kernel_state.MASTER_ID,
            "__CPY2PY_REMOTE__": "its Ray node",
        }
        log.info(
            "starting twinterpreter %s on Ray at %r: %s",
            self.twinterpreter_id,
            self.placement,
            self.executable,
        )
        sandbox = None
        if self.sandboxed_twin:
            from . import ray_sandbox

            sandbox = ray_sandbox.settings_for(self)
        left = max(0.0, self._start_deadline - time.monotonic())
        return ray.start(self, env, ["-O"] * sys.flags.optimize, left, sandbox=sandbox)

    @property
    def is_remote(self) -> bool:
        """Whether the twin runs on another machine (it gets modules from the master)."""
        return self.host is not None or self.placement is not None

    def _welcome(self, serializer: Serializer) -> Tuple[Dict[str, Any], List[Any]]:
        """The welcome message, and the group initializers it carries."""
        # a twin on another host gets modules from the master instead of paths
        config: Dict[str, Any] = dict(_path_config()) if not self.is_remote else {}
        if self.main_module:
            main_module.alias_master_main()
            config.update(main_module.describe_master_main())
        config["run_main"] = self.run_main
        fresh_of = getattr(self, "fresh_of", None)  # set on a guest of a fresh twin (cpy2py/fresh.py)
        if fresh_of:
            config["fresh_of"] = fresh_of
        config["argv"] = list(sys.argv) if self.restore_argv else None
        initializers = group_state.welcome_initializers(kernel_state.TWIN_GROUP_STATE)
        for func, _args, _kwargs in initializers:
            serializer.check_executable(func)
        config["initializers"] = [[f, list(a), k] for f, a, k in initializers]
        # preload: imported in the guest as it starts, after the group's initializers
        config["initializers"] += [[importlib_import_module, [name], {}] for name in self.preload or ()]
        # initializers defined in a notebook cell: their source (the twin serves nothing yet)
        definitions = serializer.definitions_for_welcome([f for f, _a, _k in initializers])
        if definitions:
            config["main_definitions"] = definitions
        # (the finalizers run once its kernel serves: group_state.join)
        welcome = {"cpy2py": PROTOCOL_VERSION, "master_id": kernel_state.MASTER_ID, "config": config}
        return welcome, initializers

    def _only_in_master(self, what: str) -> None:
        if not kernel_state.is_master():
            raise TwinterpreterUnavailable(
                f"{what} of twinterpreter {self.twinterpreter_id!r} is up to the master; "
                f"this is twinterpreter {kernel_state.TWIN_ID!r}"
            )

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the twin to exit (killing it after ``timeout`` seconds); calls in flight fail."""
        self._only_in_master("stopping")
        with _running_lock:
            twin = _running.pop(self.twinterpreter_id, None)
            if self.twinterpreter_id in _starting:
                _starting[self.twinterpreter_id].cancelled = True
        if twin is not None:
            twin.shut_down("was stopped by the master", timeout)
        self._stop_fresh_guests()

    def destroy(self) -> None:
        """Kill the twin at once; calls in flight fail."""
        self._only_in_master("destroying")
        with _running_lock:
            twin = _running.pop(self.twinterpreter_id, None)
            if self.twinterpreter_id in _starting:
                _starting[self.twinterpreter_id].cancelled = True
        if twin is not None:
            twin.shut_down("was destroyed by the master", timeout=0)
        self._stop_fresh_guests()

    def _stop_fresh_guests(self) -> None:
        """A fresh twin's guests still running (a call, or proxies of their objects) end too."""
        fresh = sys.modules.get(f"{__package__}.fresh")
        if fresh is not None:
            fresh.stop_all(self.twinterpreter_id)

    def __enter__(self) -> TwinMaster:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    async def __aenter__(self) -> TwinMaster:
        """``async with TwinMaster(...)``: starts (and stops) on a worker
        thread, so the event loop goes on meanwhile."""
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, self.start)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, self.stop)

    # -- what the link holds ------------------------------------------------

    def counts(self) -> Dict[str, int]:
        """What the link to this twin holds on each side, to spot a leak:
        ``exports`` (objects of the master kept alive for the twin),
        ``proxies`` (proxies in the master of the twin's objects),
        ``threads`` (the master's threads serving the link), and the same
        for the twin as ``twin_exports``, ``twin_proxies``, ``twin_threads``
        (asked of the twin: it must be running). Counts that keep growing
        while the program does the same thing again and again are a leak;
        docs/reliability.md ("Reference cycles") says what can cause one."""
        self._only_in_master("counting")
        twin = _running.get(self.twinterpreter_id)
        if twin is None or not twin.alive:
            raise TwinterpreterUnavailable(f"twinterpreter {self.twinterpreter_id!r} is not running")
        connection = twin.connection
        mine = {
            "exports": len(connection.handed),
            "proxies": references.proxy_count(connection),
            "threads": connection.thread_count(),
        }
        theirs = connection.request(OP_EXECUTE, references.link_counts, [kernel_state.MASTER_ID], {})
        mine.update({f"twin_{name}": count for name, count in theirs.items()})
        return mine

    def collect(self) -> int:
        """Collect reference cycles across the master and this twin (a master
        object and a twin object holding each other through proxies, with
        nothing else holding either): what each side keeps alive only for
        the other is let go. Returns how many objects were freed on both
        sides. Call it at a quiet moment: docs/reliability.md, "Reference
        cycles", says what it sees and what it cannot."""
        self._only_in_master("collecting")
        twin = _running.get(self.twinterpreter_id)
        if twin is None or not twin.alive or twin.sandboxed:
            return 0
        from .kernel import cycles

        return cycles.collect(twin.connection)

    # -- calls --------------------------------------------------------------

    def import_module(self, name: str) -> Any:
        """A proxy of the module ``name``, imported in the twin only.

        This interpreter never imports or runs the module: its functions and
        objects are used through proxies. The way to load untrusted code
        into a sandboxed twin.
        """
        if self.fresh:  # the module proxy keeps its guest alive
            from . import fresh

            return fresh.execute(self, importlib_import_module, [name], {}, check=False)
        connection = connection_for(self.twinterpreter_id, self)
        return connection.request(OP_EXECUTE, importlib_import_module, [name], {})

    async def import_module_async(self, name: str) -> Any:
        """``import_module`` for asyncio: a start it needs happens on a worker
        thread, and the import is awaited (the event loop goes on)."""
        return await self.execute_async(importlib_import_module, name)

    def execute(self, call: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``call(*args, **kwargs)`` in the twin and return its result.

        ``call`` is any module-level function or class, or (on native twins)
        any picklable callable. Exceptions are raised here as the same type,
        with the twin's traceback attached as their cause.
        """
        if kernel_state.is_master():
            if self.fresh:
                from . import fresh

                return fresh.execute(self, call, list(args), kwargs)
            connection = connection_for(self.twinterpreter_id, self)
            method = method_of(call, self.twinterpreter_id)
            if method is not None:
                return connection.request(OP_CALL_METHOD, *method, list(args), kwargs)
            connection.serializer.check_executable(call)
            return connection.request(OP_EXECUTE, call, list(args), kwargs)
        if self.twinterpreter_id == kernel_state.TWIN_ID:
            return call(*args, **kwargs)
        return self._in_master(_execute_in_master, self.twinterpreter_id, call, list(args), kwargs)

    async def execute_async(self, call: Any, /, *args: Any, **kwargs: Any) -> Any:
        """``execute`` for asyncio: awaits the result without blocking the
        event loop (docs/user-guide.md, "asyncio"; cpy2py/awaitable.py)."""
        twin = _running.get(self.twinterpreter_id)
        if twin is not None and twin.connection.broken is None:
            # the common case without the layers of awaitable.execute (a
            # running twin is the master's own, and never a fresh one: its
            # guests run as "<id>#<n>")
            if twin.master is not self:
                self._check_running(twin)
            method = method_of(call, self.twinterpreter_id)
            connection = twin.connection
            if method is not None:
                return await connection.request_async(OP_CALL_METHOD, *method, list(args), kwargs)
            connection.serializer.check_executable(call)
            try:
                return await connection.request_async(
                    OP_EXECUTE, call, list(args), kwargs, again_if_unsent=True
                )
            except NotSent as unsent:  # (the guest ended before the call's turn)
                from .awaitable import again_unless_stopped

                again_unless_stopped(self.twinterpreter_id, unsent)  # (awaitable.execute makes it again)
        if self.fresh and kernel_state.is_master():
            from . import fresh

            return await fresh.execute_async(self, call, list(args), kwargs)
        from . import awaitable

        return await awaitable.execute(self, call, args, kwargs)


def method_of(call: Any, twin_id: str) -> Optional[Tuple[Any, str]]:
    """``execute(proxy.method, ...)`` of an object of twin ``twin_id`` itself
    (a function of a module it imported: ``execute(plugin.greet, ...)``):
    (the proxy, the method's name), called there as ``proxy.method(...)``
    is; else None."""
    if type(call) is not references.RemoteMethod:
        return None
    target = call.__self__
    if (
        isinstance(target, references.TwinProxy)
        and object.__getattribute__(target, "__twin_owner__") == twin_id
    ):
        return target, call.__name__
    return None


def _start_in_master(executable: str, twin_id: str) -> bool:
    return TwinMaster(executable, twin_id).start()


def _is_alive_in_master(twin_id: str) -> bool:
    return TwinMaster(twinterpreter_id=twin_id).is_alive


def _execute_in_master(twin_id: str, call: Any, args: List[Any], kwargs: Dict[str, Any]) -> Any:
    if twin_id == kernel_state.MASTER_ID:
        return call(*args, **kwargs)
    return connection_for(twin_id).request(OP_EXECUTE, call, args, kwargs)


def _no_auto() -> bool:
    return bool(os.environ.get("CPY2PY_NOAUTO"))


#: how much of a sandboxed guest's own account of a failed start is shown
#: (kernel/sandbox.py cuts its traceback texts to as much)
_MAX_GUEST_DETAIL = 64 * 1024


def _answer_to_welcome(ready: Any, serializer: Serializer) -> Any:
    """The twin's answer to the welcome (``{"ready": True}`` or ``{"error":
    text}``), decoded. A sandboxed guest's is decoded as every frame of it
    is: under the decoding budget, with no kernel tag (its code ran before it
    answered: a preload or an initializer may have replaced the guest's
    kernel, and a small frame of empty lists would take the master
    gigabytes). Raises ProtocolError for an answer refused unread."""
    if ready is None:
        return None
    if serializer.trusted:
        return codec.loads(ready)
    return codec.guest_loads(ready, None, budget=codec.sandbox_budget(len(ready)))


def _lost(twin_id: str, state: bool = True) -> str:
    """The end of a message saying a twin ended: what was lost, what comes next."""
    what = "; its objects and state are lost" if state else ""
    if _no_auto():
        return f"{what}; call TwinMaster({twin_id!r}).start() to start a new one (CPY2PY_NOAUTO is set)"
    return f"{what}; its next use starts a fresh twin"


def _package_names(packages: Any) -> Any:
    from .packages import check_names

    return check_names(packages)


def _module_names(preload: Any) -> List[str]:
    if isinstance(preload, (str, bytes)) or not isinstance(preload, (list, tuple)):
        raise TypeError(f"preload must be a list of module names (str), not {preload!r}")
    for name in preload:
        if not isinstance(name, str) or not name or name.startswith("."):
            raise TypeError(f"preload must be a list of absolute module names (str), not {preload!r}")
    return list(preload)


def connection_for(twin_id: str, master: Optional[TwinMaster] = None) -> Connection:
    """The connection to twin ``twin_id``, started on first use.

    A twin that ended (crash, kill, timeout) is started again on its next
    use, with the settings it was started with, unless ``CPY2PY_NOAUTO`` is
    set: the end is first reported to a caller (the calls in flight, or else
    the next one), so that nobody misses that its objects and state are gone.
    """
    twin = _running.get(twin_id)
    if twin is not None:
        broken = twin.connection.broken
        if broken is None:
            if master is None:  # (pinned code: the last TwinMaster made for the id says how)
                config = _configs.get(twin_id)
                if config is not None and config is not twin.master:
                    config._check_running(twin, 3, f"the last TwinMaster made for {twin_id!r}")
            elif twin.master is not master:
                master._check_running(twin, stacklevel=3)
            return twin.connection
        if isinstance(broken, ProtocolError) and not twin.sandboxed:
            # a native peer that broke the protocol is not started again behind
            # your back (a guest that did is discarded: the next call gets a fresh one)
            raise ProtocolError(
                f"{broken}; call TwinMaster({twin_id!r}).start() to start a new one"
            ) from broken
        # a guest's end is always told to the call it ended (timeout, memory, trap)
        if not twin.sandboxed and (not twin.connection.reported or _no_auto()):
            twin.connection.reported = True
            if "start" in str(broken) or "fresh twin" in str(broken):
                raise broken  # its text says what is lost and what comes next
            raise TwinterpreterTerminated(f"{broken}{_lost(twin_id)}") from broken
        twin.master.start()  # shuts the dead one down first
        twin = _running.get(twin_id)
        if twin is None:
            raise TwinterpreterUnavailable(f"twinterpreter {twin_id!r} was stopped while it restarted")
        return twin.connection
    config = master or _configs.get(twin_id)
    if config is not None and config.fresh:  # (never in _running: its guests have ids of their own)
        raise TwinterpreterUnavailable(
            f"twinterpreter {twin_id!r} runs every call in a guest of its own (fresh=True), so it "
            f"has no one link to reach: call it with TwinMaster(twinterpreter_id={twin_id!r}).execute(...), "
            "import_module(...), a twinfunction or an instance of a TwinObject class pinned to it (class "
            "attributes and classmethods of such a class are not reachable from other interpreters)"
        )
    if _no_auto():
        raise TwinterpreterUnavailable(
            f"twinterpreter {twin_id!r} is not running and CPY2PY_NOAUTO forbids starting it "
            f"on demand: call TwinMaster({twin_id!r}).start() first"
        )
    (master or _configs.get(twin_id) or TwinMaster(twinterpreter_id=twin_id)).start()
    twin = _running.get(twin_id)
    if twin is None:
        raise TwinterpreterUnavailable(f"twinterpreter {twin_id!r} was stopped while it started")
    return twin.connection


def running_twins() -> Tuple[str, ...]:
    with _running_lock:
        return tuple(twin_id for twin_id, twin in _running.items() if twin.alive)


#: set once the master exits: no twin starts any more (a daemon thread still
#: calling would otherwise start new ones while the interpreter finalizes)
_exiting = False


@atexit.register
def _stop_all() -> None:
    """No twin outlives the master."""
    global _exiting
    with _running_lock:
        _exiting = True
        twins = list(_running.values())
        _running.clear()
    # all at once, against one deadline: N stuck twins cost 2 s, not 2N
    deadline = time.monotonic() + 2.0
    asked = []
    for twin in twins:
        try:
            asked.append((twin, twin.ask_to_exit("was stopped as the master exits", deadline)))
        except Exception as err:  # keep stopping the others
            log.error("could not stop twinterpreter %s: %s", twin.twin_id, err)
            asked.append((twin, False))
    for twin, sent in asked:
        try:
            twin.end(sent, deadline)
        except Exception as err:
            log.error("could not stop twinterpreter %s: %s", twin.twin_id, err)
    # With the twins gone, every thread waiting in the host returns: let them
    # hold the GIL again before the interpreter finalizes (a daemon thread
    # ended inside Rust frames aborts the process; see wait_out_of_host).
    host = sys.modules.get(f"{__package__}._host")
    if host is not None and hasattr(host, "kill_all_twins"):
        # twins still starting in other threads: their start ends at once
        host.kill_all_twins()
    if host is not None and hasattr(host, "wait_out_of_host"):
        host.wait_out_of_host(2.0)


def _after_fork_in_child() -> None:
    """A child forked from the master (``multiprocessing`` with fork, say) gets
    copies of the master's links, which it must not use: the twins belong to
    the parent, and two processes on one pipe corrupt it. The child forgets
    them without touching them (no message, no kill) and starts twins of its
    own on first use; proxies of the parent's objects raise
    ``TwinterpreterTerminated`` saying so. docs/user-guide.md, "Forked processes"."""
    global _running_lock
    # locks other threads may have held at the fork stay held forever here
    _running_lock = threading.RLock()
    # a main thread that forked inside a call holds its signals (see
    # protocol/transport.py): the child's would stay blocked for good, and
    # multiprocessing's terminate() (SIGTERM) could not end it
    release_signals()
    # ... and one forked from a thread of cpy2py's (a callback that forked)
    # would keep the signals that thread blocked
    unblock_after_fork()
    links.after_fork()
    references.after_fork()
    deadlines = sys.modules.get(f"{__package__}.kernel.deadlines")
    if deadlines is not None:
        deadlines.after_fork()
    parent = os.getppid()
    for twin_id, twin in list(_running.items()):
        if twin.sandboxed:  # (the host's threads a guest needs did not survive the fork)
            own = (
                "a forked child cannot run sandboxed twins: use them in the parent, or in a process "
                "made with multiprocessing's 'spawn' or 'forkserver' start method"
            )
        else:
            own = "a forked process starts twins of its own (on first use, or with TwinMaster(...).start())"
        twin.connection.forget_after_fork(
            TwinterpreterTerminated(
                f"twinterpreter {twin_id!r} belongs to process {parent}, which forked this one; {own}"
            )
        )
    _running.clear()
    _starting.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

links.set_starter(connection_for)
