//! `ProcessTwin`: a native twin process as seen from the Python kernel.
//!
//! It spawns the interpreter, checks the hello, and moves whole frames with
//! the GIL released. Which thread reads and who gets which reply is the
//! kernel's business (guest-python/cpy2py/kernel/connection.py).

use std::ffi::OsString;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyBrokenPipeError, PyOSError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict};

use crate::error::HostError;
use crate::process::{describe_status, TwinCommand, TwinProcess};
use crate::protocol::frame::{self, HEADER_LEN};
use crate::protocol::handshake::{parse_hello, Hello};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ProcessTwin>()?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(wait_out_of_host, m)?)?;
    m.add_function(wrap_pyfunction!(kill_all_twins, m)?)?;
    m.add_function(wrap_pyfunction!(hold_signals, m)?)?;
    m.add_function(wrap_pyfunction!(release_signals, m)?)?;
    m.add("PROTOCOL_VERSION", crate::protocol::PROTOCOL_VERSION)?;
    m.add("TWIN_READ_FD", crate::process::TWIN_READ_FD)?;
    m.add("TWIN_WRITE_FD", crate::process::TWIN_WRITE_FD)?;
    Ok(())
}

/// Sends the host's `tracing` output to stderr at `level` (a
/// `tracing_subscriber` filter such as "debug"); called once by the kernel
/// when CPY2PY_DEBUG is set.
#[pyfunction]
fn init_logging(level: &str) -> PyResult<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(format!("cpy2py_host={level}"))
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("bad log level {level:?}: {e}")))?;
    // a second call (another kernel in the same process) keeps the first
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_target(true)
        .try_init();
    Ok(())
}

/// How long a wait in the host lasts before it lets signal handlers run
/// (Ctrl-C reaches a master blocked in a send or a start within this).
const SIGNAL_SLICE: Duration = Duration::from_millis(50);

