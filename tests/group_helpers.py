"""What the TWIN_GROUP_STATE tests run in twins (module-level, free of pytest
imports, so every twin, sandboxed ones included, can import it by name)."""

from __future__ import annotations

import atexit

from cpy2py import TWIN_GROUP_STATE, kernel_state
from cpy2py.kernel import links

#: what ran in this interpreter, in order: (label, whether its kernel served by then)
RECORDED: list = []


def record(label: str) -> None:
    serving = links.existing_connection(kernel_state.MASTER_ID) is not None
    RECORDED.append((label, kernel_state.TWIN_ID, serving))


def recorded() -> list:
    return list(RECORDED)


def print_at_exit(text: str) -> None:
    """A finalizer that registers an exit hook, as the original advises."""
    atexit.register(print, text, flush=True)


def add_from_here(label: str) -> None:
    """Adds an initializer from the interpreter this runs in."""
    TWIN_GROUP_STATE.add_initializer(record, label)


def fail(message: str) -> None:
    raise LookupError(message)
