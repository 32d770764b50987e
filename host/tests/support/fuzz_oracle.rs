//! What fuzzing checks about the decoders of the protocol, shared by the
//! short deterministic run in `cargo test` (host/tests/fuzz_decoder.rs) and
//! the coverage-guided cargo-fuzz targets (host/fuzz, `just fuzz`).
//!
//! For any input: no panic, no error other than `HostError::Protocol`, no
//! allocation beyond the frame limit, and every accepted value has one
//! canonical encoding that decodes again to a value of the same encoding.

#![allow(dead_code)] // each user takes what it needs

use std::io::Read;

use cpy2py_host::protocol::frame;
use cpy2py_host::protocol::message::{self, Link, Sender, Stage};
use cpy2py_host::protocol::value::Value;
use cpy2py_host::HostError;

/// The frame limit of the stream check: small, so that inputs often declare
/// frames beyond it (the decoder must refuse those before allocating).
pub const STREAM_MAX_FRAME: usize = 1 << 16;

pub fn hex(bytes: &[u8]) -> String {
    let shown: String = bytes.iter().take(256).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > 256 {
        format!("{shown}... ({} bytes)", bytes.len())
    } else {
        shown
    }
}

/// `Value::decode` on `data`; the value if it was accepted.
pub fn check_value(data: &[u8]) -> Option<Value> {
    match Value::decode(data) {
        Ok(value) => {
            let canonical = value
                .encode()
                .unwrap_or_else(|e| panic!("decoded {value:?} from {} but cannot encode it: {e}", hex(data)));
            let again = Value::decode(&canonical).unwrap_or_else(|e| {
                panic!(
                    "the canonical encoding {} of {value:?} (from {}) does not decode: {e}",
                    hex(&canonical),
                    hex(data)
                )
            });
            let twice = again.encode().expect("a decoded value encodes");
            assert_eq!(
                hex(&twice),
                hex(&canonical),
                "the canonical encoding of {} is not stable",
                hex(data)
            );
            Some(value)
        }
        Err(HostError::Protocol(_)) => None,
        Err(other) => panic!(
            "decoding {} failed with a non-protocol error: {other:?}",
            hex(data)
        ),
    }
}

/// A pipe that delivers what was written in pieces of the sizes `pieces`
/// cycles through (as a pipe may), so that a frame reader must put headers
/// and payloads together from partial reads.
pub struct Pieces<'a> {
    pub data: &'a [u8],
    pub pieces: &'a [u8],
    pub next: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let piece = match self.pieces.len() {
            0 => buf.len(),
            n => usize::from(self.pieces[self.next % n]).max(1),
        };
        self.next += 1;
        let n = piece.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Every check of the message model (`message::check_frame`) on `data`, as
/// each stage, sender and link: an answer or a protocol error, never a
/// panic; and nothing it accepts is refused by the value model.
pub fn check_message(data: &[u8]) {
    for stage in [Stage::Hello, Stage::Welcome, Stage::Answer, Stage::Message] {
        for sender in [Sender::Master, Sender::Twin] {
            for link in [Link::Trusted, Link::Sandboxed] {
                match message::check_frame(data, stage, sender, link) {
                    Ok(_) => assert!(
                        Value::decode(data).is_ok(),
                        "{} passed the message model only",
                        hex(data)
                    ),
                    Err(HostError::Protocol(_)) => {}
                    Err(other) => panic!("checking the frame {} failed with {other:?}", hex(data)),
                }
            }
        }
    }
}

/// `data` read as a stream of frames delivered in pieces (see [`Pieces`]):
/// the same frames as [`check_stream`] reads from it whole.
pub fn check_stream_in_pieces(data: &[u8], pieces: &[u8]) -> usize {
    let mut whole = data;
    let mut split = Pieces {
        data,
        pieces,
        next: 0,
    };
    let mut frames = 0;
    loop {
        let expected = frame::read_frame(&mut whole, STREAM_MAX_FRAME);
        let got = frame::read_frame(&mut split, STREAM_MAX_FRAME);
        match (expected, got) {
            (Ok(Some(a)), Ok(Some(b))) => {
                assert_eq!(
                    hex(&a),
                    hex(&b),
                    "a frame of {} read in pieces differs",
                    hex(data)
                );
                frames += 1;
            }
            (Ok(None), Ok(None)) => return frames,
            (Err(HostError::Protocol(_)), Err(HostError::Protocol(_))) => return frames,
            (a, b) => panic!("reading {} whole gave {a:?}, in pieces {b:?}", hex(data)),
        }
    }
}

/// `data` read as a stream of frames, each decoded as a value; returns the
/// number of whole frames read before the end or the first refusal.
pub fn check_stream(data: &[u8]) -> usize {
    let mut input = data;
    let mut frames = 0;
    loop {
        let before = input.len();
        match frame::read_frame(&mut input, STREAM_MAX_FRAME) {
            Ok(Some(payload)) => {
                assert!(
                    !payload.is_empty() && payload.len() <= STREAM_MAX_FRAME,
                    "read_frame returned a frame of {} bytes",
                    payload.len()
                );
                assert_eq!(before - input.len(), payload.len() + frame::HEADER_LEN);
                check_value(&payload);
                frames += 1;
            }
            Ok(None) => {
                assert!(
                    input.is_empty(),
                    "end of stream reported with {} bytes left",
                    input.len()
                );
                return frames;
            }
            Err(HostError::Protocol(_)) => return frames,
            Err(other) => panic!("reading frames from {} failed with {other:?}", hex(data)),
        }
    }
}

/// The handshake's hello parser: an error, never a panic.
pub fn check_hello(data: &[u8]) {
    match cpy2py_host::protocol::handshake::parse_hello(data) {
        Ok(_) | Err(HostError::Protocol(_)) | Err(HostError::VersionMismatch { .. }) => {}
        Err(other) => panic!("parsing the hello {} failed with {other:?}", hex(data)),
    }
}
