//! The first fields of a message, read without decoding the frame.
//!
//! Every message is a CBOR array `[kind, id, chain, ...]` (docs/protocol.md);
//! the handshake frames are maps. The host reads the kind, the request or
//! reply id and the chain of each frame a sandboxed guest sends or takes, to
//! know which calls are open (crate::wasm::ledger). It allocates nothing and
//! reads at most the first three items; the full frame is decoded (and
//! refused if it is malformed) by the master.

/// Message kinds (the first element of a message).
pub const REQUEST: u64 = 0;
pub const REPLY: u64 = 1;
pub const RAISE: u64 = 2;
pub const RELEASE: u64 = 3;
pub const SHUTDOWN: u64 = 4;

/// The leading fields of a message. A field is `None` when the array ends
/// before it or when it (or a field before it) is not an unsigned integer:
/// a negative number, a big integer (tag 2), a float or anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Option<u64>,
    pub id: Option<u64>,
    pub chain: Option<u64>,
}

/// Whether a frame sent to a guest is one it acts on at once (a request, or
/// an answer to one of its own), which the sender then runs it for; others
/// (releases) wait for the next thread that runs it.
pub fn carried_out(frame: &[u8]) -> bool {
    matches!(
        peek_header(frame).and_then(|h| h.kind),
        Some(REQUEST | REPLY | RAISE)
    )
}

/// The header of a message frame, or `None` when the frame is not a CBOR
/// array (a handshake map, or bytes the master's decoder will refuse).
///
/// Any head width is accepted for the array and the integers, as the
/// decoders accept non-minimal heads and indefinite-length arrays, so a
/// frame cannot mean one thing here and another to the master.
pub fn peek_header(frame: &[u8]) -> Option<Header> {
    let (&first, _) = frame.split_first()?;
    if first >> 5 != 4 {
        return None; // not an array
    }
    let (count, mut pos) = match first & 0x1f {
        31 => (u64::MAX, 1), // indefinite length: items until a break
        _ => {
            let (len, used) = argument(frame)?;
            (len, used)
        }
    };
    let mut fields = [None; 3];
    for (index, field) in fields.iter_mut().enumerate() {
        if index as u64 >= count || frame.get(pos).is_none_or(|&b| b == 0xff) {
            break; // the array ended (a break ends an indefinite one)
        }
        match frame[pos] >> 5 {
            0 => {
                let (value, used) = argument(&frame[pos..])?;
                *field = Some(value);
                pos += used;
            }
            _ => break, // not an unsigned integer: neither it nor what follows is read
        }
    }
    Some(Header {
        kind: fields[0],
        id: fields[1],
        chain: fields[2],
    })
}

