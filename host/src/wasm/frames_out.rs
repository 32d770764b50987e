//! The guest's stdout carries its frames to the master besides its text.
//!
//! A frame is written as `FRAME_MARK`, its length (4 bytes, big-endian) and
//! its bytes; every other write is text, forwarded as before (`output`).
//! CPython writes a `bytes` object straight from its memory (WASI's own
//! `write`), where a `list<u8>` import argument would be copied into a
//! buffer componentize-py 0.25 never frees, and text would be converted
//! twice. The cap is checked at a frame's header, before anything of it is
//! kept; the whole frame then goes through `guest_sends` (the ledger,
//! waiting while the master has too much unread). A guest that writes the
//! mark itself gains nothing: the mark is how it sends.
//!
//! A frame's header comes in one write; its bytes may come in any number of
//! writes after it, and nothing else until it is whole. The whole frame is
//! handed on in `ready`, which every writer waits in before it writes more.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

use super::driver::Shared;
use super::end::GuestEnd;
use super::output::GuestStream;

/// What starts a frame on the guest's stdout (the guest kernel writes it:
/// `FRAME_MARK` in cpy2py/kernel/guest_main.py).
pub const FRAME_MARK: &[u8; 8] = b"\x00\xffcpy2py";
const HEADER: usize = FRAME_MARK.len() + 4;

#[derive(Default)]
struct Incoming {
    /// The frame being written, and how many bytes it still lacks.
    partial: Option<(Vec<u8>, usize)>,
    /// A whole frame, handed on in the next `ready`.
    whole: Option<Vec<u8>>,
    /// Why the link failed (the guest is stopping): every later write traps.
    failed: Option<String>,
}

/// The guest's stdout: its frames for the master and its text.
#[derive(Clone)]
pub struct GuestStdout {
    text: GuestStream,
    shared: Weak<Shared>,
    incoming: Arc<Mutex<Incoming>>,
}

impl GuestStdout {
    pub fn new(text: GuestStream, shared: Weak<Shared>) -> Self {
        GuestStdout {
            text,
            shared,
            incoming: Arc::default(),
        }
    }

    fn incoming(&self) -> MutexGuard<'_, Incoming> {
        self.incoming.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A frame header at the start of `bytes`: the frame's length.
    fn header(bytes: &[u8]) -> Option<usize> {
        let rest = bytes.strip_prefix(FRAME_MARK.as_slice())?;
        let length: [u8; 4] = rest.get(..4)?.try_into().ok()?;
        Some(u32::from_be_bytes(length) as usize)
    }

    fn fail(incoming: &mut Incoming, why: String) -> StreamError {
        incoming.failed = Some(why.clone());
        StreamError::trap(&why)
    }

    /// Checked at a frame's header, before anything of it is kept (the one
    /// check of the cap: `guest_sends` takes frames as they come): a frame
    /// over the cap stops the guest.
    fn within_cap(&self, length: usize) -> Result<(), String> {
        let Some(shared) = self.shared.upgrade() else {
            return Err("the guest is being dropped".to_string());
        };
        let cap = shared.max_frame;
        if length <= cap {
            return Ok(());
        }
        shared.stop(GuestEnd::FrameTooBig { size: length, cap });
        Err(format!(
            "the guest sent a frame of {length} bytes, over the cap of {cap}"
        ))
    }

    /// The guest wrote more in one write than its frame lacked.
    fn overlong(&self, incoming: &mut Incoming) -> StreamError {
        let why = "the guest wrote more bytes than its frame's header announced".to_string();
        if let Some(shared) = self.shared.upgrade() {
            shared.stop(GuestEnd::Trap(why.clone()));
        }
        Self::fail(incoming, why)
    }
}

impl IsTerminal for GuestStdout {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestStdout {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // (the p3 interfaces, which the guest does not import: text only)
        self.text.async_stream()
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestStdout {
    async fn ready(&mut self) {
        let Some(frame) = self.incoming().whole.take() else {
            return;
        };
        let Some(shared) = self.shared.upgrade() else {
            return; // the guest is being dropped
        };
        if let Err(err) = shared.guest_sends(frame).await {
            Self::fail(&mut self.incoming(), err.to_string());
        }
    }
}

impl OutputStream for GuestStdout {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        let mut incoming = self.incoming();
        if let Some(why) = &incoming.failed {
            return Err(StreamError::trap(why));
        }
        // the frame this write goes on with, or the one its header starts
        let (mut frame, lacking, chunk) = match incoming.partial.take() {
            Some((frame, lacking)) => (frame, lacking, &bytes[..]),
            None => {
                let Some(length) = Self::header(&bytes) else {
                    drop(incoming);
                    return self.text.write(bytes);
                };
                if let Err(why) = self.within_cap(length) {
                    return Err(Self::fail(&mut incoming, why));
                }
                // (what a header announces is not taken on trust: the frame grows as it comes)
                (Vec::with_capacity(length.min(1 << 20)), length, &bytes[HEADER..])
            }
        };
        if chunk.len() > lacking {
            return Err(self.overlong(&mut incoming));
        }
        frame.extend_from_slice(chunk);
        match lacking - chunk.len() {
            0 => incoming.whole = Some(frame),
            lacking => incoming.partial = Some((frame, lacking)),
        }
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        let incoming = self.incoming();
        if let Some(why) = &incoming.failed {
            return Err(StreamError::trap(why));
        }
        // a whole frame waits for `ready` (where the master may hold the guest back)
        Ok(if incoming.whole.is_some() { 0 } else { 1 << 20 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wasm::output::{GuestOutput, MemorySink, Which};

    fn stdout_without_guest() -> (GuestStdout, MemorySink) {
        let sink = MemorySink::default();
        let output = GuestOutput::new("box", 1000, Box::new(sink.clone()));
        (GuestStdout::new(output.stream(Which::Stdout), Weak::new()), sink)
    }

    #[test]
    fn a_header_is_the_mark_and_a_whole_length() {
        let mut header = FRAME_MARK.to_vec();
        header.extend_from_slice(&5u32.to_be_bytes());
        assert_eq!(GuestStdout::header(&header), Some(5));
        assert_eq!(GuestStdout::header(&header[..HEADER - 1]), None);
        assert_eq!(GuestStdout::header(b"\x00\xffcpy2p\x00\x00\x00\x00\x05"), None);
    }

    #[test]
    fn writes_without_the_mark_are_text_and_a_frame_without_its_link_is_refused() {
        let (mut stdout, sink) = stdout_without_guest();
        stdout.write(Bytes::from_static(b"plain words\n")).unwrap();
        stdout.write(Bytes::from_static(b"\x00\xffcpy2py")).unwrap(); // (no length: text)
        let mut frame = FRAME_MARK.to_vec();
        frame.extend_from_slice(&1u32.to_be_bytes());
        frame.push(b'x');
        assert!(matches!(stdout.write(frame.into()), Err(StreamError::Trap(_))));
        // and nothing after it is taken
        assert!(stdout.write(Bytes::from_static(b"more\n")).is_err());
        assert!(stdout.check_write().is_err());
        let lines = sink.0.lock().unwrap().clone();
        assert_eq!(lines, vec![(Which::Stdout, "[box] plain words\n".into())]);
    }
}
