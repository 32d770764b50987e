"""A real sshd on loopback for the tests of twins on other hosts.

The tests start their own OpenSSH server (installing ``openssh-server`` with
apt-get when it is missing and we are root), with a host key and a user key
made for the test in a temporary directory, its own sshd_config (only that
key is authorized, loopback only), run in the foreground (``-D -e``) and
stopped afterwards. Where that is impossible, the tests skip with the reason.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional

SSHD = "/usr/sbin/sshd"


def sshd_unavailable() -> Optional[str]:
    """Why no sshd can be run here (None: it can), installing it if we may."""
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "the OpenSSH client (ssh, ssh-keygen) is not installed"
    if not os.path.exists(SSHD):
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            return (
                f"{SSHD} is missing and cannot be installed here "
                "(needs root and apt-get: apt-get install openssh-server)"
            )
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        done = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "openssh-server"], env=env, capture_output=True, text=True
        )
        if done.returncode != 0 or not os.path.exists(SSHD):
            return f"installing openssh-server failed: {done.stderr.strip()[-500:]}"
    if os.geteuid() != 0:
        return "sshd needs root here (privilege separation)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keygen(path: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)


@dataclass
class SshServer:
    directory: str
    port: int
    user: str
    process: subprocess.Popen
    options: List[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    def session_pids(self) -> List[int]:
        """The server's per-connection processes (children of the listener)."""
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True
        )
        return [int(pid) for pid in out.stdout.split()]

    def drop_connections(self) -> None:
        """Cut every connection from the server's side, as a network failure would."""
        for pid in self.session_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self.drop_connections()
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_sshd() -> SshServer:
    directory = tempfile.mkdtemp(prefix="cpy2py-sshd-")
    host_key = os.path.join(directory, "host_key")
    user_key = os.path.join(directory, "user_key")
    _keygen(host_key)
    _keygen(user_key)
    shutil.copy(user_key + ".pub", os.path.join(directory, "authorized_keys"))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
    port = _free_port()
    user = getpass.getuser()
    config = os.path.join(directory, "sshd_config")
    with open(config, "w") as f:
        f.write(
            f"Port {port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {host_key}\n"
            f"PidFile {directory}/sshd.pid\n"
            f"AuthorizedKeysFile {directory}/authorized_keys\n"
            "StrictModes no\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "PermitRootLogin prohibit-password\n"
            f"AllowUsers {user}\n"
            "MaxStartups 100\n"
            "MaxSessions 100\n"
            "LogLevel INFO\n"
        )
    with open(host_key + ".pub") as f:
        key_type, key = f.read().split()[:2]
    known_hosts = os.path.join(directory, "known_hosts")
    with open(known_hosts, "w") as f:
        f.write(f"[127.0.0.1]:{port} {key_type} {key}\n")
    log = open(os.path.join(directory, "sshd.log"), "w")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", config], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            with open(log.name) as f:
                raise RuntimeError(f"sshd exited with {process.returncode}: {f.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("sshd did not listen within 10 s") from None
            time.sleep(0.05)
    options = [
        "-F",
        "/dev/null",
        "-i",
        user_key,
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
    ]
    return SshServer(directory, port, user, process, options)
