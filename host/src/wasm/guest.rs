//! A guest as the master sees it (`WasiGuest`): how it is set up (its
//! store, its WASI world, its code view), its hello, and the calls the
//! pyo3 layer (python/wasi.rs) makes: queue a frame, drive the guest for a
//! frame or to its end, stop it. How it runs is driver.rs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{Store, Trap};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx};

use super::clocks;
use super::config::{
    GuestConfig, BUNDLED_MOUNT, KERNEL_MOUNT, MAX_QUEUED_BYTES, PYCACHE_MOUNT, STDLIB_MOUNT,
};
use super::driver::{lock, Claim, Drive, GuestWaker, InHost, Shared, Until};
use super::end::GuestEnd;
use super::frames_out::GuestStdout;
use super::imports::{GuestState, Limiter};
use super::ledger::Ledger;
use super::output::{GuestOutput, Sink, Which};
use super::queue::{Closed, FrameQueue, Popped};
use super::runtime;
use super::view::{self, CodeView};
use crate::error::{HostError, Result};
use crate::protocol::handshake::{parse_hello, Hello};
use crate::protocol::header::carried_out;

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
        // (without the pool as well: the limit is the policy, not only the pool's size)
        if rt.live_guests() >= runtime::max_guests() as usize {
            return Err(too_many_guests());
        }
        let loaded = rt.load_guest(&config.guest_file, &config.cache_dir.join("wasm"))?;
        let Prepared {
            shared,
            mut store,
            code,
            packages,
        } = prepare(config, sink)?;
        let ending = Arc::clone(&shared);
        let run = async move {
            let result = match loaded.pre.instantiate_async(&mut store).await {
                Ok(command) => {
                    rt.narrow_read_faults(); // (its slot may hold a new mapping of its image)
                    command.wasi_cli_run().call_run(&mut store).await
                }
                Err(err) => Err(err),
            };
            drop(store);
            drop(code); // the private view of its code goes with it
            drop(packages);
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
                plain_blocks: false,
                renditions: false,
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
                    self.shared.renditions.store(hello.renditions, Ordering::Relaxed);
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
                if matches!(&end, GuestEnd::Trap(what) if what.contains("concurrent")) {
                    return Err(too_many_guests()); // a slot still held by a guest that just ended
                }
                let hint = match end {
                    GuestEnd::Memory { .. } => end.advice(),
                    GuestEnd::Timeout(_) => {
                        " (pass a larger timeout= to TwinMaster or SandboxPool: the guest's start counts as a call)"
                    }
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
    /// thread drives it); fails once the guest has ended, and stops it when
    /// the answers to its requests it left unread pass its budget (ledger.rs).
    pub fn send(&self, frame: Vec<u8>) -> std::io::Result<()> {
        let ended = || {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                format!("the WASI guest {:?} has ended", self.shared.twin_id),
            )
        };
        if self.shared.has_ended() {
            return Err(ended());
        }
        let checked = self.shared.ledger().answering(&frame);
        if let Err(violation) = checked {
            self.shared.broke(violation); // (stops it; the import error it makes is nobody's)
            return Err(ended());
        }
        self.shared
            .to_guest
            .push(frame)
            .map_err(|Closed| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the WASI guest has ended"))
    }

    /// Queues `frame` for the guest (`send`). If it is one the guest acts on
    /// at once (`header::carried_out`) and no other thread runs the guest,
    /// returns a claim: the caller then runs the guest (`run_queued`) until
    /// it has dealt with the frame, holding the claim, so that a thread
    /// that only waits for the guest's end leaves the guest to it.
    pub fn hand(&self, frame: Vec<u8>) -> std::io::Result<Option<Claim>> {
        let claim = carried_out(&frame).then(|| self.claim());
        self.send(frame)?;
        Ok(claim.filter(|_| !self.runs_elsewhere()))
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

    /// The next frame if there is one, for a reader that takes all it finds
    /// or publishes what it leaves (queue.rs, `pop_for_reader`).
    pub fn take(&self) -> Popped {
        self.shared.from_guest.pop_for_reader()
    }

    /// Whether frames the guest sent wait to be taken (`recv` then returns
    /// one at once, without running the guest).
    pub fn has_frames(&self) -> bool {
        self.shared.from_guest.has_frames()
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

    /// Marks this thread as one that queues a frame and then runs the guest
    /// for it (`run_queued`): until the claim drops, a thread waiting for
    /// the guest's end leaves the guest to this one.
    pub fn claim(&self) -> Claim {
        lock(&self.shared.drive).claims += 1;
        Claim(Arc::clone(&self.shared))
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

    /// Charges the master's `time` on what the guest sent to the call it
    /// serves (Ledger::charge_master_time); whether that call is past its
    /// timeout now.
    pub fn charge_master_time(&self, time: Duration) -> bool {
        let mut ledger = self.shared.ledger();
        let over = ledger.charge_master_time(time, Instant::now());
        self.shared.update_deadline(&ledger);
        over
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

/// A guest's store and what it needs, before it runs anything: its shared
/// state, its WASI world and limits, and the views it mounts (they go when
/// the guest ends). Both a guest (`WasiGuest::launch`) and a snapshot of one
/// (snapshot.rs) run in such a store.
pub(super) struct Prepared {
    pub(super) shared: Arc<Shared>,
    pub(super) store: Store<GuestState>,
    pub(super) code: Arc<CodeView>,
    pub(super) packages: Arc<CodeView>,
}

pub(super) fn prepare(config: &GuestConfig, sink: Box<dyn Sink>) -> Result<Prepared> {
    let rt = runtime::runtime()?;
    if !config.stdlib_dir.join("os.py").is_file() {
        return Err(HostError::Spawn(format!(
            "the WASI guest's Python standard library is missing in {} (it is built with the guest): \
             run `just wasm`",
            config.stdlib_dir.display()
        )));
    }
    let views = config.cache_dir.join("views");
    view::remove_stale_views(&views);
    let code = view::shared_code_view(&config.paths, &views)?;
    let packages = view::shared_package_view(&config.packages, &config.packages_stamp, &views)?;
    let mut guest_paths: Vec<&String> = Vec::new();
    for (_, guest_path) in code.mounts.iter().chain(&packages.mounts) {
        if guest_path == "/"
            || [STDLIB_MOUNT, BUNDLED_MOUNT, PYCACHE_MOUNT]
                .iter()
                .any(|m| guest_path.starts_with(m))
        {
            return Err(HostError::Spawn(format!(
                "sandbox path {guest_path} overlaps the guest's own mounts ({STDLIB_MOUNT}, {BUNDLED_MOUNT}, \
                 {PYCACHE_MOUNT}); move the code elsewhere"
            )));
        }
        if guest_paths.contains(&guest_path) {
            return Err(HostError::Spawn(format!(
                "{guest_path} is given to the guest twice (in paths and as the directory of its packages): \
                 keep the guest's own code in a directory of its own"
            )));
        }
        guest_paths.push(guest_path);
    }
    let output = GuestOutput::new(&config.twin_id, config.output_limit, sink);
    let now = Instant::now();
    // starting up counts as a call, from the first drive
    let mut ledger = Ledger::new(config.timeout, now);
    ledger.set_driven(false, now);
    ledger.set_answer_budget(config.memory_limit);
    let shared = Arc::new_cyclic(|me: &Weak<Shared>| Shared {
        twin_id: config.twin_id.clone(),
        paths: guest_paths.into_iter().cloned().collect(),
        max_frame: config.max_frame,
        timeout: config.timeout,
        to_guest: FrameQueue::new(usize::MAX),
        from_guest: FrameQueue::with_readable_fd(MAX_QUEUED_BYTES).expect("an eventfd for the guest's link"),
        ledger: Mutex::new(ledger),
        renditions: AtomicBool::new(false),
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
            busy: 0,
            claims: 0,
            sleepers: 0,
            idle_sleepers: 0,
            in_host: 0,
        }),
        changed: Condvar::new(),
        idle: Condvar::new(),
        waker: Waker::from(Arc::new(GuestWaker(me.clone()))),
        output: output.clone(),
    });
    let stdout = GuestStdout::new(output.stream(Which::Stdout), Arc::downgrade(&shared));
    let wasi = wasi_context(config, &code, &packages, &output, stdout)?;
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
    Ok(Prepared {
        shared,
        store,
        code,
        packages,
    })
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

fn too_many_guests() -> HostError {
    HostError::Spawn(format!(
        "at most {} WASI guests can run at once in one process (each takes a slot of the host's pool): \
         stop guests you no longer need, or set CPY2PY_WASI_MAX_GUESTS before the first guest starts",
        runtime::max_guests()
    ))
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
/// its frames and output to the master (stdout carries both: frames_out.rs), coarse clocks, and nothing else: no
/// environment, no arguments, no stdin, no network.
fn wasi_context(
    config: &GuestConfig,
    code: &CodeView,
    packages: &CodeView,
    output: &GuestOutput,
    stdout: GuestStdout,
) -> Result<WasiCtx> {
    let mut wasi = WasiCtx::builder();
    wasi.stdout(stdout)
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
    if let Some(pycache) = config.pycache_dir.as_deref().filter(|d| d.is_dir()) {
        mount(&mut wasi, pycache, PYCACHE_MOUNT)?;
    }
    for (host, guest) in code.mounts.iter().chain(&packages.mounts) {
        mount(&mut wasi, host, guest)?;
    }
    Ok(wasi.build())
}
