//! One running WASI guest: its thread, its store, its limits, and the frame
//! queues to and from the master.
//!
//! The guest runs `wasi:cli/run` on a thread of its own. Its `link.recv`
//! import blocks on the queue the master's `send` fills; its `link.send`
//! import fills the queue the master's `recv` drains. Every limit ends the
//! guest the same way: the reason is recorded, the store traps (or, for a
//! guest blocked in a host call, is abandoned), both queues close, and the
//! master's `recv` returns `None` once it has read what was sent before.
//!
//! Both imports keep the guest's `Ledger` (ledger.rs): the calls open between
//! the master and the guest, the guest time they used, and the protocol rules
//! a guest calling its `link` import directly cannot get around.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{ResourceLimiter, Store, StoreContextMut, Trap, UpdateDeadline};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxView, WasiView};

use super::clocks;
use super::ledger::{Ledger, Violation};
use super::output::{GuestOutput, Sink, Which};
use super::queue::{Closed, FrameQueue, Popped};
use super::runtime::{self, GUEST_THREAD_STACK};
use super::view::{self, CodeView};
use crate::error::{HostError, Result};
use crate::protocol::handshake::{parse_hello, Hello};

/// Defaults of the sandbox limits (documented in docs/security.md).
pub const DEFAULT_MEMORY_LIMIT: usize = 256 << 20;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;
pub const DEFAULT_OUTPUT_LIMIT: usize = 4 << 20;
/// Frames the guest sent that the master has not read yet, in bytes, before
/// the guest's `send` waits.
pub const MAX_QUEUED_BYTES: usize = 64 << 20;
/// Table elements per guest (each costs the host a pointer).
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// Where the guest finds the Python standard library and componentize-py's helpers.
pub const STDLIB_MOUNT: &str = "/python";
pub const BUNDLED_MOUNT: &str = "/bundled";
/// Where the guest's own modules (cpy2py, app.py) were imported from when the
/// component was built; mounted again so that tracebacks show their source.
pub const KERNEL_MOUNT: &str = "/0";
/// The interface name of the frame link in the guest's world (wasm/wit/world.wit).
pub const LINK_INTERFACE: &str = "cpy2py:guest/link@0.1.0";

/// What to run and within which limits.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub twin_id: String,
    /// The guest component (wasm/build/cpy2py-guest.wasm).
    pub guest_file: PathBuf,
    /// The Python standard library that goes with it, mounted read-only.
    pub stdlib_dir: PathBuf,
    /// componentize-py's helper modules, mounted read-only if present.
    pub bundled_dir: Option<PathBuf>,
    /// The guest's own Python sources as staged for the build, mounted
    /// read-only at `KERNEL_MOUNT` if present.
    pub kernel_dir: Option<PathBuf>,
    /// Roots the guest may import code from.
    pub paths: Vec<PathBuf>,
    pub memory_limit: usize,
    /// Guest running time per call (None: unlimited); see ledger.rs.
    pub timeout: Option<Duration>,
    pub max_frame: usize,
    pub output_limit: usize,
    pub cache_dir: PathBuf,
    pub handshake_timeout: Duration,
}

impl GuestConfig {
    pub fn new(twin_id: &str, guest_file: PathBuf, stdlib_dir: PathBuf) -> Self {
        GuestConfig {
            twin_id: twin_id.to_string(),
            guest_file,
            stdlib_dir,
            bundled_dir: None,
            kernel_dir: None,
            paths: Vec::new(),
            memory_limit: DEFAULT_MEMORY_LIMIT,
            timeout: Some(DEFAULT_TIMEOUT),
            max_frame: DEFAULT_MAX_FRAME,
            output_limit: DEFAULT_OUTPUT_LIMIT,
            cache_dir: runtime::default_cache_dir(),
            handshake_timeout: Duration::from_secs(60),
        }
    }
}

/// How a guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEnd {
    /// `run` returned (0) or the guest called `exit`.
    Exited(i32),
    /// A call ran longer than the timeout.
    Timeout(Duration),
    /// The guest broke a rule of the link (ledger.rs).
    Broke(Violation),
    /// The guest tried to grow its memory beyond the limit.
    Memory { limit: usize, wanted: usize },
    /// The guest sent a frame larger than the cap.
    FrameTooBig { size: usize, cap: usize },
    /// The master stopped it.
    Killed,
    /// A wasm trap or another failure of the guest.
    Trap(String),
}

