//! Length-prefixed frames: a 4-byte big-endian length, then one CBOR item.

use std::io::{self, Read, Write};

use crate::error::{HostError, Result};

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Largest frame a trusted link accepts unless configured otherwise.
pub const DEFAULT_MAX_FRAME: usize = 1 << 30;

/// The length prefix for a payload of `len` bytes.
pub fn header(len: usize) -> Result<[u8; HEADER_LEN]> {
    u32::try_from(len).map(u32::to_be_bytes).map_err(|_| {
        HostError::Codec(format!(
            "a frame of {len} bytes exceeds the 4 GiB limit of the protocol"
        ))
    })
}

/// Parses a length prefix and checks it against `max`.
pub fn payload_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(HostError::Protocol("received an empty frame".into()));
    }
    if len > max {
        return Err(HostError::Protocol(format!(
            "received a frame of {len} bytes, larger than the limit of {max} bytes"
        )));
    }
    Ok(len)
}

/// Writes one frame.
pub fn write_frame<W: Write>(out: &mut W, payload: &[u8]) -> Result<()> {
    out.write_all(&header(payload.len())?)?;
    out.write_all(payload)?;
    out.flush()?;
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame.
pub fn read_frame<R: Read>(input: &mut R, max: usize) -> Result<Option<Vec<u8>>> {
    let mut head = [0u8; HEADER_LEN];
    let mut have = 0;
    while have < HEADER_LEN {
        match input.read(&mut head[have..]) {
            Ok(0) if have == 0 => return Ok(None),
            Ok(0) => return Err(HostError::Protocol("stream ended inside a frame header".into())),
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = payload_len(head, max)?;
    let mut payload = vec![0u8; len];
    input.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            HostError::Protocol(format!("stream ended inside a frame of {len} bytes"))
        }
        _ => e.into(),
    })?;
    Ok(Some(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"\x83\x01\x02\x03").unwrap();
        write_frame(&mut buf, &[0xf6]).unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0, 4]);
        let mut input = &buf[..];
        assert_eq!(read_frame(&mut input, 100).unwrap().unwrap(), b"\x83\x01\x02\x03");
        assert_eq!(read_frame(&mut input, 100).unwrap().unwrap(), [0xf6]);
        assert!(read_frame(&mut input, 100).unwrap().is_none());
    }

    #[test]
    fn refuses_oversized_frame_before_allocating() {
        let mut input: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        let err = read_frame(&mut input, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("larger than the limit"), "{err}");
    }

    #[test]
    fn truncated_frames_are_protocol_errors() {
        let mut input: &[u8] = &[0, 0];
        assert!(matches!(read_frame(&mut input, 100), Err(HostError::Protocol(_))));
        let mut input: &[u8] = &[0, 0, 0, 5, 1, 2];
        assert!(matches!(read_frame(&mut input, 100), Err(HostError::Protocol(_))));
    }

    #[test]
    fn empty_frame_is_refused() {
        let mut input: &[u8] = &[0, 0, 0, 0];
        assert!(matches!(read_frame(&mut input, 100), Err(HostError::Protocol(_))));
    }
}
