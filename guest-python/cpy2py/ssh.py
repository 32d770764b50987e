"""Twins on other hosts, started through the system's OpenSSH client.

``TwinMaster('pypy3', host='user@server')`` runs ``ssh`` as the twin's local
process, with the link on its stdin and stdout (the host's
``protocol_on_stdio``), so ``~/.ssh/config``, known hosts and the agent apply
as for any ``ssh`` the user runs. Nothing is installed remotely: the command
line carries a small bootstrap (``REMOTE_BOOTSTRAP``), which reads the cpy2py
sources from the link (the kernel bundle, written by the host before the
hello), moves the link off stdin/stdout, sends the twin's own stdout to its
stderr (which ``ssh`` forwards to the master's stderr, so a ``print`` never
corrupts a frame), and runs the same kernel as a local twin. Modules of the
application are then served from the master on demand
(``kernel/remote_twin.py``, ``kernel/module_server.py``).

Runs in the master only.
"""

from __future__ import annotations

import marshal
import os
import re
import shlex
import shutil
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import _logging
from .cache_dir import file_digest
from .errors import TwinStartError

log = _logging.get_logger("ssh")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

#: options that make ``ssh`` fit a link: no password prompt (stdin is the
#: link), no pty, no escape character, and a dead peer noticed in ~15 s even
#: when the network drops silently. The user's ``ssh_options`` come first and
#: win (ssh keeps the first value of an option), then ~/.ssh/config.
SSH_DEFAULTS = (
    "-T",
    "-e",
    "none",
    "-o",
    "BatchMode=yes",
    "-o",
    "ServerAliveInterval=5",
    "-o",
    "ServerAliveCountMax=3",
)

#: what ssh exits with when it could not connect or log in (or lost the link)
SSH_FAILED = 255

# Runs on the remote host with -c. Like the local bootstrap it must parse on
# Python 2, to say that the interpreter is too old.
REMOTE_BOOTSTRAP = """\
import sys, os
if sys.version_info < (3, 9):
    sys.stderr.write("cpy2py: %s is Python %s; twinterpreters need Python 3.9 or newer\\n"
                     % (sys.executable, sys.version.split()[0]))
    sys.exit(86)
import marshal, zlib
from _frozen_importlib import ModuleSpec


def _read(size):
    data = b""
    while len(data) < size:
        chunk = os.read(0, size - len(data))
        if not chunk:
            sys.stderr.write("cpy2py: the master closed the link before it sent the kernel\\n")
            os._exit(1)
        data += chunk
    return data


def _compiled_host(path, build, size):
    # cpy2py._host for this twin (CPython only): the first file of the
    # master's build among a Ray node's own (named by its actor), the
    # master's path (this machine, a shared file system) and a cpy2py
    # installed for this interpreter (the same wheel); None: the
    # pure-Python codec. Only files of the master's size are read.
    named = os.environ.pop("__CPY2PY_HOST_EXTENSION__", None)
    if sys.implementation.name != "cpython" or not build:
        return None
    import hashlib
    from importlib.machinery import EXTENSION_SUFFIXES
    installed = [os.path.join(entry or os.curdir, "cpy2py", "_host" + suffix)
                 for entry in sys.path for suffix in EXTENSION_SUFFIXES]
    for candidate in dict.fromkeys(filter(None, [named, path] + installed)):
        digest = hashlib.sha256()
        try:
            if os.stat(candidate).st_size != size:
                continue
            with open(candidate, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            continue
        if digest.hexdigest() == build:
            return os.path.abspath(candidate)
    return None


class _Kernel(object):
    # cpy2py itself, from the sources the master sent: name -> (origin, is package, source)
    sources = marshal.loads(zlib.decompress(_read(int(_read(10)))))
    host_extension = _compiled_host(*{compiled_host!r})

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "cpy2py._host" and cls.host_extension:
            from importlib.util import spec_from_file_location
            return spec_from_file_location(name, cls.host_extension)
        entry = cls.sources.get(name)
        if entry is None:
            return None
        spec = ModuleSpec(name, cls, origin=entry[0], is_package=entry[1])
        spec.has_location = True
        return spec

    @staticmethod
    def create_module(spec):
        return None

    @classmethod
    def exec_module(cls, module):
        origin, _package, source = cls.sources[module.__spec__.name]
        exec(compile(source, origin, "exec"), module.__dict__)

    @classmethod
    def get_source(cls, name):
        return cls.sources[name][2].decode("utf-8")


sys.meta_path.insert(0, _Kernel)
# the link leaves stdin/stdout; the twin's own stdout goes to stderr
link_in, link_out = os.dup(0), os.dup(1)
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
os.dup2(2, 1)
os.environ.update({env!r})
os.environ["__CPY2PY_FDS__"] = "%d,%d" % (link_in, link_out)
del link_in, link_out, null, _read, _compiled_host
from cpy2py.kernel.twin_main import main
main()
"""