/// The argument of the head at the start of `bytes` (a length or an unsigned
/// value) and the head's size; None for a truncated head, reserved
/// additional information (28-30) or an indefinite length.
pub(crate) fn argument(bytes: &[u8]) -> Option<(u64, usize)> {
    let info = bytes.first()? & 0x1f;
    let width = match info {
        0..=23 => return Some((u64::from(info), 1)),
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        _ => return None,
    };
    let raw = bytes.get(1..1 + width)?;
    let value = raw.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    Some((value, 1 + width))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciborium::value::Value;

    fn cbor(value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(value, &mut out).unwrap();
        out
    }

    fn int(n: u64) -> Value {
        Value::Integer(n.into())
    }

    fn header(kind: Option<u64>, id: Option<u64>, chain: Option<u64>) -> Option<Header> {
        Some(Header { kind, id, chain })
    }

    #[test]
    fn reads_the_fields_of_each_message_kind() {
        let chain = (4_000_000u64 << 24) | 5;
        let request = cbor(&Value::Array(vec![
            int(REQUEST),
            int(7),
            int(chain),
            int(0),
            Value::Text("callable".into()),
        ]));
        assert_eq!(peek_header(&request), header(Some(0), Some(7), Some(chain)));
        let reply = cbor(&Value::Array(vec![int(REPLY), int(u64::MAX), Value::Null]));
        assert_eq!(peek_header(&reply), header(Some(1), Some(u64::MAX), None));
        let raise = cbor(&Value::Array(vec![int(RAISE), int(300), int(70_000)]));
        assert_eq!(peek_header(&raise), header(Some(2), Some(300), Some(70_000)));
        let release = cbor(&Value::Array(vec![int(RELEASE), Value::Array(vec![])]));
        assert_eq!(peek_header(&release), header(Some(3), None, None));
        let shutdown = cbor(&Value::Array(vec![int(SHUTDOWN), int(1)]));
        assert_eq!(peek_header(&shutdown), header(Some(4), Some(1), None));
    }

    #[test]
    fn handshake_maps_and_other_items_are_not_messages() {
        let hello = cbor(&Value::Map(vec![(
            Value::Text("ready".into()),
            Value::Bool(true),
        )]));
        assert_eq!(peek_header(&hello), None);
        assert_eq!(peek_header(&[]), None);
        assert_eq!(peek_header(&[0x00]), None);
        // a tuple (tag 40001) around an array is not a message either
        assert_eq!(peek_header(&[0xd9, 0x9c, 0x41, 0x81, 0x00]), None);
    }

    #[test]
    fn non_minimal_heads_and_indefinite_arrays_read_as_the_decoders_read_them() {
        // [0, 5, 9] with a 1-byte array length, a 2-byte kind, an 8-byte id, a 4-byte chain
        let frame = [
            0x98, 3, 0x19, 0, 0, 0x1b, 0, 0, 0, 0, 0, 0, 0, 5, 0x1a, 0, 0, 0, 9,
        ];
        assert_eq!(peek_header(&frame), header(Some(0), Some(5), Some(9)));
        // indefinite length, ended by a break after two items
        assert_eq!(
            peek_header(&[0x9f, 0x01, 0x02, 0xff]),
            header(Some(1), Some(2), None)
        );
        assert_eq!(peek_header(&[0x9f, 0xff]), header(None, None, None));
    }

    #[test]
    fn fields_that_are_not_unsigned_integers_are_none_and_end_the_peek() {
        // a negative chain, a bignum id, a text kind
        assert_eq!(
            peek_header(&[0x83, 0x00, 0x01, 0x20]),
            header(Some(0), Some(1), None)
        );
        assert_eq!(
            peek_header(&[0x83, 0x00, 0xc2, 0x41, 0x01, 0x03]),
            header(Some(0), None, None)
        );
        assert_eq!(
            peek_header(&[0x83, 0x61, 0x30, 0x01, 0x02]),
            header(None, None, None)
        );
        // the array's length is respected: no field is read past it
        assert_eq!(
            peek_header(&[0x82, 0x00, 0x01, 0x02]),
            header(Some(0), Some(1), None)
        );
        assert_eq!(peek_header(&[0x80]), header(None, None, None));
    }

    #[test]
    fn truncated_and_reserved_heads_stop_the_peek_without_panicking() {
        assert_eq!(peek_header(&[0x98]), None); // the array length is cut off
        assert_eq!(peek_header(&[0x9c, 0x00]), None); // reserved additional information
        assert_eq!(peek_header(&[0x83, 0x00, 0x1b, 0x01]), None); // the id is cut off
        assert_eq!(peek_header(&[0x83, 0x00]), header(Some(0), None, None));
        assert_eq!(peek_header(&[0x83, 0x00, 0x1f]), None); // indefinite "integer"
                                                            // every prefix of a valid message peeks without a panic
        let frame = [0x84, 0x00, 0x1a, 0, 1, 0, 0, 0x1b, 1, 2, 3, 4, 5, 6, 7, 8, 0x00];
        for end in 0..=frame.len() {
            let _ = peek_header(&frame[..end]);
        }
    }
}
