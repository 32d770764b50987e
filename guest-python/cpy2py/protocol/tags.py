"""CBOR tag numbers of the value model (docs/protocol.md, "Values").

Mirrors ``host/src/protocol/tags.rs``; both codecs and the kernel import them
from here.
"""

from __future__ import annotations

POS_BIGNUM = 2
#: the value that follows may be referred to later in the same frame (the
#: registered CBOR tags for value sharing), numbered in the order met from 0
SHAREABLE = 28
#: a reference to the shareable value whose number the unsigned int content is
SHARED_REF = 29
NEG_BIGNUM = 3
SET = 258
TUPLE = 40001
FROZENSET = 40002
COMPLEX = 40003
BYTEARRAY = 40004
EXCEPTION = 40010
GLOBAL_REF = 40011
TWIN_REF = 40012
PICKLE = 40013
PLAIN = 40014
#: a str with lone surrogates: its UTF-8 with the surrogates passed through
SURROGATE_STR = 40015
#: a date, time, Decimal or UUID as ``[type name, fields...]``, between a
#: master and its sandboxed guests (kernel/std_values.py)
STD_VALUE = 40016

#: Values nested deeper than this are refused by both codecs, so neither a
#: hostile peer nor a runaway structure can exhaust the stack. Every CBOR
#: array, map and tag is one level: ``[[1]]`` is 2 deep, a tuple (a tag
#: around an array) counts 2 levels, a bignum (a tag around bytes) 1.
MAX_DEPTH = 256

#: How ``dumps(..., sharing=)`` writes a container a value holds twice:
#: each time, as a tree (what a sandboxed guest sends);
SHARING_TREE = 0
#: raising ``errors.SharedParts`` at the second time (the kernel then encodes
#: again with SHARING_REFS);
SHARING_DETECT = 1
#: under tag 28 the first time and as a tag 29 reference after (every
#: container, or str or bytes of 64 or more, that may be shared).
SHARING_REFS = 2
