//! `MomentPoll`: where a link's idle servers wait for the peer's next
//! request (the kernel's gate, an epoll descriptor), polled for a moment
//! before the server sleeps, as the host polls for a native twin's reply
//! (crate::spin). For the gates of CPython processes (twins and the master);
//! PyPy and the guest have no compiled host.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use pyo3::prelude::*;

use super::host_calls::in_host;
use crate::spin::ReplySpin;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<MomentPoll>()
}

#[pyclass(module = "cpy2py._host", frozen)]
#[derive(Default)]
pub struct MomentPoll {
    spin: ReplySpin,
    /// a server polls now: the others sleep at once (one CPU is enough)
    polling: AtomicBool,
    /// when the wait that `waited` ends began, and whether it was polled
    /// for in vain
    started: Mutex<Option<(Instant, bool)>>,
}

#[pymethods]
impl MomentPoll {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Before a server sleeps until `fd` is readable: polls it for a
    /// moment, with the GIL released, where that can pay (crate::spin);
    /// whether it became readable. The wait's start is kept for `waited`.
    /// A signal handler made due meanwhile runs before it returns, as it
    /// would have interrupted the sleep (what it raises comes out of here).
    fn poll(&self, py: Python<'_>, fd: i32) -> PyResult<bool> {
        let started = Instant::now();
        let keep =
            |ran_out| *self.started.lock().unwrap_or_else(|e| e.into_inner()) = Some((started, ran_out));
        // (pinned to one CPU, a server sleeps at once: the GIL is kept)
        if !self.spin.worth_polling() || self.polling.swap(true, Ordering::Acquire) {
            keep(false);
            return Ok(false);
        }
        let ready = in_host(py, || self.spin.poll_for(fd, started));
        self.polling.store(false, Ordering::Release);
        keep(!ready);
        py.check_signals()?;
        Ok(ready)
    }

    /// The wait that began at the last `poll` ended with something to read.
    fn waited(&self) {
        if let Some((started, ran_out)) = self.started.lock().unwrap_or_else(|e| e.into_inner()).take() {
            self.spin.waited(started, ran_out);
        }
    }
}
