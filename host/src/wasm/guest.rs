//! One WASI guest: its store, its limits, the frame queues to and from the
//! master, and how it runs: on the thread of whoever needs it.
//!
//! The guest's `wasi:cli/run` is one asynchronous call (wasmtime's
//! `call_async`) that runs on a fiber, a stack of its own. Nothing runs it
//! in the background: a master thread *drives* it (`Shared::drive`),
//! switching to the fiber on its own thread, so a call costs no thread
//! hand-off. Who drives: the thread that sends the guest a request or an
//! answer carries it out at once (python/wasi.rs, `send`), unless another
//! thread drives the guest; a thread that needs a frame from the guest
//! (`recv`) drives it until it has one; `wait` until it ends. Only one
//! thread polls the guest at a time; the others wait for it. The
//! `link.recv` import suspends the fiber when nothing is queued for the
//! guest (queuing a frame marks the guest runnable), `link.send` queues the
//! guest's frame for the master (suspending the fiber while the master has
//! too many bytes unread), and every epoch tick suspends it briefly so that
//! the driver can look for signals and the limits. WASI's clocks are
//! asynchronous too: a sleeping guest suspends its fiber, and its driver
//! waits for the timer.
//!
//! When the guest's work after a frame runs: a driver runs the guest until
//! it waits for the master, or asks for its next frame while frames it sent
//! are queued (`link.recv` then suspends it once: it is done with them), or
//! for at most one slice of `DRIVE_SLICE`. So the guest's releases, which its
//! kernel flushes before it asks for the next frame, reach the master with
//! the reply they follow (a reader leaves them queued for others and raises
//! the readiness level, see queue.rs), and a driver hands over replies
//! before it serves the next queued request. A guest nobody drives does
//! nothing: a frame the master queues while no thread drives the guest (a
//! release) is handled when the next thread drives it, and the guest's clock
//! (ledger.rs) runs only while it is driven.
//!
//! Every limit ends the guest the same way: the reason is recorded, both
//! queues close (the master's `recv` returns `None` once it has read what
//! was sent before), and the guest's fiber is dropped by whoever holds it
//! (which unwinds it and frees its memory): the driver, as its next poll
//! traps or returns, or the stopping thread if nobody drives it.
//!
//! Both imports keep the guest's `Ledger` (ledger.rs): the calls open between
//! the master and the guest, the guest time they used, and the protocol rules
//! a guest calling its `link` import directly cannot get around.

use std::future::{poll_fn, Future};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{ResourceLimiter, Store, StoreContextMut, Trap, UpdateDeadline};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxView, WasiView};

use super::clocks;
use super::ledger::{Ledger, Violation};
use super::output::{GuestOutput, Sink, Which};
use super::queue::{Closed, FrameQueue, Popped};
use super::runtime;
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

/// How long a driver runs the guest before it looks up (for a signal in
/// the master, or to hand over a frame that is ready while the guest runs on).
pub const DRIVE_SLICE: Duration = Duration::from_millis(50);

/// The guest's `run` call, suspended whenever the guest waits.
type GuestFuture = Pin<Box<dyn Future<Output = GuestEnd> + Send>>;

/// What a driver runs the guest for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// A frame from the guest is queued and the guest waits (or ended).
    Frame,
    /// The guest ended.
    End,
    /// The guest has dealt with what was queued for it: it waits, or asks
    /// for its next frame after sending some; or another thread runs it.
    Settled,
}

/// Who runs the guest, guarded by `Shared::drive`.
struct Drive {
    /// The suspended guest; None while a thread polls it, and once it ended.
    guest: Option<GuestFuture>,
    /// The guest can make progress (woken by a frame for it, queue room, a
    /// timer, an epoch tick); false while it waits.
    woken: bool,
    /// The last poll ended as the guest asked for its next frame while
    /// frames it sent were queued (see `Shared::guest_receives`).
    boundary: bool,
    /// The thread polling the guest takes none of its frames (it waits for
    /// the end): they are published as they are queued.
    publish: bool,
    /// Threads inside `drive` (the guest's clock runs while there are any).
    drivers: usize,
    /// Threads waiting on `Shared::changed`.
    sleepers: usize,
    /// Threads of the master inside the host for this guest with the GIL
    /// released (python/wasi.rs), counted until they hold it again.
    in_host: usize,
}

