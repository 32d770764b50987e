//! How a guest runs: on the thread of whoever needs it. `Shared` is the
//! state the guest's fiber, the master's threads and the epoch ticker
//! share: the frame queues to and from the master, the guest's `Ledger`,
//! how it ends, and who drives it.
//!
//! The guest's `wasi:cli/run` is one asynchronous call (wasmtime's
//! `call_async`) that runs on a fiber, a stack of its own. Nothing runs it
//! in the background: a master thread *drives* it (`Shared::drive`),
//! switching to the fiber on its own thread, so a call costs no thread
//! hand-off. Who drives: the thread that sends the guest a request or an
//! answer carries it out at once (python/wasi.rs, `send`), unless another
//! thread drives the guest; a thread that needs a frame from the guest
//! (`recv`) drives it until it has one; `wait` until it ends. Only one
//! thread polls the guest at a time; the others wait for it. A thread in
//! `wait` runs the guest only when no other thread does or is about to (a
//! timer fired while nobody calls): it sleeps through ordinary calls. The
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
//! are queued and so is one for it (`link.recv` then suspends it once: it
//! is done with them; with nothing queued for it, it simply waits), or
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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use wasmtime::UpdateDeadline;

use super::end::GuestEnd;
use super::ledger::{Ledger, Violation};
use super::output::GuestOutput;
use super::queue::FrameQueue;

/// How long a driver runs the guest before it looks up (for a signal in
/// the master, or to hand over a frame that is ready while the guest runs on).
pub const DRIVE_SLICE: Duration = Duration::from_millis(50);

/// The guest's `run` call, suspended whenever the guest waits.
pub(super) type GuestFuture = Pin<Box<dyn Future<Output = GuestEnd> + Send>>;

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
pub(super) struct Drive {
    /// The suspended guest; None while a thread polls it, and once it ended.
    pub(super) guest: Option<GuestFuture>,
    /// The guest can make progress (woken by a frame for it, queue room, a
    /// timer, an epoch tick); false while it waits.
    pub(super) woken: bool,
    /// The last poll ended as the guest asked for its next frame while
    /// frames it sent were queued (see `Shared::guest_receives`).
    pub(super) boundary: bool,
    /// The thread polling the guest takes none of its frames (it waits for
    /// the end): they are published as they are queued.
    pub(super) publish: bool,
    /// Threads inside `drive` (the guest's clock runs while there are any).
    pub(super) drivers: usize,
    /// Threads inside `drive` for a frame or until the guest settled (all
    /// but those waiting for its end).
    pub(super) busy: usize,
    /// Threads that queue a frame and run the guest for it next (`claim`).
    pub(super) claims: usize,
    /// Threads waiting on `Shared::changed`.
    pub(super) sleepers: usize,
    /// Threads waiting for the guest's end on `Shared::idle`.
    pub(super) idle_sleepers: usize,
    /// Threads of the master inside the host for this guest with the GIL
    /// released (python/wasi.rs), counted until they hold it again.
    pub(super) in_host: usize,
}

/// State shared by the guest's fiber, the master's threads and the ticker.
pub struct Shared {
    pub twin_id: String,
    pub(super) paths: Vec<String>,
    pub(super) max_frame: usize,
    pub(super) timeout: Option<Duration>,
    pub(super) to_guest: FrameQueue,
    pub(super) from_guest: FrameQueue,
    pub(super) ledger: Mutex<Ledger>,
    /// The guest's hello asked for renditions of the master's messages
    /// (protocol/rendition.rs), which it is given as it takes them.
    pub(super) renditions: AtomicBool,
    /// When the open calls' running time passes the timeout if the guest
    /// keeps running (from its `Ledger`); None while it is blocked in `recv`
    /// or `send`, or nobody drives it. Read by the epoch callback, the
    /// driver and the watchdog.
    pub(super) deadline: Mutex<Option<Instant>>,
    /// Set once the host decided to stop the guest, with the reason.
    pub(super) stopping: AtomicBool,
    pub(super) stop_reason: Mutex<Option<GuestEnd>>,
    pub(super) end: Mutex<Option<GuestEnd>>,
    pub(super) drive: Mutex<Drive>,
    /// Signals every change of `drive` or `end` a thread may wait for.
    pub(super) changed: Condvar,
    /// Wakes threads that wait for the guest's end (`Until::End`): it ended,
    /// or it can go on (or has a deadline to keep) and no other thread runs
    /// it or is about to. Not every change: a host process's relay sends the
    /// guest its requests and runs them itself, and a thread that only
    /// waits for the end woke for each (cpy2py/ray_sandbox.py).
    pub(super) idle: Condvar,
    pub(super) waker: Waker,
    pub(super) output: GuestOutput,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wakes the guest: a frame for it, room for its frame, a timer, a tick.
pub(super) struct GuestWaker(pub(super) Weak<Shared>);

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
            shared.wake_idle(&drive);
        }
    }
}

