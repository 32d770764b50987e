//! Calls into the host with the GIL released, counted so that the master's
//! exit can wait until every such thread holds the GIL again.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

/// Threads inside a blocking call of the host with the GIL released.
static IN_HOST: AtomicUsize = AtomicUsize::new(0);

/// The master is exiting: waits that go on in slices (`wasi.rs`,
/// `interruptible`) end instead of entering the host again.
static EXITING: AtomicBool = AtomicBool::new(false);

/// Says that the master is exiting (its exit hook, `kill_all_twins`).
pub fn set_exiting() {
    EXITING.store(true, Ordering::SeqCst);
}

/// Whether the master is exiting (see [`set_exiting`]).
pub fn exiting() -> bool {
    EXITING.load(Ordering::SeqCst)
}

/// Runs `f` with the GIL released, counted in [`IN_HOST`] until the thread
/// holds the GIL again. Once the master exits, `f` runs with the GIL held:
/// a thread that took it back inside the host after the exit hook's wait
/// (below) would be ended there by CPython, the interpreter finalizing, and
/// abort the process (what it waits for, the twins, is gone by then). The
/// check and the count happen with the GIL held, as [`set_exiting`] does.
pub fn in_host<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    if exiting() {
        return f();
    }
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
///
/// The count is read with the GIL held: a thread changes it only while it
/// holds the GIL (entering, and leaving once it took the GIL back), so a
/// zero seen here is not a thread between two waits that is about to
/// enter again (read without the GIL, it was: the process aborted).
#[pyfunction]
pub fn wait_out_of_host(py: Python<'_>, timeout: f64) -> bool {
    let deadline = Instant::now() + seconds(timeout);
    loop {
        if IN_HOST.load(Ordering::SeqCst) == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        py.detach(|| std::thread::sleep(Duration::from_millis(1)));
    }
}

/// A duration in seconds from Python; negative counts as zero.
pub fn seconds(value: f64) -> Duration {
    Duration::from_secs_f64(value.max(0.0))
}
