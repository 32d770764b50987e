"""cpy2py/kernel_bundle.py: the bytecode a twin imports its kernel from (one
file in cpy2py's cache), tried in this process on a package of its own."""

from __future__ import annotations

import os
import sys

import pytest
from cpy2py.kernel_bundle import Bundle


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package ``bundled_pkg`` with a module and a subpackage, and a cache."""
    root = tmp_path / "src" / "bundled_pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("ANSWER = 1\n")
    (root / "mod.py").write_text("VALUE = 'old'\n")
    (root / "sub" / "__init__.py").write_text("from . import leaf\n")
    (root / "sub" / "leaf.py").write_text("LEAF = True\n")
    yield root, tmp_path / "cache"
    for name in [n for n in sys.modules if n == "bundled_pkg" or n.startswith("bundled_pkg.")]:
        del sys.modules[name]


def import_with(bundle: Bundle):
    for name in [n for n in sys.modules if n == "bundled_pkg" or n.startswith("bundled_pkg.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, bundle)
    try:
        import bundled_pkg.mod
        import bundled_pkg.sub

        return bundled_pkg.mod, bundled_pkg.sub
    finally:
        bundle.finish()


def test_modules_come_from_the_bundle_once_made(package):
    root, cache = package
    first = Bundle(str(root), str(cache))
    mod, sub = import_with(first)
    assert (mod.VALUE, sub.leaf.LEAF) == ("old", True)
    assert mod.__file__ == str(root / "mod.py") and sub.__path__ == [str(root / "sub")]
    assert first not in sys.meta_path and first.changed
    assert os.path.exists(first.path)
    # same size and time, other text: only a module from the bundle says "old"
    stat = os.stat(root / "mod.py")
    (root / "mod.py").write_text("VALUE = 'new'\n")
    os.utime(root / "mod.py", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = Bundle(str(root), str(cache))
    assert import_with(second)[0].VALUE == "old"
    assert not second.changed  # nothing compiled: nothing written


def test_a_changed_source_is_compiled_again_and_the_bundle_rewritten(package):
    root, cache = package
    import_with(Bundle(str(root), str(cache)))
    (root / "mod.py").write_text("VALUE = 'changed'\n")  # (another size)
    again = Bundle(str(root), str(cache))
    assert import_with(again)[0].VALUE == "changed"
    assert again.changed
    assert import_with(Bundle(str(root), str(cache)))[0].VALUE == "changed"


def test_a_damaged_bundle_is_made_again(package):
    root, cache = package
    bundle = Bundle(str(root), str(cache))
    import_with(bundle)
    with open(bundle.path, "wb") as f:
        f.write(b"\x00not marshal data")
    again = Bundle(str(root), str(cache))
    assert import_with(again)[0].VALUE == "old" and again.changed


def test_a_cache_it_cannot_write_only_costs_compiling(package):
    root, cache = package
    cache.write_text("a file where the cache directory would be")
    bundle = Bundle(str(root), str(cache))
    assert import_with(bundle)[0].VALUE == "old"
    assert not os.path.exists(bundle.path)


def test_it_serves_only_its_package_and_only_python_sources(package):
    root, cache = package
    (root / "native.so").write_bytes(b"")
    bundle = Bundle(str(root), str(cache))
    assert bundle.find_spec("json") is None
    assert bundle.find_spec("bundled_pkg_other") is None
    assert bundle.find_spec("bundled_pkg.native") is None
    assert bundle.find_spec("bundled_pkg.mod").origin == str(root / "mod.py")


def test_bundles_unused_for_a_month_are_removed_when_one_is_written(package):
    """Each package path has a bundle of its own (venvs come and go): one no
    twin started from for ``UNUSED_FOR`` is removed when another is
    written; one in use is kept, its time refreshed as twins start from it."""
    from cpy2py import kernel_bundle

    root, cache = package
    directory = cache / "kernel-bundle"
    directory.mkdir(parents=True)
    long_ago = kernel_bundle.time.time() - kernel_bundle.UNUSED_FOR - 3600
    gone = directory / "cpython-311-O0%old%venv%lib%cpy2py"
    recent = directory / "pypy39-O0%other%venv%cpy2py"
    for path in (gone, recent):
        path.write_bytes(b"a bundle")
    os.utime(gone, (long_ago, long_ago))
    in_use = Bundle(str(root), str(cache))
    import_with(in_use)  # (written: the others are looked at)
    assert not gone.exists()
    assert recent.exists() and os.path.exists(in_use.path)
    # a bundle twins still start from: its time is refreshed on reading,
    # so the next write keeps it
    os.utime(in_use.path, (long_ago, long_ago))
    again = Bundle(str(root), str(cache))
    assert os.stat(in_use.path).st_mtime > long_ago
    import_with(again)
    (root / "mod.py").write_text("VALUE = 'rewritten'\n")  # (another size: a write, so a prune)
    assert import_with(Bundle(str(root), str(cache)))[0].VALUE == "rewritten"
    assert os.path.exists(in_use.path) and recent.exists()
