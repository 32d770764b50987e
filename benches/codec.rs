//! Rust benches of the protocol core (criterion): the value codec
//! (`cpy2py_host::protocol::value::Value` encode/decode) and framing
//! (`protocol::frame` write/read, in memory and as a round trip through two
//! pipes to an echo thread: the floor of a frame exchange without Python).
//!
//! Declared as a [[bench]] of host/Cargo.toml; run by `just bench`, or alone:
//!     cargo bench -p cpy2py-host --bench codec
//! The messages mirror what the Python kernel sends per call
//! (guest-python/cpy2py/kernel/connection.py): a request
//! `[0, id, chain, op, global, args, kwargs]` and a reply `[1, id, result]`.

use std::fs::File;
use std::hint::black_box;
use std::io::{BufReader, Write};
use std::os::fd::FromRawFd;
use std::thread;

use anyhow::Context;
use cpy2py_host::protocol::frame::{read_frame, write_frame, DEFAULT_MAX_FRAME};
use cpy2py_host::protocol::value::Value;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn request() -> Value {
    Value::List(vec![
        Value::Int(0),
        Value::Int(12345),
        Value::Int(0x7a3c_0000_0001),
        Value::Int(0),
        Value::Global(("bench_funcs".into(), "noop".into())),
        Value::List(vec![]),
        Value::Dict(vec![]),
    ])
}

fn reply() -> Value {
    Value::List(vec![Value::Int(1), Value::Int(12345), Value::Int(1)])
}

fn int_list() -> Value {
    Value::List((0..10_000).map(Value::Int).collect())
}

fn nested_dict() -> Value {
    Value::Dict(
        (0..100)
            .map(|g| {
                let inner = (0..100)
                    .map(|k| (Value::Str(format!("key{k}")), Value::Int(100 * g + k)))
                    .collect();
                (Value::Str(format!("group{g}")), Value::Dict(inner))
            })
            .collect(),
    )
}

fn bytes(size: usize) -> Value {
    Value::Bytes((0..size).map(|i| (i * 31 % 251) as u8).collect())
}

fn values() -> Vec<(&'static str, Value)> {
    vec![
        ("request", request()),
        ("reply", reply()),
        ("list-10k-ints", int_list()),
        ("dict-10k-nested", nested_dict()),
        ("bytes-1MiB", bytes(1 << 20)),
    ]
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("value");
    for (name, value) in values() {
        let encoded = value.encode().expect("encodes");
        group.throughput(Throughput::Bytes(encoded.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode", name), &value, |b, v| {
            b.iter(|| black_box(v.encode().unwrap()))
        });
        group.bench_with_input(BenchmarkId::new("decode", name), &encoded, |b, bytes| {
            b.iter(|| black_box(Value::decode(bytes).unwrap()))
        });
    }
    group.finish();
}

fn framing(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    for (name, size) in [("8B", 8usize), ("1KiB", 1 << 10), ("1MiB", 1 << 20)] {
        let payload = vec![0x5au8; size];
        let mut framed = Vec::new();
        write_frame(&mut framed, &payload).unwrap();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("write", name), &payload, |b, p| {
            let mut out = Vec::with_capacity(size + 4);
            b.iter(|| {
                out.clear();
                write_frame(&mut out, black_box(p)).unwrap();
            })
        });
        group.bench_with_input(BenchmarkId::new("read", name), &framed, |b, f| {
            b.iter(|| black_box(read_frame(&mut &f[..], DEFAULT_MAX_FRAME).unwrap()))
        });
    }
    group.finish();
}

fn pipe() -> anyhow::Result<(File, File)> {
    let mut fds = [0i32; 2];
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe(2) for the echo thread");
    }
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Sends every frame of `input` back on `output` until the end of `input`.
fn echo_frames(input: File, mut output: File) -> anyhow::Result<()> {
    let mut input = BufReader::new(input);
    while let Some(frame) = read_frame(&mut input, DEFAULT_MAX_FRAME).context("echo thread reading")? {
        write_frame(&mut output, &frame).context("echo thread writing")?;
    }
    Ok(())
}

/// A frame there and back through two pipes to a thread that echoes it:
/// what moving frames costs with no Python on either side.
fn pipe_round_trip(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipe-round-trip");
    for (name, size) in [("8B", 8usize), ("1MiB", 1 << 20)] {
        let (to_echo_r, mut to_echo_w) = pipe().unwrap();
        let (from_echo_r, from_echo_w) = pipe().unwrap();
        let echo = thread::spawn(move || echo_frames(to_echo_r, from_echo_w));
        let mut from_echo = BufReader::new(from_echo_r);
        let payload = vec![0xa5u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                write_frame(&mut to_echo_w, &payload).unwrap();
                black_box(read_frame(&mut from_echo, DEFAULT_MAX_FRAME).unwrap().unwrap());
            })
        });
        to_echo_w.flush().unwrap();
        drop(to_echo_w);
        if let Err(err) = echo.join().expect("the echo thread panicked") {
            panic!("the echo thread failed: {err:#}");
        }
    }
    group.finish();
}

criterion_group!(benches, codec, framing, pipe_round_trip);
criterion_main!(benches);
