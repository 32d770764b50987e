//! Fuzzing the frame decoder and `Value::decode` on the stable toolchain,
//! without extra crates: a deterministic mutation fuzzer seeded with the
//! shared vectors and with encodings of random values, checked by the
//! oracle in support/fuzz_oracle.rs (no panic, only protocol errors,
//! nothing allocated beyond the frame limit, canonical re-encoding).
//!
//! `cargo test` runs a short pass. `just fuzz` runs the coverage-guided
//! cargo-fuzz targets (host/fuzz) and a long pass of this one:
//! `CPY2PY_FUZZ_ITERATIONS` sets the number of inputs, `CPY2PY_FUZZ_SEED`
//! the seed (a failure prints both, to reproduce it).

#[path = "support/fuzz_oracle.rs"]
mod oracle;

#[path = "support/repo.rs"]
mod repo;

use std::panic::{catch_unwind, AssertUnwindSafe};

use cpy2py_host::protocol::frame;
use cpy2py_host::protocol::tags::MAX_DEPTH;
use cpy2py_host::protocol::value::{ClassInfo, Value};

/// xorshift64*: small, fast, reproducible.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    fn bytes_below(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        self.bytes(n)
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {text:?}")),
        Err(_) => default,
    }
}

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex digit"))
        .collect()
}

/// The `cbor` fields of the shared vectors, valid and invalid.
fn vector_seeds() -> Vec<Vec<u8>> {
    let dir = repo::repo_root().join("tests/vectors");
    let mut seeds = Vec::new();
    for file in ["values.json", "invalid.json"] {
        let text = std::fs::read_to_string(dir.join(file)).expect("reading the vectors");
        let json: serde_json::Value = serde_json::from_str(&text).expect("parsing the vectors");
        for vector in json.as_array().expect("a list of vectors") {
            if let Some(cbor) = vector.get("cbor").and_then(|c| c.as_str()) {
                seeds.push(unhex(cbor));
            }
        }
    }
    assert!(seeds.len() > 100, "the vectors went missing");
    seeds
}

// -- random values -------------------------------------------------------------------

fn text(rng: &mut Rng) -> String {
    const PIECES: [&str; 8] = ["a", "Z", "é", "€", "𝄞", " ", "\0", "name"];
    (0..rng.below(6))
        .map(|_| PIECES[rng.below(PIECES.len())])
        .collect()
}

fn global(rng: &mut Rng) -> (String, String) {
    (text(rng), text(rng))
}

fn float(rng: &mut Rng) -> f64 {
    let f = match rng.below(4) {
        0 => f64::from_bits(rng.next()),
        1 => f64::from(rng.next() as f32),
        2 => [0.0, -0.0, 1.5, 65504.0, f64::INFINITY, f64::NEG_INFINITY, 1e-310][rng.below(7)],
        _ => (rng.below(2000) as f64 - 1000.0) / 8.0,
    };
    if f.is_nan() {
        0.25 // NaN != NaN: the round trip of NaN is checked by the vectors
    } else {
        f
    }
}

fn big_magnitude(rng: &mut Rng) -> Vec<u8> {
    let n = 9 + rng.below(24);
    let mut magnitude = rng.bytes(n);
    magnitude[0] |= 1; // no leading zero: that is how decoding gives them
    magnitude
}

fn hashable(rng: &mut Rng, depth: usize) -> Value {
    loop {
        let value = random_value(rng, depth);
        if value.is_hashable() {
            return value;
        }
    }
}

