//! Waiting for a twin's reply by polling its pipe for a moment before
//! sleeping, when the twin can run on another CPU meanwhile.
//!
//! A thread that sleeps until the reply comes pays for being woken: on
//! another CPU than the twin's, the kernel wakes an idle CPU (on a virtual
//! machine, a trap to the hypervisor), which on this project's 2-core VM
//! added a third or more to a no-op call (benches/README.md, "Polling a
//! moment for the reply"). A reply that comes within `spin_for()` is taken
//! without that. The poll yields the CPU between looks, so that a twin (or
//! anything else) waiting for this CPU runs first.
//!
//! Only where it can pay: the thread may run on two CPUs or more (pinned to
//! one, the twin could not run while it polls), and the link's last replies
//! came while it polled (a link whose calls take longer sleeps at once,
//! until one is quick again). `CPY2PY_SPIN_US` sets the moment (0: never
//! poll). A link whose replies come just after the moment (a slower host)
//! polls up to `LONGEST` moments. The master's main thread polls for native twins' replies
//! (native.rs), and CPython twins' servers for requests (python/moment.rs).

use std::cell::Cell;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
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

/// A link's memory of how soon its replies come.
pub struct ReplySpin {
    /// how well polling did lately, from `-SCORE_LIMIT` to `SCORE_LIMIT`: up
    /// for each reply that came while polled for (or, not polled for, within
    /// two moments of sleeping: it would have), down for each that did not;
    /// polled for while above 0
    score: AtomicI32,
    /// how long this link polls, in nanoseconds: from `spin_for()` up to
    /// `LONGEST` times it
    moment_ns: AtomicU64,
}

/// How far the score goes either way: after a run of slow replies, this
/// many quick ones (plus one) before it polls again, and the other way round.
const SCORE_LIMIT: i32 = 4;

/// The longest moment, in moments of `spin_for()`. A reply that came after
/// the moment but within this many (its wake-up included) doubles the
/// link's moment up to it: on a VM three times slower than the one the
/// default was set on, a python3 twin's no-op reply took 60-150 us, and
/// waking a sleeping CPU there cost about 100 us more (benches/README.md).
const LONGEST: u32 = 8;

impl Default for ReplySpin {
    fn default() -> Self {
        ReplySpin {
            score: AtomicI32::new(SCORE_LIMIT),
            moment_ns: AtomicU64::new(spin_for().as_nanos() as u64),
        }
    }
}

/// One wait for a reply: when it began, and what polling found.
#[derive(Clone, Copy)]
pub struct Moment {
    started: Instant,
    /// not polled for (None), or polled: the index of the descriptor found
    /// readable, None when the moment ran out
    polled: Option<Option<usize>>,
    /// found readable at the first look: it was there before the wait (an
    /// awaited call's read after its wait), which says nothing of how soon
    /// replies come
    at_once: bool,
}

impl Moment {
    /// A wait that begins now, not polled for.
    pub fn unpolled() -> Moment {
        Moment {
            started: Instant::now(),
            polled: None,
            at_once: false,
        }
    }

    /// The descriptor (its index) that polling found readable.
    pub fn ready(&self) -> Option<usize> {
        self.polled.flatten()
    }
}

impl ReplySpin {
    /// Whether polling can pay now: a moment is set, the recent replies were
    /// quick, and this thread may run on another CPU than the peer.
    pub fn worth_polling(&self) -> bool {
        !spin_for().is_zero() && self.score.load(Ordering::Relaxed) > 0 && other_cpus()
    }

    /// Begins a wait for any of `fds`: polls them for the moment (or until
    /// `deadline`, if sooner), yielding the CPU between looks, if that can
    /// pay. An error counts as the first readable: the wait after says what.
    pub fn poll<const N: usize>(&self, fds: [RawFd; N], deadline: Option<Instant>) -> Moment {
        let mut moment = Moment::unpolled();
        if !self.worth_polling() {
            return moment;
        }
        let end = moment.started + self.moment();
        let end = deadline.map_or(end, |deadline| deadline.min(end));
        let mut first = true;
        moment.polled = Some(loop {
            match pipe::poll_all(fds, libc::POLLIN, Some(Duration::ZERO)) {
                Ok(Some(revents)) => {
                    if let Some(found) = revents.iter().position(|&r| r != 0) {
                        moment.at_once = first;
                        break Some(found);
                    }
                }
                Ok(None) => {} // (a signal: held, or a handler the caller runs after)
                Err(_) => break Some(0),
            }
            if Instant::now() >= end {
                break None;
            }
            first = false;
            // SAFETY: no arguments
            unsafe { libc::sched_yield() };
        });
        moment
    }

    /// How long this link polls now.
    pub fn moment(&self) -> Duration {
        Duration::from_nanos(self.moment_ns.load(Ordering::Relaxed))
    }

