//! The signal handlers through which wasmtime turns a guest's trap (a wasm
//! `unreachable`, its stack limit, an access out of bounds, a division by
//! zero: SIGILL, SIGSEGV, SIGFPE) into an error of that guest, kept in place.
//!
//! wasmtime installs them once per process, when the first engine is made.
//! A library that installs crash reporters of its own afterwards replaces
//! them: `ray.init` in the master does (Ray's failure signal handler). The
//! next trap of any guest then ended the whole master, a trap a hostile
//! plugin can cause at will (a deep recursion, `signal.raise_signal`). So
//! the handlers are saved right after the engine is made, and each drive of
//! a guest checks that they are still there, putting them back if not. Such
//! a library's reports of the master's own crashes are lost from then on:
//! wasmtime passes faults outside wasm to what was there before it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// The signals wasmtime handles on this platform (its `foreach_handler`).
const SIGNALS: [libc::c_int; 3] = [libc::SIGILL, libc::SIGSEGV, libc::SIGFPE];

/// wasmtime's handlers, as they were right after the engine was made.
static SAVED: OnceLock<Vec<(libc::c_int, libc::sigaction)>> = OnceLock::new();

fn current(signal: libc::c_int) -> libc::sigaction {
    // SAFETY: reads the disposition of a valid signal into a zeroed struct
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut action);
        action
    }
}

/// Records the handlers wasmtime installed (called once the engine exists).
pub fn save() {
    SAVED.get_or_init(|| SIGNALS.iter().map(|&signal| (signal, current(signal))).collect());
}

/// Puts wasmtime's handlers back if another library replaced one; two
/// system calls when none did (SIGILL and SIGSEGV: crash reporters replace
/// them together).
pub fn keep() {
    let Some(saved) = SAVED.get() else { return };
    let replaced = saved
        .iter()
        .take(2)
        .any(|(signal, ours)| current(*signal).sa_sigaction != ours.sa_sigaction);
    if !replaced {
        return;
    }
    for (signal, ours) in saved {
        // SAFETY: reinstalls the disposition read from the kernel earlier
        unsafe { libc::sigaction(*signal, ours, std::ptr::null_mut()) };
    }
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "another library replaced the signal handlers that catch WASI guests' traps (Ray's \
             crash reporter does, on ray.init); cpy2py put wasmtime's back, since a guest's trap \
             would otherwise end this process"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" fn elsewhere(_: libc::c_int) {}

    /// A handler installed over wasmtime's (as `ray.init` does) is replaced
    /// by wasmtime's again at the next drive.
    #[test]
    fn a_replaced_trap_handler_is_put_back() {
        crate::wasm::runtime::runtime().unwrap();
        let ours = current(libc::SIGILL).sa_sigaction;
        // SAFETY: installs a handler that does nothing, undone below
        unsafe { libc::signal(libc::SIGILL, elsewhere as *const () as libc::sighandler_t) };
        assert_ne!(current(libc::SIGILL).sa_sigaction, ours);
        keep();
        assert_eq!(current(libc::SIGILL).sa_sigaction, ours);
    }
}
