"""Objects that live in different interpreters and work together.

A ``Simulation`` lives in PyPy, where its hot loop is fast; a ``Report``
lives in the master. The simulation is handed the report and fills it in
through a proxy; the master reads both as if they were local.

    python examples/objects.py
"""

import os
import sys

from cpy2py import TwinObject, is_proxy


class Report(TwinObject):
    """Collects lines; native to the master (no __twin_id__)."""

    def __init__(self):
        self.lines = []

    def add(self, text):
        self.lines.append(f"{text} (written in pid {os.getpid()})")
        return len(self.lines)


class Simulation(TwinObject):
    __twin_id__ = "pypy3"

    def __init__(self, walkers):
        self.walkers = walkers
        self.steps = 0

    @property
    def interpreter(self):
        return f"{sys.implementation.name} {sys.version.split()[0]}, pid {os.getpid()}"

    def run(self, steps, report):
        # a linear congruential random walk: pure Python, the JIT's favourite
        positions = [0] * self.walkers
        state = 12345
        for _ in range(steps):
            for walker in range(self.walkers):
                state = (1103515245 * state + 12345) & 0x7FFFFFFF
                positions[walker] += 1 if (state >> 16) & 1 else -1
        self.steps += steps
        report.add(f"{self.walkers} walkers took {steps} steps in {self.interpreter}")
        return max(positions), min(positions)

    def __len__(self):
        return self.steps


if __name__ == "__main__":
    report = Report()
    simulation = Simulation(walkers=100)
    print("simulation is a proxy here:", is_proxy(simulation), "- report is not:", is_proxy(report))
    print("simulation runs in", simulation.interpreter)
    for steps in (10_000, 20_000):
        highest, lowest = simulation.run(steps, report)
        print(f"after {len(simulation)} steps: walkers between {lowest} and {highest}")
    print("the report, filled in from PyPy through a proxy:")
    for line in report.lines:
        print("  ", line)
