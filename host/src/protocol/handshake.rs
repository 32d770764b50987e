//! The handshake: the twin's hello and the version check.

use ciborium::value::Value as Cbor;
use serde::{Deserialize, Serialize};

use crate::error::{HostError, Result};

/// The protocol version this host speaks.
pub const PROTOCOL_VERSION: u64 = 1;

/// The first frame a twin sends: who it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub cpy2py: u64,
    pub twin_id: String,
    pub implementation: String,
    pub version: String,
    pub executable: String,
    pub pid: u32,
    /// the twin has the pure-Python codec and C pickle: its link carries
    /// plain-data blocks both ways (docs/protocol.md, "Plain-data blocks")
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plain_blocks: bool,
    /// a WASI guest that reads the host's renditions of the master's frames
    /// (docs/protocol.md, "What a guest is given to read"; rendition.rs)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub renditions: bool,
}

/// How large a hello may be: a real one is about 200 bytes, its longest
/// field the interpreter's path.
pub const MAX_HELLO_BYTES: usize = 16 * 1024;

/// Parses a hello frame. The version is checked before anything else, so a
/// twin of another protocol version gets a message naming both versions
/// even if the rest of its hello looks different.
pub fn parse_hello(frame: &[u8]) -> Result<Hello> {
    // Read as a tree of values before its fields are checked: a small frame
    // of empty arrays would make a large tree, so the size is checked first
    if frame.len() > MAX_HELLO_BYTES {
        return Err(HostError::Protocol(format!(
            "the twin's first frame is {} bytes, not a cpy2py hello (at most {MAX_HELLO_BYTES} bytes)",
            frame.len()
        )));
    }
    let value: Cbor = ciborium::from_reader(frame)
        .map_err(|e| HostError::Protocol(format!("the twin's hello is not valid CBOR: {e}")))?;
    let version = value
        .as_map()
        .and_then(|entries| entries.iter().find(|(k, _)| k.as_text() == Some("cpy2py")))
        .and_then(|(_, v)| v.as_integer())
        .and_then(|v| u64::try_from(v).ok())
        .ok_or_else(|| HostError::Protocol("the twin's first frame is not a cpy2py hello".into()))?;
    if version != PROTOCOL_VERSION {
        return Err(HostError::VersionMismatch {
            theirs: version,
            ours: PROTOCOL_VERSION,
        });
    }
    value
        .deserialized()
        .map_err(|e| HostError::Protocol(format!("the twin's hello is malformed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode<T: Serialize>(value: &T) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(value, &mut out).unwrap();
        out
    }

    fn hello(version: u64) -> Hello {
        Hello {
            cpy2py: version,
            twin_id: "pypy3".into(),
            implementation: "pypy".into(),
            version: "3.9.18".into(),
            executable: "/usr/bin/pypy3".into(),
            pid: 42,
            plain_blocks: false,
            renditions: false,
        }
    }

    #[test]
    fn a_hello_may_say_its_link_carries_plain_data_blocks() {
        let said = Hello {
            plain_blocks: true,
            ..hello(PROTOCOL_VERSION)
        };
        assert!(parse_hello(&encode(&said)).unwrap().plain_blocks);
        // (and a hello without it: no blocks, nothing else changes)
        assert!(
            !parse_hello(&encode(&hello(PROTOCOL_VERSION)))
                .unwrap()
                .plain_blocks
        );
    }

    #[test]
    fn accepts_matching_version() {
        assert_eq!(parse_hello(&encode(&hello(1))).unwrap(), hello(1));
    }

    #[test]
    fn mismatch_names_both_versions() {
        let err = parse_hello(&encode(&hello(7))).unwrap_err().to_string();
        assert!(err.contains("protocol 7") && err.contains("protocol 1"), "{err}");
    }

    #[test]
    fn mismatch_is_reported_even_when_the_rest_differs() {
        let mut other = std::collections::BTreeMap::new();
        other.insert("cpy2py", 2);
        let err = parse_hello(&encode(&other)).unwrap_err();
        assert!(matches!(err, HostError::VersionMismatch { theirs: 2, ours: 1 }));
    }

    #[test]
    fn a_first_frame_too_large_for_a_hello_is_refused_unread() {
        // a real hello with a megabyte of empty arrays beside it
        let mut big = std::collections::BTreeMap::new();
        big.insert(
            "padding",
            ciborium::Value::Array(vec![ciborium::Value::Array(vec![]); 1 << 20]),
        );
        big.insert("cpy2py", ciborium::Value::Integer(PROTOCOL_VERSION.into()));
        let err = parse_hello(&encode(&big)).unwrap_err().to_string();
        assert!(err.contains("not a cpy2py hello (at most 16384 bytes)"), "{err}");
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        assert!(matches!(parse_hello(b"\xff\x00"), Err(HostError::Protocol(_))));
        assert!(matches!(
            parse_hello(&encode(&"hello")),
            Err(HostError::Protocol(_))
        ));
    }
}
