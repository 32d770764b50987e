#!/usr/bin/env python3
"""A stand-in twin that speaks the protocol badly, on purpose.

Used as the executable of a TwinMaster (it ignores its arguments). It does
the handshake correctly (hello, reads the welcome, answers ready), waits for
the master's first request, and then misbehaves as its mode says: the
environment variable CPY2PY_HOSTILE_MODE, or else the part of its twin id
after "hostile-" (so ``TwinMaster(path, twinterpreter_id="hostile-garbage")``
picks "garbage"). It reads fd 3 and writes fd 4, like a real twin, and then
waits until the master hangs up or kills it.

It runs standalone: the cpy2py package (for its pure-Python codec) is found
relative to this file.
"""

import os
import random
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "guest-python"))

from cpy2py.protocol import codec_py  # noqa: E402

READ_FD, WRITE_FD = 3, 4


def write(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(WRITE_FD, view) :]


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def send(value) -> None:
    write(frame(codec_py.dumps(value)))


def read_exact(n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(READ_FD, n - len(data))
        if not chunk:
            sys.exit(0)  # the master hung up
        data += chunk
    return data


def recv():
    (length,) = struct.unpack(">I", read_exact(4))
    # references (tags 40010-40013) are kept as (tag, value): this peer looks nothing up
    return codec_py.loads(read_exact(length), lambda tag, value: (tag, value))


def hello() -> dict:
    return {
        "cpy2py": 1,
        "twin_id": os.environ.get("__CPY2PY_TWIN_ID__", "hostile"),
        "implementation": "hostile",
        "version": "3.11.0",
        "executable": sys.executable,
        "pid": os.getpid(),
    }


def tagged(tag: int, content: bytes) -> bytes:
    """A CBOR tag head (tag >= 256 and < 65536) followed by encoded content."""
    return b"\xd9" + struct.pack(">H", tag) + content


def reply_frame(req_id: int, value_cbor: bytes) -> bytes:
    """[1, req_id, <value>] with a hand-made value."""
    return frame(b"\x83\x01" + codec_py.dumps(req_id) + value_cbor)


def hang() -> None:
    """Keep the pipes open and read nothing more; the master must not wait on us."""
    while True:
        time.sleep(60)


def drain() -> None:
    """Read (and ignore) whatever the master sends, until it hangs up."""
    while os.read(READ_FD, 65536):
        pass
    sys.exit(0)


def misbehave(mode: str, req_id: int) -> None:
    text = codec_py.dumps
    if mode == "truncated-frame":  # a frame header for 100 bytes, 10 of them, then the end
        write(struct.pack(">I", 100) + b"\x83\x01" + bytes(8))
        os.close(WRITE_FD)
        drain()
    elif mode == "truncated-large-bytes":  # a 1 MiB reply cut inside its byte string, then the end
        content = 1 << 20
        head = b"\x83\x01" + text(req_id) + b"\x5a" + struct.pack(">I", content)
        write(struct.pack(">I", len(head) + content) + head + bytes(200_000))
        os.close(WRITE_FD)
        drain()
    elif mode == "truncated-cbor":  # a complete frame holding an incomplete item
        write(frame(b"\x83\x01" + text(req_id)))  # an array of 3 with 2 items
    elif mode == "huge-prefix":  # the largest 4-byte length prefix, then silence
        write(b"\xff\xff\xff\xff")
        hang()
    elif mode == "limit-prefix":  # a prefix just at the master's limit (1 GiB), a little data, the end
        write(struct.pack(">I", 1 << 30) + b"\x83\x01\x01")
        os.close(WRITE_FD)
        drain()
    elif mode == "empty-frame":
        write(struct.pack(">I", 0))
        hang()
    elif mode == "unknown-tag":
        write(reply_frame(req_id, tagged(55555, b"\x00")))
    elif mode == "unknown-kind":
        send([9, req_id, None])
    elif mode == "not-a-message":
        send({"reply": req_id})
    elif mode == "empty-message":
        send([])
    elif mode == "string-id":  # wrong types in known fields
        send([1, str(req_id), None])
    elif mode == "short-reply":
        send([1, req_id])
    elif mode == "float-kind":
        send([1.0, req_id, None])
    elif mode == "string-chain":  # a request whose chain is not an int
        send([0, 1, "chain", 0, None, [], {}])
    elif mode == "bad-tuple":  # tag 40001 over an int
        write(reply_frame(req_id, tagged(40001, b"\x05")))
    elif mode == "bad-name-ref":  # tag 40011 over an int
        write(reply_frame(req_id, tagged(40011, b"\x05")))
    elif mode == "bad-twin-ref":  # tag 40012 with the owner and id swapped
        write(reply_frame(req_id, tagged(40012, b"\x83\x07\x61x\xf6")))
    elif mode == "bad-exception":  # a raise whose exception has no fields
        write(frame(b"\x83\x02" + text(req_id) + tagged(40010, b"\x80")))
    elif mode == "bad-release":
        send([3, "everything"])
    elif mode == "deep-nesting":  # 100,000 nested arrays
        write(reply_frame(req_id, b"\x81" * 100_000 + b"\x00"))
    elif mode == "never-sent":  # a reply to a request the master never sent
        send([1, req_id + 1000, "surprise"])
    elif mode == "duplicate-reply":  # the right reply, twice
        send([1, req_id, "first"])
        send([1, req_id, "again"])
    elif mode == "second-hello":
        send(hello())
    elif mode == "garbage-frame":  # a well-formed frame of random bytes
        write(frame(bytes([0x1C]) + random.Random(6).randbytes(4096)))
    elif mode == "garbage-stream":  # random bytes where a frame header belongs, then the end
        rng = random.Random(66)
        write(b"\x7f" + rng.randbytes(1 << 16))
        os.close(WRITE_FD)
        drain()
    else:
        sys.stderr.write(f"hostile_twin: unknown mode {mode!r}\n")
        sys.exit(2)
    drain()


def main() -> None:
    twin_id = os.environ.get("__CPY2PY_TWIN_ID__", "")
    mode = os.environ.get("CPY2PY_HOSTILE_MODE") or twin_id.split("hostile-", 1)[-1]
    send(hello())
    recv()  # the welcome
    send({"ready": True})
    message = recv()  # the master's first request: [0, id, chain, op, ...]
    misbehave(mode, message[1])


if __name__ == "__main__":
    main()
