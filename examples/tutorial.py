"""The tutorial of the original cpy2py, on Python 3: ``sum_series`` is pinned
to PyPy, the rest of the program stays in CPython.

    python examples/tutorial.py [MAX_N]

Prints the series as the tutorial does, then how long it took pinned to PyPy
(including starting PyPy) and unpinned in this interpreter.
"""

import sys
import time

from cpy2py import twinfunction


@twinfunction("pypy3")
def sum_series(max_n):
    return [(n, sum(range(n))) for n in range(0, max_n + 1, max_n // 10)]


if __name__ == "__main__":
    max_n = int(sys.argv[1]) if len(sys.argv) > 1 else 30_000_000
    start = time.perf_counter()
    pinned = sum_series(max_n)
    pinned_seconds = time.perf_counter() - start
    for n, total in pinned:
        print(n, "=>", total)

    start = time.perf_counter()
    unpinned = sum_series.__wrapped__(max_n)  # the plain function, run right here
    unpinned_seconds = time.perf_counter() - start
    assert pinned == unpinned

    here = f"{sys.implementation.name} {sys.version.split()[0]}"
    print(f"pinned to PyPy: {pinned_seconds:.2f} s (including PyPy's start)")
    print(f"unpinned in {here}: {unpinned_seconds:.2f} s")
