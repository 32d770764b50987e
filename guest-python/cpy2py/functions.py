"""``twinfunction``: a function that always runs in its own twinterpreter."""

from __future__ import annotations

import sys

from . import kernel_state
from .kernel import links
from .protocol.messages import OP_EXECUTE

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, TypeVar

    F = TypeVar("F", bound=Callable[..., Any])


def fresh_twin_named(twin_id: str) -> Any:
    """In the master: the fresh twin (``TwinMaster(..., fresh=True)``) of id
    ``twin_id`` if there is one (made and started or called before), else None."""
    master = sys.modules.get(f"{__package__}.master")
    if master is None or not kernel_state.is_master():
        return None
    config = master._configs.get(twin_id)
    return config if config is not None and config.fresh else None


#: the type of a ``def`` (``types.FunctionType``, which a twin's start does not import)
FunctionType = type(fresh_twin_named)


def _is_coroutine_function(func: Any) -> bool:
    """An ``async def`` (its code's CO_COROUTINE flag: no ``inspect`` import,
    which a twin's start avoids)."""
    return bool(getattr(getattr(func, "__code__", None), "co_flags", 0) & 0x80)


def twinfunction(twinterpreter_id: str) -> Callable[[F], F]:
    """Pin a module-level function to the twinterpreter ``twinterpreter_id``.

    In that interpreter itself it is the plain function, marked with
    ``__twin_id__`` (no wrapper, no cost). Anywhere else it is a wrapper that
    sends the call there (starting the twin on first use); the wrapper keeps
    the function's name, docs, defaults, annotations and signature, its
    ``__wrapped__`` is the plain function, and it can itself be passed to
    other interpreters. On an ``async def`` the wrapper is a coroutine
    function: awaiting a call runs the coroutine in the twin without
    blocking the caller's event loop.
    """
    if not isinstance(twinterpreter_id, str):
        raise TypeError(
            f"twinfunction takes a twinterpreter id such as 'pypy3', not {twinterpreter_id!r}; "
            "write @twinfunction('pypy3')"
        )

    def decorator(func: F) -> F:
        if type(func) is not FunctionType:  # (a functools.lru_cache, a partial, a class...)
            raise TypeError(
                f"twinfunction pins functions (def or async def) to a twin, not a "
                f"{type(func).__qualname__}: put @twinfunction({twinterpreter_id!r}) below other "
                "decorators such as functools.lru_cache, right above the def, so that it gets the function"
            )
        if kernel_state.runs_pinned(twinterpreter_id):  # its own interpreter: as in the original
            func.__twin_id__ = twinterpreter_id  # type: ignore[attr-defined]
            return func
        import functools  # at decoration, not when a twin starts

        if _is_coroutine_function(func):
            # an ``async def``: awaited, as the function itself would be, and
            # without blocking the caller's event loop; the twin runs the
            # coroutine to its end (awaitable.py)
            @functools.wraps(func)
            async def twin_function(*args: Any, **kwargs: Any) -> Any:
                if kernel_state.TWIN_ID == twinterpreter_id or kernel_state.FRESH_OF == twinterpreter_id:
                    return await func(*args, **kwargs)
                fresh_twin = fresh_twin_named(twinterpreter_id)
                if fresh_twin is not None:
                    from . import fresh

                    return await fresh.execute_async(fresh_twin, twin_function, list(args), kwargs)
                from .awaitable import aio

                return await aio(twin_function)(*args, **kwargs)

        else:

            @functools.wraps(func)
            def twin_function(*args: Any, **kwargs: Any) -> Any:
                if kernel_state.TWIN_ID == twinterpreter_id or kernel_state.FRESH_OF == twinterpreter_id:
                    return func(*args, **kwargs)
                fresh_twin = fresh_twin_named(twinterpreter_id)
                if fresh_twin is not None:  # every call in a guest of its own
                    from . import fresh

                    return fresh.execute(fresh_twin, twin_function, list(args), kwargs)
                return links.connection_to(twinterpreter_id).request(
                    OP_EXECUTE, twin_function, list(args), kwargs
                )

        twin_function.__defaults__ = func.__defaults__  # type: ignore[attr-defined]
        twin_function.__kwdefaults__ = func.__kwdefaults__  # type: ignore[attr-defined]
        twin_function.__twin_id__ = twinterpreter_id  # type: ignore[attr-defined]
        return twin_function  # type: ignore[return-value]

    return decorator