/// A random value of the model, as `Value::decode` gives it (bignums without
/// leading zeros and beyond 64 bits, hashable set items and keys).
fn random_value(rng: &mut Rng, depth: usize) -> Value {
    let leaf = depth + 2 >= MAX_DEPTH.min(8) || rng.chance(3);
    let choice = if leaf { rng.below(10) } else { 10 + rng.below(9) };
    let items = |rng: &mut Rng| {
        (0..rng.below(5))
            .map(|_| random_value(rng, depth + 2))
            .collect::<Vec<_>>()
    };
    match choice {
        0 => Value::None,
        1 => Value::Bool(rng.chance(2)),
        2 => Value::Int(i128::from(rng.next() as i64) >> rng.below(64)),
        3 => Value::Int(if rng.chance(2) {
            i128::from(u64::MAX) - rng.below(3) as i128
        } else {
            -(1i128 << 64) + rng.below(3) as i128
        }),
        4 => Value::BigInt {
            negative: rng.chance(2),
            magnitude: big_magnitude(rng),
        },
        5 => Value::Float(float(rng)),
        6 => Value::Str(text(rng)),
        7 if rng.chance(4) => {
            // a str with a lone surrogate (tag 40015), as "surrogatepass" writes it
            let mut utf8 = text(rng).into_bytes();
            utf8.extend([0xed, 0xa0 + rng.below(32) as u8, 0x80 + rng.below(64) as u8]);
            Value::SurrogateStr(utf8)
        }
        7 => Value::Bytes(rng.bytes_below(40)),
        8 => Value::Global(global(rng)),
        9 => Value::Pickle(rng.bytes_below(20)),
        10 => Value::List(items(rng)),
        11 => Value::Dict(
            (0..rng.below(4))
                .map(|_| (hashable(rng, depth + 1), random_value(rng, depth + 1)))
                .collect(),
        ),
        12 => Value::Tuple(items(rng)),
        13 => Value::Set((0..rng.below(4)).map(|_| hashable(rng, depth + 2)).collect()),
        14 => Value::FrozenSet((0..rng.below(4)).map(|_| hashable(rng, depth + 2)).collect()),
        15 => Value::Complex(float(rng), float(rng)),
        16 => Value::ByteArray(rng.bytes_below(20)),
        17 => Value::Exception {
            kind: global(rng),
            args: items(rng),
            traceback: if rng.chance(2) { Some(text(rng)) } else { None },
            state: if rng.chance(2) {
                vec![(Value::Str(text(rng)), random_value(rng, depth + 2))]
            } else {
                Vec::new()
            },
        },
        _ => Value::TwinRef {
            owner: text(rng),
            instance: rng.next(),
            class: if rng.chance(4) {
                ClassInfo::Omitted
            } else if rng.chance(2) {
                ClassInfo::Named(global(rng))
            } else {
                let names = |rng: &mut Rng| (0..rng.below(3)).map(|_| text(rng)).collect();
                ClassInfo::Described {
                    name: text(rng),
                    specials: names(rng),
                    methods: if rng.chance(2) { Some(names(rng)) } else { None },
                }
            },
        },
    }
}

// -- mutations -----------------------------------------------------------------------

/// Bytes a CBOR decoder treats specially: heads with long arguments,
/// indefinite lengths, breaks, tags of the model, reserved values.
const INTERESTING: [u8; 22] = [
    0x00, 0x17, 0x18, 0x1b, 0x1c, 0x1f, 0x3b, 0x5f, 0x7f, 0x9f, 0xbf, 0xc2, 0xc3, 0xd9, 0xdb, 0xf4, 0xf7,
    0xf8, 0xf9, 0xfb, 0xfe, 0xff,
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(10) {
            0 if len > 0 => input[rng.below(len)] ^= 1 << rng.below(8),
            1 if len > 0 => input[rng.below(len)] = INTERESTING[rng.below(INTERESTING.len())],
            2 => input.insert(rng.below(len + 1), INTERESTING[rng.below(INTERESTING.len())]),
            3 if len > 0 => {
                input.remove(rng.below(len));
            }
            4 if len > 0 => input.truncate(rng.below(len)),
            5 => {
                // splice in a piece of another input
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let start = rng.below(other.len());
                    let end = start + rng.below(other.len() - start + 1);
                    let at = rng.below(len + 1);
                    input.splice(at..at, other[start..end].iter().copied());
                }
            }
            6 if len > 0 => {
                // duplicate a chunk
                let start = rng.below(len);
                let end = start + rng.below((len - start).min(16) + 1);
                let chunk = input[start..end].to_vec();
                input.splice(end..end, chunk);
            }
            7 => {
                // wrap in a container or tag head
                let heads: [&[u8]; 6] = [
                    &[0x81],
                    &[0x9f],
                    &[0xd9, 0x9c, 0x41],
                    &[0xd9, 0x01, 0x02],
                    &[0xc2],
                    &[0xd9, 0x9c, 0x4a],
                ];
                let head = heads[rng.below(heads.len())];
                input.splice(0..0, head.iter().copied());
                if head == [0x9f] {
                    input.push(0xff);
                }
            }
            8 if len >= 2 => {
                // a large argument where one was small
                let at = rng.below(len - 1);
                input[at] = (input[at] & 0xe0) | [0x1a, 0x1b][rng.below(2)];
            }
            _ => input.extend(rng.bytes_below(4)),
        }
        if input.len() > 4096 {
            input.truncate(4096);
        }
    }
}

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::write_frame(&mut out, payload).expect("a frame is written");
    out
}