/// State shared by the guest's fiber, the master's threads and the ticker.
pub struct Shared {
    pub twin_id: String,
    paths: Vec<String>,
    max_frame: usize,
    timeout: Option<Duration>,
    to_guest: FrameQueue,
    from_guest: FrameQueue,
    ledger: Mutex<Ledger>,
    /// When the open calls' running time passes the timeout if the guest
    /// keeps running (from its `Ledger`); None while it is blocked in `recv`
    /// or `send`, or nobody drives it. Read by the epoch callback, the
    /// driver and the watchdog.
    deadline: Mutex<Option<Instant>>,
    /// Set once the host decided to stop the guest, with the reason.
    stopping: AtomicBool,
    stop_reason: Mutex<Option<GuestEnd>>,
    end: Mutex<Option<GuestEnd>>,
    drive: Mutex<Drive>,
    /// Signals every change of `drive` or `end` a thread may wait for.
    changed: Condvar,
    waker: Waker,
    output: GuestOutput,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wakes the guest: a frame for it, room for its frame, a timer, a tick.
struct GuestWaker(Weak<Shared>);

impl Wake for GuestWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(shared) = self.0.upgrade() {
            let mut drive = lock(&shared.drive);
            drive.woken = true;
            if drive.sleepers > 0 {
                shared.changed.notify_all();
            }
        }
    }
}