impl Shared {
    /// Records why the host stops the guest (the first reason wins), drops
    /// the guest if nobody drives it, and closes the link, so the master
    /// learns at once. A driver drops the guest when its poll returns.
    pub(super) fn stop(&self, reason: GuestEnd) {
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

    pub(super) fn stop_reason(&self) -> Option<GuestEnd> {
        lock(&self.stop_reason).clone()
    }

    /// The guest is over: record how (the first word wins), close both
    /// queues, wake every thread that waits for it.
    pub(super) fn finish(&self, end: GuestEnd) {
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
        self.idle.notify_all();
    }

    /// Caller holds `drive`: wakes a thread waiting for the end if the guest
    /// needs one (it can go on, or runs a call whose deadline must be kept)
    /// and no other thread drives it or is about to.
    pub(super) fn wake_idle(&self, drive: &Drive) {
        if drive.idle_sleepers > 0
            && drive.busy == 0
            && drive.claims == 0
            && (drive.woken || lock(&self.deadline).is_some())
        {
            self.idle.notify_all();
        }
    }

    pub fn has_ended(&self) -> bool {
        lock(&self.end).is_some()
    }

    /// Called on every epoch tick while wasm runs: stops the guest if it is
    /// being stopped or past its deadline, else suspends it for a moment so
    /// that its driver can look up.
    pub(super) fn on_tick(&self) -> wasmtime::Result<UpdateDeadline> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(wasmtime::Error::msg("the guest is being stopped by the host"));
        }
        if self.overdue(Instant::now(), Duration::ZERO) {
            return Err(wasmtime::Error::msg("the guest ran past its call timeout"));
        }
        Ok(UpdateDeadline::Yield(1))
    }

    /// Stops the guest if its deadline passed `grace` ago; whether it did.
    pub(super) fn overdue(&self, now: Instant, grace: Duration) -> bool {
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

    pub(super) fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    /// Caller holds the ledger: the deadline follows it.
    pub(super) fn update_deadline(&self, ledger: &Ledger) {
        *lock(&self.deadline) = ledger.deadline();
    }

    /// The guest blocks in an import: its clock stops.
    pub(super) fn block(&self) {
        let mut ledger = self.ledger();
        ledger.pause(Instant::now());
        self.update_deadline(&ledger);
    }

    pub(super) fn unblock(&self) {
        let mut ledger = self.ledger();
        ledger.resume(Instant::now());
        self.update_deadline(&ledger);
    }

    /// Stops the guest for breaking a rule of the link; the error for its import.
    pub(super) fn broke(&self, violation: Violation) -> wasmtime::Error {
        tracing::debug!(twin_id = %self.twin_id, %violation, "guest broke the link's rules: stopped");
        let message = format!("the guest {violation}");
        self.stop(GuestEnd::Broke(violation));
        wasmtime::Error::msg(message)
    }

    /// Runs the guest on this thread until `until` holds (true) or
    /// `deadline` passes (false). If another thread drives the guest, waits
    /// for it instead. See the module docs for when the guest's work after a
    /// frame runs.
    pub(super) fn drive(&self, until: Until, deadline: Option<Instant>) -> bool {
        super::trap_handlers::keep(); // (a guest's trap must end that guest only)

        // a thread that waits for the end runs the guest only when no other
        // thread does or is about to (see `idle`)
        let for_end = until == Until::End;
        let mut drive = lock(&self.drive);
        drive.drivers += 1;
        if drive.drivers == 1 {
            self.set_driven(true);
        }
        if !for_end {
            drive.busy += 1;
        }
        let holds = loop {
            if self.has_ended() {
                break true;
            }
            let polling = drive.guest.is_none() // by another thread
                || for_end && (drive.busy > 0 || drive.claims > 0);
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
            let (condvar, sleepers) = if for_end {
                (&self.idle, &mut drive.idle_sleepers)
            } else {
                (&self.changed, &mut drive.sleepers)
            };
            *sleepers += 1;
            drive = match wake_at {
                None => condvar.wait(drive).unwrap_or_else(|e| e.into_inner()),
                Some(at) => {
                    let left = at.saturating_duration_since(now);
                    condvar
                        .wait_timeout(drive, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
            if for_end {
                drive.idle_sleepers -= 1;
            } else {
                drive.sleepers -= 1;
            }
        };
        drive.drivers -= 1;
        if drive.drivers == 0 {
            self.set_driven(false);
        }
        if !for_end {
            drive.busy -= 1;
            self.wake_idle(&drive); // (what this thread leaves undone)
        }
        holds
    }

    /// Caller holds `drive`: whether a thread drives the guest.
    pub(super) fn set_driven(&self, driven: bool) {
        let mut ledger = self.ledger();
        ledger.set_driven(driven, Instant::now());
        self.update_deadline(&ledger);
    }

    /// Waits up to `timeout` until no thread counted by `enter_host` is
    /// inside the host; whether none is.
    pub(super) fn wait_out_of_host(&self, timeout: Duration) -> bool {
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

/// A thread that queues a frame and runs the guest for it next
/// (`WasiGuest::claim`), until dropped.
pub struct Claim(pub(super) Arc<Shared>);

impl Drop for Claim {
    fn drop(&mut self) {
        let mut drive = lock(&self.0.drive);
        drive.claims -= 1;
        self.0.wake_idle(&drive);
    }
}

/// Counts a master thread inside the host for a guest (`WasiGuest::enter_host`).
pub struct InHost(pub(super) Arc<Shared>);

impl Drop for InHost {
    fn drop(&mut self) {
        let mut drive = lock(&self.0.drive);
        drive.in_host -= 1;
        if drive.sleepers > 0 {
            self.0.changed.notify_all();
        }
    }
}
