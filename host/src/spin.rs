//! Waiting for a twin's reply by polling its pipe for a moment before
//! sleeping, when the twin can run on another CPU meanwhile.
//!
//! A thread that sleeps until the reply comes pays for being woken: on
//! another CPU than the twin's, the kernel wakes an idle CPU (on a virtual
//! machine, a trap to the hypervisor), which on this project's 2-core VM
//! added about a fifth to a no-op call (benches/README.md, "Polling a
//! moment for the reply"). A reply that comes within `spin_for()` is taken
//! without that. The poll yields the CPU between looks, so that a twin (or
//! anything else) waiting for this CPU runs first.
//!
//! Only where it can pay: the thread may run on two CPUs or more (pinned to
//! one, the twin could not run while it polls), and the link's last reply
//! came soon enough (a link whose calls take longer sleeps at once, until
//! one is quick again). `CPY2PY_SPIN_US` sets the moment (0: never poll).

use std::cell::Cell;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::pipe;

/// How long a reply is polled for unless `CPY2PY_SPIN_US` says otherwise: a
/// no-op call's reply takes 10-30 us, which polling this long catches.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// The moment polled for (read once per process).
pub fn spin_for() -> Duration {
    static SPIN: OnceLock<Duration> = OnceLock::new();
    *SPIN.get_or_init(|| {
        std::env::var("CPY2PY_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|us| Duration::from_micros(us.min(10_000)))
            .unwrap_or(DEFAULT_SPIN)
    })
}

/// A wait up to this many moments long is taken as quick: one that slept
/// includes the wake-up (tens of microseconds on a VM), which must not
/// keep a link whose replies come in time from polling again.
const QUICK: u32 = 4;

/// A link's memory of how soon its replies come.
pub struct ReplySpin {
    /// the last wait ended within `QUICK` moments (so the next may too)
    quick: AtomicBool,
}

impl Default for ReplySpin {
    fn default() -> Self {
        ReplySpin {
            quick: AtomicBool::new(true),
        }
    }
}

impl ReplySpin {
    /// Whether polling can pay now: a moment is set, the last wait was
    /// quick, and this thread may run on another CPU than the peer.
    pub fn worth_polling(&self) -> bool {
        !spin_for().is_zero() && self.quick.load(Ordering::Relaxed) && other_cpus()
    }

    /// Before a wait for `fd` that began at `started`: polls it for up to
    /// the moment if that can pay; whether it became readable (or hung up).
    pub fn poll(&self, fd: RawFd, started: Instant) -> bool {
        self.worth_polling() && self.poll_for(fd, started)
    }

    /// Polls `fd` until it is readable (true) or the moment since `started`
    /// has passed (false), yielding the CPU between looks.
    pub fn poll_for(&self, fd: RawFd, started: Instant) -> bool {
        let spin = spin_for();
        loop {
            match pipe::poll_readable(fd, Some(Duration::ZERO)) {
                Ok(Some(true)) | Err(_) => return true, // (an error: the wait says what)
                Ok(_) => {}
            }
            if started.elapsed() >= spin {
                return false;
            }
            // SAFETY: no arguments
            unsafe { libc::sched_yield() };
        }
    }

    /// After a wait that began at `started` ended with something to read.
    pub fn waited(&self, started: Instant) {
        self.waited_for(started.elapsed());
    }

    /// After a wait of `took` that ended with something to read.
    pub fn waited_for(&self, took: Duration) {
        let quick = took <= QUICK * spin_for();
        if self.quick.load(Ordering::Relaxed) != quick {
            self.quick.store(quick, Ordering::Relaxed);
        }
    }
}

/// Whether this thread may run on another CPU than the one it is on (its
/// affinity and the process's CPU quota: `available_parallelism`), looked
/// up at most once a second per thread.
fn other_cpus() -> bool {
    thread_local! {
        static FOUND: Cell<Option<(Instant, bool)>> = const { Cell::new(None) };
    }
    FOUND.with(|found| {
        let now = Instant::now();
        match found.get() {
            Some((at, other)) if now.duration_since(at) < Duration::from_secs(1) => other,
            _ => {
                let other = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
                found.set(Some((now, other)));
                other
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_reply_written_while_it_polls_is_seen_without_sleeping() {
        if !other_cpus() {
            eprintln!("skipped: this thread may run on one CPU only, where it never polls");
            return;
        }
        let (reader, mut writer) = std::io::pipe().unwrap();
        let spin = ReplySpin::default();
        let writing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_micros(5));
            writer.write_all(b"x").unwrap();
            writer
        });
        let started = Instant::now();
        // (the moment is 50 us unless the environment says otherwise: polled
        // again until the write, which the thread makes within a few ms)
        let mut seen = spin.poll(reader.as_raw_fd(), started);
        while !seen && started.elapsed() < Duration::from_secs(5) {
            seen = spin.poll(reader.as_raw_fd(), Instant::now());
        }
        assert!(seen, "the write was seen by polling");
        drop(writing.join());
    }

    #[test]
    fn a_slow_reply_stops_the_polling_until_a_quick_one() {
        let (reader, _writer) = std::io::pipe().unwrap();
        let spin = ReplySpin::default();
        spin.waited(Instant::now() - Duration::from_secs(1));
        assert!(!spin.quick.load(Ordering::Relaxed), "a slow reply: no polling");
        assert!(!spin.poll(reader.as_raw_fd(), Instant::now()));
        spin.waited(Instant::now());
        assert!(spin.quick.load(Ordering::Relaxed), "a quick reply: polling again");
    }
}
