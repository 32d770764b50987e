"""The ``__cpy2py__`` logger tree and the ``CPY2PY_DEBUG`` switch.

By default no handler is attached and propagation is disabled, so cpy2py is
silent. ``CPY2PY_DEBUG=1`` (or a level name such as ``INFO``) writes the logs
of this interpreter to stderr; twins inherit the variable, so every
interpreter of the group logs. Per-call logging sits behind ``if __debug__:``
and disappears under ``python -O``.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT_NAME = "__cpy2py__"

root_logger = logging.getLogger(ROOT_NAME)
root_logger.propagate = False
root_logger.addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """A child of the ``__cpy2py__`` logger."""
    return root_logger.getChild(name)


def debug_level() -> str | None:
    """The level requested by ``CPY2PY_DEBUG``, or None when it is unset or empty."""
    value = os.environ.get("CPY2PY_DEBUG", "").strip()
    if not value:
        return None
    level = logging.getLevelName(value.upper())
    return value.upper() if isinstance(level, int) else "DEBUG"


def configure_from_environment(process_name: str) -> str | None:
    """Attach a stderr handler when ``CPY2PY_DEBUG`` asks for one; returns the level."""
    level = debug_level()
    if level is None:
        return None
    if not any(getattr(h, "_cpy2py_debug", False) for h in root_logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._cpy2py_debug = True  # type: ignore[attr-defined]
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s [{process_name} %(process)d %(threadName)s] %(name)s %(levelname)s: %(message)s"
            )
        )
        root_logger.addHandler(handler)
    root_logger.setLevel(level)
    return level
