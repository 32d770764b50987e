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
/// holds the GIL again.
pub fn in_host<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
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
#[pyfunction]
pub fn wait_out_of_host(py: Python<'_>, timeout: f64) -> bool {
    let deadline = Instant::now() + seconds(timeout);
    py.detach(|| loop {
        if IN_HOST.load(Ordering::SeqCst) == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    })
}

/// A duration in seconds from Python; negative counts as zero.
pub fn seconds(value: f64) -> Duration {
    Duration::from_secs_f64(value.max(0.0))
}
