"""The original cpy2py documentation runs as written (Python 3 syntax, and
'pypy'/'python' resolving to pypy3/python3 where needed)."""

from __future__ import annotations

import os

import original_docs as docs
import pytest
from cpy2py import TwinMaster
from support import require_interpreter


@pytest.fixture(scope="module", autouse=True)
def interpreters():
    require_interpreter("pypy3")
    yield


def test_quick_guide_execute():
    twinterpreter = TwinMaster("pypy")
    twinterpreter.start()
    result = twinterpreter.execute(docs.my_function, 1, 2, 3, "ka-pow!", doctor="who?")
    assert result["args"] == (1, 2, 3, "ka-pow!") and result["kwargs"] == {"doctor": "who?"}
    assert result["pid"] != os.getpid()


def test_quick_guide_twin_objects():
    assert docs.SuperComputer().megaloop(30, 20) == sum(a + b for a in range(30) for b in range(20))
    answer = docs.CWrapper().callme("me")
    assert answer.startswith("me: buy milk (") and str(os.getpid()) not in answer


def test_quick_guide_twinfunction():
    assert docs.superlooper(int(1e5), 1) == 1


def test_objects_page_basics():
    assert docs.RegularObject().foo() == 2
    my_instance = docs.CPy2PyObject()  # create native object or proxy transparently
    assert my_instance.foo() == 2
    my_instance.bar = 2  # add attribute, visible to native object and all proxies
    assert my_instance.bar == 2
    pypy_instance = docs.PyPyObject()
    assert pypy_instance.foo() == 2
    pypy_instance.bar = 2
    assert pypy_instance.bar == 2


def test_objects_page_immutable_values():
    translator = docs.TranslatorObject()
    test_int = 5
    test_set = frozenset((1, 2, 3))
    assert test_int == translator.pass_on(test_int), "Value comparison works"
    assert test_set == translator.pass_on(test_set), "Member value comparison works"
    assert test_int is translator.pass_on(test_int), "Primitives are singleton'ish"
    with pytest.raises(AssertionError):
        assert test_set is translator.pass_on(test_set), "Collections are singleton'ish"
    assert translator.make_str(7).endswith(" got 7")


def test_objects_page_mutable_values():
    translator = docs.TranslatorObject()
    test_list = [1, 2, 3]
    # the docs call translator(test_list) here, which is a typo for pass_on
    assert test_list == translator.pass_on(test_list), "Member value comparison"
    cloned_list = translator.pass_on(test_list)
    inserted_list = translator.insert_at(test_list, 0, 0)
    test_list[0] = 0
    assert test_list == inserted_list, "Modifications are consistent"
    assert test_list == translator.pass_on(test_list), "Nested passing is consistent"
    with pytest.raises(AssertionError):
        assert test_list == cloned_list, "Mutations are transparent"


def test_functions_page_and_tutorial():
    max_n = 200_000
    assert docs.sum_series(max_n) == docs.sum_series.__wrapped__(max_n)
