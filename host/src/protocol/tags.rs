//! CBOR tag numbers of the value model (docs/protocol.md, "Values").

pub const POS_BIGNUM: u64 = 2;
/// The value that follows may be referred to later in the same frame
/// (the registered CBOR tags for value sharing), numbered in the order
/// they are met from 0.
pub const SHAREABLE: u64 = 28;
/// A reference to the shareable value whose number the content is.
pub const SHARED_REF: u64 = 29;
pub const NEG_BIGNUM: u64 = 3;
pub const SET: u64 = 258;
pub const TUPLE: u64 = 40001;
pub const FROZENSET: u64 = 40002;
pub const COMPLEX: u64 = 40003;
pub const BYTEARRAY: u64 = 40004;
pub const EXCEPTION: u64 = 40010;
pub const GLOBAL_REF: u64 = 40011;
pub const TWIN_REF: u64 = 40012;
pub const PICKLE: u64 = 40013;
pub const PLAIN: u64 = 40014;
/// A str with lone surrogates: its UTF-8 bytes with the surrogates passed
/// through (Python's "surrogatepass"), which CBOR text cannot hold.
pub const SURROGATE_STR: u64 = 40015;
/// A date, time, Decimal or UUID as `[type name, fields...]`, between a
/// master and its sandboxed guests (guest-python/cpy2py/kernel/std_values.py).
pub const STD_VALUE: u64 = 40016;

/// Values nested deeper than this are refused by both codecs, so neither a
/// hostile peer nor a runaway structure can exhaust the stack.
pub const MAX_DEPTH: usize = 256;
