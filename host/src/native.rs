//! A native twin as the master's kernel uses it: its process (process.rs),
//! its hello, and whole frames moved over its pipes.
//!
//! Every blocking operation is a *step* that ends when a frame is done, a
//! signal arrives or a slice of [`SIGNAL_SLICE`] passes; the pyo3 layer
//! (python/twin.rs) runs each step with the GIL released and lets signal
//! handlers run between steps. Progress survives between steps: a frame
//! half read stays in the `FrameReader`, a frame half written holds the
//! writer lock (`FrameSend`), and a send abandoned half-way marks the stream
//! cut for good (the twin waits for the rest of a frame that never comes).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{HostError, Result};
use crate::pipe::{self, WriterLock};
use crate::process::{describe_status, TwinCommand, TwinProcess};
use crate::protocol::frame::{self, FrameReader, ReadOutcome, HEADER_LEN};
use crate::protocol::handshake::{parse_hello, Hello};
use crate::signals;
use crate::spin::{Moment, ReplySpin};

/// How long a step in the host lasts before its caller lets signal handlers
/// run (Ctrl-C reaches a master blocked in a send or a start within this).
pub const SIGNAL_SLICE: Duration = Duration::from_millis(50);

/// The largest payload of a frame that one pipe write sends whole or not at
/// all (`try_send`; `send_now` sends larger ones only where the pipe has room).
const MAX_SMALL: usize = libc::PIPE_BUF - HEADER_LEN;
/// The largest frame (header included) `FrameSend::at_once` writes: a
/// pipe's default size, the kernel's small frames (`_SMALL_FRAME`)
const AT_ONCE_MAX: usize = 65536;

/// The largest hello a twin may send.
const MAX_HELLO: usize = 1 << 20;

/// How long closing an ended twin waits for the rest of its stderr (held
/// open longer only by a descendant that left the twin's process group).
const STDERR_DRAIN: Duration = Duration::from_millis(500);

/// A twin between its start and its hello.
pub struct Handshake {
    process: TwinProcess,
    reader: FrameReader,
    executable: String,
    timeout: Duration,
    deadline: Instant,
    /// Bytes written to the twin before its hello (`with_preamble`), and how
    /// many of them went out.
    preamble: Vec<u8>,
    preamble_sent: usize,
}

/// How often a start with a preamble still to write looks for room in the
/// pipe while it waits for the hello.
const PREAMBLE_POLL: Duration = Duration::from_millis(5);

impl Handshake {
    /// Starts the twin; its hello is due within `timeout`.
    pub fn spawn(command: TwinCommand, timeout: Duration) -> Result<Handshake> {
        let executable = command.executable.display().to_string();
        let process = TwinProcess::spawn(command)?;
        Ok(Handshake {
            process,
            // the hello only: the link's own reader goes on with the stream
            reader: FrameReader::exact(),
            executable,
            timeout,
            deadline: Instant::now() + timeout,
            preamble: Vec::new(),
            preamble_sent: 0,
        })
    }

    /// Writes `bytes` to the twin while it starts, before its hello (a remote
    /// twin's bootstrap reads the kernel this way: it travels over the link).
    pub fn with_preamble(mut self, bytes: Vec<u8>) -> Handshake {
        self.preamble = bytes;
        self
    }

    /// Writes what the pipe takes now of the preamble; whether some is left.
    /// A twin that is gone shows as the end of its stream, so a failed write
    /// drops the rest.
    fn push_preamble(&mut self) -> bool {
        if self.preamble_sent < self.preamble.len() {
            let fd = self.process.to_twin.as_raw_fd();
            let sent = &mut self.preamble_sent;
            if pipe::write_some(fd, &self.preamble, &[], sent, Duration::ZERO).is_err() {
                self.preamble_sent = self.preamble.len();
            }
        }
        self.preamble_sent < self.preamble.len()
    }

