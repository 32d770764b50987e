"""The dispatch example of the original cpy2py, on Python 3.

Two functions pinned to two interpreters: the prime sieve, a nested loop of
O(N^2) flavour, runs in PyPy; the drawing uses matplotlib, which PyPy does
not have, and runs in CPython. The picture goes to a PNG file instead of a
window.

    python examples/dispatch.py [COUNT] [--output primes.png]
"""

import math
import sys
import time

from cpy2py import TwinMaster, twinfunction


# extensive code run in PyPy for optimizations
@twinfunction("pypy")
def prime_sieve(max_val):
    """Sieve prime numbers"""
    start_time = time.time()
    primes = [1] * 2 + [0] * (max_val - 1)
    for value, factors in enumerate(primes):
        if factors == 0:
            for multiple in range(value * value, max_val + 1, value):
                primes[multiple] += 1
    return {
        "xy_matrix": [
            [primes[idx] == 0 for idx in range(minidx, minidx + int(math.sqrt(max_val)))]
            for minidx in range(0, max_val, int(math.sqrt(max_val)))
        ],
        "info": "%s in %.1fs" % (sys.executable, time.time() - start_time),  # noqa: UP031 - as in the original
    }


# matplotlib in CPython
@twinfunction("python")
def draw(xy_matrix, info="<None>", output="primes.png"):
    """Draw an XY matrix and attach some info"""
    import matplotlib

    matplotlib.use("Agg")  # a file, not a window
    from matplotlib import pyplot

    pyplot.copper()
    pyplot.matshow(xy_matrix)
    pyplot.xlabel(info, color="red")
    pyplot.savefig(output)
    pyplot.close("all")
    return output


# native function not assigned to particular interpreter
def main():
    """Find and draw prime numbers"""
    import argparse

    cli = argparse.ArgumentParser("function twin example")
    cli.add_argument("COUNT", help="size of computation", type=int, default=int(1e6), nargs="?")
    cli.add_argument("--output", default="primes.png", help="where to write the picture")
    options = cli.parse_args()
    # Twinterpreters may be started explicitly; this one is the interpreter
    # running this script, which has matplotlib
    twins = [TwinMaster(executable=sys.executable, twinterpreter_id="python"), TwinMaster("pypy")]
    for twin in twins:
        twin.start()
    # twins can be chained directly
    written = draw(output=options.output, **prime_sieve(options.COUNT))
    print(f"sieved {options.COUNT} numbers in PyPy and drew them in CPython: {written}")


# protect main thread from executing again in other interpreters
if __name__ == "__main__":
    main()
