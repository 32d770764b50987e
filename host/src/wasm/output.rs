//! A guest's stdout and stderr: forwarded to the master's, each line marked
//! with the twin id, up to a byte cap per guest.
//!
//! The guest writes through WASI output streams implemented here; its
//! frames for the master, which go out on its stdout too, are taken out
//! first (frames_out.rs) and never reach this. Lines are
//! buffered until complete (or until the guest waits for the master, or ends)
//! so the prefix always starts a line. The cap counts what the master
//! writes (each line with its mark, controls escaped), so output of empty
//! lines or control bytes cannot make the master write more than the cap;
//! past it, one notice is written and the rest is dropped. The end of the
//! guest's stderr is kept to explain a guest that fails to start.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// How much of a guest's stderr is kept for error messages.
const TAIL_BYTES: usize = 8 * 1024;
/// A line longer than this is written out in pieces.
const MAX_PARTIAL_LINE: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Stdout = 0,
    Stderr = 1,
}

/// Where forwarded lines go: the master's stdout/stderr, or (in tests) memory.
pub trait Sink: Send {
    fn write_line(&mut self, which: Which, line: &[u8]);
}

/// The master process's own stdout and stderr.
pub struct ProcessSink;

impl Sink for ProcessSink {
    fn write_line(&mut self, which: Which, line: &[u8]) {
        // errors writing to our own stdout/stderr (closed pipe) are not the
        // guest's business: its output is then lost, as the master's would be
        let _ = match which {
            Which::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(line).and_then(|_| out.flush())
            }
            Which::Stderr => io::stderr().lock().write_all(line),
        };
    }
}

/// Appends `text` with its terminal controls written out as `\xHH`: a
/// carriage return, a backspace or an escape sequence (7-bit, or the C1
/// controls of UTF-8) could otherwise move the cursor back over the line's
/// prefix, and a guest's line pass for the master's. Tabs stay (the
/// kernel writes a guest's exception texts out alike: sandbox.py, written_out).
/// Bytes that are not UTF-8 are written out too: a terminal in an 8-bit
/// encoding takes 0x80..0x9F alone for C1 controls (CSI is 0x9B). So are
/// the line and paragraph separators (as `\uHHHH`), which log readers and
/// `str.splitlines` take for line ends (a line of the guest's without its
/// prefix), and the bidirectional controls, which reorder what a line shows.
fn escape_controls(text: &[u8], out: &mut Vec<u8>) {
    for chunk in text.utf8_chunks() {
        for ch in chunk.valid().chars() {
            let code = u32::from(ch);
            if (code < 0x20 && ch != '\t') || (0x7F..=0x9F).contains(&code) {
                out.extend_from_slice(format!("\\x{code:02x}").as_bytes());
            } else if matches!(code, 0x061C | 0x200E | 0x200F | 0x2028..=0x202E | 0x2066..=0x2069) {
                out.extend_from_slice(format!("\\u{code:04x}").as_bytes());
            } else {
                out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
            }
        }
        for byte in chunk.invalid() {
            out.extend_from_slice(format!("\\x{byte:02x}").as_bytes());
        }
    }
}

struct State {
    prefix: Vec<u8>,
    cap: usize,
    written: usize,
    notice_given: bool,
    partial: [Vec<u8>; 2],
    stderr_tail: VecDeque<u8>,
    sink: Box<dyn Sink>,
}

impl State {
    /// Writes one line of the guest's (marked, controls escaped) if it fits
    /// in the cap; else the notice, once, and false.
    fn emit(&mut self, which: Which, text: &[u8]) -> bool {
        if self.notice_given {
            return false;
        }
        let text = text.strip_suffix(b"\n").unwrap_or(text);
        let mut line = Vec::with_capacity(self.prefix.len() + text.len() + 1);
        line.extend_from_slice(&self.prefix);
        escape_controls(text, &mut line);
        line.push(b'\n');
        if line.len() > self.cap.saturating_sub(self.written) {
            self.notice_given = true;
            self.partial = [Vec::new(), Vec::new()];
            let cap = self.cap;
            let mut notice = self.prefix.clone();
            notice.extend_from_slice(
                format!(
                    "cpy2py: this guest wrote more than its output limit of {cap} bytes; \
                     the rest of its output is dropped\n"
                )
                .as_bytes(),
            );
            self.sink.write_line(Which::Stderr, &notice);
            return false;
        }
        self.written += line.len();
        self.sink.write_line(which, &line);
        true
    }

