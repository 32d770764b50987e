//! `ProcessTwin`: a native twin process as seen from the Python kernel.
//!
//! It spawns the interpreter, checks the hello, and moves whole frames with
//! the GIL released. Which thread reads and who gets which reply is the
//! kernel's business (guest-python/cpy2py/kernel/connection.py).

use std::ffi::OsString;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::error::HostError;
use crate::process::{describe_status, TwinCommand, TwinProcess};
use crate::protocol::frame::{self, HEADER_LEN};
use crate::protocol::handshake::{parse_hello, Hello};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ProcessTwin>()?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(wait_out_of_host, m)?)?;
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

fn write_all(fd: i32, header: &[u8], payload: &[u8]) -> io::Result<()> {
    let (mut head_done, mut body_done) = (0usize, 0usize);
    while head_done < header.len() || body_done < payload.len() {
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
        let n = unsafe { libc::writev(fd, iov.as_ptr(), 2) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue; // never abandon a frame half-written
            }
            return Err(err);
        }
        let mut n = n as usize;
        let from_head = n.min(header.len() - head_done);
        head_done += from_head;
        n -= from_head;
        body_done += n;
    }
    Ok(())
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
    writer: Mutex<()>,
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
    fn handshake(process: &TwinProcess, executable: &str, timeout: Duration) -> Result<Hello, HostError> {
        let deadline = Instant::now() + timeout;
        let mut reader = FrameReader::default();
        let fd = process.from_twin.as_raw_fd();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                process.kill()?;
                return Err(HostError::Spawn(format!(
                    "{executable:?} did not answer the cpy2py handshake within {:.0} s; \
                     is it a Python interpreter? (raise handshake_timeout for very slow starts)",
                    timeout.as_secs_f64()
                )));
            }
            if poll_readable(fd, Some(left))? != Some(true) {
                continue;
            }
            match reader.read(fd, 1 << 20) {
                Ok(ReadOutcome::Frame(hello)) => return parse_hello(&hello),
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
            String::new()
        } else {
            format!("; it said:\n{stderr}\n")
        };
        process.kill()?;
        Err(HostError::Spawn(format!(
            "{executable:?} {status} before answering the cpy2py handshake{said}\
             Twinterpreters must be CPython or PyPy >= 3.9: pass the name or path of such an executable"
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
        let started = in_host(py, || {
            let process = TwinProcess::spawn(command)?;
            let hello = Self::handshake(
                &process,
                &shown,
                Duration::from_secs_f64(handshake_timeout.max(0.0)),
            )?;
            Ok::<_, HostError>((process, hello))
        });
        let (process, hello) = started.map_err(|e| to_pyerr(py, e))?;
        tracing::debug!(pid = process.pid(), twin_id = %hello.twin_id, version = %hello.version, "twin answered");
        Ok(ProcessTwin {
            process,
            hello,
            reader: Mutex::default(),
            writer: Mutex::default(),
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

    /// Sends one frame. Raises BrokenPipeError when the twin is gone.
    fn send(&self, py: Python<'_>, payload: &Bound<'_, PyBytes>) -> PyResult<()> {
        let data = payload.as_bytes();
        let header = frame::header(data.len()).map_err(|e| to_pyerr(py, e))?;
        let fd = self.process.to_twin.as_raw_fd();
        in_host(py, || {
            let _guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            write_all(fd, &header, data)
        })?;
        Ok(())
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
        let fd = self.process.to_twin.as_raw_fd();
        let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
        Ok(in_host(py, || {
            // another thread may be inside a frame, blocked on the full pipe
            let _guard = loop {
                match self.writer.try_lock() {
                    Ok(guard) => break guard,
                    Err(std::sync::TryLockError::Poisoned(e)) => break e.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) if Instant::now() >= deadline => {
                        return Ok(false)
                    }
                    Err(std::sync::TryLockError::WouldBlock) => std::thread::sleep(Duration::from_millis(1)),
                }
            };
            write_small_before(fd, &message, deadline)
        })?)
    }

    /// Receives one frame; None when the twin closed the stream. A signal
    /// handler that raises (Ctrl-C) interrupts the wait; the partial frame is
    /// kept for the next call.
    fn recv<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        loop {
            let outcome = in_host(py, || {
                let mut reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
                reader.read(self.read_fd(), self.max_frame)
            });
            match outcome.map_err(|e| to_pyerr(py, e))? {
                ReadOutcome::Frame(body) => return Ok(Some(PyBytes::new(py, &body))),
                ReadOutcome::Eof => return Ok(None),
                ReadOutcome::Truncated => return Err(self.truncated(py)),
                ReadOutcome::Interrupted => py.check_signals()?,
            }
        }
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

    /// The last few KiB the twin wrote to stderr.
    fn stderr_tail(&self) -> String {
        self.process.stderr_tail()
    }
}
