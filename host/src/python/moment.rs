//! `MomentPoll`: where a link's idle servers wait for the peer's next
//! request (the kernel's gate, an epoll descriptor), polled for a moment
//! before the server sleeps, as the host polls for a native twin's reply
//! (crate::spin). For the gates of CPython processes (twins and the master);
//! PyPy and the guest have no compiled host.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use pyo3::prelude::*;

use super::host_calls::in_host;
use crate::spin::{Moment, ReplySpin};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<MomentPoll>()
}

#[pyclass(module = "cpy2py._host", frozen)]
#[derive(Default)]
pub struct MomentPoll {
    spin: ReplySpin,
    /// a server polls now: the others sleep at once (one CPU is enough)
    polling: AtomicBool,
    /// the wait that `waited` ends
    moment: Mutex<Option<Moment>>,
}

#[pymethods]
impl MomentPoll {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Before a server sleeps until `fd` is readable: polls it for a
    /// moment, with the GIL released, where that can pay (crate::spin);
    /// whether it became readable. The wait is kept for `waited`. A signal
    /// handler made due meanwhile runs before it returns, as it would have
    /// interrupted the sleep (what it raises comes out of here).
    fn poll(&self, py: Python<'_>, fd: i32) -> PyResult<bool> {
        // (pinned to one CPU, a server sleeps at once: the GIL is kept)
        let alone = self.spin.worth_polling() && !self.polling.swap(true, Ordering::Acquire);
        let moment = if alone {
            let moment = in_host(py, || self.spin.poll([fd], None));
            self.polling.store(false, Ordering::Release);
            moment
        } else {
            Moment::unpolled()
        };
        *self.moment.lock().unwrap_or_else(|e| e.into_inner()) = Some(moment);
        py.check_signals()?;
        Ok(moment.ready().is_some())
    }

    /// The wait that began at the last `poll` ended with something to read.
    fn waited(&self) {
        if let Some(moment) = self.moment.lock().unwrap_or_else(|e| e.into_inner()).take() {
            self.spin.waited(&moment);
        }
    }
}