    /// Reads the hello until the deadline or for at most `slice`; `None`
    /// when the slice ended first (the caller lets signal handlers run,
    /// then goes on). Explains a twin that ended or broke the protocol
    /// first, and stops a twin that stays silent past the deadline.
    pub fn step(&mut self, slice: Duration) -> Result<Option<Hello>> {
        let fd = self.process.from_twin.as_raw_fd();
        let slice_end = Instant::now() + slice;
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if Instant::now() >= slice_end && !left.is_zero() {
                return Ok(None);
            }
            if left.is_zero() {
                self.process.kill()?;
                return Err(HostError::Spawn(format!(
                    "{:?} did not answer the cpy2py handshake within {:.0} s; \
                     is it a Python interpreter? (raise handshake_timeout for very slow starts)",
                    self.executable,
                    self.timeout.as_secs_f64()
                )));
            }
            let mut wait = left.min(slice_end.saturating_duration_since(Instant::now()));
            if self.push_preamble() {
                wait = wait.min(PREAMBLE_POLL);
            }
            if pipe::poll_readable(fd, Some(wait))? != Some(true) {
                continue;
            }
            match self.reader.read(&mut &self.process.from_twin, MAX_HELLO) {
                Ok(ReadOutcome::Frame(hello)) => return parse_hello(&hello).map(Some),
                Ok(ReadOutcome::Interrupted) => continue,
                Ok(ReadOutcome::Eof | ReadOutcome::Truncated) => break,
                // (an exact reader leaves no frame to its caller)
                Ok(ReadOutcome::Large { .. }) | Err(HostError::Protocol(_)) => break,
                Err(e) => return Err(e),
            }
        }
        Err(self.ended_before_hello())
    }

    /// Explains a twin that closed its stream instead of answering (and
    /// stops it): how it ended and what it said on stderr.
    fn ended_before_hello(&self) -> HostError {
        let status = match self.process.wait_timeout(Duration::from_secs(2)) {
            Ok(status) => status.map_or_else(|| "closed the protocol stream".to_string(), describe_status),
            Err(e) => return e,
        };
        let stderr = self.process.stderr_tail_when_closed(Duration::from_secs(1));
        let said = if stderr.is_empty() {
            ". ".to_string()
        } else {
            format!("; it said:\n{}\n", lines_cut(&stderr, MAX_SAID_LINE))
        };
        if let Err(e) = self.process.kill() {
            return e;
        }
        HostError::Spawn(format!(
            "{:?} {status} before answering the cpy2py handshake{said}\
             Twinterpreters must be CPython or PyPy >= 3.9 (a wrapper script must end by running one, \
             e.g. with exec): pass the name or path of such an executable",
            self.executable
        ))
    }

    /// Stops the twin (the start was interrupted).
    pub fn kill(&self) -> Result<()> {
        self.process.kill().map(drop)
    }

    /// The twin that answered with `hello`.
    pub fn finish(self, hello: Hello, max_frame: usize) -> NativeTwin {
        tracing::debug!(pid = self.process.pid(), twin_id = %hello.twin_id, version = %hello.version, "twin answered");
        NativeTwin {
            process: self.process,
            hello,
            reader: Mutex::default(),
            writer: WriterLock::default(),
            cut: AtomicBool::new(false),
            max_frame,
            spin: ReplySpin::default(),
        }
    }
}

/// What `read_step_with` did: a step of the reader, or the caller's read of
/// a large frame.
pub enum Step<T> {
    Read(ReadOutcome),
    Large(T),
}

/// A native twin that answered its hello.
pub struct NativeTwin {
    pub process: TwinProcess,
    pub hello: Hello,
    reader: Mutex<FrameReader>,
    writer: WriterLock,
    /// A send was interrupted (Ctrl-C) in the middle of a frame: the stream
    /// is cut, and nothing more can be sent on it.
    cut: AtomicBool,
    max_frame: usize,
    /// how soon replies come, for polling a moment before sleeping (spin.rs)
    spin: ReplySpin,
}

