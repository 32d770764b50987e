//! Length-prefixed frames: a 4-byte big-endian length, then one CBOR item.
//!
//! [`FrameReader`] is the one frame reader of the host: the master's reads
//! from a native twin (crate::native) go through it, and so do [`read_frame`]
//! (tests, benches, fuzzing). It keeps its progress between calls, so a read
//! that a signal interrupts (EINTR, Ctrl-C) or that finds only part of a
//! frame goes on where it stopped and never desynchronizes the stream. It
//! reads ahead up to [`AHEAD`] bytes, so a small frame (and often the next
//! ones) comes in one `read` with its header; the bytes read ahead are the
//! reader's, so a caller asks [`FrameReader::has_input`] before waiting
//! for the stream. The body of a larger frame is read straight into it.

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

/// Writes one frame (tests and benches; the master writes to a twin's
/// non-blocking pipe with `crate::pipe::write_some`).
pub fn write_frame<W: Write>(out: &mut W, payload: &[u8]) -> Result<()> {
    out.write_all(&header(payload.len())?)?;
    out.write_all(payload)?;
    out.flush()?;
    Ok(())
}

/// What one [`FrameReader::read`] came to.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// A whole frame's payload.
    Frame(Vec<u8>),
    /// The stream ended cleanly, between frames.
    Eof,
    /// The stream ended inside a frame.
    Truncated,
    /// A signal interrupted a read (EINTR); what was read is kept.
    Interrupted,
    /// The header of a frame of at least the reader's `split_from` bytes,
    /// and `first`, the start of its body read with it: the caller reads
    /// the rest (of `len` bytes in all) before the reader is used again.
    Large { len: usize, first: Vec<u8> },
}

/// Largest buffer kept for reuse once its frame is done with (a fresh
/// buffer of a MiB costs hundreds of page faults: more than reading into it).
pub const SPARE_LIMIT: usize = 8 << 20;
/// Smaller frames are read into buffers of their own (cheap at that size),
/// so that they never take the spare a large frame will want.
pub const SPARE_FROM: usize = 64 << 10;

/// Bytes a reader asks for beyond the frame it reads (one `read` brings a
/// small frame whole, with its header, and the frames written after it).
pub const AHEAD: usize = 16 << 10;

/// Progress on the frame being read, kept across calls.
#[derive(Debug, Default)]
pub struct FrameReader {
    head: [u8; HEADER_LEN],
    head_have: usize,
    body: Vec<u8>,
    body_have: usize,
    ahead: Ahead,
    /// reads no byte past the frame (see [`FrameReader::exact`])
    exact: bool,
    /// a body handed back by [`FrameReader::recycle`], for the next large frame
    spare: Vec<u8>,
    /// frames of this many bytes or more are left to the caller
    /// ([`ReadOutcome::Large`]); 0: none
    split_from: usize,
}

/// Bytes read from the stream past the frame being read.
#[derive(Debug, Default)]
struct Ahead {
    /// allocated on first use, and never zeroed again
    buf: Vec<u8>,
    at: usize,
    end: usize,
}

impl Ahead {
    /// Moves what it holds into `out`, as much as fits; how many bytes.
    fn take(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.end - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        n
    }

    /// Once empty: one `read` of up to `size` bytes; `None` when a signal
    /// interrupted it.
    fn fill<R: Read>(&mut self, input: &mut R, size: usize) -> Result<Option<usize>> {
        if self.buf.len() < size {
            self.buf.resize(size, 0);
        }
        let got = read_some(input, &mut self.buf[..size])?;
        self.at = 0;
        self.end = got.unwrap_or(0);
        Ok(got)
    }
}

impl FrameReader {
    /// A reader that never reads past the frame it reads, for a stream
    /// that another reader goes on with (a twin's hello, read before its
    /// link has a reader of its own), or read by a new reader per frame
    /// ([`read_frame`]).
    pub fn exact() -> Self {
        FrameReader {
            exact: true,
            ..FrameReader::default()
        }
    }

    /// Leaves frames of `from` bytes or more to the caller, who reads
    /// them its own way ([`ReadOutcome::Large`]).
    pub fn split_from(&mut self, from: usize) {
        self.split_from = from;
    }

    /// Whether part of a frame was read, or bytes of later ones: a caller
    /// must then read rather than wait for the stream to be readable (what
    /// it holds is no longer in the stream).
    pub fn has_input(&self) -> bool {
        self.head_have > 0 || self.ahead.at < self.ahead.end
    }

