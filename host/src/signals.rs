//! Holding signals in the main thread (where Python runs signal handlers)
//! while it holds a link's reading role: a handler that raises (Ctrl-C) must
//! never interrupt it between reading a frame and delivering it (the frame
//! would be lost to whichever thread waits for it) or leave the role taken.
//! Waits for frames stay interruptible: `pipe::wait_for_frame` lets the held
//! signals through with the mask saved here.
//!
//! A thread's mask does not stop the process's signals: the kernel gives a
//! Ctrl-C that the main thread blocks to any other thread that does not
//! (the application's own), whose C handler marks it for Python, and the
//! main thread ran the Python handler at its next bytecode, held or not.
//! So while the main thread holds, SIGINT caught elsewhere is sent on to
//! it (`redirect`), where it waits for `release` like a signal of its own.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

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
/// them now. A handler that another thread's signal made due before it
/// held them still runs at the main thread's next bytecode: the caller
/// checks for it (`twin.rs::hold_signals`).
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
        if libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old) != 0 {
            return false;
        }
        HELD.with(|saved| saved.set(Some(old)));
    }
    redirect_sigint();
    MAIN_HOLDS.store(true, Ordering::SeqCst);
    // a handler that found the main thread not holding may still be passing
    // the signal to Python: done before the caller checks (it is short;
    // yielding lets it finish when both share one CPU)
    while HANDLERS_RUNNING.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
    true
}

/// Lets the signals `hold` held through (they are delivered now).
pub fn release() {
    if let Some(old) = HELD.with(Cell::take) {
        // (first: a signal caught elsewhere from now on goes to Python at once)
        MAIN_HOLDS.store(false, Ordering::SeqCst);
        // SAFETY: restores this thread's mask to what it was
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    }
}

/// Whether this thread holds its signals.
pub fn held() -> bool {
    HELD.with(|saved| saved.get().is_some())
}

/// Whether the main thread holds its signals (only it ever does).
static MAIN_HOLDS: AtomicBool = AtomicBool::new(false);
/// How many `redirect`s run now, on any thread.
static HANDLERS_RUNNING: AtomicUsize = AtomicUsize::new(0);
/// The SIGINT handler `redirect` passes the signal on to (Python's), and
/// whether it takes `siginfo` (SA_SIGINFO).
static PASS_TO: AtomicUsize = AtomicUsize::new(0);
static PASS_TO_TAKES_INFO: AtomicBool = AtomicBool::new(false);

/// Puts `redirect` in front of SIGINT's handler, unless it is there
/// already or SIGINT has none (default, ignored). Checked at every `hold`:
/// `signal.signal(SIGINT, ...)` puts Python's own back in its place.
fn redirect_sigint() {
    // SAFETY: reads SIGINT's action; installs one that keeps its flags and
    // mask and passes every signal on to the handler it replaces
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGINT, std::ptr::null(), &mut current) != 0 {
            return;
        }
        let handler = current.sa_sigaction;
        if handler == redirect as *const () as usize || handler == libc::SIG_DFL || handler == libc::SIG_IGN {
            return;
        }
        PASS_TO_TAKES_INFO.store(current.sa_flags & libc::SA_SIGINFO != 0, Ordering::SeqCst);
        PASS_TO.store(handler, Ordering::SeqCst);
        let mut ours = current;
        ours.sa_sigaction = redirect as *const () as usize;
        ours.sa_flags |= libc::SA_SIGINFO;
        libc::sigaction(libc::SIGINT, &ours, std::ptr::null_mut());
    }
}

/// SIGINT's handler: caught by a thread other than the main one while that
/// holds its signals, the signal is sent on to the main thread, where it
/// stays pending until `release` (or its wait for a frame lets it in);
/// otherwise Python's handler gets it, as without cpy2py.
extern "C" fn redirect(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    HANDLERS_RUNNING.fetch_add(1, Ordering::SeqCst);
    // SAFETY: only async-signal-safe calls (getpid, gettid, tgkill); errno
    // is restored for the code the signal interrupted
    unsafe {
        let errno = *libc::__errno_location();
        let main = libc::getpid(); // (the main thread's id is the process's)
        if MAIN_HOLDS.load(Ordering::SeqCst) && libc::gettid() != main {
            libc::syscall(libc::SYS_tgkill, main, main, signal);
        } else {
            let handler = PASS_TO.load(Ordering::SeqCst);
            if PASS_TO_TAKES_INFO.load(Ordering::SeqCst) {
                let pass: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(handler);
                pass(signal, info, context);
            } else {
                let pass: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
                pass(signal);
            }
        }
        *libc::__errno_location() = errno;
    }
    HANDLERS_RUNNING.fetch_sub(1, Ordering::SeqCst);
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
