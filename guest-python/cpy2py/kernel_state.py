"""Who this interpreter is within its group of twinterpreters.

``TWIN_ID`` is the id of the interpreter running this code, ``MASTER_ID``
the id of the master. In the master both are equal.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, List, Tuple

#: default id of the master process
DEFAULT_MASTER_ID = "__master__"

MASTER_ID: str = os.environ.get("__CPY2PY_MASTER_ID__", DEFAULT_MASTER_ID)
TWIN_ID: str = os.environ.get("__CPY2PY_TWIN_ID__", MASTER_ID)


def is_twinterpreter(twinterpreter_id: str) -> bool:
    """Whether this interpreter is the one named ``twinterpreter_id``."""
    return twinterpreter_id == TWIN_ID


def is_master() -> bool:
    """Whether this interpreter is the master of its group."""
    return TWIN_ID == MASTER_ID


class TwinGroupState:
    """Set-up and tear-down that every twin of this group runs.

    Initializers run in a twin after it connected and before it serves
    (``start()`` fails if one raises); finalizers run when its link ends.
    Both apply to every twin started after they were added. They travel
    like any call: module-level functions by name, arguments as values.
    """

    def __init__(self) -> None:
        self.initializers: List[Tuple[Callable[..., Any], tuple, dict]] = []
        self.finalizers: List[Tuple[Callable[..., Any], tuple, dict]] = []

    def add_initializer(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
        """Run ``func(*args, **kwargs)`` in each twin before it serves."""
        self.initializers.append((func, args, kwargs))
        return func

    def add_finalizer(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
        """Run ``func(*args, **kwargs)`` in each twin after its link ended."""
        self.finalizers.append((func, args, kwargs))
        return func


#: the group state of this master; twins receive its contents when they start
TWIN_GROUP_STATE = TwinGroupState()
