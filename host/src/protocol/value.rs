//! The value model of the protocol as Rust data, for checking frames in the
//! host (shared vectors now, the sandbox policy later). The Python objects
//! themselves are converted by the faster direct codec in `python::codec`,
//! which reads frames with the same [`Cursor`].
//!
//! Both decoders apply the rules of docs/protocol.md ("Values"): exactly one
//! item per frame, any float width, indefinite lengths, no simple values but
//! false, true and null, no tags outside the value model, map keys and set
//! items that Python can hash, and at most [`tags::MAX_DEPTH`] levels of
//! nesting, where every array, map and tag is one level.

use std::borrow::Cow;

use ciborium::value::{Integer, Value as Cbor};

use super::budget;
use super::surrogates::split_passing_surrogates;
use super::tags;
use crate::error::{HostError, Result};

/// A reference to a module-level name: `(module, qualname)`.
pub type GlobalName = (String, String);

/// The class field of a twin reference (docs/protocol.md, tag 40012): what
/// the receiver needs to build a proxy.
#[derive(Debug, Clone, PartialEq)]
pub enum ClassInfo {
    /// None: a reference sent back to its owner, which finds its own object
    /// by the key and needs no class.
    Omitted,
    /// A twin class, by name (tag 40011); trusted links.
    Named(GlobalName),
    /// `[qualified type name, [special methods]]`, and, from a master to a
    /// sandboxed guest, `[..., [methods]]`: exactly what the guest may call.
    Described {
        name: String,
        specials: Vec<String>,
        methods: Option<Vec<String>>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    /// Integers that fit CBOR's major types 0 and 1.
    Int(i128),
    /// Integers beyond 64 bits: tag 2 holds `n`, tag 3 holds `-1 - n`, as a
    /// minimal big-endian magnitude.
    BigInt {
        negative: bool,
        magnitude: Vec<u8>,
    },
    Float(f64),
    Str(String),
    /// A str with lone surrogates (tag 40015): its UTF-8 with the surrogates
    /// passed through, which a Rust `String` cannot hold.
    SurrogateStr(Vec<u8>),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Tuple(Vec<Value>),
    Set(Vec<Value>),
    FrozenSet(Vec<Value>),
    Complex(f64, f64),
    ByteArray(Vec<u8>),
    Global(GlobalName),
    Exception {
        kind: GlobalName,
        args: Vec<Value>,
        traceback: Option<String>,
        /// Its attributes by name (trusted links only; empty: none sent).
        state: Vec<(Value, Value)>,
    },
    TwinRef {
        owner: String,
        instance: u64,
        class: ClassInfo,
    },
    Pickle(Vec<u8>),
    /// A plain-data block (tag 40014), checked by protocol/plain.rs.
    Plain(Vec<u8>),
    /// A date, time, Decimal or UUID (tag 40016): its type's name, then its
    /// fields. Which names and fields make a value is the kernel's to check
    /// (guest-python/cpy2py/kernel/std_values.py), as for the other kernel tags.
    StdValue {
        name: String,
        fields: Vec<Value>,
    },
}

fn malformed(what: &str) -> HostError {
    HostError::Protocol(format!("malformed {what} in a frame"))
}

impl Value {
    /// Decodes exactly one CBOR item, refusing anything the value model does
    /// not allow (see the module documentation).
    pub fn decode(bytes: &[u8]) -> Result<Value> {
        let mut cursor = Cursor::new(bytes);
        let value = decode_item(&mut cursor, 0)?;
        cursor.finish()?;
        Ok(value)
    }

    /// Encodes to CBOR (preferred serialization, definite lengths).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        ciborium::into_writer(&self.to_cbor(), &mut out).map_err(|e| HostError::Codec(e.to_string()))?;
        Ok(out)
    }

    /// Converts an item parsed by ciborium. Unlike [`Value::decode`] this
    /// cannot see the wire: ciborium has already read `undefined` as null
    /// and folded small bignums.
    pub fn from_cbor(cbor: Cbor) -> Result<Value> {
        Ok(match cbor {
            Cbor::Null => Value::None,
            Cbor::Bool(b) => Value::Bool(b),
            Cbor::Integer(i) => int_value(i128::from(i)),
            Cbor::Float(f) => Value::Float(f),
            Cbor::Text(s) => Value::Str(s),
            Cbor::Bytes(b) => Value::Bytes(b),
            Cbor::Array(items) => Value::List(from_items(items)?),
            Cbor::Map(entries) => Value::Dict(
                entries
                    .into_iter()
                    .map(|(k, v)| Ok((Value::from_cbor(k)?, Value::from_cbor(v)?)))
                    .collect::<Result<_>>()?,
            ),
            Cbor::Tag(tag, inner) => Value::from_tagged(tag, Value::from_cbor(*inner)?)?,
            other => {
                return Err(HostError::Protocol(format!(
                    "unsupported CBOR item {other:?} in a frame"
                )))
            }
        })
    }

