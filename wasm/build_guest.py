"""Build the cpy2py WASI guest: wasm/build/cpy2py-guest.wasm and its stdlib.

    python wasm/build_guest.py [--if-stale]

1. Finds the WASI interface files in the source of the wasmtime-wasi crate the
   host is built with (``cargo metadata``; its ``src/p2/wit/deps``) and puts
   them beside ``wasm/wit/world.wit`` in ``wasm/build/wit`` (a symlink, nothing
   is copied into the repository).
2. Stages the pure-Python package ``cpy2py`` (``guest-python/cpy2py/**.py``)
   and ``wasm/app.py`` in ``wasm/build/stage``.
3. Runs componentize-py, which links CPython 3.14 into a component, imports
   ``app`` (and with it the cpy2py kernel), and snapshots the initialized
   interpreter.
4. Extracts the Python standard library that componentize-py ships (the guest
   imports from it at run time, mounted read-only as /python) into
   ``wasm/build/python-lib`` and its helper modules into ``wasm/build/bundled``.

``--if-stale`` does nothing when the guest is newer than every input.
``--wheel DIR`` then builds a wheel of cpy2py that ships the guest (in
``cpy2py/wasi-guest/``) into DIR, from a scratch copy of the source tree.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import List, Optional

WASM_DIR = Path(__file__).resolve().parent
REPO = WASM_DIR.parent
BUILD = WASM_DIR / "build"
GUEST = BUILD / "cpy2py-guest.wasm"
PACKAGE = REPO / "guest-python" / "cpy2py"
WORLD = WASM_DIR / "wit" / "world.wit"


def fail(message: str) -> None:
    print(f"build_guest: {message}", file=sys.stderr)
    sys.exit(1)


def wasi_wit_dir() -> Path:
    """``src/p2/wit`` of the wasmtime-wasi crate in host/Cargo.lock."""
    try:
        out = subprocess.run(
            [
                "cargo",
                "metadata",
                "--format-version",
                "1",
                "--manifest-path",
                str(REPO / "host" / "Cargo.toml"),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except FileNotFoundError:
        fail("cargo is not on PATH; install Rust (https://rustup.rs) to build the guest")
    except subprocess.CalledProcessError as err:
        fail(f"`cargo metadata` failed:\n{err.stderr}")
    for package in json.loads(out)["packages"]:
        if package["name"] == "wasmtime-wasi":
            wit = Path(package["manifest_path"]).parent / "src" / "p2" / "wit"
            if not (wit / "deps").is_dir():  # sources not downloaded yet
                subprocess.run(
                    ["cargo", "fetch", "--manifest-path", str(REPO / "host" / "Cargo.toml")], check=False
                )
            if not (wit / "deps").is_dir():
                fail(f"wasmtime-wasi {package['version']} has no WIT files in {wit}")
            return wit
    fail("wasmtime-wasi is not a dependency of host/Cargo.toml")
    raise AssertionError


def wasi_version(wit: Path) -> str:
    text = (wit / "deps" / "cli.wit").read_text() if (wit / "deps" / "cli.wit").exists() else ""
    if not text:  # one folder per package
        text = "".join(p.read_text() for p in (wit / "deps").glob("cli/*.wit"))
    found = re.search(r"package\s+wasi:cli@([0-9.]+)", text)
    if not found:
        fail(f"cannot find the wasi:cli version in {wit / 'deps'}")
    return found.group(1)


def componentize_py_lib() -> Path:
    try:
        import componentize_py
    except ImportError:
        fail("componentize-py is not installed in this Python: run `just setup` (requirements-dev.txt)")
    found = sorted(Path(componentize_py.__file__).parent.glob("componentize_py*.so"))
    if not found:
        fail(f"no componentize_py library next to {componentize_py.__file__}")
    return found[0]


def inputs() -> List[Path]:
    files = [p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts]
    files += [WASM_DIR / "app.py", WORLD, Path(__file__).resolve(), REPO / "requirements-dev.txt"]
    return files


def is_stale() -> bool:
    if not GUEST.exists() or not (BUILD / "python-lib" / "os.py").exists():
        return True
    built = GUEST.stat().st_mtime
    return any(p.exists() and p.stat().st_mtime > built for p in inputs())


def stage_wit(wit: Path, version: str) -> Path:
    out = BUILD / "wit"
    if out.is_symlink() or out.is_file():
        out.unlink()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    world = re.sub(r"@0\.2\.\d+", "@" + version, WORLD.read_text())
    (out / "world.wit").write_text(world)
    (out / "deps").symlink_to(wit / "deps", target_is_directory=True)
    return out


def stage_python() -> Path:
    stage = BUILD / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "cpy2py").mkdir(parents=True)
    for source in PACKAGE.rglob("*.py"):
        if "__pycache__" in source.parts:
            continue
        target = stage / "cpy2py" / source.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    shutil.copy2(WASM_DIR / "app.py", stage / "app.py")
    return stage


def extract_runtime_files(lib: Path) -> None:
    """The stdlib and helper tarballs are zstd frames inside componentize-py's
    library; find them by their zstd magic and unpack them."""
    stamp_file = BUILD / "python-lib.stamp"
    stamp = f"{lib} {lib.stat().st_size} {lib.stat().st_mtime_ns}"
    if stamp_file.exists() and stamp_file.read_text() == stamp and (BUILD / "python-lib" / "os.py").exists():
        return
    try:
        import zstandard
    except ImportError:
        fail("the zstandard module is missing: run `just setup` (requirements-dev.txt)")
    data = lib.read_bytes()
    magic = b"\x28\xb5\x2f\xfd"
    found = {}
    pos = data.find(magic)
    while pos >= 0 and len(found) < 2:
        try:
            out = zstandard.ZstdDecompressor().decompressobj().decompress(data[pos : pos + (256 << 20)])
        except zstandard.ZstdError:
            out = b""
        if len(out) > 512 and out[257:262] == b"ustar":
            archive = tarfile.open(fileobj=io.BytesIO(out))
            names = set(archive.getnames())
            if "os.py" in names:
                found["python-lib"] = archive
            elif "componentize_py_types.py" in names:
                found["bundled"] = archive
        pos = data.find(magic, pos + 4)
    if "python-lib" not in found:
        fail(f"cannot find the Python standard library inside {lib}; is this componentize-py supported?")
    for name, archive in found.items():
        target = BUILD / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        members = [m for m in archive.getmembers() if m.isfile() or m.isdir()]
        for member in members:
            if member.name.startswith("/") or ".." in Path(member.name).parts:
                fail(f"refusing the unsafe path {member.name!r} in {lib}")
        archive.extractall(target, members=members)
    stamp_file.write_text(stamp)


def build(force: bool) -> None:
    if not force and not is_stale():
        print(f"build_guest: {GUEST.relative_to(REPO)} is up to date")
        return
    BUILD.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    wit = wasi_wit_dir()
    version = wasi_version(wit)
    lib = componentize_py_lib()
    extract_runtime_files(lib)
    wit_dir = stage_wit(wit, version)
    stage = stage_python()
    tmp = GUEST.with_suffix(".wasm.tmp")
    command = [
        str(Path(sys.executable).parent / "componentize-py"),
        "--quiet",
        "-d",
        str(wit_dir),
        "-w",
        "guest",
        "componentize",
        "app",
        "-p",
        str(stage),
        "-o",
        str(tmp),
    ]
    if not Path(command[0]).exists():
        command[0] = shutil.which("componentize-py") or fail(
            "componentize-py is not installed: run `just setup`"
        )
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    result = subprocess.run(command, env=env, cwd=BUILD, capture_output=True, text=True)
    if result.returncode != 0 or not tmp.exists():
        fail(f"componentize-py failed (exit status {result.returncode}):\n{result.stderr[-6000:]}")
    tmp.replace(GUEST)
    info = {
        "wasi": version,
        "wasi_wit": str(wit),
        "componentize_py": str(lib),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (BUILD / "guest-info.json").write_text(json.dumps(info, indent=2) + "\n")
    size = GUEST.stat().st_size / (1 << 20)
    print(
        f"build_guest: built {GUEST.relative_to(REPO)} ({size:.1f} MiB) in {time.monotonic() - started:.1f} s"
    )


def build_wheel(out_dir: Path) -> None:
    """maturin build of a scratch copy of the tree with the guest inside the package."""
    import tempfile

    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", "target", "build")
    with tempfile.TemporaryDirectory(prefix="cpy2py-wheel-") as scratch:
        root = Path(scratch)
        for name in ("pyproject.toml", "Cargo.toml", "Cargo.lock", "README.md", "rustfmt.toml"):
            if (REPO / name).exists():
                shutil.copy2(REPO / name, root / name)
        for name in ("host", "guest-python"):
            shutil.copytree(REPO / name, root / name, ignore=ignore)
        if (REPO / "benches").exists():  # host/Cargo.toml may name benches there
            shutil.copytree(REPO / "benches", root / "benches", ignore=ignore)
        shipped = root / "guest-python" / "cpy2py" / "wasi-guest"
        shipped.mkdir()
        shutil.copy2(GUEST, shipped / GUEST.name)
        for name in ("python-lib", "bundled", "stage"):
            shutil.copytree(BUILD / name, shipped / name, ignore=shutil.ignore_patterns("__pycache__"))
        maturin = Path(sys.executable).parent / "maturin"
        command = [str(maturin if maturin.exists() else "maturin"), "build", "--release", "-o", str(out_dir)]
        result = subprocess.run(command, cwd=root)
        if result.returncode != 0:
            fail(f"maturin build failed (exit status {result.returncode})")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--if-stale", action="store_true", help="build only when inputs changed")
    parser.add_argument("--wheel", metavar="DIR", help="then build a wheel that ships the guest into DIR")
    args = parser.parse_args(argv)
    build(force=not args.if_stale)
    if args.wheel:
        build_wheel(Path(args.wheel).resolve())


if __name__ == "__main__":
    main()