_bundle: Optional[bytes] = None
_host_build: Optional[str] = None


def host_build() -> Optional[str]:
    """The SHA-256 of this process's compiled host (``cpy2py._host``), None
    without one. A remote twin loads a compiled host only if it is this
    build: the kernel the master sends calls it, and its functions change
    between versions. Read once per process (about 25 MB, 40 ms)."""
    global _host_build
    if _host_build is None:
        try:
            from . import _host
        except ImportError:
            _host_build = ""
        else:
            _host_build = file_digest(_host.__file__)
    return _host_build or None


def compiled_host() -> Tuple[Optional[str], Optional[str], Optional[int]]:
    """(path, SHA-256, size) of this master's compiled host, for
    ``REMOTE_BOOTSTRAP``: a remote twin loads a file of this build from
    there, or from a cpy2py installed for its interpreter."""
    build = host_build()
    if build is None:
        return None, None, None
    from . import _host

    path = os.path.abspath(_host.__file__)
    return path, build, os.stat(path).st_size


def log_codec(twin_id: str, where: str, hello: Dict[str, Any]) -> None:
    """Say in the log when a remote CPython twin runs the pure-Python codec
    (its hello asks for plain-data blocks then): its calls cost more."""
    if hello.get("plain_blocks"):
        log.info(
            "twinterpreter %s on %s runs the pure-Python codec: its host has no file of this "
            "master's build of cpy2py._host where the master has it, nor in a cpy2py installed "
            "for its interpreter (on a Ray node: the node's); installing the wheel the master's "
            "cpy2py came from there gives it the compiled codec",
            twin_id,
            where,
        )


def bootstrap(env: Dict[str, str]) -> str:
    """``REMOTE_BOOTSTRAP`` for a twin with ``env``."""
    return REMOTE_BOOTSTRAP.format(env=env, compiled_host=compiled_host())


def kernel_bundle() -> bytes:
    """The preamble: cpy2py's own sources, compressed, with their length
    first (ten digits). Built once per master."""
    global _bundle
    if _bundle is None:
        sources: Dict[str, Tuple[str, bool, bytes]] = {}
        for directory, subdirs, files in os.walk(_PACKAGE_DIR):
            subdirs[:] = [d for d in subdirs if not d.startswith((".", "__"))]
            relative = os.path.relpath(directory, os.path.dirname(_PACKAGE_DIR))
            package = relative.replace(os.sep, ".")
            init = b""
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                with open(os.path.join(directory, name), "rb") as f:
                    source = f.read()
                origin = os.path.join(relative, name)
                if name == "__init__.py":
                    init = source
                else:
                    sources[f"{package}.{name[:-3]}"] = (origin, False, source)
            # a directory without __init__.py is a namespace package here too
            sources[package] = (os.path.join(relative, "__init__.py"), True, init)
        # marshal version 2: plain str/bytes/bool/tuple/dict, which every
        # Python 3 reads (the remote one may be older or PyPy)
        blob = zlib.compress(marshal.dumps(sources, 2), 6)
        _bundle = b"%010d" % len(blob) + blob
    return _bundle