    /// Reads from `input` until a frame is whole, the stream ends, or a read
    /// is interrupted. A length over `max` is refused before anything is
    /// allocated. The header and what follows it are read ahead (see
    /// [`AHEAD`]); the rest of a body longer than what came with its header
    /// is read straight into the body.
    pub fn read<R: Read>(&mut self, input: &mut R, max: usize) -> Result<ReadOutcome> {
        while self.head_have < HEADER_LEN {
            let took = self.ahead.take(&mut self.head[self.head_have..]);
            self.head_have += took;
            if took == 0 {
                // exact: the rest of the header only
                let size = if self.exact {
                    HEADER_LEN - self.head_have
                } else {
                    AHEAD
                };
                match self.ahead.fill(input, size)? {
                    None => return Ok(ReadOutcome::Interrupted),
                    Some(0) if self.head_have == 0 => return Ok(ReadOutcome::Eof),
                    Some(0) => return Ok(ReadOutcome::Truncated),
                    Some(_) => continue,
                }
            }
            if self.head_have == HEADER_LEN {
                let len = payload_len(self.head, max)?;
                if self.split_from > 0 && len >= self.split_from && !self.exact {
                    let mut first = vec![0; len.min(self.ahead.end - self.ahead.at)];
                    self.ahead.take(&mut first);
                    self.head_have = 0;
                    return Ok(ReadOutcome::Large { len, first });
                }
                self.body = if len >= SPARE_FROM && self.spare.capacity() >= len {
                    // the bytes of the last frame stay until read over:
                    // only what the buffer never held is zeroed (a memset
                    // of the whole body cost as much as a copy of it)
                    let mut body = std::mem::take(&mut self.spare);
                    body.resize(len, 0);
                    body
                } else {
                    vec![0; len]
                };
                self.body_have = 0;
            }
        }
        self.body_have += self.ahead.take(&mut self.body[self.body_have..]);
        while self.body_have < self.body.len() {
            match read_some(input, &mut self.body[self.body_have..])? {
                None => return Ok(ReadOutcome::Interrupted),
                Some(0) => return Ok(ReadOutcome::Truncated),
                Some(n) => self.body_have += n,
            }
        }
        self.head_have = 0;
        Ok(ReadOutcome::Frame(std::mem::take(&mut self.body)))
    }
}

impl FrameReader {
    /// Takes back the body of a frame that was read and is no longer
    /// needed, to read a later large frame into without allocating (kept
    /// from [`SPARE_FROM`] up to [`SPARE_LIMIT`] bytes).
    pub fn recycle(&mut self, body: Vec<u8>) {
        let fits = (SPARE_FROM..=SPARE_LIMIT).contains(&body.capacity());
        if fits && body.capacity() > self.spare.capacity() {
            self.spare = body;
        }
    }
}

