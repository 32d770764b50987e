"""The examples of the original cpy2py documentation, as written there
(apart from Python 2 syntax): quick guide, objects page, functions page."""

from __future__ import annotations

import os

from cpy2py import TwinObject, twinfunction


def my_function(*args, **kwargs):
    return {"args": args, "kwargs": kwargs, "pid": os.getpid()}


class SuperComputer(TwinObject):
    __twin_id__ = "pypy"  # makes class native to pypy twinterpeter

    def megaloop(self, x, y):
        return sum(a + b for a in range(x) for b in range(y))


class CWrapper(TwinObject):
    __twin_id__ = "python"  # makes class native to python twinterpeter

    def callme(self, who, what="buy milk"):
        return f"{who}: {what} ({os.getpid()})"


@twinfunction("pypy")
def superlooper(count=1000, add=3, start=0):
    for _ in range(count):
        start += add
    return add


class RegularObject(object):  # noqa: UP004 - as in the docs
    def foo(self):
        return 2


class CPy2PyObject(TwinObject):
    def foo(self):
        return 2


class PyPyObject(TwinObject):
    __twin_id__ = "pypy"  # makes class native to pypy twinterpeter

    # regular class definition
    def foo(self):
        return 2


class TranslatorObject(TwinObject):
    __twin_id__ = "pypy"  # makes class native to pypy twinterpeter

    def make_str(self, other):  # other is passed implicitly to pypy twinterpeter
        return "%s got %s" % (self, other)  # noqa: UP031 - as in the docs

    def pass_on(self, other):
        return other  # other is back again, possibly creating a different object

    def insert_at(self, other, item, at):
        other[at] = item  # modify cloned other inplace
        return other  # return modified clone


@twinfunction("pypy3")
def sum_series(max_n):
    return [(n, sum(range(n))) for n in range(0, max_n + 1, max_n // 10)]
