#!/usr/bin/env bash
# Sets up the benchmark environments from a clean clone (idempotent, quick
# when nothing changed). Called by `just bench` / `just bench-quick` after
# `just build` has built the host into .venv.
#
#   .venv-bench/            CPython venv: execnet, rpyc, matplotlib, py-spy, and
#                           this repo's cpy2py (a .pth to guest-python, whose
#                           compiled cpy2py._host `just build` made)
#   .venv-bench/original/   the original cpy2py 0.17.1 (pip --target); on
#                           PYTHONPATH only where the original is benchmarked
#   .venv-bench-pypy/       PyPy venv with execnet and rpyc for the peers'
#                           PyPy children (pypy3 -m venv; Debian's pypy3 has
#                           ensurepip)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${BENCH_PYTHON:-python3}
venv=$root/.venv-bench
pypy_venv=$root/.venv-bench-pypy

stamp_ok() { [ -f "$1" ] && [ ! "$2" -nt "$1" ] && [ ! benches/setup.sh -nt "$1" ]; }

if [ ! -x "$venv/bin/python" ]; then
    echo "bench setup: creating $venv"
    "$python" -m venv "$venv"
fi
if ! stamp_ok "$venv/.installed" requirements-bench.txt; then
    echo "bench setup: installing requirements-bench.txt into .venv-bench"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -r requirements-bench.txt
    touch "$venv/.installed"
fi
# this repo's cpy2py: the package sources plus the _host extension built by `just build`
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$root/guest-python" > "$site/cpy2py-repo.pth"

if ! stamp_ok "$venv/original/.installed" benches/requirements-original.txt; then
    echo "bench setup: installing the original cpy2py 0.17.1 into .venv-bench/original"
    rm -rf "$venv/original"
    "$venv/bin/python" -m pip install --quiet --no-deps --target "$venv/original" -r benches/requirements-original.txt
    touch "$venv/original/.installed"
fi

if command -v pypy3 >/dev/null; then
    if [ ! -x "$pypy_venv/bin/python" ]; then
        echo "bench setup: creating $pypy_venv"
        pypy3 -m venv "$pypy_venv" || { echo "bench setup: pypy3 -m venv failed; the peers' PyPy rows are skipped" >&2; rm -rf "$pypy_venv"; }
    fi
    if [ -x "$pypy_venv/bin/python" ] && ! stamp_ok "$pypy_venv/.installed" requirements-bench.txt; then
        echo "bench setup: installing requirements-bench.txt into .venv-bench-pypy"
        "$pypy_venv/bin/python" -m pip install --quiet -r requirements-bench.txt
        touch "$pypy_venv/.installed"
    fi
else
    echo "bench setup: pypy3 is not installed; the PyPy rows are skipped" >&2
fi
