//! The value model of the protocol as Rust data, for checking frames in the
//! host (shared vectors now, the sandbox policy later). The Python objects
//! themselves are converted by the faster direct codec in `python::codec`.

use ciborium::value::{Integer, Value as Cbor};

use super::tags;
use crate::error::{HostError, Result};

/// A reference to a module-level name: `(module, qualname)`.
pub type GlobalName = (String, String);

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    /// Integers that fit CBOR's major types 0 and 1.
    Int(i128),
    /// Integers beyond 64 bits: tag 2 holds `n`, tag 3 holds `-1 - n`.
    BigInt { negative: bool, magnitude: Vec<u8> },
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Tuple(Vec<Value>),
    Set(Vec<Value>),
    FrozenSet(Vec<Value>),
    Complex(f64, f64),
    ByteArray(Vec<u8>),
    Global(GlobalName),
    Exception { kind: GlobalName, args: Vec<Value>, traceback: Option<String> },
    TwinRef { owner: String, instance: u64, class: GlobalName },
    Pickle(Vec<u8>),
}

fn malformed(what: &str) -> HostError {
    HostError::Protocol(format!("malformed {what} in a frame"))
}

impl Value {
    /// Decodes one CBOR item, refusing nesting deeper than `tags::MAX_DEPTH`.
    pub fn decode(bytes: &[u8]) -> Result<Value> {
        let cbor: Cbor = ciborium::de::from_reader_with_recursion_limit(bytes, tags::MAX_DEPTH)
            .map_err(|e| HostError::Protocol(format!("invalid CBOR in a frame: {e}")))?;
        Value::from_cbor(cbor)
    }

    /// Encodes to CBOR (preferred serialization, definite lengths).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        ciborium::into_writer(&self.to_cbor(), &mut out).map_err(|e| HostError::Codec(e.to_string()))?;
        Ok(out)
    }

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
            Cbor::Tag(tag, inner) => from_tagged(tag, *inner)?,
            other => return Err(HostError::Protocol(format!("unsupported CBOR item {other:?} in a frame"))),
        })
    }

    pub fn to_cbor(&self) -> Cbor {
        let tagged = |tag: u64, inner: Cbor| Cbor::Tag(tag, Box::new(inner));
        let array = |items: &[Value]| Cbor::Array(items.iter().map(Value::to_cbor).collect());
        let global = |(module, qualname): &GlobalName| {
            tagged(tags::GLOBAL_REF, Cbor::Array(vec![Cbor::Text(module.clone()), Cbor::Text(qualname.clone())]))
        };
        match self {
            Value::None => Cbor::Null,
            Value::Bool(b) => Cbor::Bool(*b),
            Value::Int(i) => match Integer::try_from(*i) {
                Ok(int) if fits_major_0_or_1(*i) => Cbor::Integer(int),
                _ => big_from_i128(*i).to_cbor(),
            },
            Value::BigInt { negative, magnitude } => tagged(
                if *negative { tags::NEG_BIGNUM } else { tags::POS_BIGNUM },
                Cbor::Bytes(magnitude.clone()),
            ),
            Value::Float(f) => Cbor::Float(*f),
            Value::Str(s) => Cbor::Text(s.clone()),
            Value::Bytes(b) => Cbor::Bytes(b.clone()),
            Value::List(items) => array(items),
            Value::Dict(entries) => Cbor::Map(entries.iter().map(|(k, v)| (k.to_cbor(), v.to_cbor())).collect()),
            Value::Tuple(items) => tagged(tags::TUPLE, array(items)),
            Value::Set(items) => tagged(tags::SET, array(items)),
            Value::FrozenSet(items) => tagged(tags::FROZENSET, array(items)),
            Value::Complex(re, im) => tagged(tags::COMPLEX, Cbor::Array(vec![Cbor::Float(*re), Cbor::Float(*im)])),
            Value::ByteArray(b) => tagged(tags::BYTEARRAY, Cbor::Bytes(b.clone())),
            Value::Global(name) => global(name),
            Value::Exception { kind, args, traceback } => tagged(
                tags::EXCEPTION,
                Cbor::Array(vec![
                    global(kind),
                    array(args),
                    traceback.clone().map_or(Cbor::Null, Cbor::Text),
                ]),
            ),
            Value::TwinRef { owner, instance, class } => tagged(
                tags::TWIN_REF,
                Cbor::Array(vec![Cbor::Text(owner.clone()), Cbor::Integer((*instance).into()), global(class)]),
            ),
            Value::Pickle(b) => tagged(tags::PICKLE, Cbor::Bytes(b.clone())),
        }
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
    let (negative, n) = if i < 0 { (true, (-1 - i) as u128) } else { (false, i as u128) };
    let bytes = n.to_be_bytes();
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len() - 1);
    Value::BigInt { negative, magnitude: bytes[first..].to_vec() }
}

