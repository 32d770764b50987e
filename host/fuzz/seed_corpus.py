#!/usr/bin/env python3
"""Seed the cargo-fuzz corpora (host/fuzz/corpus/<target>/) from the shared
vectors in tests/vectors/: raw CBOR for value_decode and hello, frames of it
for frames. Existing corpus files are kept; run by `just fuzz`."""

import hashlib
import json
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VECTORS = HERE.parent.parent / "tests" / "vectors"


def write(target: str, data: bytes) -> None:
    folder = HERE / "corpus" / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def main() -> None:
    seeds = []
    for name in ("values.json", "invalid.json"):
        for vector in json.loads((VECTORS / name).read_text(encoding="utf-8")):
            seeds.append(bytes.fromhex(vector["cbor"]))
    for i, cbor in enumerate(seeds):
        write("value_decode", cbor)
        write("hello", cbor)
        write("message", cbor)
        write("frames", frame(cbor) + frame(seeds[(i + 1) % len(seeds)]))
    # a real hello: {"cpy2py": 1, "twin_id": ..., ...}
    sys.path.insert(0, str(HERE.parent.parent / "guest-python"))
    from cpy2py.protocol import codec_py

    hello = {
        "cpy2py": 1,
        "twin_id": "t",
        "implementation": "cpython",
        "version": "3.11.7",
        "executable": "/x",
        "pid": 1,
    }
    write("hello", codec_py.dumps(hello))
    # messages of each kind (docs/protocol.md, "Messages")
    for message in (
        [0, 1, 1 << 40, 0, [40011, ["m", "f"]], [1], {"k": 2}],
        [0, 2, 1 << 40, 5, [40012, ["t", 3, ["m.C", ["__len__"]]]], "run", [], {}],
        [1, 1, None],
        [3, [["t", 3, 1]]],
        [4, 0],
        {"ready": True},
    ):
        write("message", codec_py.dumps(message))
    print(f"seeded the corpora with {len(seeds)} vectors")


if __name__ == "__main__":
    main()