    pub fn to_cbor(&self) -> Cbor {
        let tagged = |tag: u64, inner: Cbor| Cbor::Tag(tag, Box::new(inner));
        let array = |items: &[Value]| Cbor::Array(items.iter().map(Value::to_cbor).collect());
        let global = |(module, qualname): &GlobalName| {
            tagged(
                tags::GLOBAL_REF,
                Cbor::Array(vec![Cbor::Text(module.clone()), Cbor::Text(qualname.clone())]),
            )
        };
        match self {
            Value::None => Cbor::Null,
            Value::Bool(b) => Cbor::Bool(*b),
            Value::Int(i) => match Integer::try_from(*i) {
                Ok(int) if fits_major_0_or_1(*i) => Cbor::Integer(int),
                _ => big_from_i128(*i).to_cbor(),
            },
            Value::BigInt { negative, magnitude } => {
                // preferred serialization: no leading zero bytes, and never a
                // bignum for a value that fits major type 0 or 1
                let first = magnitude.iter().position(|b| *b != 0).unwrap_or(magnitude.len());
                let magnitude = &magnitude[first..];
                if magnitude.len() <= 8 {
                    let mut n = [0u8; 8];
                    n[8 - magnitude.len()..].copy_from_slice(magnitude);
                    let n = i128::from(u64::from_be_bytes(n));
                    Value::Int(if *negative { -1 - n } else { n }).to_cbor()
                } else {
                    tagged(
                        if *negative {
                            tags::NEG_BIGNUM
                        } else {
                            tags::POS_BIGNUM
                        },
                        Cbor::Bytes(magnitude.to_vec()),
                    )
                }
            }
            Value::Float(f) => Cbor::Float(canonical_nan(*f)),
            Value::Str(s) => Cbor::Text(s.clone()),
            Value::Bytes(b) => Cbor::Bytes(b.clone()),
            Value::List(items) => array(items),
            Value::Dict(entries) => {
                Cbor::Map(entries.iter().map(|(k, v)| (k.to_cbor(), v.to_cbor())).collect())
            }
            Value::Tuple(items) => tagged(tags::TUPLE, array(items)),
            Value::Set(items) => tagged(tags::SET, array(items)),
            Value::FrozenSet(items) => tagged(tags::FROZENSET, array(items)),
            Value::Complex(re, im) => tagged(
                tags::COMPLEX,
                Cbor::Array(vec![
                    Cbor::Float(canonical_nan(*re)),
                    Cbor::Float(canonical_nan(*im)),
                ]),
            ),
            Value::ByteArray(b) => tagged(tags::BYTEARRAY, Cbor::Bytes(b.clone())),
            Value::SurrogateStr(b) => tagged(tags::SURROGATE_STR, Cbor::Bytes(b.clone())),
            Value::Global(name) => global(name),
            Value::Exception {
                kind,
                args,
                traceback,
                state,
            } => {
                let mut items = vec![
                    global(kind),
                    array(args),
                    traceback.clone().map_or(Cbor::Null, Cbor::Text),
                ];
                if !state.is_empty() {
                    items.push(Value::Dict(state.clone()).to_cbor());
                }
                tagged(tags::EXCEPTION, Cbor::Array(items))
            }
            Value::TwinRef {
                owner,
                instance,
                class,
            } => tagged(
                tags::TWIN_REF,
                Cbor::Array(vec![
                    Cbor::Text(owner.clone()),
                    Cbor::Integer((*instance).into()),
                    match class {
                        ClassInfo::Omitted => Cbor::Null,
                        ClassInfo::Named(name) => global(name),
                        ClassInfo::Described {
                            name,
                            specials,
                            methods,
                        } => {
                            let texts = |names: &[String]| {
                                Cbor::Array(names.iter().cloned().map(Cbor::Text).collect())
                            };
                            let mut fields = vec![Cbor::Text(name.clone()), texts(specials)];
                            fields.extend(methods.as_deref().map(texts));
                            Cbor::Array(fields)
                        }
                    },
                ]),
            ),
            Value::Pickle(b) => tagged(tags::PICKLE, Cbor::Bytes(b.clone())),
            Value::Plain(b) => tagged(tags::PLAIN, Cbor::Bytes(b.clone())),
            Value::StdValue { name, fields } => {
                let mut items = vec![Cbor::Text(name.clone())];
                items.extend(fields.iter().map(Value::to_cbor));
                tagged(tags::STD_VALUE, Cbor::Array(items))
            }
        }
    }

    /// Whether Python can hash the object this value stands for, as a map
    /// key or a set item. References are hashable as far as the codec knows.
    pub fn is_hashable(&self) -> bool {
        match self {
            Value::List(_) | Value::Dict(_) | Value::Set(_) | Value::ByteArray(_) => false,
            Value::Tuple(items) => items.iter().all(Value::is_hashable),
            _ => true,
        }
    }

