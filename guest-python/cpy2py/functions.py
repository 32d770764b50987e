"""``twinfunction``: a function that always runs in its own twinterpreter."""

from __future__ import annotations

from . import kernel_state
from .kernel import links
from .protocol.messages import OP_EXECUTE

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, TypeVar

    F = TypeVar("F", bound=Callable[..., Any])


def twinfunction(twinterpreter_id: str) -> Callable[[F], F]:
    """Pin a module-level function to the twinterpreter ``twinterpreter_id``.

    In that interpreter itself it is the plain function, marked with
    ``__twin_id__`` (no wrapper, no cost). Anywhere else it is a wrapper that
    sends the call there (starting the twin on first use); the wrapper keeps
    the function's name, docs, defaults, annotations and signature, its
    ``__wrapped__`` is the plain function, and it can itself be passed to
    other interpreters.
    """
    if not isinstance(twinterpreter_id, str):
        raise TypeError(
            f"twinfunction takes a twinterpreter id such as 'pypy3', not {twinterpreter_id!r}; "
            "write @twinfunction('pypy3')"
        )

    def decorator(func: F) -> F:
        if kernel_state.TWIN_ID == twinterpreter_id:  # its own interpreter: as in the original
            func.__twin_id__ = twinterpreter_id  # type: ignore[attr-defined]
            return func
        import functools  # at decoration, not when a twin starts

        @functools.wraps(func)
        def twin_function(*args: Any, **kwargs: Any) -> Any:
            if kernel_state.TWIN_ID == twinterpreter_id:
                return func(*args, **kwargs)
            return links.connection_to(twinterpreter_id).request(
                OP_EXECUTE, twin_function, list(args), kwargs
            )

        twin_function.__defaults__ = func.__defaults__  # type: ignore[attr-defined]
        twin_function.__kwdefaults__ = func.__kwdefaults__  # type: ignore[attr-defined]
        twin_function.__twin_id__ = twinterpreter_id  # type: ignore[attr-defined]
        return twin_function  # type: ignore[return-value]

    return decorator