impl NativeTwin {
    /// The descriptor the twin's frames arrive on.
    pub fn read_fd(&self) -> RawFd {
        self.process.from_twin.as_raw_fd()
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, FrameReader> {
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads (the rest of) one frame. A thread that holds its signals waits
    /// first with them let through, and gets `Interrupted` if one came
    /// before the frame (nothing was read); without held signals, a signal
    /// interrupts the read itself. A partial frame is kept for the next step.
    pub fn read_step(&self) -> Result<ReadOutcome> {
        // (a reader that splits large frames is read with `read_step_with`)
        match self.read_step_with(false, |_, _, _| ())? {
            Step::Read(outcome) => Ok(outcome),
            Step::Large(()) => unreachable!("read_step is for readers that do not split large frames"),
        }
    }

    /// `read_step`, and a frame of `split_from` bytes or more (see
    /// `split_large_frames`) read by `large(fd, len, first)` while the reader
    /// lock is still held: nothing else reads the stream meanwhile. `soon`:
    /// the caller alone waits on this twin, for a reply expected soon (it
    /// may poll a moment first, whatever thread it is).
    pub fn read_step_with<T>(
        &self,
        soon: bool,
        large: impl FnOnce(RawFd, usize, Vec<u8>) -> T,
    ) -> Result<Step<T>> {
        let mut reader = self.reader();
        // the descriptor is read under the reader lock: `close` takes it first
        let fd = self.read_fd();
        if fd < 0 {
            return Ok(Step::Read(ReadOutcome::Eof));
        }
        let mut waited = None;
        if !reader.has_input() {
            let unblocked = signals::mask_before_hold();
            // Polled by the main thread, which waits with its signals held
            // (none slips past the poll), and by a caller that is alone on
            // the link (`soon`). Other threads sleep at once: with many
            // calling, one polling there took a CPU from the twin (8 threads
            // calling a pypy3 twin: a fifth fewer calls).
            let moment = if unblocked.is_some() || soon {
                self.spin.poll([fd], None)
            } else {
                Moment::unpolled()
            };
            if moment.ready().is_none() && !pipe::wait_for_frame(fd, unblocked.as_ref())? {
                return Ok(Step::Read(ReadOutcome::Interrupted));
            }
            waited = Some(moment);
        }
        let outcome = reader.read(&mut &self.process.from_twin, self.max_frame)?;
        if let Some(moment) = waited {
            self.spin.waited(&moment); // (without held signals, the read itself waited)
        }
        Ok(match outcome {
            ReadOutcome::Large { len, first } => Step::Large(large(fd, len, first)),
            outcome => Step::Read(outcome),
        })
    }

    /// Leaves frames of `from` bytes or more to `read_step_with`'s caller.
    pub fn split_large_frames(&self, from: usize) {
        self.reader().split_from(from);
    }

    /// Whether bytes of the stream were read ahead and wait in the reader
    /// (the descriptor no longer says so: the kernel routes them before
    /// giving up the reading role).
    pub fn buffered(&self) -> bool {
        self.reader.try_lock().is_ok_and(|reader| reader.has_input())
    }

    /// The error for a stream that ended inside a frame: a twin that died
    /// while writing (a crash, the OOM killer during a large reply) ended,
    /// and says how; one that still runs broke the protocol.
    pub fn truncated(&self) -> HostError {
        match self.process.wait_timeout(Duration::from_millis(500)) {
            Ok(Some(status)) => HostError::Terminated(format!(
                "the twin {} while sending a frame",
                describe_status(status)
            )),
            Ok(None) => HostError::Protocol("the twin's stream ended inside a frame".into()),
            Err(e) => e,
        }
    }

    /// Hands back the body of a frame the caller is done with, for the next
    /// large frame (see [`FrameReader::recycle`]). Never waits: with the
    /// reader lock taken (a thread waiting for a frame), the body is dropped.
    pub fn recycle(&self, body: Vec<u8>) {
        if let Ok(mut reader) = self.reader.try_lock() {
            reader.recycle(body);
        }
    }

    /// How soon this twin's replies come (spin.rs), for waits elsewhere.
    pub fn reply_spin(&self) -> &ReplySpin {
        &self.spin
    }

    /// Waits until a frame can be read (or the stream ended), up to
    /// `timeout` (None: forever); `None` when a signal interrupted the wait.
    pub fn wait_readable_step(
        &self,
        timeout: Option<Duration>,
        unless: Option<RawFd>,
    ) -> Result<Option<bool>> {
        if self.reader().has_input() {
            return Ok(Some(true));
        }
        if self.process.from_twin.is_closed() {
            return Ok(Some(true)); // a read says it ended
        }
        Ok(match unless {
            Some(other) => pipe::poll_readable_unless(self.read_fd(), other, timeout)?,
            None => pipe::poll_readable(self.read_fd(), timeout)?,
        })
    }

    /// Closes the master's ends of the twin's pipes now (the twin is
    /// stopped: its descriptors must not wait for the last reference to
    /// this object). Waits, for at most a second, for a thread inside a
    /// send or a read to leave (they end once the twin is gone); later ones
    /// find the stream ended. A reader kept waiting longer (by a descendant
    /// that left the twin's process group) leaves them to the drop instead.
    pub fn close(&self) {
        // an ended twin's last words reach the master's stderr before its
        // end is reported (TwinMaster.stop() returns after this)
        if matches!(self.process.try_status(), Ok(Some(_))) {
            self.process.stderr_forwarded(STDERR_DRAIN);
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        if !self.writer.acquire_before(deadline) {
            return;
        }
        let reader = loop {
            match self.reader.try_lock() {
                Ok(reader) => break Some(reader),
                Err(std::sync::TryLockError::Poisoned(e)) => break Some(e.into_inner()),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                Err(_) => break None,
            }
        };
        if reader.is_some() {
            self.process.from_twin.close();
            self.process.to_twin.close();
        }
        drop(reader);
        self.writer.release();
    }

    /// Takes the writer role for one frame, the concatenation of `parts`, if
    /// it is free.
    pub fn try_begin_send<'a>(&'a self, parts: &'a [&'a [u8]]) -> Result<Option<FrameSend<'a>>> {
        let header = frame::header(parts.iter().map(|part| part.len()).sum())?;
        Ok(self
            .writer
            .try_acquire()
            .then(|| FrameSend::new(self, header, parts)))
    }