    /// The value of a tagged item whose content decoded to `inner`.
    fn from_tagged(tag: u64, inner: Value) -> Result<Value> {
        let hashable_items = |items: Vec<Value>, what: &str| match items.iter().find(|v| !v.is_hashable()) {
            Some(bad) => Err(HostError::Protocol(format!(
                "unhashable {what} item {bad:?} in a frame"
            ))),
            None => Ok(items),
        };
        Ok(match (tag, inner) {
            (tags::POS_BIGNUM | tags::NEG_BIGNUM, Value::Bytes(magnitude)) => {
                big_value(tag == tags::NEG_BIGNUM, magnitude)
            }
            // ciborium (from_cbor) folds bignums that fit 128 bits into integers
            (tags::POS_BIGNUM | tags::NEG_BIGNUM, folded @ (Value::Int(_) | Value::BigInt { .. })) => folded,
            (tags::TUPLE, Value::List(items)) => Value::Tuple(items),
            (tags::SET, Value::List(items)) => Value::Set(hashable_items(items, "set")?),
            (tags::FROZENSET, Value::List(items)) => Value::FrozenSet(hashable_items(items, "frozenset")?),
            (tags::COMPLEX, Value::List(items)) => match items[..] {
                [Value::Float(re), Value::Float(im)] => Value::Complex(re, im),
                _ => return Err(malformed("complex number")),
            },
            (tags::BYTEARRAY, Value::Bytes(b)) => Value::ByteArray(b),
            (tags::SURROGATE_STR, Value::Bytes(b)) => {
                check_surrogate_utf8(&b)?;
                Value::SurrogateStr(b)
            }
            (tags::GLOBAL_REF, inner) => Value::Global(global_name(inner)?),
            (tags::EXCEPTION, Value::List(mut items)) => {
                // [type, args, traceback] and, from a trusted peer, its attributes
                let state = match items.len() {
                    4 => match items.pop() {
                        Some(Value::Dict(entries))
                            if !entries.is_empty()
                                && entries.iter().all(|(k, _)| matches!(k, Value::Str(_))) =>
                        {
                            entries
                        }
                        _ => return Err(malformed("exception")),
                    },
                    _ => Vec::new(),
                };
                let [kind, args, traceback]: [Value; 3] =
                    items.try_into().map_err(|_| malformed("exception"))?;
                Value::Exception {
                    state,
                    kind: match kind {
                        Value::Global(name) => name,
                        _ => return Err(malformed("exception")),
                    },
                    args: match args {
                        Value::List(args) => args,
                        _ => return Err(malformed("exception")),
                    },
                    traceback: match traceback {
                        Value::None => None,
                        Value::Str(s) => Some(s),
                        _ => return Err(malformed("exception")),
                    },
                }
            }
            (tags::TWIN_REF, Value::List(items)) => {
                let [owner, instance, class]: [Value; 3] =
                    items.try_into().map_err(|_| malformed("twin reference"))?;
                match (owner, instance) {
                    (Value::Str(owner), Value::Int(instance)) => Value::TwinRef {
                        owner,
                        instance: u64::try_from(instance).map_err(|_| malformed("twin reference"))?,
                        class: class_info(class)?,
                    },
                    _ => return Err(malformed("twin reference")),
                }
            }
            (tags::PICKLE, Value::Bytes(b)) => Value::Pickle(b),
            (tags::STD_VALUE, Value::List(mut items)) => match items.first() {
                Some(Value::Str(_)) => {
                    let fields = items.split_off(1);
                    let Some(Value::Str(name)) = items.pop() else {
                        unreachable!("checked above")
                    };
                    Value::StdValue { name, fields }
                }
                _ => return Err(malformed("standard-library value")),
            },
            (tags::PLAIN, Value::Bytes(b)) => {
                // its depth is checked by the decoders, which know where it sits
                budget::check_plain(&b, 1).map_err(|e| HostError::Protocol(e.to_string()))?;
                Value::Plain(b)
            }
            (
                tags::POS_BIGNUM
                | tags::NEG_BIGNUM
                | tags::TUPLE
                | tags::SET
                | tags::FROZENSET
                | tags::COMPLEX
                | tags::BYTEARRAY
                | tags::SURROGATE_STR
                | tags::EXCEPTION
                | tags::TWIN_REF
                | tags::PICKLE
                | tags::PLAIN
                | tags::STD_VALUE,
                _,
            ) => {
                return Err(HostError::Protocol(format!(
                    "malformed content of CBOR tag {tag} in a frame"
                )))
            }
            (tag, _) => return Err(HostError::Protocol(format!("unknown CBOR tag {tag}"))),
        })
    }
}

