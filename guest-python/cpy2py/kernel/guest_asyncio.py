"""asyncio in the WASI guest: event loops without a self-pipe.

asyncio's selector event loop makes a socket pair as it starts, so that
other threads and signal handlers can wake it. A WASI guest can make no
socket (``socket.socketpair`` raises ``PermissionError``), so no event loop
could start there: neither the kernel's, for a coroutine function the
master calls, nor a plugin's own ``asyncio.run``. A guest has no other
thread and no signal handler to wake its loop, so its loops do without the
pair: ``install`` has ``asyncio.selector_events`` patched as it is imported
(the guest does not import asyncio until something uses it). For the same
reason, ``loop.add_signal_handler`` raises ``NotImplementedError``, as asyncio
does where there are no signals (Windows), which servers and frameworks
expect; it failed with an ``AttributeError`` of ``signal`` before.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def install() -> None:
    """Patch asyncio's loops now if it is imported (a snapshot's preload),
    else when it is."""
    waiting = False
    for name, patch in _PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            patch(module)
        else:
            waiting = True
    if waiting and not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def _patch_selector_events(module: Any) -> None:
    loop = module.BaseSelectorEventLoop
    loop._make_self_pipe = loop._close_self_pipe = loop._write_to_self = _nothing


def _patch_unix_events(module: Any) -> None:
    loop = module._UnixSelectorEventLoop
    loop.add_signal_handler = loop.remove_signal_handler = _no_signals


def _nothing(self: Any) -> None:
    pass


def _no_signals(self: Any, sig: Any, *args: Any) -> Any:
    raise NotImplementedError("a sandboxed twin receives no signals: its event loop cannot handle one")


#: module -> what is done to it once it ran
_PATCHES = {
    "asyncio.selector_events": _patch_selector_events,
    "asyncio.unix_events": _patch_unix_events,
}


class _Finder:
    """Finds the modules of ``_PATCHES`` as the other finders do, with a
    loader that patches each once it ran."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        patch = _PATCHES.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if finder is not self and find is not None else None
            if spec is not None:
                spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


class _PatchingLoader:
    def __init__(self, loader: Any, patch: Any) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name: str) -> Any:  # (get_source for tracebacks, and the rest)
        return getattr(self._loader, name)