impl Shared {
    /// Records why the host stops the guest (the first reason wins), drops
    /// the guest if nobody drives it, and closes the link, so the master
    /// learns at once. A driver drops the guest when its poll returns.
    fn stop(&self, reason: GuestEnd) {
        {
            let mut stop = lock(&self.stop_reason);
            if stop.is_none() {
                *stop = Some(reason.clone());
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        let idle = lock(&self.drive).guest.take();
        if let Some(guest) = idle {
            drop_guest(guest);
        }
        self.finish(reason);
    }

    fn stop_reason(&self) -> Option<GuestEnd> {
        lock(&self.stop_reason).clone()
    }

    /// The guest is over: record how (the first word wins), close both
    /// queues, wake every thread that waits for it.
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
        let _drive = lock(&self.drive);
        self.changed.notify_all();
    }

    pub fn has_ended(&self) -> bool {
        lock(&self.end).is_some()
    }

    /// Called on every epoch tick while wasm runs: stops the guest if it is
    /// being stopped or past its deadline, else suspends it for a moment so
    /// that its driver can look up.
    fn on_tick(&self) -> wasmtime::Result<UpdateDeadline> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(wasmtime::Error::msg("the guest is being stopped by the host"));
        }
        if self.overdue(Instant::now(), Duration::ZERO) {
            return Err(wasmtime::Error::msg("the guest ran past its call timeout"));
        }
        Ok(UpdateDeadline::Yield(1))
    }

    /// Stops the guest if its deadline passed `grace` ago; whether it did.
    fn overdue(&self, now: Instant, grace: Duration) -> bool {
        let overdue = matches!(*lock(&self.deadline), Some(deadline) if now >= deadline + grace);
        if let (true, Some(limit)) = (overdue, self.timeout) {
            self.stop(GuestEnd::Timeout(limit));
            return true;
        }
        false
    }

    /// Watchdog: a guest blocked in a host call that does not suspend it
    /// (its driver's thread is stuck there) is stopped past its deadline;
    /// its driver drops it when the call returns.
    pub fn check_overdue(&self, now: Instant, grace: Duration) {
        if !self.has_ended() && self.overdue(now, grace) {
            tracing::debug!(twin_id = %self.twin_id, "guest blocked past its deadline: stopped");
        }
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    /// Caller holds the ledger: the deadline follows it.
    fn update_deadline(&self, ledger: &Ledger) {
        *lock(&self.deadline) = ledger.deadline();
    }

    /// The guest blocks in an import: its clock stops.
    fn block(&self) {
        let mut ledger = self.ledger();
        ledger.pause(Instant::now());
        self.update_deadline(&ledger);
    }

    fn unblock(&self) {
        let mut ledger = self.ledger();
        ledger.resume(Instant::now());
        self.update_deadline(&ledger);
    }

    /// Stops the guest for breaking a rule of the link; the error for its import.
    fn broke(&self, violation: Violation) -> wasmtime::Error {
        tracing::debug!(twin_id = %self.twin_id, %violation, "guest broke the link's rules: stopped");
        let message = format!("the guest {violation}");
        self.stop(GuestEnd::Broke(violation));
        wasmtime::Error::msg(message)
    }

    /// The `link.send` import.
    async fn guest_sends(&self, frame: Vec<u8>) -> wasmtime::Result<()> {
        if frame.is_empty() {
            return Ok(()); // a keep-alive: nothing for the master
        }
        if frame.len() > self.max_frame {
            self.stop(GuestEnd::FrameTooBig {
                size: frame.len(),
                cap: self.max_frame,
            });
            return Err(wasmtime::Error::msg("the guest sent a frame over the cap"));
        }
        let checked = self.ledger().sending(&frame, Instant::now());
        checked.map_err(|v| self.broke(v))?;
        let mut slot = Some(frame);
        let mut blocked = false;
        let pushed = poll_fn(|cx| {
            let pushed = self.from_guest.poll_push(&mut slot, cx);
            if pushed.is_pending() && !blocked {
                // time spent waiting for the master to read is not the guest's
                blocked = true;
                self.block();
            }
            pushed
        })
        .await;
        if blocked {
            self.unblock();
        }
        if pushed.is_ok() && lock(&self.drive).publish {
            self.from_guest.publish();
        }
        pushed.map_err(|Closed| wasmtime::Error::msg("the master closed the link"))
    }

    /// The `link.recv` import.
    async fn guest_receives(&self) -> wasmtime::Result<Option<Vec<u8>>> {
        self.output.flush();
        if self.from_guest.has_frames() {
            // The guest is done with what it sent (its kernel flushes its
            // releases before it asks): let the thread that drives it take
            // those frames now, rather than serve the next request first.
            let mut asked = false;
            poll_fn(|_| {
                if asked {
                    return Poll::Ready(());
                }
                asked = true;
                let mut drive = lock(&self.drive);
                drive.boundary = true;
                drive.woken = true; // it goes on when driven again
                Poll::Pending
            })
            .await;
        }
        let frame = match self.to_guest.try_pop() {
            Popped::Frame(frame) => Some(frame),
            Popped::Closed => None,
            Popped::TimedOut => {
                // nothing queued: the guest would wait for the master
                let allowed = self.ledger().may_wait();
                allowed.map_err(|v| self.broke(v))?;
                self.block();
                poll_fn(|cx| self.to_guest.poll_pop(cx)).await
            }
        };
        let mut ledger = self.ledger();
        ledger.took(frame.as_deref(), Instant::now());
        self.update_deadline(&ledger);
        Ok(frame)
    }

    /// Runs the guest on this thread until `until` holds (true) or
    /// `deadline` passes (false). If another thread drives the guest, waits
    /// for it instead. See the module docs for when the guest's work after a
    /// frame runs.
    fn drive(&self, until: Until, deadline: Option<Instant>) -> bool {
        let mut drive = lock(&self.drive);
        drive.drivers += 1;
        if drive.drivers == 1 {
            self.set_driven(true);
        }
        let holds = loop {
            if self.has_ended() {
                break true;
            }
            let polling = drive.guest.is_none(); // by another thread
                                                 // frames are there, and the guest waits, or asks for its next
                                                 // frame (it is done with them), or runs on another thread
            let settled = !drive.woken || drive.boundary || polling;
            if until == Until::Frame && settled && self.from_guest.has_frames() {
                break true;
            }
            // (at a boundary, the guest has yet to take what was queued since)
            if until == Until::Settled
                && (polling || !drive.woken || drive.boundary && !self.to_guest.has_frames())
            {
                break true;
            }
            if drive.woken && !polling {
                let mut guest = drive.guest.take().expect("the guest is there");
                drive.woken = false;
                drive.boundary = false;
                drive.publish = until == Until::End;
                drop(drive);
                let polled = poll_guest(&mut guest, &self.waker);
                match polled {
                    Poll::Ready(end) => {
                        drop(guest); // frees its memory before anyone learns it ended
                        self.finish(end);
                        drive = lock(&self.drive);
                    }
                    Poll::Pending => {
                        drive = lock(&self.drive);
                        if self.stopping.load(Ordering::SeqCst) {
                            drop(drive);
                            drop_guest(guest);
                            drive = lock(&self.drive);
                        } else {
                            drive.guest = Some(guest);
                        }
                        if drive.sleepers > 0 {
                            self.changed.notify_all();
                        }
                    }
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break self.has_ended() || (until == Until::Frame && self.from_guest.has_frames());
                }
                continue;
            }
            // the guest waits (for the master, a timer, or another driver)
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break false;
            }
            // a guest suspended in a host call (a sleep) keeps its deadline
            let due = *lock(&self.deadline);
            if due.is_some_and(|due| now >= due) && !polling {
                drop(drive);
                self.overdue(now, Duration::ZERO);
                drive = lock(&self.drive);
                continue;
            }
            let wake_at = [deadline, due.filter(|_| !polling)].into_iter().flatten().min();
            drive.sleepers += 1;
            drive = match wake_at {
                None => self.changed.wait(drive).unwrap_or_else(|e| e.into_inner()),
                Some(at) => {
                    let left = at.saturating_duration_since(now);
                    self.changed
                        .wait_timeout(drive, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
            drive.sleepers -= 1;
        };
        drive.drivers -= 1;
        if drive.drivers == 0 {
            self.set_driven(false);
        }
        holds
    }

    /// Caller holds `drive`: whether a thread drives the guest.
    fn set_driven(&self, driven: bool) {
        let mut ledger = self.ledger();
        ledger.set_driven(driven, Instant::now());
        self.update_deadline(&ledger);
    }

    /// Waits up to `timeout` until no thread counted by `enter_host` is
    /// inside the host; whether none is.
    fn wait_out_of_host(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut drive = lock(&self.drive);
        while drive.in_host > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            drive.sleepers += 1;
            drive = self
                .changed
                .wait_timeout(drive, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            drive.sleepers -= 1;
        }
        true
    }
}

/// Polls the guest once, inside wasmtime-wasi's tokio runtime (its clocks
/// and file system need one).
fn poll_guest(guest: &mut GuestFuture, waker: &Waker) -> Poll<GuestEnd> {
    let mut cx = Context::from_waker(waker);
    wasmtime_wasi::runtime::with_ambient_tokio_runtime(|| guest.as_mut().poll(&mut cx))
}

/// Drops a guest that has not ended: wasmtime resumes its fiber once to
/// unwind it, then frees its memory and stack.
fn drop_guest(guest: GuestFuture) {
    wasmtime_wasi::runtime::with_ambient_tokio_runtime(move || drop(guest));
}

/// Counts a master thread inside the host for a guest (`WasiGuest::enter_host`).
pub struct InHost(Arc<Shared>);

impl Drop for InHost {
    fn drop(&mut self) {
        let mut drive = lock(&self.0.drive);
        drive.in_host -= 1;
        if drive.sleepers > 0 {
            self.0.changed.notify_all();
        }
    }
}

/// The store data of a guest.
pub struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    shared: Arc<Shared>,
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
    link.func_wrap_async(
        "send",
        |cx: StoreContextMut<'_, GuestState>, (frame,): (Vec<u8>,)| {
            let shared = Arc::clone(&cx.data().shared);
            Box::new(async move { shared.guest_sends(frame).await })
        },
    )?;
    link.func_wrap_async("recv", |cx: StoreContextMut<'_, GuestState>, (): ()| {
        let shared = Arc::clone(&cx.data().shared);
        Box::new(async move { Ok((shared.guest_receives().await?,)) })
    })?;
    Ok(())
}

