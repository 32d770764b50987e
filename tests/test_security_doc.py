"""docs/security.md names, for each rule, the tests that show it holds: each
named test exists. A test renamed or moved without the document would leave
its rule resting on nothing, and nothing else would say so.

A reference is ``test_file.py::test_name`` (``tests/`` may come first),
``::test_name`` for another test of the file named last, or
``host/src/<path>.rs::name`` for a cargo test of the host."""

from __future__ import annotations

import os
import re

from support import TESTS_DIR

ROOT = os.path.dirname(TESTS_DIR)
DOC = os.path.join(ROOT, "docs", "security.md")

_PYTHON_REFERENCE = re.compile(r"(test_\w+\.py)(?:::(test_\w+))?|::(test_\w+)")
_HOST_REFERENCE = re.compile(r"(host/src/[\w/]+\.rs)::(\w+)")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def python_references(text: str) -> list:
    """(test file, test function or None) for each reference in ``text``."""
    found, current = [], None
    for match in _PYTHON_REFERENCE.finditer(text):
        file, function, continued = match.groups()
        if file:
            current = file
            found.append((file, function))
        else:
            assert current is not None, f"::{continued} names no file before it"
            found.append((current, continued))
    return found


def missing_python_tests(text: str) -> list:
    """The references in ``text`` to Python tests that do not exist."""
    missing = []
    for file, function in python_references(text):
        path = os.path.join(TESTS_DIR, file)
        if not os.path.exists(path):
            missing.append(f"{file} (no such file)")
        elif function and not re.search(rf"^(?:async )?def {function}\b", _read(path), re.M):
            missing.append(f"{file}::{function}")
    return missing


def test_every_python_test_the_document_names_exists():
    text = _read(DOC)
    assert len(python_references(text)) > 100  # (the pattern still finds the document's references)
    missing = missing_python_tests(text)
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"


def test_every_host_test_the_document_names_exists():
    references = _HOST_REFERENCE.findall(_read(DOC))
    assert references
    missing = [
        f"{file}::{name}"
        for file, name in references
        if not os.path.exists(os.path.join(ROOT, file))
        or not re.search(rf"\bfn {name}\b", _read(os.path.join(ROOT, file)))
    ]
    assert not missing, f"docs/security.md names host tests that do not exist: {missing}"


def test_a_test_named_under_the_wrong_file_is_reported():
    """The check itself: ``::name`` continues the file named last, so a test
    of another file named that way is reported, as is a file that is not."""
    text = (
        "*test_codec.py::test_a_rendition_that_fails_to_read_leaves_the_next_one_whole, "
        "::test_a_guest_repr_is_capped, test_nothing_here.py*"
    )
    assert missing_python_tests(text) == [
        "test_codec.py::test_a_guest_repr_is_capped",
        "test_nothing_here.py (no such file)",
    ]