/// The content of tag 40015 is UTF-8 in which surrogate code points may
/// stand alone (surrogates.rs); anything else is malformed.
fn check_surrogate_utf8(bytes: &[u8]) -> Result<()> {
    if split_passing_surrogates(bytes, |_| {}) {
        Ok(())
    } else {
        Err(HostError::Protocol(
            "malformed content of CBOR tag 40015 (str with surrogates) in a frame".into(),
        ))
    }
}

/// Every NaN goes on the wire as the quiet NaN `f9 7e 00`.
fn canonical_nan(f: f64) -> f64 {
    if f.is_nan() {
        f64::NAN
    } else {
        f
    }
}

/// CBOR's major types 0 and 1 carry `0..=u64::MAX` and `-2^64..=-1`.
fn fits_major_0_or_1(i: i128) -> bool {
    (-(1i128 << 64)..=u64::MAX as i128).contains(&i)
}

/// Ints beyond the range of major types 0 and 1 are carried as bignums.
fn int_value(i: i128) -> Value {
    if fits_major_0_or_1(i) {
        Value::Int(i)
    } else {
        big_from_i128(i)
    }
}

fn big_from_i128(i: i128) -> Value {
    let (negative, n) = if i < 0 {
        (true, (-1 - i) as u128)
    } else {
        (false, i as u128)
    };
    let bytes = n.to_be_bytes();
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len() - 1);
    Value::BigInt {
        negative,
        magnitude: bytes[first..].to_vec(),
    }
}

/// The value of a bignum as decoded: leading zeros dropped, and a plain
/// `Int` when it fits major type 0 or 1 (as Python sees it: just an int).
fn big_value(negative: bool, mut magnitude: Vec<u8>) -> Value {
    let first = magnitude.iter().position(|b| *b != 0).unwrap_or(magnitude.len());
    magnitude.drain(..first);
    if magnitude.len() <= 8 {
        let mut n = [0u8; 8];
        n[8 - magnitude.len()..].copy_from_slice(&magnitude);
        let n = i128::from(u64::from_be_bytes(n));
        Value::Int(if negative { -1 - n } else { n })
    } else {
        Value::BigInt { negative, magnitude }
    }
}

fn from_items(items: Vec<Cbor>) -> Result<Vec<Value>> {
    items.into_iter().map(Value::from_cbor).collect()
}

fn global_name(inner: Value) -> Result<GlobalName> {
    match inner {
        Value::List(items) => match <[Value; 2]>::try_from(items) {
            Ok([Value::Str(module), Value::Str(qualname)]) => Ok((module, qualname)),
            _ => Err(malformed("name reference")),
        },
        _ => Err(malformed("name reference")),
    }
}

/// The class field of a twin reference: a name reference, or a description
/// of two or three fields (a type name, special methods, methods).
fn class_info(class: Value) -> Result<ClassInfo> {
    let names = |value: Value| match value {
        Value::List(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Str(name) => Ok(name),
                _ => Err(malformed("class of a twin reference")),
            })
            .collect::<Result<Vec<_>>>(),
        _ => Err(malformed("class of a twin reference")),
    };
    match class {
        Value::None => Ok(ClassInfo::Omitted),
        Value::Global(name) => Ok(ClassInfo::Named(name)),
        Value::List(fields) if matches!(fields.len(), 2 | 3) => {
            let mut fields = fields.into_iter();
            let name = match fields.next() {
                Some(Value::Str(name)) => name,
                _ => return Err(malformed("class of a twin reference")),
            };
            let specials = names(fields.next().expect("two fields or more"))?;
            let methods = fields.next().map(names).transpose()?;
            Ok(ClassInfo::Described {
                name,
                specials,
                methods,
            })
        }
        _ => Err(malformed("class of a twin reference")),
    }
}

