"""Frames over a pair of file descriptors, in pure Python.

Twins use this for their end of the protocol pipes; the master uses the
compiled ``cpy2py._host.ProcessTwin`` with the same three methods.
"""

from __future__ import annotations

import _thread
import os
import select
import struct

from ..errors import ProtocolError

_HEADER = struct.Struct(">I")
_READ_SIZE = 65536
DEFAULT_MAX_FRAME = 1 << 30


class FdTransport:
    """Length-prefixed frames: ``send(payload)``, ``recv() -> bytes | None``, ``wait_readable()``."""

    def __init__(self, read_fd: int, write_fd: int, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.max_frame = max_frame
        self._write_lock = _thread.allocate_lock()
        self._read_lock = _thread.allocate_lock()
        self._buffer = bytearray()  # read beyond the last frame

    def send(self, payload: bytes) -> None:
        header = _HEADER.pack(len(payload))
        with self._write_lock:
            if len(payload) < 65536:
                self._write_all(header + payload)
            else:  # no copy of large payloads
                self._write_all(header)
                self._write_all(payload)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.write_fd, view)
            view = view[written:]

    def recv(self) -> bytes | bytearray | None:
        """One frame's payload; None when the stream ended between frames.

        Small frames usually arrive whole with their header in one read;
        bytes read beyond the frame are kept for the next call.
        """
        with self._read_lock:
            buffer = self._buffer
            while len(buffer) < 4:
                chunk = os.read(self.read_fd, _READ_SIZE)
                if not chunk:
                    if buffer:
                        raise ProtocolError("the stream ended inside a frame header")
                    return None
                buffer += chunk
            (length,) = _HEADER.unpack_from(buffer)
            if length == 0 or length > self.max_frame:
                raise ProtocolError(
                    f"received a frame of {length} bytes; frames must hold 1 to {self.max_frame} bytes"
                )
            end = 4 + length
            if len(buffer) >= end:
                self._buffer = buffer[end:]
                return bytes(buffer[4:end])
            # a large frame: read the rest straight into its own buffer
            frame = bytearray(length)
            have = len(buffer) - 4
            frame[:have] = buffer[4:]
            self._buffer = bytearray()
            while have < length:
                # os.readv would avoid a copy, but PyPy 3.9 lacks it
                chunk = os.read(self.read_fd, min(length - have, 1 << 22))
                if not chunk:
                    raise ProtocolError("the stream ended inside a frame")
                frame[have : have + len(chunk)] = chunk
                have += len(chunk)
            return frame

    def wait_readable(self, timeout: float | None = None) -> bool:
        """Whether a frame (or the end of the stream) can be read within ``timeout`` seconds."""
        if self._buffer:
            return True
        readable, _, _ = select.select([self.read_fd], [], [], timeout)
        return bool(readable)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