/// A guest, as the master sees it.
pub struct WasiGuest {
    shared: Arc<Shared>,
    pub hello: Hello,
}

impl WasiGuest {
    /// Starts a guest and waits for its hello (driving it on this thread).
    pub fn start(config: GuestConfig, sink: Box<dyn Sink>) -> Result<WasiGuest> {
        let deadline = Instant::now() + config.handshake_timeout;
        let mut guest = WasiGuest::launch(&config, sink)?;
        while !guest.take_hello(deadline)? {
            if Instant::now() >= deadline {
                return Err(guest.no_hello(&config));
            }
        }
        Ok(guest)
    }

    /// Sets up a guest that has not run yet: the first drive instantiates
    /// it, then it sends its hello (`take_hello`).
    pub fn launch(config: &GuestConfig, sink: Box<dyn Sink>) -> Result<WasiGuest> {
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
        let now = Instant::now();
        // starting up counts as a call, from the first drive
        let mut ledger = Ledger::new(config.timeout, now);
        ledger.set_driven(false, now);
        let shared = Arc::new_cyclic(|me: &Weak<Shared>| Shared {
            twin_id: config.twin_id.clone(),
            paths: code.mounts.iter().map(|(_, g)| g.clone()).collect(),
            max_frame: config.max_frame,
            timeout: config.timeout,
            to_guest: FrameQueue::new(usize::MAX),
            from_guest: FrameQueue::with_readable_fd(MAX_QUEUED_BYTES)
                .expect("an eventfd for the guest's link"),
            ledger: Mutex::new(ledger),
            deadline: Mutex::new(None),
            stopping: AtomicBool::new(false),
            stop_reason: Mutex::new(None),
            end: Mutex::new(None),
            drive: Mutex::new(Drive {
                guest: None,
                woken: true,
                boundary: false,
                publish: false,
                drivers: 0,
                sleepers: 0,
                in_host: 0,
            }),
            changed: Condvar::new(),
            waker: Waker::from(Arc::new(GuestWaker(me.clone()))),
            output: output.clone(),
        });
        let wasi = wasi_context(config, &code, &output)?;
        let state = GuestState {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_limit: config.memory_limit,
                shared: Arc::clone(&shared),
            },
            shared: Arc::clone(&shared),
        };
        let mut store = Store::new(&rt.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(1);
        let ticking = Arc::clone(&shared);
        store.epoch_deadline_callback(move |_| ticking.on_tick());
        let ending = Arc::clone(&shared);
        let run = async move {
            let result = match loaded.pre.instantiate_async(&mut store).await {
                Ok(command) => command.wasi_cli_run().call_run(&mut store).await,
                Err(err) => Err(err),
            };
            drop(store);
            drop(code); // the private view of its code goes with it
            let end = describe_end(result, &ending);
            tracing::debug!(twin_id = %ending.twin_id, ?end, "guest ended");
            end
        };
        lock(&shared.drive).guest = Some(Box::pin(run));
        rt.register(&shared);
        Ok(WasiGuest {
            hello: Hello {
                cpy2py: 0,
                twin_id: String::new(),
                implementation: String::new(),
                version: String::new(),
                executable: String::new(),
                pid: 0,
            },
            shared,
        })
    }

