//! Frame queues between the master and a guest thread.
//!
//! A queue holds whole frames and a byte budget: a producer blocks while the
//! queued bytes exceed it, so a guest that floods the master with frames
//! cannot grow the master's memory without bound. Closing wakes everyone.
//!
//! A queue can also keep an eventfd readable exactly while it holds a frame
//! or is closed, so that the master's Python threads wait for frames in
//! `select` (interruptible by signals, and safe for daemon threads at
//! interpreter shutdown) instead of in Rust.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The queue was closed: the other side is gone.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed;

/// What a timed pop found.
#[derive(Debug, PartialEq, Eq)]
pub enum Popped {
    Frame(Vec<u8>),
    Closed,
    TimedOut,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    closed: bool,
}

pub struct FrameQueue {
    state: Mutex<State>,
    changed: Condvar,
    max_bytes: usize,
    readable: Option<EventFd>,
}

/// An eventfd used as a level: readable while set.
struct EventFd(OwnedFd);

impl EventFd {
    fn new() -> io::Result<EventFd> {
        // SAFETY: plain system call; the result is checked before use
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn set(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64; EAGAIN (counter full) still leaves it readable
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn clear(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN means it was clear already
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }
}

impl FrameQueue {
    /// A queue that makes producers wait while more than `max_bytes` are queued
    /// (one frame is always accepted into an empty queue, whatever its size).
    pub fn new(max_bytes: usize) -> Self {
        FrameQueue {
            state: Mutex::default(),
            changed: Condvar::new(),
            max_bytes,
            readable: None,
        }
    }

    /// Like `new`, with a file descriptor that is readable exactly while a
    /// frame is queued or the queue is closed (see `readable_fd`).
    pub fn with_readable_fd(max_bytes: usize) -> io::Result<Self> {
        let mut queue = Self::new(max_bytes);
        queue.readable = Some(EventFd::new()?);
        Ok(queue)
    }

    /// The readiness descriptor, if the queue has one.
    pub fn readable_fd(&self) -> Option<RawFd> {
        self.readable.as_ref().map(|e| e.0.as_raw_fd())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `frame`, waiting while the queue is over its budget. Returns how
    /// long it waited for room.
    pub fn push(&self, frame: Vec<u8>) -> Result<Duration, Closed> {
        let started = Instant::now();
        let mut waited = false;
        let mut state = self.lock();
        while !state.closed && !state.frames.is_empty() && state.bytes + frame.len() > self.max_bytes {
            waited = true;
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if state.closed {
            return Err(Closed);
        }
        state.bytes += frame.len();
        state.frames.push_back(frame);
        if let (1, Some(readable)) = (state.frames.len(), &self.readable) {
            readable.set();
        }
        drop(state);
        self.changed.notify_all();
        Ok(if waited { started.elapsed() } else { Duration::ZERO })
    }

    /// The next frame, waiting for it; `None` once the queue is closed and
    /// drained.
    pub fn pop(&self) -> Option<Vec<u8>> {
        match self.pop_timeout(None) {
            Popped::Frame(frame) => Some(frame),
            _ => None,
        }
    }

    /// The next frame, waiting up to `timeout` (`None`: forever).
    pub fn pop_timeout(&self, timeout: Option<Duration>) -> Popped {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = self.lock();
        loop {
            if let Some(popped) = self.take(&mut state) {
                drop(state);
                self.changed.notify_all();
                return popped;
            }
            state = match deadline {
                None => self.changed.wait(state).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Popped::TimedOut;
                    }
                    self.changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// The next frame if one is queued, `Closed` once closed and drained,
    /// else `TimedOut`, without waiting.
    pub fn try_pop(&self) -> Popped {
        let mut state = self.lock();
        match self.take(&mut state) {
            Some(popped) => {
                drop(state);
                self.changed.notify_all();
                popped
            }
            None => Popped::TimedOut,
        }
    }

    /// Caller holds the lock: the next frame, or `Closed`, or None if empty.
    fn take(&self, state: &mut State) -> Option<Popped> {
        if let Some(frame) = state.frames.pop_front() {
            state.bytes -= frame.len();
            if let (true, false, Some(readable)) = (state.frames.is_empty(), state.closed, &self.readable) {
                readable.clear();
            }
            return Some(Popped::Frame(frame));
        }
        state.closed.then_some(Popped::Closed)
    }

    /// Waits up to `timeout` (`None`: forever) until a frame is queued or the
    /// queue is closed; whether one of them happened.
    pub fn wait_ready(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = self.lock();
        loop {
            if !state.frames.is_empty() || state.closed {
                return true;
            }
            state = match deadline {
                None => self.changed.wait(state).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    self.changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// No more frames go in; what is queued can still be taken.
    pub fn close(&self) {
        self.lock().closed = true;
        if let Some(readable) = &self.readable {
            readable.set();
        }
        self.changed.notify_all();
    }

    /// Closes the queue and drops what it holds.
    pub fn close_and_clear(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.frames.clear();
        state.bytes = 0;
        if let Some(readable) = &self.readable {
            readable.set();
        }
        drop(state);
        self.changed.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn frames_come_out_in_order_then_none_after_close() {
        let q = FrameQueue::new(1024);
        q.push(b"a".to_vec()).unwrap();
        q.push(b"bc".to_vec()).unwrap();
        q.close();
        assert_eq!(q.pop(), Some(b"a".to_vec()));
        assert_eq!(q.pop(), Some(b"bc".to_vec()));
        assert_eq!(q.pop(), None);
        assert_eq!(q.push(b"late".to_vec()), Err(Closed));
    }

    #[test]
    fn producer_waits_while_over_budget() {
        let q = Arc::new(FrameQueue::new(10));
        q.push(vec![0; 8]).unwrap();
        let producer = {
            let q = Arc::clone(&q);
            thread::spawn(move || q.push(vec![1; 8]).unwrap())
        };
        thread::sleep(Duration::from_millis(50));
        // the second frame cannot be queued until the first is taken
        assert_eq!(q.pop_timeout(Some(Duration::ZERO)), Popped::Frame(vec![0; 8]));
        let waited = producer.join().unwrap();
        assert!(waited >= Duration::from_millis(40), "waited {waited:?}");
        assert_eq!(q.pop(), Some(vec![1; 8]));
    }

    #[test]
    fn an_oversized_frame_still_fits_an_empty_queue() {
        let q = FrameQueue::new(4);
        assert_eq!(q.push(vec![0; 100]).unwrap(), Duration::ZERO);
    }

    fn fd_is_readable(fd: RawFd) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    #[test]
    fn the_readable_fd_follows_the_queue() {
        let q = FrameQueue::with_readable_fd(1024).unwrap();
        let fd = q.readable_fd().unwrap();
        assert!(!fd_is_readable(fd));
        assert_eq!(q.try_pop(), Popped::TimedOut);
        q.push(b"a".to_vec()).unwrap();
        q.push(b"b".to_vec()).unwrap();
        assert!(fd_is_readable(fd));
        assert_eq!(q.try_pop(), Popped::Frame(b"a".to_vec()));
        assert!(fd_is_readable(fd), "one frame is still queued");
        assert_eq!(q.try_pop(), Popped::Frame(b"b".to_vec()));
        assert!(!fd_is_readable(fd));
        q.close();
        assert!(fd_is_readable(fd), "the end is readable too");
        assert_eq!(q.try_pop(), Popped::Closed);
        assert!(fd_is_readable(fd));
    }

    #[test]
    fn timed_pop_and_wait_ready() {
        let q = FrameQueue::new(16);
        assert_eq!(q.pop_timeout(Some(Duration::from_millis(5))), Popped::TimedOut);
        assert!(!q.wait_ready(Some(Duration::from_millis(5))));
        q.close_and_clear();
        assert!(q.wait_ready(None));
        assert_eq!(q.pop_timeout(None), Popped::Closed);
    }
}
