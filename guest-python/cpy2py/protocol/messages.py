"""Message kinds and request operations (docs/protocol.md, "Messages")."""

from __future__ import annotations

PROTOCOL_VERSION = 1

# message kinds: the first element of every message array
REQUEST = 0  # [0, id, chain, op, operands...]
REPLY = 1  # [1, id, value]
RAISE = 2  # [2, id, exception]
RELEASE = 3  # [3, [[owner, instance id, count], ...]]
SHUTDOWN = 4  # [4, id], master to twin only

# request operations
OP_EXECUTE = 0  # callable, args, kwargs -> callable(*args, **kwargs)
OP_INSTANTIATE = 1  # class, args, kwargs -> a new instance, native to the receiver
OP_GETATTR = 2  # object, name -> getattr(object, name)
OP_SETATTR = 3  # object, name, value -> setattr(object, name, value)
OP_DELATTR = 4  # object, name -> delattr(object, name)
OP_CALL_METHOD = 5  # object, name, args, kwargs -> getattr(object, name)(*args, **kwargs)

OP_NAMES = {
    OP_EXECUTE: "execute",
    OP_INSTANTIATE: "instantiate",
    OP_GETATTR: "getattr",
    OP_SETATTR: "setattr",
    OP_DELATTR: "delattr",
    OP_CALL_METHOD: "call_method",
}