/// The class of Python exception a guest's end is reported as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndKind {
    Normal,
    Timeout,
    Memory,
    Terminated,
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl GuestEnd {
    /// How it ended, in words (follows "twinterpreter 'x' ").
    pub fn describe(&self) -> String {
        match self {
            GuestEnd::Exited(0) => "exited".into(),
            GuestEnd::Exited(code) => format!("exited with status {code}"),
            GuestEnd::Timeout(limit) => format!(
                "ran longer than its timeout of {:.3} s for one call and was stopped",
                limit.as_secs_f64()
            ),
            GuestEnd::Memory { limit, wanted } => format!(
                "needed {} of memory, more than its memory_limit of {}, and was stopped",
                mib(*wanted),
                mib(*limit)
            ),
            GuestEnd::FrameTooBig { size, cap } => {
                format!("sent a message of {size} bytes, more than the cap of {cap} bytes, and was stopped")
            }
            GuestEnd::Broke(violation) => format!("{violation}, and was stopped"),
            GuestEnd::Killed => "was killed by the master".into(),
            GuestEnd::Trap(what) => format!("crashed ({what})"),
        }
    }

    pub fn kind(&self) -> EndKind {
        match self {
            GuestEnd::Exited(0) | GuestEnd::Killed => EndKind::Normal,
            GuestEnd::Timeout(_) => EndKind::Timeout,
            GuestEnd::Memory { .. } => EndKind::Memory,
            _ => EndKind::Terminated,
        }
    }

    /// What the user can do about it.
    pub fn advice(&self) -> &'static str {
        match self {
            GuestEnd::Timeout(_) => " (pass a larger timeout= to TwinMaster if the call needs longer)",
            GuestEnd::Memory { .. } => " (pass a larger memory_limit= to TwinMaster if the guest needs more)",
            GuestEnd::FrameTooBig { .. } => " (send smaller values, or a proxy of the object)",
            GuestEnd::Broke(_) => " (its code used the link import outside the cpy2py protocol)",
            _ => "",
        }
    }
}

/// State shared by the guest thread, the master and the ticker.
pub struct Shared {
    pub twin_id: String,
    paths: Vec<String>,
    max_frame: usize,
    timeout: Option<Duration>,
    to_guest: FrameQueue,
    from_guest: FrameQueue,
    /// When the open calls' running time passes the timeout if the guest
    /// keeps running (from its `Ledger`); None while it is blocked in `recv`
    /// or `send`. Read by the epoch callback and the watchdog.
    deadline: Mutex<Option<Instant>>,
    /// Set once the host decided to stop the guest, with the reason.
    stopping: AtomicBool,
    stop_reason: Mutex<Option<GuestEnd>>,
    end: Mutex<Option<GuestEnd>>,
    ended: Condvar,
    output: GuestOutput,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Records why the host stops the guest (the first reason wins) and
    /// closes the link, so the master learns at once.
    fn stop(&self, reason: GuestEnd) {
        {
            let mut stop = lock(&self.stop_reason);
            if stop.is_none() {
                *stop = Some(reason.clone());
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.finish(reason);
    }

    fn stop_reason(&self) -> Option<GuestEnd> {
        lock(&self.stop_reason).clone()
    }

    /// The guest is over: record how (the first word wins), close both queues.
    fn finish(&self, end: GuestEnd) {
        {
            let mut slot = lock(&self.end);
            if slot.is_none() {
                *slot = Some(end);
            }
        }
        self.output.flush();
        self.to_guest.close_and_clear();
        self.from_guest.close();
        self.ended.notify_all();
    }

    pub fn has_ended(&self) -> bool {
        lock(&self.end).is_some()
    }

    /// Called on every epoch tick while wasm runs.
    fn on_tick(&self) -> wasmtime::Result<UpdateDeadline> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(wasmtime::Error::msg("the guest is being stopped by the host"));
        }
        if let (Some(deadline), Some(limit)) = (*lock(&self.deadline), self.timeout) {
            if Instant::now() >= deadline {
                self.stop(GuestEnd::Timeout(limit));
                return Err(wasmtime::Error::msg("the guest ran past its call timeout"));
            }
        }
        Ok(UpdateDeadline::Continue(1))
    }

    /// Watchdog: a guest blocked in a host call past its deadline is stopped
    /// (its thread is abandoned until the call returns, then it traps).
    pub fn check_overdue(&self, now: Instant, grace: Duration) {
        let overdue = matches!(*lock(&self.deadline), Some(deadline) if now >= deadline + grace);
        if overdue && !self.has_ended() {
            if let Some(limit) = self.timeout {
                tracing::debug!(twin_id = %self.twin_id, "guest blocked past its deadline: stopped");
                self.stop(GuestEnd::Timeout(limit));
            }
        }
    }