    /// Waits for the writer role for one frame, the concatenation of `parts`.
    pub fn begin_send<'a>(&'a self, parts: &'a [&'a [u8]]) -> Result<FrameSend<'a>> {
        let header = frame::header(parts.iter().map(|part| part.len()).sum())?;
        self.writer.acquire();
        Ok(FrameSend::new(self, header, parts))
    }

    /// `begin_send`, waiting at most `slice` for the writer role (another
    /// thread's send may wait for room for as long as the twin does not
    /// read); None if it is still taken.
    pub fn begin_send_within<'a>(
        &'a self,
        parts: &'a [&'a [u8]],
        slice: Duration,
    ) -> Result<Option<FrameSend<'a>>> {
        let header = frame::header(parts.iter().map(|part| part.len()).sum())?;
        Ok(self
            .writer
            .acquire_before(Instant::now() + slice)
            .then(|| FrameSend::new(self, header, parts)))
    }

    /// Sends one frame only if it goes out at once: no other thread is
    /// sending and the pipe has room (a pipe write of up to `PIPE_BUF` bytes
    /// is all or nothing; a larger frame only if the pipe's free pages hold
    /// it, `pipe::pipe_has_room`). Whether it was sent; it never waits. The
    /// kernel's callers send requests this way while they hold the link's
    /// reading role, so that the reply comes to them: a request that waited
    /// for room while its thread held the role could wait for ever on a
    /// twin that waits to send.
    pub fn send_now(&self, payload: &[u8]) -> Result<bool> {
        let parts = [payload];
        let Some(mut sending) = self.try_begin_send(&parts)? else {
            return Ok(false);
        };
        sending.check_not_cut()?;
        sending.at_once()
    }

    /// Whether a send was interrupted half-way through a frame.
    pub fn cut_mid_frame(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    /// Sends one small frame (at most `PIPE_BUF` bytes with its header) if
    /// it can be written whole before `deadline`, never blocking longer (for
    /// stopping a twin that may have stopped reading while another thread is
    /// blocked in a send); whether it was written.
    pub fn try_send(&self, payload: &[u8], deadline: Instant) -> Result<bool> {
        if payload.len() > MAX_SMALL {
            return Err(HostError::Usage(format!(
                "try_send takes frames of at most {MAX_SMALL} bytes, not {}",
                payload.len()
            )));
        }
        let mut message = frame::header(payload.len())?.to_vec();
        message.extend_from_slice(payload);
        // another thread may be inside a frame, blocked on the full pipe
        if !self.writer.acquire_before(deadline) {
            return Ok(false);
        }
        let written = if self.cut_mid_frame() {
            Ok(false)
        } else {
            pipe::write_small_before(self.process.to_twin.as_raw_fd(), &message, deadline)
        };
        self.writer.release();
        Ok(written?)
    }
}