fn from_items(items: Vec<Cbor>) -> Result<Vec<Value>> {
    items.into_iter().map(Value::from_cbor).collect()
}

fn array_of(inner: Cbor, what: &str) -> Result<Vec<Cbor>> {
    match inner {
        Cbor::Array(items) => Ok(items),
        _ => Err(malformed(what)),
    }
}

fn text(item: Cbor, what: &str) -> Result<String> {
    match item {
        Cbor::Text(s) => Ok(s),
        _ => Err(malformed(what)),
    }
}

fn global_name(item: Cbor) -> Result<GlobalName> {
    match item {
        Cbor::Tag(tags::GLOBAL_REF, inner) => {
            let [module, qualname]: [Cbor; 2] =
                array_of(*inner, "name reference")?.try_into().map_err(|_| malformed("name reference"))?;
            Ok((text(module, "name reference")?, text(qualname, "name reference")?))
        }
        _ => Err(malformed("name reference")),
    }
}

fn float(item: Cbor) -> Result<f64> {
    match item {
        Cbor::Float(f) => Ok(f),
        _ => Err(malformed("complex number")),
    }
}

fn from_tagged(tag: u64, inner: Cbor) -> Result<Value> {
    Ok(match (tag, inner) {
        (tags::POS_BIGNUM | tags::NEG_BIGNUM, Cbor::Bytes(magnitude)) => {
            Value::BigInt { negative: tag == tags::NEG_BIGNUM, magnitude }
        }
        // ciborium folds bignums that fit 128 bits into integers
        (tags::POS_BIGNUM | tags::NEG_BIGNUM, Cbor::Integer(i)) => big_from_i128(i128::from(i)),
        (tags::TUPLE, inner) => Value::Tuple(from_items(array_of(inner, "tuple")?)?),
        (tags::SET, inner) => Value::Set(from_items(array_of(inner, "set")?)?),
        (tags::FROZENSET, inner) => Value::FrozenSet(from_items(array_of(inner, "frozenset")?)?),
        (tags::COMPLEX, inner) => {
            let [re, im]: [Cbor; 2] =
                array_of(inner, "complex number")?.try_into().map_err(|_| malformed("complex number"))?;
            Value::Complex(float(re)?, float(im)?)
        }
        (tags::BYTEARRAY, Cbor::Bytes(b)) => Value::ByteArray(b),
        (tags::GLOBAL_REF, inner) => Value::Global(global_name(Cbor::Tag(tags::GLOBAL_REF, Box::new(inner)))?),
        (tags::EXCEPTION, inner) => {
            let [kind, args, traceback]: [Cbor; 3] =
                array_of(inner, "exception")?.try_into().map_err(|_| malformed("exception"))?;
            Value::Exception {
                kind: global_name(kind)?,
                args: from_items(array_of(args, "exception")?)?,
                traceback: match traceback {
                    Cbor::Null => None,
                    other => Some(text(other, "exception")?),
                },
            }
        }
        (tags::TWIN_REF, inner) => {
            let [owner, instance, class]: [Cbor; 3] =
                array_of(inner, "twin reference")?.try_into().map_err(|_| malformed("twin reference"))?;
            let instance = match instance {
                Cbor::Integer(i) => u64::try_from(i).map_err(|_| malformed("twin reference"))?,
                _ => return Err(malformed("twin reference")),
            };
            Value::TwinRef { owner: text(owner, "twin reference")?, instance, class: global_name(class)? }
        }
        (tags::PICKLE, Cbor::Bytes(b)) => Value::Pickle(b),
        (tag, _) => return Err(HostError::Protocol(format!("unknown or malformed CBOR tag {tag} in a frame"))),
    })
}