    /// Drives the guest until its hello is there or `until` passes: Ok(true)
    /// once it is taken, Ok(false) if not yet; an error (the guest stopped)
    /// when it ended or sent something else.
    pub fn take_hello(&mut self, until: Instant) -> Result<bool> {
        self.shared.drive(Until::Frame, Some(until));
        match self.shared.from_guest.try_pop() {
            Popped::Frame(frame) => match parse_hello(&frame) {
                Ok(mut hello) => {
                    hello.pid = std::process::id(); // the guest lives in this process
                    self.hello = hello;
                    Ok(true)
                }
                Err(e) => {
                    self.kill();
                    Err(e)
                }
            },
            Popped::TimedOut => Ok(false),
            Popped::Closed => {
                let end = self.end().unwrap_or(GuestEnd::Killed);
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

    /// Stops a guest whose hello did not come within the handshake timeout;
    /// the error to report.
    pub fn no_hello(&self, config: &GuestConfig) -> HostError {
        self.kill();
        HostError::Spawn(format!(
            "the WASI guest did not answer the cpy2py handshake within {:.0} s \
             (raise handshake_timeout for very slow machines)",
            config.handshake_timeout.as_secs_f64()
        ))
    }

    /// Queues a frame for the guest (never waits; the guest takes it when a
    /// thread drives it); fails once the guest has ended.
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
            .map_err(|Closed| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the WASI guest has ended"))
    }

    /// The next frame from the guest, driving it on this thread for up to
    /// `timeout` (None: as long as it takes) until it sends one.
    pub fn recv(&self, timeout: Option<Duration>) -> Popped {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            match self.shared.from_guest.pop_and_publish() {
                Popped::TimedOut => {}
                popped => return popped,
            }
            if !self.shared.drive(Until::Frame, deadline) {
                return self.shared.from_guest.pop_and_publish();
            }
        }
    }

    /// The next frame if there is one, without driving the guest. Frames
    /// left after it are published on the readiness descriptor.
    pub fn try_recv(&self) -> Popped {
        self.shared.from_guest.pop_and_publish()
    }

    /// Drives the guest on this thread until it has sent a frame and waits,
    /// or ended (true), or until `until` (false).
    pub fn drive(&self, until: Instant) -> bool {
        self.shared.drive(Until::Frame, Some(until))
    }

    /// Runs the guest on this thread, unless another thread does, until it
    /// has dealt with what is queued for it (true), or until `until`.
    pub fn run_queued(&self, until: Instant) -> bool {
        self.shared.drive(Until::Settled, Some(until))
    }

    /// Whether another thread is running the guest right now (a frame
    /// queued for it is then taken in turn, without this thread's help).
    pub fn runs_elsewhere(&self) -> bool {
        lock(&self.shared.drive).guest.is_none() && !self.shared.has_ended()
    }

    /// Raises the readiness level if frames are left for other threads (a
    /// reader that leaves without taking one).
    pub fn publish(&self) {
        self.shared.from_guest.publish();
    }

    /// A descriptor readable while frames the guest sent wait for a reader
    /// other than the thread that drove it, or once the guest ended.
    pub fn readable_fd(&self) -> i32 {
        self.shared
            .from_guest
            .readable_fd()
            .expect("the guest's queue has a readiness descriptor")
    }

    /// How the guest ended, or None while it runs.
    pub fn end(&self) -> Option<GuestEnd> {
        lock(&self.shared.end).clone()
    }

    /// Drives the guest on this thread (or waits for the thread that does)
    /// up to `timeout` for it to end; how it ended, or None.
    pub fn wait(&self, timeout: Duration) -> Option<GuestEnd> {
        self.shared.drive(Until::End, Some(Instant::now() + timeout));
        self.end()
    }

    /// Stops the guest (if it still runs); how it ended. A guest that a
    /// thread drives meanwhile stops within an epoch tick, unless it is in a
    /// host call that does not suspend it (then when that returns).
    pub fn kill(&self) -> GuestEnd {
        if !self.shared.has_ended() {
            self.shared.stop(GuestEnd::Killed);
        }
        self.end().unwrap_or(GuestEnd::Killed)
    }

    /// Counts this thread as inside the host for this guest until the guard
    /// is dropped (see `wait_out_of_host`).
    pub fn enter_host(&self) -> InHost {
        lock(&self.shared.drive).in_host += 1;
        InHost(Arc::clone(&self.shared))
    }

    /// Threads counted by `enter_host` now.
    pub fn threads_in_host(&self) -> usize {
        lock(&self.shared.drive).in_host
    }

    /// Waits up to `timeout` until no thread counted by `enter_host` is in
    /// the host; whether none is.
    pub fn wait_out_of_host(&self, timeout: Duration) -> bool {
        self.shared.wait_out_of_host(timeout)
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
        // a guest never outlives its handle; in a forked child the copy is
        // left alone (its locks may be held by threads the fork did not copy)
        if !runtime::forked() {
            self.kill();
        }
    }
}

/// How the guest's `run` call ended.
fn describe_end(result: wasmtime::Result<std::result::Result<(), ()>>, shared: &Shared) -> GuestEnd {
    match result {
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
