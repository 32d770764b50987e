//! `NativeTwin`: a native twin process as seen from the Python kernel, a
//! thin wrapper of `crate::native::NativeTwin`. Each blocking step runs with
//! the GIL released; between steps, signal handlers run (Ctrl-C).
//!
//! Which thread reads and who gets which reply is the kernel's business
//! (guest-python/cpy2py/kernel/connection.py).

use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::time::Instant;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyTuple};

use super::host_calls::{in_host, seconds, wait_out_of_host};
use super::received::{read_native_frame, Frame};
use crate::error::HostError;
use crate::native::{self, Handshake, Step, SIGNAL_SLICE};
use crate::process::{describe_status, TwinCommand};
use crate::protocol::frame::{self, ReadOutcome};
use crate::protocol::handshake::Hello;
use crate::protocol::rendition;
use crate::signals;
use crate::spin::Moment;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeTwin>()?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(wait_out_of_host, m)?)?;
    m.add_function(wrap_pyfunction!(kill_all_twins, m)?)?;
    m.add_function(wrap_pyfunction!(hold_signals, m)?)?;
    m.add_function(wrap_pyfunction!(release_signals, m)?)?;
    m.add_function(wrap_pyfunction!(signals_held, m)?)?;
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
        .map_err(|e| HostError::Usage(format!("bad log level {level:?}: {e}")))?;
    // a second call (another kernel in the same process) keeps the first
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_target(true)
        .try_init();
    Ok(())
}

/// Blocks every signal in the main thread until `release_signals` (see
/// crate::signals); the kernel holds them while the thread holds a link's
/// reading role. Elsewhere, or when they are held already, a no-op. Whether
/// it held them now. A handler made due before (by a signal another thread
/// caught) runs here: what it raises comes out of this call, with nothing
/// held, as if it had come just before.
#[pyfunction]
fn hold_signals(py: Python<'_>) -> PyResult<bool> {
    if !signals::hold() {
        return Ok(false);
    }
    if let Err(interrupt) = py.check_signals() {
        signals::release();
        return Err(interrupt);
    }
    Ok(true)
}

/// Kills every twin this process started, those still starting included
/// (the master's exit hook, after stopping the twins it knows).
#[pyfunction]
fn kill_all_twins() {
    super::host_calls::set_exiting(); // (guests still starting give up too)
    crate::process::kill_all_groups();
}

/// Lets the signals `hold_signals` held through (they are delivered now).
#[pyfunction]
fn release_signals() {
    signals::release();
}

/// Whether this thread holds its signals (`hold_signals`).
#[pyfunction]
fn signals_held() -> bool {
    signals::held()
}

/// A twin's hello as the kernel reads it (native twins and WASI guests).
pub fn hello_dict<'py>(py: Python<'py>, hello: &Hello) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("twin_id", &hello.twin_id)?;
    d.set_item("implementation", &hello.implementation)?;
    d.set_item("version", &hello.version)?;
    d.set_item("executable", &hello.executable)?;
    d.set_item("pid", hello.pid)?;
    if hello.renditions {
        d.set_item("renditions", true)?;
    }
    if hello.plain_blocks {
        // (only when said, as on the wire)
        d.set_item("plain_blocks", true)?;
    }
    Ok(d)
}

#[pyclass(module = "cpy2py._host", frozen)]
pub struct NativeTwin(pub(super) native::NativeTwin);

impl NativeTwin {
    /// What a twin whose hello asks for renditions (a CPython twin with the
    /// pure-Python codec: one on another host) is sent instead of `frame`,
    /// which its C unpickler reads faster than its codec decodes the CBOR
    /// (crate::protocol::rendition); None: the frame as it is.
    fn rendition(&self, frame: &[u8]) -> Option<Vec<u8>> {
        if self.0.hello.renditions {
            rendition::render(frame)
        } else {
            None
        }
    }
}