    fn set_deadline(&self, deadline: Option<Instant>) {
        *lock(&self.deadline) = deadline;
    }

    /// Stops the guest for breaking a rule of the link; the error for its import.
    fn broke(&self, violation: Violation) -> wasmtime::Error {
        tracing::debug!(twin_id = %self.twin_id, %violation, "guest broke the link's rules: stopped");
        let message = format!("the guest {violation}");
        self.stop(GuestEnd::Broke(violation));
        wasmtime::Error::msg(message)
    }
}

/// The store data of a guest.
pub struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    shared: Arc<Shared>,
    ledger: Ledger,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

struct Limiter {
    memory_limit: usize,
    shared: Arc<Shared>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            tracing::debug!(
                current,
                desired,
                limit = self.memory_limit,
                "guest memory limit reached"
            );
            self.shared.stop(GuestEnd::Memory {
                limit: self.memory_limit,
                wanted: desired,
            });
            return Err(wasmtime::Error::msg("the guest reached its memory limit"));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Defines the `link` interface the guest imports.
pub fn add_link_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    let mut link = linker.instance(LINK_INTERFACE)?;
    link.func_wrap("twin-id", |cx: StoreContextMut<'_, GuestState>, (): ()| {
        Ok((cx.data().shared.twin_id.clone(),))
    })?;
    link.func_wrap("paths", |cx: StoreContextMut<'_, GuestState>, (): ()| {
        Ok((cx.data().shared.paths.clone(),))
    })?;
    link.func_wrap("max-frame", |cx: StoreContextMut<'_, GuestState>, (): ()| {
        Ok((cx.data().shared.max_frame as u64,))
    })?;
    link.func_wrap(
        "send",
        |mut cx: StoreContextMut<'_, GuestState>, (frame,): (Vec<u8>,)| {
            let GuestState { shared, ledger, .. } = cx.data_mut();
            if frame.is_empty() {
                return Ok(()); // a keep-alive: nothing for the master
            }
            if frame.len() > shared.max_frame {
                shared.stop(GuestEnd::FrameTooBig {
                    size: frame.len(),
                    cap: shared.max_frame,
                });
                return Err(wasmtime::Error::msg("the guest sent a frame over the cap"));
            }
            ledger
                .sending(&frame, Instant::now())
                .map_err(|v| shared.broke(v))?;
            // time spent waiting for the master to read is not the guest's
            ledger.pause(Instant::now());
            shared.set_deadline(None);
            let pushed = shared.from_guest.push(frame);
            ledger.resume(Instant::now());
            shared.set_deadline(ledger.deadline());
            match pushed {
                Ok(_) => Ok(()),
                Err(Closed) => Err(wasmtime::Error::msg("the master closed the link")),
            }
        },
    )?;
    link.func_wrap("recv", |mut cx: StoreContextMut<'_, GuestState>, (): ()| {
        let GuestState { shared, ledger, .. } = cx.data_mut();
        shared.output.flush();
        let frame = match shared.to_guest.try_pop() {
            Popped::Frame(frame) => Some(frame),
            Popped::Closed => None,
            Popped::TimedOut => {
                // nothing queued: the guest would wait for the master
                ledger.may_wait().map_err(|v| shared.broke(v))?;
                ledger.pause(Instant::now());
                shared.set_deadline(None);
                shared.to_guest.pop()
            }
        };
        ledger.took(frame.as_deref(), Instant::now());
        shared.set_deadline(ledger.deadline());
        Ok((frame,))
    })?;
    Ok(())
}

/// A running guest, as the master sees it.
pub struct WasiGuest {
    shared: Arc<Shared>,
    pub hello: Hello,
}