/// Decodes the item at the cursor; `depth` containers enclose it.
fn decode_item(cursor: &mut Cursor<'_>, depth: usize) -> Result<Value> {
    if let Some(n) = cursor.small_uint() {
        return Ok(Value::Int(i128::from(n)));
    }
    if let Some(x) = cursor.double() {
        return Ok(Value::Float(x));
    }
    if cursor.null() {
        return Ok(Value::None);
    }
    let at = cursor.offset();
    Ok(match cursor.head()? {
        Head::Uint(n) => Value::Int(i128::from(n)),
        Head::Nint(n) => Value::Int(-1 - i128::from(n)),
        Head::Bytes(len) => Value::Bytes(cursor.bytes(len)?.into_owned()),
        Head::Text(len) => Value::Str(cursor.text(len)?.into_owned()),
        Head::Array(len) => Value::List(decode_items(cursor, len, enter(depth, at)?)?),
        Head::Map(len) => {
            let depth = enter(depth, at)?;
            let mut entries = Vec::new();
            let mut remaining = match len {
                Some(n) => Some(cursor.check_count(n, 2, "a map")?),
                None => None,
            };
            loop {
                match remaining.as_mut() {
                    Some(0) => break,
                    Some(n) => *n -= 1,
                    None if cursor.take_break("an indefinite-length map")? => break,
                    None => {}
                }
                let key = decode_item(cursor, depth)?;
                if !key.is_hashable() {
                    return Err(HostError::Protocol(format!(
                        "unhashable map key {key:?} in a frame"
                    )));
                }
                entries.push((key, decode_item(cursor, depth)?));
            }
            Value::Dict(entries)
        }
        Head::Tag(tag) => {
            let depth = enter(depth, at)?;
            match tag {
                tags::TUPLE | tags::SET | tags::FROZENSET | tags::COMPLEX | tags::STD_VALUE => {
                    cursor.expect_content(4, tag)?
                }
                tags::POS_BIGNUM | tags::NEG_BIGNUM | tags::BYTEARRAY | tags::SURROGATE_STR => {
                    cursor.expect_content(2, tag)?
                }
                tags::PLAIN => cursor.expect_block()?,
                tags::EXCEPTION | tags::GLOBAL_REF | tags::TWIN_REF | tags::PICKLE => {}
                _ => return Err(HostError::Protocol(format!("unknown CBOR tag {tag}"))),
            }
            Value::from_tagged(tag, decode_item(cursor, depth)?)?
        }
        Head::Float(f) => Value::Float(f),
        Head::Bool(b) => Value::Bool(b),
        Head::Null => Value::None,
        Head::Break => return Err(unexpected_break(at)),
    })
}

fn decode_items(cursor: &mut Cursor<'_>, len: Option<u64>, depth: usize) -> Result<Vec<Value>> {
    match len {
        Some(n) => {
            let n = cursor.check_count(n, 1, "an array")?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(decode_item(cursor, depth)?);
            }
            Ok(items)
        }
        None => {
            let mut items = Vec::new();
            while !cursor.take_break("an indefinite-length array")? {
                items.push(decode_item(cursor, depth)?);
            }
            Ok(items)
        }
    }
}

// ---------------------------------------------------------------------------
// Reading the wire
// ---------------------------------------------------------------------------

/// One CBOR head (RFC 8949, section 3) as the decoders of the value model
/// see it: simple values other than false, true and null are already
/// refused, floats of every width are widened to `f64`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Head {
    Uint(u64),
    /// A negative integer: the value is `-1 - n`.
    Nint(u64),
    /// A byte string of this many bytes; `None` for an indefinite length.
    Bytes(Option<u64>),
    Text(Option<u64>),
    Array(Option<u64>),
    Map(Option<u64>),
    Tag(u64),
    Float(f64),
    Bool(bool),
    Null,
    Break,
}

const MAJOR_NAMES: [&str; 8] = [
    "unsigned integer",
    "negative integer",
    "byte string",
    "text string",
    "array",
    "map",
    "tag",
    "simple value",
];

fn truncated(offset: usize, inside: &str) -> HostError {
    HostError::Protocol(format!(
        "truncated CBOR: input ends at offset {offset} inside {inside}"
    ))
}

pub(crate) fn unexpected_break(offset: usize) -> HostError {
    HostError::Protocol(format!(
        "unexpected break (0xff) outside an indefinite-length item at offset {offset}"
    ))
}

/// Enters a container (array, map or tag) that starts at `offset` and is
/// enclosed by `depth` others; returns the depth of its content.
pub(crate) fn enter(depth: usize, offset: usize) -> Result<usize> {
    if depth >= tags::MAX_DEPTH {
        return Err(HostError::Protocol(format!(
            "CBOR nested deeper than {} levels (MAX_DEPTH) at offset {offset}",
            tags::MAX_DEPTH
        )));
    }
    Ok(depth + 1)
}

