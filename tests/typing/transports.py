"""Every transport of the kernel has all of ``Transport`` (checked by mypy:
tests/test_typing.py)."""

from __future__ import annotations

from typing import List

from cpy2py._host import NativeTwin
from cpy2py.kernel.guest_main import HostTransport
from cpy2py.protocol.transport import FdTransport, Transport
from cpy2py.ray import RayTwin
from cpy2py.wasi import GuestTransport


def every_transport(
    fd: FdTransport, native: NativeTwin, ray: RayTwin, guest: GuestTransport, host: HostTransport
) -> List[Transport]:
    return [fd, native, ray, guest, host]