impl WasiGuest {
    /// Starts a guest and waits for its hello.
    pub fn start(config: GuestConfig, sink: Box<dyn Sink>) -> Result<WasiGuest> {
        let rt = runtime::runtime()?;
        let loaded = rt.load_guest(&config.guest_file, &config.cache_dir.join("wasm"))?;
        if !config.stdlib_dir.join("os.py").is_file() {
            return Err(HostError::Spawn(format!(
                "the WASI guest's Python standard library is missing in {} (it is built with the guest): \
                 run `just wasm`",
                config.stdlib_dir.display()
            )));
        }
        let views = config.cache_dir.join("views");
        view::remove_stale_views(&views);
        let code = CodeView::build(&config.paths, &views)?;
        for (_, guest_path) in &code.mounts {
            if guest_path == "/"
                || [STDLIB_MOUNT, BUNDLED_MOUNT]
                    .iter()
                    .any(|m| guest_path.starts_with(m))
            {
                return Err(HostError::Spawn(format!(
                    "sandbox path {guest_path} overlaps the guest's own mounts ({STDLIB_MOUNT}, {BUNDLED_MOUNT}); \
                     move the code elsewhere"
                )));
            }
        }
        let output = GuestOutput::new(&config.twin_id, config.output_limit, sink);
        let shared = Arc::new(Shared {
            twin_id: config.twin_id.clone(),
            paths: code.mounts.iter().map(|(_, g)| g.clone()).collect(),
            max_frame: config.max_frame,
            timeout: config.timeout,
            to_guest: FrameQueue::new(usize::MAX),
            from_guest: FrameQueue::with_readable_fd(MAX_QUEUED_BYTES)
                .map_err(|e| HostError::Spawn(format!("cannot create the guest's link: {e}")))?,
            deadline: Mutex::new(None),
            stopping: AtomicBool::new(false),
            stop_reason: Mutex::new(None),
            end: Mutex::new(None),
            ended: Condvar::new(),
            output: output.clone(),
        });
        let wasi = wasi_context(&config, &code, &output)?;
        let state = GuestState {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_limit: config.memory_limit,
                shared: Arc::clone(&shared),
            },
            shared: Arc::clone(&shared),
            ledger: Ledger::new(config.timeout, Instant::now()),
        };
        rt.register(&shared);
        let thread_shared = Arc::clone(&shared);
        thread::Builder::new()
            .name(format!("cpy2py-wasi-{}", config.twin_id))
            .stack_size(GUEST_THREAD_STACK)
            .spawn(move || run_guest(rt, loaded, state, thread_shared, code))
            .map_err(|e| HostError::Spawn(format!("cannot start a thread for the WASI guest: {e}")))?;
        let guest = WasiGuest {
            hello: Hello {
                cpy2py: 0,
                twin_id: String::new(),
                implementation: String::new(),
                version: String::new(),
                executable: String::new(),
                pid: 0,
            },
            shared,
        };
        guest.handshake(&config)
    }

    fn handshake(mut self, config: &GuestConfig) -> Result<WasiGuest> {
        match self.shared.from_guest.pop_timeout(Some(config.handshake_timeout)) {
            Popped::Frame(frame) => {
                let mut hello = match parse_hello(&frame) {
                    Ok(hello) => hello,
                    Err(e) => {
                        self.kill();
                        return Err(e);
                    }
                };
                hello.pid = std::process::id(); // the guest lives in this process
                self.hello = hello;
                Ok(self)
            }
            Popped::TimedOut => {
                self.kill();
                Err(HostError::Spawn(format!(
                    "the WASI guest did not answer the cpy2py handshake within {:.0} s \
                     (raise handshake_timeout for very slow machines)",
                    config.handshake_timeout.as_secs_f64()
                )))
            }
            Popped::Closed => {
                let end = self.wait(Duration::from_secs(5)).unwrap_or(GuestEnd::Killed);
                let tail = self.stderr_tail();
                let said = if tail.is_empty() {
                    String::new()
                } else {
                    format!("; it said:\n{tail}")
                };
                let hint = match end {
                    GuestEnd::Memory { .. } => " (pass a larger memory_limit= to TwinMaster)",
                    _ => " (rebuild the guest with `just wasm`; if it persists, report it)",
                };
                Err(HostError::Spawn(format!(
                    "the WASI guest {} before answering the cpy2py handshake{hint}{said}",
                    end.describe()
                )))
            }
        }
    }

    /// Queues a frame for the guest; fails once the guest has ended.
    pub fn send(&self, frame: Vec<u8>) -> std::io::Result<()> {
        if self.shared.has_ended() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                format!("the WASI guest {:?} has ended", self.shared.twin_id),
            ));
        }
        self.shared
            .to_guest
            .push(frame)
            .map(|_| ())
            .map_err(|Closed| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the WASI guest has ended"))
    }

    /// The next frame from the guest, waiting up to `timeout`.
    pub fn recv(&self, timeout: Option<Duration>) -> Popped {
        self.shared.from_guest.pop_timeout(timeout)
    }

    /// The next frame if there is one, without waiting.
    pub fn try_recv(&self) -> Popped {
        self.shared.from_guest.try_pop()
    }

    /// A descriptor readable exactly while `try_recv` has something to say
    /// (a frame, or the end).
    pub fn readable_fd(&self) -> i32 {
        self.shared
            .from_guest
            .readable_fd()
            .expect("the guest's queue has a readiness descriptor")
    }

    /// Whether a frame (or the end) is there within `timeout`.
    pub fn wait_readable(&self, timeout: Option<Duration>) -> bool {
        self.shared.from_guest.wait_ready(timeout)
    }

    /// How the guest ended, or None while it runs.
    pub fn end(&self) -> Option<GuestEnd> {
        lock(&self.shared.end).clone()
    }

    /// Waits up to `timeout` for the guest to end.
    pub fn wait(&self, timeout: Duration) -> Option<GuestEnd> {
        let deadline = Instant::now() + timeout;
        let mut end = lock(&self.shared.end);
        loop {
            if let Some(end) = end.as_ref() {
                return Some(end.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            end = self
                .shared
                .ended
                .wait_timeout(end, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stops the guest (if it still runs); how it ended.
    pub fn kill(&self) -> GuestEnd {
        if !self.shared.has_ended() {
            self.shared.stop(GuestEnd::Killed);
        }
        self.end().unwrap_or(GuestEnd::Killed)
    }

    pub fn stderr_tail(&self) -> String {
        self.shared.output.stderr_tail()
    }

    pub fn twin_id(&self) -> &str {
        &self.shared.twin_id
    }
}

impl Drop for WasiGuest {
    fn drop(&mut self) {
        // a guest never outlives its handle
        self.kill();
    }
}

/// The guest's WASI world: the code view and the standard library read-only,
/// its output to the master's, coarse clocks, and nothing else: no
/// environment, no arguments, no stdin, no network.
fn wasi_context(config: &GuestConfig, code: &CodeView, output: &GuestOutput) -> Result<WasiCtx> {
    let mut wasi = WasiCtx::builder();
    wasi.stdout(output.stream(Which::Stdout))
        .stderr(output.stream(Which::Stderr))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }))
        .allow_blocking_current_thread(true)
        .wall_clock(clocks::CoarseWallClock)
        .monotonic_clock(clocks::CoarseMonotonicClock::new());
    let mount = |wasi: &mut wasmtime_wasi::WasiCtxBuilder, host: &std::path::Path, guest: &str| {
        wasi.preopened_dir(host, guest, FsPerms::ReadOnly)
            .map(|_| ())
            .map_err(|e| HostError::Spawn(format!("cannot give the guest {} ({e})", host.display())))
    };
    mount(&mut wasi, &config.stdlib_dir, STDLIB_MOUNT)?;
    if let Some(bundled) = config.bundled_dir.as_deref().filter(|d| d.is_dir()) {
        mount(&mut wasi, bundled, BUNDLED_MOUNT)?;
    }
    if let Some(kernel) = config.kernel_dir.as_deref().filter(|d| d.is_dir()) {
        mount(&mut wasi, kernel, KERNEL_MOUNT)?;
    }
    for (host, guest) in &code.mounts {
        mount(&mut wasi, host, guest)?;
    }
    Ok(wasi.build())
}

fn run_guest(
    rt: &'static runtime::Runtime,
    loaded: Arc<runtime::LoadedGuest>,
    state: GuestState,
    shared: Arc<Shared>,
    code: CodeView,
) {
    let mut store = Store::new(&rt.engine, state);
    store.limiter(|state| &mut state.limiter);
    store.set_epoch_deadline(1);
    let ticking = Arc::clone(&shared);
    store.epoch_deadline_callback(move |_| ticking.on_tick());
    // starting up counts as a call
    let ledger = &mut store.data_mut().ledger;
    *ledger = Ledger::new(shared.timeout, Instant::now());
    shared.set_deadline(ledger.deadline());
    let result = loaded
        .pre
        .instantiate(&mut store)
        .and_then(|command| command.wasi_cli_run().call_run(&mut store));
    let end = match result {
        Ok(Ok(())) => GuestEnd::Exited(0),
        Ok(Err(())) => GuestEnd::Exited(1),
        Err(err) => {
            if let Some(reason) = shared.stop_reason() {
                reason
            } else if let Some(exit) = err.downcast_ref::<I32Exit>() {
                GuestEnd::Exited(exit.0)
            } else if let Some(trap) = err.downcast_ref::<Trap>() {
                GuestEnd::Trap(trap.to_string())
            } else {
                GuestEnd::Trap(format!("{err:#}"))
            }
        }
    };
    tracing::debug!(twin_id = %shared.twin_id, ?end, "guest ended");
    drop(store); // frees the guest's memory before anyone learns it ended
    drop(code);
    shared.finish(end);
}