#[pymethods]
impl NativeTwin {
    /// Starts `executable` with `args`, `env` (the complete environment) and
    /// `cwd`, and waits up to `handshake_timeout` seconds for its hello, in
    /// slices, so that Ctrl-C during a slow start stops it at once.
    ///
    /// `protocol_on_stdio` puts the link on the program's stdin and stdout
    /// instead of fds 3 and 4, and `preamble` is written to it before the
    /// hello: both for `ssh` carrying the link to a remote twin.
    #[staticmethod]
    #[pyo3(signature = (executable, args, env, cwd=None, handshake_timeout=60.0, max_frame=frame::DEFAULT_MAX_FRAME, protocol_on_stdio=false, preamble=None))]
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        py: Python<'_>,
        executable: PathBuf,
        args: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
        cwd: Option<PathBuf>,
        handshake_timeout: f64,
        max_frame: usize,
        protocol_on_stdio: bool,
        preamble: Option<&Bound<'_, PyBytes>>,
    ) -> PyResult<Self> {
        let command = TwinCommand {
            executable,
            args,
            env,
            cwd,
            protocol_on_stdio,
        };
        let mut handshake = in_host(py, || Handshake::spawn(command, seconds(handshake_timeout)))?
            .with_preamble(preamble.map(|b| b.as_bytes().to_vec()).unwrap_or_default());
        loop {
            if let Some(hello) = in_host(py, || handshake.step(SIGNAL_SLICE))? {
                let twin = handshake.finish(hello, max_frame);
                twin.split_large_frames(Frame::FROM);
                return Ok(NativeTwin(twin));
            }
            if let Err(interrupt) = py.check_signals() {
                let _ = in_host(py, || handshake.kill());
                return Err(interrupt);
            }
        }
    }

    #[getter]
    fn pid(&self) -> u32 {
        self.0.process.pid()
    }

    /// The twin's hello: twin_id, implementation, version, executable, pid.
    #[getter]
    fn hello<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        hello_dict(py, &self.0.hello)
    }

    /// Sends one frame. Raises BrokenPipeError when the twin is gone. A
    /// signal handler that raises (Ctrl-C) interrupts a send that cannot go
    /// on (a twin that stopped reading, its pipe full, or another thread's
    /// send to it); if part of the frame was written, the stream is cut and
    /// `cut_mid_frame` says so.
    ///
    /// `payload` is a `bytes`, or a tuple of them (`dumps(..., parts=True)`),
    /// whose concatenation is the frame: written with `writev`, not joined.
    fn send(&self, py: Python<'_>, payload: &Bound<'_, PyAny>) -> PyResult<()> {
        let held;
        let pieces: Vec<&[u8]>;
        let whole;
        let rendered;
        let parts: &[&[u8]] = if let Ok(bytes) = payload.cast::<PyBytes>() {
            rendered = self.rendition(bytes.as_bytes());
            whole = [rendered.as_deref().unwrap_or(bytes.as_bytes())];
            &whole
        } else if let Ok(tuple) = payload.cast::<PyTuple>() {
            // held for the whole send; bytes cannot change
            held = tuple
                .iter()
                .map(|part| part.cast_into::<PyBytes>())
                .collect::<Result<Vec<_>, _>>()?;
            pieces = held.iter().map(|bytes| bytes.as_bytes()).collect();
            &pieces
        } else {
            return Err(PyTypeError::new_err(format!(
                "send() takes bytes or a tuple of bytes, not {}",
                payload.get_type().name()?
            )));
        };
        let mut sending = match self.0.try_begin_send(parts)? {
            Some(sending) => sending,
            // another thread sends (to a twin that may have stopped reading):
            // its turn is waited for a slice at a time, for Ctrl-C
            None => loop {
                if let Some(sending) = in_host(py, || self.0.begin_send_within(parts, SIGNAL_SLICE))? {
                    break sending;
                }
                py.check_signals()?;
            },
        };
        sending.check_not_cut()?;
        // A frame that fits the pipe now goes out keeping the GIL, as
        // `send_now`'s: with many threads calling, each time the GIL is let
        // go and taken back is a contended hand-over (futex waits on both sides)
        if sending.at_once()? {
            return Ok(());
        }
        loop {
            if in_host(py, || sending.step(SIGNAL_SLICE))? {
                return Ok(());
            }
            if let Err(interrupt) = py.check_signals() {
                sending.abandon();
                return Err(interrupt);
            }
        }
    }

    /// Sends one small frame only if it goes out at once (no other thread is
    /// sending and the pipe has room); whether it did. Never waits, and
    /// keeps the GIL (one write): the kernel sends small requests this way
    /// while it holds the link's reading role.
    fn send_now(&self, payload: &Bound<'_, PyBytes>) -> PyResult<bool> {
        let rendered = self.rendition(payload.as_bytes());
        Ok(self
            .0
            .send_now(rendered.as_deref().unwrap_or(payload.as_bytes()))?)
    }

    /// `send` takes a frame as a tuple of its parts (the kernel encodes
    /// large byte strings that way).
    #[classattr]
    fn sends_parts() -> bool {
        true
    }

    // The rest of what the kernel's `Transport` declares
    // (guest-python/cpy2py/protocol/transport.py).

    /// `send_now` sends a small frame that fits the pipe at once.
    #[classattr]
    fn sends_now() -> bool {
        true
    }

    /// A send never runs the twin: it is another process.
    #[classattr]
    fn runs_peer() -> bool {
        false
    }

    /// `recv` returns False when the caller holds its signals and one came.
    #[classattr]
    fn stops_for_signals() -> bool {
        true
    }

    /// Plain-data blocks only where the twin's hello asks for them (the
    /// master passes that to the link itself).
    #[classattr]
    fn plain_blocks() -> bool {
        false
    }

    /// Whether a send was interrupted half-way through a frame (the link
    /// must then be given up: the twin waits for the rest of it).
    #[getter]
    fn cut_mid_frame(&self) -> bool {
        self.0.cut_mid_frame()
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
        let deadline = Instant::now() + seconds(timeout);
        Ok(in_host(py, || self.0.try_send(data, deadline))?)
    }

    /// Receives one frame; None when the twin closed the stream. Without
    /// held signals, a handler that raises (Ctrl-C) interrupts the wait; with
    /// them (`hold_signals`), a signal that arrives before a frame does makes
    /// it return False, having read nothing, for the caller to let the
    /// handler run. A partial frame is kept for the next call either way.
    ///
    /// A frame of at least `Frame::FROM` bytes comes as a `Frame`, not
    /// copied into a `bytes`, its large byte strings read apart
    /// (received.rs). `soon`: the caller alone waits on this twin, for a
    /// reply expected soon; it polls a moment before it sleeps (spin.rs).
    #[pyo3(signature = (soon=false))]
    fn recv<'py>(slf: &Bound<'py, Self>, py: Python<'py>, soon: bool) -> PyResult<Bound<'py, PyAny>> {
        let this = slf.get();
        loop {
            let twin = slf.clone().unbind();
            let step = in_host(py, || {
                this.0
                    .read_step_with(soon, |fd, len, first| read_native_frame(fd, first, len, twin))
            })?;
            let outcome = match step {
                Step::Large(Ok(Some(frame))) => return Ok(Bound::new(py, frame)?.into_any()),
                Step::Large(Ok(None)) => ReadOutcome::Truncated,
                Step::Large(Err(err)) => return Err(err),
                Step::Read(outcome) => outcome,
            };
            match outcome {
                ReadOutcome::Frame(body) if body.len() >= Frame::FROM => {
                    return Ok(Bound::new(py, Frame::received(body, slf.clone().unbind()))?.into_any());
                }
                ReadOutcome::Frame(body) => {
                    let frame = PyBytes::new(py, &body);
                    this.0.recycle(body);
                    return Ok(frame.into_any());
                }
                ReadOutcome::Eof => return Ok(py.None().into_bound(py)),
                ReadOutcome::Truncated => return Err(in_host(py, || this.0.truncated()).into()),
                ReadOutcome::Interrupted if signals::held() => {
                    return Ok(PyBool::new(py, false).to_owned().into_any())
                }
                ReadOutcome::Interrupted => py.check_signals()?,
                ReadOutcome::Large { .. } => unreachable!("read_step_with reads large frames"),
            }
        }
    }

    /// The descriptor the twin's frames arrive on: readable while there is
    /// more to read than `buffered` has (the kernel's servers wait for it
    /// with epoll).
    fn fileno(&self) -> i32 {
        self.0.read_fd()
    }

    /// Whether bytes of the twin's stream were read ahead with an earlier
    /// frame (the descriptor no longer says so): the reader goes on with
    /// `recv` before giving up its role.
    fn buffered(&self) -> bool {
        self.0.buffered()
    }

    /// Waits until a frame can be read (or the stream ended), up to `timeout`
    /// seconds (None: forever), or until the descriptor `unless` is
    /// readable (an event loop's selector: the loop has something to do).
    /// Returns whether a frame can be read.
    ///
    /// Waiting for a reply while an event loop is idle (`unless` given), it
    /// polls both for a moment first, as a sync call's wait does
    /// (crate::spin); a signal handler made due meanwhile runs before it
    /// sleeps, as it would have interrupted the sleep.
    #[pyo3(signature = (timeout=None, unless=-1))]
    fn wait_readable(&self, py: Python<'_>, timeout: Option<f64>, unless: i32) -> PyResult<bool> {
        // (a signal handler that returns does not restart the wait's time)
        let deadline = timeout.map(|timeout| Instant::now() + seconds(timeout));
        let unless = (unless >= 0).then_some(unless);
        let spin = self.0.reply_spin();
        let mut moment = Moment::unpolled();
        if let Some(other) = unless.filter(|_| spin.worth_polling()) {
            // (a frame already read ahead: the caller asked `buffered` first)
            let fd = self.0.read_fd();
            moment = in_host(py, || spin.poll([fd, other], deadline));
            py.check_signals()?;
            if let Some(found) = moment.ready() {
                if found == 0 {
                    spin.waited(&moment);
                }
                return Ok(found == 0); // (else the loop has something to do)
            }
        }
        loop {
            let left = deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
            match in_host(py, || self.0.wait_readable_step(left, unless))? {
                Some(ready) => {
                    if ready && unless.is_some() {
                        spin.waited(&moment);
                    }
                    return Ok(ready);
                }
                None => py.check_signals()?,
            }
        }
    }

    /// Closes the master's ends of the twin's pipes now (see `close` in
    /// native.rs): a stopped twin's descriptors do not wait for the garbage
    /// collector.
    fn close(&self, py: Python<'_>) {
        in_host(py, || self.0.close());
    }

    /// How the twin ended, or None while it runs.
    fn exit_status(&self) -> PyResult<Option<String>> {
        Ok(self.0.process.try_status()?.map(describe_status))
    }

    /// Waits up to `timeout` seconds for the twin to end; how it ended, or None.
    fn wait(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<String>> {
        let status = in_host(py, || self.0.process.wait_timeout(seconds(timeout)))?;
        Ok(status.map(describe_status))
    }

    /// Kills the twin (SIGKILL) if it still runs; how it ended.
    fn kill(&self, py: Python<'_>) -> PyResult<String> {
        Ok(describe_status(in_host(py, || self.0.process.kill())?))
    }

    /// The last few KiB the twin wrote to stderr.
    fn stderr_tail(&self) -> String {
        self.0.process.stderr_tail()
    }

    /// Waits up to `timeout` seconds for the twin (and anything it started)
    /// to close its stderr, all it wrote forwarded (and in the tail); whether
    /// it did. A twin that exits has its last words read before they are told.
    fn stderr_forwarded(&self, py: Python<'_>, timeout: f64) -> bool {
        in_host(py, || self.0.process.stderr_forwarded(seconds(timeout)))
    }
}