/// One frame being sent: holds the twin's writer role until dropped.
pub struct FrameSend<'a> {
    twin: &'a NativeTwin,
    header: [u8; HEADER_LEN],
    parts: &'a [&'a [u8]],
    done: usize,
}

impl<'a> FrameSend<'a> {
    fn new(twin: &'a NativeTwin, header: [u8; HEADER_LEN], parts: &'a [&'a [u8]]) -> Self {
        FrameSend {
            twin,
            header,
            parts,
            done: 0,
        }
    }

    /// Fails if an earlier send left the stream cut.
    pub fn check_not_cut(&self) -> Result<()> {
        if self.twin.cut_mid_frame() {
            return Err(HostError::Io(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier message to this twin was interrupted half-sent: its link is cut",
            )));
        }
        Ok(())
    }

    /// Writes the frame, not yet begun, only if it goes out at once: up to
    /// `PIPE_BUF` bytes a pipe takes all or nothing; a larger frame, of up
    /// to `AT_ONCE_MAX`, only if the pipe's free pages hold it
    /// (`pipe::pipe_has_room`). Whether it did; it never waits (callers
    /// keep the GIL for it: larger frames are copied without it).
    pub fn at_once(&mut self) -> Result<bool> {
        let total = HEADER_LEN + self.parts.iter().map(|part| part.len()).sum::<usize>();
        if self.done > 0
            || total > AT_ONCE_MAX
            || (total > libc::PIPE_BUF && !pipe::pipe_has_room(self.twin.process.to_twin.as_raw_fd(), total))
        {
            return Ok(false);
        }
        if self.step(Duration::ZERO)? {
            return Ok(true);
        }
        // nothing went out (all or nothing); a started frame would be finished
        while self.done > 0 && !self.step(SIGNAL_SLICE)? {}
        Ok(self.done > 0)
    }

    /// Writes on for at most `slice`; whether the frame is all written.
    pub fn step(&mut self, slice: Duration) -> Result<bool> {
        let fd = self.twin.process.to_twin.as_raw_fd();
        Ok(pipe::write_some(
            fd,
            &self.header,
            self.parts,
            &mut self.done,
            slice,
        )?)
    }

    /// The send is given up (a signal handler raised): if part of the frame
    /// went out, the stream is cut.
    pub fn abandon(self) {
        if self.done > 0 {
            self.twin.cut.store(true, Ordering::SeqCst);
        }
    }
}

impl Drop for FrameSend<'_> {
    fn drop(&mut self) {
        self.twin.writer.release();
    }
}

/// Characters of each line a twin said before its hello that its start's
/// error shows (not an interpreter, it may echo its whole command line, the
/// bootstrap: one long line).
const MAX_SAID_LINE: usize = 300;