/// One `read`; `None` when a signal interrupted it.
fn read_some<R: Read>(input: &mut R, buf: &mut [u8]) -> Result<Option<usize>> {
    match input.read(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads one whole frame, going on after interrupted reads; `Ok(None)` on a
/// clean end of stream before a frame.
pub fn read_frame<R: Read>(input: &mut R, max: usize) -> Result<Option<Vec<u8>>> {
    let mut reader = FrameReader::exact();
    loop {
        match reader.read(input, max)? {
            ReadOutcome::Frame(payload) => return Ok(Some(payload)),
            ReadOutcome::Eof => return Ok(None),
            ReadOutcome::Interrupted => continue,
            ReadOutcome::Large { .. } => unreachable!("an exact reader leaves no frame to its caller"),
            ReadOutcome::Truncated if reader.body.is_empty() => {
                return Err(HostError::Protocol("stream ended inside a frame header".into()))
            }
            ReadOutcome::Truncated => {
                return Err(HostError::Protocol(format!(
                    "stream ended inside a frame of {} bytes",
                    reader.body.len()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A stream that hands out its bytes in the given chunks, with an EINTR
    /// (or another error) wherever a chunk is `Err`.
    struct Scripted(VecDeque<io::Result<Vec<u8>>>);

    impl Scripted {
        fn new(steps: Vec<io::Result<&[u8]>>) -> Self {
            Scripted(steps.into_iter().map(|s| s.map(<[u8]>::to_vec)).collect())
        }
    }

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.pop_front() {
                None => Ok(0),
                Some(Err(e)) => Err(e),
                Some(Ok(mut chunk)) => {
                    let n = chunk.len().min(buf.len());
                    buf[..n].copy_from_slice(&chunk[..n]);
                    if n < chunk.len() {
                        self.0.push_front(Ok(chunk.split_off(n)));
                    }
                    Ok(n)
                }
            }
        }
    }

    fn eintr() -> io::Result<&'static [u8]> {
        Err(io::Error::from(io::ErrorKind::Interrupted))
    }

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

    #[test]
    fn an_interrupted_read_keeps_what_it_read_and_goes_on() {
        // EINTR in the header and in the body, frames split across reads
        let mut input = Scripted::new(vec![
            Ok(&[0, 0]),
            eintr(),
            Ok(&[0, 3, 7]),
            eintr(),
            Ok(&[8, 9, 0, 0, 0]),
            Ok(&[1, 5]),
        ]);
        let mut reader = FrameReader::default();
        assert_eq!(reader.read(&mut input, 100).unwrap(), ReadOutcome::Interrupted);
        assert!(reader.has_input());
        assert_eq!(reader.read(&mut input, 100).unwrap(), ReadOutcome::Interrupted);
        assert_eq!(
            reader.read(&mut input, 100).unwrap(),
            ReadOutcome::Frame(vec![7, 8, 9])
        );
        assert_eq!(reader.read(&mut input, 100).unwrap(), ReadOutcome::Frame(vec![5]));
        assert!(!reader.has_input());
        assert_eq!(reader.read(&mut input, 100).unwrap(), ReadOutcome::Eof);
    }

    #[test]
    fn read_frame_goes_on_after_interruptions() {
        let mut input = Scripted::new(vec![
            eintr(),
            Ok(&[0, 0, 0]),
            eintr(),
            Ok(&[2, 1]),
            eintr(),
            Ok(&[2]),
        ]);
        assert_eq!(read_frame(&mut input, 100).unwrap().unwrap(), [1, 2]);
        assert!(read_frame(&mut input, 100).unwrap().is_none());
    }

    #[test]
    fn a_stream_ending_inside_a_frame_is_truncated_not_eof() {
        let mut reader = FrameReader::default();
        let mut input = Scripted::new(vec![Ok(&[0, 0, 0])]);
        assert_eq!(reader.read(&mut input, 100).unwrap(), ReadOutcome::Truncated);
        let mut reader = FrameReader::default();
        let mut input = Scripted::new(vec![Ok(&[0, 0, 0, 4, 1])]);
        assert_eq!(reader.read(&mut input, 100).unwrap(), ReadOutcome::Truncated);
        let err = read_frame(&mut Scripted::new(vec![Ok(&[0, 0, 0, 4, 1])]), 100).unwrap_err();
        assert!(err.to_string().contains("inside a frame of 4 bytes"), "{err}");
    }

    #[test]
    fn an_exact_reader_never_reads_past_the_frame() {
        let mut reader = FrameReader::exact();
        let mut input: &[u8] = &[0, 0, 0, 1, 42, 0xde, 0xad];
        assert_eq!(
            reader.read(&mut input, 100).unwrap(),
            ReadOutcome::Frame(vec![42])
        );
        assert_eq!(input, [0xde, 0xad]);
        assert!(!reader.has_input());
    }

    #[test]
    fn frames_read_ahead_come_out_in_order_and_say_they_are_there() {
        let mut stream = Vec::new();
        write_frame(&mut stream, &[1]).unwrap();
        write_frame(&mut stream, &[2, 2]).unwrap();
        stream.extend_from_slice(&[0, 0, 0, 3, 3]); // the start of a third frame
        let mut input = Scripted::new(vec![Ok(&stream), Ok(&[3, 3])]);
        let mut reader = FrameReader::default();
        assert_eq!(reader.read(&mut input, 100).unwrap(), ReadOutcome::Frame(vec![1]));
        assert!(reader.has_input(), "the next frames were read with the first");
        assert_eq!(
            reader.read(&mut input, 100).unwrap(),
            ReadOutcome::Frame(vec![2, 2])
        );
        assert!(reader.has_input());
        assert_eq!(
            reader.read(&mut input, 100).unwrap(),
            ReadOutcome::Frame(vec![3, 3, 3])
        );
        assert!(!reader.has_input());
        assert_eq!(reader.read(&mut input, 100).unwrap(), ReadOutcome::Eof);
    }

    #[test]
    fn a_large_body_is_read_straight_into_the_frame() {
        let body = vec![7u8; 3 * AHEAD];
        let mut stream = Vec::new();
        write_frame(&mut stream, &body).unwrap();
        let mut input: &[u8] = &stream;
        let mut reader = FrameReader::default();
        assert_eq!(
            reader.read(&mut input, usize::MAX).unwrap(),
            ReadOutcome::Frame(body)
        );
        assert!(input.is_empty() && !reader.has_input());
    }

    #[test]
    fn other_errors_are_reported() {
        let mut input = Scripted::new(vec![Err(io::Error::from(io::ErrorKind::ConnectionReset))]);
        assert!(matches!(
            FrameReader::default().read(&mut input, 100),
            Err(HostError::Io(_))
        ));
    }

    fn whole_frame(reader: &mut FrameReader, input: &mut &[u8]) -> Vec<u8> {
        match reader.read(input, 1 << 20).unwrap() {
            ReadOutcome::Frame(body) => body,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn a_splitting_reader_leaves_large_frames_to_its_caller_and_goes_on_after_them() {
        let mut stream = Vec::new();
        write_frame(&mut stream, &[1; 10]).unwrap();
        let large: Vec<u8> = (0..SPARE_FROM + 5000).map(|i| i as u8).collect();
        write_frame(&mut stream, &large).unwrap();
        write_frame(&mut stream, &[2; 20]).unwrap();
        let mut input = &stream[..];
        let mut reader = FrameReader::default();
        reader.split_from(SPARE_FROM);
        assert_eq!(
            whole_frame(&mut reader, &mut input),
            vec![1; 10],
            "a small frame as before"
        );
        let (len, first) = match reader.read(&mut input, 1 << 20).unwrap() {
            ReadOutcome::Large { len, first } => (len, first),
            other => panic!("expected a large frame, got {other:?}"),
        };
        assert_eq!(len, large.len());
        assert!(
            !first.is_empty() && first.len() < len,
            "the body's start, read ahead with the header"
        );
        assert_eq!(&first[..], &large[..first.len()]);
        assert!(!reader.has_input(), "nothing of the frame stays in the reader");
        // the caller reads the rest from the stream itself
        let mut rest = vec![0; len - first.len()];
        input.read_exact(&mut rest).unwrap();
        assert_eq!([first, rest].concat(), large);
        assert_eq!(
            whole_frame(&mut reader, &mut input),
            vec![2; 20],
            "the next frame whole"
        );
    }

    #[test]
    fn a_recycled_body_is_read_into_again_when_the_frame_fits() {
        let mut stream = Vec::new();
        let (large, smaller, larger) = (SPARE_FROM + 1000, SPARE_FROM + 600, SPARE_FROM + 2000);
        write_frame(&mut stream, &vec![7; large]).unwrap();
        write_frame(&mut stream, &[1; 10]).unwrap();
        write_frame(&mut stream, &vec![8; smaller]).unwrap();
        write_frame(&mut stream, &vec![9; larger]).unwrap();
        let mut input = &stream[..];
        let mut reader = FrameReader::default();
        let first = whole_frame(&mut reader, &mut input);
        let kept = first.as_ptr();
        reader.recycle(first);
        let small = whole_frame(&mut reader, &mut input);
        assert_ne!(small.as_ptr(), kept, "a small frame leaves the spare alone");
        reader.recycle(small);
        let second = whole_frame(&mut reader, &mut input);
        assert_eq!(second, vec![8; smaller], "the smaller frame, whole and only it");
        assert_eq!(second.as_ptr(), kept, "read into the recycled buffer");
        reader.recycle(second);
        let third = whole_frame(&mut reader, &mut input);
        assert_eq!(third, vec![9; larger], "a larger frame gets a buffer of its own");
    }

    #[test]
    fn buffers_over_the_spare_limit_are_not_kept() {
        let mut reader = FrameReader::default();
        reader.recycle(Vec::with_capacity(SPARE_LIMIT + 1));
        assert_eq!(reader.spare.capacity(), 0);
        reader.recycle(Vec::with_capacity(SPARE_FROM - 1));
        assert_eq!(reader.spare.capacity(), 0);
        reader.recycle(Vec::with_capacity(SPARE_FROM));
        assert!(reader.spare.capacity() >= SPARE_FROM);
    }
}