def parse_host(host: str) -> Tuple[str, Optional[int]]:
    """``user@server``, ``server`` (an alias of ~/.ssh/config too) or
    ``ssh://[user@]server[:port]`` -> (destination, port or None)."""
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"host must be a non-empty string such as 'user@server', not {host!r}")
    host = host.strip()
    if host.startswith("ssh://"):
        match = re.fullmatch(r"ssh://(?:([^@/]+)@)?(\[[^\]]+\]|[^:/@]+)(?::(\d+))?/?", host)
        if match is None:
            raise ValueError(f"host {host!r} is not of the form ssh://[user@]server[:port]")
        user, server, port = match.groups()
        server = server.strip("[]")
        return (f"{user}@{server}" if user else server), (int(port) if port else None)
    if "://" in host:
        raise ValueError(f"host {host!r}: only ssh:// is understood (or plain user@server)")
    if host.startswith("-") or any(c.isspace() for c in host):
        raise ValueError(f"host {host!r} is not a host name: no spaces, no leading '-'")
    return host, None


def check_options(options: Optional[Sequence[str]]) -> List[str]:
    if options is None:
        return []
    if isinstance(options, str) or not all(isinstance(o, str) for o in options):
        raise ValueError(
            "ssh_options must be a list of strings (ssh command-line arguments), "
            f"e.g. ['-i', 'key', '-o', 'UserKnownHostsFile=known_hosts'], not {options!r}"
        )
    return list(options)


def ssh_executable() -> str:
    found = shutil.which("ssh")
    if found is None:
        raise TwinStartError(
            "no `ssh` on PATH: remote twins are started with the OpenSSH client "
            "(Debian: apt-get install openssh-client)"
        )
    return found


def command(
    host: str, options: Sequence[str], executable: str, interpreter_args: Sequence[str], env: Dict[str, str]
) -> List[str]:
    """ssh's arguments: our options after the user's, the destination, and
    the remote command (one string, for the remote user's shell)."""
    destination, port = parse_host(host)
    remote = " ".join(shlex.quote(part) for part in [executable, *interpreter_args, "-c", bootstrap(env)])
    args = list(options) + list(SSH_DEFAULTS)
    if port is not None:
        args += ["-p", str(port)]
    return [*args, "--", destination, f"exec {remote}"]


def explain_start_failure(host: str, executable: str, message: str) -> str:
    """A failed start in the words of SSH: what went wrong on which host."""
    said = ""
    found = re.search(r"it said:\n(.*?)\nTwinterpreters must", message, re.S)
    if found:
        said = found.group(1).strip()
    status = re.search(r"exited with status (\d+)", message)
    code = int(status.group(1)) if status else None
    quote = f"\n{said}" if said else ""
    if "did not answer the cpy2py handshake" in message:
        return (
            f"twinterpreter {executable!r} on host {host!r} did not answer within the handshake "
            "timeout: is the host reachable (ssh may still be connecting), and does "
            f"`ssh {host} {executable} -V` work? (raise handshake_timeout for slow links)"
        )
    if code == SSH_FAILED:
        return (
            f"could not start twinterpreter {executable!r} on host {host!r}: ssh could not connect "
            f"or log in (ssh exited with status 255):{quote}\n"
            f"Check that `ssh {host} true` works without any prompt (cpy2py runs ssh with "
            "BatchMode=yes: use a key or the agent; the host key must be known); "
            "pass ssh_options=[...] for options not in ~/.ssh/config"
        )
    if code in (126, 127):
        return (
            f"could not start twinterpreter {executable!r} on host {host!r}: the remote shell "
            f"found no such interpreter (status {code}):{quote}\n"
            f"Install {executable} there or pass its remote path, e.g. "
            f"TwinMaster('/usr/bin/python3', host={host!r})"
        )
    if code == 86:
        return f"could not start twinterpreter {executable!r} on host {host!r}:{quote}"
    return f"could not start twinterpreter {executable!r} on host {host!r}: {message}"


def start(master: Any, host_module: Any, env: Dict[str, str], args: List[str], timeout: float) -> Any:
    """Start the twin of ``master`` on its host; the host's NativeTwin (whose
    process is the local ``ssh``)."""
    ssh = ssh_executable()
    argv = command(master.host, master.ssh_options, master.executable, args, env)
    try:
        twin = host_module.NativeTwin.spawn(
            ssh,
            argv,
            list(os.environ.items()),
            os.getcwd(),
            timeout,
            protocol_on_stdio=True,
            preamble=kernel_bundle(),
        )
    except TwinStartError as err:
        raise TwinStartError(explain_start_failure(master.host, master.executable, str(err))) from None
    log_codec(master.twinterpreter_id, f"host {master.host!r}", twin.hello)
    return twin
