//! The shared vectors of tests/vectors/ against the Rust value model:
//! every valid vector decodes to its meaning and (unless it is a
//! decode-only alternative encoding) its meaning encodes to exactly its
//! bytes; every invalid vector is refused.

#[path = "support/repo.rs"]
mod repo;

use cpy2py_host::protocol::tags::MAX_DEPTH;
use cpy2py_host::protocol::value::{ClassInfo, GlobalName, Value};
use serde_json::Value as Json;

fn vectors(file: &str) -> Vec<Json> {
    let path = repo::repo_root().join("tests/vectors").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    match serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display())) {
        Json::Array(items) => items,
        other => panic!("{file} must hold a JSON list, not {other}"),
    }
}

fn unhex(hex: &str) -> Vec<u8> {
    assert!(hex.len() % 2 == 0, "odd-length hex {hex:?}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn string(json: &Json) -> String {
    json.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {json}"))
        .to_owned()
}

fn float(json: &Json) -> f64 {
    let text = string(json);
    text.parse().unwrap_or_else(|e| panic!("bad float {text:?}: {e}"))
}

fn items(json: &Json) -> Vec<Value> {
    json.as_array()
        .unwrap_or_else(|| panic!("expected a list, got {json}"))
        .iter()
        .map(meaning)
        .collect()
}

fn global(json: &Json) -> GlobalName {
    match json.as_array().map(Vec::as_slice) {
        Some([module, qualname]) => (string(module), string(qualname)),
        _ => panic!("expected [module, qualname], got {json}"),
    }
}

/// The language-neutral meaning of a vector as a `Value`.
fn meaning(json: &Json) -> Value {
    let object = json
        .as_object()
        .unwrap_or_else(|| panic!("a meaning is an object, not {json}"));
    assert_eq!(object.len(), 1, "a meaning has exactly one key: {json}");
    let (kind, v) = object.iter().next().expect("one key");
    match kind.as_str() {
        "none" => Value::None,
        "bool" => Value::Bool(v.as_bool().expect("bool")),
        "int" => Value::Int(string(v).parse().expect("decimal int")),
        "bigint" => match v.as_array().map(Vec::as_slice) {
            Some([sign, magnitude]) => Value::BigInt {
                negative: string(sign) == "-",
                magnitude: unhex(&string(magnitude)),
            },
            _ => panic!("bad bigint {v}"),
        },
        "float" => Value::Float(float(v)),
        "str" => Value::Str(string(v)),
        "bytes" => Value::Bytes(unhex(&string(v))),
        "list" => Value::List(items(v)),
        "dict" => Value::Dict(
            v.as_array()
                .expect("dict entries")
                .iter()
                .map(|entry| match entry.as_array().map(Vec::as_slice) {
                    Some([key, value]) => (meaning(key), meaning(value)),
                    _ => panic!("bad dict entry {entry}"),
                })
                .collect(),
        ),
        "tuple" => Value::Tuple(items(v)),
        "set" => Value::Set(items(v)),
        "frozenset" => Value::FrozenSet(items(v)),
        "complex" => match v.as_array().map(Vec::as_slice) {
            Some([re, im]) => Value::Complex(float(re), float(im)),
            _ => panic!("bad complex {v}"),
        },
        "bytearray" => Value::ByteArray(unhex(&string(v))),
        "surrogate_str" => Value::SurrogateStr(unhex(&string(v))),
        "global" => Value::Global(global(v)),
        "exception" => Value::Exception {
            kind: global(&v["type"]),
            args: items(&v["args"]),
            traceback: v["traceback"].as_str().map(str::to_owned),
            state: Vec::new(),
        },
        "twin_ref" => match v.as_array().map(Vec::as_slice) {
            Some([owner, instance, class]) => Value::TwinRef {
                owner: string(owner),
                instance: instance.as_u64().expect("instance id"),
                class: match class.get("described").and_then(|d| d.as_array()) {
                    _ if class.is_null() => ClassInfo::Omitted,
                    Some(fields) => {
                        let names = |v: &Json| {
                            v.as_array()
                                .expect("names")
                                .iter()
                                .map(string)
                                .collect::<Vec<_>>()
                        };
                        ClassInfo::Described {
                            name: string(&fields[0]),
                            specials: names(&fields[1]),
                            methods: fields.get(2).map(names),
                        }
                    }
                    None => ClassInfo::Named(global(class)),
                },
            },
            _ => panic!("bad twin_ref {v}"),
        },
        "pickle" => Value::Pickle(unhex(&string(v))),
        other => panic!("unknown meaning kind {other:?}"),
    }
}

/// Equality that tells floats apart by their bits (so NaN equals NaN and
/// -0.0 differs from 0.0).
fn same(a: &Value, b: &Value) -> bool {
    let all = |a: &[Value], b: &[Value]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y));
    let bits = |x: f64, y: f64| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan());
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => bits(*x, *y),
        (Value::Complex(a, b), Value::Complex(c, d)) => bits(*a, *c) && bits(*b, *d),
        (Value::List(x), Value::List(y))
        | (Value::Tuple(x), Value::Tuple(y))
        | (Value::Set(x), Value::Set(y))
        | (Value::FrozenSet(x), Value::FrozenSet(y)) => all(x, y),
        (Value::Dict(x), Value::Dict(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|((k, v), (l, w))| same(k, l) && same(v, w))
        }
        (
            Value::Exception {
                kind,
                args,
                traceback,
                state,
            },
            Value::Exception {
                kind: kind2,
                args: args2,
                traceback: traceback2,
                state: state2,
            },
        ) => {
            kind == kind2
                && all(args, args2)
                && traceback == traceback2
                && state.len() == state2.len()
                && state
                    .iter()
                    .zip(state2)
                    .all(|((k, v), (l, w))| same(k, l) && same(v, w))
        }
        _ => a == b,
    }
}

