"""The examples are written as the README asks: a main script that defines
pinned code does its work under ``if __name__ == "__main__":`` only, since a
twin imports the script and would run its top level again."""

from __future__ import annotations

import ast
import os

import pytest
from support import TESTS_DIR

EXAMPLES = os.path.join(os.path.dirname(TESTS_DIR), "examples")
SCRIPTS = sorted(name for name in os.listdir(EXAMPLES) if name.endswith(".py"))

#: what may run at a main script's top level: definitions, imports, constants
DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign)


def _is_main_guard(node: ast.stmt) -> bool:
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_example_does_its_work_under_the_main_guard(script):
    with open(os.path.join(EXAMPLES, script)) as source:
        tree = ast.parse(source.read())
    body = tree.body[1:] if ast.get_docstring(tree) is not None else tree.body
    work = [node for node in body if not isinstance(node, DEFINITIONS) and not _is_main_guard(node)]
    assert not work, f"{script} runs code at its top level (line {work[0].lineno}): move it under the guard"
    assert any(_is_main_guard(node) for node in body), f"{script} has no main guard"
