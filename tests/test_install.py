"""`pip install .` in a fresh virtual environment gives a working cpy2py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from support import TESTS_DIR

REPO = os.path.dirname(TESTS_DIR)


@pytest.mark.timeout(1800)  # a cold build of the host compiles wasmtime
def test_pip_install_into_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # CARGO_TARGET_DIR (if set) is inherited, so a warm build is reused
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", REPO], capture_output=True, text=True, timeout=1500
    )
    assert install.returncode == 0, install.stdout + install.stderr
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, cpy2py
            from cpy2py import TwinMaster, twinfunction

            @twinfunction("python3")
            def where():
                return os.getpid()

            print("package", cpy2py.__file__)
            print("same pid", where() == os.getpid())
            here = os.path.dirname(cpy2py.__file__)
            print("typed", [f for f in ("py.typed", "_host.pyi") if os.path.isfile(os.path.join(here, f))])
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run(
        [python, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert f"package {venv}" in run.stdout
    assert "same pid False" in run.stdout
    assert "typed ['py.typed', '_host.pyi']" in run.stdout, "the wheel must ship the type information"