    fn write(&mut self, which: Which, data: &[u8]) {
        if which == Which::Stderr {
            self.stderr_tail.extend(data);
            let excess = self.stderr_tail.len().saturating_sub(TAIL_BYTES);
            self.stderr_tail.drain(..excess);
        }
        let mut rest = data;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            if self.notice_given {
                return; // past the cap: the rest is dropped
            }
            let mut line = std::mem::take(&mut self.partial[which as usize]);
            line.extend_from_slice(&rest[..=end]);
            self.emit(which, &line);
            rest = &rest[end + 1..];
        }
        if self.notice_given {
            return;
        }
        self.partial[which as usize].extend_from_slice(rest);
        if self.partial[which as usize].len() >= MAX_PARTIAL_LINE {
            self.flush(which);
        }
    }

    fn flush(&mut self, which: Which) {
        let line = std::mem::take(&mut self.partial[which as usize]);
        if !line.is_empty() {
            self.emit(which, &line);
        }
    }

    fn flush_all(&mut self) {
        self.flush(Which::Stdout);
        self.flush(Which::Stderr);
    }
}

/// The output of one guest, shared by its two streams.
#[derive(Clone)]
pub struct GuestOutput {
    state: Arc<Mutex<State>>,
}

impl GuestOutput {
    /// Output marked with `[twin_id] `, at most `cap` bytes of it, to `sink`.
    pub fn new(twin_id: &str, cap: usize, sink: Box<dyn Sink>) -> Self {
        GuestOutput {
            state: Arc::new(Mutex::new(State {
                prefix: format!("[{twin_id}] ").into_bytes(),
                cap,
                written: 0,
                notice_given: false,
                partial: [Vec::new(), Vec::new()],
                stderr_tail: VecDeque::new(),
                sink,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn write(&self, which: Which, data: &[u8]) {
        self.lock().write(which, data);
    }

    /// Writes out unfinished lines (the guest waits for the master, or ended).
    pub fn flush(&self) {
        self.lock().flush_all();
    }

    /// The last few KiB the guest wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        let state = self.lock();
        let bytes: Vec<u8> = state.stderr_tail.iter().copied().collect();
        String::from_utf8_lossy(&bytes).trim_end().to_string()
    }

    /// The WASI stream for the guest's stdout or stderr.
    pub fn stream(&self, which: Which) -> GuestStream {
        GuestStream {
            output: self.clone(),
            which,
        }
    }
}

/// One of the guest's two output streams.
#[derive(Clone)]
pub struct GuestStream {
    output: GuestOutput,
    which: Which,
}

impl IsTerminal for GuestStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestStream {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.output.write(self.which, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // always ready: past the cap, writes are accepted and dropped
        Ok(MAX_PARTIAL_LINE)
    }
}

impl tokio::io::AsyncWrite for GuestStream {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.output.write(self.which, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Collects forwarded lines in memory (for tests and embedders).
#[derive(Clone, Default)]
pub struct MemorySink(pub Arc<Mutex<Vec<(Which, String)>>>);

impl Sink for MemorySink {
    fn write_line(&mut self, which: Which, line: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((which, String::from_utf8_lossy(line).into_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(cap: usize) -> (GuestOutput, MemorySink) {
        let sink = MemorySink::default();
        (GuestOutput::new("box", cap, Box::new(sink.clone())), sink)
    }

    #[test]
    fn lines_are_prefixed_and_partial_lines_wait() {
        let (out, sink) = output(1000);
        out.write(Which::Stdout, b"hello\nwor");
        out.write(Which::Stderr, b"oops\n");
        out.write(Which::Stdout, b"ld\n");
        out.write(Which::Stdout, b"no newline");
        out.flush();
        let lines = sink.0.lock().unwrap().clone();
        assert_eq!(
            lines,
            vec![
                (Which::Stdout, "[box] hello\n".into()),
                (Which::Stderr, "[box] oops\n".into()),
                (Which::Stdout, "[box] world\n".into()),
                (Which::Stdout, "[box] no newline\n".into()),
            ]
        );
        assert_eq!(out.stderr_tail(), "oops");
    }

    #[test]
    fn output_beyond_the_cap_is_dropped_with_one_notice() {
        // the cap counts what is written: "[box] 12345\n" and "[box] 6789\n" fit in 30
        let (out, sink) = output(30);
        out.write(Which::Stdout, b"12345\n");
        out.write(Which::Stdout, b"6789\nabcdef\n");
        out.write(Which::Stdout, b"more and more\n");
        out.write(Which::Stderr, b"and a partial line");
        out.flush();
        let lines = sink.0.lock().unwrap().clone();
        assert_eq!(lines[0], (Which::Stdout, "[box] 12345\n".into()));
        assert_eq!(lines[1], (Which::Stdout, "[box] 6789\n".into()));
        assert!(lines[2].1.contains("output limit of 30 bytes"), "{lines:?}");
        assert_eq!(lines.len(), 3, "{lines:?}");
    }

    #[test]
    fn empty_lines_and_controls_cannot_make_the_master_write_more_than_the_cap() {
        for flood in [vec![b'\n'; 100_000], [b'\x1b', b'\n'].repeat(50_000)] {
            let (out, sink) = output(1000);
            out.write(Which::Stderr, &flood);
            out.flush();
            let lines = sink.0.lock().unwrap().clone();
            let (notice, forwarded) = lines.split_last().expect("lines");
            assert!(notice.1.contains("output limit of 1000 bytes"), "{notice:?}");
            let written: usize = forwarded.iter().map(|(_, line)| line.len()).sum();
            assert!(written <= 1000, "{written} bytes written for a cap of 1000");
        }
    }

    #[test]
    fn terminal_controls_cannot_move_over_the_prefix() {
        let (out, sink) = output(1000);
        out.write(Which::Stdout, "a\rb\x1b[2K\tc\u{9b}2K\u{e9}\x7f\n".as_bytes());
        let lines = sink.0.lock().unwrap().clone();
        assert_eq!(
            lines,
            vec![(
                Which::Stdout,
                "[box] a\\x0db\\x1b[2K\tc\\x9b2K\u{e9}\\x7f\n".into()
            )]
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_are_written_out() {
        // a raw CSI (C1 on an 8-bit terminal), an encoded surrogate, and
        // UTF-8 text around them, which stays
        let (out, sink) = output(1000);
        out.write(Which::Stdout, b"A\x9b2J|\xed\xa0\x80|\xe4\xb8\xad\xc3\xa9\n");
        let lines = sink.0.lock().unwrap().clone();
        assert_eq!(
            lines,
            vec![(
                Which::Stdout,
                "[box] A\\x9b2J|\\xed\\xa0\\x80|\u{4e2d}\u{e9}\n".into()
            )]
        );
    }

    #[test]
    fn line_separators_and_bidirectional_controls_are_written_out() {
        // a line end to str.splitlines, and a right-to-left override
        let (out, sink) = output(1000);
        out.write(
            Which::Stdout,
            "a\u{2028}[master] ok\u{202e}kO\u{2066}|\n".as_bytes(),
        );
        let lines = sink.0.lock().unwrap().clone();
        assert_eq!(
            lines,
            vec![(
                Which::Stdout,
                "[box] a\\u2028[master] ok\\u202ekO\\u2066|\n".into()
            )]
        );
    }

    #[test]
    fn stderr_tail_is_bounded() {
        let (out, _sink) = output(usize::MAX);
        for _ in 0..1000 {
            out.write(Which::Stderr, b"0123456789abcdef\n");
        }
        assert!(out.stderr_tail().len() <= TAIL_BYTES);
    }
}
