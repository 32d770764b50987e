//! What fuzzing checks about the decoders of the protocol, shared by the
//! short deterministic run in `cargo test` (host/tests/fuzz_decoder.rs) and
//! the coverage-guided cargo-fuzz targets (host/fuzz, `just fuzz`).
//!
//! For any input: no panic, no error other than `HostError::Protocol`, no
//! allocation beyond the frame limit, and every accepted value has one
//! canonical encoding that decodes again to a value of the same encoding.

#![allow(dead_code)] // each user takes what it needs

use cpy2py_host::protocol::frame;
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
