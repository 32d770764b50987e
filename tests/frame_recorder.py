"""Recording the frames of real sessions, for checking them against the spec.

``recording(monkeypatch)`` wraps the transport of every twin the master
starts meanwhile (native: ``TwinMaster._start_process``; sandboxed:
``cpy2py.wasi.start_guest``) in a ``RecordingTransport``, which keeps a copy
of every frame the master sends and receives on that link. The master is an
end of every link, so this sees every frame of a session. Nothing of it is
on the call path outside these tests: the kernel calls the wrapper's
methods only on links that a test started while recording.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Tuple

#: (sender, payload): sender is "master" or "twin"
Frame = Tuple[str, bytes]


class RecordingTransport:
    """The master's end of one link (a ``ProcessTwin`` or a ``GuestLink``),
    recording each frame as it passes; everything else goes to the wrapped
    transport."""

    def __init__(self, inner: Any, sandboxed: bool) -> None:
        self.inner = inner
        self.sandboxed = sandboxed
        self.frames: List[Frame] = []  # list.append is atomic: many threads record at once
        #: repr of each large frame received as a ``cpy2py._host.Frame``
        self.large: List[str] = []

    def send(self, payload: Any) -> None:
        # (a large frame may come as a tuple of its parts: dumps(..., parts=True))
        self.frames.append(("master", b"".join(payload) if type(payload) is tuple else bytes(payload)))
        self.inner.send(payload)

    def recv(self, soon: bool = False) -> Any:
        raw = self.inner.recv(soon)
        if isinstance(raw, (bytes, bytearray)):
            self.frames.append(("twin", bytes(raw)))
        elif raw is not None and raw is not False:  # a Frame, read in place
            self.large.append(repr(raw))
            self.frames.append(("twin", bytes(raw)))
        return raw

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name == "try_send":  # how the master sends a native twin its shutdown

            def try_send(payload: Any, timeout: float) -> bool:
                sent = attr(payload, timeout)
                if sent:
                    self.frames.append(("master", bytes(payload)))
                return sent

            return try_send
        if name == "send_now":  # how the master sends small requests while it reads

            def send_now(payload: Any) -> bool:
                sent = attr(payload)
                if sent:
                    self.frames.append(("master", bytes(payload)))
                return sent

            return send_now
        if name == "queue":  # how the master gives a guest a frame without running it

            def queue(payload: Any) -> None:
                attr(payload)
                self.frames.append(("master", bytes(payload)))

            return queue
        return attr


@contextlib.contextmanager
def recording(monkeypatch: Any) -> Iterator[Dict[str, RecordingTransport]]:
    """Within the block, every twin started is recorded: twin id -> its recorder."""
    from cpy2py import master, wasi

    recorders: Dict[str, RecordingTransport] = {}
    start_process = master.TwinMaster._start_process
    start_guest = wasi.start_guest

    def recorded_process(self: Any) -> RecordingTransport:
        recorders[self.twinterpreter_id] = RecordingTransport(start_process(self), sandboxed=False)
        return recorders[self.twinterpreter_id]

    def recorded_guest(twin_master: Any, *prepared: Any) -> RecordingTransport:
        recorder = RecordingTransport(start_guest(twin_master, *prepared), sandboxed=True)
        recorders[twin_master.twinterpreter_id] = recorder
        return recorder

    with monkeypatch.context() as patch:
        patch.setattr(master.TwinMaster, "_start_process", recorded_process)
        patch.setattr(wasi, "start_guest", recorded_guest)
        yield recorders


def checked_kinds(recorder: RecordingTransport) -> List[Tuple[str, str]]:
    """Every frame of ``recorder``'s link checked against the Rust model of the
    protocol (``cpy2py._host.check_frame``), in order: (sender, kind). The
    hello was read by the host, which checked its version and kept the rest
    (``handshake::parse_hello``); it is checked as the codec encodes those
    fields and the version. Raises ProtocolError, naming the frame, at
    the first that does not match the spec."""
    from cpy2py import _host
    from cpy2py.errors import ProtocolError
    from cpy2py.protocol import codec
    from cpy2py.protocol.messages import PROTOCOL_VERSION

    link = "sandboxed" if recorder.sandboxed else "trusted"
    hello = codec.dumps({"cpy2py": PROTOCOL_VERSION, **recorder.inner.hello})
    kinds = [("twin", _host.check_frame(hello, "hello", "twin", link))]
    first = {"master": "welcome", "twin": "answer"}  # each side's first frame after the hello
    for index, (sender, payload) in enumerate(recorder.frames):
        stage = first.pop(sender, "message")
        try:
            kinds.append((sender, _host.check_frame(payload, stage, sender, link)))
        except ProtocolError as err:
            raise ProtocolError(
                f"frame {index} ({stage}, sent by the {sender}, {len(payload)} bytes: "
                f"{payload[:200].hex()}) does not match the spec: {err}"
            ) from None
    return kinds