/// The value of an IEEE 754 half-precision float.
pub(crate) fn f16_to_f64(bits: u16) -> f64 {
    let exponent = i32::from((bits >> 10) & 0x1f);
    let mantissa = f64::from(bits & 0x3ff);
    let magnitude = match exponent {
        0 => mantissa * (2f64).powi(-24),
        31 if mantissa == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        _ => (mantissa + 1024.0) * (2f64).powi(exponent - 25),
    };
    if bits & 0x8000 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// A cursor over one frame's CBOR bytes. Strings are borrowed from the input
/// where they are contiguous; no length is trusted before it is checked
/// against what is left of the input.
pub(crate) struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Cursor { data, pos: 0 }
    }

    /// Offset of the next byte.
    pub(crate) fn offset(&self) -> usize {
        self.pos
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// The initial byte of the next item, not consumed.
    pub(crate) fn peek(&self, inside: &str) -> Result<u8> {
        self.peek_inside(|| inside.to_owned())
    }

    /// `peek` whose error names what it is `inside` by a text made only
    /// for the error: for what is looked at on every item (a tag's content).
    pub(crate) fn peek_inside(&self, inside: impl FnOnce() -> String) -> Result<u8> {
        self.data
            .get(self.pos)
            .copied()
            .ok_or_else(|| truncated(self.pos, &inside()))
    }

    /// Consumes a break if one comes next; for indefinite-length items.
    pub(crate) fn take_break(&mut self, inside: &str) -> Result<bool> {
        if self.peek(inside)? == 0xff {
            self.pos += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Fails unless the next item (the content of `tag`) has major type `major`.
    pub(crate) fn expect_content(&self, major: u8, tag: u64) -> Result<()> {
        let found = self.peek_inside(|| format!("tag {tag}"))? >> 5;
        if found != major {
            return Err(HostError::Protocol(format!(
                "tag {tag} must hold a {}, not a {} (offset {})",
                MAJOR_NAMES[usize::from(major)],
                MAJOR_NAMES[usize::from(found)],
                self.pos
            )));
        }
        Ok(())
    }

    /// Checks that a plain-data block (tag 40014) follows: a byte string of
    /// stated length. Chunks are refused by every reader alike (the budget's
    /// estimate reads a block in one piece: a chunked one would be estimated
    /// as malformed, then decoded without a budget).
    pub(crate) fn expect_block(&self) -> Result<()> {
        self.expect_content(2, tags::PLAIN)?;
        if self.peek("tag 40014")? == 0x5f {
            return Err(HostError::Protocol(format!(
                "tag {} must hold a byte string of stated length, not chunks",
                tags::PLAIN
            )));
        }
        Ok(())
    }

    /// Checks a declared count of items against the input left, assuming
    /// every item takes at least `min_bytes` bytes.
    pub(crate) fn check_count(&self, n: u64, min_bytes: u64, what: &str) -> Result<usize> {
        let left = self.remaining();
        match usize::try_from(n) {
            Ok(count) if n.saturating_mul(min_bytes) <= left as u64 => Ok(count),
            _ => Err(HostError::Protocol(format!(
                "{what} declares {n} {} but only {left} bytes remain",
                if what == "a map" { "entries" } else { "items" }
            ))),
        }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let left = self.remaining();
        match usize::try_from(n) {
            Ok(n) if n <= left => {
                let start = self.pos;
                self.pos += n;
                Ok(&self.data[start..self.pos])
            }
            _ => Err(HostError::Protocol(format!(
                "{what} declares {n} bytes but only {left} remain"
            ))),
        }
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N]> {
        match self.data.get(self.pos..self.pos + N) {
            Some(bytes) => {
                self.pos += N;
                let mut out = [0u8; N];
                out.copy_from_slice(bytes);
                Ok(out)
            }
            None => Err(truncated(self.data.len(), "a head")),
        }
    }

    /// Consumes the next item if it is an unsigned integer below 2**32
    /// and returns it; None (nothing consumed) for anything else. The
    /// most common item of large arrays, read here without building a
    /// `Head` (which is returned through memory).
    #[inline]
    pub(crate) fn small_uint(&mut self) -> Option<u64> {
        let data = &self.data[self.pos..];
        let (n, size) = match *data.first()? {
            initial @ 0x00..=0x17 => (u64::from(initial), 1),
            0x18 => (u64::from(*data.get(1)?), 2),
            0x19 => (u64::from(u16::from_be_bytes(data.get(1..3)?.try_into().ok()?)), 3),
            0x1a => (u64::from(u32::from_be_bytes(data.get(1..5)?.try_into().ok()?)), 5),
            _ => return None,
        };
        self.pos += size;
        Some(n)
    }

    /// Consumes the next item if it is a double-precision float (all of
    /// a double: most floats that are not round numbers) and returns it;
    /// None (nothing consumed) for anything else, a truncated one too.
    #[inline]
    pub(crate) fn double(&mut self) -> Option<f64> {
        let data = self.data.get(self.pos..self.pos + 9)?;
        if data[0] != 0xfb {
            return None;
        }
        self.pos += 9;
        Some(f64::from_be_bytes(data[1..].try_into().ok()?))
    }

    /// Consumes the next item if it is null (whether it was).
    #[inline]
    pub(crate) fn null(&mut self) -> bool {
        let found = self.data.get(self.pos) == Some(&0xf6);
        self.pos += usize::from(found);
        found
    }

    /// Reads one head.
    pub(crate) fn head(&mut self) -> Result<Head> {
        let at = self.pos;
        let initial = self.peek("a data item")?;
        self.pos += 1;
        let major = initial >> 5;
        let info = initial & 0x1f;
        let argument = match info {
            0..=23 => Some(u64::from(info)),
            24 => Some(u64::from(self.fixed::<1>()?[0])),
            25 => Some(u64::from(u16::from_be_bytes(self.fixed()?))),
            26 => Some(u64::from(u32::from_be_bytes(self.fixed()?))),
            27 => Some(u64::from_be_bytes(self.fixed()?)),
            31 => None,
            _ => {
                return Err(HostError::Protocol(format!(
                    "reserved additional information {info} in the head at offset {at}"
                )))
            }
        };
        Ok(match (major, argument) {
            (0, Some(n)) => Head::Uint(n),
            (1, Some(n)) => Head::Nint(n),
            (2, len) => Head::Bytes(len),
            (3, len) => Head::Text(len),
            (4, len) => Head::Array(len),
            (5, len) => Head::Map(len),
            (6, Some(tag)) => Head::Tag(tag),
            (0 | 1 | 6, None) => {
                return Err(HostError::Protocol(format!(
                    "a {} cannot have an indefinite length (offset {at})",
                    MAJOR_NAMES[usize::from(major)]
                )))
            }
            (_, argument) => match (info, argument) {
                (20, _) => Head::Bool(false),
                (21, _) => Head::Bool(true),
                (22, _) => Head::Null,
                (23, _) => {
                    return Err(HostError::Protocol(format!(
                        "the CBOR value undefined (0xf7) at offset {at} has no meaning in cpy2py"
                    )))
                }
                (25, Some(bits)) => Head::Float(f16_to_f64(bits as u16)),
                (26, Some(bits)) => Head::Float(f64::from(f32::from_bits(bits as u32))),
                (27, Some(bits)) => Head::Float(f64::from_bits(bits)),
                (31, _) => Head::Break,
                (_, simple) => {
                    return Err(HostError::Protocol(format!(
                        "unsupported CBOR simple value {} at offset {at}",
                        simple.unwrap_or(u64::from(info))
                    )))
                }
            },
        })
    }

    /// The next chunk of an indefinite-length string of major type `major`,
    /// or `None` at its break.
    fn chunk(&mut self, major: u8) -> Result<Option<&'a [u8]>> {
        let name = MAJOR_NAMES[usize::from(major)];
        let at = self.pos;
        let initial = self.peek_inside(|| format!("an indefinite-length {name}"))?;
        if initial == 0xff {
            self.pos += 1;
            return Ok(None);
        }
        if initial >> 5 != major || initial & 0x1f == 31 {
            return Err(HostError::Protocol(format!(
                "a chunk of an indefinite-length {name} must be a definite {name} (offset {at})"
            )));
        }
        match self.head()? {
            Head::Bytes(Some(n)) | Head::Text(Some(n)) => self.take(n, &format!("a {name} chunk")).map(Some),
            _ => unreachable!("the initial byte was checked"),
        }
    }

    /// The bytes after the cursor, not consumed.
    pub(crate) fn rest(&self) -> &'a [u8] {
        &self.data[self.pos..]
    }

    /// Consumes `n` bytes that [`Cursor::rest`] showed.
    pub(crate) fn skip(&mut self, n: usize) {
        debug_assert!(n <= self.remaining());
        self.pos += n;
    }

    /// Skips the content of a string of major type `major` (2 or 3) whose
    /// head said `len`, copying nothing; returns its length and its number
    /// of chunks (0 for a definite length).
    pub(crate) fn skip_string(&mut self, major: u8, len: Option<u64>) -> Result<(u64, u64)> {
        let what = if major == 2 {
            "a byte string"
        } else {
            "a text string"
        };
        match len {
            Some(n) => self.take(n, what).map(|_| (n, 0)),
            None => {
                let (mut total, mut chunks) = (0u64, 0u64);
                while let Some(chunk) = self.chunk(major)? {
                    total += chunk.len() as u64;
                    chunks += 1;
                }
                Ok((total, chunks))
            }
        }
    }

    /// The content of a byte string whose head said `len`.
    pub(crate) fn bytes(&mut self, len: Option<u64>) -> Result<Cow<'a, [u8]>> {
        match len {
            Some(n) => self.take(n, "a byte string").map(Cow::Borrowed),
            None => {
                let mut out = Vec::new();
                while let Some(chunk) = self.chunk(2)? {
                    out.extend_from_slice(chunk);
                }
                Ok(Cow::Owned(out))
            }
        }
    }

    /// Consumes the next item if it is a text string of at most 23 bytes
    /// (one byte of head; most map keys) and returns its bytes, not yet
    /// checked to be UTF-8, with their offset; None (nothing consumed) for
    /// anything else, a truncated one included.
    #[cfg(feature = "python")]
    #[inline]
    pub(crate) fn short_text(&mut self) -> Option<(&'a [u8], usize)> {
        let data = self.data;
        let len = match *data.get(self.pos)? {
            initial @ 0x60..=0x77 => usize::from(initial - 0x60),
            _ => return None,
        };
        let start = self.pos + 1;
        let bytes = data.get(start..start + len)?;
        self.pos = start + len;
        Some((bytes, start))
    }

    /// The bytes of a text string whose head said `n` bytes, not yet checked
    /// to be UTF-8 (the caller decodes them, and refuses what is not).
    #[cfg(feature = "python")]
    pub(crate) fn text_bytes(&mut self, n: u64) -> Result<&'a [u8]> {
        self.take(n, "a text string")
    }

    /// The content of a text string whose head said `len`; every chunk of an
    /// indefinite-length string must be valid UTF-8 by itself.
    pub(crate) fn text(&mut self, len: Option<u64>) -> Result<Cow<'a, str>> {
        let utf8 = |bytes: &'a [u8], at: usize| {
            std::str::from_utf8(bytes).map_err(|e| {
                HostError::Protocol(format!("invalid UTF-8 in the text string at offset {at}: {e}"))
            })
        };
        match len {
            Some(n) => {
                let at = self.pos;
                utf8(self.take(n, "a text string")?, at).map(Cow::Borrowed)
            }
            None => {
                let mut out = String::new();
                loop {
                    let at = self.pos;
                    match self.chunk(3)? {
                        Some(chunk) => out.push_str(utf8(chunk, at)?),
                        None => return Ok(Cow::Owned(out)),
                    }
                }
            }
        }
    }

    /// Fails if anything follows the one item of the frame.
    pub(crate) fn finish(&self) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(HostError::Protocol(format!(
                "{n} trailing bytes after the CBOR data item (offset {})",
                self.pos
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exception(state: Vec<(Value, Value)>) -> Value {
        Value::Exception {
            kind: ("app".into(), "HTTPError".into()),
            args: vec![Value::Str("not found".into())],
            traceback: None,
            state,
        }
    }

    #[test]
    fn a_standard_library_value_is_a_name_then_its_fields() {
        let date = Value::StdValue {
            name: "datetime.date".into(),
            fields: vec![Value::Int(2026), Value::Int(12), Value::Int(7)],
        };
        let bytes = date.encode().unwrap();
        assert_eq!(Value::decode(&bytes).unwrap(), date);
        // the content is an array whose first item is a str
        for content in [
            Cbor::Array(vec![Cbor::Integer(1.into())]),
            Cbor::Array(Vec::new()),
            Cbor::Text("datetime.date".into()),
        ] {
            let mut frame = Vec::new();
            ciborium::into_writer(&Cbor::Tag(tags::STD_VALUE, Box::new(content)), &mut frame).unwrap();
            assert!(Value::decode(&frame).is_err());
        }
    }

    #[test]
    fn an_exception_carries_its_attributes_when_it_has_any() {
        let with = exception(vec![(Value::Str("status".into()), Value::Int(404))]);
        assert_eq!(Value::decode(&with.encode().unwrap()).unwrap(), with);
        let without = exception(Vec::new());
        let bytes = without.encode().unwrap();
        assert_eq!(Value::decode(&bytes).unwrap(), without);
        assert_eq!(
            bytes[3], 0x83,
            "three items: nothing is added when there is no state"
        );
    }

    #[test]
    fn doubles_and_nulls_taken_at_once_are_what_heads_say() {
        let mut bytes = vec![0x85, 0xf6, 0xfb];
        bytes.extend(1.5f64.to_be_bytes());
        bytes.extend([0xf9, 0x3e, 0x00, 0xfb]); // (1.5 as a half; a NaN with a payload)
        bytes.extend(f64::from_bits(0x7ff8_0000_dead_beef).to_be_bytes());
        bytes.push(0xf6);
        let Value::List(items) = Value::decode(&bytes).unwrap() else {
            panic!("not a list")
        };
        assert_eq!(items.len(), 5);
        assert_eq!(items[0], Value::None);
        assert_eq!(items[1], Value::Float(1.5));
        assert_eq!(items[2], Value::Float(1.5));
        assert!(matches!(items[3], Value::Float(x) if x.to_bits() == 0x7ff8_0000_dead_beef));
        assert_eq!(items[4], Value::None);
        // a double cut short is refused as truncated, not read past the end
        for cut in 1..=8 {
            let mut short = vec![0x81, 0xfb];
            short.extend(&2.5f64.to_be_bytes()[..8 - cut]);
            let err = Value::decode(&short).unwrap_err().to_string();
            assert!(err.contains("truncated") || err.contains("ends"), "{err}");
        }
    }

    #[test]
    fn an_exceptions_attributes_are_a_map_of_names() {
        let kind = Value::Global(("app".into(), "E".into())).to_cbor();
        for state in [
            Cbor::Array(vec![]),
            Cbor::Map(vec![]),
            Cbor::Map(vec![(Cbor::Integer(1.into()), Cbor::Null)]),
        ] {
            let item = Cbor::Tag(
                tags::EXCEPTION,
                Box::new(Cbor::Array(vec![
                    kind.clone(),
                    Cbor::Array(vec![]),
                    Cbor::Null,
                    state,
                ])),
            );
            let mut bytes = Vec::new();
            ciborium::into_writer(&item, &mut bytes).unwrap();
            assert!(Value::decode(&bytes).is_err(), "{item:?}");
        }
    }
}
