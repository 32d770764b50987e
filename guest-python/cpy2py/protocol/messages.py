"""Message kinds and request operations (docs/protocol.md, "Messages")."""

from __future__ import annotations

PROTOCOL_VERSION = 1

# message kinds: the first element of every message array
REQUEST = 0  # [0, id, chain, op, operands...]
REPLY = 1  # [1, id, value]
RAISE = 2  # [2, id, exception]
RELEASE = 3  # [3, [instance id, ...]]
SHUTDOWN = 4  # [4, id]

# request operations
OP_EXECUTE = 0  # callable, args, kwargs

OP_NAMES = {OP_EXECUTE: "execute"}
