"""The original's import path of ``TwinObject`` and ``localmethod``
(``from cpy2py.proxy.proxy_object import TwinObject``); they live in
``cpy2py.twin_object``."""

from __future__ import annotations

from ..twin_object import TwinObject, localmethod

__all__ = ["TwinObject", "localmethod"]