#[test]
fn valid_vectors_decode_to_their_meaning_and_encode_to_their_bytes() {
    let vectors = vectors("values.json");
    assert!(vectors.len() > 100, "suspiciously few vectors: {}", vectors.len());
    for vector in &vectors {
        let name = string(&vector["name"]);
        let cbor = unhex(&string(&vector["cbor"]));
        let expected = meaning(&vector["value"]);
        let decoded = Value::decode(&cbor).unwrap_or_else(|e| panic!("{name}: refused: {e}"));
        assert!(
            same(&decoded, &expected),
            "{name}: decoded {decoded:?}, expected {expected:?}"
        );
        if vector.get("decode_only").and_then(Json::as_bool) != Some(true) {
            let encoded = expected
                .encode()
                .unwrap_or_else(|e| panic!("{name}: cannot encode: {e}"));
            assert_eq!(hex(&encoded), hex(&cbor), "{name}: encoding differs");
        }
    }
}

#[test]
fn invalid_vectors_are_refused() {
    let vectors = vectors("invalid.json");
    assert!(
        vectors.len() > 50,
        "suspiciously few invalid vectors: {}",
        vectors.len()
    );
    for vector in &vectors {
        let name = string(&vector["name"]);
        let cbor = unhex(&string(&vector["cbor"]));
        match Value::decode(&cbor) {
            Ok(value) => panic!("{name}: accepted as {value:?} ({})", string(&vector["why"])),
            Err(cpy2py_host::HostError::Protocol(_)) => {}
            Err(other) => panic!("{name}: refused with a non-protocol error: {other:?}"),
        }
    }
}

#[test]
fn nesting_up_to_max_depth_is_accepted() {
    // MAX_DEPTH arrays
    let mut cbor = vec![0x81; MAX_DEPTH - 1];
    cbor.push(0x80);
    let mut value = Value::decode(&cbor).expect("MAX_DEPTH nested arrays");
    for _ in 0..MAX_DEPTH - 1 {
        value = match value {
            Value::List(mut items) if items.len() == 1 => items.pop().expect("one item"),
            other => panic!("expected a one-item list, got {other:?}"),
        };
    }
    assert_eq!(value, Value::List(vec![]));
    assert_eq!(value.encode().expect("encode"), vec![0x80]);

    // a tuple is two levels (a tag and an array)
    let mut tuples = [0xd9, 0x9c, 0x41, 0x81].repeat(MAX_DEPTH / 2 - 1);
    tuples.extend([0xd9, 0x9c, 0x41, 0x80]);
    Value::decode(&tuples).expect("MAX_DEPTH / 2 nested tuples");
    let mut deeper = vec![0x81];
    deeper.extend(&tuples);
    assert!(Value::decode(&deeper).is_err(), "one level more is refused");

    // a bignum is a tag, one level
    let mut cbor = vec![0x81; MAX_DEPTH - 1];
    cbor.extend([0xc2, 0x49, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    Value::decode(&cbor).expect("a bignum at the deepest level");
}

#[test]
fn encoding_normalizes_to_preferred_serialization() {
    let nan_with_payload = f64::from_bits(0x7ff8_0000_dead_beef);
    assert_eq!(
        Value::Float(nan_with_payload).encode().unwrap(),
        [0xf9, 0x7e, 0x00]
    );
    assert_eq!(Value::Float(-f64::NAN).encode().unwrap(), [0xf9, 0x7e, 0x00]);
    assert_eq!(
        Value::Complex(f64::NAN, -0.0).encode().unwrap(),
        [0xd9, 0x9c, 0x43, 0x82, 0xf9, 0x7e, 0x00, 0xf9, 0x80, 0x00]
    );
    // a bignum that fits 64 bits is an int on the wire, leading zeros go
    assert_eq!(
        Value::BigInt {
            negative: false,
            magnitude: vec![0, 0, 1]
        }
        .encode()
        .unwrap(),
        [0x01]
    );
    assert_eq!(
        Value::BigInt {
            negative: true,
            magnitude: vec![]
        }
        .encode()
        .unwrap(),
        [0x20]
    );
    let mut big = vec![0xc2, 0x49, 1];
    big.extend([0; 8]);
    assert_eq!(
        Value::BigInt {
            negative: false,
            magnitude: [[0, 0, 1].as_slice(), &[0; 8]].concat()
        }
        .encode()
        .unwrap(),
        big
    );
    assert_eq!(Value::Int(1 << 64).encode().unwrap(), big);
}
