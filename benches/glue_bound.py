"""What a no-op call would cost with nothing but Python glue over cpy2py's
compiled codec: the bound a Python call path cannot beat (benches/README.md,
"What a no-op call could cost").

    .venv/bin/python benches/glue_bound.py [--calls 20000]   (pin it: taskset -c 1)

A master and a forked child move the request and reply frames of a no-op
call (a 4-byte big-endian length, then the CBOR message, as the protocol
does) over two blocking pipes, one thread each. The child decodes the
request, looks the function up by module and name, calls it, and encodes
the reply. No routing, reading role, gate, locks, references, signals or
deadlines: everything the kernel adds is left out. Prints microseconds per
call (the median of five rounds).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import struct
import time
from typing import Any, Callable, Dict, Tuple

from cpy2py import _host
from cpy2py.protocol.messages import OP_EXECUTE, REPLY, REQUEST

_LENGTH = struct.Struct(">I")  # a frame's length, as protocol/transport.py writes it


def _read_frame(fd: int) -> bytes:
    # (frames this small are written, and so read, in one piece)
    head = os.read(fd, 4)
    if len(head) < 4:
        raise EOFError
    return os.read(fd, _LENGTH.unpack(head)[0])


def _serve(requests: int, replies: int) -> None:
    """The child: answer requests until the master closes its pipe."""
    found: Dict[Tuple[str, str], Callable[..., Any]] = {}
    while True:
        try:
            frame = _read_frame(requests)
        except EOFError:
            return
        _, req_id, _chain, _op, where, args, kwargs = _host.loads(frame)
        func = found.get(where)
        if func is None:
            module, name = where
            func = found[where] = getattr(importlib.import_module(module), name)
        reply = _host.dumps([REPLY, req_id, func(*args, **kwargs)])
        os.write(replies, _LENGTH.pack(len(reply)) + reply)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per round")
    calls = parser.parse_args().calls
    to_child, requests = os.pipe()
    replies, from_child = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(requests)
        os.close(replies)
        _serve(to_child, from_child)
        os._exit(0)
    os.close(to_child)
    os.close(from_child)

    def call(req_id: int) -> Any:
        frame = _host.dumps([REQUEST, req_id, 7, OP_EXECUTE, ("os", "getpid"), [], {}])
        os.write(requests, _LENGTH.pack(len(frame)) + frame)
        return _host.loads(_read_frame(replies))[2]

    for req_id in range(2_000):  # warm up
        call(req_id)
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for req_id in range(calls):
            call(req_id)
        rounds.append((time.perf_counter() - started) / calls * 1e6)
    os.close(requests)
    os.waitpid(pid, 0)
    print(f"Python glue over the compiled codec: {statistics.median(rounds):.1f} us per no-op call")


if __name__ == "__main__":
    main()
