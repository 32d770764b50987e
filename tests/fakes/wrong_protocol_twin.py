#!/usr/bin/env python3
"""A stand-in twin that answers the handshake with protocol version 99.

Used as the executable of a TwinMaster; it ignores its arguments.
"""

import os
import struct

# a CBOR map {"cpy2py": 99, "twin_id": "fake"}
payload = b"\xa2" + b"\x66cpy2py" + b"\x18\x63" + b"\x67twin_id" + b"\x64fake"
os.write(4, struct.pack(">I", len(payload)) + payload)
os.read(3, 1)  # wait until the master hangs up
