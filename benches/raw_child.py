"""The floor: the far end of a raw os.pipe ping-pong, run by the interpreter
under test (``raw_child.py READ_FD WRITE_FD``).

Messages are 8 bytes. PING is echoed at once (the hot path); STAMP answers
this process's CLOCK_MONOTONIC; a header b"B" or b"K" + 7-byte length is
followed by a payload: raw bytes echoed as they are, or a pickle that is
loaded and dumped again (what any transport of objects must do at least).
"""

import os
import sys
import time

PING = b"ping0000"
STAMP = b"stamp000"
AFFINITY = b"affinity"


def read_exact(reader, size):
    buf = bytearray(size)
    view = memoryview(buf)
    have = 0
    while have < size:
        n = reader.readinto(view[have:])
        if not n:
            raise EOFError("the master closed the pipe inside a payload")
        have += n
    return buf


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main():
    rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
    reader = os.fdopen(rfd, "rb", buffering=0)
    read, write = os.read, os.write
    write(wfd, b"ready000")
    while True:
        msg = read(rfd, 8)
        if msg == PING:
            write(wfd, msg)
            continue
        if not msg:
            return
        if len(msg) < 8:
            msg += read_exact(reader, 8 - len(msg))
        if msg == STAMP:
            write(wfd, time.clock_gettime_ns(time.CLOCK_MONOTONIC).to_bytes(8, "little"))
        elif msg == AFFINITY:
            from bench_funcs import affinity

            cpus = affinity()
            write(wfd, sum(1 << c for c in cpus).to_bytes(8, "little"))
        else:
            kind, size = msg[:1], int.from_bytes(msg[1:], "little")
            data = read_exact(reader, size)
            if kind == b"K":
                import pickle  # only here: the floor's start stays a bare start

                data = pickle.dumps(pickle.loads(data), protocol=5)
            write_all(wfd, kind + len(data).to_bytes(7, "little"))
            write_all(wfd, data)


if __name__ == "__main__":
    main()
