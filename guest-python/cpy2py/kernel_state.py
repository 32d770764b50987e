"""Who this interpreter is within its group of twinterpreters.

``TWIN_ID`` is the id of the interpreter running this code, ``MASTER_ID``
the id of the master. In the master both are equal.
"""

from __future__ import annotations

import os

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
