//! Holding signals in the main thread (where Python runs signal handlers)
//! while it holds a link's reading role: a handler that raises (Ctrl-C) must
//! never interrupt it between reading a frame and delivering it (the frame
//! would be lost to whichever thread waits for it) or leave the role taken.
//! Waits for frames stay interruptible: `pipe::wait_for_frame` lets the held
//! signals through with the mask saved here.

use std::cell::Cell;

thread_local! {
    /// The signal mask of this thread before `hold`, while it holds them.
    static HELD: Cell<Option<libc::sigset_t>> = const { Cell::new(None) };
    /// Whether this is the process's main thread, found on its first `hold`
    /// (two system calls saved on every later call; a thread that forked
    /// keeps what it was, which only matters to a child that cannot use its
    /// parent's twins anyway).
    static MAIN: Cell<Option<bool>> = const { Cell::new(None) };
}

fn is_main_thread() -> bool {
    MAIN.with(|main| {
        main.get().unwrap_or_else(|| {
            // SAFETY: plain system calls without arguments
            let found = unsafe { libc::gettid() == libc::getpid() };
            main.set(Some(found)); // (the cell's own value: `get` returns a copy)
            found
        })
    })
}

/// The signals a fault raises in the thread that caused it: never held.
/// Blocked, the kernel would end the process at the fault instead of
/// running the handler, and wasmtime turns a guest's traps (a stack
/// overflow, `unreachable`) into errors with these handlers, while the
/// main thread runs a guest holding its signals (`WasiGuest.recv`).
const FAULTS: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
];

/// Blocks every signal but the faults' in the main thread until `release`;
/// elsewhere, or when they are held already, does nothing. Whether it held
/// them now.
pub fn hold() -> bool {
    if !is_main_thread() || held() {
        return false;
    }
    // SAFETY: plain system calls on this thread's own signal mask
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        for fault in FAULTS {
            libc::sigdelset(&mut all, fault);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old) == 0 {
            HELD.with(|saved| saved.set(Some(old)));
            return true;
        }
    }
    false
}

/// Lets the signals `hold` held through (they are delivered now).
pub fn release() {
    if let Some(old) = HELD.with(Cell::take) {
        // SAFETY: restores this thread's mask to what it was
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    }
}

/// Whether this thread holds its signals.
pub fn held() -> bool {
    HELD.with(|saved| saved.get().is_some())
}

/// The mask this thread had before it held its signals (None: not held).
pub fn mask_before_hold() -> Option<libc::sigset_t> {
    HELD.with(Cell::get)
}

/// Whether a signal that this thread holds, and let through before it held
/// them, is pending: a step that runs without waiting on a descriptor (a
/// WASI guest's slice) looks here between steps, as `pipe::wait_for_frame`
/// lets such a signal end its wait.
pub fn held_one_pending() -> bool {
    let Some(before) = mask_before_hold() else {
        return false;
    };
    // SAFETY: plain system calls on a set owned here and on a copy of the mask
    unsafe {
        let mut pending: libc::sigset_t = std::mem::zeroed();
        if libc::sigpending(&mut pending) != 0 {
            return false;
        }
        (1..=64)
            .any(|signal| libc::sigismember(&pending, signal) == 1 && libc::sigismember(&before, signal) == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whether_this_is_the_main_thread_is_found_once() {
        std::thread::spawn(|| {
            assert!(MAIN.with(Cell::get).is_none());
            assert!(!is_main_thread());
            assert_eq!(MAIN.with(Cell::get), Some(false)); // kept for the next call
        })
        .join()
        .unwrap();
    }

    #[test]
    fn only_the_main_thread_holds_signals() {
        // the test harness runs tests on threads other than the main one
        std::thread::spawn(|| {
            hold();
            assert!(!held());
            assert!(mask_before_hold().is_none());
            release();
        })
        .join()
        .unwrap();
    }
}
