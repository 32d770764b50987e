# cpy2py workflows. `just --list` shows them all.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv"
python := venv / "bin" / "python"
export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", justfile_directory() / "target")

# list the recipes
default:
    @just --list

# create the virtual environment with the Python tools, and make sure pypy3 is there
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ ! -x "{{python}}" ]; then python3 -m venv "{{venv}}"; fi
    stamp="{{venv}}/.tools-installed"
    if [ ! -f "$stamp" ] || [ requirements-dev.txt -nt "$stamp" ]; then
        "{{python}}" -m pip install --quiet --upgrade pip
        "{{python}}" -m pip install --quiet -r requirements-dev.txt
        touch "$stamp"
    fi
    if ! command -v pypy3 >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "installing Debian's pypy3 ..."
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pypy3 >/dev/null
        else
            echo "note: pypy3 is not installed; install it (Debian: sudo apt-get install pypy3) or the pypy3 tests are skipped" >&2
        fi
    fi

# build the WASI guest (wasm/build/cpy2py-guest.wasm) when missing or older than its inputs
wasm: setup
    "{{python}}" wasm/build_guest.py --if-stale

# build the host (Rust, release) into the virtual environment as cpy2py._host; one guest
# started and stopped compiles it for this machine (and its standard library's bytecode) once
build: setup wasm
    VIRTUAL_ENV="{{venv}}" "{{venv}}/bin/maturin" develop --release --quiet
    "{{python}}" wasm/warm_guest.py

# a wheel of cpy2py that ships the WASI guest (into dist/)
wheel: setup
    "{{python}}" wasm/build_guest.py --if-stale --wheel dist

# run the demos: tutorial (PyPy), dispatch (PyPy + matplotlib), objects, sandboxed plugins, a pool of fresh sandboxes, asyncio service
demo: build
    "{{python}}" examples/tutorial.py
    mkdir -p results && "{{python}}" examples/dispatch.py --output results/primes.png
    "{{python}}" examples/objects.py
    "{{python}}" examples/sandbox.py
    "{{python}}" examples/plugin_pool.py
    "{{python}}" examples/async_service.py

# run all tests: cargo test for the host, pytest over every twin kind
test *PYTEST_ARGS: build
    cargo test --quiet
    "{{python}}" -m pytest {{PYTEST_ARGS}}

# benchmarks (issue 5): no-op calls, startup, payloads against the raw-pipe floor and the peers, pinned and unpinned, and the Rust codec benches (< 10 min); writes results/
bench *ARGS: build
    bash benches/setup.sh
    .venv-bench/bin/python benches/run.py --rust {{ARGS}}

# a one-minute version of `just bench` (fewer rounds, no Rust benches)
bench-quick *ARGS: build
    bash benches/setup.sh
    .venv-bench/bin/python benches/run.py --quick {{ARGS}}

# reliability at full size (issue 6): 8 threads x 10,000 calls, 1,000,000 calls and 100,000 proxies with flat memory, 20,000 examples per codec property
soak *PYTEST_ARGS: build
    CPY2PY_SOAK=full "{{python}}" -m pytest tests/test_reliability_load.py tests/test_codec_properties.py -o timeout=14400 {{PYTEST_ARGS}}

# fuzz the frame reader, Value::decode, the hello parser and the message model: cargo-fuzz (stable toolchain, --sanitizer none) for SECONDS per target, then 10,000,000 inputs of the deterministic fuzzer of `cargo test`, then the compiled codec's decoder (cpy2py._host.loads) against the pure-Python one on 20,000 examples per garbage property
fuzz SECONDS="300":
    #!/usr/bin/env bash
    set -euo pipefail
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
    python3 host/fuzz/seed_corpus.py
    for target in frames value_decode hello message; do
        echo "== fuzzing $target for {{SECONDS}} s"
        # instrumented builds go apart from the normal ones
        (cd host/fuzz && CARGO_TARGET_DIR="$CARGO_TARGET_DIR/fuzz" cargo fuzz run --sanitizer none \
            "$target" "corpus/$target" -- -max_total_time={{SECONDS}} -max_len=65536 -print_final_stats=1)
    done
    seed="${CPY2PY_FUZZ_SEED:-$(date +%s)}"
    echo "== 10,000,000 mutated inputs, CPY2PY_FUZZ_SEED=$seed"
    CPY2PY_FUZZ_SEED="$seed" CPY2PY_FUZZ_ITERATIONS=10000000 cargo test --release --manifest-path host/Cargo.toml \
        --test fuzz_decoder -- --nocapture
    echo "== the compiled decoder (cpy2py._host.loads) on garbage, against the pure-Python one"
    just build
    CPY2PY_SOAK=full "{{python}}" -m pytest -q tests/test_codec_properties.py -k "garbage or protocol_error or verdict" -o timeout=14400

# rustfmt, clippy (warnings are errors) and ruff
lint: setup
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings
    cargo clippy --features python -- -D warnings
    "{{venv}}/bin/ruff" check guest-python tests examples wasm benches
    "{{venv}}/bin/ruff" format --check guest-python tests examples wasm benches

# format Rust and Python sources
fmt: setup
    cargo fmt
    "{{venv}}/bin/ruff" format guest-python tests examples wasm benches
