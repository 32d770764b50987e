"""The ``__cpy2py__`` logger tree and the ``CPY2PY_DEBUG`` switch.

By default no handler is attached and propagation is disabled, so cpy2py is
silent. ``CPY2PY_DEBUG=1`` (or a level name such as ``INFO``) writes the logs
of this interpreter to stderr; twins inherit the variable, so every
interpreter of the group logs. Per-call records (each request and reply)
are made only when ``CPY2PY_DEBUG`` asks for DEBUG (``PER_CALL``), and
never under ``python -O``.

The ``logging`` module is not imported for cpy2py's sake: a twin would pay
for it (with ``traceback``, ``string`` and more) before its first call. The
loggers handed out here are stand-ins that become the real ``logging``
loggers as soon as the ``logging`` module is loaded, by anyone. Until then
nothing can be listening (no handler exists without ``logging``), and a
record would go nowhere: the stand-ins drop it without building it.
"""

from __future__ import annotations

import _thread
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from typing import Any, Dict, Optional

ROOT_NAME = "__cpy2py__"

#: the methods that log a record: dropped while ``logging`` is not loaded
_RECORDING = ("debug", "info", "warning", "error", "exception", "critical", "log")

_root_ready = False
_modules = sys.modules
_LOCK = _thread.allocate_lock()


def _setup_root() -> None:
    """Our defaults on the real root logger of the tree: silent, not propagating.

    Applied once, when ``logging`` is loaded; a root logger that the
    application already made (to configure it) is left as it set it.
    """
    global _root_ready
    import logging

    with _LOCK:
        if _root_ready:
            return
        existed = isinstance(logging.Logger.manager.loggerDict.get(ROOT_NAME), logging.Logger)
        root = logging.getLogger(ROOT_NAME)
        if not existed:
            root.propagate = False
            root.addHandler(logging.NullHandler())
        _root_ready = True


class _Logger:
    """A logger of the ``__cpy2py__`` tree that imports nothing.

    Once the ``logging`` module is loaded, the first use binds the real
    logger's methods onto this object, so that later calls cost what a
    ``logging.Logger`` call costs.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._real: Optional[logging.Logger] = None

    def _resolve(self, load: bool) -> Optional[logging.Logger]:
        if self._real is None:
            if not load and "logging" not in sys.modules:
                return None
            import logging

            if not _root_ready:
                _setup_root()
            real = logging.getLogger(self.name)
            for method in _RECORDING:
                setattr(self, method, getattr(real, method))
            self._real = real
        return self._real

    def _emit(self, method: str, args: Any, kwargs: Dict[str, Any]) -> None:
        real = self._resolve(load=False)
        if real is not None:
            kwargs.setdefault("stacklevel", 3)  # the caller of debug(), not this stand-in
            getattr(real, method)(*args, **kwargs)

    # While ``logging`` is not loaded, a call costs one dict lookup; the first
    # call after it was loaded binds the real methods here (see _resolve).
    def debug(self, *args: Any, **kwargs: Any) -> None:
        if "logging" in _modules:
            self._emit("debug", args, kwargs)

    def info(self, *args: Any, **kwargs: Any) -> None:
        if "logging" in _modules:
            self._emit("info", args, kwargs)

    def warning(self, *args: Any, **kwargs: Any) -> None:
        if "logging" in _modules:
            self._emit("warning", args, kwargs)

    def error(self, *args: Any, **kwargs: Any) -> None:
        if "logging" in _modules:
            self._emit("error", args, kwargs)

    def exception(self, *args: Any, **kwargs: Any) -> None:
        if "logging" in _modules:
            kwargs.setdefault("exc_info", True)
            self._emit("error", args, kwargs)

    def critical(self, *args: Any, **kwargs: Any) -> None:
        if "logging" in _modules:
            self._emit("critical", args, kwargs)

    def log(self, *args: Any, **kwargs: Any) -> None:
        if "logging" in _modules:
            self._emit("log", args, kwargs)

    def __getattr__(self, name: str) -> Any:
        # anything else of a logger (isEnabledFor, handlers, setLevel, ...)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._resolve(load=True), name)

    def __repr__(self) -> str:
        return f"<cpy2py logger {self.name}>"


_loggers: Dict[str, _Logger] = {}


def get_logger(name: str) -> _Logger:
    """A child of the ``__cpy2py__`` logger (a stand-in until ``logging`` is loaded)."""
    full = f"{ROOT_NAME}.{name}"
    with _LOCK:
        logger = _loggers.get(full)
        if logger is None:
            logger = _loggers[full] = _Logger(full)
    return logger


#: records of every request and reply sent (two a call, each costing a
#: microsecond or more on the call path): made only when ``CPY2PY_DEBUG``
#: asks for DEBUG or below (set by ``configure_from_environment``)
PER_CALL = False


def debug_level() -> str | None:
    """The level requested by ``CPY2PY_DEBUG``, or None when it is unset or empty."""
    value = os.environ.get("CPY2PY_DEBUG", "").strip()
    if not value:
        return None
    import logging

    level = logging.getLevelName(value.upper())
    return value.upper() if isinstance(level, int) else "DEBUG"


def configure_from_environment(process_name: str) -> str | None:
    """Attach a stderr handler when ``CPY2PY_DEBUG`` asks for one; returns the level.

    Without ``CPY2PY_DEBUG`` this imports nothing.
    """
    level = debug_level()
    if level is None:
        if "logging" in sys.modules:
            _setup_root()  # the master's usual case: same defaults as ever, at import
        return None
    import logging

    _setup_root()
    root = logging.getLogger(ROOT_NAME)
    if not any(getattr(h, "_cpy2py_debug", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._cpy2py_debug = True  # type: ignore[attr-defined]
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s [{process_name} %(process)d %(threadName)s] %(name)s %(levelname)s: %(message)s"
            )
        )
        root.addHandler(handler)
    root.setLevel(level)
    global PER_CALL
    PER_CALL = root.getEffectiveLevel() <= logging.DEBUG
    return level
