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
#: in a guest of a fresh twin (``TwinMaster(..., fresh=True)``, whose guests
#: have ids of their own): that twin's id, so that functions and classes
#: pinned to it run here (set from the guest's welcome); else ""
FRESH_OF: str = ""


def is_twinterpreter(kernel_id: str) -> bool:
    """Whether this interpreter is the one named ``kernel_id`` (the original's
    parameter name, so calls by keyword keep working)."""
    return kernel_id == TWIN_ID


def runs_pinned(twin_id: str) -> bool:
    """Whether code pinned to ``twin_id`` runs in this interpreter."""
    return twin_id == TWIN_ID or (bool(FRESH_OF) and twin_id == FRESH_OF)


def is_master() -> bool:
    """Whether this interpreter is the master of its group."""
    return TWIN_ID == MASTER_ID


class TwinGroupState:
    """Set-up that every twin of this group runs (the original's semantics).

    Initializers run in a twin before its kernel serves (``start()`` fails
    if one raises); finalizers run in it right after its kernel has started,
    before ``start()`` returns (for an exit hook, register ``atexit`` from a
    finalizer). Both run in every twin started later and, unless
    ``init_existing=False``, at once in every twin already running; never in
    the interpreter that added them. Added in a twin, they are the master's
    (it runs them in itself and the other twins). They travel like any call:
    module-level functions by name, arguments as values.
    """

    def __init__(self) -> None:
        self.initializers: List[Tuple[Callable[..., Any], tuple, dict]] = []
        self.finalizers: List[Tuple[Callable[..., Any], tuple, dict]] = []

    def add_initializer(
        self, func: Callable[..., Any], *args: Any, init_existing: bool = True, **kwargs: Any
    ) -> Callable[..., Any]:
        """Run ``func(*args, **kwargs)`` in each twin before its kernel serves."""
        from .kernel import group_state

        group_state.add(self, "initializers", (func, args, kwargs), init_existing)
        return func

    def add_finalizer(
        self, func: Callable[..., Any], *args: Any, init_existing: bool = True, **kwargs: Any
    ) -> Callable[..., Any]:
        """Run ``func(*args, **kwargs)`` in each twin right after its kernel started."""
        from .kernel import group_state

        group_state.add(self, "finalizers", (func, args, kwargs), init_existing)
        return func


#: the group state of this master; twins receive its contents when they start
TWIN_GROUP_STATE = TwinGroupState()