/// Runs one input through every check; on a panic, says how to reproduce it.
fn check_all(input: &[u8], seed: u64, iteration: u64) -> bool {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let accepted = oracle::check_value(input).is_some();
        oracle::check_stream(input);
        let mut stream = framed(input);
        stream.extend(framed(input));
        let frames = oracle::check_stream(&stream);
        if !input.is_empty() {
            assert!(frames >= 1, "a well-framed payload was not read as a frame");
        }
        oracle::check_hello(input);
        oracle::check_message(input);
        // the stream again, as a pipe delivers it: in pieces of 1 to 7 bytes
        let pieces = [1 + (iteration % 7) as u8, 3, 1, 5];
        assert_eq!(oracle::check_stream_in_pieces(&stream, &pieces), frames);
        accepted
    }));
    match outcome {
        Ok(accepted) => accepted,
        Err(panic) => {
            eprintln!(
                "fuzz failure: CPY2PY_FUZZ_SEED={seed} iteration {iteration}, input {}",
                oracle::hex(input)
            );
            std::panic::resume_unwind(panic)
        }
    }
}

#[test]
fn random_values_round_trip_through_frames() {
    let seed = env_number("CPY2PY_FUZZ_SEED", 0x5eed_0001);
    let count = env_number("CPY2PY_FUZZ_ITERATIONS", 20_000) / 4;
    let mut rng = Rng::new(seed);
    let mut stream = Vec::new();
    let mut values = Vec::new();
    for _ in 0..count {
        let value = random_value(&mut rng, 0);
        let bytes = value.encode().expect("a value of the model encodes");
        let back = Value::decode(&bytes)
            .unwrap_or_else(|e| panic!("{value:?} encoded as {} fails: {e}", oracle::hex(&bytes)));
        assert_eq!(back, value, "round trip of {}", oracle::hex(&bytes));
        frame::write_frame(&mut stream, &bytes).expect("a frame is written");
        values.push(value);
    }
    let mut input = &stream[..];
    for value in &values {
        let payload = frame::read_frame(&mut input, frame::DEFAULT_MAX_FRAME)
            .unwrap()
            .expect("a frame");
        assert_eq!(&Value::decode(&payload).unwrap(), value);
    }
    assert!(frame::read_frame(&mut input, frame::DEFAULT_MAX_FRAME)
        .unwrap()
        .is_none());
}

#[test]
fn mutated_inputs_never_panic_and_round_trip_canonically() {
    let seed = env_number("CPY2PY_FUZZ_SEED", 0x5eed_0002);
    let iterations = env_number("CPY2PY_FUZZ_ITERATIONS", 20_000);
    let mut rng = Rng::new(seed);
    let mut corpus = vector_seeds();
    for _ in 0..200 {
        corpus.push(random_value(&mut rng, 0).encode().expect("encodes"));
    }
    let seeds = corpus.len();
    let (mut accepted, mut refused) = (0u64, 0u64);
    for iteration in 0..iterations {
        let mut input = corpus[rng.below(corpus.len())].clone();
        mutate(&mut rng, &mut input, &corpus);
        if check_all(&input, seed, iteration) {
            accepted += 1;
            // crude feedback: inputs that still decode are good parents
            if corpus.len() < seeds + 5_000 && rng.chance(4) {
                corpus.push(input);
            }
        } else {
            refused += 1;
        }
    }
    eprintln!("{iterations} mutated inputs (seed {seed}): {accepted} decoded, {refused} refused");
    // the mutations must reach both sides of the decoder to mean anything
    assert!(
        accepted > iterations / 50,
        "only {accepted} of {iterations} mutated inputs decoded"
    );
    assert!(
        refused > iterations / 50,
        "only {refused} of {iterations} mutated inputs were refused"
    );
}

#[test]
fn hostile_length_prefixes_are_refused_before_allocating() {
    // the largest prefix, one past the limit, and a prefix at the limit
    // whose body never comes: none allocates the declared size
    for (prefix, max) in [
        (u32::MAX, frame::DEFAULT_MAX_FRAME),
        (1u32 << 16, (1usize << 16) - 1),
    ] {
        let mut input: &[u8] = &prefix.to_be_bytes();
        let err = frame::read_frame(&mut input, max).unwrap_err();
        assert!(err.to_string().contains("larger than the limit"), "{err}");
    }
    let mut input: &[u8] = &[0x40, 0, 0, 0, 0x83];
    assert!(frame::read_frame(&mut input, frame::DEFAULT_MAX_FRAME).is_err());
}

#[test]
fn nesting_far_beyond_the_limit_is_refused_without_recursion() {
    // arrays, maps (key 0, then the nested value) and name-reference tags
    for head in [&[0x81u8][..], &[0xa1, 0x00], &[0xd9, 0x9c, 0x4b]] {
        let mut input = head.repeat(100_000);
        input.push(0x00);
        let err = Value::decode(&input).unwrap_err().to_string();
        assert!(err.contains(&format!("deeper than {MAX_DEPTH}")), "{err}");
    }
}