/// `text` with each line cut to `max` characters, saying how many were cut.
fn lines_cut(text: &str, max: usize) -> String {
    text.lines()
        .map(|line| match line.char_indices().nth(max) {
            Some((end, _)) => {
                let left = line[end..].chars().count();
                format!("{}... [{left} more characters]", &line[..end])
            }
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn sh(script: &str) -> TwinCommand {
        TwinCommand {
            executable: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        }
    }

    fn hello_frame(version: u64) -> Vec<u8> {
        let hello = Hello {
            cpy2py: version,
            twin_id: "sh".into(),
            implementation: "sh".into(),
            version: "0".into(),
            executable: "/bin/sh".into(),
            pid: 1,
            plain_blocks: false,
            renditions: false,
        };
        let mut payload = Vec::new();
        ciborium::into_writer(&hello, &mut payload).unwrap();
        let mut out = Vec::new();
        frame::write_frame(&mut out, &payload).unwrap();
        out
    }

    /// A shell "twin" that writes `hello` (as octal escapes for printf) on
    /// fd 4 after `delay`, then runs `then`.
    fn twin_saying(hello: &[u8], delay: &str, then: &str) -> TwinCommand {
        let escaped: String = hello.iter().map(|b| format!("\\{b:03o}")).collect();
        sh(&format!("sleep {delay}; printf '{escaped}' >&4; {then}"))
    }

    /// A twin that says hello and never reads: its pipe fills up.
    fn deaf_twin() -> NativeTwin {
        start(
            twin_saying(&hello_frame(1), "0", "sleep 30"),
            Duration::from_secs(10),
        )
        .unwrap()
    }

    fn start(command: TwinCommand, timeout: Duration) -> Result<NativeTwin> {
        let mut handshake = Handshake::spawn(command, timeout)?;
        loop {
            if let Some(hello) = handshake.step(Duration::from_millis(20))? {
                return Ok(handshake.finish(hello, 1 << 20));
            }
        }
    }

    #[test]
    fn the_handshake_goes_on_across_slices_until_the_hello() {
        let twin = start(
            twin_saying(&hello_frame(1), "0.1", "cat <&3 >&4"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(twin.hello.twin_id, "sh");
        // frames go through `cat` and back
        let parts = [&b"\x83\x01\x02\x03"[..]];
        let mut send = twin.begin_send(&parts).unwrap();
        assert!(send.step(SIGNAL_SLICE).unwrap());
        drop(send);
        assert_eq!(
            twin.read_step().unwrap(),
            ReadOutcome::Frame(b"\x83\x01\x02\x03".to_vec())
        );
        assert!(twin
            .try_send(&[0xf6], Instant::now() + Duration::from_secs(1))
            .unwrap());
        assert_eq!(twin.read_step().unwrap(), ReadOutcome::Frame(vec![0xf6]));
        assert!(
            twin.try_send(&[0; 5000], Instant::now()).is_err(),
            "over PIPE_BUF"
        );
    }

    #[test]
    fn the_preamble_goes_first_and_stdio_can_carry_the_protocol() {
        let escaped: String = hello_frame(1).iter().map(|b| format!("\\{b:03o}")).collect();
        let mut command = sh(&format!(
            "read -r line; [ \"$line\" = kernel ] && printf '{escaped}'; exec cat"
        ));
        command.protocol_on_stdio = true;
        let mut handshake = Handshake::spawn(command, Duration::from_secs(10))
            .unwrap()
            .with_preamble(b"kernel\n".to_vec());
        let hello = loop {
            if let Some(hello) = handshake.step(Duration::from_millis(20)).unwrap() {
                break hello;
            }
        };
        let twin = handshake.finish(hello, 1 << 20);
        let parts = [&b"\x83\x01\x02\x03"[..]];
        let mut send = twin.begin_send(&parts).unwrap();
        assert!(send.step(SIGNAL_SLICE).unwrap());
        drop(send);
        assert_eq!(
            twin.read_step().unwrap(),
            ReadOutcome::Frame(b"\x83\x01\x02\x03".to_vec())
        );
    }

    #[test]
    fn a_twin_that_exits_first_is_explained_with_its_stderr() {
        let err = start(sh("echo 'no such module' >&2; exit 3"), Duration::from_secs(10))
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(matches!(err, HostError::Spawn(_)));
        assert!(
            text.contains("exited with status 3") && text.contains("no such module"),
            "{text}"
        );
    }

    #[test]
    fn a_silent_twin_is_stopped_at_the_deadline() {
        let err = start(sh("sleep 30"), Duration::from_millis(100)).err().unwrap();
        assert!(
            err.to_string().contains("did not answer the cpy2py handshake"),
            "{err}"
        );
    }

    #[test]
    fn another_protocol_version_is_named() {
        let err = start(
            twin_saying(&hello_frame(7), "0", "sleep 30"),
            Duration::from_secs(10),
        )
        .err()
        .unwrap();
        assert!(
            matches!(err, HostError::VersionMismatch { theirs: 7, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn frames_written_with_the_hello_and_together_are_all_read() {
        // one write: the hello and two frames; the hello's reader takes
        // nothing of them, the link's reader takes both in one read and
        // says the second is there (the descriptor no longer does)
        let mut frames = hello_frame(1);
        frame::write_frame(&mut frames, &[1]).unwrap();
        frame::write_frame(&mut frames, &[2, 2]).unwrap();
        let escaped: String = frames.iter().map(|b| format!("\\{b:03o}")).collect();
        let twin = start(
            sh(&format!("printf '{escaped}' >&4; sleep 30")),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(twin.read_step().unwrap(), ReadOutcome::Frame(vec![1]));
        assert!(twin.buffered());
        assert_eq!(
            pipe::poll_readable(twin.read_fd(), Some(Duration::ZERO)).unwrap(),
            Some(false)
        );
        assert_eq!(twin.read_step().unwrap(), ReadOutcome::Frame(vec![2, 2]));
        assert!(!twin.buffered());
        twin.process.kill().unwrap();
    }

    #[test]
    fn a_partial_frame_waits_for_its_rest_and_a_cut_stream_is_explained() {
        // the twin sends the hello, 3 bytes of a frame, then (after a
        // while) the rest, then half a frame and dies
        let twin = start(
            twin_saying(
                &hello_frame(1),
                "0",
                r"printf '\000\000\000' >&4; sleep 0.2; printf '\002\001\002' >&4; printf '\000\000\000\011\001' >&4; exit 5",
            ),
            Duration::from_secs(10),
        )
        .unwrap();
        let mut outcome = twin.read_step().unwrap();
        while outcome == ReadOutcome::Interrupted {
            outcome = twin.read_step().unwrap();
        }
        assert_eq!(outcome, ReadOutcome::Frame(vec![1, 2]));
        assert_eq!(twin.read_step().unwrap(), ReadOutcome::Truncated);
        let err = twin.truncated();
        assert!(matches!(err, HostError::Terminated(_)), "{err:?}");
        assert!(err.to_string().contains("exited with status 5"), "{err}");
    }

    #[test]
    fn a_frame_is_sent_now_only_if_the_pipe_has_room() {
        let twin = deaf_twin();
        assert!(twin.send_now(b"small").unwrap());
        // larger than one all-or-nothing write: sent whole while the pipe's
        // free pages hold it, else not started
        assert!(twin.send_now(&vec![1u8; 3 * libc::PIPE_BUF]).unwrap());
        assert!(
            !twin.send_now(&vec![1u8; 1 << 20]).unwrap(),
            "more than a pipe holds"
        );
        assert!(!twin.cut_mid_frame(), "a frame that did not fit was not started");
        let mut sent = 0;
        while twin.send_now(&[7u8; 1000]).unwrap() {
            sent += 1;
            assert!(sent < 10_000, "a pipe holds less than 10 MB");
        }
        assert!(sent > 10, "the pipe took some frames before it was full");
        assert!(!twin.cut_mid_frame(), "a frame that did not fit was not started");
        // the writer role was given back each time
        assert!(twin.try_begin_send(&[&b"\xf6"[..]]).unwrap().is_some());
    }

    #[test]
    fn an_abandoned_half_sent_frame_cuts_the_stream() {
        let twin = deaf_twin();
        let big = vec![7u8; 1 << 20];
        let parts = [&big[..]];
        let mut send = twin.begin_send(&parts).unwrap();
        assert!(!send.step(Duration::from_millis(20)).unwrap(), "the pipe is full");
        send.abandon();
        assert!(twin.cut_mid_frame());
        let parts = [&b"\xf6"[..]];
        let send = twin.begin_send(&parts).unwrap();
        let err = send.check_not_cut().unwrap_err();
        assert!(err.to_string().contains("half-sent"), "{err}");
        drop(send);
        // a small control frame is not written on a cut stream
        assert!(!twin
            .try_send(&[0xf6], Instant::now() + Duration::from_millis(10))
            .unwrap());
        // the writer role was given back each time
        assert!(twin.try_begin_send(&[&b"\xf6"[..]]).unwrap().is_some());
    }

    #[test]
    fn the_twin_sees_whole_frames_on_fd_3() {
        let twin = start(
            twin_saying(&hello_frame(1), "0", "head -c 9 <&3 >&4"),
            Duration::from_secs(10),
        )
        .unwrap();
        let parts = [&b"hello"[..]];
        let mut send = twin.begin_send(&parts).unwrap();
        assert!(send.step(SIGNAL_SLICE).unwrap());
        drop(send);
        let mut back = Vec::new();
        (&twin.process.from_twin).read_to_end(&mut back).unwrap();
        assert_eq!(back, b"\0\0\0\x05hello");
        let _ = (&twin.process.to_twin).flush();
    }

    #[test]
    fn what_a_twin_said_is_shown_with_long_lines_cut() {
        assert_eq!(lines_cut("short\nline", 5), "short\nline");
        let said = format!("{}\nnext", "é".repeat(12));
        assert_eq!(
            lines_cut(&said, 10),
            format!("{}... [2 more characters]\nnext", "é".repeat(10))
        );
    }
}