    /// The wait `moment` began ended with something to read (what was
    /// there at its first look counts for nothing). A reply that
    /// came just after the poll (within `LONGEST` moments of its start)
    /// doubles the link's moment, up to that; one found within a quarter
    /// of the moment shortens it by an eighth, down to `spin_for()`. A link
    /// whose replies outlast even the longest poll sleeps at once (its
    /// calls take longer: polling would only cost CPU), until replies come
    /// within two moments of sleeping (the wake-up included) again.
    pub fn waited(&self, moment: &Moment) {
        let (now, elapsed) = (self.moment(), moment.started.elapsed());
        let longest = spin_for() * LONGEST;
        let quick = match moment.polled {
            Some(Some(_)) if moment.at_once => return,
            Some(Some(_)) => {
                if elapsed < now / 4 && now > spin_for() {
                    self.set_moment((now - now / 8).max(spin_for()));
                }
                true
            }
            Some(None) if elapsed <= longest && now < longest => {
                self.set_moment((now * 2).min(longest));
                return; // (it would have been found: no step down for it)
            }
            Some(None) => false,
            None => elapsed <= 2 * now,
        };
        let score = self.score.load(Ordering::Relaxed);
        let next = (score + if quick { 1 } else { -1 }).clamp(-SCORE_LIMIT, SCORE_LIMIT);
        if next != score {
            self.score.store(next, Ordering::Relaxed); // (a race loses a step: harmless)
        }
    }

    fn set_moment(&self, moment: Duration) {
        self.moment_ns.store(moment.as_nanos() as u64, Ordering::Relaxed); // (as the score)
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
        let mut seen = spin.poll([reader.as_raw_fd()], None).ready();
        while seen.is_none() && started.elapsed() < Duration::from_secs(5) {
            seen = spin.poll([reader.as_raw_fd()], None).ready();
        }
        let seen = seen == Some(0);
        assert!(seen, "the write was seen by polling");
        drop(writing.join());
    }

    #[test]
    fn replies_that_outlast_the_poll_stop_the_polling_until_quick_ones_come() {
        let spin = ReplySpin::default();
        let polls = |spin: &ReplySpin| spin.score.load(Ordering::Relaxed) > 0;
        let moment = |polled, ago| Moment {
            started: Instant::now() - ago,
            polled,
            at_once: false,
        };
        let (in_vain, found, slept) = (Some(None), Some(Some(0)), None);
        let long_after = Duration::from_secs(1);
        assert!(polls(&spin), "a new link polls");
        spin.waited(&moment(in_vain, long_after));
        assert!(
            polls(&spin),
            "one reply that outlasted the poll is not enough to stop"
        );
        for _ in 0..SCORE_LIMIT {
            spin.waited(&moment(in_vain, long_after));
        }
        assert!(!polls(&spin), "replies that outlast the poll: it sleeps at once");
        assert!(spin.poll([-1], None).polled.is_none(), "not polled for");
        for _ in 0..2 * SCORE_LIMIT {
            spin.waited(&moment(slept, Duration::from_secs(1)));
        }
        assert!(!polls(&spin), "slow replies after sleeping: still not");
        for _ in 0..SCORE_LIMIT {
            spin.waited(&moment(slept, Duration::ZERO));
        }
        assert!(
            !polls(&spin),
            "the quick replies it takes to poll again: one more than the limit"
        );
        spin.waited(&moment(slept, Duration::ZERO));
        assert!(polls(&spin), "quick replies after sleeping: it polls again");
        spin.waited(&moment(found, Duration::ZERO));
        assert!(polls(&spin), "found while polled for: it goes on");
    }

    #[test]
    fn replies_just_after_the_moment_lengthen_it_and_quick_ones_shorten_it() {
        if spin_for().is_zero() {
            eprintln!("skipped: CPY2PY_SPIN_US=0 turns polling off");
            return;
        }
        let spin = ReplySpin::default();
        let base = spin_for();
        let longest = base * LONGEST;
        let ran_out = |ago| Moment {
            started: Instant::now() - ago,
            polled: Some(None),
            at_once: false,
        };
        assert_eq!(spin.moment(), base, "a new link polls for the set moment");
        spin.waited(&ran_out(base + base / 2));
        assert_eq!(
            spin.moment(),
            2 * base,
            "a reply just after the moment doubles it"
        );
        let mut doublings = 0;
        while spin.moment() < longest && doublings < LONGEST {
            spin.waited(&ran_out(spin.moment() + base / 2));
            doublings += 1;
        }
        assert_eq!(spin.moment(), longest, "up to the longest moment");
        assert_eq!(doublings, LONGEST.ilog2() - 1, "doubled each time");
        assert!(
            spin.score.load(Ordering::Relaxed) > 0,
            "replies that came while it grew do not stop the polling"
        );
        for _ in 0..SCORE_LIMIT {
            spin.waited(&ran_out(longest + base));
        }
        assert!(
            spin.score.load(Ordering::Relaxed) <= 0,
            "replies that outlast even the longest moment stop it"
        );
        let there_before = Moment {
            started: Instant::now(),
            polled: Some(Some(0)),
            at_once: true,
        };
        spin.waited(&there_before);
        assert_eq!(
            spin.moment(),
            longest,
            "a reply there before the wait says nothing"
        );
        let found = Moment {
            at_once: false,
            ..there_before
        };
        for _ in 0..100 {
            spin.waited(&found);
        }
        assert_eq!(
            spin.moment(),
            base,
            "quick replies shorten it back, to the set moment"
        );
        assert!(spin.score.load(Ordering::Relaxed) > 0, "and polling goes on");
    }

    #[test]
    fn a_thread_pinned_to_one_cpu_never_polls() {
        std::thread::spawn(|| {
            // SAFETY: this new thread's own affinity, to the CPU it is on
            unsafe {
                let mut one: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(libc::sched_getcpu().max(0) as usize, &mut one);
                assert_eq!(
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one),
                    0
                );
            }
            let spin = ReplySpin::default();
            assert!(!spin.worth_polling(), "the peer could not run while it polled");
            assert!(spin.poll([-1], None).polled.is_none(), "not polled for");
        })
        .join()
        .unwrap();
    }
}