/// Threads inside a blocking call of the host with the GIL released.
static IN_HOST: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` with the GIL released, counted in [`IN_HOST`] until the thread
/// holds the GIL again.
fn in_host<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    struct Counted;
    impl Drop for Counted {
        fn drop(&mut self) {
            IN_HOST.fetch_sub(1, Ordering::SeqCst);
        }
    }
    IN_HOST.fetch_add(1, Ordering::SeqCst);
    let _counted = Counted;
    py.detach(f)
}

/// Waits up to `timeout` seconds until no thread is inside a blocking call
/// of the host; returns whether none is. The master calls it at exit, once
/// its twins are stopped (which ends every such call): a daemon thread that
/// took the GIL back only after the interpreter began to finalize would be
/// ended by CPython with pthread_exit, which cannot unwind through Rust
/// frames and aborts the process ("FATAL: exception not rethrown").
#[pyfunction]
fn wait_out_of_host(py: Python<'_>, timeout: f64) -> bool {
    let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
    py.detach(|| loop {
        if IN_HOST.load(Ordering::SeqCst) == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    })
}

/// Kills every twin this process started, those still starting included
/// (the master's exit hook, after stopping the twins it knows).
#[pyfunction]
fn kill_all_twins() {
    crate::process::kill_all_groups();
}

fn py_error(py: Python<'_>, class: &str, msg: String) -> PyErr {
    match py.import("cpy2py.errors").and_then(|m| m.getattr(class)) {
        Ok(cls) => match cls.call1((msg.clone(),)) {
            Ok(exc) => PyErr::from_value(exc),
            Err(err) => err,
        },
        Err(_) => PyOSError::new_err(msg),
    }
}

/// The one mapping from host errors to the Python exceptions of cpy2py.errors.
pub fn to_pyerr(py: Python<'_>, err: HostError) -> PyErr {
    let msg = err.to_string();
    match err {
        HostError::Spawn(_) => py_error(py, "TwinStartError", msg),
        HostError::Protocol(_) | HostError::VersionMismatch(_) => py_error(py, "ProtocolError", msg),
        HostError::Terminated(_) => py_error(py, "TwinterpreterTerminated", msg),
        HostError::Timeout(_) => py_error(py, "TwinTimeout", msg),
        HostError::OutOfMemory(_) => py_error(py, "TwinMemoryError", msg),
        HostError::Codec(_) => pyo3::exceptions::PyValueError::new_err(msg),
        HostError::Io(e) => PyErr::from(e),
    }
}

thread_local! {
    /// The signal mask of this thread before `hold_signals`, while it holds them.
    static HELD: std::cell::Cell<Option<libc::sigset_t>> = const { std::cell::Cell::new(None) };
}

/// Blocks every signal in the main thread (where Python runs signal
/// handlers) until `release_signals`: the kernel holds them while the thread
/// holds a link's reading role, so that a handler that raises (Ctrl-C) never
/// interrupts it between reading a frame and delivering it (the frame would be
/// lost to whichever thread waits for it) or leaves the role taken. Waits
/// for frames stay interruptible (see `wait_for_frame`). Elsewhere a no-op.
#[pyfunction]
pub fn hold_signals() {
    // SAFETY: plain system calls on this thread's own signal mask
    unsafe {
        if libc::gettid() != libc::getpid() || HELD.with(|held| held.get().is_some()) {
            return;
        }
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old) == 0 {
            HELD.with(|held| held.set(Some(old)));
        }
    }
}

/// Lets the signals `hold_signals` held through (they are delivered now).
#[pyfunction]
pub fn release_signals() {
    if let Some(old) = HELD.with(|held| held.take()) {
        // SAFETY: restores this thread's mask to what it was
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    }
}

/// Waits until `fd` is readable. While this thread holds its signals, the
/// wait lets them through (`ppoll` with the mask from before) and returns
/// `false` when one arrived: nothing was read, and the caller lets the
/// handler run. Without held signals, returns `true` at once (the read
/// itself waits, and a signal interrupts it).
fn wait_for_frame(fd: i32) -> Result<bool, HostError> {
    let Some(unblocked) = HELD.with(|held| held.get()) else {
        return Ok(true);
    };
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that lives for the call, and a valid signal mask
    let n = unsafe { libc::ppoll(&mut pfd, 1, std::ptr::null(), &unblocked) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(err.into())
        };
    }
    Ok(true)
}

/// Progress on the frame being read; kept across calls so that a signal
/// (Ctrl-C) arriving mid-frame never desynchronizes the stream.
#[derive(Default)]
struct FrameReader {
    head: [u8; HEADER_LEN],
    head_have: usize,
    body: Vec<u8>,
    body_have: usize,
}

enum ReadOutcome {
    Frame(Vec<u8>),
    Eof,
    /// The stream ended inside a frame.
    Truncated,
    Interrupted,
}

impl FrameReader {
    fn in_progress(&self) -> bool {
        self.head_have > 0
    }

    fn read(&mut self, fd: i32, max_frame: usize) -> Result<ReadOutcome, HostError> {
        while self.head_have < HEADER_LEN {
            match read_some(fd, &mut self.head[self.head_have..])? {
                None => return Ok(ReadOutcome::Interrupted),
                Some(0) if self.head_have == 0 => return Ok(ReadOutcome::Eof),
                Some(0) => return Ok(ReadOutcome::Truncated),
                Some(n) => self.head_have += n,
            }
            if self.head_have == HEADER_LEN {
                let len = frame::payload_len(self.head, max_frame)?;
                self.body = vec![0; len];
                self.body_have = 0;
            }
        }
        while self.body_have < self.body.len() {
            match read_some(fd, &mut self.body[self.body_have..])? {
                None => return Ok(ReadOutcome::Interrupted),
                Some(0) => return Ok(ReadOutcome::Truncated),
                Some(n) => self.body_have += n,
            }
        }
        self.head_have = 0;
        Ok(ReadOutcome::Frame(std::mem::take(&mut self.body)))
    }
}

/// One read(2); `None` when a signal interrupted it.
fn read_some(fd: i32, buf: &mut [u8]) -> Result<Option<usize>, HostError> {
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::Interrupted {
        Ok(None)
    } else {
        Err(err.into())
    }
}

/// Waits until `fd` is readable (or hung up); `None` when a signal
/// interrupted the wait.
fn poll_readable(fd: i32, timeout: Option<Duration>) -> Result<Option<bool>, HostError> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(None)
        } else {
            Err(err.into())
        };
    }
    Ok(Some(n > 0))
}

/// The right to write frames to a twin, held by one thread from the first
/// byte of a frame to its last, also while that thread lets the GIL go
/// between slices of a long write (a guard object could not travel there).
#[derive(Default)]
struct WriterLock {
    busy: Mutex<bool>,
    freed: std::sync::Condvar,
}

impl WriterLock {
    fn acquire(&self) {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while *busy {
            busy = self.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        *busy = true;
    }

    /// Takes it if it is free; whether it did.
    fn try_acquire(&self) -> bool {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        !std::mem::replace(&mut *busy, true)
    }

    /// Takes it unless it stays taken until `deadline`; whether it did.
    fn acquire_before(&self, deadline: Instant) -> bool {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while *busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            busy = self
                .freed
                .wait_timeout(busy, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *busy = true;
        true
    }

    fn release(&self) {
        *self.busy.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.freed.notify_one();
    }
}

/// Writes what is left of a frame (`done` bytes of header and payload were
/// written before) to the non-blocking `fd` until it is all written
/// (`true`), or `slice` passed without room in the pipe, or a signal came
/// (`false`: `done` says how far it got, and the caller lets signal handlers
/// run before going on). Room in the pipe is the common case: one `writev`.
fn write_some(fd: i32, header: &[u8], payload: &[u8], done: &mut usize, slice: Duration) -> io::Result<bool> {
    let total = header.len() + payload.len();
    while *done < total {
        let (head_done, body_done) = if *done < header.len() {
            (*done, 0)
        } else {
            (header.len(), *done - header.len())
        };
        let iov = [
            libc::iovec {
                iov_base: header[head_done..].as_ptr() as *mut _,
                iov_len: header.len() - head_done,
            },
            libc::iovec {
                iov_base: payload[body_done..].as_ptr() as *mut _,
                iov_len: payload.len() - body_done,
            },
        ];
        // SAFETY: two iovecs over live slices, for the duration of the call
        let n = unsafe { libc::writev(fd, iov.as_ptr(), 2) };
        if n >= 0 {
            *done += n as usize;
            continue;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => return Ok(false),
            io::ErrorKind::WouldBlock => {}
            _ => return Err(err),
        }
        // the pipe is full: wait for room, for at most a slice
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = slice.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one pollfd that lives for the call
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready <= 0 {
            let err = io::Error::last_os_error();
            if ready < 0 && err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
            return Ok(false); // no room yet, or a signal: a chance for Ctrl-C
        }
    }
    Ok(true)
}

/// Writes `message` (at most `PIPE_BUF` bytes, so all or nothing) to the
/// pipe `fd` unless it stays full until `deadline`; never blocks past it.
fn write_small_before(fd: i32, message: &[u8], deadline: Instant) -> io::Result<bool> {
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Ok(false); // still full at the deadline
        }
        if pfd.revents & (libc::POLLERR | libc::POLLHUP) != 0 && pfd.revents & libc::POLLOUT == 0 {
            return Err(io::Error::from_raw_os_error(libc::EPIPE));
        }
        // poll said there is room; MSG_DONTWAIT does not apply to pipes, so
        // the write is made non-blocking for this one call (this thread
        // holds the writer lock: no other write is under way)
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
        let written = unsafe { libc::write(fd, message.as_ptr().cast(), message.len()) };
        let err = io::Error::last_os_error();
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
        if written >= 0 {
            debug_assert_eq!(
                written as usize,
                message.len(),
                "pipe writes up to PIPE_BUF are atomic"
            );
            return Ok(true);
        }
        match err.kind() {
            io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock if Instant::now() < deadline => continue,
            io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => return Ok(false),
            _ => return Err(err),
        }
    }
}

#[pyclass(module = "cpy2py._host", frozen)]
pub struct ProcessTwin {
    process: TwinProcess,
    hello: Hello,
    reader: Mutex<FrameReader>,
    writer: WriterLock,
    /// A send was interrupted (Ctrl-C) in the middle of a frame: the stream
    /// is cut, and nothing more can be sent on it.
    cut: AtomicBool,
    max_frame: usize,
}

impl ProcessTwin {
    fn read_fd(&self) -> i32 {
        self.process.from_twin.as_raw_fd()
    }

    /// The error for a stream that ended inside a frame: a twin that died
    /// while writing (a crash, the OOM killer during a large reply) ended,
    /// and says how; one that still runs broke the protocol.
    fn truncated(&self, py: Python<'_>) -> PyErr {
        let ended = in_host(py, || self.process.wait_timeout(Duration::from_millis(500)));
        match ended {
            Ok(Some(status)) => to_pyerr(
                py,
                HostError::Terminated(format!(
                    "the twin {} while sending a frame",
                    describe_status(status)
                )),
            ),
            Ok(None) => to_pyerr(
                py,
                HostError::Protocol("the twin's stream ended inside a frame".into()),
            ),
            Err(e) => to_pyerr(py, e),
        }
    }

    /// Reads the hello within `timeout`; explains a twin that ended first.
    /// Reads the hello until `deadline` or for at most `slice`; `None` when
    /// the slice ended first (the caller lets signal handlers run, then goes
    /// on). Explains a twin that ended first.
    fn handshake(
        process: &TwinProcess,
        reader: &mut FrameReader,
        executable: &str,
        timeout: Duration,
        deadline: Instant,
        slice: Duration,
    ) -> Result<Option<Hello>, HostError> {
        let fd = process.from_twin.as_raw_fd();
        let slice_end = Instant::now() + slice;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if Instant::now() >= slice_end && !left.is_zero() {
                return Ok(None);
            }
            if left.is_zero() {
                process.kill()?;
                return Err(HostError::Spawn(format!(
                    "{executable:?} did not answer the cpy2py handshake within {:.0} s; \
                     is it a Python interpreter? (raise handshake_timeout for very slow starts)",
                    timeout.as_secs_f64()
                )));
            }
            let wait = left.min(slice_end.saturating_duration_since(Instant::now()));
            if poll_readable(fd, Some(wait))? != Some(true) {
                continue;
            }
            match reader.read(fd, 1 << 20) {
                Ok(ReadOutcome::Frame(hello)) => return parse_hello(&hello).map(Some),
                Ok(ReadOutcome::Interrupted) => continue,
                Ok(ReadOutcome::Eof | ReadOutcome::Truncated) => break,
                Err(HostError::Protocol(_)) => break,
                Err(e) => return Err(e),
            }
        }
        let status = process
            .wait_timeout(Duration::from_secs(2))?
            .map_or_else(|| "closed the protocol stream".to_string(), describe_status);
        let stderr = process.stderr_tail_when_closed(Duration::from_secs(1));
        let said = if stderr.is_empty() {
            ". ".to_string()
        } else {
            format!("; it said:\n{stderr}\n")
        };
        process.kill()?;
        Err(HostError::Spawn(format!(
            "{executable:?} {status} before answering the cpy2py handshake{said}\
             Twinterpreters must be CPython or PyPy >= 3.9 (a wrapper script must end by running one, \
             e.g. with exec): pass the name or path of such an executable"
        )))
    }
}

#[pymethods]
impl ProcessTwin {
    /// Starts `executable` with `args`, `env` (the complete environment) and
    /// `cwd`, and waits up to `handshake_timeout` seconds for its hello.
    #[staticmethod]
    #[pyo3(signature = (executable, args, env, cwd=None, handshake_timeout=60.0, max_frame=frame::DEFAULT_MAX_FRAME))]
    fn spawn(
        py: Python<'_>,
        executable: PathBuf,
        args: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
        cwd: Option<PathBuf>,
        handshake_timeout: f64,
        max_frame: usize,
    ) -> PyResult<Self> {
        let shown = executable.display().to_string();
        let command = TwinCommand {
            executable,
            args,
            env,
            cwd,
        };
        let timeout = Duration::from_secs_f64(handshake_timeout.max(0.0));
        let process = in_host(py, || TwinProcess::spawn(command)).map_err(|e| to_pyerr(py, e))?;
        let deadline = Instant::now() + timeout;
        let mut reader = FrameReader::default();
        let hello = loop {
            // in slices, so that Ctrl-C during a slow start stops it at once
            let step = in_host(py, || {
                Self::handshake(&process, &mut reader, &shown, timeout, deadline, SIGNAL_SLICE)
            });
            match step.map_err(|e| to_pyerr(py, e))? {
                Some(hello) => break hello,
                None => {
                    if let Err(interrupt) = py.check_signals() {
                        let _ = in_host(py, || process.kill());
                        return Err(interrupt);
                    }
                }
            }
        };
        tracing::debug!(pid = process.pid(), twin_id = %hello.twin_id, version = %hello.version, "twin answered");
        Ok(ProcessTwin {
            process,
            hello,
            reader: Mutex::default(),
            writer: WriterLock::default(),
            cut: AtomicBool::new(false),
            max_frame,
        })
    }

    #[getter]
    fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The twin's hello: twin_id, implementation, version, executable, pid.
    #[getter]
    fn hello<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("twin_id", &self.hello.twin_id)?;
        d.set_item("implementation", &self.hello.implementation)?;
        d.set_item("version", &self.hello.version)?;
        d.set_item("executable", &self.hello.executable)?;
        d.set_item("pid", self.hello.pid)?;
        Ok(d)
    }

    /// Sends one frame. Raises BrokenPipeError when the twin is gone. A
    /// signal handler that raises (Ctrl-C) interrupts a send that cannot go
    /// on (a twin that stopped reading, its pipe full); if part of the frame
    /// was written, the stream is cut and `cut_mid_frame` says so.
    fn send(&self, py: Python<'_>, payload: &Bound<'_, PyBytes>) -> PyResult<()> {
        let data = payload.as_bytes();
        let header = frame::header(data.len()).map_err(|e| to_pyerr(py, e))?;
        if !self.writer.try_acquire() {
            in_host(py, || self.writer.acquire());
        }
        // read under the writer lock: `close` takes it before closing
        let fd = self.process.to_twin.as_raw_fd();
        let sent = (|| {
            if self.cut.load(Ordering::SeqCst) {
                return Err(PyBrokenPipeError::new_err(
                    "an earlier message to this twin was interrupted half-sent: its link is cut",
                ));
            }
            let mut done = 0;
            loop {
                if in_host(py, || write_some(fd, &header, data, &mut done, SIGNAL_SLICE))? {
                    return Ok(());
                }
                if let Err(interrupt) = py.check_signals() {
                    if done > 0 {
                        self.cut.store(true, Ordering::SeqCst);
                    }
                    return Err(interrupt);
                }
            }
        })();
        self.writer.release();
        sent
    }

    /// Whether a send was interrupted half-way through a frame (the link
    /// must then be given up: the twin waits for the rest of it).
    #[getter]
    fn cut_mid_frame(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    /// Sends one small frame (a control message of at most `PIPE_BUF` bytes
    /// with its header) if it can be written within `timeout` seconds, and
    /// never blocks longer: for stopping a twin that may have stopped
    /// reading, with its pipe full and another thread blocked in `send`.
    /// Returns whether the frame was written; it is then written whole (a
    /// write of up to `PIPE_BUF` bytes to a pipe is atomic). Raises
    /// BrokenPipeError when the twin is gone.
    fn try_send(&self, py: Python<'_>, payload: &Bound<'_, PyBytes>, timeout: f64) -> PyResult<bool> {
        let data = payload.as_bytes();
        if data.len() + HEADER_LEN > libc::PIPE_BUF {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "try_send takes frames of at most {} bytes, not {}",
                libc::PIPE_BUF - HEADER_LEN,
                data.len()
            )));
        }
        let mut message = frame::header(data.len()).map_err(|e| to_pyerr(py, e))?.to_vec();
        message.extend_from_slice(data);
        let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
        Ok(in_host(py, || {
            // another thread may be inside a frame, blocked on the full pipe
            if !self.writer.acquire_before(deadline) {
                return Ok(false);
            }
            let fd = self.process.to_twin.as_raw_fd();
            if self.cut.load(Ordering::SeqCst) {
                self.writer.release();
                return Ok(false);
            }
            let written = write_small_before(fd, &message, deadline);
            self.writer.release();
            written
        })?)
    }

    /// Receives one frame; None when the twin closed the stream. Without
    /// held signals, a handler that raises (Ctrl-C) interrupts the wait; with
    /// them (`hold_signals`), a signal that arrives before a frame does makes
    /// it return False, having read nothing, for the caller to let the
    /// handler run. A partial frame is kept for the next call either way.
    fn recv<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        loop {
            let outcome = in_host(py, || {
                let mut reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
                // read under the reader lock: `close` takes it before closing
                let fd = self.read_fd();
                if fd < 0 {
                    return Ok(ReadOutcome::Eof);
                }
                if !reader.in_progress() && !wait_for_frame(fd)? {
                    return Ok(ReadOutcome::Interrupted);
                }
                reader.read(fd, self.max_frame)
            });
            match outcome.map_err(|e| to_pyerr(py, e))? {
                ReadOutcome::Frame(body) => return Ok(PyBytes::new(py, &body).into_any()),
                ReadOutcome::Eof => return Ok(py.None().into_bound(py)),
                ReadOutcome::Truncated => return Err(self.truncated(py)),
                ReadOutcome::Interrupted if HELD.with(|held| held.get().is_some()) => {
                    return Ok(PyBool::new(py, false).to_owned().into_any())
                }
                ReadOutcome::Interrupted => py.check_signals()?,
            }
        }
    }

    /// The descriptor the twin's frames arrive on: readable while there is
    /// more to read (the kernel's servers wait for it with epoll).
    fn fileno(&self) -> i32 {
        self.read_fd()
    }

    /// Waits until a frame can be read (or the stream ended), up to `timeout`
    /// seconds (None: forever). Returns whether it can.
    #[pyo3(signature = (timeout=None))]
    fn wait_readable(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let timeout = timeout.map(|t| Duration::from_secs_f64(t.max(0.0)));
        loop {
            let ready = in_host(py, || {
                if self
                    .reader
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .in_progress()
                {
                    return Ok(Some(true));
                }
                if self.process.from_twin.is_closed() {
                    return Ok(Some(true)); // recv says it ended
                }
                poll_readable(self.read_fd(), timeout)
            });
            match ready.map_err(|e| to_pyerr(py, e))? {
                Some(ready) => return Ok(ready),
                None => py.check_signals()?,
            }
        }
    }

    /// How the twin ended, or None while it runs.
    fn exit_status(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let status = self.process.try_status().map_err(|e| to_pyerr(py, e))?;
        Ok(status.map(describe_status))
    }

    /// Waits up to `timeout` seconds for the twin to end; how it ended, or None.
    fn wait(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<String>> {
        let status = in_host(py, || {
            self.process
                .wait_timeout(Duration::from_secs_f64(timeout.max(0.0)))
        });
        Ok(status.map_err(|e| to_pyerr(py, e))?.map(describe_status))
    }

    /// Kills the twin (SIGKILL) if it still runs; how it ended.
    fn kill(&self, py: Python<'_>) -> PyResult<String> {
        let status = in_host(py, || self.process.kill()).map_err(|e| to_pyerr(py, e))?;
        Ok(describe_status(status))
    }

    /// Closes the master's ends of the twin's pipes now (the twin is stopped:
    /// its descriptors must not wait for the last reference to this object).
    /// Waits for a thread inside `send` or `recv` to leave (they end once the
    /// twin is gone); later ones find the stream ended.
    fn close(&self, py: Python<'_>) {
        // bounded: a reader kept waiting by a descendant that left the twin's
        // process group leaves the descriptors to the handle's drop instead
        let deadline = Instant::now() + Duration::from_secs(1);
        in_host(py, || {
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
        });
    }

    /// The last few KiB the twin wrote to stderr.
    fn stderr_tail(&self) -> String {
        self.process.stderr_tail()
    }
}
